"""Bad input of every kind ends in one line that says what is wrong and how to fix it.

DESIGN §7: no traceback for the user, a non-zero exit (2), and nothing already written lost.
The CSV loader, genotype files, checkpoints and the output directory are checked here one
class of bad input at a time, then with hypothesis on arbitrary bytes and on structured but
wrong text, both through the library and through the real command-line entry point.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from morphnas import api, cli, runs
from morphnas import genotype as gt
from morphnas.data import csv as csv_mod
from morphnas.data import load_csv, load_dataset
from morphnas.engine import checkpoint
from morphnas.errors import UserError

FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def one_line_error(func: Any, *args: Any, **kwargs: Any) -> str:
    """Call `func`, expect a `UserError`, and return its message after checking it is one line."""
    with pytest.raises(UserError) as caught:
        func(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message and "\r" not in message, message
    return message


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def dated(index: Sequence[Any]) -> str:
    """A CSV of a date column and one varying value column on the given timestamps."""
    return "date,a\n" + "".join(f"{t},{i % 7}\n" for i, t in enumerate(index))


HOURS = pd.date_range("2021-03-01", periods=60, freq="h")


# --- CSV: one class of bad input at a time ----------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"", ("is empty",)),
        (b"\xef\xbb\xbf\n  \n", ("is empty",)),
        (b"date,a,b\n", ("header line but no data rows",)),
        (b"date,a\r\n\r\n", ("header line but no data rows",)),
        (b"a,b\n1,2\n3,\x004\n", ("binary file", "line 3")),
        (b"\x1f\x8b\x08\x00\x00\x00", ("gzip-compressed", "gunzip")),
        (b"PK\x03\x04\x14\x00", ("ZIP archive", "export the sheet as CSV")),
        (b"\x89PNG\r\n\x1a\n", ("PNG image",)),
        ("a,b\n1,2\ncaf\u00e9,3\n".encode("latin-1"), ("not UTF-8", "0xe9", "line 3")),
        ("a,b\n1,2\n3,\u00e9".encode()[:-1], ("not UTF-8", "ends inside")),
        (b"a|b\n1|2\n3|4\n", ("separated by bars", "sep='|'")),
        (b'a,b\n"1,2\n3,4\n', ("could not be parsed", "quoting")),
        (b"a,b\n1,2\n3,4,5\n", ("line 3", "3 comma-separated fields")),
    ],
)
def test_csv_file_level_problems(
    tmp_path: Path, content: bytes, fragments: tuple[str, ...]
) -> None:
    message = one_line_error(load_csv, write(tmp_path / "bad.csv", content))
    assert message.startswith(str(tmp_path / "bad.csv")) or "bad.csv" in message
    for fragment in fragments:
        assert fragment in message, message


def test_csv_duplicate_timestamp_names_both_rows(tmp_path: Path) -> None:
    index = HOURS[:10].insert(6, HOURS[5])
    message = one_line_error(load_csv, write(tmp_path / "d.csv", dated(index)))
    assert "data rows 6 and 7" in message and "duplicate" in message and "groupby" in message


def test_csv_unsorted_is_an_error_naming_the_first_step_back(tmp_path: Path) -> None:
    index = HOURS[:10].delete(3).insert(7, HOURS[3])  # row 8 goes back in time
    message = one_line_error(load_csv, write(tmp_path / "u.csv", dated(index)))
    assert "data row 8" in message and "earlier than data row 7" in message
    assert "sort_values('date')" in message


def test_csv_mixed_frequency_names_the_off_grid_row(tmp_path: Path) -> None:
    index = HOURS.insert(21, HOURS[20] + pd.Timedelta("30min"))
    message = one_line_error(load_csv, write(tmp_path / "m.csv", dated(index)))
    assert "data row 22" in message and "30min after data row 21" in message
    assert "1h spacing" in message and "resample" in message


def test_csv_too_many_missing_steps_is_irregular(tmp_path: Path) -> None:
    sparse = HOURS[np.r_[0:20, 40:60]]  # 20 of 60 hourly steps missing: beyond the 10%
    message = one_line_error(load_csv, write(tmp_path / "s.csv", dated(sparse)))
    assert "20 of the 60 h steps" in message and "resample" in message


@pytest.mark.parametrize(
    ("index", "frequency", "note"),
    [
        (HOURS, "h", None),
        (HOURS.delete([10, 11]), "h", "2 of 60 h steps have no row, the first after data row 10"),
        (pd.bdate_range("2020-01-01", periods=200).delete([20, 90]), "B", "2 of 200 B steps"),
        (pd.date_range("2020-01-01", periods=30, freq="MS").delete(7), "MS", "1 of 30 MS"),
        (pd.date_range("2020-01-31", periods=30, freq="ME"), "ME", None),
    ],
)
def test_csv_regular_grids_and_tolerated_gaps(
    tmp_path: Path, index: pd.DatetimeIndex, frequency: str, note: str | None
) -> None:
    data = load_csv(write(tmp_path / "g.csv", dated(index)))
    assert data.frequency == frequency
    assert data.n_steps == len(index)
    if note is None:
        assert "have no row" not in data.source
    else:
        assert note in data.source


def test_csv_chunks_keep_global_row_numbers_and_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing in chunks must not change the result or the row a message names."""
    n = 4500
    rng = np.random.default_rng(0)
    values = rng.normal(size=(n, 2))
    frame = pd.DataFrame(values, columns=["a", "b"])
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=n, freq="min"))
    frame.insert(2, "label", "x")
    path = tmp_path / "c.csv"
    frame.to_csv(path, index=False, float_format="%.17g")
    whole = load_csv(path)
    monkeypatch.setattr(csv_mod, "_CHUNK_CELLS", 1)  # 1000-row chunks (the floor)
    chunked = load_csv(path)
    np.testing.assert_array_equal(chunked.values, whole.values)
    np.testing.assert_array_equal(chunked.values, values)
    assert list(chunked.index) == list(whole.index) and chunked.columns == ("a", "b")
    lines = path.read_text().splitlines()
    lines[3210] = lines[3210].rsplit(",", 1)[0] + ",oops"  # data row 3210, in the fourth chunk
    write(path, "\n".join(lines) + "\n")
    message = one_line_error(load_csv, path)
    assert "column 'b' data row 3210 holds 'oops'" in message
    write(path, "\n".join(lines[:3210] + lines[3211:]) + "\n")  # now a gap, still on the grid
    assert "1 of 4500 min steps have no row" in load_csv(path).source


