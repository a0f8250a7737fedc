"""Forecast the future from a finished run: K steps after the last row, with split-conformal
prediction intervals, as ``forecast.csv`` and ``plots/future.png``.

A run's models map a window of ``P`` rows ending at row ``r − h`` to row ``r`` (``h`` the trained
horizon). Step ``k`` after the last observed row ``T`` is therefore forecast from the window
ending at ``T + k − h``: for ``k ≤ h`` every row of it is observed (direct forecasts), beyond
``h`` its newest rows are earlier forecasts (recursive). One rule covers both, and the same
``rollout`` produces the future, the valid span's residuals the intervals are calibrated on, and
the test span's forecasts their coverage is measured on — so what is reported is what is used.

Intervals are split-conformal (Vovk; Angelopoulos & Bates' "gentle introduction"): for each
series and each step ``k``, the half-width at level ``α`` is the ``⌈(n+1)α⌉``-th smallest absolute
residual of ``n`` valid-span forecasts made ``k`` steps ahead from every valid origin. They are
calibrated on valid only; the test span then tells how well they cover (``summary.json``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from morphnas import api, report, run_files
from morphnas.data import SeriesData, load_csv
from morphnas.data import calendar as calendar_mod
from morphnas.data.series import InputLayout, chronological_split
from morphnas.errors import UserError

DEFAULT_LEVELS = (80, 95)
# A batch of scaled windows (n, P, m) -> scaled forecasts (n, m).
Predictor = Callable[[Tensor], Tensor]


@dataclass
class Forecast:
    """The future of a run's series, its intervals and how they were calibrated and checked."""

    frame: pd.DataFrame  # one row per future step: the time column, values, lo/hi per level
    model: str
    steps: int
    levels: tuple[int, ...]
    coverage: dict[str, Any] = field(default_factory=dict)  # summary.json's "forecast" entry
    paths: list[Path] = field(default_factory=list)


def rollout(
    predict: Predictor,
    series: np.ndarray,
    origins: np.ndarray,
    steps: int,
    window: int,
    horizon: int,
    *,
    targets: Sequence[int] | None = None,
    ahead: np.ndarray | None = None,
) -> np.ndarray:
    """Forecasts ``(len(origins), steps, targets)`` of rows ``o+1 .. o+steps`` for each origin
    ``o`` (the last row known), from the scaled ``series`` rows ``≤ o`` only.

    Each origin gets a buffer of the ``P + h − 1`` rows up to ``o`` followed by ``steps`` slots;
    step ``k``'s window is buffer rows ``k−1 .. k+P−2``, so it reaches into the slots exactly
    when ``k > h``, where the ``targets`` columns (default all) hold earlier forecasts and any
    other series is unknown (NaN: the caller refuses such a forecast). ``ahead`` holds the
    inputs known in advance (calendar features), one row per series row and beyond, appended
    after the series. Every origin needs ``o ≥ P + h − 2``.
    """
    known = window + horizon - 1
    if len(origins) and int(origins.min()) < known - 1:
        raise ValueError(f"origin {int(origins.min())} has fewer than {known} rows before it")
    targets = list(range(series.shape[1])) if targets is None else list(targets)
    width = series.shape[1] + (0 if ahead is None else ahead.shape[1])
    buffer = np.full((len(origins), known + steps, width), np.nan, dtype=np.float32)
    rows = origins[:, None] - known + 1 + np.arange(known + steps)[None, :]
    buffer[:, :known, : series.shape[1]] = series[rows[:, :known]]
    if ahead is not None:
        buffer[:, :, series.shape[1] :] = ahead[rows]
    tensor = torch.from_numpy(buffer)
    forecasts = torch.empty(len(origins), steps, len(targets))
    with torch.no_grad():
        for k in range(1, steps + 1):
            forecasts[:, k - 1] = predict(tensor[:, k - 1 : k - 1 + window])
            tensor[:, known + k - 1, targets] = forecasts[:, k - 1]
    return forecasts.numpy().astype(np.float64)


