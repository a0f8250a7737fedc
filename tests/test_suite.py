"""The benchmark suite: its arithmetic on hand-made rows, its files, its errors, one real run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from morphnas import peers, suite
from morphnas.errors import UserError
from morphnas.genotype import Genotype, Node
from morphnas.tasks.forecasting import Forecasting


def _row(dataset: str, seed: int, model: str, **metrics: float) -> dict:
    """A row as ``collect`` makes it; the searched cell's carries its derived cell."""
    cell = {"genotype": f"add(h,u) → seed {seed}"} if model == "searched" else {}
    return {"dataset": dataset, "seed": seed, "model": model, **cell, **metrics}


def _forecast_rows() -> list[dict]:
    """Two seeds of one dataset. In both, the baseline with the best *valid* RSE is not the one
    with the best *test* RSE; a non-baseline row (grow-and-prune's one-shot) has the best valid
    of all and must not be chosen, nor a baseline whose valid score is NaN."""
    rows = []
    for seed, (s_test, a_test, b_test) in enumerate([(0.70, 0.90, 0.40), (0.50, 0.80, 0.30)]):
        rows += [
            _row("d", seed, "searched", params=100, valid_rse=0.55, test_rse=s_test,
                 test_corr=0.6, train_seconds=2.0, search_seconds=10.0 + seed),
            _row("d", seed, "one-shot", valid_rse=0.01, test_rse=0.01, test_corr=0.9),
            _row("d", seed, "a", baseline=True, params=50, valid_rse=0.50, test_rse=a_test,
                 test_corr=0.5, train_seconds=1.0),
            _row("d", seed, "b", baseline=True, params=70, valid_rse=0.60, test_rse=b_test,
                 test_corr=0.8, train_seconds=3.0 + seed),
            _row("d", seed, "c", baseline=True, params=1, valid_rse=math.nan, test_rse=0.0,
                 test_corr=1.0, train_seconds=0.0),
        ]  # fmt: skip
    return rows


def test_the_best_baseline_is_chosen_on_valid_never_on_test():
    paired = suite.paired_differences(_forecast_rows())
    assert [(p["seed"], p["best_baseline"], p["chosen_by"]) for p in paired] == [
        (0, "a", "valid_rse"),
        (1, "a", "valid_rse"),
    ]
    # searched − a on test, though b (and the NaN-valid c) would look better on test
    assert paired[0]["delta_test_rse"] == pytest.approx(0.70 - 0.90)
    assert paired[1]["delta_test_rse"] == pytest.approx(0.50 - 0.80)
    assert paired[0]["delta_test_corr"] == pytest.approx(0.6 - 0.5)


def test_language_models_are_paired_on_perplexity():
    rows = [
        _row("shakespeare", 0, "searched", valid_ppl=300.0, test_ppl=350.0),
        _row("shakespeare", 0, "lstm", baseline=True, valid_ppl=310.0, test_ppl=330.0),
        _row("shakespeare", 0, "gru", baseline=True, valid_ppl=290.0, test_ppl=360.0),
    ]
    (paired,) = suite.paired_differences(rows)
    assert paired["best_baseline"] == "gru" and paired["chosen_by"] == "valid_ppl"
    assert paired["delta_test_ppl"] == pytest.approx(-10.0)
    assert "delta_test_rse" not in paired


def test_a_run_without_a_usable_baseline_has_no_difference():
    rows = [
        _row("d", 0, "searched", valid_rse=0.5, test_rse=0.5),
        _row("d", 0, "c", baseline=True, valid_rse=math.nan, test_rse=0.1),
    ]
    assert suite.paired_differences(rows) == []
    (summary,) = suite.aggregate(rows)["summary"]
    assert summary["best_baselines"] == [] and "delta_test_rse" not in summary


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    tables = suite.aggregate(_forecast_rows())
    table = {row["model"]: row for row in tables["table"]}
    assert list(table) == ["searched", "one-shot", "a", "b", "c"]  # order of appearance
    searched, b = table["searched"], table["b"]
    assert searched["seeds"] == 2 and searched["dataset"] == "d"
    assert searched["test_rse"] == pytest.approx(0.60)
    assert searched["test_rse_std"] == pytest.approx(math.sqrt(2 * 0.1**2))  # n − 1 = 1
    assert searched["search_seconds"] == pytest.approx(10.5)
    assert b["train_seconds"] == pytest.approx(3.5) and b["params"] == 70
    assert "search_seconds" not in b
    (summary,) = tables["summary"]
    deltas = [0.70 - 0.90, 0.50 - 0.80]
    assert summary["delta_test_rse"] == pytest.approx(sum(deltas) / 2)
    assert summary["delta_test_rse_std"] == pytest.approx(abs(deltas[0] - deltas[1]) / math.sqrt(2))
    assert summary["best_baselines"] == ["a", "a"] and summary["chosen_by"] == "valid_rse"


def _result(rows: list[dict]) -> dict:
    """What ``benchmark`` writes, around hand-made rows."""
    machine = {
        "cpu_count": 2, "cpu_name": "Test CPU", "device": "cpu", "device_name": "Test CPU",
        "torch": "2.x", "date": "2026-01-01 00:00:00", "load_average_1min": 0.5,
    }  # fmt: skip
    return {
        "command": "morphnas benchmark --datasets d",
        "commit": "abc1234",
        "machine": machine,
        "quick": False,
        "datasets": [{"dataset": "d", "budget": "tiny"}],
        "seeds": [0, 1],
        "peers": suite.PEERS,
        "runs": rows,
        **suite.aggregate(rows),
    }