def test_csv_date_named_column_that_is_not_dates_is_read_again_as_values(tmp_path: Path) -> None:
    data = load_csv(write(tmp_path / "t.csv", "time,a\n0.5,1\n1.5,3\n2.5,2\n"))
    assert data.index is None and data.columns == ("time", "a")
    np.testing.assert_array_equal(data.values[:, 0], [0.5, 1.5, 2.5])


GENERATE_AND_MEASURE = textwrap.dedent(
    """
    import sys
    from morphnas.data import load_csv

    def mib(key):
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(key + ":"))
        return int(line.split()[1]) // 1024

    small, big = sys.argv[1:3]
    load_csv(small)  # warm up: lazy imports and pandas' first-call caches are not the load
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current resident size
    before = mib("VmRSS")
    data = load_csv(big)
    print(data.n_steps, data.n_series, data.frequency, mib("VmHWM") - before)
    """
)


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc to reset the peak"
)
def test_csv_huge_file_memory_stays_bounded(tmp_path: Path) -> None:
    """2M rows (61 MB of text): the loader's peak memory is a small multiple of the float64
    output (2M x 2 values + timestamps = 46 MiB), not several copies of the text.

    Measured in a fresh process as the peak resident set (VmHWM, reset just before the load)
    minus the resident set before it: about 130 MiB here; the loader that held the text in
    memory (a bytes copy, a str copy and two StringIO buffers) grew by 556 MiB on this file.
    """
    n, block = 2_000_000, 100_000
    stamps = np.datetime_as_string(
        np.datetime64("2000-01-01T00:00") + np.arange(n).astype("timedelta64[m]")
    )
    pattern = [f"{np.sin(i / 7):.4f},{np.cos(i / 11):.4f}" for i in range(block)]
    big = tmp_path / "big.csv"
    with big.open("w", encoding="utf-8") as handle:
        handle.write("date,a,b\n")
        for start in range(0, n, block):
            rows = stamps[start : start + block]
            handle.write("".join(f"{t},{v}\n" for t, v in zip(rows, pattern, strict=True)))
    small = write(tmp_path / "small.csv", dated(HOURS))
    done = subprocess.run(
        [sys.executable, "-c", GENERATE_AND_MEASURE, str(small), str(big)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows, series, frequency, grown_mb = done.stdout.split()
    assert (int(rows), int(series), frequency) == (n, 2, "min")
    output_mb = n * (2 * 8 + 8) / 2**20
    assert int(grown_mb) < 4 * output_mb + 32, f"peak grew {grown_mb} MiB for {output_mb:.0f} MiB"


# --- dataset names ---------------------------------------------------------------------------


def test_dataset_typo_suggests_the_closest_name() -> None:
    message = one_line_error(load_dataset, "birts")
    assert message.startswith("unknown dataset 'birts'; did you mean 'births'?")
    assert "morphnas datasets" in message
    assert "did you mean 'births'" in one_line_error(load_dataset, "Births")
    assert "did you mean" not in one_line_error(load_dataset, "weather")  # nothing plausible


# --- genotype files --------------------------------------------------------------------------

VALID = {
    "format": "morphnas.genotype",
    "version": 1,
    "space": "two_input",
    "output": "last",
    "nodes": [{"op": "hadamard", "inputs": [0, -1]}, {"op": "add", "inputs": [1, 0]}],
}


def variant(**changes: Any) -> str:
    data = json.loads(json.dumps(VALID))
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (variant(version=4), ("written by a newer morphnas", "upgrade")),
        (variant(version=0), ("version 0",)),
        (variant(version=[1]), ("'version' must be an integer",)),
        (variant(ouptut="mean"), ("unknown field 'ouptut'", "did you mean 'output'")),
        (variant(nodes=[{"op": "add", "inputs": [0, -1], "residul": True}]), ("'residul'",)),
        (variant(nodes=[{"op": "hadamrd", "inputs": [0, -1]}]), ("did you mean 'hadamard'",)),
        (
            variant(nodes=[{"op": "add", "inputs": [0, 2]}, {"op": "add", "inputs": [1, 0]}]),
            ("node 1 reads state 2", "comes after it", "states -1..0"),
        ),
        (variant(nodes=[{"op": "add", "inputs": [1, 0]}]), ("reads state 1", "itself")),
        (variant(nodes=[{"op": "add", "inputs": [-5, 0]}]), ("state -5", "does not exist")),
        ("[" * 100_000, ("nested too deeply",)),
        ('{"version": ' + "9" * 5000 + "}", ("not usable JSON",)),
        (variant(space="x" * 500), ("...",)),
    ],
)
def test_genotype_schema_version_ops_and_wiring(text: str, fragments: tuple[str, ...]) -> None:
    message = one_line_error(gt.from_json, text)
    assert message.startswith("genotype:") and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, message


