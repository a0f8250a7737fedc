"""The resolved configuration of a run: typed, validated, saved with every run.

One ``RunConfig`` comes from defaults, an optional YAML file and command-line flags (flags
override the file). Unknown keys, wrong types and out-of-range values are refused with a
one-line message naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from morphnas.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    dataset: str = "births"
    csv: Path | None = None
    time_col: str | None = None
    columns: list[str] | None = None
    window: int = Field(28, ge=1, description="past steps the model sees")
    horizon: int = Field(1, ge=1, description="steps ahead of the window's end to forecast")
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    scaler: Literal["standard", "max", "none"] = "standard"

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0 or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError("train/valid/test fractions must be positive and sum to 1")
        return value


class SpaceConfig(_Strict):
    name: Literal["darts_rnn", "two_input"] = "two_input"
    nodes: int = Field(4, ge=1, le=32)
    hidden: int = Field(32, ge=1, le=4096)
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="space constructor options: wiring, output, ops/primitives, batchnorm, ...",
    )


class GrowthConfig(_Strict):
    """How the backbone grows during search (our reading of Jie & Gao; docs/method.md)."""

    mode: Literal["none", "grow-then-prune", "grow-and-prune"] = "none"
    nodes_start: int = Field(1, ge=1, description="nodes at the start of a growing search")
    nodes_max: int | None = Field(None, ge=1, description="growth stops here (default space.nodes)")
    trigger: Literal["schedule", "plateau"] = "schedule"
    every: int | None = Field(None, ge=1, description="epochs between growths (schedule)")
    patience: int = Field(3, ge=1, description="epochs without improvement (plateau)")
    min_delta: float = Field(0.005, ge=0, description="relative improvement that counts (plateau)")
    alpha_init: Literal["random", "mean"] = "random"
    tolerance: float = Field(1e-5, gt=0, description="max output change a growth may cause")
    width_step: int = Field(0, ge=0, description="hidden units added at each growth (0: none)")
    width_max: int | None = Field(None, ge=1, description="width growth stops here")
    width_noise: float = Field(
        0.05, ge=0, lt=1, description="spread of the copies' reader shares (breaks symmetry)"
    )


class SearchConfig(_Strict):
    strategy: str = "darts"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(3e-3, gt=0, description="weight learning rate (Adam)")
    weight_decay: float = Field(0.0, ge=0)
    arch_lr: float = Field(3e-3, gt=0)
    arch_weight_decay: float = Field(1e-3, ge=0)
    clip: float = Field(10.0, gt=0)
    stream: int = Field(
        1, ge=1, description="feed the training span in this many chronological chunks (online)"
    )


class TrainConfig(_Strict):
    epochs: int = Field(40, ge=1, description="retraining epochs (upper bound; early stopping)")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(5, ge=1, description="epochs without a better valid loss before stopping")
    clip: float = Field(10.0, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout before the forecasting head")
    ar_window: int = Field(
        28, ge=0, description="LSTNet autoregressive component over the last k steps (0: none)"
    )
    window_norm: Literal["none", "last", "mean"] = Field(
        "last", description="subtract each window's last value or mean, add it to the forecast"
    )
    baselines: list[Literal["lstm", "gru", "darts_v2", "ar", "naive"]] = [
        "lstm",
        "gru",
        "ar",
        "naive",
    ]


class RunConfig(_Strict):
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads; None chooses by size")
    out: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    growth: GrowthConfig = Field(default_factory=GrowthConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _growth_fits_the_space(self) -> RunConfig:
        if self.growth.mode != "none" and self.growth.nodes_start > self.nodes_max:
            raise ValueError(
                f"growth.nodes_start ({self.growth.nodes_start}) exceeds the maximum node count "
                f"({self.nodes_max}); raise --nodes-max or lower --nodes-start"
            )
        return self

    @property
    def nodes_max(self) -> int:
        """The largest cell the search may reach: growth.nodes_max, else space.nodes."""
        return self.growth.nodes_max or self.space.nodes

    @property
    def nodes_initial(self) -> int:
        """Nodes of the supernet when the search starts."""
        return self.space.nodes if self.growth.mode == "none" else self.growth.nodes_start


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _one_line(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    got = "" if isinstance(value, dict) or not where else f" (got {value!r})"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{origin}: {where + ': ' if where else ''}{message}{got}{more}"


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file, or a one-line ``UserError``."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = str(err).replace("\n", " ")
        raise UserError(f"cannot read config file {path}: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping of sections at the top level")
    return data


def resolve(
    file: Path | None = None, overrides: Mapping[str, Any] | None = None, base: Any = None
) -> RunConfig:
    """Defaults, then ``base`` (a dict or config), then the YAML ``file``, then ``overrides``."""
    data: dict[str, Any] = {}
    if base is not None:
        data = base.model_dump() if isinstance(base, RunConfig) else dict(base)
    origin = "config"
    if file is not None:
        data = merge(data, read_yaml(file))
        origin = str(file)
    data = merge(data, overrides or {})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(_one_line(err, origin)) from None


def dump(config: RunConfig) -> str:
    """The YAML text saved as ``config.yaml``: every value, defaults included."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