def conformal_widths(residuals: np.ndarray, level: float) -> np.ndarray:
    """Half-widths per (step, series) from ``residuals`` ``(n, steps, m)`` (NaN where an origin
    has no truth for that step): the ``⌈(n+1)·level⌉``-th smallest ``|residual|``, or NaN where
    fewer than ``1/(1−level) − 1`` residuals exist (the finite-sample guarantee needs them)."""
    magnitudes = np.sort(np.abs(residuals), axis=0)  # NaNs sort last
    counts = np.sum(~np.isnan(residuals), axis=0)  # (steps, m)
    rank = np.ceil((counts + 1) * level).astype(int)  # 1-based
    usable = rank <= counts
    index = np.clip(rank - 1, 0, max(len(residuals) - 1, 0))
    widths = np.take_along_axis(magnitudes, index[None], axis=0)[0] if len(residuals) else index
    return np.where(usable, widths, np.nan)


def fill_uncalibrated(widths: np.ndarray) -> tuple[np.ndarray, int]:
    """Steps whose residuals were too few (far beyond the valid span's length) get the last
    calibrated step's width grown like a random walk's spread, ``√(k / k_last)``: our choice,
    reported as ``calibrated_steps`` so a reader knows where the guarantee ends."""
    calibrated = ~np.isnan(widths).any(axis=1)
    if not calibrated.any():
        raise UserError(
            "the valid span is too short to calibrate these intervals (a 95 % interval needs at "
            "least 19 forecasts per step); use a larger valid fraction (--split) or lower --level"
        )
    last = int(np.flatnonzero(calibrated).max())
    steps = np.arange(1, len(widths) + 1)
    grown = widths[last] * np.sqrt(steps[:, None] / (last + 1))
    filled = np.where(np.arange(len(widths))[:, None] > last, grown, widths)
    return filled, last + 1


def model_predictor(model: nn.Module | None, name: str, targets: Sequence[int]) -> Predictor:
    """A run's model as a function of scaled windows (``naive``: the targets' last row)."""
    if model is None:
        if name != "naive":
            raise ValueError(f"{name} has no weights and no forecasting rule")
        last = list(targets)
        return lambda windows: windows[:, -1, last]
    model.eval()
    return lambda windows: model(windows)


def choose_model(run: api.TrainedRun, name: str | None) -> tuple[str, Predictor]:
    """``name``, or the model with the best valid RSE among those that can forecast."""
    usable = {
        entry_name: model
        for entry_name, _, model in run.models
        if isinstance(model, nn.Module) or entry_name == "naive"
    }
    if name is not None:
        if name not in usable:
            raise UserError(
                f"--model {name!r}: {run.dir} has no such model that forecasts; choose one of "
                f"{', '.join(usable)}"
            )
        chosen = name
    else:
        chosen = run_files.best_on_valid(run.summary["results"], usable)
        if chosen is None:
            raise UserError(f"{run.dir}/summary.json has no valid_rse to choose a model by")
    model = usable[chosen]
    network = model if isinstance(model, nn.Module) else None
    return chosen, model_predictor(network, chosen, run.data.target_positions)


def future_index(series: SeriesData, steps: int) -> pd.Index:
    """Timestamps continuing the series at its frequency (inferred when not recorded), or
    row numbers continuing from its length when it has no timestamps."""
    if series.index is None:
        return pd.RangeIndex(series.n_steps, series.n_steps + steps)
    frequency = series.frequency if series.frequency not in (None, "none") else None
    return calendar_mod.future_index(series.index, frequency or _common_step(series.index), steps)


def _common_step(index: pd.DatetimeIndex) -> pd.Timedelta:
    """The most frequent spacing, for an index pandas cannot name a frequency for."""
    return pd.Series(index).diff().dropna().mode().iloc[0]


