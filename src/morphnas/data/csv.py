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
Fields are split on commas, or on semicolons or tabs when the first rows split evenly on those
and not on commas (an Excel export where the comma is the decimal mark: `date;a` /
`2020-01-01 00:00;1,5`); the separator is noted in `source`.
Columns that are mostly text (labels, ids) are left out unless named in `columns`.

No column is dropped or rewritten silently: the returned `SeriesData` carries a
`columns_report` attribute, a tuple of `ColumnNote` (name, role "used"/"time"/"dropped",
one-line reason) in file order, and every drop or conversion is also noted in `source`. Cells
in another notation are converted when one reading fits the whole column: quoted decimal
commas ("1,5", "1.234,5"), thousands separators ("1,234.5", "1 234") and booleans
(true/false, yes/no -> 1/0); a column whose reading is ambiguous ("1,234" alone) or mixed is
refused by name. Without a time column, a column of strictly increasing integers that are
unix-epoch seconds or milliseconds in 1990..2100 is taken as the time column, not modelled
(name it in `columns` to model it). UTF-8 (with or without a BOM) and UTF-16 with a BOM are
read; FIFOs, devices, sockets and symlink loops are refused before being opened.

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
import csv
import difflib
import errno
import io
import os
import re
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphnas.data.series import SeriesData
from morphnas.errors import LINK_LOOP, UserError, dangling_link

_TIME_NAMES = frozenset({"date", "time", "timestamp", "datetime"})
_MISSING = frozenset({"", "nan", "+nan", "-nan", "na", "n/a", "#n/a", "null", "none"})
_SHOW_NAMES = 20  # how many column names an error message lists before abbreviating
_BLOCK_BYTES = 1 << 20  # the byte check reads the file in blocks of this size
_CHUNK_CELLS = 1_000_000  # cells parsed at once: bounds the text pandas holds in memory
_OTHER_SEPARATORS = {";": "semicolons", "\t": "tabs", "|": "bars"}
_SNIFF_CHARS = 1 << 16  # the separator is guessed from the lines in this much text
_SNIFF_ROWS = 50
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
    fill: str = "none",
    max_fill: float = 0.2,
) -> SeriesData:
    """Read, validate and convert a CSV file of one row per time step.

    `time_col` names the timestamp column (else one named like a date is used if it parses);
    `columns` picks the value columns (else every numeric column except the time column); a
    single string is read as a comma-separated list, as on the command line ("a,c"), rather
    than as a sequence of one-letter names. `fill` ("interpolate" or "ffill"; "none" refuses
    gaps as described above) puts the rows on their regular grid and fills the missing
    timestamps and empty cells, refusing a file where more than `max_fill` of the rows need
    it (see `_fill_gaps`). Raises `UserError` naming the file, column and data row of the
    first problem found.
    """
    if fill not in FILL_METHODS:
        raise ValueError(f"fill must be one of {FILL_METHODS}, got {fill!r}")
    shown = str(path)
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",")]
    file = Path(path)
    _check_file(file, shown)
    encoding = _check_bytes(file, shown)
    sep = _separator(file, encoding)
    first = _first_row(file, shown, encoding, sep)
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
    layout = _Layout(file, shown, encoding, sep, has_header, names)
    table = _read_columns(layout, value_names, time_names)
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
        late_table = _read_columns(layout, late, [])
        table.values.update(late_table.values)
    report: dict[str, ColumnNote] = {}
    if time_name is not None:
        how = "given as --time-col" if time_name == time_col else "found by its name"
        report[time_name] = ColumnNote(time_name, "time", f"timestamps ({how})")
    kept: dict[str, np.ndarray] = {}
    for name in candidates:  # popped: each column's parsed pieces are dropped once joined
        numbers = table.values.pop(name)
        column = numbers.result(name, shown, wanted is not None, fill != "none")
        if column is not None:
            kept[name] = column
            report[name] = ColumnNote(name, "used", numbers.note or "numbers", bool(numbers.note))
        else:
            report[name] = ColumnNote(name, "dropped", f"not numeric ({numbers.why_text()})")
        column = None
    if not kept:
        raise UserError(_no_numbers_message(names, first, shown))
    if index is None and wanted is None:
        found = _epoch_column(kept, shown)
        if found is not None:
            time_name, index, unit = found
            del kept[time_name]
            report[time_name] = ColumnNote(
                time_name, "time", f"unix-epoch {unit} (integers), used as the time column", True
            )
            if not kept:
                raise UserError(
                    f"{shown}: column {time_name!r} holds unix-epoch {unit}, taken as the time "
                    "column, and no other column holds numbers; give at least one value column"
                )
    kept_names = tuple(kept)
    values = np.empty((n_rows, len(kept)), dtype=np.float64)
    for j, name in enumerate(kept_names):
        values[:, j] = kept.pop(name)  # free each column once copied: peak stays ~2x the output
    frequency, gaps, grid = (
        _check_spacing(index, time_name, shown, fill) if index is not None else (None, "", None)
    )
    filled = None
    if fill != "none" and (grid is not None or np.isnan(values).any()):
        index, values, filled = _fill_gaps(index, grid, values, fill, max_fill, shown)
        if index is not None:  # the grid's own name ("D", not the step's "24h")
            frequency = _infer_frequency(index) or frequency
        gaps = f"; {filled.line()}"
        warnings.warn(f"{shown}: {filled.line()}", stacklevel=2)
    _check_not_constant(dict(zip(kept_names, values.T, strict=True)), shown)
    dropped = [c for c in candidates if c not in kept_names and c != time_name]
    note = f"; fields separated by {_OTHER_SEPARATORS[sep]}" if sep != "," else ""
    if sep != ",":  # said once, as the columns are: a person should know how the file was read
        warnings.warn(f"{shown}: fields separated by {_OTHER_SEPARATORS[sep]}", stacklevel=2)
    note += f"; left out non-numeric columns {_names(dropped)}" if dropped else ""
    converted = [n for n in report.values() if n.role != "dropped" and n.converted]
    note += "".join(f"; column {n.name!r}: {n.reason}" for n in converted)
    data = SeriesData(
        name=file.stem,
        values=values,
        columns=kept_names,
        index=index,
        frequency=frequency,
        source=f"CSV file {shown}{note}{gaps}",
        licence="user data (licence unknown to morphnas)",
    )
    # SeriesData is a frozen dataclass owned elsewhere: the report rides along as an attribute.
    object.__setattr__(data, "columns_report", tuple(report[n] for n in names if n in report))
    object.__setattr__(data, "fill_report", filled)
    return data


