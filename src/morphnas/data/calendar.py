"""Calendar features: known-future inputs computed from the timestamps alone.

Each feature is a position in a cycle (hour of the day, day of the week, ...) encoded as a
sin/cos pair, so that the end of a cycle sits next to its start (23h beside 0h, December beside
January) and every value lies in [-1, 1] (no scaler needed). Because they depend only on the
clock, they are known for any future step: `calendar_features` takes any `DatetimeIndex`, and
`future_index` extends a series' timestamps, which is what a forecast of the future needs.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from morphnas.errors import UserError

# name -> (position in the cycle, from 0, as a float array; the cycle's length, same shape).
_Cycle = Callable[[pd.DatetimeIndex], tuple[np.ndarray, np.ndarray]]


def _constant(index: pd.DatetimeIndex, length: float) -> np.ndarray:
    return np.full(len(index), length, dtype=np.float64)


FEATURES: dict[str, _Cycle] = {
    "minute": lambda i: (np.asarray(i.minute, np.float64), _constant(i, 60)),
    "hour": lambda i: (np.asarray(i.hour, np.float64), _constant(i, 24)),
    "dayofweek": lambda i: (np.asarray(i.day_of_week, np.float64), _constant(i, 7)),
    "dayofmonth": lambda i: (
        np.asarray(i.day, np.float64) - 1,
        np.asarray(i.days_in_month, np.float64),
    ),
    "dayofyear": lambda i: (
        np.asarray(i.day_of_year, np.float64) - 1,
        np.where(np.asarray(i.is_leap_year), 366.0, 365.0),
    ),
    "weekofyear": lambda i: (
        np.asarray(i.isocalendar().week, np.float64) - 1,
        _constant(i, 53),
    ),
    "month": lambda i: (np.asarray(i.month, np.float64) - 1, _constant(i, 12)),
}

# `auto`: the cycles worth modelling at a step of less than this length (shorter steps first).
_AUTO = (
    (pd.Timedelta(hours=1), ("minute", "hour", "dayofweek")),
    (pd.Timedelta(days=1), ("hour", "dayofweek")),
    (pd.Timedelta(days=7), ("dayofweek", "dayofyear")),
    (pd.Timedelta(days=28), ("dayofyear",)),
    (pd.Timedelta(days=366), ("month",)),
)


def feature_columns(names: Sequence[str]) -> tuple[str, ...]:
    """The input column names of `names`' features: `cal_<name>_sin`, `cal_<name>_cos`, ...
    (prefixed so that they cannot be mistaken for a series of the file)."""
    return tuple(f"cal_{name}_{part}" for name in names for part in ("sin", "cos"))


def calendar_features(index: pd.DatetimeIndex, names: Sequence[str]) -> np.ndarray:
    """`(len(index), 2·len(names))` float64: for each feature, sin then cos of 2π·position /
    cycle length (e.g. hour 6 -> sin(2π·6/24) = 1, cos = 0). Any timestamps, past or future."""
    index = pd.DatetimeIndex(index)
    columns = []
    for name in names:
        position, length = FEATURES[name](index)
        angle = 2 * np.pi * position / length
        columns += [np.sin(angle), np.cos(angle)]
    return np.stack(columns, axis=1) if columns else np.empty((len(index), 0))


def future_index(
    index: pd.DatetimeIndex, frequency: str | pd.Timedelta, steps: int
) -> pd.DatetimeIndex:
    """The `steps` timestamps after `index[-1]` on the series' `frequency` (its next rows)."""
    return pd.date_range(index[-1], periods=steps + 1, freq=frequency)[1:]


def resolve(
    names: Sequence[str] | None, index: pd.DatetimeIndex | None, series: str
) -> tuple[str, ...]:
    """The feature names a run uses: `names` checked, or for `["auto"]` those that suit the
    series' step (see `_AUTO`) and vary over its timestamps. A series without timestamps has no
    calendar: asking for one is a one-line error."""
    if not names:
        return ()
    if index is None:
        raise UserError(
            f"{series} has no timestamps, so --calendar has nothing to compute features from; "
            "give a CSV with a time column (--time-col) or leave --calendar out"
        )
    if "auto" in names:
        if len(names) > 1:
            raise UserError("--calendar auto chooses the features itself; give it alone")
        return _auto(index, series)
    for name in names:
        if name not in FEATURES:
            close = difflib.get_close_matches(name, list(FEATURES), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(
                f"unknown calendar feature {name!r}; {hint}choose from auto, {', '.join(FEATURES)}"
            )
    if len(set(names)) < len(names):
        raise UserError(f"--calendar lists a feature twice: {','.join(names)}")
    return tuple(names)


def _auto(index: pd.DatetimeIndex, series: str) -> tuple[str, ...]:
    """The cycles longer than the series' typical step that change over its timestamps."""
    step = pd.Series(index).diff().median() if len(index) > 1 else pd.Timedelta(0)
    for limit, candidates in _AUTO:
        if step < limit:
            varying = tuple(
                name for name in candidates if np.ptp(calendar_features(index, [name]), 0).any()
            )
            if varying:
                return varying
            break
    raise UserError(
        f"{series}: --calendar auto finds no calendar cycle that varies at its step of {step}; "
        f"name the features (e.g. --calendar month) or leave --calendar out"
    )