def time_column(run: api.TrainedRun) -> str:
    """The name of the input's time column: the configured or detected one, else ``date``
    (``step`` for a series without timestamps)."""
    if run.config.data.time_col:
        return run.config.data.time_col
    for line in run.data.column_notes:
        if ": time," in line:
            return line.split("'")[1]
    return "date"


@dataclass
class _Source:
    """What forecasting from a finished run needs: its model as a predictor, the run's own
    series (the spans intervals are calibrated and checked on), the history to forecast from
    (the run's series, or a newer file with its columns), and which inputs are which."""

    run: api.TrainedRun
    model: str
    predict: Predictor
    series: SeriesData
    history: SeriesData
    layout: InputLayout

    @property
    def window(self) -> int:
        return self.run.config.data.window

    @property
    def horizon(self) -> int:
        return self.run.config.data.horizon

    def widths(self, steps: int, levels: Sequence[float]) -> tuple[dict[float, np.ndarray], dict]:
        """Per level, half-widths ``(steps, targets)`` calibrated on the valid span, and their
        coverage of the test span (``summary.json``'s ``forecast.levels``)."""
        split = chronological_split(self.series.n_steps, self.run.config.data.split)
        residuals = self._residuals(split.valid, steps)
        test = self._residuals(split.test, steps)
        widths, coverage = {}, {}
        for level in levels:
            widths[level], calibrated = fill_uncalibrated(conformal_widths(residuals, level / 100))
            seen = ~np.isnan(test)
            inside = np.abs(test) <= widths[level][None]
            coverage[_label(level)] = {
                "test_coverage": float(inside[seen].mean()) if seen.any() else None,
                "test_forecasts": int(seen.sum()),
                "calibrated_steps": calibrated,
                "mean_width": float(widths[level].mean()),
            }
        return widths, coverage

    def _residuals(self, span: slice, steps: int) -> np.ndarray:
        """Residuals ``(origins, steps, targets)`` in original units of the forecasts whose
        targets lie in ``span``, from every origin with a full history; NaN where a target
        leaves it."""
        first = max(span.start - 1, self.window + self.horizon - 2)
        origins = np.arange(first, span.stop - 1)
        truth = self.series.values[:, list(self.layout.target_positions)]
        if not len(origins):
            return np.full((0, steps, truth.shape[1]), np.nan)
        predicted = self.forecasts(self.series, origins, steps)
        rows = origins[:, None] + np.arange(1, steps + 1)[None, :]
        residuals = truth[np.clip(rows, 0, len(truth) - 1)] - predicted
        residuals[(rows < span.start) | (rows >= span.stop)] = np.nan
        return residuals

    def forecasts(self, series: SeriesData, origins: np.ndarray, steps: int) -> np.ndarray:
        """Forecasts in original units ``(len(origins), steps, targets)`` from ``series``'
        rows up to each origin (the run's series or the newer history)."""
        data = self.run.data
        ahead = None
        if self.layout.calendar:  # row t carries the calendar of row t + calendar_shift
            times = series.index.append(future_index(series, steps + self.layout.calendar_shift))
            ahead = calendar_mod.calendar_features(
                times[self.layout.calendar_shift :], self.layout.calendar
            )
        scaled = rollout(
            self.predict, data.scaler.transform(series.values), origins, steps, self.window,
            self.horizon, targets=self.layout.target_positions, ahead=ahead,
        )  # fmt: skip
        return data.inverse_targets(scaled)