def test_genotype_file_problems(tmp_path: Path) -> None:
    assert "not UTF-8" in one_line_error(gt.load, write(tmp_path / "b.json", b"\x89PNG\r\n"))
    assert "is a directory" in one_line_error(gt.load, tmp_path)
    assert "did you mean the published cell 'darts_v2'" in one_line_error(
        gt.load_or_known, "darts_v1"
    )


def test_genotype_save_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "genotype.json"
    old = gt.from_json(variant())
    old.save(path)
    before = path.read_text()

    def full(fd: int, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gt.os, "fdopen", full)
    message = one_line_error(gt.KNOWN["darts_v2"].save, path)
    assert "No space left on device" in message
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --- checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True], ids=["OSError", "torch-RuntimeError"])
def test_checkpoint_disk_full_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrapped: bool
) -> None:
    """ENOSPC as `OSError`, and as torch really reports it on a full disk: a `RuntimeError`
    ("unexpected pos") raised from its zip writer while handling the `OSError`."""
    path = tmp_path / "checkpoints" / "search_last.pt"
    checkpoint.save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def fill_the_disk(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, handle)  # a partial file is on disk when the space runs out
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if not wrapped:
            raise full
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # noqa: B904

    monkeypatch.setattr(checkpoint.torch, "save", fill_the_disk)
    message = one_line_error(checkpoint.save_atomic, {"epoch": 2, "w": torch.zeros(3)}, path)
    assert "No space left on device" in message and "free some disk space" in message
    assert "search_last.pt" in message and "intact" in message and "--resume" in message
    monkeypatch.undo()
    kept = checkpoint.load(path)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["search_last.pt"]  # no temp file left


