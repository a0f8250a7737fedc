"""A multivariate series, its chronological split, per-series scalers and forecasting windows.

Everything downstream of a loader works on `SeriesData`, so the invariants (2-D, float64, finite,
names and timestamps that match the rows) are checked once, here, instead of in every task.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from morphnas.data import calendar as calendar_mod
from morphnas.errors import UserError

Tensors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class SeriesData:
    """A multivariate series of `T` rows (time steps) and `m` columns, oldest row first.

    `values` is copied to a read-only float64 array so that a frozen instance really is frozen;
    `eq=False` because element-wise array equality has no single truth value.
    """

    name: str
    values: np.ndarray
    columns: tuple[str, ...]
    index: pd.DatetimeIndex | None
    frequency: str | None
    source: str
    licence: str

    def __post_init__(self) -> None:
        values = np.array(self.values, dtype=np.float64)
        values.flags.writeable = False
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "columns", tuple(str(c) for c in self.columns))
        _check_series(self)

    @property
    def n_steps(self) -> int:
        """Number of rows (time steps)."""
        return int(self.values.shape[0])

    @property
    def n_series(self) -> int:
        """Number of columns (series)."""
        return int(self.values.shape[1])


def _check_series(data: SeriesData) -> None:
    """Reject a series the rest of the library cannot use, naming the offending row/column."""
    values = data.values
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise UserError(
            f"series '{data.name}' must be a 2-D array of shape (steps, series) with at least one "
            f"row and one column, got shape {values.shape}"
        )
    if len(data.columns) != values.shape[1]:
        raise UserError(
            f"series '{data.name}' has {values.shape[1]} columns of values but "
            f"{len(data.columns)} column names; give one name per column"
        )
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        row, col = (int(i) for i in bad[0])
        raise UserError(
            f"series '{data.name}': column '{data.columns[col]}' row {row + 1} is "
            f"{values[row, col]}; fill or drop non-finite values before using the series"
        )
    _check_magnitudes(data)
    if data.index is not None and len(data.index) != values.shape[0]:
        raise UserError(
            f"series '{data.name}' has {values.shape[0]} rows but {len(data.index)} timestamps; "
            "give one timestamp per row or none"
        )


@dataclass(frozen=True)
class Split:
    """Row ranges of a chronological three-way split: train, then valid, then test."""

    train: slice
    valid: slice
    test: slice

    def named(self) -> tuple[tuple[str, slice], ...]:
        """The three parts with their names, in chronological order (for loops and messages)."""
        return (("train", self.train), ("valid", self.valid), ("test", self.test))


def chronological_split(n_steps: int, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> Split:
    """Cut `n_steps` rows into consecutive train/valid/test ranges by `fractions`.

    The cut points are rounded (not floored) so that e.g. 0.7 * 10 gives 7 rows despite the
    float error; every part must keep at least one row, because the search needs all three.
    """
    fracs = _check_fractions(fractions)
    train_end = round(n_steps * fracs[0])
    valid_end = round(n_steps * (fracs[0] + fracs[1]))
    split = Split(slice(0, train_end), slice(train_end, valid_end), slice(valid_end, n_steps))
    for name, part in split.named():
        if part.stop <= part.start:
            raise UserError(
                f"a series of {n_steps} rows is too short to split by fractions {fracs}: the "
                f"{name} part gets no rows; use a longer series or a larger {name} fraction"
            )
    return split


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Fractions must be three positive numbers summing to 1, or the split is meaningless."""
    fracs = tuple(float(f) for f in fractions)
    if len(fracs) != 3 or not all(math.isfinite(f) and f > 0 for f in fracs):
        raise UserError(
            f"split fractions must be three positive numbers (train, valid, test), got "
            f"{tuple(fractions)}; e.g. 0.6,0.2,0.2"
        )
    if not math.isclose(sum(fracs), 1.0, abs_tol=1e-9):
        raise UserError(f"split fractions {fracs} sum to {sum(fracs):g}, not 1; e.g. 0.6,0.2,0.2")
    return fracs[0], fracs[1], fracs[2]


