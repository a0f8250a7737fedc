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

Timestamps must be unique, increasing and on one regular grid (a fixed step such as 1h, or a
calendar one such as business days or month starts). Rows missing from the grid (weekends,
holidays, sensor outages) are accepted while at most 10% of the grid's steps lack a row, and
noted in `SeriesData.source`; a row off the grid (a 30-minute row in an hourly file) is an
error, because forecasting windows count rows, not time.

Memory: the file is checked as a stream of blocks and parsed `_CHUNK_CELLS` cells at a time,
each chunk converted to float64 at once, so a large file costs about twice its numeric
output (the columns, then the stacked array), not several copies of its text.
"""

from __future__ import annotations

import codecs
import difflib
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphnas.data.series import SeriesData
from morphnas.errors import UserError

_TIME_NAMES = frozenset({"date", "time", "timestamp", "datetime"})
_MISSING = frozenset({"", "nan", "+nan", "-nan", "na", "n/a", "#n/a", "null", "none"})
_SHOW_NAMES = 20  # how many column names an error message lists before abbreviating
_BLOCK_BYTES = 1 << 20  # the byte check reads the file in blocks of this size
_CHUNK_CELLS = 1_000_000  # cells parsed at once: bounds the text pandas holds in memory
_OTHER_SEPARATORS = {";": "semicolons", "\t": "tabs", "|": "bars"}
# A regular grid may miss at most this fraction of its steps (weekends, holidays, outages);
# sparser timestamps are irregular samples, not a series with gaps.
_MAX_MISSING_FRACTION = 0.1
_CALENDAR_FREQS = ("B", "MS", "ME", "QS", "QE", "YS", "YE")
_MAGIC = (
    (b"\x1f\x8b", "is gzip-compressed; decompress it first (gunzip)"),
    (b"PK\x03\x04", "is a ZIP archive (an Excel .xlsx workbook?); export the sheet as CSV"),
    (b"\x89PNG", "is a PNG image, not a CSV file; give the path of the CSV file"),
    (b"%PDF", "is a PDF document, not a CSV file; give the path of the CSV file"),
)


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
    file = Path(path)
    _check_bytes(file, shown)
    first = _first_row(file, shown)
    has_header = not (any(c != "" for c in first) and all(c == "" or _is_number(c) for c in first))
    names = _header_names(first, shown) if has_header else [str(i) for i in range(len(first))]
    wanted = _check_selection(names, shown, has_header, time_col, columns)
    if time_col is not None:
        time_names = [time_col]
    else:
        time_names = [n for n in names if n.lower() in _TIME_NAMES and n not in (wanted or [])]
    # Date-named columns are parsed as timestamps only; one that turns out not to hold dates
    # is read again as values below (rare), which keeps the common case to a single pass.
    value_names = wanted or [n for n in names if n not in time_names]
    table = _read_columns(file, shown, has_header, names, value_names, time_names)
    if table.rows < 2:
        empty = has_header and table.rows == 0
        what = "a header line but no data rows" if empty else f"{table.rows} data row(s)"
        raise UserError(
            f"{shown} has {what}; a series needs at least 2 rows (one row per time step)"
        )
    index, time_name = _find_index(table, shown, time_col, time_names)
    n_rows = table.rows
    candidates = wanted or [c for c in names if c != time_name]
    late = [c for c in candidates if c not in table.values]
    if late:
        table.values.update(_read_columns(file, shown, has_header, names, late, []).values)
    kept: dict[str, np.ndarray] = {}
    for name in candidates:  # popped: each column's parsed pieces are dropped once joined
        column = table.values.pop(name).result(name, shown, required=wanted is not None)
        if column is not None:
            kept[name] = column
        column = None
    if not kept:
        raise UserError(_no_numbers_message(names, first, shown))
    _check_not_constant(kept, shown)
    dropped = [c for c in candidates if c not in kept]
    note = f"; left out non-numeric columns {_names(dropped)}" if dropped else ""
    frequency, gaps = _check_spacing(index, time_name, shown) if index is not None else (None, "")
    kept_names = tuple(kept)
    values = np.empty((n_rows, len(kept)), dtype=np.float64)
    for j, name in enumerate(kept_names):
        values[:, j] = kept.pop(name)  # free each column once copied: peak stays ~2x the output
    return SeriesData(
        name=file.stem,
        values=values,
        columns=kept_names,
        index=index,
        frequency=frequency,
        source=f"CSV file {shown}{note}{gaps}",
        licence="user data (licence unknown to morphnas)",
    )


# --- the file as bytes -----------------------------------------------------------------------


def _check_bytes(path: Path, shown: str) -> None:
    """Refuse what is not UTF-8 text before pandas sees it, reading one block at a time.

    pandas would report a binary or mis-encoded file as a tokenizer error (or, for NUL bytes,
    silently cut lines short), so the file is streamed once here: known binary formats by their
    first bytes, a NUL byte, or an invalid UTF-8 sequence are each named with their line.
    """
    if not path.exists():
        raise UserError(
            f"CSV file not found: {shown}; check the path (working directory: {Path.cwd()})"
        )
    if path.is_dir():
        raise UserError(f"{shown} is a directory, not a CSV file; give the path of the file")
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    lines, blank, head = 1, True, True
    try:
        with path.open("rb") as handle:
            while block := handle.read(_BLOCK_BYTES):
                if head:
                    for magic, what in _MAGIC:
                        if block.startswith(magic):
                            raise UserError(f"{shown} {what}")
                    head = False
                nul = block.find(b"\x00")
                if nul >= 0:
                    line = lines + block[:nul].count(b"\n")
                    raise UserError(
                        f"{shown} looks like a binary file, not CSV text (NUL byte on line "
                        f"{line}); give a comma-separated text file"
                    )
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(block)
                except UnicodeDecodeError as err:
                    at = max(0, err.start - pending)
                    line = lines + block[:at].count(b"\n")
                    raise UserError(
                        f"{shown} is not UTF-8 text (byte 0x{err.object[err.start]:02x} on line "
                        f"{line}); save it as UTF-8 CSV"
                    ) from None
                blank = blank and not text.strip()
                lines += block.count(b"\n")
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise UserError(
                    f"{shown} is not UTF-8 text (it ends inside a multi-byte character on line "
                    f"{lines}); save it as UTF-8 CSV"
                ) from None
    except OSError as err:
        raise UserError(
            f"cannot read {shown}: {err.strerror or err}; check that the file is readable"
        ) from None
    if blank:
        raise UserError(f"{shown} is empty; give a CSV file with one row per time step")


def _first_row(path: Path, shown: str) -> list[str]:
    """The first non-blank line's fields, as written (decides header or not, and the width)."""
    frame = _parse(path, shown, header=None, nrows=1, dtype=str)
    if frame.empty:
        raise UserError(f"{shown} is empty; give a CSV file with one row per time step")
    return [str(c).strip() for c in frame.iloc[0]]


