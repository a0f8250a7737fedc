"""The resolved configuration of a run: typed, validated, saved with every run.

One ``RunConfig`` comes from defaults, an optional YAML file and command-line flags (flags
override the file). Unknown keys, wrong types and out-of-range values are refused with a
one-line message naming the key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from morphnas.data.corpus import CORPORA
from morphnas.errors import UserError


def _sums_to_one(value: tuple[float, float, float]) -> tuple[float, float, float]:
    if min(value) <= 0 or abs(sum(value) - 1.0) > 1e-6:
        raise ValueError("train/valid/test fractions must be positive and sum to 1")
    return value


Split = Annotated[tuple[float, float, float], AfterValidator(_sums_to_one)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    dataset: str = "births"
    csv: Path | None = None
    time_col: str | None = None
    columns: list[str] | None = None
    window: int = Field(28, ge=1, description="past steps the model sees")
    horizon: int = Field(1, ge=1, description="steps ahead of the window's end to forecast")
    split: Split = (0.6, 0.2, 0.2)
    scaler: Literal["standard", "max", "none"] = "standard"
    layout: Literal["multivariate", "global"] = Field(
        "multivariate",
        description="multivariate: a window is one sample of all series; global: m samples of "
        "one series each, one model shared by the series (channel independence)",
    )


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


STRATEGY_NAMES = ("darts", "idarts", "snas", "gdas", "dnal", "msdarts", "random")


class SearchConfig(_Strict):
    strategy: Literal["darts", "idarts", "snas", "gdas", "dnal", "msdarts", "random"] = "darts"
    order: Literal[1, 2] = Field(1, description="DARTS order: 2 = unrolled (darts only)")
    penalty: Literal["none", "params", "flops", "latency"] = Field(
        "none", description="expected resource cost added to the architecture loss"
    )
    penalty_weight: float = Field(0.1, ge=0, description="weight of the normalised cost")
    proximity: float = Field(0.0, ge=0, description="DARTS-PRIME proximity ρ (0: off)")
    strategy_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the strategy's own options (docs/method.md), e.g. steps, terms, tau_start",
    )
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(3e-3, gt=0, description="weight learning rate (Adam)")
    weight_decay: float = Field(0.0, ge=0)
    arch_lr: float = Field(3e-3, gt=0)
    arch_weight_decay: float = Field(1e-3, ge=0)
    clip: float = Field(10.0, gt=0)
    weight_steps: int = Field(
        1,
        ge=1,
        description="weight steps per architecture step: the architecture steps on every "
        "n-th training batch (spec 2f; the official iDARTS code takes T)",
    )
    stream: int = Field(
        1, ge=1, description="feed the training span in this many chronological chunks (online)"
    )
    # Against collapse to parameter-free ops (docs/method.md, "Against collapse").
    warmup_epochs: int = Field(
        0,
        ge=0,
        description="the first n search epochs take weight steps only (α untouched), counted "
        "inside search.epochs",
    )
    select: Literal["alpha", "valid"] = Field(
        "alpha",
        description="the cell kept: alpha = the most likely genotype; valid = the best of "
        "search.candidates likely genotypes, each retrained briefly, by valid loss",
    )
    candidates: int = Field(4, ge=1, description="genotypes retrained by select: valid")
    select_epochs: int = Field(
        5, ge=1, description="epochs of each candidate's brief retraining (train's optimizer)"
    )
    degenerate: Literal["skip", "keep"] = Field(
        "skip",
        description="a cell whose output ignores its input or its state, or is constant: skip "
        "= never kept (the next likely one is), keep = kept but reported",
    )
    start_from: str | None = Field(
        None,
        min_length=1,
        description="warm start: a published cell (gru, lstm, darts_v2) or a genotype.json "
        "whose choices start start_logit ahead in α (a prior, not a constraint)",
    )
    start_logit: float = Field(
        3.0, gt=0, allow_inf_nan=False, description="what start_from adds to its α entries"
    )

    @model_validator(mode="after")
    def _warmup_leaves_architecture_steps(self) -> SearchConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be below search.epochs "
                f"({self.epochs}): the warm-up counts inside the search, and α needs an epoch "
                "to learn"
            )
        return self

    @model_validator(mode="after")
    def _order_is_darts(self) -> SearchConfig:
        if self.order == 2 and self.strategy != "darts":
            raise ValueError(
                f"order 2 is DARTS's unrolled gradient; strategy {self.strategy!r} takes none "
                "(use --strategy darts --order 2)"
            )
        return self

    nan_policy: Literal["stop", "retry"] = Field(
        "stop",
        description="a non-finite loss stops, or restarts from the last checkpoint at "
        "half the learning rates (at most 3 times)",
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
    series_embedding: int = Field(
        0, ge=0, description="data.layout global: a learned per-series id of this size (0: none)"
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the retrained cell (auto: on CUDA only)"
    )
    # lstm / gru: torch.nn's; darts_v2, lstm_genotype, gru_genotype: the published cells of
    # genotype.KNOWN (the last two: LSTM and GRU as two_input cells), retrained from scratch.
    baselines: list[
        Literal["lstm", "gru", "darts_v2", "lstm_genotype", "gru_genotype", "ar", "naive"]
    ] = [
        "lstm",
        "gru",
        "ar",
        "naive",
    ]


class LMConfig(_Strict):
    """Language modelling (``task: lm``): the corpus, its tokens, BPTT and the DARTS LM's
    regularisers (docs/lm.md). The cells' own variational dropouts are ``space.options``
    ``dropout_x`` / ``dropout_h``; optimizer, epochs and batch sizes are ``search``/``train``."""

    corpus: Path | None = Field(None, description="your own UTF-8 text file (else data.dataset)")
    level: Literal["word", "char"] = "word"
    vocab_size: int = Field(10_000, ge=3, description="most frequent training tokens kept")
    train_tokens: int | None = Field(
        100_000, ge=1, description="cap on training tokens, shared out over the training works"
    )
    split: Split = Field(
        (0.8, 0.1, 0.1), description="train/valid/test line fractions of a --corpus file"
    )
    bptt: int = Field(35, ge=2, description="mean BPTT window length")
    variable_bptt: bool = Field(True, description="DARTS's random window lengths")
    eval_batch_size: int = Field(16, ge=1, description="columns of the valid/test streams")
    emb_size: int | None = Field(None, ge=1, description="embedding size (default: hidden)")
    tie_weights: bool = True
    dropout: float = Field(0.1, ge=0, lt=1, description="locked dropout on the cell's outputs")
    dropout_i: float = Field(0.1, ge=0, lt=1, description="locked dropout on the embeddings")
    dropout_e: float = Field(0.0, ge=0, lt=1, description="embedding dropout (whole words)")
    tar: float = Field(1e-3, ge=0, description="temporal activation regularisation β")
    ar: float = Field(0.0, ge=0, description="activation regularisation α")
    match_params: bool = Field(
        True, description="size each baseline's hidden state to the searched model's parameters"
    )


# The language-modelling budget (docs/lm.md): every value a person did not give, when
# ``task: lm``. Sized so that `morphnas search --task lm` (search and three retrainings) ends
# within 15 minutes on two CPU cores.
LM_DEFAULTS: dict[str, Any] = {
    "data": {"dataset": "shakespeare"},
    "space": {"hidden": 64, "options": {"dropout_x": 0.1, "dropout_h": 0.1}},
    "search": {"epochs": 2, "batch_size": 32, "lr": 2e-3, "clip": 0.25},
    "train": {
        "epochs": 3, "batch_size": 32, "lr": 2e-3, "clip": 0.25, "patience": 2,
        "baselines": ["lstm", "gru"],
    },
}  # fmt: skip


def _fill_missing(data: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with every key of ``defaults`` it lacks (recursively into sections)."""
    filled = dict(data)
    for key, value in defaults.items():
        if key not in filled:
            filled[key] = value
        elif isinstance(value, Mapping) and isinstance(filled[key], dict):
            filled[key] = _fill_missing(filled[key], value)
    return filled


