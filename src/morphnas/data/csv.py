"""Load a user's CSV file as a `SeriesData`, with errors a person can act on.

pandas may not guess what a cell means (no NaN guessing, no dropped columns): a column it
cannot read as numbers is examined cell by cell here, so that a bad cell is reported by column
name and 1-based data row (the first row after the header is row 1) instead of surfacing later
as a silent NaN or an object-dtype crash in training.

Accepted layouts:
- a header line plus numeric columns, optionally with a time column (the ETT layout: `date`
  then the series), which is found automatically when named date/time/timestamp/datetime;
- the LSTNet text layout: no header, all numbers, one row per step; the columns are named
  "0".."m-1". A first line made only of numbers is taken as data, never as a header.
Columns that are mostly text (labels, ids) are left out unless named in `columns`.
"""

from __future__ import annotations

import difflib
import io
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphnas.data.series import SeriesData
from morphnas.errors import UserError

_TIME_NAMES = frozenset({"date", "time", "timestamp", "datetime"})
_MISSING = frozenset({"", "nan", "+nan", "-nan", "na", "n/a", "#n/a", "null", "none"})
_SHOW_NAMES = 20  # how many column names an error message lists before abbreviating


def load_csv(
    path: str | os.PathLike[str],
    time_col: str | None = None,
    columns: Sequence[str] | None = None,
) -> SeriesData:
    """Read, validate and convert a CSV file of one row per time step.

    `time_col` names the timestamp column (else one named like a date is used if it parses);
    `columns` picks the value columns (else every numeric column except the time column); a
    single string is read as a comma-separated list, as on the command line ("a,c"), rather
    than as a sequence of one-letter names. Raises `UserError` naming the file, column and
    data row of the first problem found.
    """
    shown = str(path)
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",")]
    table, has_header = _read_table(Path(path), shown)
    wanted = _check_selection(table, shown, has_header, time_col, columns)
    index, time_name = _find_index(table, shown, time_col, wanted)
    candidates = wanted or [c for c in table.columns if c != time_name]
    kept: dict[str, np.ndarray] = {}
    for name in candidates:
        numbers = _numeric_column(table[name], name, shown, required=wanted is not None)
        if numbers is not None:
            kept[name] = numbers
    if not kept:
        raise UserError(
            f"{shown} has no numeric columns (columns: {_names(table.columns)}); "
            "give a CSV with one numeric column per series"
        )
    _check_not_constant(kept, shown)
    dropped = [c for c in candidates if c not in kept]
    note = f"; left out non-numeric columns {_names(dropped)}" if dropped else ""
    return SeriesData(
        name=Path(path).stem,
        values=np.column_stack(list(kept.values())),
        columns=tuple(kept),
        index=index,
        frequency=_infer_frequency(index),
        source=f"CSV file {shown}{note}",
        licence="user data (licence unknown to morphnas)",
    )


def _read_table(path: Path, shown: str) -> tuple[pd.DataFrame, bool]:
    """The data rows under their column names, and whether the file has a header line.

    pandas parses the whole file with its fast C reader; columns it could not make numeric stay
    text and are examined cell by cell later, so clean files (e.g. LSTNet's 26304 x 321
    electricity) load in about a second while bad cells are still reported precisely.
    """
    text = _read_text(path, shown)
    first = [c.strip() for c in _parse(text, shown, header=None, nrows=1, dtype=str).iloc[0]]
    has_header = not (any(c != "" for c in first) and all(c == "" or _is_number(c) for c in first))
    rows = _parse(text, shown, header=0 if has_header else None, index_col=False)
    if has_header:
        rows.columns = _header_names(first, shown)
    else:
        rows.columns = [str(i) for i in range(len(first))]
    if len(rows) < 2:
        raise UserError(
            f"{shown} has {len(rows)} data row(s); a series needs at least 2 (one row per "
            "time step)"
        )
    return rows, has_header


def _read_text(path: Path, shown: str) -> str:
    """The file's text, or a UserError that says why it cannot be read and what to do."""
    if not path.exists():
        raise UserError(
            f"CSV file not found: {shown}; check the path (working directory: {Path.cwd()})"
        )
    if path.is_dir():
        raise UserError(f"{shown} is a directory, not a CSV file; give the path of the file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(
            f"cannot read {shown}: {err.strerror or err}; check that the file is readable"
        ) from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(
            f"{shown} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); "
            "save it as UTF-8 CSV"
        ) from err
    if not text.strip():
        raise UserError(f"{shown} is empty; give a CSV file with one row per time step")
    return text