def _parse(path: Path, shown: str, **options: Any) -> Any:
    """pandas' CSV reader with every cell kept as written (no NaN guessing) and blank lines
    skipped; a ragged row or broken quoting becomes a UserError."""
    try:
        return pd.read_csv(
            path, encoding="utf-8-sig", na_filter=False, skip_blank_lines=True, **options
        )
    except pd.errors.ParserError as err:
        raise UserError(_parser_message(err, shown)) from None
    except (pd.errors.EmptyDataError, ValueError, OverflowError) as err:
        raise UserError(_parse_failure(err, shown)) from None


def _parser_message(err: Exception, shown: str) -> str:
    """Turn pandas' ragged-row error into one line that names the line and the fix."""
    found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
    if found:
        expected, line, saw = found.groups()
        return (
            f"{shown}: line {line} has {saw} comma-separated fields but the first line has "
            f"{expected}; give every row the same number of fields (quote cells that contain "
            "commas)"
        )
    return _parse_failure(err, shown)


def _parse_failure(err: Exception, shown: str) -> str:
    reason = " ".join(str(err).split()).removeprefix("Error tokenizing data. ")
    return f"{shown} could not be parsed as CSV ({reason}); check its quoting and separators"


# --- the cells, chunk by chunk -----------------------------------------------------------------


