"""Peers: NeuralForecast's NHITS and LSTM fitted and scored on a run's exact split.

The optional extra ``morphnas[peers]`` installs ``neuralforecast``; where it is importable,
``morphnas benchmark`` adds the rows ``nf_nhits`` and ``nf_lstm`` to each forecasting dataset
(never to the language model). They are *peers*, shown beside our models and never counted as
a baseline: the searched cell's paired difference is against our own baselines.

What "the same split" means here:

- **Data and scaling.** The series is loaded and scaled exactly as the forecasting task
  (``tasks.forecasting.Forecasting``) does (``data.make_windows`` with the run's window, horizon,
  split and scaler, fitted on the train rows); NeuralForecast receives the *scaled* series in
  long format (``unique_id`` = column number, integer ``ds`` = row number, ``y``), and its
  forecasts are scaled back by our scaler and scored by ``tasks.forecasting.score_predictions``:
  the RSE / CORR functions, units and samples of every other row of the table. (Each model
  keeps its own per-window ``scaler_type`` on top; that is part of the model, and uses no row it
  does not see.)
- **Alignment.** Our sample with target row ``r`` reads rows ``r-horizon-window+1 .. r-horizon``
  and predicts the single value at ``r``, for all series at once. NeuralForecast's models are
  global univariate models forecasting ``h`` steps after the last input; with
  ``input_size = window`` and ``h = horizon``, the forecast from the cutoff ``r-horizon`` has
  its ``h``-th step at ``r`` and reads the very same input rows. The predictions come from
  NeuralForecast's public ``cross_validation(..., step_size=1, use_fitted=True)`` on the whole
  series: one rolling origin per valid and test target, every origin's ``h``-th step kept (the
  first ``h-1`` steps of each path are dropped). The target ``y`` that NeuralForecast returns
  beside each kept forecast is checked against ``WindowedSplits``' own valid and test targets;
  a mismatch raises instead of scoring a shifted forecast.
- **Fit and selection.** ``NeuralForecast.fit`` gets the train and valid rows only (the test
  rows are not in the frame) with ``val_size`` = the valid rows: training windows end inside the
  train rows, and the validation loss (MSE, the loss our models train and select on) is taken on
  forecasts of valid rows. Every ``val_check_steps`` steps the weights with the lowest valid
  loss so far are kept (in memory) and restored at the end; training stops after ``max_steps``
  or after ``patience`` checks without improvement. The test rows choose nothing.
- **Budget.** ``PeerBudget``: by default ``max_steps`` = 300 (NeuralForecast's own default is
  1000), a validation every 100 steps, patience 3 validations. On births (51 series) one CPU
  thread took 1.3 to 4 minutes per model and seed on a shared two-core machine (load 4 to 5),
  fit, three validations and the 2 × 1461 × 51 rolling forecasts included (for the LSTM the
  validations and forecasts cost about as much as the training). The budget costs accuracy,
  the LSTM's most: on births seed 0 its test RSE is 0.0944 at 300 steps and 0.0858 at 1000
  (valid loss still falling); NHITS seed 1 gives 0.0875 at 300 and 0.0840 at 1000 (best valid
  at step 500, stopped at 800). ``benchmark --peer-steps 1000`` buys the stronger peers.
  ``QUICK_BUDGET`` (``benchmark --quick``) is a smoke test whose numbers mean nothing.
  Everything else is NeuralForecast's defaults for each model, but the loss (MSE).
- **Determinism.** ``random_seed`` = the run's seed, on the CPU, with ``threads`` torch threads
  (one by default) and no data-loader workers: the same seed gives the same numbers.
- **Quiet and contained.** No progress bars, model summaries, loggers or checkpoints;
  lightning's ``default_root_dir`` is the run directory (or a temporary one), and nothing is
  downloaded.

Storage: ``run_stored`` keeps each run's peers in ``<run dir>/peers.json`` (written atomically)
together with what they depend on (the data settings, the seed, the budget, the models and
NeuralForecast's version); ``benchmark --reuse`` keeps a file whose record matches and runs the
peers again otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from morphnas import data as data_mod
from morphnas import run_files, tasks
from morphnas.config import RunConfig
from morphnas.engine.runtime import apply_threads
from morphnas.errors import UserError
from morphnas.tasks.forecasting import Forecasting, score_predictions

MODELS = ("nf_nhits", "nf_lstm")
INSTALL_HINT = "pip install 'morphnas[peers]'"
FILE = "peers.json"
FORMAT = 1  # of peers.json
_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning")


@dataclass(frozen=True)
class PeerBudget:
    """How long each peer trains: at most ``max_steps`` optimiser steps, a validation every
    ``val_check_steps``, stop after ``patience`` validations without improvement; on
    ``threads`` CPU threads."""

    max_steps: int = 300
    val_check_steps: int = 100
    patience: int = 3
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("max_steps", "val_check_steps", "patience", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"peers: {name} must be at least 1, got {getattr(self, name)}")


DEFAULT_BUDGET = PeerBudget()
QUICK_BUDGET = PeerBudget(max_steps=10, val_check_steps=5, patience=2)


def available() -> bool:
    """Whether the ``peers`` extra (neuralforecast) is installed."""
    return importlib.util.find_spec("neuralforecast") is not None


def version() -> str | None:
    """neuralforecast's version, or None where it is not installed."""
    try:
        return importlib.metadata.version("neuralforecast")
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(budget: PeerBudget | None, installed: bool | None = None) -> str:
    """One line for the benchmark's table: what the peers were, or why there are none
    (``installed``: whether neuralforecast is, default: look)."""
    if budget is None:
        return "peers: none (turned off)"
    if not (available() if installed is None else installed):
        return (
            "peers: none (neuralforecast is not installed; "
            f"`{INSTALL_HINT}` adds its NHITS and LSTM as rows on the same splits)"
        )
    return (
        f"peers: nf_nhits and nf_lstm are neuralforecast {version()}'s NHITS and LSTM on the same "
        f"windows, targets, scaler and metrics, fitted on train, selected on valid (MSE), ≤ "
        f"{budget.max_steps} steps (validation every {budget.val_check_steps}, patience "
        f"{budget.patience}); not baselines: no Δ is taken against them"
    )


