"""The Python face of morphnas: search, train and evaluate, the same functions the CLI calls.

A run is a directory (DESIGN §5): ``config.yaml`` (the resolved config), ``genotype.json``,
``metrics.jsonl``, ``summary.json``, ``checkpoints/``, ``models/`` (the retrained weights) and
``plots/``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from morphnas import (
    cells,
    degenerate,
    distributed,
    engine,
    report,
    run_files,
    runs,
    selection,
    spaces,
    strategies,
    tasks,
    tensorboard,
    warmstart,
)
from morphnas import config as config_mod
from morphnas import genotype as genotype_mod
from morphnas.cell_shape import columns as cell_shape_columns
from morphnas.cell_shape import summary as cell_shape_summary
from morphnas.config import RunConfig
from morphnas.engine import parallel
from morphnas.engine.checkpoint import load as load_checkpoint
from morphnas.engine.checkpoint import save_atomic
from morphnas.engine.compiled import compile_cell, wants_compile
from morphnas.engine.progress import Progress
from morphnas.engine.resume import StopFlag, fits, stop_on_signals
from morphnas.engine.runtime import (
    apply_threads,
    busy_cores,
    choose_threads,
    cpu_cores,
    malloc_policy,
    resolve_device,
    seed_everything,
)
from morphnas.errors import UserError
from morphnas.genotype import PUBLISHED_BASELINES, Genotype
from morphnas.options import baseline_names
from morphnas.tasks import TaskKind
from morphnas.tasks.base import Task

SEARCHED = "searched"


@dataclass
class RunResult:
    """What a command produced: where, the architecture (if any) and one result row per model."""

    run_dir: Path
    genotype: Genotype | None
    results: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "genotype": self.genotype.to_dict() if self.genotype else None,
            "results": self.results,
            **self.extra,
        }


@dataclass
class _Run:
    """What every step of one run shares: its directory, data, metrics log, progress display
    and stop flag, and its config (replaced when width growth finds another hidden size)."""

    dir: Path
    config: RunConfig
    data: Any
    log: run_files.MetricsLog
    progress: Progress | None
    stop: StopFlag | None

    @property
    def kind(self) -> TaskKind:
        """The run's task kind, for its config as it is now."""
        return tasks.kind_for(self.config)


def search(
    config: RunConfig,
    *,
    progress: Progress | None = None,
    force: bool = False,
    resume: bool = False,
) -> RunResult:
    """Search a cell, derive it, retrain it beside the baselines, and compare them on test.

    ``resume``: continue the run in ``config.out`` (its own saved config) from its checkpoints;
    it finishes exactly as if it had never stopped (CPU, same machine).

    ``force``: replace the run already in ``config.out``. Nothing of it is read: it is moved
    aside when this run writes its first file and deleted once that succeeded (put back if it
    failed; ``morphnas.runs``), so the result is that of a run in an empty directory.
    """
    # Everything a person can get wrong is checked before the run directory exists, so a
    # failed start leaves nothing behind that would block the corrected command.
    group = parallel.join(config)  # None outside torchrun
    progress = progress if parallel.is_main(group) else None
    run_dir = parallel.on_main(
        group, lambda: runs.claim(config, "search", force, resume), share=True
    )
    kind = tasks.kind_for(config)
    own_search = getattr(kind, "own_search", None)
    if own_search is not None:  # a kind with its own loop (rl: PPO on a game, not batches)
        return own_search(run_dir, progress=progress, force=force, resume=resume)
    data = kind.load()
    seed_everything(config.seed)
    n_series = kind.input_size(data)
    saved = _saved_search(run_dir) if resume else None
    if saved is not None and saved["shape"]["hidden"] != config.space.hidden:
        config = _at_width(config, saved["shape"]["hidden"])
    try:
        space = spaces.build(
            config.space.name,
            n_series,
            config.space.hidden,
            config.nodes_initial,
            **config.space.options,
        )
    except (TypeError, ValueError) as err:
        raise UserError(f"space.options: {err}") from None
    if saved is None:  # a checkpoint holds α, warm start included
        warmstart.warm_start(space, config)
    strategy = _strategy(config, space)  # before the run directory: bad options leave none
    prepared = strategy.prepare(progress)  # E2NAS's VAE: an interrupt here leaves no run
    opened = parallel.on_main(
        group, lambda: _open_run(run_dir, config, "search", resume=resume, force=force, saved=saved)
    )
    if opened is None:  # another rank of a data-parallel search: rank 0 writes the run
        _apply_thread_policy(config)
        opened = parallel.NullLog(), nullcontext()
    log, cleared = opened
    main = parallel.is_main(group)
    board = tensorboard.attach(log, run_dir, config, space.op_names) if main else None
    model = kind.wrap(space, data, config.space.hidden)
    task = kind.engine_task(data, parallel.global_batch(group, config.search.batch_size))
    with stop_on_signals() as stop, cleared:
        outcome = engine.search(
            model,
            strategy,
            task,
            config.search,
            seed=config.seed,
            log=log,
            checkpoint_dir=run_dir / "checkpoints",
            growth=config.growth,
            nodes_max=config.nodes_max,
            history_path=run_dir / "history.json" if parallel.is_main(group) else None,
            progress=progress,
            resume=saved,
            stamp=runs.stamp(run_dir),
            stop=stop,
            group=group,
        )
        if not parallel.is_main(group):  # rank 0 alone retrains, scores and reports
            return RunResult(run_dir, outcome.genotype, [], {})
        genotype = _with_search_metadata(outcome, space, config)
        one_shot = []
        if config.growth.mode == "grow-and-prune":
            # The pruned supernet is the final cell with inherited weights: score it as it is.
            scores = kind.score(model, data)
            one_shot = [{"model": "one-shot", "params": _count_params(model, space.arch), **scores}]
        if space.hidden_size != config.space.hidden:
            # Width growth found the size: every model is retrained at it (equal hidden sizes).
            config = _at_width(config, space.hidden_size)
        run = _Run(run_dir, config, data, log, progress, stop)
        genotype, chosen = _select_cell(genotype, space, run)
        genotype.save(run_dir / "genotype.json")
        _plot_search(run_dir, space.op_names, genotype, outcome.events)
        models: list[tuple[str, Genotype | str]] = [(SEARCHED, genotype)]
        models += [(name, name) for name in config.train.baselines]
        results = _train_and_compare(models, run)
    results[1:1] = one_shot
    searched = next(row for row in results if row["model"] == SEARCHED)
    searched["degenerate"] = chosen["degenerate"]
    if chosen["degenerate"]:
        searched["degenerate_reason"] = chosen["candidates"][chosen["chosen"] - 1]["reason"]
    extra = {
        "hidden": space.hidden_size,
        "search_seconds": outcome.seconds,
        "search_cpu_seconds": outcome.cpu_seconds,
        "search_valid_loss": outcome.valid_loss,
        "nodes": len(genotype.nodes),
        "growth_events": len(outcome.events),
        "cell_shape": cell_shape_summary(genotype),
        "selection": chosen,
        **prepared,
        **kind.summary(data),
    }
    tensorboard.finish(board, config, genotype, results, extra)
    _write_summary(run_dir, genotype, models, results, extra)
    channels = getattr(strategy, "channel_options", None)
    if channels is not None:  # DNAL at level=channels: its channel stages on what was retrained
        from morphnas import prune  # on demand: prune builds on this module

        pruned = prune.prune(
            run_dir, channels, progress=progress, resume=(run_dir / "prune").exists()
        )
        extra["channels"] = pruned.results
    return RunResult(run_dir, genotype, results, extra)


