"""Hostile CSV input (issue P2): no column dropped silently, special files and odd encodings
refused by name, notations converted value by value, epoch integers taken as the clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from morphnas.data.csv import load_csv
from morphnas.errors import UserError


def error(*args: Any, **kwargs: Any) -> str:
    """`load_csv` must raise a one-line UserError; return its message."""
    with pytest.raises(UserError) as caught:
        load_csv(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message and "\r" not in message, message
    return message


def write(tmp_path: Path, content: str | bytes, name: str = "data.csv") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def report(data: Any) -> dict[str, tuple[str, str]]:
    return {note.name: (note.role, note.reason) for note in data.columns_report}


# --- special files ---------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)  # opening it for reading would block forever: no writer
    message = error(fifo)
    assert str(fifo) in message and "named pipe (FIFO)" in message and "save the data" in message


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_device_is_refused() -> None:
    message = error("/dev/null")
    assert "/dev/null is a device" in message


def test_directory_is_refused(tmp_path: Path) -> None:
    assert "is a directory" in error(tmp_path)


def test_symlink_loop_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "a.csv").symlink_to(tmp_path / "b.csv")
    (tmp_path / "b.csv").symlink_to(tmp_path / "a.csv")
    message = error(tmp_path / "a.csv")
    assert "symbolic link loop" in message and "not found" not in message


def test_dangling_symlink_names_its_target(tmp_path: Path) -> None:
    (tmp_path / "a.csv").symlink_to(tmp_path / "gone.csv")
    message = error(tmp_path / "a.csv")
    assert "symbolic link" in message and "gone.csv" in message and "does not exist" in message


def test_symlink_to_a_file_is_read(tmp_path: Path) -> None:
    target = write(tmp_path, "a,b\n1,5\n2,3\n4,1\n")
    (tmp_path / "link.csv").symlink_to(target)
    assert load_csv(tmp_path / "link.csv").columns == ("a", "b")


# --- encodings -------------------------------------------------------------------------------

TEXT = "date,a,b\n2020-01-01,1.5,2\n2020-01-02,2.5,3\n2020-01-03,4,1\n"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-8-sig"])
def test_utf16_and_utf8_bom_are_read(tmp_path: Path, encoding: str) -> None:
    raw = TEXT.encode(encoding)
    if encoding == "utf-16-le":
        raw = b"\xff\xfe" + raw
    elif encoding == "utf-16-be":
        raw = b"\xfe\xff" + raw
    data = load_csv(write(tmp_path, raw))
    assert data.columns == ("a", "b") and data.frequency == "D"
    np.testing.assert_array_equal(data.values, [[1.5, 2], [2.5, 3], [4, 1]])


def test_utf16_without_bom_is_named(tmp_path: Path) -> None:
    message = error(write(tmp_path, TEXT.encode("utf-16-le")))
    assert "UTF-16" in message and "byte-order mark" in message and "binary" not in message


def test_utf32_is_named(tmp_path: Path) -> None:
    assert "UTF-32" in error(write(tmp_path, TEXT.encode("utf-32")))


def test_latin1_refusal_names_the_likely_encoding(tmp_path: Path) -> None:
    message = error(write(tmp_path, "a,b\n1,2\ncaf\u00e9,3\n".encode("latin-1")))
    assert "not UTF-8" in message and "0xe9" in message and "line 3" in message
    assert "Windows-1252 or Latin-1" in message


def test_utf16_nul_character_is_still_binary(tmp_path: Path) -> None:
    message = error(write(tmp_path, "a,b\n1,2\n3,\x004\n".encode("utf-16")))
    assert "binary file" in message and "line 3" in message


# --- notations -------------------------------------------------------------------------------


def test_quoted_decimal_commas_are_converted(tmp_path: Path) -> None:
    path = write(tmp_path, 'a,b\n"1,5",1\n"2,25",2\n"-3,0",4\n"1.234,5",3\n')
    data = load_csv(path)
    assert data.columns == ("a", "b")
    np.testing.assert_array_equal(data.values[:, 0], [1.5, 2.25, -3.0, 1234.5])
    assert report(data)["a"] == ("used", "decimal commas read as decimal points")
    assert report(data)["b"] == ("used", "numbers")
    assert "decimal commas" in data.source


def test_ambiguous_cell_next_to_decimal_commas_is_decimal(tmp_path: Path) -> None:
    data = load_csv(write(tmp_path, 'a,b\n"1,234",1\n"2,5",2\n"3,75",4\n'))
    np.testing.assert_array_equal(data.values[:, 0], [1.234, 2.5, 3.75])


def test_thousands_separators_are_removed(tmp_path: Path) -> None:
    path = write(tmp_path, 'a,b,c\n"1,234.5",1 234,1\n"2,000",12 345 678,2\n999,7,4\n')
    data = load_csv(path)
    np.testing.assert_array_equal(data.values[:, 0], [1234.5, 2000, 999])
    np.testing.assert_array_equal(data.values[:, 1], [1234, 12345678, 7])
    assert report(data)["a"] == ("used", "thousands separators removed")
    assert report(data)["b"] == ("used", "thousands separators removed")


@pytest.mark.parametrize(
    ("cells", "value"),
    [(("true", "false", "True"), "true/false"), (("yes", "no", "no"), "yes/no")],
)
def test_booleans_become_one_and_zero(tmp_path: Path, cells: tuple[str, ...], value: str) -> None:
    rows = "".join(f"{i},{cell}\n" for i, cell in enumerate(cells))
    data = load_csv(write(tmp_path, "a,flag\n" + rows))
    assert data.columns == ("a", "flag")
    np.testing.assert_array_equal(
        data.values[:, 1], [1.0 if c.lower() in ("true", "yes") else 0.0 for c in cells]
    )
    assert report(data)["flag"] == ("used", f"booleans ({value}) read as 1/0")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('a,b\n"1,234",1\n"2,345",2\n"3,456",4\n', "could be a thousands separator or a decimal"),
        ('a,b\n"1,5",1\n"1,234.5",2\n"3,5",4\n', "mixes decimal commas"),
        ('a,b\n"1,5",1\n2.5,2\n"3,5",4\n', "decimal points"),
        ("a,b\ntrue,1\n2,2\nfalse,4\n", "mixes booleans"),
    ],
    ids=["ambiguous", "decimal-and-thousands", "decimal-and-points", "bool-and-numbers"],
)
def test_ambiguous_notation_is_refused_by_column(tmp_path: Path, text: str, expected: str) -> None:
    message = error(write(tmp_path, text))
    assert "column 'a'" in message and expected in message and "--columns" in message


def test_text_column_is_reported_as_dropped(tmp_path: Path) -> None:
    data = load_csv(write(tmp_path, "a,label,b\n1,x,5\n2,y,3\n4,z,1\n"))
    assert data.columns == ("a", "b")
    assert report(data) == {
        "a": ("used", "numbers"),
        "label": ("dropped", "not numeric (text such as 'x' in data row 1)"),
        "b": ("used", "numbers"),
    }
    assert [n.line() for n in data.columns_report][1].startswith("column 'label': dropped")


# --- unix-epoch timestamps -------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "unit"), [(1, "seconds"), (1000, "milliseconds")])
def test_epoch_column_becomes_the_time_column(tmp_path: Path, scale: int, unit: str) -> None:
    start = 1_577_836_800  # 2020-01-01 00:00 UTC
    rows = "".join(f"{(start + 3600 * i) * scale},{v},{i}\n" for i, v in enumerate([3, 1, 4, 1]))
    data = load_csv(write(tmp_path, "ts,a,b\n" + rows))
    assert data.columns == ("a", "b") and data.frequency == "h"
    assert data.index[0] == pd.Timestamp("2020-01-01") and data.index.name == "ts"
    role, reason = report(data)["ts"]
    assert role == "time" and f"unix-epoch {unit}" in reason
    assert "'ts': unix-epoch" in data.source


def test_epoch_named_timestamp_and_explicit_time_col(tmp_path: Path) -> None:
    rows = "".join(f"{1_600_000_000 + 60 * i},{v}\n" for i, v in enumerate([3, 1, 4]))
    for header, time_col in (("timestamp,a\n", None), ("when,a\n", "when")):
        data = load_csv(write(tmp_path, header + rows), time_col=time_col)
        assert data.columns == ("a",) and data.frequency == "min"
        assert data.index[0] == pd.Timestamp(1_600_000_000, unit="s")


def test_epoch_column_named_in_columns_is_modelled(tmp_path: Path) -> None:
    rows = "".join(f"{1_600_000_000 + 60 * i},{v}\n" for i, v in enumerate([3, 1, 4]))
    data = load_csv(write(tmp_path, "ts,a\n" + rows), columns=["ts", "a"])
    assert data.columns == ("ts", "a") and data.index is None


def test_small_increasing_integers_are_not_epoch(tmp_path: Path) -> None:
    data = load_csv(write(tmp_path, "n,a\n1,3\n2,1\n3,4\n"))
    assert data.columns == ("n", "a") and data.index is None


def test_epoch_only_file_is_refused(tmp_path: Path) -> None:
    message = error(write(tmp_path, "ts,label\n1600000000,x\n1600000060,y\n1600000120,z\n"))
    assert "'ts'" in message and "unix-epoch seconds" in message


# --- the command line ------------------------------------------------------------------------


def test_cli_refuses_ambiguous_column_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'a,b\n"1,234",1\n"2,345",2\n"3,456",4\n')
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "morphnas.cli", "search", "--csv", str(path), "--epochs", "1",
         "--retrain-epochs", "1", "--threads", "1", "--out", str(run)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in done.stderr
    assert "column 'a'" in lines[0] and not run.exists()


def test_a_run_says_and_saves_what_became_of_each_column(tmp_path: Path):
    """Dropped and converted columns are warned about once, and summary.json lists every
    column's fate (used, time, dropped) with the reason."""
    rows = ["a,b,label,flag"]
    rng = np.random.default_rng(0)
    for i in range(120):
        flag = "yes" if rng.random() < 0.5 else "no"
        rows.append(f'{rng.normal():.4f},"{rng.normal() * 1000:,.1f}",x{i % 3},{flag}')
    csv = tmp_path / "mixed.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "morphnas.cli", "train", "--baseline", "gru", "--csv", str(csv),
         "--window", "6", "--retrain-epochs", "1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning: mixed.csv")]
    assert warned == [
        "warning: mixed.csv: column 'b': used, thousands separators removed",
        "warning: mixed.csv: column 'label': dropped, not numeric (text such as 'x0' in data "
        "row 1)",
        "warning: mixed.csv: column 'flag': used, booleans (yes/no) read as 1/0",
    ]
    summary = json.loads((out / "summary.json").read_text())
    said = [line.removeprefix("warning: mixed.csv: ") for line in warned]
    assert summary["columns"] == ["column 'a': used, numbers", *said]