def _parse(text: str, shown: str, **options: Any) -> pd.DataFrame:
    """pandas' CSV reader with every cell kept as written (no NaN guessing) and blank lines
    skipped; a ragged row becomes a UserError."""
    try:
        return pd.read_csv(io.StringIO(text), na_filter=False, skip_blank_lines=True, **options)
    except pd.errors.ParserError as err:
        raise UserError(_parser_message(err, shown)) from err


def _parser_message(err: pd.errors.ParserError, shown: str) -> str:
    """Turn pandas' ragged-row error into one line that names the line and the fix."""
    found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
    if found:
        expected, line, saw = found.groups()
        return (
            f"{shown}: line {line} has {saw} comma-separated fields but the first line has "
            f"{expected}; give every row the same number of fields"
        )
    reason = " ".join(str(err).split())
    return f"{shown} could not be parsed as CSV ({reason}); check its quoting and separators"


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _header_names(first: list[str], shown: str) -> list[str]:
    """Column names from the header line; empty or repeated names would make selection ambiguous."""
    for i, name in enumerate(first):
        if name == "":
            raise UserError(
                f"{shown}: column {i + 1} has no name in the header line; name it or delete it "
                "(an index column written by pandas looks like this: save with index=False)"
            )
        if name in first[:i]:
            raise UserError(
                f"{shown}: the header names column {name!r} twice (columns "
                f"{first.index(name) + 1} and {i + 1}); give every column a distinct name"
            )
    return first


def _check_selection(
    table: pd.DataFrame,
    shown: str,
    has_header: bool,
    time_col: str | None,
    columns: Sequence[str] | None,
) -> list[str] | None:
    """Check that `time_col` and `columns` name existing columns; return the chosen columns."""
    available = list(table.columns)
    named = ([time_col] if time_col is not None else []) + list(columns or [])
    for name in named:
        if name not in available:
            raise UserError(_unknown_column(name, available, shown, has_header))
    if columns is None:
        return None
    wanted = list(columns)
    if not wanted:
        raise UserError(f"--columns is empty; name at least one of {_names(available)}")
    if time_col is not None and time_col in wanted:
        raise UserError(
            f"column {time_col!r} is the --time-col, so it cannot also be in --columns; "
            "remove it from --columns"
        )
    repeated = [c for i, c in enumerate(wanted) if c in wanted[:i]]
    if repeated:
        raise UserError(f"--columns names {repeated[0]!r} twice; name each column once")
    return wanted