def prepare(config: RunConfig, *, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Do now, once, what the configured strategy does at the start of a search of this config
    and at each growth (E2NAS: train the graph VAE of every cell the search visits), so that
    later searches find it in the cache. The supernet grows as the search's does (grown nodes
    are residual, which the VAE knows). One record per cell size: what was built or found."""
    try:
        space = spaces.build(config.space.name, 1, 2, config.nodes_initial, **config.space.options)
    except (TypeError, ValueError) as err:
        raise UserError(f"space.options: {err}") from None
    records = [{"nodes": space.nodes, **_strategy(config, space).prepare(progress)}]
    while config.growth.mode != "none" and space.nodes < config.nodes_max:
        space.grow(config.growth.alpha_init)
        records.append({"nodes": space.nodes, **_strategy(config, space).prepare(progress)})
    return records


def prepare_latency(config: RunConfig, *, progress: Progress | None = None) -> list[dict[str, Any]]:
    """``morphnas latency-model``: fit (or find) now the predictor of every cell size a
    search of ``config`` visits, on its data's input size, hidden size, device and threads, so
    the search finds it in the cache. One record per size: nodes, hidden, the figures."""
    from morphnas.strategies.latency_model import LatencyModelPenalty, Settings

    kind = tasks.kind_for(config)
    data = kind.load()
    threads = _apply_thread_policy(config)
    try:
        space = spaces.build(
            config.space.name,
            kind.input_size(data),
            config.space.hidden,
            config.nodes_initial,
            **config.space.options,
        )
    except (TypeError, ValueError) as err:
        raise UserError(f"space.options: {err}") from None
    space = space.to(resolve_device(config.device))
    options = config.search.strategy_options
    try:
        settings = Settings(
            samples=options.get("latency_samples", Settings.samples),
            repeats=options.get("latency_repeats", Settings.repeats),
        )
    except ValueError as err:
        raise UserError(f"search.strategy_options: {err}") from None
    penalty = LatencyModelPenalty(space, settings)

    def record() -> dict[str, Any]:
        penalty.predictor(progress)
        info = penalty.info[penalty.size()]
        figures = {k: v for k, v in info.items() if isinstance(v, int | float | str)}
        return {
            "nodes": len(space.arch),
            "hidden": space.hidden_size,
            "threads": threads,
            **figures,
        }

    records = [record()]
    while config.growth.mode != "none" and space.nodes < config.nodes_max:
        space.grow(config.growth.alpha_init)
        records.append(record())
    return records


def _select_cell(derived: Genotype, space: Any, run: _Run) -> tuple[Genotype, dict[str, Any]]:
    """The cell the run retrains, and how it was chosen (``selection`` in summary.json).

    ``derive`` trusts the largest ``α`` blindly; here the likeliest genotypes
    (``selection.ranked_genotypes``, the derived one first) are checked in turn at the run's
    sizes (``degenerate.check``) until enough usable ones are found: one for ``select: alpha``,
    ``search.candidates`` for ``select: valid``, which are then retrained briefly and compared
    by valid loss (never test). With ``search.degenerate: skip`` a degenerate cell is passed
    over; when none of the ``SCAN_LIMIT`` likeliest is usable, the derived cell is kept and the
    record, a warning and the results row say that it is degenerate.
    """
    search = run.config.search
    wanted = search.candidates if search.select == "valid" else 1
    sizes = (run.kind.input_size(run.data), run.config.space.hidden)
    records: list[dict[str, Any]] = []
    usable: list[tuple[dict[str, Any], Genotype]] = []
    ranked = itertools.islice(selection.ranked_genotypes(space, derived), selection.SCAN_LIMIT)
    for rank, (likelihood, genotype) in enumerate(ranked, start=1):
        verdict = degenerate.check(genotype, *sizes)
        finite = likelihood is not None and math.isfinite(likelihood)
        record = {
            "rank": rank,
            "log_likelihood": likelihood if finite else None,
            "nodes": genotype.to_dict()["nodes"],
            **verdict.to_dict(),
        }
        records.append(record)
        if search.degenerate == "keep" or not verdict.degenerate:
            usable.append((record, genotype))
            if len(usable) == wanted:
                break
    if search.select == "valid" and len(usable) > 1:  # one alone has nothing to beat
        _retrain_candidates(usable, run)
    scored = [pair for pair in usable if pair[0].get("valid_loss") is not None]
    if scored:
        best, genotype = min(scored, key=lambda pair: pair[0]["valid_loss"])
    else:  # alpha; one candidate; all diverged; or none usable (then: the derived cell)
        best, genotype = usable[0] if usable else (records[0], derived)
    chosen = {
        "select": search.select,
        "degenerate_policy": search.degenerate,
        "chosen": best["rank"],
        "degenerate": best["degenerate"],
        "note": _selection_note(records, best, len(usable), search),
        "candidates": records,
    }
    flagged = best["degenerate"] or records[0]["degenerate"]
    if search.select == "valid" or flagged:
        _log_once(run.log, {"phase": "select", "event": "choice", "chosen": best["rank"]})
    if flagged:
        warnings.warn(chosen["note"], stacklevel=2)
    metadata = {**genotype.metadata, "selection": {"select": search.select, "rank": best["rank"]}}
    return dataclasses.replace(genotype, metadata=metadata), chosen


def _selection_note(
    records: list[dict[str, Any]],
    best: dict[str, Any],
    usable: int,
    search: config_mod.SearchConfig,
) -> str | None:
    """One line for a person on how the cell was chosen; None when it is simply the derived,
    healthy cell."""
    first = records[0]
    if best["degenerate"]:
        if search.degenerate == "keep":
            return (
                f"the searched cell is degenerate ({best['reason']}); kept because "
                "search.degenerate is keep"
            )
        return (
            f"no cell among the {len(records)} most likely is non-degenerate: the searched cell "
            f"is degenerate ({best['reason']}), so its row measures the model around it, not a cell"
        )
    parts = []
    if first["degenerate"]:
        parts.append(f"the most likely cell is degenerate ({first['reason']})")
    if search.select == "valid" and best.get("valid_loss") is not None:
        parts.append(
            f"candidate {best['rank']} of {usable} had the best valid loss "
            f"({best['valid_loss']:.4g} after {search.select_epochs} epoch"
            f"{'s' if search.select_epochs > 1 else ''} of retraining)"
        )
    elif first["degenerate"]:
        parts.append(f"kept candidate {best['rank']}, the most likely non-degenerate cell")
    return "; ".join(parts) or None


def _retrain_candidates(usable: list[tuple[dict[str, Any], Genotype]], run: _Run) -> None:
    """Retrain each candidate from scratch for ``search.select_epochs`` epochs (the train
    config's optimizer, seed and batches) and put its best valid loss in its record.

    Each record goes to ``selection.json`` as its candidate finishes, so a resumed run retrains
    only what was left (a candidate stopped midway continues from its checkpoint). A candidate
    whose training diverges is recorded as such and not chosen.
    """
    config, data, run_dir = run.config, run.data, run.dir
    path = run_dir / "selection.json"
    done = {r["rank"]: r for r in _read_selection(path)} if path.exists() else {}
    brief = config.train.model_copy(update={"epochs": config.search.select_epochs})
    task = run.kind.engine_task(data, brief.batch_size)  # one for all, as in retraining
    for record, genotype in usable:
        saved = done.get(record["rank"])
        if saved is not None and saved["nodes"] == record["nodes"]:
            record.update({k: saved[k] for k in ("valid_loss", "best_epoch", "epochs", "diverged")})
            continue
        name = f"candidate-{record['rank']}"
        checkpoint_path = run_dir / "checkpoints" / f"train_{name}.pt"
        resumed = None
        if checkpoint_path.is_file():
            resumed = runs.checked_checkpoint(checkpoint_path, "train", run_dir)
        seed_everything(config.seed)
        model = _build_model(genotype, config, data)
        try:
            outcome = engine.train(
                model, task, brief, name=name, seed=config.seed, log=run.log,
                progress=run.progress, checkpoint_path=checkpoint_path, resume=resumed,
                stamp=runs.stamp(run_dir), stop=run.stop, phase="select",
            )  # fmt: skip
            record.update(
                valid_loss=outcome.valid_loss,
                best_epoch=outcome.best_epoch,
                epochs=outcome.epochs,
                diverged=None,
            )
        except UserError as err:  # its loss became non-finite (engine.loops.check_finite)
            record.update(valid_loss=None, best_epoch=None, epochs=None, diverged=str(err))
        done[record["rank"]] = record
        run_files.write_json(path, list(done.values()))


def _read_selection(path: Path) -> list[dict[str, Any]]:
    """A stopped run's ``selection.json``: the candidates it has retrained, checked (a damaged
    file is a one-line error naming it, before anything is retrained)."""
    records = run_files.read_json(path, expect=list)
    keys = ("rank", "nodes", "valid_loss", "best_epoch", "epochs", "diverged")
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or any(key not in record for key in keys):
            raise UserError(
                f"{path}: candidate {number} is not a whole record ({', '.join(keys)}); "
                f"{run_files.DAMAGED}"
            )
    return records


def _log_once(log: run_files.MetricsLog, row: dict[str, Any]) -> None:
    """Append ``row`` unless a resumed run's log already holds it (it is never trimmed)."""
    if row not in run_files.read_metrics(log.path):
        log.append(row)