def test_checkpoint_unwritable_directory(tmp_path: Path) -> None:
    blocker = write(tmp_path / "file", "x")
    message = one_line_error(checkpoint.save_atomic, {"a": 1}, blocker / "ck" / "last.pt")
    assert "cannot save" in message and "last.pt" in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "is empty"),
        ("truncated", "truncated or corrupted"),
        (b"PK\x03\x04" + b"\x00" * 40, "truncated or corrupted"),
        (random.Random(0).randbytes(64).replace(b"P", b"Q"), "not a PyTorch zip file"),
        (b'{"state_dict": {}}', "not a PyTorch zip file"),
        ("object", "Python objects other than tensors"),
        ("list", "holds a list"),
    ],
)
def test_checkpoint_load_bad_files(tmp_path: Path, content: bytes | str, fragment: str) -> None:
    path = tmp_path / "model.pt"
    if content == "truncated":
        checkpoint.save_atomic({"w": torch.ones(100)}, path)
        write(path, path.read_bytes()[:-200])
    elif content == "object":
        torch.save({"opt": torch.optim.SGD}, path)  # a class: refused by weights_only
    elif content == "list":
        torch.save([torch.ones(1)], path)
    else:
        write(path, content)
    message = one_line_error(checkpoint.load, path)
    assert fragment in message and str(path) in message