def _unknown_column(name: str, available: list[str], shown: str, has_header: bool) -> str:
    close = difflib.get_close_matches(name, available, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    layout = "" if has_header else " (the file has no header line, so columns are numbered)"
    return f"{shown} has no column {name!r}; {hint}available columns: {_names(available)}{layout}"


def _names(names: Sequence[str]) -> str:
    """A one-line list of column names, abbreviated for wide files."""
    listed = ", ".join(repr(n) for n in list(names)[:_SHOW_NAMES])
    more = len(names) - _SHOW_NAMES
    return f"{listed}, ... ({len(names)} in all)" if more > 0 else listed


def _find_index(
    table: pd.DataFrame, shown: str, time_col: str | None, wanted: list[str] | None
) -> tuple[pd.DatetimeIndex | None, str | None]:
    """The timestamps and the name of their column: `time_col`, else a date-named column."""
    if time_col is not None:
        return _time_index(table[time_col], time_col, shown, explicit=True), time_col
    for name in table.columns:
        if name.lower() in _TIME_NAMES and name not in (wanted or []):
            index = _time_index(table[name], name, shown, explicit=False)
            if index is not None:
                return index, name
    return None, None


def _time_index(
    cells: pd.Series, column: str, shown: str, explicit: bool
) -> pd.DatetimeIndex | None:
    """Parse a time column. A date-named column found automatically counts only when most of
    its cells parse (else it is an ordinary column); then, as for `--time-col`, every cell must
    parse and the timestamps must be strictly increasing, because the rows must be chronological.
    """
    cells = cells.astype(str).str.strip()
    parsed = _to_datetimes(cells)
    bad = parsed.isna().to_numpy()
    if not explicit and 2 * bad.sum() >= len(bad):
        return None
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(
            f"{shown}: time column {column!r} data row {row + 1} is {_show(cells, row)}, "
            "which does not parse as a date; fix the cell (e.g. 2020-01-31 13:00)"
        )
    index = pd.DatetimeIndex(parsed, name=column)
    _check_chronological(index, column, shown)
    return index


def _to_datetimes(cells: pd.Series) -> pd.Series:
    """ISO 8601 first (fast and unambiguous), else pandas' format inference; failures -> NaT."""
    best: pd.Series | None = None
    for fmt in ("ISO8601", None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "could not infer format" on fallback
            try:
                parsed = pd.to_datetime(cells, format=fmt, errors="coerce")
            except ValueError:  # mixed time zones: put every timestamp on one clock
                parsed = pd.to_datetime(cells, format=fmt, errors="coerce", utc=True)
        if best is None or parsed.isna().sum() < best.isna().sum():
            best = parsed
        if not best.isna().any():
            break
    return best


def _check_chronological(index: pd.DatetimeIndex, column: str, shown: str) -> None:
    """Windows assume one row per step in time order: duplicates or a step back are errors."""
    duplicated = np.asarray(index.duplicated())
    if duplicated.any():
        later = int(np.argmax(duplicated))
        earlier = int(np.argmax(index == index[later]))
        raise UserError(
            f"{shown}: timestamp {index[later]} in column {column!r} appears in data rows "
            f"{earlier + 1} and {later + 1}; remove or aggregate the duplicate rows"
        )
    back = np.flatnonzero(index[1:] < index[:-1])
    if back.size:
        row = int(back[0]) + 1
        raise UserError(
            f"{shown}: column {column!r} data row {row + 1} ({index[row]}) is earlier than data "
            f"row {row} ({index[row - 1]}); sort the file by {column!r}"
        )


def _numeric_column(column: pd.Series, name: str, shown: str, required: bool) -> np.ndarray | None:
    """The column as float64, or None for a text column that was not asked for by name.

    A column counts as numeric when most of its non-missing cells are numbers; then any text
    cell is a typo to report, not a reason to drop the column silently.
    """
    numbers, missing = _cells_as_numbers(column)
    if missing.all():
        raise UserError(
            f"{shown}: column {name!r} is empty (no value in any row); delete it or leave "
            "it out with --columns"
        )
    text = ~missing & np.isnan(numbers)
    if text.any():
        if not required and 2 * text.sum() >= (~missing).sum():
            return None
        row = int(np.argmax(text))
        raise UserError(
            f"{shown}: column {name!r} data row {row + 1} holds {_show(column, row)}, which "
            "is not a number; fix the cell or leave the column out with --columns"
        )
    if missing.any():
        row = int(np.argmax(missing))
        raise UserError(
            f"{shown}: column {name!r} data row {row + 1} is missing (empty or NaN); fill it "
            "(e.g. interpolate) or delete the row"
        )
    infinite = np.isinf(numbers)
    if infinite.any():
        row = int(np.argmax(infinite))
        raise UserError(
            f"{shown}: column {name!r} data row {row + 1} is infinite ({_show(column, row)}); "
            "replace it with a finite number"
        )
    return numbers


def _cells_as_numbers(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Values (NaN where not a number) and a mask of missing cells (empty, NaN, NA, null...).

    Columns pandas already parsed as numbers take the fast path; the rest are text cells.
    """
    if column.dtype.kind in "fiu":
        numbers = column.to_numpy(dtype=np.float64)
        return numbers, np.isnan(numbers)
    cells = column.astype(str).str.strip()
    missing = cells.str.lower().isin(_MISSING).to_numpy()
    numbers = pd.to_numeric(cells.mask(missing), errors="coerce").to_numpy(dtype=np.float64)
    return numbers, missing


def _show(column: pd.Series, row: int) -> str:
    """A cell quoted and shortened for a one-line message (repr escapes any newline)."""
    cell = str(column.iloc[row]).strip()
    return repr(cell if len(cell) <= 40 else cell[:37] + "...")


def _check_not_constant(kept: dict[str, np.ndarray], shown: str) -> None:
    """A constant column has no signal to forecast and no scale; ask for it to be left out."""
    constant = [name for name, numbers in kept.items() if np.all(numbers == numbers[0])]
    if not constant:
        return
    varying = [name for name in kept if name not in constant]
    if not varying:
        raise UserError(
            f"{shown}: every column is constant ({_names(constant)}), so there is nothing to "
            "forecast; give a file with at least one column that varies over the rows"
        )
    if len(varying) <= _SHOW_NAMES:
        fix = f"leave it out with --columns {','.join(varying)}"
    else:
        fix = f"leave it out by naming the {len(varying)} varying columns in --columns"
    first = constant[0]
    raise UserError(
        f"{shown}: column {first!r} is constant (every value is {kept[first][0]:g}), so it "
        f"carries no signal; {fix}"
    )


def _infer_frequency(index: pd.DatetimeIndex | None) -> str | None:
    """pandas' frequency string for a regular index (e.g. "D", "h"), else None.

    Asked through `freq="infer"` rather than `pd.infer_freq`, whose return type changes in
    pandas 4 (a warning in pandas 3) while `freqstr` stays a string.
    """
    if index is None:
        return None
    return pd.DatetimeIndex(index, freq="infer").freqstr
