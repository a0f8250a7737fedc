"""The Python face of morphnas: search, train and evaluate, the same functions the CLI calls.

A run is a directory (DESIGN §5): ``config.yaml`` (the resolved config), ``genotype.json``,
``metrics.jsonl``, ``summary.json``, ``checkpoints/``, ``models/`` (the retrained weights) and
``plots/``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from morphnas import cells, engine, report, spaces, strategies
from morphnas import config as config_mod
from morphnas import data as data_mod
from morphnas import genotype as genotype_mod
from morphnas.config import RunConfig
from morphnas.engine.checkpoint import load as load_checkpoint
from morphnas.engine.checkpoint import save_atomic
from morphnas.engine.progress import Progress
from morphnas.engine.runtime import (
    apply_threads,
    choose_threads,
    resolve_device,
    seed_everything,
)
from morphnas.errors import UserError
from morphnas.genotype import Genotype
from morphnas.tasks.forecasting import ForecastModel, forecast_metrics, predict

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


def search(
    config: RunConfig, *, progress: Progress | None = None, force: bool = False
) -> RunResult:
    """Search a cell, derive it, retrain it beside the baselines, and compare them on test."""
    # Everything a person can get wrong is checked before the run directory exists, so a
    # failed start leaves nothing behind that would block the corrected command.
    run_dir = _claim_run_dir(config, "search", force)
    data = _load_windows(config)
    seed_everything(config.seed)
    n_series = len(data.columns)
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
    _start_run(run_dir, config)
    log = report.MetricsLog(run_dir / "metrics.jsonl")
    model = _forecaster(space, config, n_series)
    strategy = strategies.build(
        config.search.strategy,
        space,
        lr=config.search.arch_lr,
        weight_decay=config.search.arch_weight_decay,
    )
    outcome = engine.search(
        model,
        strategy,
        data.train,
        data.valid,
        config.search,
        seed=config.seed,
        log=log,
        checkpoint_dir=run_dir / "checkpoints",
        growth=config.growth,
        nodes_max=config.nodes_max,
        history_path=run_dir / "history.json",
        progress=progress,
    )
    genotype = _with_search_metadata(outcome, space, config)
    genotype.save(run_dir / "genotype.json")
    _plot_search(run_dir, space.op_names, genotype, outcome.events)
    models: list[tuple[str, Genotype | str]] = [(SEARCHED, genotype)]
    models += [(name, name) for name in config.train.baselines]
    one_shot = []
    if config.growth.mode == "grow-and-prune":
        # The pruned supernet is the final cell with inherited weights: score it as it is.
        scores = _score(model, data)
        one_shot = [{"model": "one-shot", "params": _count_params(model, space.arch), **scores}]
    if space.hidden_size != config.space.hidden:
        # Width growth found the size: every model is retrained at it (equal hidden sizes).
        config = config_mod.resolve(base=config, overrides={"space": {"hidden": space.hidden_size}})
    results = _train_and_compare(models, config, data, run_dir, log, progress)
    results[1:1] = one_shot
    extra = {
        "hidden": space.hidden_size,
        "search_seconds": outcome.seconds,
        "search_valid_loss": outcome.valid_loss,
        "nodes": len(genotype.nodes),
        "growth_events": len(outcome.events),
    }
    _write_summary(run_dir, genotype, models, results, extra)
    return RunResult(run_dir, genotype, results, extra)


def _plot_search(
    run_dir: Path, op_names: Sequence[str], genotype: Genotype, events: Sequence[Any]
) -> None:
    """The search's plots: mixing weights over epochs, the derived cell, the growth timeline."""
    rows = report.read_metrics(run_dir / "metrics.jsonl")
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
) -> RunResult:
    """Train one model from scratch (a genotype's cell or a baseline) and evaluate it on test."""
    if (genotype is None) == (baseline is None):
        raise UserError("give exactly one of --genotype FILE or --baseline lstm|gru|naive")
    run_dir = _claim_run_dir(config, "train", force)
    data = _load_windows(config)
    _start_run(run_dir, config)
    log = report.MetricsLog(run_dir / "metrics.jsonl")
    if genotype is not None:
        genotype.save(run_dir / "genotype.json")
        report.plot_genotype(genotype, run_dir / "plots/genotype.png")
    models: list[tuple[str, Genotype | str]] = (
        [("genotype", genotype)] if genotype is not None else [(str(baseline), str(baseline))]
    )
    results = _train_and_compare(models, config, data, run_dir, log, progress)
    _write_summary(run_dir, genotype, models, results, {})
    return RunResult(run_dir, genotype, results)