@dataclass
class _Numbers:
    """One value column, accumulated over chunks: float64 pieces and the first bad cells."""

    pieces: list[np.ndarray] = field(default_factory=list)
    rows: int = 0
    n_missing: int = 0
    n_text: int = 0
    first_missing: int | None = None
    first_text: tuple[int, str] | None = None
    first_inf: tuple[int, str] | None = None

    def add(self, column: pd.Series, offset: int) -> None:
        numbers, missing = _cells_as_numbers(column)
        text = ~missing & np.isnan(numbers)
        self.n_missing += int(missing.sum())
        self.n_text += int(text.sum())
        if self.first_missing is None and missing.any():
            self.first_missing = offset + int(np.argmax(missing))
        if self.first_text is None and text.any():
            row = int(np.argmax(text))
            self.first_text = (offset + row, _show(column, row))
        infinite = np.isinf(numbers)
        if self.first_inf is None and infinite.any():
            row = int(np.argmax(infinite))
            self.first_inf = (offset + row, _show(column, row))
        self.pieces.append(numbers)
        self.rows += len(numbers)

    def result(self, name: str, shown: str, required: bool) -> np.ndarray | None:
        """The column as float64, or None for a text column that was not asked for by name.

        A column counts as numeric when most of its non-missing cells are numbers; then any
        text cell is a typo to report, not a reason to drop the column silently.
        """
        present = self.rows - self.n_missing
        if present == 0:
            raise UserError(
                f"{shown}: column {name!r} is empty (no value in any row); delete it or leave "
                "it out with --columns"
            )
        if self.first_text is not None:
            if not required and 2 * self.n_text >= present:
                return None
            row, cell = self.first_text
            raise UserError(
                f"{shown}: column {name!r} data row {row + 1} holds {cell}, which is not a "
                "number; fix the cell or leave the column out with --columns"
            )
        if self.first_missing is not None:
            raise UserError(
                f"{shown}: column {name!r} data row {self.first_missing + 1} is missing (empty "
                "or NaN); fill it (e.g. interpolate) or delete the row"
            )
        if self.first_inf is not None:
            row, cell = self.first_inf
            raise UserError(
                f"{shown}: column {name!r} data row {row + 1} is infinite ({cell}); replace it "
                "with a finite number"
            )
        numbers = np.concatenate(self.pieces) if len(self.pieces) != 1 else self.pieces[0]
        self.pieces = []
        return numbers


@dataclass
class _Times:
    """One candidate time column, accumulated over chunks: parsed pieces and bad cells."""

    pieces: list[pd.Series] = field(default_factory=list)
    rows: int = 0
    n_bad: int = 0
    first_bad: tuple[int, str] | None = None

    def add(self, column: pd.Series, offset: int) -> None:
        cells = column.astype(str)
        parsed = _to_datetimes(cells)
        if parsed.isna().any():  # stripping is slow, so only when a cell did not parse as is
            cells = cells.str.strip()
            parsed = _to_datetimes(cells)
        bad = parsed.isna().to_numpy()
        self.n_bad += int(bad.sum())
        if self.first_bad is None and bad.any():
            row = int(np.argmax(bad))
            self.first_bad = (offset + row, _show(cells, row))
        self.pieces.append(parsed.reset_index(drop=True))
        self.rows += len(parsed)

    def index(self, name: str) -> pd.DatetimeIndex:
        joined = (
            pd.concat(self.pieces, ignore_index=True) if len(self.pieces) > 1 else self.pieces[0]
        )
        self.pieces = []
        if joined.dtype == object:  # chunks on different clocks: put every timestamp on UTC
            joined = pd.to_datetime(joined, utc=True)
        return pd.DatetimeIndex(joined, name=name)


@dataclass
class _Table:
    """What one pass over the file gathered: the row count and the per-column accumulators."""

    rows: int
    values: dict[str, _Numbers]
    times: dict[str, _Times]