class Scaler:
    """Per-column affine scaling `(x - mean_) / scale_`, fitted on the train rows only.

    Subclasses choose `mean_` and `scale_` in `_fit`; transform, inverse and (de)serialisation
    are shared, so every kind can be saved in a run's JSON and restored by `scaler_from_state`.
    """

    kind: ClassVar[str] = ""
    mean_: np.ndarray
    scale_: np.ndarray

    def fit(self, values: np.ndarray) -> Scaler:
        """Learn the per-column statistics from `values` (rows = time steps of the train part)."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] < 1:
            raise ValueError(f"fit expects a (rows, columns) array with rows, got {values.shape}")
        self.mean_, self.scale_ = self._fit(values)
        return self

    def _fit(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Scale an array whose last axis holds the columns, e.g. (T, m) or (n, window, m)."""
        self._check_fitted()
        return (np.asarray(values, dtype=np.float64) - self.mean_) / self.scale_

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """Undo `transform`, to report forecasts and errors in the original units."""
        self._check_fitted()
        return np.asarray(values, dtype=np.float64) * self.scale_ + self.mean_

    def state(self) -> dict[str, Any]:
        """Plain lists, so the fitted scaler can be written into a run's JSON files."""
        self._check_fitted()
        return {"kind": self.kind, "mean": self.mean_.tolist(), "scale": self.scale_.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Scaler:
        """Rebuild a fitted scaler of this kind from `state()`."""
        if state.get("kind", cls.kind) != cls.kind:
            raise ValueError(f"state of a '{state.get('kind')}' scaler given to '{cls.kind}'")
        scaler = cls()
        scaler.mean_ = np.asarray(state["mean"], dtype=np.float64)
        scaler.scale_ = np.asarray(state["scale"], dtype=np.float64)
        return scaler

    def _check_fitted(self) -> None:
        if not hasattr(self, "scale_"):
            raise RuntimeError(f"{type(self).__name__} is used before fit()")


def _safe_scale(scale: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Replace a (numerically) zero scale by 1.0: a constant column is centred, not divided by 0.

    The threshold is relative, because the std of a constant column like 0.1 is ~1e-17, not 0.
    """
    tiny = 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(reference))
    return np.where(scale > tiny, scale, 1.0)


class StandardScaler(Scaler):
    """Per-column z-score (population std), the usual choice for forecasting."""

    kind = "standard"

    def _fit(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = values.mean(axis=0)
        return mean, _safe_scale(values.std(axis=0), mean)


class MaxScaler(Scaler):
    """Divide each column by its largest absolute train value: LSTNet's `normalize=2`.

    LSTNet takes the maximum over the whole series, which leaks the test part; here it is
    fitted on the train rows like every other scaler.
    """

    kind = "max"

    def _fit(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        peak = np.abs(values).max(axis=0)
        return np.zeros(values.shape[1]), _safe_scale(peak, peak)


class IdentityScaler(Scaler):
    """No scaling (`"none"`), with the same interface so callers never special-case it."""

    kind = "none"

    def _fit(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(values.shape[1]), np.ones(values.shape[1])


_SCALERS: dict[str, type[Scaler]] = {
    cls.kind: cls for cls in (StandardScaler, MaxScaler, IdentityScaler)
}


def make_scaler(kind: str) -> Scaler:
    """An unfitted scaler by name: "standard", "max" or "none"."""
    return _scaler_class(kind)()


def scaler_from_state(state: dict[str, Any]) -> Scaler:
    """Rebuild whichever kind of fitted scaler `Scaler.state()` saved."""
    return _scaler_class(str(state.get("kind"))).from_state(state)


def _scaler_class(kind: str) -> type[Scaler]:
    if kind in _SCALERS:
        return _SCALERS[kind]
    close = difflib.get_close_matches(kind, list(_SCALERS), n=1, cutoff=0.0)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"unknown scaler '{kind}'; {hint}choose one of: {', '.join(_SCALERS)}")


@dataclass(frozen=True)
class InputLayout:
    """What each input column of a window holds, and which of them are forecast.

    `inputs` are the series (scaled, in file order) then the calendar features (`calendar`,
    sin/cos pairs from `data.calendar.calendar_features`, never scaled, never targets);
    `targets` are the forecast series and `target_positions` their columns among `inputs` (and
    among the scaler's columns, since the series come first). Calendar features are known
    ahead: the input row of time step t carries the calendar of step t + `calendar_shift` (the
    horizon), so the last row of a window carries the calendar of the step it forecasts.
    `frequency` is the series' step, to extend its timestamps into the future.
    """

    inputs: tuple[str, ...]
    targets: tuple[str, ...]
    target_positions: tuple[int, ...]
    calendar: tuple[str, ...] = ()
    calendar_shift: int = 0
    frequency: str | None = None

    @property
    def n_series(self) -> int:
        """The scaled series among the inputs (the columns before the calendar features)."""
        return len(self.inputs) - 2 * len(self.calendar)


@dataclass
class WindowedSplits:
    """Scaled (input window, target) pairs of each split, as the forecasting task consumes them.

    X has shape (n, window, inputs) and Y shape (n, targets), both float32; `columns` names Y's
    columns (the forecast series) and `layout` every input column. By default every series is
    both input and target and there is no calendar, so inputs == targets == `columns`.
    `test_index` holds the timestamps of the test targets (for plots), or None when the series
    has no timestamps.
    """

    train: Tensors
    valid: Tensors
    test: Tensors
    scaler: Scaler
    window: int
    horizon: int
    columns: tuple[str, ...]
    test_index: pd.DatetimeIndex | None = None
    # What the loader did with each column of a user's file (`data.csv.ColumnNote.line()`), for
    # the run's summary: used, the time column, dropped (and why), converted.
    column_notes: tuple[str, ...] = ()
    layout: InputLayout | None = None  # None: every column is input and target, no calendar
    # Rows and cells `load_csv(fill=...)` filled in (`data.csv.FillReport.summary()`), or None.
    filled: dict[str, Any] | None = None

    @property
    def input_columns(self) -> tuple[str, ...]:
        """The names of X's last axis: the series, then any calendar features."""
        return self.columns if self.layout is None else self.layout.inputs

    @property
    def target_positions(self) -> tuple[int, ...]:
        """Where each forecast series sits among the inputs (and the scaler's columns)."""
        if self.layout is None:
            return tuple(range(len(self.columns)))
        return self.layout.target_positions

    def scale_targets(self, values: np.ndarray) -> np.ndarray:
        """Scale values of the targets `(..., len(columns))` as Y is scaled."""
        mean, scale = self._target_statistics()
        return (np.asarray(values, dtype=np.float64) - mean) / scale

    def inverse_targets(self, values: np.ndarray) -> np.ndarray:
        """Undo the scaling of target predictions `(..., len(columns))`, to original units."""
        mean, scale = self._target_statistics()
        return np.asarray(values, dtype=np.float64) * scale + mean

    def _target_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """The scaler's mean and scale of the targets' columns alone."""
        self.scaler._check_fitted()
        at = list(self.target_positions)
        return self.scaler.mean_[at], self.scaler.scale_[at]


def _check_magnitudes(data: SeriesData) -> None:
    """Refuse a column whose sum of squares overflows float64 (values beyond about 1e154): the
    scaler's variance and every RSE square the values, so the run would finish with NaN figures.
    The unit of a column does not change a forecast: rescaling it is the fix."""
    with np.errstate(over="ignore"):
        energy = np.square(data.values).sum(axis=0)
    overflowing = np.flatnonzero(~np.isfinite(energy))
    if overflowing.size:
        k = int(overflowing[0])
        peak = float(np.abs(data.values[:, k]).max())
        raise UserError(
            f"series '{data.name}': column '{data.columns[k]}' has values up to {peak:.3g}, whose "
            "squares overflow float64 (the scaler's variance and the RSE would be inf or NaN); "
            "rescale the column, e.g. divide it by a power of ten"
        )


def make_windows(
    data: SeriesData,
    window: int,
    horizon: int,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    scaler: str = "standard",
    *,
    targets: Sequence[str] | None = None,
    calendar: Sequence[str] | None = None,
) -> WindowedSplits:
    """Cut a series into scaled forecasting samples, split chronologically by target row.

    A sample with target row r uses input rows r-horizon-window+1 .. r-horizon and belongs to
    the split holding r, so its window may reach back into the previous split (as in LSTNet)
    while no target is ever seen twice. The scaler is fitted on the train rows only, so
    nothing about the valid/test values leaks into the inputs.

    `targets` (default: every column) are the series forecast, in the order given; every
    series stays an input. `calendar` names features of `data.calendar.FEATURES` (or
    `["auto"]`), appended to the inputs as described in `InputLayout`.
    """
    if window < 1 or horizon < 1:
        raise UserError(
            f"window and horizon must be at least 1, got window={window}, horizon={horizon}; "
            "set --window and --horizon to positive integers"
        )
    split = chronological_split(data.n_steps, fractions)
    fitted = make_scaler(scaler).fit(data.values[split.train])
    scaled = fitted.transform(data.values)
    positions = _target_positions(data, targets)
    names = calendar_mod.resolve(calendar, data.index, f"series '{data.name}'")
    inputs = scaled
    if names:  # row t gets the calendar of row t + horizon; rows past T-1-horizon feed no window
        known = calendar_mod.calendar_features(data.index, names)
        inputs = np.concatenate([scaled[: data.n_steps - horizon], known[horizon:]], axis=1)
    target_rows = {
        name: _targets(name, part, window, horizon, data.n_steps) for name, part in split.named()
    }
    values = scaled[:, list(positions)]
    parts = {
        name: _samples(inputs, values, rows, window, horizon) for name, rows in target_rows.items()
    }
    target_names = tuple(data.columns[p] for p in positions)
    layout = InputLayout(
        inputs=data.columns + calendar_mod.feature_columns(names),
        targets=target_names,
        target_positions=positions,
        calendar=names,
        calendar_shift=horizon if names else 0,
        frequency=data.frequency,
    )
    return WindowedSplits(
        train=parts["train"],
        valid=parts["valid"],
        test=parts["test"],
        scaler=fitted,
        window=window,
        horizon=horizon,
        columns=target_names,
        test_index=None if data.index is None else data.index[target_rows["test"]],
        layout=layout,
    )


def _target_positions(data: SeriesData, targets: Sequence[str] | None) -> tuple[int, ...]:
    """The columns of `targets` (default: all), refusing an unknown or repeated name."""
    if targets is None:
        return tuple(range(data.n_series))
    if not targets:
        raise UserError("--targets names no column; give at least one, e.g. --targets a")
    if len(set(targets)) < len(targets):
        raise UserError(f"--targets lists a column twice: {','.join(targets)}")
    for name in targets:
        if name not in data.columns:
            close = difflib.get_close_matches(name, list(data.columns), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            shown = ", ".join(data.columns[:20]) + (", ..." if data.n_series > 20 else "")
            raise UserError(
                f"--targets names {name!r}, which is not a series of '{data.name}'; {hint}"
                f"choose from {shown}"
            )
    return tuple(data.columns.index(name) for name in targets)


def _targets(name: str, part: slice, window: int, horizon: int, n_steps: int) -> np.ndarray:
    """Target rows of one split: those of its rows with a full input window before them."""
    first = max(part.start, window + horizon - 1)
    if first >= part.stop:
        raise UserError(
            f"the {name} split has rows {part.start}..{part.stop - 1} of {n_steps}, but "
            f"window={window} plus horizon={horizon} needs the first target at row "
            f"{window + horizon - 1} or later, which leaves no {name} sample; use a smaller "
            "--window/--horizon or a longer series"
        )
    return np.arange(first, part.stop)


def _samples(
    inputs: np.ndarray, values: np.ndarray, targets: np.ndarray, window: int, horizon: int
) -> Tensors:
    """Gather the (window, inputs) rows before each target row and its target values as
    float32; `inputs` may stop before the last rows, which feed no window."""
    starts = targets - horizon - window + 1
    views = np.lib.stride_tricks.sliding_window_view(inputs, window, axis=0)  # (T'-w+1, n, w)
    x = np.ascontiguousarray(views[starts].transpose(0, 2, 1), dtype=np.float32)
    y = np.ascontiguousarray(values[targets], dtype=np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)
