"""The resolved configuration of a run: typed, validated, saved with every run.

One ``RunConfig`` comes from defaults, an optional YAML file and command-line flags (flags
override the file; a flag and a ``--set`` of one key must agree, ``combine``). Unknown keys,
wrong types and out-of-range values are refused with a one-line message naming the key: a
section given a value, a word for a boolean, inf/nan, a seed beyond the generators' range, and
free-form options that their constructor's signature does not take (docs/errors.md).
"""

from __future__ import annotations

import difflib
import errno
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from morphnas.errors import LINK_LOOP, UserError, dangling_link
from morphnas.options import (
    INT64_MAX,
    baseline_names,
    checked_options,
    short_repr,
    space_names,
    space_option_types,
    strategy_names,
    strategy_option_types,
    try_space,
)


def _sums_to_one(value: tuple[float, float, float]) -> tuple[float, float, float]:
    if min(value) <= 0 or abs(sum(value) - 1.0) > 1e-6:
        raise ValueError("train/valid/test fractions must be positive and sum to 1")
    return value


Split = Annotated[tuple[float, float, float], AfterValidator(_sums_to_one)]


def _registered(what: str, names: Callable[[], tuple[str, ...]]) -> BeforeValidator:
    """A name checked against a registry when a config is validated: the registry is the one
    list of names, so a new entry is accepted at once. ``names`` imports it on demand, so that
    importing the config stays light (the registries import torch)."""

    def check(value: Any) -> Any:
        known = names()
        if isinstance(value, str) and value in known:
            return value
        close = difflib.get_close_matches(str(value), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {what} {value!r}{hint} (expected one of {', '.join(known)})")

    return BeforeValidator(check)


SpaceName = Annotated[str, _registered("search space", space_names)]
StrategyName = Annotated[str, _registered("strategy", strategy_names)]
BaselineName = Annotated[str, _registered("baseline", baseline_names)]


def _takes_numbers(annotation: Any) -> bool:
    """Whether a field's type is a number (``int``, ``float``, a ``Literal`` of integers), alone
    or with ``None``."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(type(arg) is int for arg in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_takes_numbers(arg) for arg in typing.get_args(annotation))
    return False


def _on_off(value: Any) -> Any:
    """YAML (a config file, ``--set``) reads ``on``/``off`` as booleans: take them back."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# ``auto | on | off`` settings (``train.compile``, ``search.cuda_graphs``).
AutoOnOff = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)]


class _Strict(BaseModel):
    # allow_inf_nan=False: no float key takes inf or nan (``penalty_weight: .inf`` is a slip).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A number key given true/false is a slip, not 1/0 (pydantic would take it); an integer
        beyond 64 bits would overflow in torch or NumPy."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not _takes_numbers(field.annotation):
            return value
        if isinstance(value, bool):
            raise ValueError("Input should be a number, not true or false")
        if isinstance(value, int) and abs(value) > INT64_MAX:
            raise ValueError(f"Input should fit in 64 bits (at most {INT64_MAX} in size)")
        return value


class DataConfig(_Strict):
    dataset: str = "births"
    csv: Path | None = None
    images: Path | None = Field(
        None, description="task classify: a folder of class sub-folders, or an .npz of x and y"
    )
    limit: int | None = Field(
        None, ge=10, description="task classify: at most this many training images"
    )
    time_col: str | None = None
    columns: list[str] | None = None
    window: int = Field(28, ge=1, le=100_000, description="past steps the model sees")
    horizon: int = Field(
        1, ge=1, le=100_000, description="steps ahead of the window's end to forecast"
    )
    split: Split = (0.6, 0.2, 0.2)
    scaler: Literal["standard", "max", "none"] = "standard"
    layout: Literal["multivariate", "global"] = Field(
        "multivariate",
        description="multivariate: a window is one sample of all series; global: m samples of "
        "one series each, one model shared by the series (channel independence)",
    )
    fill: Literal["none", "interpolate", "ffill"] = Field(
        "none",
        description="CSV: put rows on their regular grid and fill missing timestamps and empty "
        "cells (interpolate: linear in time; ffill: last value); none refuses them",
    )
    max_fill: float = Field(0.2, ge=0, le=1, description="most share of rows --fill may fill")
    calendar: list[str] | None = Field(
        None,
        description="known-future calendar inputs (sin/cos): auto, or names among minute, hour, "
        "dayofweek, dayofmonth, dayofyear, weekofyear, month",
    )
    targets: list[str] | None = Field(
        None, description="the series to forecast (default: all); every series stays an input"
    )


