"""``morphnas sweep SPEC.yaml``: a grid of config variants × seeds, each one ``api.search`` in its
own run directory, fanned out as Ray Tune trials (``morphnas.distributed``).

The spec (YAML, checked strictly)::

    base: base.yaml            # a config file (relative to the spec) or an inline mapping
    grid:                      # dotted config keys -> values; every combination is a variant
      growth.mode: [none, grow-and-prune]
      search.strategy: [darts, gdas]
    seeds: 3                   # a count (0, 1, 2) or a list of seeds
    metric: valid_rse          # what ranks the variants (default: the task's valid metric)
    mode: min                  # min | max (default: max for correlations and accuracies)
    asha: {grace_period: 1, reduction_factor: 4}   # --scheduler asha only

A trial is exactly the run a compare makes (``api._compare_run``), to
``DIR/<variant>-seed<k>``, the variant named by its grid values (``mode=none,strategy=gdas``).
Running the same command again continues the sweep as ``compare --reuse`` does: finished runs
are kept, a stopped run of the same config resumes from its checkpoint, the rest run. Each
trial's end is written to ``DIR/sweep.json`` at once, so a driver killed at any moment loses
only the trials it was running; a trial ASHA stopped stays stopped while the sweep runs under
ASHA.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from morphnas import api, distributed, run_files, runs, spaces
from morphnas import config as config_mod
from morphnas.config import RunConfig
from morphnas.engine.progress import Progress
from morphnas.engine.runtime import malloc_policy
from morphnas.errors import UserError

SPEC_FILE = "sweep.yaml"  # the spec a sweep directory was started with: marks it as a sweep
RESULT_FILE = "sweep.json"
SCHEDULERS = ("fifo", "asha")
_HIGHER_IS_BETTER = ("test_corr", "valid_accuracy", "test_accuracy")


class AshaSpec(BaseModel):
    """ASHA's rungs: the first after ``grace_period`` search epochs, then every
    ``reduction_factor``× as many; each keeps the best 1/``reduction_factor`` of the trials."""

    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(4, ge=2)


class SweepSpec(BaseModel):
    """What a sweep runs (module docstring)."""

    model_config = ConfigDict(extra="forbid")
    base: str | dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]]
    seeds: int | list[int] = Field(1)
    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    asha: AshaSpec = Field(default_factory=AshaSpec)


def load(path: Path) -> tuple[SweepSpec, RunConfig]:
    """The spec in ``path``, checked, and its base config; every error is one line naming the
    key, before Ray starts or any file is written."""
    raw = config_mod.read_yaml(path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "spec"
        if first["type"] == "extra_forbidden":
            keys = ", ".join(SweepSpec.model_fields)
            raise UserError(f"{path}: unknown key {where!r} (a sweep spec takes {keys})") from None
        raise UserError(f"{path}: {where}: {first['msg']}") from None
    if not spec.grid:
        raise UserError(f"{path}: grid is empty; give at least one KEY: [VALUES] to sweep")
    empty = [key for key, values in spec.grid.items() if not values]
    if empty:
        raise UserError(f"{path}: grid key {empty[0]!r} has no values; give it a list of values")
    if not _seeds(spec):
        raise UserError(f"{path}: seeds must be a count of at least 1 or a non-empty list")
    if isinstance(spec.base, str):
        base_path = Path(spec.base)
        return spec, config_mod.resolve(
            path.parent / base_path if not base_path.is_absolute() else base_path
        )
    return spec, config_mod.resolve(overrides=spec.base)


def sweep(
    spec: SweepSpec,
    base: RunConfig,
    *,
    out: Path | None = None,
    address: str | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    scheduler: str = "fifo",
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> api.RunResult:
    """Run every variant × seed of ``spec`` not already finished in ``out``; the table of mean ±
    std per variant over its finished seeds, also in ``out/sweep.json``."""
    if scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler takes {' or '.join(SCHEDULERS)}, got {scheduler!r}")
    if force and resume:
        raise UserError("--resume continues the sweep in --out and --force replaces it: pass one")
    metric, mode = _metric(spec, base, scheduler)
    variants = _variants(spec, base)
    distributed.require("morphnas sweep")
    if address is not None:  # an address nothing answers at: refused before any file
        distributed.check_address(address)
    threads = base.threads or max(1, int(cpus_per_trial))
    sweep_dir = _claim(base, out, force, resume)
    planned = [
        (name, seed, config_mod.resolve(
            base=base,
            overrides=config_mod.merge(
                overrides,
                {"seed": seed, "out": str(sweep_dir / f"{name}-seed{seed}"), "threads": threads},
            ),
        ))
        for seed in _seeds(spec)
        for name, overrides in variants
    ]  # fmt: skip
    runs.start(sweep_dir, base, None, replace=force)
    (sweep_dir / SPEC_FILE).write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    stopped_before = _stopped_before(sweep_dir) if scheduler == "asha" else set()
    states: list[dict[str, Any] | None] = []
    for *_, cfg in planned:
        row = api._finished(cfg)
        if row is not None:
            states.append({"state": "finished", **row})
        elif Path(cfg.out).name in stopped_before:
            states.append({"state": "stopped"})
        else:
            states.append(None)
    todo = [i for i, state in enumerate(states) if state is None]
    trials = [_trial(planned[i][2]) for i in todo]
    record = functools.partial(_record, sweep_dir, spec, planned, states, metric, mode)
    record()
    if trials:
        plan = distributed.Plan(
            cpus=cpus_per_trial,
            gpus=gpus_per_trial,
            asha_epochs=max(cfg.search.epochs for *_, cfg in planned)
            if scheduler == "asha"
            else None,
            grace_period=spec.asha.grace_period,
            reduction_factor=spec.asha.reduction_factor,
        )

        def finished(index: int, outcome: distributed.Outcome) -> None:
            row = outcome.row
            states[todo[index]] = (
                {"state": "stopped"} if row is None else {"state": "finished", **row}
            )
            record()

        with distributed.session(address, checked=True):
            distributed.run(
                trials,
                plan,
                keep_memory=malloc_policy() == "keep",
                progress=progress,
                description="sweep",
                finished=finished,
            )
    return record()


def _metric(spec: SweepSpec, base: RunConfig, scheduler: str) -> tuple[str, str]:
    """The metric that ranks the variants and its direction: under ASHA the one metric every
    search epoch reports; otherwise the task's validation metric unless the spec names one."""
    default = {"lm": "valid_ppl", "classify": "valid_accuracy"}.get(base.task, "valid_rse")
    metric = spec.metric or (distributed.EPOCH_METRIC if scheduler == "asha" else default)
    if metric not in api.COMPARE_METRICS:
        raise UserError(f"sweep metric {metric!r} is not one of {', '.join(api.COMPARE_METRICS)}")
    if scheduler == "asha" and metric != distributed.EPOCH_METRIC:
        raise UserError(
            "--scheduler asha judges trials at each search epoch, where only "
            f"{distributed.EPOCH_METRIC} exists; drop metric: {metric} from the spec, or use "
            "--scheduler fifo"
        )
    return metric, spec.mode or ("max" if metric in _HIGHER_IS_BETTER else "min")


