"""Classical forecasting baselines without trained weights: ``var``, a vector autoregression
(statsmodels) whose lag order is chosen on the validation span, and ``snaive``, the seasonal
naive forecast.

Both forecast target row ``r`` from rows ``≤ r − h`` (``h`` the horizon), the information a
network's window holds, on the run's scaled series, and are scored like every other row
(``forecasting.score_predictions``). A network window of ``P`` rows is matched, not exceeded,
by the VAR: its order runs over ``1..min(P, MAX_ORDER)``. The seasonal naive forecast may reach
back further than the window (a season can be longer), to rows the series holds anyway.

A baseline that cannot be formed on the run's data (no VAR order that the train rows can fit,
a series without a season) is a one-line warning and a row with a ``note`` and no metrics, so
that the run's other models still finish and the table says why the row is empty.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from statsmodels.tsa.api import VAR
from torch import Tensor

from morphnas.data import SeriesData, WindowedSplits
from morphnas.data.series import chronological_split
from morphnas.tasks.forecasting import rse, score_predictions

# The highest VAR order tried: enough for a weekly cycle of daily data and a yearly one of
# monthly data; each order is one least-squares fit of m·p + 1 regressors per series, so the
# selection's cost grows with the square of the cap (about 2 s at 12 on 51 series × 4,400 rows).
MAX_ORDER = 12
# Steps per season of each calendar frequency (pandas' rule codes, older spellings included):
# a week of days (7) or business days (5), a year of weeks, months or quarters. A frequency
# shorter than a day (h, 30min, min, s...) has a daily season, of one day over its step.
CALENDAR_SEASONS = {
    "D": 7, "B": 5, "C": 5, "W": 52,
    "MS": 12, "ME": 12, "M": 12, "BMS": 12, "BME": 12, "BM": 12,
    "QS": 4, "QE": 4, "Q": 4, "BQS": 4, "BQE": 4, "BQ": 4,
}  # fmt: skip


@dataclass(frozen=True)
class History:
    """The run's series (every one, forecast or not) in scaled units, the columns forecast, its
    train rows, and the target rows of the valid and test samples (the last ``len(Y)`` rows of
    each part, as ``make_windows`` cuts them)."""

    values: np.ndarray
    targets: list[int]
    train: slice
    valid: np.ndarray
    test: np.ndarray


# Valid and test forecasts in scaled units, fitted coefficients, and the row's extra keys.
Outcome = tuple[np.ndarray, np.ndarray, int, dict[str, Any]]


def reference(
    name: str, series: SeriesData, fractions: Sequence[float], data: WindowedSplits
) -> tuple[dict[str, Any], Tensor | None]:
    """The result row of the baseline ``name`` (``snaive`` or ``var``) on the run's ``data``,
    cut from ``series`` by ``fractions``, and its test predictions (None for a row with a note)."""
    start = time.perf_counter()
    history = scaled_history(series, fractions, data)
    if name == "var":
        outcome = _var(history, series, data)
    else:
        outcome = _snaive(history, series.frequency, data.horizon)
    seconds = time.perf_counter() - start if name == "var" else 0.0
    if isinstance(outcome, str):
        warnings.warn(f"baseline {name}: {outcome}", stacklevel=3)
        return {"model": name, "params": 0, "note": outcome, "train_seconds": seconds}, None
    valid, test, params, extra = outcome
    valid_pred, test_pred = _tensor(valid, data.valid[1]), _tensor(test, data.test[1])
    scores = score_predictions(valid_pred, test_pred, data)
    row = {"model": name, "params": params, **scores, "train_seconds": seconds, **extra}
    return row, test_pred


def scaled_history(series: SeriesData, fractions: Sequence[float], data: WindowedSplits) -> History:
    """``series`` through ``data``'s scaler (fitted on every series, targets or not), with the
    positions of ``data``'s target columns and the rows of its samples.

    The targets are checked against ``data``'s: a forecast of the wrong rows would still score,
    just wrongly, so a change to how windows are cut must fail here rather than pass unseen.
    """
    split = chronological_split(series.n_steps, fractions)
    targets = [series.columns.index(column) for column in data.columns]
    values = data.scaler.transform(series.values)
    rows = {}
    for part, (_, y) in (("valid", data.valid), ("test", data.test)):
        stop = getattr(split, part).stop
        rows[part] = np.arange(stop - len(y), stop)
        if not np.allclose(values[rows[part]][:, targets], _numpy(y), rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"the {part} targets are not the last rows of the {part} split")
    return History(values, targets, split.train, rows["valid"], rows["test"])


# --------------------------------------------------------------------------- seasonal naive


def season_length(frequency: str | None) -> int | None:
    """Steps per season of a pandas frequency string, or None when it has no whole-step season
    of more than one step (no frequency, yearly data, "2D", "7min"...)."""
    if frequency is None:
        return None
    try:
        offset = pd.tseries.frequencies.to_offset(frequency)
    except ValueError:
        return None
    cycle = CALENDAR_SEASONS.get(offset.rule_code.split("-")[0])
    if cycle is not None:  # before ticks: pandas 2 counts a day as one
        return cycle // offset.n if cycle > offset.n and cycle % offset.n == 0 else None
    if isinstance(offset, pd.offsets.Tick):
        per_day = pd.Timedelta(days=1) / pd.Timedelta(offset)
        return int(per_day) if per_day > 1 and float(per_day).is_integer() else None
    return None


def _snaive(history: History, frequency: str | None, horizon: int) -> Outcome | str:
    """``ŷ(r) = y(r − s·k)``, ``k = ceil(h / s)``: the latest value of the same season that is
    at least ``h`` rows old (``s`` the season of the series' ``frequency``)."""
    season = season_length(frequency)
    if frequency is None:
        return "the series has no timestamps, so no season; give the file a time column"
    if season is None:
        return f"the series' frequency {frequency!r} has no season of whole steps"
    lag = season * math.ceil(horizon / season)
    if history.valid[0] < lag:
        return f"a season of {season} steps (lag {lag}) reaches before the series' first row"
    values = history.values[:, history.targets]
    return values[history.valid - lag], values[history.test - lag], 0, {"season": season}


# --------------------------------------------------------------------------- VAR


def _var(history: History, series: SeriesData, data: WindowedSplits) -> Outcome | str:
    """The VAR of every series whose ``h``-step forecasts of the valid targets have the lowest
    valid RSE (in original units, as the row reports it) among the orders the train rows can
    fit. A series that is not forecast is still modelled: the networks read it too."""
    train, targets = history.values[history.train], history.targets
    truth = series.values[history.valid][:, targets]
    best: tuple[float, int, Any, np.ndarray] | None = None
    origins, steps = history.valid - data.horizon, data.horizon
    for order in range(1, min(data.window, MAX_ORDER) + 1):
        if not _fits(len(train), train.shape[1], order):
            break  # a higher order needs even more rows
        try:
            fitted = VAR(train).fit(order, trend="c")
        except (np.linalg.LinAlgError, ValueError):
            continue
        valid = var_forecasts(fitted.coefs, fitted.intercept, history.values, origins, steps)
        if not np.isfinite(valid).all():
            continue
        score = rse(data.scaler.inverse(valid)[:, targets], truth)
        if best is None or score < best[0]:
            best = (score, order, fitted, valid)
    if best is None:
        rows, series = train.shape
        return (
            f"no VAR order of 1..{min(data.window, MAX_ORDER)} fits {rows} train rows of "
            f"{series} series (too few rows, or a singular or diverging fit)"
        )
    _, order, fitted, valid = best
    origins = history.test - steps
    test = var_forecasts(fitted.coefs, fitted.intercept, history.values, origins, steps)
    if not np.isfinite(test).all():
        return f"the VAR({order}) chosen on valid diverges on the test span"
    params = fitted.coefs.size + fitted.intercept.size
    return valid[:, targets], test[:, targets], params, {"var_order": order}


def _fits(rows: int, series: int, order: int) -> bool:
    """Whether ``rows`` train rows leave a residual degree of freedom to a VAR(``order``):
    ``rows − order`` equations for ``series · order + 1`` coefficients per series."""
    return rows - order > series * order + 1


def var_forecasts(
    coefs: np.ndarray, intercept: np.ndarray, values: np.ndarray, origins: np.ndarray, steps: int
) -> np.ndarray:
    """The ``steps``-ahead forecast from every origin at once: the VAR recursion
    ``y_t = c + Σ_i A_i y_{t−i}`` (``coefs[i−1] = A_i``) iterated on the ``(n, p, m)`` stack of
    the origins' lags, most recent first, each step's forecast pushed in as the newest lag."""
    lags = values[origins[:, None] - np.arange(coefs.shape[0])]
    for _ in range(steps):
        forecast = intercept + np.einsum("nik,ijk->nj", lags, coefs)
        lags = np.concatenate([forecast[:, None], lags[:, :-1]], axis=1)
    return forecast


def _tensor(values: np.ndarray, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def _numpy(values: Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()