def _at_width(config: RunConfig, hidden: int) -> RunConfig:
    return config_mod.resolve(base=config, overrides={"space": {"hidden": hidden}})


def _saved_search(run_dir: Path) -> dict[str, Any] | None:
    """The search checkpoint a resumed run continues from (None: the search had not saved yet)."""
    path = run_dir / "checkpoints" / "search_last.pt"
    return runs.checked_checkpoint(path, "search", run_dir) if path.is_file() else None


def _strategy(config: RunConfig, space: Any) -> strategies.Strategy:
    """The configured strategy on ``space``; a bad option is a one-line user error."""
    search = config.search
    options = {
        "lr": search.arch_lr,
        "weight_decay": search.arch_weight_decay,
        "weight_lr": search.lr,
        "penalty": search.penalty,
        "penalty_weight": search.penalty_weight,
        "proximity": search.proximity,
        # ``search.order`` goes to the strategies that take one (config refuses order 2 for
        # the others).
        **({"order": search.order} if "order" in strategies.options_of(search.strategy) else {}),
        **search.strategy_options,
    }
    try:
        return strategies.build(search.strategy, space, **options)
    except (TypeError, ValueError) as err:
        raise UserError(f"search.strategy_options: {err}") from None


def _plot_search(
    run_dir: Path, op_names: Sequence[str], genotype: Genotype, events: Sequence[Any]
) -> None:
    """The search's plots: mixing weights over epochs, the derived cell, the growth timeline."""
    rows = run_files.read_metrics(run_dir / "metrics.jsonl")
    report.plot_arch_weights(rows, op_names, run_dir / "plots/arch.png")
    report.plot_genotype(genotype, run_dir / "plots/genotype.png")
    if events:
        report.plot_growth(rows, [e.to_dict() for e in events], run_dir / "plots/growth.png")