def _seeds(spec: SweepSpec) -> list[int]:
    return list(range(spec.seeds)) if isinstance(spec.seeds, int) else list(spec.seeds)


def _variants(spec: SweepSpec, base: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    """Every combination of the grid as (name, config overrides), each checked against the
    config schema and its strategy options built on a tiny space, as compare checks its own."""
    keys = list(spec.grid)
    names = _short_keys(keys)
    variants = []
    for values in itertools.product(*spec.grid.values()):
        labelled = [
            (f"grid {key}", _nested(key, value)) for key, value in zip(keys, values, strict=True)
        ]
        name = ",".join(
            f"{short}={_slug(value)}" for short, value in zip(names, values, strict=True)
        )
        try:
            overrides = config_mod.combine(labelled)
            variant = config_mod.resolve(base=base, overrides=overrides)
            api._strategy(variant, spaces.build(variant.space.name, 1, 2, 1))
        except UserError as err:
            raise UserError(f"sweep variant {name!r}: {err}") from None
        variants.append((name, overrides))
    if len({name for name, _ in variants}) < len(variants):
        raise UserError("two sweep variants get the same directory name; make the values differ")
    return variants


def _short_keys(keys: Sequence[str]) -> list[str]:
    """Each grid key by its last part (``growth.mode`` → ``mode``) unless two share it."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return [short if last.count(short) == 1 else key for short, key in zip(last, keys, strict=True)]


def _slug(value: Any) -> str:
    """A grid value as a file-name-safe piece of a directory name."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text.strip()).strip("_") or "_"


def _nested(key: str, value: Any) -> dict[str, Any]:
    """``a.b.c`` = value as ``{"a": {"b": {"c": value}}}``."""
    tree: Any = value
    for part in reversed(key.split(".")):
        if not part.strip():
            raise UserError(f"sweep grid key {key!r} is not a dotted config key (e.g. search.lr)")
        tree = {part: tree}
    return tree


def _claim(base: RunConfig, out: Path | None, force: bool, resume: bool) -> Path:
    """The sweep directory: a sweep already there is continued (the same command again, or
    ``--resume``, which requires one); anything else there is refused unless ``--force``."""
    config = base if out is None else base.model_copy(update={"out": Path(out)})
    here = config.out is not None and (Path(config.out) / SPEC_FILE).is_file()
    if resume and not here:
        raise UserError(f"{config.out} holds no sweep to resume (no {SPEC_FILE}); check --out")
    if here and not force:
        return Path(config.out)
    return runs.claim(config, "sweep", force)


def _stopped_before(sweep_dir: Path) -> set[str]:
    """The run directories an earlier ASHA run of this sweep stopped (not rerun under ASHA)."""
    path = sweep_dir / RESULT_FILE
    if not path.is_file():
        return set()
    trials = run_files.read_json(path).get("trials", [])
    return {Path(t["run_dir"]).name for t in trials if t.get("state") == "stopped"}


def _trial(config: RunConfig) -> distributed.Trial:
    """One run as a trial: resumed when its directory holds a stopped run of this config with
    a checkpoint, started afresh over one that stopped before its first checkpoint."""
    out = Path(config.out)
    there = api._same_run(config)
    resume = there and any((out / "checkpoints").glob("*.pt"))
    run = functools.partial(api._compare_run, config, there and not resume, resume)
    return distributed.Trial(out.name, run, out / "metrics.jsonl")


def _record(
    sweep_dir: Path,
    spec: SweepSpec,
    planned: Sequence[tuple[str, int, RunConfig]],
    states: Sequence[Mapping[str, Any] | None],
    metric: str,
    mode: str,
) -> api.RunResult:
    """``sweep.json`` as it stands (every trial's state and row, the table, the best variant),
    written atomically; the result the CLI prints."""
    trials = [
        {"variant": name, "seed": seed, "run_dir": str(cfg.out), **(state or {"state": "pending"})}
        for (name, seed, cfg), state in zip(planned, states, strict=True)
    ]
    table = []
    for name in dict.fromkeys(name for name, _, _ in planned):
        mine = [t for t in trials if t["variant"] == name]
        row = api._aggregate(name, [t for t in mine if t["state"] == "finished"])
        row["stopped"] = sum(t["state"] == "stopped" for t in mine)
        table.append(row)
    ranked = [row for row in table if row.get(metric) is not None]
    best = None
    if ranked:
        pick = min if mode == "min" else max
        best = pick(ranked, key=lambda row: row[metric])["variant"]
    result = {"metric": metric, "mode": mode, "best": best, "trials": trials, "table": table}
    run_files.write_json(sweep_dir / RESULT_FILE, {"spec": spec.model_dump(), **result})
    return api.RunResult(sweep_dir, None, table, {k: v for k, v in result.items() if k != "table"})