FILL_METHODS = ("none", "interpolate", "ffill")


@dataclass(frozen=True)
class FillReport:
    """What `load_csv(fill=...)` filled: `rows_added` timestamps missing from the grid,
    `cells_filled` empty cells in rows the file has, and `rows_filled` (rows holding any filled
    value, added or not) out of `rows` after filling."""

    method: str
    rows_added: int
    cells_filled: int
    rows_filled: int
    rows: int

    def line(self) -> str:
        """One line such as `filled 12 of 240 rows (5.0%) by time interpolation: ...`."""
        how = "time interpolation" if self.method == "interpolate" else "forward fill"
        return (
            f"filled {self.rows_filled} of {self.rows} rows ({self.rows_filled / self.rows:.1%}) "
            f"by {how}: {self.rows_added} missing timestamps, {self.cells_filled} empty cells"
        )

    def summary(self) -> dict[str, Any]:
        """The counts for a run's summary, with the one-line account."""
        return {**asdict(self), "note": self.line()}


@dataclass(frozen=True)
class ColumnNote:
    """What `load_csv` did with one column of the file, for a person to read.

    `role` is "used" (a value column, modelled), "time" (the timestamps) or "dropped" (left
    out, with why); `reason` is one line, e.g. "booleans true/false read as 1/0" or "not
    numeric (text such as 'x' in data row 1)". `converted` is True when cells were rewritten
    (decimal commas, thousands separators, booleans, epoch integers) rather than read as written.
    """

    name: str
    role: str
    reason: str
    converted: bool = False

    def line(self) -> str:
        """One line such as `column 'a': used, numbers`."""
        return f"column {self.name!r}: {self.role}, {self.reason}"


# --- the file as bytes -----------------------------------------------------------------------