def train(
    config: RunConfig,
    *,
    genotype: Genotype | None = None,
    baseline: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
    resume: bool = False,
) -> RunResult:
    """Train one model from scratch (a genotype's cell or a baseline) and evaluate it on test.

    ``resume``: continue the run in ``config.out`` from its checkpoint (the model to train is
    read from the run's ``summary``-to-be: its ``genotype.json`` or its saved baseline name).
    ``force``: replace the run already in ``config.out``, reading nothing of it (as ``search``).
    """
    if resume:
        genotype, baseline = _resumed_model(config)
    if (genotype is None) == (baseline is None):
        raise UserError(
            f"give exactly one of --genotype FILE or --baseline {'|'.join(baseline_names())}"
        )
    run_dir = runs.claim(config, "train", force, resume)
    kind = tasks.kind_for(config)
    data = kind.load()
    log, cleared = _open_run(run_dir, config, "train", resume=resume, force=force)
    board = tensorboard.attach(log, run_dir, config)
    if baseline is not None and not resume:
        run_files.write_json(run_dir / "model.json", {"baseline": baseline})
    if genotype is not None:
        genotype.save(run_dir / "genotype.json")
        report.plot_genotype(genotype, run_dir / "plots/genotype.png")
    models: list[tuple[str, Genotype | str]] = (
        [("genotype", genotype)] if genotype is not None else [(str(baseline), str(baseline))]
    )
    with stop_on_signals() as stop, cleared:
        results = _train_and_compare(models, _Run(run_dir, config, data, log, progress, stop))
    tensorboard.finish(board, config, genotype, results)
    _write_summary(run_dir, genotype, models, results, kind.summary(data))
    return RunResult(run_dir, genotype, results)