def _source(run_dir: Path, model: str | None, csv: Path | None, steps: int) -> _Source:
    task = run_files.written_task(run_dir)
    if task != "forecast":
        raise UserError(
            f"{run_dir} is a {task!r} run; `morphnas forecast` forecasts the series of a "
            "forecasting run (morphnas search --task forecast)"
        )
    if not (Path(run_dir) / "summary.json").is_file():
        raise UserError(
            f"{run_dir} has not finished (no summary.json): finish it with `morphnas search "
            f"--resume {run_dir}` (or `morphnas train --resume`), then forecast"
        )
    run = api.load_trained(run_dir)
    name, predict = choose_model(run, model)
    series = run.kind.series()
    layout = run.data.layout or _all_targets(series)
    inputs_only = [c for c in series.columns if c not in layout.targets]
    cfg = run.config.data
    if inputs_only and steps > cfg.horizon:
        raise UserError(
            f"{', '.join(inputs_only)} {'is an input' if len(inputs_only) == 1 else 'are inputs'} "
            f"but not forecast (--targets), so {steps} steps, beyond the horizon of "
            f"{cfg.horizon}, would need {'its' if len(inputs_only) == 1 else 'their'} unknown "
            f"future; forecast at most {cfg.horizon} (--steps), or train with them as targets"
        )
    history = series if csv is None else _newer_series(run, csv, series.columns)
    if history.n_steps < cfg.window + cfg.horizon - 1:
        raise UserError(
            f"{csv}: {history.n_steps} rows, but window {cfg.window} and horizon {cfg.horizon} "
            f"need {cfg.window + cfg.horizon - 1}; give the file its most recent rows, at least "
            "that many"
        )
    return _Source(run, name, predict, series, history, layout)


def _all_targets(series: SeriesData) -> InputLayout:
    every = tuple(range(series.n_series))
    return InputLayout(series.columns, series.columns, every, frequency=series.frequency)