def _check_file(path: Path, shown: str) -> None:
    """Refuse what is not a regular file before it is opened: opening a FIFO for reading
    blocks until a writer comes (a hang), and a device may never end."""
    try:
        info = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{shown} {LINK_LOOP}; point --csv at the real file") from None
        if err.errno != errno.ENOENT:
            raise UserError(
                f"cannot read {shown}: {err.strerror or err}; check that the file is readable"
            ) from None
        if dangling := dangling_link(path):
            raise UserError(
                f"{shown} {dangling}; fix the link or give the path of the file"
            ) from None
        raise UserError(
            f"CSV file not found: {shown}; check the path (working directory: {Path.cwd()})"
        ) from None
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise UserError(f"{shown} is a directory, not a CSV file; give the path of the file")
    if stat.S_ISREG(mode):
        return
    if stat.S_ISFIFO(mode):
        what = "a named pipe (FIFO)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        what = "a device"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    else:
        what = "not a regular file"
    raise UserError(
        f"{shown} is {what}, not a regular file, so it is not read (it could wait forever); "
        "save the data to a CSV file and give its path"
    )


def _check_bytes(path: Path, shown: str) -> str:
    """Refuse what is not UTF-8 or UTF-16 text before pandas sees it, one block at a time;
    return the encoding to read it with ("utf-8-sig" or "utf-16").

    pandas would report a binary or mis-encoded file as a tokenizer error (or, for NUL bytes,
    silently cut lines short), so the file is streamed once here: known binary formats by their
    first bytes, a NUL byte, or an invalid UTF-8 sequence are each named with their line. A
    UTF-16 file with a byte-order mark is read; one without (NUL bytes between the letters) and
    UTF-32 are refused by name.
    """
    try:
        with path.open("rb") as handle:
            start = handle.read(4)
    except OSError as err:
        raise UserError(
            f"cannot read {shown}: {err.strerror or err}; check that the file is readable"
        ) from None
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32")):
        if start.startswith(bom):
            raise UserError(f"{shown} is {name} text; save it as UTF-8 CSV")
    utf16 = start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    if not utf16 and len(start) >= 4 and (start[1::2] == b"\0\0" or start[0::2] == b"\0\0"):
        raise UserError(
            f"{shown} looks like UTF-16 text without a byte-order mark; save it as UTF-8 CSV"
        )
    encoding = "utf-16" if utf16 else "utf-8-sig"
    decoder = codecs.getincrementaldecoder(encoding)()
    lines, blank, head = 1, True, True
    try:
        with path.open("rb") as handle:
            while block := handle.read(_BLOCK_BYTES):
                if head:
                    for magic, what in _MAGIC:
                        if block.startswith(magic):
                            raise UserError(f"{shown} {what}")
                    head = False
                nul = -1 if utf16 else block.find(b"\x00")
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
                    if utf16:
                        raise UserError(
                            f"{shown} starts with a UTF-16 byte-order mark but is not valid "
                            "UTF-16 text; save it as UTF-8 CSV"
                        ) from None
                    at = max(0, err.start - pending)
                    line = lines + block[:at].count(b"\n")
                    byte = err.object[err.start]
                    raise UserError(
                        f"{shown} is not UTF-8 text (byte 0x{byte:02x} on line {line}"
                        f"{_guess_encoding(block)}); save it as UTF-8 CSV"
                    ) from None
                if utf16 and "\0" in text:
                    line = lines + text[: text.index("\0")].count("\n")
                    raise UserError(
                        f"{shown} looks like a binary file, not CSV text (NUL character on line "
                        f"{line}); give a comma-separated text file"
                    )
                blank = blank and not text.strip()
                lines += text.count("\n") if utf16 else block.count(b"\n")
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                if utf16:
                    raise UserError(
                        f"{shown} is UTF-16 text cut off inside a character; save it as UTF-8 CSV"
                    ) from None
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
    return encoding


def _guess_encoding(block: bytes) -> str:
    """A hint for a refused byte: Windows-1252/Latin-1 when the bytes decode as that."""
    try:
        block.decode("cp1252")
    except UnicodeDecodeError:
        return ""
    return "; it looks like Windows-1252 or Latin-1 text"