def run(
    config: RunConfig,
    budget: PeerBudget = DEFAULT_BUDGET,
    models: Sequence[str] = MODELS,
    root_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Fit and score each peer on ``config``'s data, split and seed; one result row per model,
    shaped like our models' rows (``model``, ``params``, ``valid_rse``, ``test_*``,
    ``train_seconds``) plus ``peer: True``, ``steps`` and ``best_step``."""
    if not isinstance(tasks.kind_for(config), Forecasting):
        raise UserError("peers forecast series: they have no language model")
    for name in models:
        if name not in MODELS:
            raise UserError(f"unknown peer {name!r}; choose from {', '.join(MODELS)}")
    series, windows = load(config)
    rows = []
    for name in models:
        with _scratch(root_dir) as where:
            fit = fit_predict(name, series, windows, config.data.split, config.seed, budget, where)
            rows.append(_result_row(name, windows, *fit))
    return rows


def load(config: RunConfig) -> tuple[data_mod.SeriesData, data_mod.WindowedSplits]:
    """The run's series and its windows, built as the forecasting task builds them (on CPU)."""
    cfg = config.data
    series = Forecasting(config).series()
    windows = data_mod.make_windows(
        series, cfg.window, cfg.horizon, fractions=cfg.split, scaler=cfg.scaler
    )
    return series, windows


def long_frame(scaled: np.ndarray) -> pd.DataFrame:
    """A (rows, series) array in NeuralForecast's long format: ``unique_id`` = column number,
    ``ds`` = row number, ``y`` = value; series after series, oldest row first."""
    n_steps, n_series = scaled.shape
    return pd.DataFrame(
        {
            "unique_id": np.repeat(np.arange(n_series), n_steps),
            "ds": np.tile(np.arange(n_steps), n_series),
            "y": np.asarray(scaled, dtype=np.float64).T.reshape(-1),
        }
    )