def evaluate(run_dir: Path) -> RunResult:
    """Re-score a finished run's saved models on its test span (data rebuilt from its config)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise UserError(f"{run_dir} is not a finished morphnas run (no summary.json)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {summary_path}: {err}") from None
    config = config_mod.resolve(run_dir / "config.yaml")
    if "hidden" in summary:  # width growth retrains every model at the width it found
        config = config_mod.resolve(base=config, overrides={"space": {"hidden": summary["hidden"]}})
    data = _load_windows(config)
    genotype = genotype_mod.load(run_dir / "genotype.json") if summary.get("genotype") else None
    results = []
    for entry in summary["models"]:
        name, kind = entry["name"], entry["kind"]
        architecture: Genotype | str = genotype if kind == "genotype" and genotype else kind
        if kind == "naive":
            results.append(_naive_result(data))
            continue
        model = _build_model(architecture, config, len(data.columns))
        state = load_checkpoint(run_dir / "models" / f"{name}.pt")
        try:
            model.load_state_dict(state["state_dict"])
        except (KeyError, RuntimeError) as err:
            reason = str(err).splitlines()[0]
            raise UserError(f"models/{name}.pt does not match its architecture: {reason}") from None
        row = {"model": name, "params": _count_params(model), **_score(model, data)}
        row["train_seconds"] = next(
            (r.get("train_seconds") for r in summary["results"] if r["model"] == name), None
        )
        results.append(row)
    return RunResult(run_dir, genotype, results)


COMPARE_METRICS = (
    "search_seconds", "search_valid_loss", "nodes", "params", "valid_rse", "test_rse", "test_corr",
)  # fmt: skip


def compare(
    config: RunConfig,
    variants: Sequence[tuple[str, dict[str, Any]]],
    seeds: Sequence[int],
    *,
    progress: Progress | None = None,
    force: bool = False,
) -> RunResult:
    """Run one search (and retraining of its cell) per variant and seed on the same data and
    budget; report every run and, per variant, the mean and standard deviation over seeds.

    ``variants`` are ``(name, config overrides)`` pairs, e.g. one per growth mode. The runs go to
    ``<out>/<variant>-seed<k>``; the table to ``<out>/compare.json``.
    """
    base_dir = _claim_run_dir(config, "compare", force)
    _start_run(base_dir, config)
    runs = []
    # Seed-major order: drifting load on a shared machine hits every variant alike.
    for seed in seeds:
        for name, overrides in variants:
            run_config = config_mod.resolve(
                base=config,
                overrides=config_mod.merge(
                    overrides, {"seed": seed, "out": str(base_dir / f"{name}-seed{seed}")}
                ),
            )
            result = search(run_config, progress=progress, force=force)
            searched = next(r for r in result.results if r["model"] == SEARCHED)
            runs.append({"variant": name, "seed": seed, **result.extra, **searched})
    table = [_aggregate(name, [r for r in runs if r["variant"] == name]) for name, _ in variants]
    report.write_json(base_dir / "compare.json", {"runs": runs, "table": table})
    return RunResult(base_dir, None, table, {"runs": runs})


def _aggregate(variant: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and (sample) standard deviation of each metric over a variant's seeds."""
    row: dict[str, Any] = {"variant": variant, "seeds": len(runs)}
    for key in COMPARE_METRICS:
        values = [float(r[key]) for r in runs if r.get(key) is not None]
        if values:
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
            row[key] = mean
            row[f"{key}_std"] = var**0.5 if len(values) > 1 else 0.0
    return row


def plot(run_dir: Path) -> list[Path]:
    """Redraw a run's plots from its files (metrics, genotype, growth history); return them."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir} is not a morphnas run directory (no metrics.jsonl)")
    rows = report.read_metrics(metrics)
    written = []
    if any(row.get("phase") in ("search", "train") for row in rows):
        written.append(report.plot_learning_curves(rows, run_dir / "plots/learning_curves.png"))
    genotype_path = run_dir / "genotype.json"
    genotype = genotype_mod.load(genotype_path) if genotype_path.is_file() else None
    if genotype is not None:
        written.append(report.plot_genotype(genotype, run_dir / "plots/genotype.png"))
        op_names = genotype.metadata.get("op_names")
        if op_names and any(row.get("phase") == "search" for row in rows):
            written.append(report.plot_arch_weights(rows, op_names, run_dir / "plots/arch.png"))
    history = run_dir / "history.json"
    if history.is_file():
        events = json.loads(history.read_text(encoding="utf-8"))
        written.append(report.plot_growth(rows, events, run_dir / "plots/growth.png"))
    return written


def _claim_run_dir(config: RunConfig, kind: str, force: bool) -> Path:
    """The run directory this command will write: refused if it already holds a run."""
    name = config.data.csv.stem if config.data.csv else config.data.dataset
    run_dir = config.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{name}"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output path {run_dir} is a file; choose a directory with --out")
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise UserError(
            f"output directory {run_dir} already holds files; choose another --out or pass --force"
        )
    return run_dir


def _start_run(run_dir: Path, config: RunConfig) -> None:
    """Create the run directory, save the resolved config, and set the thread policy."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_mod.dump(config), encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write to output directory {run_dir}: {err.strerror}") from None
    threads = choose_threads(config.space.hidden, config.search.batch_size, config.threads)
    apply_threads(threads)