# --- output directory ------------------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, list[str], str]:
    """The CLI in-process: exit code, the non-empty stderr lines, and stdout."""
    result = CliRunner().invoke(cli.app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.exit_code, lines, result.stdout


def assert_one_line(code: int, lines: list[str], *fragments: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_out_under_a_file_is_refused_before_any_work(tmp_path: Path, synthetic_csv: Path) -> None:
    blocker = write(tmp_path / "notes.txt", "keep me")
    out = blocker / "run"
    code, lines, _ = run_cli("search", "--csv", str(synthetic_csv), "--out", str(out))
    assert_one_line(code, lines, "is inside", "notes.txt", "choose another --out")
    assert blocker.read_text() == "keep me"


def test_out_without_write_permission(
    tmp_path: Path, synthetic_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: ask os.access to say no instead
        real_access = os.access

        def access(path: Any, mode: int, **kwargs: Any) -> bool:
            return Path(path) != parent and real_access(path, mode, **kwargs)

        monkeypatch.setattr(runs.os, "access", access)
    else:
        parent.chmod(0o500)
    try:
        code, lines, _ = run_cli(
            "train", "--baseline", "naive", "--csv", str(synthetic_csv), "--out", str(parent / "r")
        )
    finally:
        parent.chmod(0o700)
    assert_one_line(code, lines, "not writable", "permission denied", "choose another --out")
    assert not (parent / "r").exists()


def test_disk_full_mid_run_is_one_line(
    tmp_path: Path, synthetic_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write outside the checkpoint writer (here the summary) failing for lack of space."""

    def full(path: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(api.run_files, "write_json", full)
    code, lines, _ = run_cli(
        "train", "--baseline", "naive", "--csv", str(synthetic_csv), "--window", "6",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert_one_line(code, lines, "No space left on device", "--resume")


def test_markup_in_a_message_is_printed_as_is(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", "a,b\n1,2\n3,[/b]:x:\n4,5\n")
    code, lines, _ = run_cli("search", "--csv", str(path), "--out", str(tmp_path / "r"))
    assert_one_line(code, lines, "'[/b]:x:'")


def test_evaluate_a_run_with_a_truncated_model(tmp_path: Path, synthetic_csv: Path) -> None:
    run = tmp_path / "run"
    code, lines, _ = run_cli(
        "train", "--baseline", "gru", "--csv", str(synthetic_csv), "--window", "6",
        "--hidden", "4", "--retrain-epochs", "1", "--out", str(run),
    )  # fmt: skip
    assert code == 0, lines
    model = run / "models" / "gru.pt"
    summary = (run / "summary.json").read_text()
    write(model, model.read_bytes()[:100])
    code, lines, _ = run_cli("evaluate", str(run))
    assert_one_line(code, lines, "gru.pt", "truncated or corrupted")
    assert (run / "summary.json").read_text() == summary  # nothing already written is lost


# --- properties: arbitrary input never escapes as a traceback --------------------------------

CELLS = st.one_of(
    st.sampled_from(
        [
            "1", "2.5", "-3", "1e3", "", " ", "nan", "NaN", "inf", "-inf", "1e999", "x", "a b",
            "0x10", "True", "2020-01-01", "2020-01-01 00:30", "2020-13-45", '"q"', '"1,2"',
            '"', "[/b]", "\u00e9", "\ufeff", "date", "time",
        ]
    ),
    st.text(max_size=6),
)  # fmt: skip
CSV_TEXT = st.builds(
    lambda header, rows, sep, end: end.join(sep.join(r) for r in [header, *rows]) + end,
    st.lists(st.sampled_from(["date", "time", "a", "b", "a", "", "x y"]), min_size=1, max_size=4),
    st.lists(st.lists(CELLS, min_size=1, max_size=4), max_size=8),
    st.sampled_from([",", ",", ";", "\t"]),
    st.sampled_from(["\n", "\r\n", "\r"]),
)


def check_loader(path: Path, **options: Any) -> None:
    """The property: a `SeriesData`, or a `UserError` of one non-empty line."""
    try:
        data = load_csv(path, **options)
    except UserError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return
    assert data.n_steps >= 2 and np.isfinite(data.values).all()


@FAST
@given(content=st.binary(max_size=400))
def test_csv_loader_arbitrary_bytes(tmp_path: Path, content: bytes) -> None:
    check_loader(write(tmp_path / "any.csv", content))


@FAST
@given(
    text=CSV_TEXT,
    time_col=st.sampled_from([None, "date", "a"]),
    columns=st.sampled_from([None, "a", "a,b", "b,date"]),
)
def test_csv_loader_csv_like_text(
    tmp_path: Path, text: str, time_col: str | None, columns: str | None
) -> None:
    check_loader(write(tmp_path / "like.csv", text), time_col=time_col, columns=columns)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FIELD_VALUES = st.one_of(
    JSON,
    st.sampled_from(["two_input", "darts_rnn", "mean", "last", "tanh", "hadamard", "tanh"]),
    st.lists(
        st.fixed_dictionaries(
            {"op": st.sampled_from(["add", "tanh", "hadamard", "none", "x"]), "inputs": JSON}
        )
        | st.fixed_dictionaries(
            {"op": JSON, "inputs": st.lists(st.integers(-3, 4), max_size=3)},
            optional={"residual": JSON},
        ),
        max_size=4,
    ),
)
BROKEN_GENOTYPES = st.builds(
    lambda changes: variant(**changes),
    st.dictionaries(st.sampled_from([*gt.FIELDS, "extra"]), FIELD_VALUES, max_size=3),
)


def check_genotype(path: Path) -> None:
    try:
        genotype = gt.load(path)
    except UserError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return
    assert gt.from_json(genotype.to_json()) == genotype


@FAST
@given(content=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_genotype_loader_arbitrary_bytes(tmp_path: Path, content: bytes) -> None:
    check_genotype(write(tmp_path / "any.json", content))


@settings(FAST, max_examples=150)
@given(text=BROKEN_GENOTYPES)
def test_genotype_loader_structured_but_wrong(tmp_path: Path, text: str) -> None:
    check_genotype(write(tmp_path / "wrong.json", text))


@settings(FAST, max_examples=25)
@given(content=st.binary(max_size=300) | CSV_TEXT.map(str.encode))
def test_cli_arbitrary_bytes_as_csv_and_genotype(tmp_path: Path, content: bytes) -> None:
    """Through the real command: exit code 2 and one `error:` line, whatever the bytes.

    --window 1000 makes even a well-formed file of these sizes too short, so nothing trains.
    """
    path = write(tmp_path / "input.bin", content)
    out = str(tmp_path / "run")
    code, lines, _ = run_cli("search", "--csv", str(path), "--window", "1000", "--out", out)
    assert_one_line(code, lines)
    missing = str(tmp_path / "missing.csv")
    code, lines, _ = run_cli("train", "--genotype", str(path), "--csv", missing, "--out", out)
    assert_one_line(code, lines)
    assert not Path(out).exists()


def test_cli_subprocess_examples(tmp_path: Path) -> None:
    """The entry point as a user runs it, in a fresh process (one case: each costs a process
    start; test_cli runs a bad genotype file this way)."""
    path = write(tmp_path / "noise.bin", bytes(range(256)) * 4)
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run(
        [sys.executable, "-m", "morphnas.cli", "search", "--csv", str(path), "--out", "r"],
        capture_output=True, text=True, env=env, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in done.stderr
    assert "binary file" in lines[0] and not (tmp_path / "r").exists()


STAMPS = st.lists(
    st.datetimes(
        min_value=pd.Timestamp("1700-01-01").to_pydatetime(),
        max_value=pd.Timestamp("2200-01-01").to_pydatetime(),
        timezones=st.none() | st.timezones(),
    ),
    min_size=2,
    max_size=30,
)
GRID_STEPS = st.sampled_from(["1s", "7min", "1h", "1D", "1B", "1MS", "1QE", "1YS"])


@FAST
@given(stamps=STAMPS, start=STAMPS, step=GRID_STEPS, holes=st.sets(st.integers(0, 39)))
def test_csv_loader_any_timestamps(
    tmp_path: Path, stamps: list[Any], start: list[Any], step: str, holes: set[int]
) -> None:
    """Arbitrary timestamps, and grids with holes punched in them: the spacing check either
    accepts the rows (with a frequency) or names a row, never crashes."""
    check_loader(write(tmp_path / "t.csv", dated(stamps)))
    grid = pd.date_range(pd.Timestamp(start[0]).tz_localize(None), periods=40, freq=step)
    kept = grid.delete(sorted(holes)) if len(holes) < 38 else grid
    check_loader(write(tmp_path / "g.csv", dated(kept)))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"search": {"epoch": 3}}, "search.epoch: unknown key; did you mean 'epochs'?"),
        ({"serch": {}}, "serch: unknown key; did you mean 'search'?"),
        ({"growth": {"zzz": 1}}, "growth.zzz: unknown key (keys here: mode,"),
    ],
)
def test_a_misspelt_config_key_names_the_closest_one(overrides, expected):
    from morphnas import config

    with pytest.raises(UserError) as err:
        config.resolve(overrides=overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_exponent_notation_is_a_number_in_set_and_in_config_files(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1e-5`` as text; free-form options (``search.strategy_options``) keep
    whatever YAML gives, so ``--set`` and config files read it as Python and YAML 1.2 do."""
    from morphnas import config

    parsed = cli._parse_set(
        ["search.strategy_options.eps=1e-5", "search.strategy_options.gamma=2E3", "x.y=1e", "z=3"]
    )
    assert parsed["search"]["strategy_options"] == {"eps": 1e-5, "gamma": 2000.0}
    assert parsed["x"]["y"] == "1e" and parsed["z"] == 3
    text = "search:\n  strategy: idarts\n  strategy_options: {eps: 1e-5, steps: 1}\n"
    file = write(tmp_path / "c.yaml", text)
    options = config.resolve(file=file).search.strategy_options
    assert options == {"eps": 1e-5, "steps": 1} and isinstance(options["eps"], float)


def test_text_for_a_numeric_strategy_option_names_the_option(
    tmp_path: Path, synthetic_csv: Path
) -> None:
    args = ["search", "--csv", str(synthetic_csv), "--strategy", "idarts", "--epochs", "1"]
    done = CliRunner().invoke(
        cli.app, [*args, "--set", "search.strategy_options.gamma=abc", "--out", str(tmp_path / "r")]
    )
    assert done.exit_code == 2
    assert "idarts option gamma must be a number, got 'abc'" in done.output
    assert len(done.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("option", ["--csv", "--config", "--genotype"])
def test_a_symlink_loop_or_a_directory_as_a_path_option(
    tmp_path: Path, synthetic_csv: Path, option: str
) -> None:
    """Issue 27: a symlink loop given as --csv, --config or --genotype is named as a loop (not
    "not found"), a directory as a directory, a dangling link by its target; nothing runs."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "folder").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.yaml")
    out = tmp_path / "run"
    data = [] if option == "--csv" else ["--csv", str(synthetic_csv)]
    command = "train" if option == "--genotype" else "search"
    cases = [
        ("a", ("symbolic link loop", "real")),
        ("folder", ("is a directory",)),
        ("dangling", ("symbolic link to", "gone.yaml", "does not exist")),
    ]
    for name, fragments in cases:
        code, lines, _ = run_cli(command, *data, option, str(tmp_path / name), "--out", str(out))
        assert_one_line(code, lines, *fragments)
        assert "not found" not in lines[0]
        assert not out.exists()
