"""The Python face of morphnas: search, train and evaluate, the same functions the CLI calls.

A run is a directory (DESIGN §5): ``config.yaml`` (the resolved config), ``genotype.json``,
``metrics.jsonl``, ``summary.json``, ``checkpoints/``, ``models/`` (the retrained weights) and
``plots/``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from morphnas import (
    cells,
    degenerate,
    engine,
    report,
    run_files,
    runs,
    selection,
    spaces,
    strategies,
    warmstart,
)
from morphnas import config as config_mod
from morphnas import data as data_mod
from morphnas import genotype as genotype_mod
from morphnas.config import RunConfig
from morphnas.data.corpus import Corpus
from morphnas.engine.checkpoint import load as load_checkpoint
from morphnas.engine.checkpoint import save_atomic
from morphnas.engine.compiled import compile_cell, wants_compile
from morphnas.engine.progress import Progress
from morphnas.engine.resume import StopFlag, checked, fits, stop_on_signals
from morphnas.engine.runtime import (
    apply_threads,
    busy_cores,
    choose_threads,
    cpu_cores,
    keep_freed_memory,
    malloc_policy,
    resolve_device,
    seed_everything,
)
from morphnas.errors import UserError
from morphnas.genotype import Genotype
from morphnas.tasks import language
from morphnas.tasks.base import Task
from morphnas.tasks.forecasting import ForecastModel, ForecastTask, forecast_metrics, predict

SEARCHED = "searched"
# Baseline names that stand for a published cell of ``genotype.KNOWN``, retrained from scratch.
# KNOWN's "lstm" and "gru" go by ``*_genotype`` here: the bare names are torch.nn's LSTM and GRU.
GENOTYPE_BASELINES = {"darts_v2": "darts_v2", "lstm_genotype": "lstm", "gru_genotype": "gru"}


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
    run_dir = _claim_run_dir(config, "search", force, resume)
    data = _load_data(config)
    seed_everything(config.seed)
    n_series = _input_size(config, data)
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
    repair = _continue_run(run_dir, config, saved) if resume else None
    existed = run_dir.exists()
    if not resume:
        _start_run(run_dir, config, "search", replace=force)
    log = report.MetricsLog(run_dir / "metrics.jsonl", before_first=repair)
    model = _wrap(space, config, data, config.space.hidden)
    task = _task(config, data, config.search.batch_size)
    cleared = nullcontext() if resume else runs.dropped_if_nothing_saved(run_dir, existed)
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
            history_path=run_dir / "history.json",
            progress=progress,
            resume=saved,
            stamp=_stamp(run_dir),
            stop=stop,
        )
        genotype = _with_search_metadata(outcome, space, config)
        one_shot = []
        if config.growth.mode == "grow-and-prune":
            # The pruned supernet is the final cell with inherited weights: score it as it is.
            scores = _score(model, data, config)
            one_shot = [{"model": "one-shot", "params": _count_params(model, space.arch), **scores}]
        if space.hidden_size != config.space.hidden:
            # Width growth found the size: every model is retrained at it (equal hidden sizes).
            config = _at_width(config, space.hidden_size)
        genotype, chosen = _select_cell(genotype, space, config, data, run_dir, log, progress, stop)
        genotype.save(run_dir / "genotype.json")
        _plot_search(run_dir, space.op_names, genotype, outcome.events)
        models: list[tuple[str, Genotype | str]] = [(SEARCHED, genotype)]
        models += [(name, name) for name in config.train.baselines]
        results = _train_and_compare(models, config, data, run_dir, log, progress, stop)
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
        "selection": chosen,
        **_column_summary(data),
    }
    _write_summary(run_dir, genotype, models, results, extra)
    return RunResult(run_dir, genotype, results, extra)


def _select_cell(
    derived: Genotype,
    space: Any,
    config: RunConfig,
    data: data_mod.WindowedSplits | Corpus,
    run_dir: Path,
    log: report.MetricsLog,
    progress: Progress | None,
    stop: StopFlag | None,
) -> tuple[Genotype, dict[str, Any]]:
    """The cell the run retrains, and how it was chosen (``selection`` in summary.json).

    ``derive`` trusts the largest ``α`` blindly; here the likeliest genotypes
    (``selection.ranked_genotypes``, the derived one first) are checked in turn at the run's
    sizes (``degenerate.check``) until enough usable ones are found: one for ``select: alpha``,
    ``search.candidates`` for ``select: valid``, which are then retrained briefly and compared
    by valid loss (never test). With ``search.degenerate: skip`` a degenerate cell is passed
    over; when none of the ``SCAN_LIMIT`` likeliest is usable, the derived cell is kept and the
    record, a warning and the results row say that it is degenerate.
    """
    search = config.search
    wanted = search.candidates if search.select == "valid" else 1
    sizes = (_input_size(config, data), config.space.hidden)
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
        _retrain_candidates(usable, config, data, run_dir, log, progress, stop)
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
        _log_once(log, {"phase": "select", "event": "choice", "chosen": best["rank"]})
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


def _retrain_candidates(
    usable: list[tuple[dict[str, Any], Genotype]],
    config: RunConfig,
    data: data_mod.WindowedSplits | Corpus,
    run_dir: Path,
    log: report.MetricsLog,
    progress: Progress | None,
    stop: StopFlag | None,
) -> None:
    """Retrain each candidate from scratch for ``search.select_epochs`` epochs (the train
    config's optimizer, seed and batches) and put its best valid loss in its record.

    Each record goes to ``selection.json`` as its candidate finishes, so a resumed run retrains
    only what was left (a candidate stopped midway continues from its checkpoint). A candidate
    whose training diverges is recorded as such and not chosen.
    """
    path = run_dir / "selection.json"
    done = {r["rank"]: r for r in json.loads(path.read_text("utf-8"))} if path.is_file() else {}
    brief = config.train.model_copy(update={"epochs": config.search.select_epochs})
    task = _task(config, data, brief.batch_size)  # one for all candidates, as in retraining
    for record, genotype in usable:
        saved = done.get(record["rank"])
        if saved is not None and saved["nodes"] == record["nodes"]:
            record.update({k: saved[k] for k in ("valid_loss", "best_epoch", "epochs", "diverged")})
            continue
        name = f"candidate-{record['rank']}"
        checkpoint_path = run_dir / "checkpoints" / f"train_{name}.pt"
        resumed = None
        if checkpoint_path.is_file():
            resumed = _checked_checkpoint(checkpoint_path, "train", run_dir)
        seed_everything(config.seed)
        model = _build_model(genotype, config, data)
        try:
            outcome = engine.train(
                model, task, brief, name=name, seed=config.seed, log=log, progress=progress,
                checkpoint_path=checkpoint_path, resume=resumed, stamp=_stamp(run_dir),
                stop=stop, phase="select",
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
        report.write_json(path, list(done.values()))


def _log_once(log: report.MetricsLog, row: dict[str, Any]) -> None:
    """Append ``row`` unless a resumed run's log already holds it (it is never trimmed)."""
    if row not in run_files.read_metrics(log.path):
        log.append(row)


def _at_width(config: RunConfig, hidden: int) -> RunConfig:
    return config_mod.resolve(base=config, overrides={"space": {"hidden": hidden}})


def _saved_search(run_dir: Path) -> dict[str, Any] | None:
    """The search checkpoint a resumed run continues from (None: the search had not saved yet)."""
    path = run_dir / "checkpoints" / "search_last.pt"
    return _checked_checkpoint(path, "search", run_dir) if path.is_file() else None


def _checked_checkpoint(path: Path, kind: str, run_dir: Path) -> dict[str, Any]:
    """A whole checkpoint of ``kind`` written by this version of morphnas for the run in
    ``run_dir`` (the id in its ``run.json``), or a one-line error."""
    return checked(load_checkpoint(path), path, kind, runs.read_record(run_dir).get("id"))


def _stamp(run_dir: Path) -> dict[str, Any] | None:
    """What every checkpoint of the run in ``run_dir`` carries under ``run``: its id."""
    run_id = runs.read_record(run_dir).get("id")
    return {"id": run_id} if run_id else None


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
        **({"order": search.order} if search.strategy == "darts" else {}),
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
        raise UserError("give exactly one of --genotype FILE or --baseline lstm|gru|naive")
    run_dir = _claim_run_dir(config, "train", force, resume)
    data = _load_data(config)
    repair = _continue_run(run_dir, config, None) if resume else None
    existed = run_dir.exists()
    if not resume:
        _start_run(run_dir, config, "train", replace=force)
        if baseline is not None:
            report.write_json(run_dir / "model.json", {"baseline": baseline})
    log = report.MetricsLog(run_dir / "metrics.jsonl", before_first=repair)
    if genotype is not None:
        genotype.save(run_dir / "genotype.json")
        report.plot_genotype(genotype, run_dir / "plots/genotype.png")
    models: list[tuple[str, Genotype | str]] = (
        [("genotype", genotype)] if genotype is not None else [(str(baseline), str(baseline))]
    )
    cleared = nullcontext() if resume else runs.dropped_if_nothing_saved(run_dir, existed)
    with stop_on_signals() as stop, cleared:
        results = _train_and_compare(models, config, data, run_dir, log, progress, stop)
    _write_summary(run_dir, genotype, models, results, _column_summary(data))
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


def evaluate(run_dir: Path) -> RunResult:
    """Re-score a finished run's saved models on its test span (data rebuilt from its config).

    Every file it reads is checked (``run_files``) before any work: a damaged one is a one-line
    error naming it."""
    run_dir = run_files.check_run_dir(run_dir)
    summary = run_files.read_summary(run_dir)
    known = {"genotype", "naive", "ar", *GENOTYPE_BASELINES, *cells.BASELINES}
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
    data = _load_data(config)
    results = []
    for entry in summary["models"]:
        name, kind = entry["name"], entry["kind"]
        architecture: Genotype | str = genotype if kind == "genotype" and genotype else kind
        if kind == "naive":
            results.append(_naive_result(data))
            continue
        model = _build_model(architecture, config, data, reference=genotype)
        state = load_checkpoint(run_dir / "models" / f"{name}.pt")
        try:
            model.load_state_dict(state["state_dict"])
        except (KeyError, RuntimeError) as err:
            reason = str(err).splitlines()[0]
            raise UserError(f"models/{name}.pt does not match its architecture: {reason}") from None
        row = {"model": name, "params": _count_params(model), **_score(model, data, config)}
        row["train_seconds"] = next(
            (r.get("train_seconds") for r in summary["results"] if r["model"] == name), None
        )
        results.append(row)
    return RunResult(run_dir, genotype, results)


COMPARE_METRICS = (
    "search_seconds", "search_cpu_seconds", "search_valid_loss", "nodes", "params",
    "valid_rse", "test_rse", "test_corr", "valid_ppl", "test_ppl",
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
    searches at once in separate processes, each on its share of the cores unless ``threads``
    is set; each run seeds itself, so it gives what ``jobs=1`` gives at the same thread count.

    ``reuse``: ``out`` may hold an earlier compare; a run there with the same config (threads
    aside) is kept if finished and resumed if stopped, so a compare can be continued, or extended
    with seeds or variants, without redoing work. ``force`` instead replaces the whole earlier
    compare in ``out``, every run in it, as ``search``'s ``force`` does; the two exclude each other.
    """
    if force and reuse:
        raise UserError(
            "--reuse keeps the runs in --out and --force replaces them: pass only one of the two"
        )
    for name, overrides in variants:  # a bad strategy option: an error before any run or file
        variant = config_mod.resolve(base=config, overrides=overrides)
        try:
            _strategy(variant, spaces.build(variant.space.name, 1, 2, 1))
        except UserError as err:
            raise UserError(f"compare variant {name!r}: {err}") from None
    base_dir = _claim_run_dir(config, "compare", force, reuse=reuse)
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
    runs = [
        {"variant": name, "seed": seed, **row}
        for (name, seed, _), row in zip(planned, rows, strict=True)
    ]
    table = [_aggregate(name, [r for r in runs if r["variant"] == name]) for name, _ in variants]
    report.write_json(base_dir / "compare.json", {"runs": runs, "table": table})
    return RunResult(base_dir, None, table, {"runs": runs})


def _compare_run(
    config: RunConfig, force: bool, resume: bool, progress: Progress | None
) -> dict[str, Any]:
    """One compare run: the search's figures and its retrained cell's row."""
    result = search(config, progress=progress, force=force, resume=resume)
    searched = next(r for r in result.results if r["model"] == SEARCHED)
    return {**result.extra, **searched}


def _worker_setup(keep_memory: bool, show_warning: Callable[..., None]) -> None:
    """A compare worker set up as its parent is: the heap policy, and warnings shown its way (the
    CLI's one line), which a spawned process would otherwise reset."""
    if keep_memory:
        keep_freed_memory()
    warnings.showwarning = show_warning


def _in_processes(
    runs: list[tuple[RunConfig, bool]], force: bool, jobs: int, progress: Progress | None
) -> list[dict[str, Any]]:
    """The runs ``jobs`` at a time in fresh (spawned) processes, in the given order."""
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    setup = (malloc_policy() == "keep", warnings.showwarning)  # the CLI's heap policy, warnings
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_worker_setup, initargs=setup
    ) as pool:
        futures = [pool.submit(_compare_run, cfg, force, resume, None) for cfg, resume in runs]
        if progress is not None:
            progress.start(f"compare: {len(runs)} runs, {jobs} at a time", len(runs))
            for _ in as_completed(futures):
                progress.advance()
            progress.stop()
        return [future.result() for future in futures]


def _same_run(config: RunConfig) -> bool:
    """Whether ``config.out`` holds a run of this very config (the thread count aside: it only
    changes the order of float sums); a different one there is an error, not overwritten."""
    saved_path = Path(config.out) / "config.yaml"
    if not saved_path.is_file():
        return False
    saved = config_mod.resolve(saved_path, overrides={"out": str(config.out)})
    saved = saved.model_copy(update={"threads": config.threads})
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


def _claim_run_dir(
    config: RunConfig, kind: str, force: bool, resume: bool = False, *, reuse: bool = False
) -> Path:
    """The run directory this command will write: refused if it already holds a run, unless the
    command resumes it (then it must hold an unfinished run), continues it (a compare's
    ``reuse``) or replaces it (``force``: only a morphnas run, and not one that holds this
    run's input or working directory; the replacement itself waits for ``_start_run``)."""
    if resume:
        run_dir = _resumable(config.out, kind)
        runs.check_continuable(run_dir, config)
        return run_dir
    name = config.data.csv.stem if config.data.csv else config.data.dataset
    if config.task == "lm" and config.lm.corpus is not None:
        name = config.lm.corpus.stem
    run_dir = config.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{name}"
    if not _writable_dir(run_dir) or not any(run_dir.iterdir()) or reuse:
        return run_dir
    if not force:
        raise UserError(
            f"output directory {run_dir} already holds files; choose another --out, "
            "pass --resume to continue it, or --force to replace it"
        )
    runs.check_replaceable(run_dir, (config.data.csv, config.lm.corpus))
    return run_dir


def _writable_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` exists; refuse now an --out that could not be created or written,
    rather than after the data were loaded or a search ran (nothing is created here)."""
    fix = "choose another --out"
    try:
        existing = run_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            where = "is a file" if existing == run_dir else f"is inside {existing}, a file"
            raise UserError(f"output path {run_dir} {where}; {fix}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(
                f"cannot write to output directory {run_dir}: {existing} is not writable "
                f"(permission denied); {fix} or make it writable"
            )
        if existing == run_dir:
            next(run_dir.iterdir(), None)  # readable too: it is checked for an earlier run
        return existing == run_dir
    except OSError as err:
        raise UserError(f"cannot use output directory {run_dir}: {err.strerror}; {fix}") from None


def _resumable(run_dir: Path | None, kind: str | None = None) -> Path:
    """``run_dir``, checked before anything in it is touched: an unfinished morphnas run of the
    command ``kind`` (a search resumed by ``train`` would finish as a one-model run, its search
    lost; a train run resumed by ``search`` would run a whole search inside it)."""
    if run_dir is not None and not Path(run_dir).exists():
        raise UserError(f"run directory {run_dir} not found; give the --out of the stopped run")
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a morphnas run directory (no config.yaml) to resume")
    if (Path(run_dir) / "summary.json").is_file():
        raise UserError(
            f"{run_dir} has finished (summary.json exists): nothing to resume; `morphnas "
            f"evaluate {run_dir}` scores it again, --force runs it again from the start"
        )
    try:
        blank = not (Path(run_dir) / "config.yaml").read_text("utf-8", "replace").strip()
    except OSError:
        blank = False  # named when it is read
    if blank:
        raise UserError(
            f"{Path(run_dir) / 'config.yaml'} is empty; put back the config the run started "
            f'with (run.json holds a copy, under "config"), or start afresh with --force'
        )
    started = runs.kind_of(Path(run_dir))
    if kind is not None and started is not None and started != kind:
        raise UserError(
            f"{run_dir} is a {started} run, not a {kind} run; continue it with "
            f"`morphnas {started} --resume {run_dir}`"
        )
    return Path(run_dir)


def resume_config(
    run_dir: Path, threads: int | None = None, *, kind: str | None = None
) -> RunConfig:
    """The saved config of a run, to continue it with ``search``/``train(..., resume=True)``,
    once checked against what the run started with (``runs.check_continuable``).

    ``threads`` replaces the saved thread count; the resumed run writes it to ``config.yaml``
    with its first row, so that the file says what the run goes on with: for a run that other
    processes slowed down after its start (its threads wait on each other when one shares a
    core). Another count changes the order of float sums, so the resumed run then matches an
    uninterrupted one only to float rounding.
    """
    run_dir = _resumable(Path(run_dir), kind)
    saved = config_mod.resolve(run_dir / "config.yaml")
    runs.check_continuable(run_dir, saved)
    if threads is not None and threads != saved.threads:
        saved = config_mod.resolve(base=saved, overrides={"threads": threads})
    return config_mod.resolve(base=saved, overrides={"out": str(run_dir)})


def _start_run(
    run_dir: Path, config: RunConfig, kind: str | None, *, replace: bool = False
) -> None:
    """Set the thread count, create the run directory and save the resolved config, the thread
    count included (a resumed run keeps it, whatever else runs on the machine then), and for a
    run ``--resume`` continues, ``run.json``: its ``kind`` (search, train), id, config and
    input files (``runs.start_record``), which ``--resume`` checks.

    ``replace`` (``--force``): an old run in ``run_dir`` is moved aside first and deleted once
    the config is written, or put back if that fails (``runs.replace_run``)."""
    config = config.model_copy(update={"threads": _apply_thread_policy(config)})
    inputs = (config.data.csv, config.lm.corpus if config.task == "lm" else None)
    record = runs.start_record(kind, config, inputs) if kind is not None else None

    def start() -> None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if record is not None:  # a run --resume continues: search or train
                runs.write_record(run_dir, record)
            (run_dir / "config.yaml").write_text(config_mod.dump(config), encoding="utf-8")
        except OSError as err:
            raise UserError(
                f"cannot write to output directory {run_dir}: {err.strerror}; choose another "
                "--out or free space / fix its permissions"
            ) from None

    if replace:
        runs.replace_run(run_dir, start)
    else:
        start()


def _continue_run(
    run_dir: Path, config: RunConfig, saved: dict[str, Any] | None
) -> Callable[[], None]:
    """Check what a stopped run holds, and return the repairs that bring its files back to the
    state of its checkpoints: the metrics rows written after them dropped (they will be written
    again), the growth history likewise, and a new thread count (``--resume --threads``) saved.

    Every check is made now: each checkpoint and saved model must be whole and of this run
    (``_checked_checkpoint``), every metrics line readable. The repairs run when the resumed run
    writes its first row (``report.MetricsLog``), so a resume that fails before then — a
    checkpoint that does not fit the model built from the config, say — changes no file.
    """
    search_done = 0
    if saved is not None:
        search_done = saved["epoch"] if saved["position"] is None else saved["epoch"] - 1
    trained = {}
    for path in (run_dir / "models").glob("*.pt"):
        _checked_checkpoint(path, "model", run_dir)
        trained[path.stem] = float("inf")
    for path in (run_dir / "checkpoints").glob("train_*.pt"):
        state = _checked_checkpoint(path, "train", run_dir)
        name = path.stem.removeprefix("train_")
        if name not in trained:
            trained[name] = state["epoch"] if state["position"] is None else state["epoch"] - 1
    metrics = report.MetricsLog(run_dir / "metrics.jsonl")
    run_files.read_metrics(metrics.path)  # a damaged line is refused now, naming it

    def keep(row: dict[str, Any]) -> bool:
        if row.get("phase") == "search":
            return row.get("epoch", 0) <= search_done
        return row.get("epoch", 0) <= trained.get(row.get("model", ""), 0)

    def repair() -> None:
        metrics.keep(keep)
        if saved is not None:
            report.write_json(run_dir / "history.json", saved["growth"]["events"])
        on_file = config_mod.resolve(run_dir / "config.yaml")
        if on_file.threads != config.threads:
            update = config_mod.resolve(base=on_file, overrides={"threads": config.threads})
            (run_dir / "config.yaml").write_text(config_mod.dump(update), encoding="utf-8")

    _apply_thread_policy(config)
    return repair


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


def _load_series(config: RunConfig) -> data_mod.SeriesData:
    """The run's series: its CSV, or the named dataset. A CSV column that was dropped or
    converted is said once, as a warning (``column_notes`` keeps every column's fate)."""
    cfg = config.data
    if cfg.csv is None:
        return data_mod.load_dataset(cfg.dataset)
    series = data_mod.load_csv(cfg.csv, time_col=cfg.time_col, columns=cfg.columns)
    for note in getattr(series, "columns_report", ()):
        if note.role == "dropped" or note.converted:
            warnings.warn(f"{cfg.csv.name}: {note.line()}", stacklevel=2)
    return series


def column_notes(series: data_mod.SeriesData) -> tuple[str, ...]:
    """One line per column of a user's file (empty for a bundled dataset)."""
    return tuple(note.line() for note in getattr(series, "columns_report", ()))


def _load_windows(config: RunConfig) -> data_mod.WindowedSplits:
    """The run's windows, already on the run's device (they are small; moved once)."""
    cfg = config.data
    series = _load_series(config)
    windows = data_mod.make_windows(
        series, cfg.window, cfg.horizon, fractions=cfg.split, scaler=cfg.scaler
    )
    windows.column_notes = column_notes(series)
    device = resolve_device(config.device)
    for part in ("train", "valid", "test"):
        x, y = getattr(windows, part)
        setattr(windows, part, (x.to(device), y.to(device)))
    return windows


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


def _cell_options(config: RunConfig) -> dict[str, Any]:
    """Space options that a discrete cell also takes (dropout, init, and ``fused``: whether it
    runs its sequence kernel); the others are search-only."""
    keep = ("dropout_x", "dropout_h", "init_range", "fused")
    return {k: v for k, v in config.space.options.items() if k in keep}


def _build_model(
    architecture: Genotype | str,
    config: RunConfig,
    data: data_mod.WindowedSplits | Corpus,
    reference: Genotype | None = None,
) -> nn.Module:
    """A genotype's cell, a recurrent baseline, or ``ar`` (the linear part alone), in the task's
    model. Language modelling sizes a baseline to the ``reference`` cell's parameter count."""
    hidden = config.space.hidden
    n_series = _input_size(config, data)
    if isinstance(architecture, str) and architecture in GENOTYPE_BASELINES:
        architecture = genotype_mod.KNOWN[GENOTYPE_BASELINES[architecture]]
    if isinstance(architecture, Genotype):
        cell = cells.build(architecture, n_series, hidden, **_cell_options(config))
    elif architecture == "ar":
        if config.train.ar_window < 1:
            raise UserError("the 'ar' baseline needs train.ar_window >= 1")
        cell = None
    else:
        if isinstance(data, Corpus) and reference is not None and config.lm.match_params:
            hidden = _matched_hidden(architecture, config, data, reference)
        cell = cells.baseline(architecture, n_series, hidden)
    return _wrap(cell, config, data, hidden)


def _matched_hidden(kind: str, config: RunConfig, corpus: Corpus, reference: Genotype) -> int:
    """The baseline's hidden size whose recurrent weights match the reference cell's (its
    language model's weights but the vocabulary's, which every model of the run shares)."""
    cell = cells.build(reference, _input_size(config, corpus), config.space.hidden)
    target = language.recurrent_params(_wrap(cell, config, corpus, config.space.hidden))
    emb = language.emb_size(config)
    return language.matched_hidden(kind, target, emb, config.lm.tie_weights)


def _load_data(config: RunConfig) -> data_mod.WindowedSplits | Corpus:
    """The run's data on its device: forecasting windows, or a tokenised corpus."""
    if config.task == "lm":
        return language.load_lm_corpus(config, resolve_device(config.device))
    return _load_windows(config)


def _input_size(config: RunConfig, data: data_mod.WindowedSplits | Corpus) -> int:
    """Features the cell reads per step: the series (global layout: one, plus its id embedding),
    or the token embedding size."""
    if isinstance(data, Corpus):
        return language.emb_size(config)
    if config.data.layout == "global":
        return 1 + config.train.series_embedding
    return len(data.columns)


def _wrap(
    cell: nn.Module | None,
    config: RunConfig,
    data: data_mod.WindowedSplits | Corpus,
    hidden: int,
) -> nn.Module:
    """The task's model around a cell (a supernet, a discrete cell or a baseline)."""
    if isinstance(data, Corpus):
        if cell is None:
            raise UserError("--task lm needs a recurrent cell (no 'ar' baseline)")
        model = language.build_lm(cell, config, data, hidden)
        return model.to(resolve_device(config.device))
    return _forecaster(cell, config, len(data.columns))


def _task(config: RunConfig, data: data_mod.WindowedSplits | Corpus, batch_size: int) -> Task:
    """The engine's view of the data: forecasting windows or BPTT windows of a corpus."""
    if isinstance(data, Corpus):
        return language.lm_task(config, data, batch_size)
    return ForecastTask(
        data.train,
        data.valid,
        batch_size,
        layout=config.data.layout,
        series_embedding=config.train.series_embedding,
    )


def _forecaster(cell: nn.Module | None, config: RunConfig, n_series: int) -> ForecastModel:
    """The same head (and ``data.layout``) for every model of a run, searched or baseline."""
    ar = min(config.train.ar_window, config.data.window)
    model = ForecastModel(
        cell,
        config.space.hidden,
        n_series,
        config.train.dropout,
        ar,
        config.train.window_norm,
        layout=config.data.layout,
        series_embedding=config.train.series_embedding,
    )
    return model.to(resolve_device(config.device))


def _count_params(model: nn.Module, exclude: Iterable[nn.Parameter] = ()) -> int:
    """Trainable weights of a model; architecture parameters passed in ``exclude`` don't count."""
    skip = {id(p) for p in exclude}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _score(
    model: nn.Module,
    data: data_mod.WindowedSplits | Corpus,
    config: RunConfig | None = None,
) -> dict[str, float]:
    """The task's metrics on valid and test (a corpus needs the run's ``config``)."""
    if isinstance(data, Corpus):
        if config is None:
            raise ValueError("scoring a language model needs the run's config")
        return language.score_lm(model, config, data)
    return _score_predictions(predict(model, data.valid[0]), predict(model, data.test[0]), data)


def _score_predictions(
    valid_pred: torch.Tensor, test_pred: torch.Tensor, data: data_mod.WindowedSplits
) -> dict[str, float]:
    """Valid RSE and the test metrics, in original units and (suffix ``_scaled``) scaled units."""
    inverse = data.scaler.inverse
    valid = forecast_metrics(inverse(_numpy(valid_pred)), inverse(_numpy(data.valid[1])))
    test = forecast_metrics(inverse(_numpy(test_pred)), inverse(_numpy(data.test[1])))
    scaled = forecast_metrics(_numpy(test_pred), _numpy(data.test[1]))
    row = {"valid_rse": valid["rse"]}
    row.update({f"test_{k}": v for k, v in test.items()})
    row.update({f"test_{k}_scaled": v for k, v in scaled.items()})
    return row


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()


def _naive_predictions(x: torch.Tensor) -> torch.Tensor:
    """The last observed value of each series: the floor every forecaster must beat."""
    return x[:, -1, :]


def _naive_result(data: data_mod.WindowedSplits) -> dict[str, Any]:
    scores = _score_predictions(
        _naive_predictions(data.valid[0]), _naive_predictions(data.test[0]), data
    )
    return {"model": "naive", "params": 0, **scores, "train_seconds": 0.0}


def _compile_cell(model: nn.Module, task: Task, config: RunConfig) -> float | None:
    """``train.compile``: the retrained cell compiled in place; the compile seconds, or None
    (not asked, or the backend failed and the cell runs eagerly)."""
    device = next(model.parameters()).device
    if not wants_compile(config.train.compile, device):
        return None
    _, cell_input = task.probe()
    return compile_cell(model.cell, cell_input.to(device))


def _train_and_compare(
    models: Sequence[tuple[str, Genotype | str]],
    config: RunConfig,
    data: data_mod.WindowedSplits,
    run_dir: Path,
    log: report.MetricsLog,
    progress: Progress | None,
    stop: StopFlag | None = None,
) -> list[dict[str, Any]]:
    """Train each model from the same seed on the same data; score all on valid and test.

    A model whose final weights are already saved (a resumed run) is loaded, not retrained; one
    with a training checkpoint continues from it.
    """
    results, test_predictions = [], {}
    task = _task(config, data, config.train.batch_size)
    reference = next((a for _, a in models if isinstance(a, Genotype)), None)
    for name, architecture in models:
        if architecture == "naive":
            results.append(_naive_result(data))
            test_predictions[name] = _naive_predictions(data.test[0])
            continue
        seed_everything(config.seed)
        model = _build_model(architecture, config, data, reference=reference)
        final_path = run_dir / "models" / f"{name}.pt"
        checkpoint_path = run_dir / "checkpoints" / f"train_{name}.pt"
        compile_seconds = None
        if final_path.is_file():
            saved = _checked_checkpoint(final_path, "model", run_dir)
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
                log=log,
                progress=progress,
                checkpoint_path=checkpoint_path,
                resume=(
                    _checked_checkpoint(checkpoint_path, "train", run_dir)
                    if checkpoint_path.is_file()
                    else None
                ),
                stamp=_stamp(run_dir),
                stop=stop,
            )
            state = {
                "state_dict": model.state_dict(),
                "outcome": dataclasses.asdict(outcome),
                "run": _stamp(run_dir),
            }
            save_atomic(state, final_path)
        row = {"model": name, "params": _count_params(model), **_score(model, data, config)}
        row.update(
            train_seconds=outcome.seconds, epochs=outcome.epochs, best_epoch=outcome.best_epoch
        )
        if compile_seconds is not None:
            row["compile_seconds"] = compile_seconds
        if isinstance(task, language.LanguageTask):
            # Training throughput, the per-epoch validation included (what a user waits for).
            row["hidden"] = model.hidden_size
            row["train_tokens_per_s"] = outcome.epochs * task.tokens_per_epoch / outcome.seconds
        results.append(row)
        if not isinstance(data, Corpus):
            test_predictions[name] = predict(model, data.test[0])
    if isinstance(data, Corpus):  # no forecast plot for a language model
        report.plot_learning_curves(
            run_files.read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots/learning_curves.png"
        )
        return results
    inverse = data.scaler.inverse
    report.plot_forecasts(
        inverse(_numpy(data.test[1])),
        {name: inverse(_numpy(p)) for name, p in test_predictions.items()},
        data.columns,
        run_dir / "plots/forecast.png",
        index=data.test_index,
    )
    report.plot_learning_curves(
        run_files.read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots/learning_curves.png"
    )
    return results


def _column_summary(data: data_mod.WindowedSplits | Corpus) -> dict[str, Any]:
    """``{"columns": [...]}``: what became of each column of a user's CSV, for summary.json."""
    notes = getattr(data, "column_notes", ())
    return {"columns": list(notes)} if notes else {}


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
    report.write_json(
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