def _load_windows(config: RunConfig) -> data_mod.WindowedSplits:
    """The run's windows, already on the run's device (they are small; moved once)."""
    cfg = config.data
    series = (
        data_mod.load_csv(cfg.csv, time_col=cfg.time_col, columns=cfg.columns)
        if cfg.csv is not None
        else data_mod.load_dataset(cfg.dataset)
    )
    windows = data_mod.make_windows(
        series, cfg.window, cfg.horizon, fractions=cfg.split, scaler=cfg.scaler
    )
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
    return dataclasses.replace(outcome.genotype, metadata=metadata)


def _cell_options(config: RunConfig) -> dict[str, Any]:
    """Space options that a discrete cell also takes (dropout and init), others are search-only."""
    keep = ("dropout_x", "dropout_h", "init_range")
    return {k: v for k, v in config.space.options.items() if k in keep}


def _build_model(architecture: Genotype | str, config: RunConfig, n_series: int) -> nn.Module:
    """A genotype's cell, a recurrent baseline, or ``ar`` (the linear part alone), in one head."""
    hidden = config.space.hidden
    if architecture in genotype_mod.KNOWN:
        architecture = genotype_mod.KNOWN[architecture]
    if isinstance(architecture, Genotype):
        cell = cells.build(architecture, n_series, hidden, **_cell_options(config))
    elif architecture == "ar":
        if config.train.ar_window < 1:
            raise UserError("the 'ar' baseline needs train.ar_window >= 1")
        cell = None
    else:
        cell = cells.baseline(architecture, n_series, hidden)
    return _forecaster(cell, config, n_series)


def _forecaster(cell: nn.Module | None, config: RunConfig, n_series: int) -> ForecastModel:
    """The same head for every model of a run, searched or baseline."""
    ar = min(config.train.ar_window, config.data.window)
    model = ForecastModel(
        cell, config.space.hidden, n_series, config.train.dropout, ar, config.train.window_norm
    )
    return model.to(resolve_device(config.device))


def _count_params(model: nn.Module, exclude: Iterable[nn.Parameter] = ()) -> int:
    """Trainable weights of a model; architecture parameters passed in ``exclude`` don't count."""
    skip = {id(p) for p in exclude}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _score(model: nn.Module, data: data_mod.WindowedSplits) -> dict[str, float]:
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


def _train_and_compare(
    models: Sequence[tuple[str, Genotype | str]],
    config: RunConfig,
    data: data_mod.WindowedSplits,
    run_dir: Path,
    log: report.MetricsLog,
    progress: Progress | None,
) -> list[dict[str, Any]]:
    """Train each model from the same seed on the same data; score all on valid and test."""
    results, test_predictions = [], {}
    for name, architecture in models:
        if architecture == "naive":
            results.append(_naive_result(data))
            test_predictions[name] = _naive_predictions(data.test[0])
            continue
        seed_everything(config.seed)
        model = _build_model(architecture, config, len(data.columns))
        outcome = engine.train(
            model,
            data.train,
            data.valid,
            config.train,
            name=name,
            seed=config.seed,
            log=log,
            progress=progress,
        )
        save_atomic({"state_dict": model.state_dict()}, run_dir / "models" / f"{name}.pt")
        row = {"model": name, "params": _count_params(model), **_score(model, data)}
        row.update(
            train_seconds=outcome.seconds, epochs=outcome.epochs, best_epoch=outcome.best_epoch
        )
        results.append(row)
        test_predictions[name] = predict(model, data.test[0])
    inverse = data.scaler.inverse
    report.plot_forecasts(
        inverse(_numpy(data.test[1])),
        {name: inverse(_numpy(p)) for name, p in test_predictions.items()},
        data.columns,
        run_dir / "plots/forecast.png",
        index=data.test_index,
    )
    report.plot_learning_curves(
        report.read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots/learning_curves.png"
    )
    return results


def _write_summary(
    run_dir: Path,
    genotype: Genotype | None,
    models: Sequence[tuple[str, Genotype | str]],
    results: list[dict[str, Any]],
    extra: dict[str, Any],
) -> None:
    entries = [
        {"name": name, "kind": "genotype" if isinstance(arch, Genotype) else arch}
        for name, arch in models
    ]
    report.write_json(
        run_dir / "summary.json",
        {
            "genotype": genotype.to_dict() if genotype else None,
            "models": entries,
            "results": results,
            **extra,
        },
    )
