"""Hostile run files (issue 27): ``evaluate`` and ``plot`` read a run back through
``morphnas.run_files``, so a damaged file is one line naming the file (and line), exit code 2,
no traceback, and every file of the run left as it was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli, tree
from morphnas import run_files
from morphnas.data import synthetic_series
from morphnas.errors import UserError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small finished grow-then-prune search (genotype, history, metrics, summary, model)."""
    base = tmp_path_factory.mktemp("finished")
    series = synthetic_series(n_steps=240, n_series=3, seed=1)
    frame = pd.DataFrame(series.values, columns=series.columns)
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=len(frame), freq="D"))
    csv = base / "series.csv"
    frame.to_csv(csv, index=False, float_format="%.6f")
    run = base / "run"
    code, lines = run_cli(
        "search", "--csv", str(csv), "--window", "6", "--hidden", "4", "--nodes", "2",
        "--epochs", "2", "--retrain-epochs", "1", "--growth", "grow-then-prune",
        "--nodes-start", "1", "--grow-every", "1", "--device", "cpu",
        "--set", "train.baselines=[]", "--out", str(run),
    )  # fmt: skip
    assert code == 0, lines
    assert (run / "history.json").is_file() and (run / "genotype.json").is_file()
    return run


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished run, this test's to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def refused(run: Path, command: str, *fragments: str, target: Path | None = None) -> str:
    """Run ``morphnas COMMAND RUN``: one ``error:`` line holding ``fragments``, exit code 2, no
    traceback, nothing of the run changed. Returns the line."""
    before = tree(run)
    code, lines = run_cli(command, str(target or run))
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert tree(run) == before
    return lines[0]


# --- summary.json ------------------------------------------------------------------------------

SUMMARIES: list[tuple[Callable[[dict], object], tuple[str, ...]]] = [
    (lambda s: {}, ('no "models"',)),
    (lambda s: [], ("expected a JSON object", "found a JSON list")),
    (lambda s: 3, ("expected a JSON object", "found a number")),
    (lambda s: {k: v for k, v in s.items() if k != "results"}, ('no "results"',)),
    (lambda s: {**s, "models": {"searched": 1}}, ('"models" must be a JSON list',)),
    (lambda s: {**s, "models": ["searched"]}, ("models[0] must be a JSON object",)),
    (lambda s: {**s, "models": [{"kind": "genotype"}]}, ("models[0].name must be a string",)),
    (lambda s: {**s, "models": [{"name": "../x", "kind": "gru"}]}, ("not a model's file name",)),
    (lambda s: {**s, "models": [{"name": "m", "kind": "tcn"}]}, ("unknown kind 'tcn'",)),
    (lambda s: {**s, "results": [{"model": 1}]}, ("results[0].model must be a string",)),
    (lambda s: {**s, "genotype": None}, ('kind "genotype" but no "genotype"',)),
    (lambda s: {**s, "hidden": "4"}, ('"hidden" must be an integer, found a string',)),
]


@pytest.mark.parametrize(("damage", "fragments"), SUMMARIES)
def test_evaluate_refuses_a_wrong_summary(run: Path, damage: Callable, fragments: tuple) -> None:
    path = run / "summary.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))), encoding="utf-8")
    refused(run, "evaluate", str(path), *fragments)


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"", ("is empty",)),
        (b'{"models": [\n  {"name": "searched",\n', ("line 3, column 1", "not valid JSON")),
        (b'{"models": []}\n\xff\xfe', ("line 2", "not UTF-8", "0xff at offset 15")),
    ],
)
def test_evaluate_refuses_an_unreadable_summary(
    run: Path, content: bytes, fragments: tuple
) -> None:
    (run / "summary.json").write_bytes(content)
    refused(run, "evaluate", str(run / "summary.json"), *fragments)


def test_evaluate_a_summary_that_is_a_directory(run: Path) -> None:
    (run / "summary.json").unlink()
    (run / "summary.json").mkdir()
    refused(run, "evaluate", str(run / "summary.json"), "is a directory")


# --- config.yaml, genotype.json, the run directory -------------------------------------------


def test_evaluate_without_config(run: Path) -> None:
    (run / "config.yaml").unlink()
    refused(run, "evaluate", str(run / "config.yaml"), "not found")


def test_evaluate_with_a_config_that_is_not_utf8(run: Path) -> None:
    (run / "config.yaml").write_bytes(b"seed: 1\n\xc3(\n")
    refused(run, "evaluate", str(run / "config.yaml"), "line 2", "not UTF-8")


def test_evaluate_with_a_damaged_genotype(run: Path) -> None:
    (run / "genotype.json").write_text('{"nodes": [', encoding="utf-8")
    refused(run, "evaluate", str(run / "genotype.json"))


def test_plot_with_a_damaged_genotype(run: Path) -> None:
    (run / "genotype.json").write_bytes(b"\x00\xff")
    refused(run, "plot", str(run / "genotype.json"), "not UTF-8")