def _separator(path: Path, encoding: str) -> str:
    """The field separator: a comma, unless the first rows split into one same number (above
    one) of fields on a semicolon or a tab and not on commas, as in an Excel export from a
    locale whose decimal mark is the comma (`date;a` / `2020-01-01 00:00;1,5`). Quoted fields
    are respected. Failing that, a first line with no comma but a semicolon or tab between
    fields picks that one (so a ragged row is reported by line); else commas."""
    try:
        with path.open(encoding=encoding, newline="") as handle:
            text = handle.read(_SNIFF_CHARS)
            if handle.read(1):  # more follows: drop the last, maybe partial, line
                text = text[: text.rfind("\n") + 1]
    except (OSError, UnicodeError):
        return ","
    widths: dict[str, list[int]] = {}
    for sep in (",", ";", "\t"):
        found: list[int] = []
        widths[sep] = found
        try:
            reader = csv.reader(io.StringIO(text), delimiter=sep, quotechar='"')
            for row in reader:
                if any(cell.strip() for cell in row):
                    found.append(len(row))
                    if len(set(found)) > 1 or reader.line_num > _SNIFF_ROWS:
                        break
        except csv.Error:
            continue
        if len(set(found)) == 1 and found[0] > 1:
            return sep
    if widths[","][:1] == [1]:
        for sep in (";", "\t"):
            if widths[sep][:1] and widths[sep][0] > 1:
                return sep
    return ","


def _first_row(path: Path, shown: str, encoding: str, sep: str = ",") -> list[str]:
    """The first non-blank line's fields, as written (decides header or not, and the width)."""
    frame = _parse(path, shown, encoding, header=None, nrows=1, dtype=str, sep=sep)
    if frame.empty:
        raise UserError(f"{shown} is empty; give a CSV file with one row per time step")
    return [str(c).strip() for c in frame.iloc[0]]


def _parse(path: Path, shown: str, encoding: str, **options: Any) -> Any:
    """pandas' CSV reader with every cell kept as written (no NaN guessing) and blank lines
    skipped; a ragged row or broken quoting becomes a UserError."""
    try:
        return pd.read_csv(
            path, encoding=encoding, na_filter=False, skip_blank_lines=True, **options
        )
    except pd.errors.ParserError as err:
        raise UserError(_parser_message(err, shown, options.get("sep", ","))) from None
    except (pd.errors.EmptyDataError, ValueError, OverflowError) as err:
        raise UserError(_parse_failure(err, shown)) from None