def test_semicolon_file_with_decimal_commas_is_read(tmp_path: Path) -> None:
    """A European Excel export (issue 27): `;` between fields, `,` as the decimal mark, quoted
    cells and `.` thousands separators."""
    rows = [("1,5", "2,25"), ('"1.234,5"', "3"), ("-0,75", '"4,5"'), ("2", "1.000,25")]
    body = "date;a;b\n" + "".join(
        f"2020-01-01 {h:02d}:00;{a};{b}\n" for h, (a, b) in enumerate(rows)
    )
    data = load_csv(write(tmp_path, body))
    assert data.columns == ("a", "b")
    np.testing.assert_array_equal(data.values[:, 0], [1.5, 1234.5, -0.75, 2.0])
    np.testing.assert_array_equal(data.values[:, 1], [2.25, 3.0, 4.5, 1000.25])
    assert data.frequency == "h" and "separated by semicolons" in data.source
    assert report(data)["a"] == ("used", "decimal commas read as decimal points")


def test_tab_file_with_decimal_commas_is_read(tmp_path: Path) -> None:
    body = "date\ta\tb\n2020-01-01\t1,5\t2,25\n2020-01-02\t2,5\t3\n2020-01-03\t0,5\t1\n"
    data = load_csv(write(tmp_path, body))
    np.testing.assert_array_equal(data.values, [[1.5, 2.25], [2.5, 3.0], [0.5, 1.0]])
    assert "separated by tabs" in data.source