def _result_row(
    name: str,
    windows: data_mod.WindowedSplits,
    fitted: Any,
    predictions: tuple[torch.Tensor, torch.Tensor],
    seconds: float,
) -> dict[str, Any]:
    """One peer's result row from what ``fit_predict`` returned for it: its valid and test
    predictions scored against ``windows``' targets, its size and its training curve."""
    valid_pred, test_pred = predictions
    scores = score_predictions(valid_pred, test_pred, windows)
    keeper = _keeper(fitted)
    return {
        "model": name,
        "peer": True,
        "params": sum(p.numel() for p in fitted.parameters() if p.requires_grad),
        **scores,
        "train_seconds": seconds,
        "steps": keeper.last_step,
        "best_step": keeper.best_step,
        "valid_curve": keeper.curve,
    }


def fit_predict(
    name: str,
    series: data_mod.SeriesData,
    windows: data_mod.WindowedSplits,
    fractions: Sequence[float],
    seed: int,
    budget: PeerBudget,
    root_dir: Path,
) -> tuple[Any, tuple[torch.Tensor, torch.Tensor], float]:
    """The fitted NeuralForecast model, its scaled predictions of ``windows.valid[1]`` and
    ``windows.test[1]`` (same shapes, same rows), and the seconds that fit and prediction took."""
    from neuralforecast import NeuralForecast

    split = data_mod.chronological_split(series.n_steps, fractions)
    frame = long_frame(windows.scaler.transform(series.values))
    horizon = windows.horizon
    n_valid, n_test = len(windows.valid[1]), len(windows.test[1])
    valid_rows = split.valid.stop - split.valid.start
    if valid_rows < horizon:
        raise UserError(
            f"peers validate on whole {horizon}-step forecasts inside the valid rows, but there "
            f"are only {valid_rows}; use a larger valid fraction or a smaller --horizon"
        )
    with _quiet(), _threads(budget.threads):
        model = _model(name, windows, seed, budget, root_dir)
        forecaster = NeuralForecast(models=[model], freq=1)
        start = time.perf_counter()
        forecaster.fit(df=frame[frame["ds"] < split.valid.stop], val_size=valid_rows)
        # Every valid and test target as the h-th step of a rolling origin: the last origin is
        # the final row minus h, the first one n_valid + n_test - 1 rows before it.
        paths = forecaster.cross_validation(
            df=frame,
            n_windows=None,
            test_size=n_valid + n_test + horizon - 1,
            step_size=1,
            use_fitted=True,
        )
        seconds = time.perf_counter() - start
    fitted = forecaster.models[0]
    rows, prediction, truth = _hth_step(paths, name, horizon, series.n_series)
    expected = torch.cat([windows.valid[1], windows.test[1]]).numpy()
    first_target = series.n_steps - n_valid - n_test
    lined_up = np.array_equal(rows, np.arange(first_target, series.n_steps))
    if not (lined_up and np.allclose(truth, expected, atol=1e-5)):
        raise RuntimeError(
            f"peer {name}: neuralforecast's targets do not line up with the windows' valid and "
            f"test targets (rows {first_target}..{series.n_steps - 1}); not scoring them"
        )
    prediction = torch.from_numpy(prediction.astype(np.float32))
    return fitted, (prediction[:n_valid], prediction[n_valid:]), seconds