class RunConfig(_Strict):
    seed: int = 0
    threads: int | None = Field(
        None, ge=1, description="torch threads; None: by size and the cores left free at start"
    )
    out: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    growth: GrowthConfig = Field(default_factory=GrowthConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    task: Literal["forecast", "lm"] = Field("forecast", description="forecast | lm")
    lm: LMConfig = Field(default_factory=LMConfig)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """Language modelling starts from its own budget (``LM_DEFAULTS``) where not given."""
        if isinstance(data, dict) and data.get("task") == "lm":
            return _fill_missing(data, LM_DEFAULTS)
        return data

    @model_validator(mode="after")
    def _task_fits_the_data(self) -> RunConfig:
        if self.task == "forecast":
            if self.data.dataset in CORPORA and self.data.csv is None:
                raise ValueError(
                    f"{self.data.dataset!r} is a text corpus: add --task lm to model it"
                )
            return self
        if self.data.csv is not None:
            raise ValueError("--task lm reads text: give it with --corpus FILE, not --csv")
        if self.data.layout != "multivariate":
            raise ValueError(
                f"data.layout {self.data.layout!r} is for forecasting: --task lm has one token "
                "stream, no series to share a model between"
            )
        if self.growth.width_step > 0:
            raise ValueError(
                "width growth (growth.width_step) is not supported for --task lm; grow nodes only"
            )
        tabular = sorted(set(self.train.baselines) & {"ar", "naive"})
        if tabular:
            raise ValueError(
                f"baselines {tabular} are forecasting baselines; --task lm takes lstm, gru, "
                "darts_v2, lstm_genotype, gru_genotype"
            )
        return self

    @model_validator(mode="after")
    def _series_embedding_is_global(self) -> RunConfig:
        if self.train.series_embedding > 0 and self.data.layout != "global":
            raise ValueError(
                "train.series_embedding tells series apart in one shared model: it needs "
                "data.layout global"
            )
        return self

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
    if first["type"] == "extra_forbidden":
        message = "unknown key" + _closest_key(first["loc"])
    value = first.get("input")
    got = "" if isinstance(value, dict) or not where else f" (got {value!r})"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{origin}: {where + ': ' if where else ''}{message}{got}{more}"


def _closest_key(loc: tuple[Any, ...]) -> str:
    """``; did you mean 'epochs'?`` for a misspelt key, from the keys its section accepts."""
    section: Any = RunConfig
    for part in loc[:-1]:
        field_info = getattr(section, "model_fields", {}).get(part)
        section = getattr(field_info, "annotation", None)
        if not isinstance(section, type) or not issubclass(section, BaseModel):
            return ""
    known = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (keys here: {', '.join(known)})"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-5`` and ``1e6`` are numbers, as in YAML 1.2 and Python:
    YAML 1.1 wants a dot (``1.0e-5``) and reads them as strings, which typed fields coerce but
    free-form ones (``search.strategy_options``, ``space.options``) would keep as text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """One YAML document (a config file, or the value of ``--set KEY=VALUE``)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file, or a one-line ``UserError``."""
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"))
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