def test_semicolon_file_problems_are_named_by_line_and_column(tmp_path: Path) -> None:
    # a ragged row: the separator still comes from the header line
    ragged = "date;a;b\n2020-01-01;1,5;2\n2020-01-02;2,5;3;4\n"
    message = error(write(tmp_path, ragged))
    assert "line 3 has 4 semicolon-separated fields" in message, message
    # '1,234' alone is a thousands separator or a decimal comma: refused, not guessed
    message = error(write(tmp_path, "date;a\n2020-01-01;1,234\n2020-01-02;2,345\n"))
    assert "could be a thousands separator or a decimal comma" in message, message
    # a comma file with semicolons inside quoted cells stays a comma file
    data = load_csv(write(tmp_path, 'a,note\n1.5,"x;y"\n2.5,"z;w"\n'))
    assert data.columns == ("a",) and "semicolons" not in data.source


def test_a_leading_zero_group_is_a_decimal_comma_not_a_thousands_separator(tmp_path: Path):
    """'0,847' cannot be 847 thousandths of nothing: an Excel export whose trailing zeros were
    dropped mixes it with '0,0126', all decimal commas."""
    body = "date;a\n" + "".join(
        f"2020-01-{d:02d};{v}\n" for d, v in enumerate(["0,0126", "0,847", "1,5", "0,25"], 1)
    )
    with pytest.warns(UserWarning, match="fields separated by semicolons"):
        data = load_csv(write(tmp_path, body))
    np.testing.assert_array_equal(data.values[:, 0], [0.0126, 0.847, 1.5, 0.25])