def _read_columns(
    path: Path,
    shown: str,
    has_header: bool,
    names: list[str],
    value_names: Sequence[str],
    time_names: Sequence[str],
) -> _Table:
    """Parse the file in chunks, converting each value column to float64 and each candidate
    time column to timestamps as it goes, so no chunk's text outlives its conversion."""
    values = {name: _Numbers() for name in value_names}
    times = {name: _Times() for name in time_names}
    rows = 0
    chunk_rows = max(1000, _CHUNK_CELLS // max(1, len(names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.ParserWarning)
        warnings.simplefilter("ignore", pd.errors.DtypeWarning)
        for chunk in _chunks(path, shown, has_header, names, chunk_rows):
            for name, numbers in values.items():
                numbers.add(chunk[name], rows)
            for name, stamps in times.items():
                stamps.add(chunk[name], rows)
            rows += len(chunk)
    return _Table(rows, values, times)


def _chunks(
    path: Path, shown: str, has_header: bool, names: list[str], chunk_rows: int
) -> Iterator[pd.DataFrame]:
    """The data rows under their column names, `chunk_rows` at a time."""
    reader = _parse(
        path,
        shown,
        header=0 if has_header else None,
        names=names,
        index_col=False,
        chunksize=chunk_rows,
    )
    with reader:
        while True:
            try:
                chunk = next(reader)
            except StopIteration:
                return
            except pd.errors.ParserError as err:
                raise UserError(_parser_message(err, shown)) from None
            except (ValueError, OverflowError) as err:
                raise UserError(_parse_failure(err, shown)) from None
            yield chunk


def _no_numbers_message(names: list[str], first: list[str], shown: str) -> str:
    """No numeric column: most often a file split by another separator, read as one column."""
    if len(names) == 1:
        line = first[0]
        for sep, what in _OTHER_SEPARATORS.items():
            if sep in line:
                return (
                    f"{shown} reads as a single column ({_show(pd.Series([line]), 0)}): it "
                    f"seems to be separated by {what}, not commas; save it as comma-separated "
                    f"CSV (pandas: pd.read_csv(path, sep={sep!r}).to_csv(out, index=False))"
                )
    return (
        f"{shown} has no numeric columns (columns: {_names(names)}); "
        "give a CSV with one numeric column per series"
    )


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
    available: list[str],
    shown: str,
    has_header: bool,
    time_col: str | None,
    columns: Sequence[str] | None,
) -> list[str] | None:
    """Check that `time_col` and `columns` name existing columns; return the chosen columns."""
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


# --- timestamps ------------------------------------------------------------------------------


def _find_index(
    table: _Table, shown: str, time_col: str | None, time_names: Sequence[str]
) -> tuple[pd.DatetimeIndex | None, str | None]:
    """The timestamps and the name of their column: `time_col`, else a date-named column.

    A date-named column found automatically counts only when most of its cells parse (else it
    is an ordinary column); then, as for `--time-col`, every cell must parse and the timestamps
    must be strictly increasing, because the rows must be chronological.
    """
    for name in time_names:
        stamps = table.times[name]
        explicit = name == time_col
        if not explicit and 2 * stamps.n_bad >= stamps.rows:
            continue
        if stamps.first_bad is not None:
            row, cell = stamps.first_bad
            raise UserError(
                f"{shown}: time column {name!r} data row {row + 1} is {cell}, which does not "
                "parse as a date; fix the cell (e.g. 2020-01-31 13:00)"
            )
        index = stamps.index(name)
        _check_chronological(index, name, shown)
        return index, name
    return None, None