def _resumed_model(config: RunConfig) -> tuple[Genotype | None, str | None]:
    """What a resumed ``train`` run was training: its genotype, or the baseline it recorded."""
    run_dir = Path(config.out or "")
    if (run_dir / "genotype.json").is_file():
        return genotype_mod.load(run_dir / "genotype.json"), None
    try:
        return None, str(json.loads((run_dir / "model.json").read_text("utf-8"))["baseline"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{run_dir} is not a resumable train run (no genotype.json or model.json)"
        ) from None


@dataclass
class TrainedRun:
    """A finished run's saved models rebuilt from its files, with its config, task kind and data
    (``evaluate`` re-scores them; ``morphnas prune`` learns their channels)."""

    dir: Path
    config: RunConfig
    kind: TaskKind
    data: Any
    genotype: Genotype | None
    summary: dict[str, Any]
    # (name, saved kind, model with its trained weights, or the row of a model without weights)
    models: list[tuple[str, str, nn.Module | dict[str, Any]]]


def load_trained(run_dir: Path) -> TrainedRun:
    """Every file it reads is checked (``run_files``) before any work: a damaged one is a
    one-line error naming it."""
    run_dir = run_files.check_run_dir(run_dir)
    summary = run_files.read_summary(run_dir)
    known = {"genotype", *baseline_names()}
    for entry in summary["models"]:
        if entry["kind"] not in known:
            raise UserError(
                f"{run_dir / 'summary.json'}: model {entry['name']!r} has the unknown kind "
                f"{entry['kind']!r} (expected one of {', '.join(sorted(known))}); "
                f"{run_files.DAMAGED}"
            )
    config = run_files.read_config(run_dir)
    _apply_thread_policy(config)  # the run's own count, which its config.yaml records
    if "hidden" in summary:  # width growth retrains every model at the width it found
        config = config_mod.resolve(base=config, overrides={"space": {"hidden": summary["hidden"]}})
    genotype = genotype_mod.load(run_dir / "genotype.json") if summary.get("genotype") else None
    task_kind = tasks.kind_for(config)
    data = task_kind.load()
    models: list[tuple[str, str, nn.Module | dict[str, Any]]] = []
    for entry in summary["models"]:
        name, kind = entry["name"], entry["kind"]
        architecture: Genotype | str = genotype if kind == "genotype" and genotype else kind
        untrained = task_kind.reference(kind, data)
        if untrained is not None:
            models.append((name, kind, untrained[0]))
            continue
        model = _build_model(architecture, config, data, reference=genotype)
        state = load_checkpoint(run_dir / "models" / f"{name}.pt")
        try:
            model.load_state_dict(state["state_dict"])
        except (KeyError, RuntimeError) as err:
            reason = str(err).splitlines()[0]
            raise UserError(f"models/{name}.pt does not match its architecture: {reason}") from None
        models.append((name, kind, model))
    return TrainedRun(run_dir, config, task_kind, data, genotype, summary, models)


def evaluate(run_dir: Path) -> RunResult:
    """Re-score a finished run's saved models on its test span (data rebuilt from its config)."""
    run = load_trained(run_dir)
    results = []
    for name, _, model in run.models:
        if not isinstance(model, nn.Module):
            results.append(model)
            continue
        row = {"model": name, "params": _count_params(model), **run.kind.score(model, run.data)}
        row["train_seconds"] = next(
            (r.get("train_seconds") for r in run.summary["results"] if r["model"] == name), None
        )
        results.append(row)
    return RunResult(run.dir, run.genotype, results)


COMPARE_METRICS = (
    "search_seconds", "search_cpu_seconds", "search_valid_loss", "nodes", "params",
    "valid_rse", "test_rse", "test_corr", "valid_ppl", "test_ppl", "flops", "valid_accuracy",
    "test_accuracy", "cell_width", "cell_depth",
)  # fmt: skip


def compare(
    config: RunConfig,
    variants: Sequence[tuple[str, dict[str, Any]]],
    seeds: Sequence[int],
    *,
    progress: Progress | None = None,
    force: bool = False,
    jobs: int = 1,
    reuse: bool = False,
) -> RunResult:
    """Run one search (and retraining of its cell) per variant and seed on the same data and
    budget; report every run and, per variant, the mean and standard deviation over seeds.

    ``variants`` are ``(name, config overrides)`` pairs, e.g. one per growth mode, or per strategy
    with its own ``search.strategy_options``; every variant's strategy is built once on a tiny
    space first, so a bad option is an error before any run. The runs go to
    ``<out>/<variant>-seed<k>``; the table to ``<out>/compare.json``. ``jobs`` > 1 runs that many
    searches at once as Ray Tune trials (``morphnas.distributed``; the ``ray`` extra), each on
    its share of the cores unless ``threads`` is set; each run seeds itself, so it gives what
    ``jobs=1`` gives at the same thread count.

    ``reuse``: ``out`` may hold an earlier compare; a run there with the same config (threads
    aside) is kept if finished and resumed if stopped, so a compare can be continued, or extended
    with seeds or variants, without redoing work. ``force`` instead replaces the whole earlier
    compare in ``out``, every run in it, as ``search``'s ``force`` does; the two exclude each other.
    """
    if force and reuse:
        raise UserError(
            "--reuse keeps the runs in --out and --force replaces them: pass only one of the two"
        )
    if jobs > 1:
        distributed.require(f"compare --jobs {jobs}")
    for name, overrides in variants:  # a bad strategy option: an error before any run or file
        variant = config_mod.resolve(base=config, overrides=overrides)
        try:
            # The variant's own space (its options decide, e.g., whether nodes choose inputs).
            cell = variant.space
            _strategy(variant, spaces.build(cell.name, 1, cell.hidden, cell.nodes, **cell.options))
        except UserError as err:
            raise UserError(f"compare variant {name!r}: {err}") from None
    base_dir = runs.claim(config, "compare", force, reuse=reuse)
    share = {} if config.threads or jobs == 1 else {"threads": max(1, cpu_cores() // jobs)}
    # A worker's share is its count. With ``force`` every earlier run under base_dir goes now,
    # so each run below starts in an empty directory.
    _start_run(base_dir, config.model_copy(update=share), None, replace=force)
    # Seed-major order: drifting load on a shared machine hits every variant alike.
    planned = [
        (name, seed, config_mod.resolve(
            base=config,
            overrides=config_mod.merge(
                overrides, {"seed": seed, "out": str(base_dir / f"{name}-seed{seed}"), **share}
            ),
        ))
        for seed in seeds
        for name, overrides in variants
    ]  # fmt: skip
    rows = [_finished(cfg) if reuse else None for _, _, cfg in planned]
    todo = [i for i, row in enumerate(rows) if row is None]
    # Not finished but there with this config: stopped, to resume.
    pending = [(planned[i][2], reuse and _same_run(planned[i][2])) for i in todo]
    if jobs == 1:
        fresh = [_compare_run(cfg, force, resume, progress) for cfg, resume in pending]
    else:
        fresh = _in_processes(pending, force, jobs, progress)
    for i, row in zip(todo, fresh, strict=True):
        rows[i] = row
    each = [
        {"variant": name, "seed": seed, **row, **cell_shape_columns(row.get("cell_shape"))}
        for (name, seed, _), row in zip(planned, rows, strict=True)
    ]
    table = [_aggregate(name, [r for r in each if r["variant"] == name]) for name, _ in variants]
    run_files.write_json(base_dir / "compare.json", {"runs": each, "table": table})
    return RunResult(base_dir, None, table, {"runs": each})


def _compare_run(
    config: RunConfig, force: bool, resume: bool, progress: Progress | None
) -> dict[str, Any]:
    """One compare run: the search's figures and its retrained cell's row."""
    result = search(config, progress=progress, force=force, resume=resume)
    searched = next(r for r in result.results if r["model"] == SEARCHED)
    return {**result.extra, **searched}


def _in_processes(
    runs: list[tuple[RunConfig, bool]], force: bool, jobs: int, progress: Progress | None
) -> list[dict[str, Any]]:
    """The runs ``jobs`` at a time, each a Ray Tune trial in a worker process of its own on its
    share of the cores (``morphnas.distributed``, the backend ``morphnas sweep`` uses too), in
    the given order."""
    trials = [
        distributed.Trial(
            Path(cfg.out).name,
            functools.partial(_compare_run, cfg, force, resume),
            Path(cfg.out) / "metrics.jsonl",
        )
        for cfg, resume in runs
    ]
    plan = distributed.Plan(cpus=cpu_cores() / jobs, concurrent=jobs)
    with distributed.session():
        done = distributed.run(
            trials, plan, keep_memory=malloc_policy() == "keep", progress=progress
        )
    return [outcome.row or {} for outcome in done]  # FIFO: every trial ends with its row


def _same_run(config: RunConfig) -> bool:
    """Whether ``config.out`` holds a run of this very config (the thread count aside: it only
    changes the order of float sums; and whether it writes TensorBoard events); a different one
    there is an error, not overwritten."""
    saved_path = Path(config.out) / "config.yaml"
    if not saved_path.is_file():
        return False
    saved = config_mod.resolve(saved_path, overrides={"out": str(config.out)})
    saved = saved.model_copy(update={"threads": config.threads, "tensorboard": config.tensorboard})
    if config_mod.dump(saved) != config_mod.dump(config):
        raise UserError(
            f"{config.out} holds a run with another config than this compare plans; "
            "use a new --out, or drop --reuse and pass --force to replace the whole compare"
        )
    return True


def _finished(config: RunConfig) -> dict[str, Any] | None:
    """The compare row of a finished run of this config in ``config.out``, else None."""
    summary_path = Path(config.out) / "summary.json"
    if not (_same_run(config) and summary_path.exists()):
        return None
    summary = run_files.read_summary(Path(config.out))
    searched = next((r for r in summary["results"] if r["model"] == SEARCHED), None)
    if searched is None:
        raise UserError(
            f"{summary_path}: no result for the {SEARCHED!r} model; {run_files.DAMAGED} "
            "(pass --force instead of --reuse to run the compare again)"
        )
    extra = {k: v for k, v in summary.items() if k not in ("genotype", "models", "results")}
    return {**extra, **searched}


def _aggregate(
    variant: str, runs: list[dict[str, Any]], metrics: Sequence[str] = COMPARE_METRICS
) -> dict[str, Any]:
    """Mean and (sample) standard deviation of each metric over a variant's seeds (``metrics``:
    compare's, or the benchmark suite's, which averages every model and paired difference)."""
    row: dict[str, Any] = {"variant": variant, "seeds": len(runs)}
    for key in metrics:
        values = [float(r[key]) for r in runs if r.get(key) is not None]
        if values:
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
            row[key] = mean
            row[f"{key}_std"] = var**0.5 if len(values) > 1 else 0.0
    return row


def horizons(
    config: RunConfig,
    steps: Sequence[int],
    *,
    progress: Progress | None = None,
    force: bool = False,
    reuse: bool = False,
) -> RunResult:
    """One search (cell and baselines retrained) per forecast horizon, as LSTNet reports: a
    ``compare`` whose variants are the horizons (runs in ``<out>/h<k>-seed<seed>``, finished
    ones kept and stopped ones resumed with ``reuse``), and one row per model and horizon with
    its test figures, also written to ``<out>/horizons.json``."""
    if len(set(steps)) != len(steps) or any(h < 1 for h in steps):
        raise UserError(f"--horizon takes distinct positive integers, e.g. 3,6,12,24; got {steps}")
    variants = [(f"h{h}", {"data": {"horizon": h}}) for h in steps]
    compared = compare(config, variants, [config.seed], progress=progress, force=force, reuse=reuse)
    rows = []
    for run in compared.extra["runs"]:
        run_dir = compared.run_dir / f"{run['variant']}-seed{config.seed}"
        summary = run_files.read_summary(run_dir)
        horizon = int(run["variant"][1:])
        rows += [{"horizon": horizon, **row} for row in summary["results"]]
    table = {"horizons": list(steps), "results": rows}
    run_files.write_json(compared.run_dir / "horizons.json", table)
    return RunResult(compared.run_dir, None, rows, {"horizons": list(steps)})


def plot(run_dir: Path) -> list[Path]:
    """Redraw a run's plots from its files (metrics, genotype, growth history); return them.

    Every file is read and checked (``run_files``), and every plot's place, before the first
    plot is written: a damaged file or a ``plots`` that is a file changes nothing."""
    run_dir = run_files.check_run_dir(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise UserError(f"{run_dir} is not a morphnas run directory (no metrics.jsonl)")
    rows = run_files.read_metrics(metrics)
    genotype_path = run_dir / "genotype.json"
    genotype = genotype_mod.load(genotype_path) if genotype_path.exists() else None
    history = run_dir / "history.json"
    events = run_files.read_history(history) if history.exists() else None
    plots = run_dir / "plots"
    planned: list[tuple[Callable[[Path], Path], Path]] = []
    if any(row.get("phase") in ("search", "train") for row in rows):
        planned.append(
            (lambda out: report.plot_learning_curves(rows, out), plots / "learning_curves.png")
        )
    if genotype is not None:
        planned.append((lambda out: report.plot_genotype(genotype, out), plots / "genotype.png"))
        op_names = genotype.metadata.get("op_names")
        if op_names and any(row.get("phase") == "search" for row in rows):
            if not (isinstance(op_names, list) and all(isinstance(n, str) for n in op_names)):
                raise UserError(
                    f"{genotype_path}: metadata.op_names must be a list of op names; "
                    f"{run_files.DAMAGED}"
                )
            planned.append(
                (lambda out: _plot_arch(rows, op_names, out, metrics), plots / "arch.png")
            )
    if events is not None:
        planned.append((lambda out: report.plot_growth(rows, events, out), plots / "growth.png"))
    for _, out in planned:
        report.check_output(out)
    return [draw(out) for draw, out in planned]


def _plot_arch(rows: list[dict], op_names: list[str], out: Path, metrics: Path) -> Path:
    """``report.plot_arch_weights``; search rows whose ``arch`` does not fit the op names (a
    damaged metrics file) are one line naming the file."""
    try:
        return report.plot_arch_weights(rows, op_names, out)
    except (ValueError, TypeError) as err:
        raise UserError(f"{metrics}: cannot plot the architecture weights: {err}") from None


def resume_config(
    run_dir: Path, threads: int | None = None, *, kind: str | None = None
) -> RunConfig:
    """The saved config of a run, to continue it with ``search``/``train(..., resume=True)``,
    which check it against what the run started with (``runs.check_continuable``, once: it
    hashes the run's input files).

    ``threads`` replaces the saved thread count; the resumed run writes it to ``config.yaml``
    with its first row, so that the file says what the run goes on with: for a run that other
    processes slowed down after its start (its threads wait on each other when one shares a
    core). Another count changes the order of float sums, so the resumed run then matches an
    uninterrupted one only to float rounding.
    """
    run_dir = runs.resumable(Path(run_dir), kind)
    saved = config_mod.resolve(run_dir / "config.yaml")
    if threads is not None and threads != saved.threads:
        saved = config_mod.resolve(base=saved, overrides={"threads": threads})
    return config_mod.resolve(base=saved, overrides={"out": str(run_dir)})


def _open_run(
    run_dir: Path,
    config: RunConfig,
    command: str,
    *,
    resume: bool,
    force: bool,
    saved: dict[str, Any] | None = None,
) -> tuple[run_files.MetricsLog, AbstractContextManager[None]]:
    """Start ``run_dir`` for ``command`` (search, train), or, resuming, check what it holds and
    plan its repairs (``runs.continue_run``; ``saved``: the search checkpoint). Returns the
    metrics log the run writes (the repairs run before its first row) and the context the run
    works in: a new run that fails before its first checkpoint leaves nothing behind."""
    repair = runs.continue_run(run_dir, config, saved) if resume else None
    existed = run_dir.exists()
    if resume:
        _apply_thread_policy(config)
    else:
        _start_run(run_dir, config, command, replace=force)
    log = run_files.MetricsLog(run_dir / "metrics.jsonl", before_first=repair)
    cleared = nullcontext() if resume else runs.dropped_if_nothing_saved(run_dir, existed)
    return log, cleared


def _start_run(
    run_dir: Path, config: RunConfig, kind: str | None, *, replace: bool = False
) -> None:
    """Set the thread count for this run's size and the cores free now, then start the run
    directory with the config that records it (``runs.start``)."""
    config = config.model_copy(update={"threads": _apply_thread_policy(config)})
    runs.start(run_dir, config, kind, replace=replace)


def _apply_thread_policy(config: RunConfig) -> int:
    """Threads for this run's size on its device and the cores other processes leave free (on
    CUDA the host count is left as it is); set, and returned."""
    device = resolve_device(config.device)
    size = (config.space.hidden, config.search.batch_size)
    threads = choose_threads(*size, config.threads, device=device)
    if config.threads is None and threads > 1 and device.type == "cpu":
        busy = busy_cores()
        free = choose_threads(*size, device=device, busy=busy or 0.0)
        if free < threads:
            warnings.warn(
                f"other processes keep {busy:.1f} of this machine's {cpu_cores()} cores busy: "
                f"running on {free} thread(s), not {threads}, because threads that share a "
                "core with another process hold up the rest (pass --threads to choose)",
                stacklevel=2,
            )
            threads = free
    apply_threads(threads)
    return threads


def _with_search_metadata(outcome: engine.SearchOutcome, space: Any, config: RunConfig) -> Genotype:
    """The derived genotype, carrying the final mixing probabilities and how it was found."""
    metadata = {
        "strategy": config.search.strategy,
        "search_epochs": outcome.epochs,
        "growth": config.growth.mode,
        "hidden_size": space.hidden_size,
        "space_options": config.space.options,
        "op_names": list(space.op_names),
        "probabilities": [p.detach().tolist() for p in space.mixing_weights()],
    }
    if config.search.start_from is not None:
        metadata.update(start_from=config.search.start_from, start_logit=config.search.start_logit)
    return dataclasses.replace(outcome.genotype, metadata=metadata)


def _build_model(
    architecture: Genotype | str,
    config: RunConfig,
    data: Any,
    reference: Genotype | None = None,
) -> nn.Module:
    """A genotype's cell, a recurrent baseline, or ``ar`` (the linear part alone), in the task's
    model; a baseline is as wide as the task's kind says beside the ``reference`` cell."""
    kind = tasks.kind_for(config)
    hidden = config.space.hidden
    n_series = kind.input_size(data)
    if isinstance(architecture, str) and architecture in PUBLISHED_BASELINES:
        architecture = genotype_mod.KNOWN[PUBLISHED_BASELINES[architecture]]
    if isinstance(architecture, Genotype):
        cell = cells.build(
            architecture, n_series, hidden, **cells.options_for(architecture, config)
        )
    elif architecture == "ar":
        if config.train.ar_window < 1:
            raise UserError("the 'ar' baseline needs train.ar_window >= 1")
        cell = None
    else:
        hidden = kind.baseline_hidden(architecture, data, reference)
        cell = kind.baseline(architecture, data, hidden)
    return kind.wrap(cell, data, hidden)


def _count_params(model: nn.Module, exclude: Iterable[nn.Parameter] = ()) -> int:
    """Trainable weights of a model; architecture parameters passed in ``exclude`` don't count."""
    skip = {id(p) for p in exclude}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _compile_cell(model: nn.Module, task: Task, config: RunConfig) -> float | None:
    """``train.compile``: the retrained cell compiled in place; the compile seconds, or None
    (not asked, or the backend failed and the cell runs eagerly)."""
    device = next(model.parameters()).device
    if not wants_compile(config.train.compile, device):
        return None
    _, cell_input = task.probe()
    return compile_cell(model.cell, cell_input.to(device))


def _train_and_compare(
    models: Sequence[tuple[str, Genotype | str]], run: _Run
) -> list[dict[str, Any]]:
    """Train each model from the same seed on the same data; score all on valid and test.

    A model whose final weights are already saved (a resumed run) is loaded, not retrained; one
    with a training checkpoint continues from it.
    """
    config, data, run_dir, kind = run.config, run.data, run.dir, run.kind
    results, test_predictions = [], {}
    task = kind.engine_task(data, config.train.batch_size)
    reference = next((a for _, a in models if isinstance(a, Genotype)), None)
    for name, architecture in models:
        untrained = kind.reference(architecture, data) if isinstance(architecture, str) else None
        if untrained is not None:  # a baseline without weights (forecasting's naive)
            results.append(untrained[0])
            if untrained[1] is not None:
                test_predictions[name] = untrained[1]
            continue
        seed_everything(config.seed)
        model = _build_model(architecture, config, data, reference=reference)
        final_path = run_dir / "models" / f"{name}.pt"
        checkpoint_path = run_dir / "checkpoints" / f"train_{name}.pt"
        compile_seconds = None
        if final_path.is_file():
            saved = runs.checked_checkpoint(final_path, "model", run_dir)
            fits(model, saved["state_dict"], final_path)
            try:
                outcome = engine.TrainOutcome(**saved["outcome"])
            except TypeError:
                raise UserError(
                    f"{final_path} does not record how its model was trained (edited or "
                    "damaged); delete it to train that model again"
                ) from None
        else:
            if isinstance(architecture, Genotype):
                compile_seconds = _compile_cell(model, task, config)
            outcome = engine.train(
                model,
                task,
                config.train,
                name=name,
                seed=config.seed,
                log=run.log,
                progress=run.progress,
                checkpoint_path=checkpoint_path,
                resume=(
                    runs.checked_checkpoint(checkpoint_path, "train", run_dir)
                    if checkpoint_path.is_file()
                    else None
                ),
                stamp=runs.stamp(run_dir),
                stop=run.stop,
            )
            state = {
                "state_dict": model.state_dict(),
                "outcome": dataclasses.asdict(outcome),
                "run": runs.stamp(run_dir),
            }
            save_atomic(state, final_path)
        row = {"model": name, "params": _count_params(model), **kind.score(model, data)}
        row.update(
            train_seconds=outcome.seconds, epochs=outcome.epochs, best_epoch=outcome.best_epoch
        )
        if compile_seconds is not None:
            row["compile_seconds"] = compile_seconds
        row.update(kind.row_extras(model, task, outcome.seconds, outcome.epochs))
        results.append(row)
        predictions = kind.test_predictions(model, data)
        if predictions is not None:
            test_predictions[name] = predictions
    kind.plots(run_dir, data, test_predictions)
    rows = run_files.read_metrics(run_dir / "metrics.jsonl")
    if any(row.get("phase") in ("search", "train") for row in rows):  # naive alone trains none
        report.plot_learning_curves(rows, run_dir / "plots/learning_curves.png")
    return results


def _write_summary(
    run_dir: Path,
    genotype: Genotype | None,
    models: Sequence[tuple[str, Genotype | str]],
    results: list[dict[str, Any]],
    extra: dict[str, Any],
) -> None:
    """Write ``summary.json``; a figure that is not a finite number is written as null, listed
    under ``non_finite``, and then refused with a one-line error (exit 2): a run never reports
    NaN or inf as a result and exits 0, and what it wrote stays."""
    entries = [
        {"name": name, "kind": "genotype" if isinstance(arch, Genotype) else arch}
        for name, arch in models
    ]
    non_finite = [
        (str(row.get("model")), key, value)
        for row in results
        for key, value in row.items()
        if isinstance(value, float) and not math.isfinite(value)
    ]
    written = [
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        for row in results
    ]
    bad = [f"{model}.{key}" for model, key, _ in non_finite]
    run_files.write_json(
        run_dir / "summary.json",
        {
            "genotype": genotype.to_dict() if genotype else None,
            "models": entries,
            "results": written,
            **({"non_finite": bad} if bad else {}),
            **extra,
        },
    )
    if non_finite:
        model, key, value = non_finite[0]
        more = f" (and {len(non_finite) - 1} more)" if len(non_finite) > 1 else ""
        raise UserError(
            f"the run finished, but {model}'s {key} is {value}{more}, not a number: "
            f"{run_dir / 'summary.json'} records it as null; usual causes are a model that "
            "diverged (lower the rates: --set search.lr=VALUE, --set train.lr=VALUE), or a "
            "test span whose targets never vary"
        )