def _hth_step(
    paths: pd.DataFrame, name: str, horizon: int, n_series: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows ``horizon`` steps after a cutoff, the forecasts there and NeuralForecast's ``y``
    there, as (target rows, series) arrays, oldest target first."""
    kept = paths[paths["ds"] - paths["cutoff"] == horizon]
    prediction = kept.pivot(index="ds", columns="unique_id", values=name).sort_index()
    truth = kept.pivot(index="ds", columns="unique_id", values="y").sort_index()
    order = list(range(n_series))
    return prediction.index.to_numpy(), prediction[order].to_numpy(), truth[order].to_numpy()


def _model(
    name: str, windows: data_mod.WindowedSplits, seed: int, budget: PeerBudget, root_dir: Path
) -> Any:
    """An unfitted NeuralForecast model with our window, horizon, seed and budget."""
    from neuralforecast.losses.pytorch import MSE
    from neuralforecast.models import LSTM, NHITS

    cls = {"nf_nhits": NHITS, "nf_lstm": LSTM}[name]
    return cls(
        h=windows.horizon,
        input_size=windows.window,
        loss=MSE(),
        valid_loss=MSE(),
        max_steps=budget.max_steps,
        val_check_steps=min(budget.val_check_steps, budget.max_steps),
        early_stop_patience_steps=budget.patience,
        random_seed=seed,
        alias=name,
        dataloader_kwargs={"num_workers": 0},
        # lightning's Trainer: CPU, quiet, nothing written.
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root_dir),
        callbacks=[_keep_best()],
    )


def _keep_best() -> Any:
    """A fresh ``KeepBest`` callback (a lightning class: defined here, as lightning is only
    installed with the extra)."""
    import pytorch_lightning as pl

    class KeepBest(pl.Callback):
        """Keep the weights of the lowest valid loss (in memory); restore them when fit ends."""

        def __init__(self) -> None:
            self.best = math.inf
            self.best_step: int | None = None
            self.last_step = 0
            self.state: dict[str, torch.Tensor] | None = None
            self.curve: list[tuple[int, float]] = []

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            if trainer.sanity_checking:
                return
            loss = trainer.callback_metrics.get("ptl/val_loss")
            if loss is None:
                return
            loss, step = float(loss), int(trainer.global_step)
            self.curve.append((step, loss))
            if loss < self.best:  # a non-finite loss never wins
                self.best, self.best_step = loss, step
                self.state = copy.deepcopy(module.state_dict())

        def on_fit_end(self, trainer: Any, module: Any) -> None:
            self.last_step = int(trainer.global_step)
            if self.state is not None:
                module.load_state_dict(self.state)
                self.state = None

    return KeepBest()


def _keeper(model: Any) -> Any:
    """The ``KeepBest`` callback of a fitted model (NeuralForecast fits a copy of the model we
    built, callbacks included, so it is found on the fitted one)."""
    callbacks = model.trainer_kwargs.get("callbacks") or []
    return next(cb for cb in callbacks if hasattr(cb, "best_step"))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's and NeuralForecast's info lines and known warnings off, restored after."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message="val_check_steps is greater than max_steps")
            warnings.filterwarnings("ignore", message="Attribute 'callbacks' removed from hparams")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    """torch on ``threads`` threads, and back to the caller's count after."""
    previous = torch.get_num_threads()
    apply_threads(threads)
    try:
        yield
    finally:
        apply_threads(previous)


@contextlib.contextmanager
def _scratch(root_dir: Path | None) -> Iterator[Path]:
    """``root_dir``, or a temporary directory removed afterwards."""
    if root_dir is not None:
        yield Path(root_dir)
        return
    with tempfile.TemporaryDirectory(prefix="morphnas-peers-") as where:
        yield Path(where)


def record(config: RunConfig, budget: PeerBudget, models: Sequence[str]) -> dict[str, Any]:
    """What a run's peers depend on; ``peers.json`` is reused only where this matches."""
    budget_fields = {k: v for k, v in asdict(budget).items() if k != "threads"}
    return json.loads(
        json.dumps(
            {
                "format": FORMAT,
                "neuralforecast": version(),
                "data": config.data.model_dump(),
                "seed": config.seed,
                "budget": budget_fields,
                "models": list(models),
            },
            default=str,
        )
    )


def run_stored(
    run_dir: Path,
    config: RunConfig,
    budget: PeerBudget = DEFAULT_BUDGET,
    models: Sequence[str] = MODELS,
    reuse: bool = False,
) -> list[dict[str, Any]]:
    """The peers of the run in ``run_dir``: from its ``peers.json`` where ``reuse`` and the file
    was made by this very record, else run now and written there (atomically)."""
    path = Path(run_dir) / FILE
    wanted = record(config, budget, models)
    if reuse and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("record") == wanted:
            return saved["results"]
    results = run(config, budget, models, root_dir=Path(run_dir))
    run_files.write_json(path, {"record": wanted, "results": results})
    return results