def _parser_message(err: Exception, shown: str, sep: str = ",") -> str:
    """Turn pandas' ragged-row error into one line that names the line and the fix."""
    found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
    if found:
        expected, line, saw = found.groups()
        what = _OTHER_SEPARATORS.get(sep, "commas")
        return (
            f"{shown}: line {line} has {saw} {what.removesuffix('s')}-separated fields but the "
            f"first line has {expected}; give every row the same number of fields (quote cells "
            f"that contain {what})"
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
    # Text cells written as numbers in another notation: their rows, kinds and values (kept
    # only while every text cell so far has such a reading), and counts of each kind.
    kinds: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    other_rows: list[np.ndarray] = field(default_factory=list)
    other_kinds: list[np.ndarray] = field(default_factory=list)
    other_values: list[np.ndarray] = field(default_factory=list)
    n_dotted: int = 0  # plain numbers with a fractional part (contradict decimal commas)
    n_plain: int = 0
    note: str = ""

    def add(self, column: pd.Series, offset: int) -> None:
        numbers, missing = _cells_as_numbers(column)
        text = ~missing & np.isnan(numbers)
        self.n_missing += int(missing.sum())
        self.n_text += int(text.sum())
        plain = ~missing & ~text
        self.n_plain += int(plain.sum())
        if column.dtype.kind in "fiu":
            self.n_dotted += int((plain & (numbers != np.round(numbers))).sum())
        elif plain.any():
            self.n_dotted += int(column[plain].astype(str).str.contains(".", regex=False).sum())
        if text.any() and self.kinds.get("other", 0) == 0:
            self._read_notations(column, text, offset)
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

    def _read_notations(self, column: pd.Series, text: np.ndarray, offset: int) -> None:
        cells = column[text].astype(str).str.strip()
        kinds, values = _notations(cells)
        for kind in _KINDS:
            where = kinds == _KINDS.index(kind)
            count = int(where.sum())
            if count:
                self.kinds[kind] = self.kinds.get(kind, 0) + count
                self.examples.setdefault(kind, _show(cells, int(np.argmax(where))))
        if self.kinds.get("other", 0):
            self.other_rows, self.other_kinds, self.other_values = [], [], []
            return
        self.other_rows.append(offset + np.flatnonzero(text))
        self.other_kinds.append(kinds)
        self.other_values.append(values)

    def why_text(self) -> str:
        """Why a dropped column is text: an example cell and its row."""
        if self.first_text is None:
            return "text"
        row, cell = self.first_text
        return f"text such as {cell} in data row {row + 1}"

    def _convert(self, name: str, shown: str) -> None:
        """Rewrite text cells that are numbers in another notation, when one reading fits
        every cell of the column; refuse a column whose notation is ambiguous or mixed."""
        kinds = {k: n for k, n in self.kinds.items() if n}
        fix = "rewrite the column as plain numbers (e.g. 1234.5) or leave it out with --columns"
        eg = self.examples
        if "bool" in kinds and (len(kinds) > 1 or self.n_plain):
            other = eg.get("bool")
            raise UserError(
                f"{shown}: column {name!r} mixes booleans ({other}) with numbers; write it as "
                "1/0 throughout or leave it out with --columns"
            )
        if "decimal" in kinds and "thousands" in kinds:
            raise UserError(
                f"{shown}: column {name!r} mixes decimal commas ({eg['decimal']}) with "
                f"thousands separators ({eg['thousands']}); {fix}"
            )
        if "decimal" in kinds and self.n_dotted:
            raise UserError(
                f"{shown}: column {name!r} mixes decimal commas ({eg['decimal']}) with decimal "
                f"points; {fix}"
            )
        if set(kinds) == {"ambiguous"}:
            raise UserError(
                f"{shown}: column {name!r} holds {eg['ambiguous']}, which could be a thousands "
                f"separator or a decimal comma; {fix}"
            )
        if "bool" in kinds:
            words = "yes/no" if eg["bool"].lower().strip("'\"") in ("yes", "no") else "true/false"
            self.note, use = f"booleans ({words}) read as 1/0", "bool"
        elif "decimal" in kinds:
            self.note, use = "decimal commas read as decimal points", "decimal"
        else:
            self.note, use = "thousands separators removed", "thousands"
        numbers = np.concatenate(self.pieces) if len(self.pieces) != 1 else self.pieces[0]
        rows = np.concatenate(self.other_rows)
        kinds_at = np.concatenate(self.other_kinds)
        values = np.concatenate(self.other_values)
        if use == "decimal":  # '1,234' next to '1,5' is 1.234
            values = np.where(kinds_at == _KINDS.index("ambiguous"), values / 1000, values)
        if not numbers.flags.writeable:  # a view of pandas' buffer
            numbers = numbers.copy()
        numbers[rows] = values
        self.pieces = [numbers]
        self.other_rows, self.other_kinds, self.other_values = [], [], []
        self.first_text, self.n_text = None, 0

    def result(
        self, name: str, shown: str, required: bool, fillable: bool = False
    ) -> np.ndarray | None:
        """The column as float64, or None for a text column that was not asked for by name.

        A column counts as numeric when most of its non-missing cells are numbers; then any
        text cell is a typo to report, not a reason to drop the column silently. A missing cell
        is an error unless `fillable` (`--fill`): then it stays NaN, for `_fill_gaps`.
        """
        present = self.rows - self.n_missing
        if present == 0:
            raise UserError(
                f"{shown}: column {name!r} is empty (no value in any row); delete it or leave "
                "it out with --columns"
            )
        if self.first_text is not None and not self.kinds.get("other", 0):
            self._convert(name, shown)
        if self.first_text is not None:
            if not required and 2 * self.n_text >= present:
                return None
            row, cell = self.first_text
            raise UserError(
                f"{shown}: column {name!r} data row {row + 1} holds {cell}, which is not a "
                "number; fix the cell or leave the column out with --columns"
            )
        if self.first_missing is not None and not fillable:
            raise UserError(
                f"{shown}: column {name!r} data row {self.first_missing + 1} is missing (empty "
                "or NaN); fill it with --fill interpolate (or ffill), or delete the row"
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
    integers: list[np.ndarray] | None = field(default_factory=list)  # while every cell is one

    def add(self, column: pd.Series, offset: int) -> None:
        cells = column.astype(str)
        if self.integers is not None:
            numbers = pd.to_numeric(cells.str.strip(), errors="coerce").to_numpy(np.float64)
            if np.all(np.isfinite(numbers)) and np.all(numbers == np.round(numbers)):
                self.integers.append(numbers)  # read as epoch time if no cell is a date
            else:
                self.integers = None
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

    @property
    def epoch(self) -> pd.DatetimeIndex | None:
        """The column as unix-epoch timestamps, when every cell is an epoch integer."""
        if not self.integers:
            return None
        numbers = np.concatenate(self.integers)
        found = _epoch_unit(numbers)
        if found is None:
            return None
        index = pd.to_datetime(numbers.astype(np.int64), unit=found[1])
        return pd.DatetimeIndex(index)


@dataclass
class _Table:
    """What one pass over the file gathered: the row count and the per-column accumulators."""

    rows: int
    values: dict[str, _Numbers]
    times: dict[str, _Times]


@dataclass(frozen=True)
class _Layout:
    """How to read the file's data rows, as the first look at it found: its path (and the name
    messages show), encoding, separator, whether a header line comes first, and the column
    names. Each pass over the rows reads with the same layout."""

    path: Path
    shown: str
    encoding: str
    sep: str
    has_header: bool
    names: list[str]


def _read_columns(layout: _Layout, value_names: Sequence[str], time_names: Sequence[str]) -> _Table:
    """Parse the file in chunks, converting each value column to float64 and each candidate
    time column to timestamps as it goes, so no chunk's text outlives its conversion."""
    values = {name: _Numbers() for name in value_names}
    times = {name: _Times() for name in time_names}
    rows = 0
    chunk_rows = max(1000, _CHUNK_CELLS // max(1, len(layout.names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.ParserWarning)
        warnings.simplefilter("ignore", pd.errors.DtypeWarning)
        for chunk in _chunks(layout, chunk_rows):
            for name, numbers in values.items():
                numbers.add(chunk[name], rows)
            for name, stamps in times.items():
                stamps.add(chunk[name], rows)
            rows += len(chunk)
    return _Table(rows, values, times)


def _chunks(layout: _Layout, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The data rows under their column names, `chunk_rows` at a time."""
    path, shown, sep = layout.path, layout.shown, layout.sep
    reader = _parse(
        path,
        shown,
        layout.encoding,
        sep=sep,
        header=0 if layout.has_header else None,
        names=layout.names,
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
                raise UserError(_parser_message(err, shown, sep)) from None
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
        if explicit and stamps.n_bad == stamps.rows and stamps.epoch is not None:
            return stamps.epoch, name
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


# Unix-epoch integers between 1990-01-01 and 2100-01-01, in seconds or milliseconds.
_EPOCH_RANGES = (("seconds", "s", 631_152_000, 4_102_444_800),)
_EPOCH_RANGES += (("milliseconds", "ms", 631_152_000_000, 4_102_444_800_000),)


def _epoch_unit(numbers: np.ndarray) -> tuple[str, str] | None:
    """("seconds", "s") or ("milliseconds", "ms") when `numbers` are strictly increasing
    integers that all fall in 1990..2100 read in that unit; else None."""
    if len(numbers) < 2 or not np.all(np.isfinite(numbers)):
        return None
    if not np.all(numbers == np.round(numbers)) or not np.all(np.diff(numbers) > 0):
        return None
    for words, unit, low, high in _EPOCH_RANGES:
        if low <= numbers[0] and numbers[-1] < high:
            return words, unit
    return None


def _epoch_column(
    kept: dict[str, np.ndarray], shown: str
) -> tuple[str, pd.DatetimeIndex, str] | None:
    """The first value column that is unix-epoch time (see `_epoch_unit`), as timestamps: it
    is the clock of the rows, not a series to forecast."""
    for name, numbers in kept.items():
        found = _epoch_unit(numbers)
        if found is not None:
            words, unit = found
            index = pd.DatetimeIndex(pd.to_datetime(numbers.astype(np.int64), unit=unit), name=name)
            _check_chronological(index, name, shown)
            return name, index, words
    return None


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


def _check_spacing(
    index: pd.DatetimeIndex, column: str, shown: str, fill: str = "none"
) -> tuple[str | None, str, pd.DatetimeIndex | None]:
    """The index's frequency, a note on missing steps, and (with `fill`, when steps are
    missing) the whole grid to fill; an error for mixed frequencies.

    Forecasting windows count rows, so every row must sit on one grid: a fixed step (the most
    common spacing) or a calendar frequency (business days, months, quarters, years). Without
    `fill`, rows missing from the grid are tolerated up to `_MAX_MISSING_FRACTION` of its steps
    and noted; a row off every grid means two frequencies are mixed, which no window (and no
    filling) can absorb.
    """
    stamps = _clock(index)
    if len(index) < 3:
        return _fixed_frequency(stamps[1] - stamps[0]), "", None
    inferred = _infer_frequency(index)
    if inferred is not None:
        return inferred, "", None
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
        return freq, "", None
    total = missing + len(index)
    if fill != "none":
        return freq, "", pd.date_range(index[0], periods=total, freq=freq)
    if missing > _MAX_MISSING_FRACTION * total:
        raise UserError(
            f"{shown}: column {column!r} is irregular: {missing} of the {total} {freq} steps "
            f"from {index[0]} to {index[-1]} have no row (at most "
            f"{_MAX_MISSING_FRACTION:.0%} may); fill them with --fill interpolate (or --fill "
            f"ffill), or resample the file (pandas: df.resample({freq!r}, on={column!r}).mean())"
        )
    first = int(np.flatnonzero(np.diff(positions) > 1)[0]) + 1
    return (
        freq,
        f"; {missing} of {total} {freq} steps have no row, the first after data row {first}",
        None,
    )


def _fill_gaps(
    index: pd.DatetimeIndex | None,
    grid: pd.DatetimeIndex | None,
    values: np.ndarray,
    method: str,
    max_fill: float,
    shown: str,
) -> tuple[pd.DatetimeIndex | None, np.ndarray, FillReport]:
    """The rows put on `grid` (None: the rows as they are) and every hole filled.

    "interpolate" is linear in time between the neighbouring values (pandas' `time` method;
    linear in the row number without timestamps); "ffill" repeats the last value. A hole
    before a column's first value takes that first value (there is nothing earlier to use).
    More than `max_fill` of the rows filled is refused: such a series is mostly invented.
    """
    frame = pd.DataFrame(values, index=index)
    if grid is not None:
        frame = frame.reindex(grid)
    holes = frame.isna().to_numpy()
    rows_added = 0 if grid is None else len(grid) - len(values)
    report = FillReport(
        method=method,
        rows_added=rows_added,
        cells_filled=int(np.isnan(values).sum()),
        rows_filled=int(holes.any(axis=1).sum()),
        rows=len(frame),
    )
    share = report.rows_filled / report.rows
    if share > max_fill:
        raise UserError(
            f"{shown}: {report.rows_filled} of {report.rows} rows ({share:.1%}) would be filled "
            f"({rows_added} missing timestamps, {report.cells_filled} empty cells), more than "
            f"--max-fill {max_fill:g} allows; raise --max-fill or give a more complete file"
        )
    if method == "interpolate":
        how = "time" if index is not None else "linear"
        frame = frame.interpolate(method=how, limit_direction="both")
    else:
        frame = frame.ffill().bfill()
    new_index = None if index is None else pd.DatetimeIndex(frame.index, name=index.name, freq=None)
    return new_index, frame.to_numpy(dtype=np.float64), report


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


_KINDS = ("other", "bool", "decimal", "thousands", "ambiguous")
_BOOLS = {"true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}
_GROUP = "[ \u00a0\u202f]"  # spaces that group thousands (plain, no-break, narrow no-break)
_AMBIGUOUS = re.compile(r"[+-]?[1-9]\d{0,2},\d{3}")
# A leading group of 0 is never written ("0,847" is a decimal comma, never 847 thousandths).
_THOUSANDS = re.compile(rf"[+-]?[1-9]\d{{0,2}}(?:(?:,\d{{3}})+|(?:{_GROUP}\d{{3}})+)(?:\.\d+)?")
_DECIMAL = re.compile(rf"[+-]?(?:\d+|\d{{1,3}}(?:[.]\d{{3}})+|\d{{1,3}}(?:{_GROUP}\d{{3}})+),\d+")


def _notations(cells: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """For text cells: the index in `_KINDS` of each cell's notation and its value (for an
    ambiguous '1,234', the thousands reading 1234)."""
    kinds = np.zeros(len(cells), dtype=np.int8)
    values = np.full(len(cells), np.nan)
    for i, cell in enumerate(cells):
        lower = cell.lower()
        if lower in _BOOLS:
            kinds[i], values[i] = 1, _BOOLS[lower]
        elif _AMBIGUOUS.fullmatch(cell):
            kinds[i], values[i] = 4, float(cell.replace(",", ""))
        elif _THOUSANDS.fullmatch(cell):
            kinds[i], values[i] = 3, float(re.sub(f",|{_GROUP}", "", cell))
        elif _DECIMAL.fullmatch(cell):
            digits = re.sub(f"[.]|{_GROUP}", "", cell)
            kinds[i], values[i] = 2, float(digits.replace(",", "."))
        else:
            break  # one unreadable cell makes the column text: the rest need no look
    return kinds, values


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