class SpaceConfig(_Strict):
    name: SpaceName = "two_input"
    nodes: int = Field(4, ge=1, le=32)
    hidden: int = Field(32, ge=1, le=4096)
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="space constructor options: wiring, output, ops/primitives, batchnorm, ...",
    )

    @field_validator("options")
    @classmethod
    def _options_fit_the_space(
        cls, options: dict[str, Any], info: ValidationInfo
    ) -> dict[str, Any]:
        """Typed by the space constructor's annotations, then tried on a tiny supernet, so
        that a bad option is refused here (before any run), also by ``train``, which builds
        no supernet (the constructor's own range checks, e.g. dropout in [0, 1))."""
        name, nodes = info.data.get("name"), info.data.get("nodes")
        if name is None:
            return options
        checked = checked_options(name, options, space_option_types(name))
        if nodes is not None:
            try_space(name, nodes, checked)
        return checked


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
    strategy: StrategyName = "darts"
    order: Literal[1, 2] = Field(1, description="DARTS order: 2 = unrolled (darts only)")
    penalty: Literal["none", "params", "flops", "latency", "latency_mlp"] = Field(
        "none", description="expected resource cost added to the architecture loss"
    )
    penalty_weight: float = Field(0.1, ge=0, description="weight of the normalised cost")
    proximity: float = Field(0.0, ge=0, description="DARTS-PRIME proximity ρ (0: off)")
    strategy_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the strategy's own options (docs/method.md), e.g. steps, terms, tau_start",
    )

    @field_validator("strategy_options")
    @classmethod
    def _options_fit_the_strategy(
        cls, options: dict[str, Any], info: ValidationInfo
    ) -> dict[str, Any]:
        """Typed by the strategy constructor's annotations (its ranges: when it is built)."""
        name = info.data.get("strategy")
        if name is None:
            return options
        return checked_options(name, options, strategy_option_types(name))

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
    cuda_graphs: AutoOnOff = Field(
        "auto",
        description="replay the supernet's unroll as CUDA graphs (auto: on CUDA, first-order "
        "strategies)",
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
    compile: AutoOnOff = Field(
        "auto", description="torch.compile the retrained cell (auto: on CUDA only)"
    )
    # lstm / gru: torch.nn's; darts_v2, lstm_genotype, gru_genotype: the published cells of
    # genotype.KNOWN (the last two: LSTM and GRU as two_input cells), retrained from scratch;
    # ar, naive, snaive, var: forecasting's own (options.baseline_names).
    baselines: list[BaselineName] = ["lstm", "gru", "ar", "naive", "snaive", "var"]


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


class RLConfig(_Strict):
    """Reinforcement learning (``task: rl``, RL-DARTS; docs/rl.md): the MinAtar game and PPO's
    budget and hyperparameters, for the search and for each retrained encoder alike."""

    env: str = Field("breakout", description="the MinAtar game (morphnas.rl.envs.GAMES)")
    envs: int = Field(8, ge=1, le=1024, description="games played at once")
    steps: int = Field(64, ge=2, le=100_000, description="rollout steps per game and update")
    updates: int = Field(40, ge=1, description="PPO updates of the search (the supernet)")
    retrain_updates: int = Field(40, ge=1, description="PPO updates of each retrained encoder")
    epochs: int = Field(4, ge=1, description="PPO epochs over each rollout")
    minibatches: int = Field(4, ge=1, description="minibatches per PPO epoch")
    lr: float = Field(5e-4, gt=0, description="Adam's rate, for α and the weights alike")
    gamma: float = Field(0.99, gt=0, le=1, description="discount")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE λ")
    clip: float = Field(0.2, gt=0, description="PPO's ratio clip ε")
    value_clip: float = Field(0.2, ge=0, description="value-loss clip (0: none)")
    value_coef: float = Field(0.5, ge=0, description="weight of the value loss")
    entropy: float = Field(0.01, ge=0, description="weight of the entropy bonus")
    grad_clip: float = Field(0.5, gt=0, description="global gradient-norm clip")
    features: int = Field(128, ge=1, le=65_536, description="the torso's Linear width")
    max_steps: int = Field(1000, ge=1, description="an episode is cut after this many steps")
    eval_episodes: int = Field(16, ge=1, le=1024, description="fresh episodes scoring a model")
    checkpoint_every: int = Field(10, ge=1, description="updates between checkpoints")

    @field_validator("env")
    @classmethod
    def _known_game(cls, value: str) -> str:
        from morphnas.rl.envs import GAMES  # on demand: the rl package imports torch

        if value not in GAMES:
            close = difflib.get_close_matches(value, GAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown env {value!r}{hint} (MinAtar games: {', '.join(GAMES)})")
        return value


def _task_kinds() -> Mapping[str, Any]:
    """The task registry (``tasks.KINDS``), imported when a config is checked, not when this
    module is: the tasks import torch, and a config is read before anything is built."""
    from morphnas.tasks import KINDS

    return KINDS


def _check_modality(data: Mapping[str, Any], task: str, modality: str) -> None:
    """Refuse a space (``data``'s ``space.name``, the default's when none) whose networks read
    another modality than the task's models (``SPACES[name].modality``, imported on demand)."""
    from morphnas.spaces import SPACES

    space = data.get("space")
    default = SpaceConfig.model_fields["name"].default
    name = space.get("name", default) if isinstance(space, Mapping) else default
    if not isinstance(name, str) or name not in SPACES:  # an unknown name: said elsewhere
        return
    reads = getattr(SPACES[name], "modality", "sequences")
    if reads != modality:
        fits = [n for n, kind in _task_kinds().items() if kind.modality == reads]
        raise ValueError(
            f"space {name} searches cells for {reads} and --task {task} models {modality}: "
            f"use --task {' or '.join(fits)}, or another --space"
        )


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
    seed: int = Field(
        0,
        ge=0,
        le=INT64_MAX,
        description="seeds Python, NumPy and torch: 0 .. 2**63-1 (torch takes up to 2**64-1 "
        "but reads a negative seed as a large one, and NumPy's generators take no negative)",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch threads; None: by size and the cores left free at start",
    )
    out: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensorboard: bool = Field(
        True,
        description="write TensorBoard events to RUN/tensorboard/ (needs the track extra; "
        "without it the run writes none and warns once)",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    growth: GrowthConfig = Field(default_factory=GrowthConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    task: str = Field(
        "forecast", description="the task's kind (tasks.KINDS): forecast | lm | classify | rl"
    )
    lm: LMConfig = Field(default_factory=LMConfig)
    rl: RLConfig = Field(default_factory=RLConfig)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """A task kind starts from its own budget (its ``defaults``) where not given; a space
        of another modality is refused first (its options would otherwise be checked against
        the kind's defaults and refused for a reason that is not the real one)."""
        if isinstance(data, dict) and isinstance(data.get("task"), str):
            kind = _task_kinds().get(data["task"])
            if kind is not None:
                data = _fill_missing(data, kind.defaults)
                _check_modality(data, data["task"], kind.modality)
        return data

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        kinds = _task_kinds()
        if value not in kinds:
            close = difflib.get_close_matches(value, list(kinds), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown task {value!r}{hint} (tasks: {', '.join(kinds)})")
        return value

    @model_validator(mode="after")
    def _task_fits_the_data(self) -> RunConfig:
        """The task's kind refuses what it cannot run (its ``check``)."""
        kinds = _task_kinds()
        _check_modality({"space": {"name": self.space.name}}, self.task, kinds[self.task].modality)
        kinds[self.task].check(self)
        own = set(kinds[self.task].baselines)
        for name, kind in kinds.items():
            foreign = sorted(set(self.train.baselines) & (set(kind.baselines) - own))
            if foreign:
                raise ValueError(
                    f"baselines {foreign} are {name} baselines; drop them for --task {self.task}"
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
    def _partial_channels_fit_the_width(self) -> RunConfig:
        """darts_cnn's ``partial_channels`` K splits every cell's channels into K groups (C
        doubles at each reduction, so K must divide C); widening would break the split."""
        k = self.space.options.get("partial_channels", 1)
        if self.space.hidden % k:
            raise ValueError(
                f"space.options.partial_channels ({k}) must divide space.hidden "
                f"({self.space.hidden}): change one of them"
            )
        if k > 1 and self.growth.width_step > 0:
            raise ValueError("growth.width_step needs space.options.partial_channels 1")
        options, strategy = self.space.options, self.search.strategy
        if strategy == "dnal" and options.get("edge_normalisation", k > 1):
            raise ValueError(
                "dnal gates each op by a sigmoid, with no edge normalisation β: set "
                "space.options.edge_normalisation=false"
            )
        order = self.search.strategy_options.get("order", self.search.order)
        if options.get("recompute") and (strategy == "idarts" or (strategy, order) == ("darts", 2)):
            raise ValueError(
                "space.options.recompute cannot recompute the cells inside a hypergradient "
                "(darts order 2, idarts): drop it, or search with a first-order strategy"
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


def merge(
    base: Mapping[str, Any], overrides: Mapping[str, Any], _where: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, section by section. A key given a value in
    ``base`` and keys inside it in ``overrides`` is a ``UserError``: the value would be lost."""
    merged = dict(base)
    for key, value in overrides.items():
        old = merged.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            merged[key] = merge(old, value, (*_where, str(key)))
        elif isinstance(value, Mapping) and value and old is not None:
            where = _printable(".".join((*_where, str(key))))
            inner = _printable(str(next(iter(value))))
            raise UserError(
                f"config: {where} holds a value ({short_repr(old)}), not a section: cannot set "
                f"{where}.{inner} inside it"
            )
        else:
            merged[key] = value
    return merged


def leaves(
    tree: Mapping[Any, Any], prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], Any]]:
    """Every value of a nested mapping with its key path; an empty mapping sets nothing."""
    found: list[tuple[tuple[str, ...], Any]] = []
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            found.extend(leaves(value, path))
        else:
            found.append((path, value))
    return found


def combine(given: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Overrides from several places, each labelled as the person typed it (``--epochs 3``,
    ``--set search.epochs=5``), as one nested mapping. None is dropped: two that set one key to
    different values, or one a key to a value and the other a key inside it, are a
    ``UserError`` naming both."""
    seen: list[tuple[tuple[str, ...], Any, str]] = []
    tree: dict[str, Any] = {}
    for label, overrides in given:
        for path, value in leaves(overrides):
            for other_path, other_value, other_label in seen:
                shared = min(len(path), len(other_path))
                if path[:shared] != other_path[:shared]:
                    continue
                key = _printable(".".join(path))
                if path == other_path and _same(value, other_value):
                    break
                first, second = _printable(other_label), _printable(label)
                if path == other_path:
                    raise UserError(f"{first} and {second} both set {key}; give one of them")
                outer, inner = sorted((".".join(path), ".".join(other_path)), key=len)
                raise UserError(
                    f"{first} and {second} disagree: one sets {_printable(outer)} to a value, "
                    f"the other sets {_printable(inner)} inside it; give one of them"
                )
            else:
                seen.append((path, value, label))
                node = tree
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = value
    return tree


def _same(a: Any, b: Any) -> bool:
    """One value typed twice (a path given as text and as a ``Path`` included)."""
    if isinstance(a, Path) or isinstance(b, Path):
        return str(a) == str(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return bool(a == b)
    except Exception:  # a value whose comparison fails cannot be shown to agree
        return False


def check_sections(data: Mapping[Any, Any], origin: str) -> None:
    """A section (``search``, ``space.options``, ...) given a value instead of keys is a
    ``UserError`` naming it, before anything is merged over it and the value is lost."""
    _check_sections(data, origin, RunConfig, "")


def _check_sections(data: Mapping[Any, Any], origin: str, model: type[BaseModel], at: str) -> None:
    for key, value in data.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue  # an unknown key: refused, with a suggestion, when validated
        annotation, where = field.annotation, f"{at}{key}"
        section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        options = typing.get_origin(annotation) is dict
        if not (section or options) or isinstance(value, BaseModel):
            continue
        if isinstance(value, Mapping):
            if section:
                _check_sections(value, origin, annotation, f"{where}.")
            continue
        inner = next(iter(annotation.model_fields)) if section else "NAME"
        raise UserError(
            f"{origin}: {where} is a section, not a value: set the keys inside it "
            f"(e.g. {where}.{inner}) (got {short_repr(value)})"
        )


def _one_line(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    where = ".".join(_printable(str(part)) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key" + _closest_key(first["loc"])
    value = first.get("input")
    got = "" if isinstance(value, dict) or not where else f" (got {short_repr(value)})"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{origin}: {where + ': ' if where else ''}{message}{got}{more}"


def _printable(text: str) -> str:
    """``text`` as typed, or quoted where it holds a line break or another control character
    (a message stays one line)."""
    return text if text.isprintable() else repr(text)


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
        if dangling := dangling_link(path):
            raise UserError(
                f"config file {path} {dangling}; fix the link or give the path of the file"
            ) from None
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(
            f"config file {path} is a directory; give the path of a YAML config file"
        ) from None
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise UserError(f"cannot read config file {path}: {err.strerror or err}") from None
        raise UserError(f"config file {path} {LINK_LOOP}; give the path of the real file") from None
    except (UnicodeDecodeError, yaml.YAMLError) as err:
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
        check_sections(data, "config")
    origin = "config"
    if file is not None:
        from_file = read_yaml(file)
        check_sections(from_file, str(file))
        data = merge(data, from_file)
        origin = str(file)
    check_sections(overrides or {}, "config")
    data = merge(data, overrides or {})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(_one_line(err, origin)) from None


def dump(config: RunConfig) -> str:
    """The YAML text saved as ``config.yaml``: every value, defaults included."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