@pytest.mark.parametrize("command", ["evaluate", "plot"])
def test_a_run_dir_that_is_missing_or_a_file(run: Path, command: str) -> None:
    refused(run, command, "not found", target=run / "nope")
    refused(run, command, "is a file, not a run directory", target=run / "summary.json")


# --- history.json, metrics.jsonl ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"[{", ("line 1, column 3", "not valid JSON")),
        (b'{"epoch": 1}', ("expected a JSON list", "found a JSON object")),
        (b"[1]", ("event 1", "expected a JSON object, found a number")),
        (b'[{"epoch": 1}]', ("event 1", '"kind" must be a string, found nothing')),
        (b'[{"kind": "grow", "epoch": "1"}]', ('"epoch" must be an integer, found a string',)),
        (b'[\n{"kind": "grow",\n "note": "\xe9"}]', ("line 3", "not UTF-8", "0xe9")),
    ],
)
def test_plot_refuses_a_damaged_history(run: Path, content: bytes, fragments: tuple) -> None:
    (run / "history.json").write_bytes(content)
    refused(run, "plot", str(run / "history.json"), *fragments)


def damage_line(path: Path, number: int, content: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = content
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"{garbage", ("line 2: not valid JSON",)),
        (b"3", ("line 2: expected a JSON object (one row), found a number",)),
        (b"[1]", ("line 2: expected a JSON object (one row), found a JSON list",)),
        (b'{"phase": "search", "epoch": "2"}', ('line 2: "epoch" must be an integer',)),
        (b'{"phase": "train", "epoch": 1, "valid_loss": "low"}', ('"valid_loss" must be a',)),
        (b'{"phase": "search", "note": "\xff"}', ("line 2: not UTF-8", "0xff at offset")),
    ],
)
def test_plot_refuses_a_damaged_metrics_line(run: Path, content: bytes, fragments: tuple) -> None:
    damage_line(run / "metrics.jsonl", 2, content)
    refused(run, "plot", str(run / "metrics.jsonl"), *fragments)


# --- the plots' place ----------------------------------------------------------------------------


def test_plot_when_plots_is_a_file(run: Path) -> None:
    shutil.rmtree(run / "plots")
    (run / "plots").write_text("my notes", encoding="utf-8")
    refused(run, "plot", f"{run / 'plots'} is a file; move it away so the plots can be written")


def test_plot_when_a_plot_is_a_directory(run: Path) -> None:
    (run / "plots" / "arch.png").unlink()
    (run / "plots" / "arch.png").mkdir()
    refused(run, "plot", f"{run / 'plots' / 'arch.png'} is a directory")


def test_plot_of_an_intact_run_still_works(run: Path) -> None:
    code, lines = run_cli("plot", str(run))
    assert code == 0, lines
    assert (run / "plots" / "growth.png").is_file()


# --- the readers --------------------------------------------------------------------------------


def test_read_metrics_tolerates_only_a_last_line_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 0}\n\n{"epoch": 1}\n{"epoch": 2, "lo')
    assert run_files.read_metrics(path) == [{"epoch": 0}, {"epoch": 1}]
    path.write_bytes(b'{"epoch": 0}\n{"epoch": 1, "n": "\xc3')  # cut inside a character
    assert run_files.read_metrics(path) == [{"epoch": 0}]
    path.write_bytes(b'{"epoch": 0}\n{"epoch": 1}')  # whole, only its newline missing
    assert run_files.read_metrics(path) == [{"epoch": 0}, {"epoch": 1}]
    path.write_bytes(b'{"epoch": 0}\n{"epoch": 2, "lo\n')  # with its newline: not a crash's cut
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2: not valid JSON"):
        run_files.read_metrics(path)
    path.write_bytes(b'{"epoch": 0}\n3')  # a whole value, but not a row
    with pytest.raises(UserError, match="line 2: expected a JSON object"):
        run_files.read_metrics(path)


def test_read_metrics_names_the_byte_offset_of_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 0}\n{"a": "\xff"}\n')
    with pytest.raises(UserError, match=r"line 2: not UTF-8 text \(byte 0xff at offset 20\)"):
        run_files.read_metrics(path)


def test_read_metrics_missing_or_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        run_files.read_metrics(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a directory"):
        run_files.read_metrics(tmp_path)


def test_read_json_checks_the_top_level(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert run_files.read_json(path) == {"a": [1, 2]}
    with pytest.raises(UserError, match="expected a JSON list at the top level, found a JSON obj"):
        run_files.read_json(path, list)
    path.write_text('{"a": [1,\n 2,,]}', encoding="utf-8")
    with pytest.raises(UserError, match=r"x\.json: line 2, column 4: not valid JSON"):
        run_files.read_json(path)
    with pytest.raises(UserError, match="not found"):
        run_files.read_json(tmp_path / "none.json")


def test_read_history_and_summary_accept_what_a_run_writes(finished_run: Path) -> None:
    events = run_files.read_history(finished_run / "history.json")
    assert events and events[0]["kind"] == "grow"
    summary = run_files.read_summary(finished_run)
    assert [m["name"] for m in summary["models"]] == ["searched"]
    assert run_files.read_metrics(finished_run / "metrics.jsonl")