def forecast(
    run_dir: Path,
    steps: int,
    *,
    model: str | None = None,
    csv: Path | None = None,
    levels: Sequence[float] = DEFAULT_LEVELS,
    out: Path | None = None,
) -> Forecast:
    """Forecast ``steps`` rows after the last row of the run's series (or of ``csv``, newer data
    with the run's columns), write ``forecast.csv``, ``plots/future.png`` and the intervals'
    calibration and test coverage into ``summary.json`` under ``forecast``."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    levels = _check_levels(levels)
    source = _source(run_dir, model, csv, steps)
    history, run = source.history, source.run
    values = source.forecasts(history, np.array([history.n_steps - 1]), steps)[0]
    widths, coverage = source.widths(steps, levels)
    frame = _frame(values, widths, run.data.columns)
    time_name = time_column(run) if history.index is not None else "step"
    frame.insert(0, time_name, future_index(history, steps))
    destination = out or run.dir / "forecast.csv"
    run_files.write_text(destination, frame.to_csv(index=False, float_format="%.10g"))
    plot = report.plot_future(
        history.values[:, list(source.layout.target_positions)], history.index, frame,
        run.data.columns, levels,
        run.dir / "plots/future.png", window=source.window,
    )  # fmt: skip
    entry = {"model": source.model, "steps": steps, "levels": coverage}
    summary = run_files.read_summary(run.dir)
    summary["forecast"] = {**entry, "file": str(destination), "calibration": "valid"}
    run_files.write_json(run.dir / "summary.json", summary)
    return Forecast(frame, source.model, steps, tuple(levels), entry, [destination, plot])


def cross_validation(
    run_dir: Path,
    windows: int,
    step_size: int = 1,
    steps: int | None = None,
    *,
    model: str | None = None,
    csv: Path | None = None,
    levels: Sequence[float] = (),
) -> pd.DataFrame:
    """Rolling-origin forecasts of the history's last rows: ``windows`` cutoffs ``step_size``
    rows apart, the last one ``steps`` rows before the end, each forecasting ``steps`` rows
    (default the run's horizon) with the run's fitted model (no refit: cutoffs inside the train
    span are in-sample). Long format, as NeuralForecast's ``cross_validation``: ``unique_id``,
    the time column, ``cutoff``, ``y`` (the truth), the model's column and its intervals."""
    if windows < 1 or step_size < 1:
        raise UserError(f"--windows and --step-size must be at least 1, got {windows}, {step_size}")
    levels = _check_levels(levels) if levels else ()
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    source = _source(run_dir, model, csv, steps or 1)
    steps = steps or source.horizon
    history = source.history
    last = history.n_steps - 1 - steps
    cutoffs = last - step_size * np.arange(windows)[::-1]
    needed = source.window + source.horizon - 2
    if cutoffs[0] < needed:
        raise UserError(
            f"{windows} windows {step_size} rows apart with {steps} steps each need "
            f"{needed + 1 + steps + step_size * (windows - 1)} rows; the series has "
            f"{history.n_steps}: use fewer --windows or a smaller --step-size"
        )
    predicted = source.forecasts(history, cutoffs, steps)
    widths = source.widths(steps, levels)[0] if levels else {}
    targets = cutoffs[:, None] + np.arange(1, steps + 1)[None, :]
    times = history.index if history.index is not None else pd.RangeIndex(history.n_steps)
    time_name = time_column(source.run) if history.index is not None else "step"
    parts = []
    truth = history.values[:, list(source.layout.target_positions)]
    for j, column in enumerate(source.run.data.columns):
        part = {
            "unique_id": column,
            time_name: np.asarray(times[targets.ravel()]),
            "cutoff": np.asarray(times[np.repeat(cutoffs, steps)]),
            "y": truth[targets.ravel(), j],
            source.model: predicted[:, :, j].ravel(),
        }
        for level in sorted(levels, reverse=True):
            part[f"{source.model}-lo-{_label(level)}"] = (predicted - widths[level])[
                :, :, j
            ].ravel()
        for level in sorted(levels):
            part[f"{source.model}-hi-{_label(level)}"] = (predicted + widths[level])[
                :, :, j
            ].ravel()
        parts.append(pd.DataFrame(part))
    return pd.concat(parts, ignore_index=True)


def _frame(
    values: np.ndarray, widths: dict[float, np.ndarray], columns: Sequence[str]
) -> pd.DataFrame:
    """Per series: the forecast, lows from the widest level in, then highs outwards (the
    column order of NeuralForecast's ``<model>-lo-95, -lo-80, -hi-80, -hi-95``)."""
    data: dict[str, np.ndarray] = {}
    for j, column in enumerate(columns):
        data[column] = values[:, j]
        for level in sorted(widths, reverse=True):
            data[f"{column}-lo-{_label(level)}"] = values[:, j] - widths[level][:, j]
        for level in sorted(widths):
            data[f"{column}-hi-{_label(level)}"] = values[:, j] + widths[level][:, j]
    return pd.DataFrame(data)


def _newer_series(run: api.TrainedRun, csv: Path, columns: tuple[str, ...]) -> SeriesData:
    """``csv`` read as the run's own file was (``columns``, the time column, gap filling),
    refused unless it has the run's columns."""
    cfg = run.config.data
    try:
        series = load_csv(csv, cfg.time_col, list(columns), fill=cfg.fill, max_fill=cfg.max_fill)
    except UserError as err:
        raise UserError(f"{err} (the run {run.dir} was trained on {', '.join(columns)})") from None
    if series.columns != columns:
        raise UserError(
            f"{csv}: columns {', '.join(series.columns)}; the run was trained on "
            f"{', '.join(columns)}; give a file with those columns"
        )
    return series


def _check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    checked = tuple(float(level) for level in levels)
    bad = [level for level in checked if not (0 < level < 100) or not math.isfinite(level)]
    if bad or not checked:
        given = ",".join(f"{float(level):g}" for level in levels)
        raise UserError(f"--level takes percentages between 0 and 100, e.g. 80,95; got {given}")
    return tuple(sorted(set(checked)))


def _label(level: float) -> str:
    """``80`` for 80.0, ``99.5`` for 99.5: the column suffix NeuralForecast users know."""
    return f"{level:g}"