def _to_datetimes(cells: pd.Series) -> pd.Series:
    """ISO 8601 first (fast and unambiguous), else pandas' format inference; failures -> NaT."""
    best: pd.Series | None = None
    for fmt in ("ISO8601", None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "could not infer format" on fallback
            try:
                parsed = pd.to_datetime(cells, format=fmt, errors="coerce")
            except (ValueError, OverflowError):  # mixed time zones: put them on one clock
                parsed = pd.to_datetime(cells, format=fmt, errors="coerce", utc=True)
        if best is None or parsed.isna().sum() < best.isna().sum():
            best = parsed
        if not best.isna().any():
            break
    return best


def _check_chronological(index: pd.DatetimeIndex, column: str, shown: str) -> None:
    """Windows assume one row per step in time order: duplicates or a step back are errors.

    Unsorted rows are refused rather than sorted: a step back usually means files were pasted
    together or a column was mislabelled, and sorting would hide that; the fix is one command.
    """
    steps = np.diff(_clock(index))
    if (steps > np.timedelta64(0)).all():  # the usual case, checked without a hash table
        return
    duplicated = np.asarray(index.duplicated())
    if duplicated.any():
        later = int(np.argmax(duplicated))
        earlier = int(np.argmax(index == index[later]))
        raise UserError(
            f"{shown}: timestamp {index[later]} in column {column!r} appears in data rows "
            f"{earlier + 1} and {later + 1}; remove or aggregate the duplicate rows "
            f"(pandas: df.groupby({column!r}).mean())"
        )
    back = np.flatnonzero(index[1:] < index[:-1])
    if back.size:
        row = int(back[0]) + 1
        raise UserError(
            f"{shown}: column {column!r} data row {row + 1} ({index[row]}) is earlier than data "
            f"row {row} ({index[row - 1]}); sort the file by {column!r} "
            f"(pandas: df.sort_values({column!r}))"
        )


def _check_spacing(index: pd.DatetimeIndex, column: str, shown: str) -> tuple[str | None, str]:
    """The index's frequency and a note on missing steps; an error for mixed frequencies.

    Forecasting windows count rows, so every row must sit on one grid: a fixed step (the most
    common spacing) or a calendar frequency (business days, months, quarters, years). Rows
    missing from the grid are tolerated up to `_MAX_MISSING_FRACTION` of its steps and noted;
    a row off every grid means two frequencies are mixed, which no window can absorb.
    """
    stamps = _clock(index)
    if len(index) < 3:
        return _fixed_frequency(stamps[1] - stamps[0]), ""
    inferred = _infer_frequency(index)
    if inferred is not None:
        return inferred, ""
    values, counts = np.unique(np.diff(stamps), return_counts=True)
    step = values[int(np.argmax(counts))]
    offsets = stamps - stamps[0]
    off_grid = np.flatnonzero(offsets % step)
    fits: list[tuple[int, str, np.ndarray]] = []  # (missing steps, frequency, grid positions)
    if not off_grid.size:
        positions = offsets // step
        fits.append((int(positions[-1]) + 1 - len(index), _fixed_frequency(step), positions))
    for freq in _CALENDAR_FREQS:
        try:
            grid = pd.date_range(index[0], index[-1], freq=freq)
        except (ValueError, OverflowError):  # beyond the calendar pandas can count
            continue
        positions = grid.get_indexer(index)
        if len(grid) >= len(index) and (positions >= 0).all():
            fits.append((len(grid) - len(index), freq, positions))
    if not fits:
        row = int(off_grid[0])
        usual = _fixed_frequency(step)
        raise UserError(
            f"{shown}: column {column!r} data row {row + 1} ({index[row]}) comes "
            f"{_duration(stamps[row] - stamps[row - 1])} after data row {row}, off the "
            f"{_duration(step)} spacing of most rows; resample the file to one frequency "
            f"(pandas: df.resample({usual!r}, on={column!r}).mean())"
        )
    missing, freq, positions = min(fits, key=lambda fit: fit[0])
    if missing == 0:
        return freq, ""
    total = missing + len(index)
    if missing > _MAX_MISSING_FRACTION * total:
        raise UserError(
            f"{shown}: column {column!r} is irregular: {missing} of the {total} {freq} steps "
            f"from {index[0]} to {index[-1]} have no row (at most "
            f"{_MAX_MISSING_FRACTION:.0%} may); resample the file to one frequency "
            f"(pandas: df.resample({freq!r}, on={column!r}).mean().interpolate())"
        )
    first = int(np.flatnonzero(np.diff(positions) > 1)[0]) + 1
    return (
        freq,
        f"; {missing} of {total} {freq} steps have no row, the first after data row {first}",
    )


def _clock(index: pd.DatetimeIndex) -> np.ndarray:
    """The timestamps as datetime64 (UTC for a zone-aware index), not an array of objects."""
    return (index.tz_convert(None) if index.tz is not None else index).to_numpy()


def _fixed_frequency(step: Any) -> str:
    """A fixed step as pandas writes it ("h", "30min", "D"); a step too long for a pandas
    frequency (centuries, only in odd files) as plain text, since it is only shown."""
    delta = pd.Timedelta(step)
    try:
        return str(pd.tseries.frequencies.to_offset(delta).freqstr)
    except (ValueError, OverflowError):  # OutOfBoundsTimedelta is a ValueError
        return str(delta)


def _duration(step: Any) -> str:
    """A fixed step for people: "1h" rather than pandas' bare "h"."""
    text = _fixed_frequency(step)
    return text if text[0].isdigit() else f"1{text}"


def _infer_frequency(index: pd.DatetimeIndex) -> str | None:
    """pandas' frequency string for a regular index (e.g. "D", "h"), else None.

    Asked through `freq="infer"` rather than `pd.infer_freq`, whose return type changes in
    pandas 4 (a warning in pandas 3) while `freqstr` stays a string.
    """
    try:
        return pd.DatetimeIndex(index, freq="infer").freqstr
    except (ValueError, TypeError):
        return None


# --- cells -----------------------------------------------------------------------------------


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