def test_markdown_holds_provenance_both_tables_and_the_cells():
    text = suite.markdown(_result(_forecast_rows()))
    assert "`morphnas benchmark --datasets d`" in text
    assert "commit: abc1234" in text and "2 cores, Test CPU" in text
    assert "budget, d: tiny" in text
    assert "lowest **valid** RSE" in text and "never chosen on test" in text
    assert "| d | 10.5 ± 0.7 | -0.25 ± 0.071 | +0.1 ± 0 | a, a |" in text
    assert "| d | searched | 2 | 100 ± 0 | 0.55 ± 0 | 0.6 ± 0.14 | 0.6 ± 0 | 2.0 ± 0.0 |" in text
    assert "| d | c | 2 | 1 ± 0 | nan ± nan |" in text  # shown, never hidden
    assert "- d, seed 1: `add(h,u) → seed 1`" in text
    assert text.rstrip().endswith(suite.PEERS)


def test_compact_genotype_is_one_line_of_ops():
    cell = Genotype(
        "two_input",
        (Node("add_tanh", (-1, 0)), Node("hadamard", (1, -1)), Node("add", (2, 1), True)),
        output_activation="tanh",
    )
    assert suite.compact_genotype(cell) == (
        "add_tanh(u,h); hadamard(s1,u); s2 + γ3 ⊙ add(s2,s1) → h_t = tanh(last node)"
    )


def test_every_accepted_baseline_runs_and_the_lm_drops_the_tabular_ones():
    forecast = suite.accepted_baselines(lm=False)
    assert {"lstm", "gru", "ar", "naive", "snaive", "var"} <= set(forecast)
    assert forecast == [b for b in suite.BASELINES if b in forecast]  # table order
    tabular = Forecasting.baselines
    assert suite.accepted_baselines(lm=True) == [b for b in forecast if b not in tabular]


def test_dataset_configs_share_the_user_settings_and_keep_the_lm_budget():
    sets = {"search": {"epochs": 3}, "space": {"options": {"dropout_h": 0.3}}}
    births = suite.dataset_config("births", None, sets, quick=False)
    lm = suite.dataset_config("shakespeare", None, sets, quick=False)
    assert births.task == "forecast" and lm.task == "lm"
    assert births.search.epochs == lm.search.epochs == 3
    assert births.train.baselines == suite.accepted_baselines(lm=False)
    assert lm.train.baselines == suite.accepted_baselines(lm=True)
    assert births.space.hidden == 32 and lm.space.hidden == 64  # the LM's own defaults
    assert lm.space.options == {"dropout_h": 0.3, "dropout_x": 0.1}
    quick = suite.dataset_config("shakespeare", None, {"train": {"baselines": ["lstm"]}}, True)
    assert quick.space.hidden == 8 and quick.train.baselines == ["lstm"]


def test_the_python_face_refuses_bad_requests_before_any_run(tmp_path):
    with pytest.raises(UserError, match="did you mean 'births'"):
        suite.benchmark(["birth"], out=tmp_path / "a")
    with pytest.raises(UserError, match="distinct"):
        suite.benchmark(["synthetic", "synthetic"], out=tmp_path / "a")
    with pytest.raises(UserError, match=r"drop data\.csv"):
        suite.benchmark(["synthetic"], overrides={"data": {"csv": "x.csv"}}, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def morphnas(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "morphnas.cli", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


def _one_line_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], done.stderr


def test_cli_refuses_an_unknown_dataset_in_one_line(tmp_path):
    done = morphnas("benchmark", "--datasets", "births,weather", "--out", str(tmp_path / "b"))
    _one_line_error(done, "unknown benchmark dataset 'weather'")
    assert not (tmp_path / "b").exists()


TINY = [
    "--quick", "--datasets", "synthetic", "--set", "search.epochs=1", "--set", "train.epochs=1",
    "--set", "space.nodes=2", "--set", "space.hidden=4", "--peer-steps", "2",
]  # fmt: skip
# Where the peers extra is installed, its models follow ours in the table.
PEER_ROWS = list(peers.MODELS) if peers.available() else []


def test_quick_benchmark_end_to_end_then_reused(tmp_path):
    out = tmp_path / "bench"
    done = morphnas("benchmark", *TINY, "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    written = json.loads((out / "benchmark.json").read_text())
    assert printed["results"] == written["table"] and printed["run_dir"] == str(out)
    models = [row["model"] for row in written["table"]]
    assert models[0] == "searched"
    assert models[1:] == suite.accepted_baselines(lm=False) + PEER_ROWS
    assert all(row["seeds"] == 1 and row["dataset"] == "synthetic" for row in written["table"])
    (paired,) = written["paired"]
    assert paired["best_baseline"] in models[1:] and paired["chosen_by"] == "valid_rse"
    run = out / "synthetic-seed0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["results"][0]["test_rse"] == written["table"][0]["test_rse"]
    assert written["quick"] and written["seeds"] == [0]
    assert "--quick --datasets synthetic" in written["command"]
    markdown = (out / "benchmark.md").read_text()
    assert "| synthetic | searched | 1 |" in markdown and "synthetic, seed 0: `" in markdown

    again = morphnas("benchmark", *TINY, "--out", str(out))
    _one_line_error(again, "pass --reuse")
    before = (run / "summary.json").stat().st_mtime_ns
    reused = morphnas("benchmark", *TINY, "--out", str(out), "--reuse")
    assert reused.returncode == 0, reused.stderr
    assert (run / "summary.json").stat().st_mtime_ns == before  # kept, not run again
    assert (run / peers.FILE).is_file() == bool(PEER_ROWS)
    assert "Searched cell against the best baseline" in reused.stdout
    assert json.loads((out / "benchmark.json").read_text())["table"] == written["table"]
