"""morphnas.report: metrics files survive crashes, every plot renders, the table reads well."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

from morphnas import report, run_files
from morphnas.errors import UserError
from morphnas.genotype import DARTS_PRIMITIVES, KNOWN, TWO_INPUT_OPS, Genotype, Node

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.suffix == ".png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def softmax_rows(rng: np.random.Generator, n_rows: int, n_ops: int) -> list[list[float]]:
    logits = rng.normal(size=(n_rows, n_ops))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs.tolist()


def search_rows(space: str, epochs: int = 6, grow_every: int = 2) -> list[dict]:
    """Search rows whose node count grows by one every ``grow_every`` epochs (from 2 nodes)."""
    rng = np.random.default_rng(0)
    n_ops = len(DARTS_PRIMITIVES if space == "darts_rnn" else TWO_INPUT_OPS)
    rows = []
    for epoch in range(epochs):
        n_nodes = 2 + epoch // grow_every
        edges = [i if space == "darts_rnn" else 1 for i in range(1, n_nodes + 1)]
        arch = [softmax_rows(rng, n_edges, n_ops) for n_edges in edges]
        loss = 1.0 / (epoch + 1)
        rows.append(
            {
                "phase": "search",
                "epoch": epoch,
                "train_loss": loss,
                "valid_loss": loss * 1.1,
                "seconds": 0.5,
                "arch": arch,
            }
        )
    return rows


def train_rows(model: str, epochs: int = 8, scale: float = 1.0) -> list[dict]:
    return [
        {
            "phase": "train",
            "model": model,
            "epoch": e,
            "train_loss": scale * 10.0**-e,
            "valid_loss": scale * 2 * 10.0**-e,
            "seconds": 1.0,
        }
        for e in range(epochs)
    ]


# --------------------------------------------------------------------------- metrics files


def test_metrics_log_round_trips_numpy_and_torch_values(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    log = run_files.MetricsLog(path)
    log.append(
        {
            "epoch": np.int64(3),
            "loss": np.float32(0.5),
            "ok": np.bool_(True),
            "probs": np.array([[0.25, 0.75]]),
            "t": torch.tensor(2.5),
            "tv": torch.tensor([1.0, 2.0], requires_grad=True),
            "name": "searched",
        }
    )
    log.append({"epoch": 4, "loss": 0.25})
    rows = run_files.read_metrics(path)
    assert rows == [
        {
            "epoch": 3,
            "loss": 0.5,
            "ok": True,
            "probs": [[0.25, 0.75]],
            "t": 2.5,
            "tv": [1.0, 2.0],
            "name": "searched",
        },
        {"epoch": 4, "loss": 0.25},
    ]
    assert type(rows[0]["epoch"]) is int


def test_metrics_log_reopened_appends_instead_of_truncating(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    run_files.MetricsLog(path).append({"epoch": 0})
    run_files.MetricsLog(path).append({"epoch": 1})
    assert [r["epoch"] for r in run_files.read_metrics(path)] == [0, 1]


def test_metrics_log_rejects_unserialisable_values(tmp_path: Path) -> None:
    log = run_files.MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(TypeError, match="object"):
        log.append({"bad": object()})
    assert run_files.read_metrics(log.path) == []


def test_read_metrics_skips_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, "lo', encoding="utf-8")
    assert run_files.read_metrics(path) == [{"epoch": 0}, {"epoch": 1}]


def test_resumed_log_drops_the_partial_line_so_new_rows_stay_readable(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1, "lo', encoding="utf-8")
    run_files.MetricsLog(path).append({"epoch": 1})
    assert run_files.read_metrics(path) == [{"epoch": 0}, {"epoch": 1}]


def test_read_metrics_reports_damage_before_the_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\nnot json\n{"epoch": 2}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2"):
        run_files.read_metrics(path)


def test_read_metrics_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        run_files.read_metrics(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- write_json


def test_write_json_is_complete_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "summary.json"
    run_files.write_json(path, {"old": True})
    run_files.write_json(path, {"rse": np.float32(0.5), "params": np.int64(7), "names": ["a"]})
    assert json.loads(path.read_text(encoding="utf-8")) == {"rse": 0.5, "params": 7, "names": ["a"]}
    assert path.read_text(encoding="utf-8").startswith('{\n  "rse"')  # indent 2
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_write_json_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    run_files.write_json(path, {"old": True})
    with pytest.raises(TypeError):
        run_files.write_json(path, {"bad": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_json_gets_ordinary_file_permissions(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text("{}", encoding="utf-8")
    run_files.write_json(tmp_path / "atomic.json", {})
    assert (tmp_path / "atomic.json").stat().st_mode == plain.stat().st_mode


# --------------------------------------------------------------------------- plots


@pytest.mark.parametrize(
    ("space", "ops"), [("darts_rnn", DARTS_PRIMITIVES), ("two_input", TWO_INPUT_OPS)]
)
def test_plot_arch_weights_with_a_growing_node_count(
    space: str, ops: tuple, tmp_path: Path
) -> None:
    rows = search_rows(space) + train_rows("lstm")  # train rows are ignored
    out = report.plot_arch_weights(rows, ops, tmp_path / "plots" / "arch.png")
    assert out == tmp_path / "plots" / "arch.png"
    assert_png(out)


def test_plot_arch_weights_checks_its_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="op names"):
        report.plot_arch_weights(search_rows("darts_rnn"), TWO_INPUT_OPS, tmp_path / "a.png")
    with pytest.raises(UserError, match="no search rows"):
        report.plot_arch_weights(train_rows("lstm"), DARTS_PRIMITIVES, tmp_path / "a.png")


def test_plot_learning_curves_search_and_models(tmp_path: Path) -> None:
    rows = search_rows("two_input") + train_rows("searched") + train_rows("gru", scale=3)
    rows.append({**rows[-1], "valid_loss": None})  # a resumed run repeating an epoch, no valid
    out = report.plot_learning_curves(rows, tmp_path / "curves")
    assert out == tmp_path / "curves.png"
    assert_png(out)


def test_plot_learning_curves_needs_rows(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        report.plot_learning_curves([], tmp_path / "c.png")


def test_plot_forecasts_with_and_without_dates(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(300, 5)).cumsum(axis=0)
    preds = {"searched": truth + rng.normal(size=truth.shape), "lstm": truth * 0.9}
    columns = [f"s{j}" for j in range(5)]
    index = pd.date_range("2021-01-01", periods=300, freq="h")
    assert_png(report.plot_forecasts(truth, preds, columns, tmp_path / "f1.png", index=index))
    assert_png(report.plot_forecasts(truth, preds, columns, tmp_path / "f2.png", n_series=9))


def test_plot_forecasts_rejects_mismatched_shapes(tmp_path: Path) -> None:
    truth = np.zeros((10, 2))
    with pytest.raises(ValueError, match="shape"):
        report.plot_forecasts(truth, {"m": np.zeros((9, 2))}, ["a", "b"], tmp_path / "f.png")
    with pytest.raises(ValueError, match="column names"):
        report.plot_forecasts(truth, {"m": truth}, ["a"], tmp_path / "f.png")


def test_forecast_series_are_the_most_variable() -> None:
    values = np.array([[0.0, 0.0, 5.0, 1.0], [0.0, 3.0, -5.0, 1.0]])
    assert report._most_variable(values, 2) == [2, 1]


GENOTYPES = [
    Genotype(
        "darts_rnn",
        (Node("tanh", (0,)), Node("relu", (1,)), Node("sigmoid", (1,)), Node("identity", (0,))),
        "mean",
    ),
    Genotype(
        "two_input",
        (Node("hadamard", (-1, 0)), Node("add_tanh", (1, 1)), Node("highway", (-1, 2))),
        "last",
    ),
    Genotype("two_input", (Node("add", (-1, 0)),), "mean"),
    KNOWN["lstm"],  # carries c: an input box c_{t-1} and an output box c_t
]


@pytest.mark.parametrize("genotype", GENOTYPES, ids=lambda g: f"{g.space}-{len(g.nodes)}")
def test_plot_genotype_without_dot(
    genotype: Genotype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = report.plot_genotype(genotype, tmp_path / "cell.svg")
    assert out == tmp_path / "cell.png"
    assert_png(out)


def test_plot_genotype_uses_graphviz_when_dot_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graphviz = pytest.importorskip("graphviz")
    sources = []

    def fake_pipe(self, format: str) -> bytes:
        sources.append(self.source)
        return PNG_MAGIC + b"\0" * 2000

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/dot")
    monkeypatch.setattr(graphviz.Digraph, "pipe", fake_pipe)
    assert_png(report.plot_genotype(GENOTYPES[1], tmp_path / "cell.png"))
    (source,) = sources
    assert "s2\\nadd_tanh" in source and "hₜ = s3" in source
    assert source.count("label=a") == 3 and source.count("label=b") == 3


def test_cell_graph_shows_the_carried_cell_state() -> None:
    states, edges = report._cell_graph(KNOWN["lstm"])
    labels = {s.key: s.label for s in states}
    assert labels["c"] == "cₜ₋₁" and labels["c_out"] == "cₜ = s7"
    assert ("c", "s5", "b") in edges and ("s7", "c_out", "") in edges
    assert "c" not in {s.key for s in report._cell_graph(KNOWN["gru"])[0]}


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' binary not installed")
def test_plot_genotype_with_real_dot(tmp_path: Path) -> None:
    pytest.importorskip("graphviz")
    assert_png(report.plot_genotype(GENOTYPES[0], tmp_path / "cell.png"))


# --------------------------------------------------------------------------- results table


def render(table: object, styles: bool = False) -> str:
    console = Console(record=True, width=140, force_terminal=True, color_system="standard")
    console.print(table)
    return console.export_text(styles=styles)


def test_results_table_formats_numbers_and_marks_missing() -> None:
    results = [
        {
            "model": "searched",
            "params": 123456,
            "valid_rse": 0.123456,
            "test_rse": np.float32(0.25),
            "test_corr": 0.9,
            "test_mae": 12.3456,
            "test_rmse": 1e-5,
            "train_seconds": 12345.6,
        },
        {"model": "lstm", "params": 98000, "test_rse": 0.5},
        {"model": "[red]gru"},
    ]
    text = render(report.results_table(results, title="ETT"))
    for expected in (
        "ETT",
        "searched",
        "lstm",
        "[red]gru",
        "123,456",
        "98,000",
        "0.1235",
        "0.25",
        "12.35",
        "1e-05",
        "12,346",
        "train s",
        "test CORR",
        "–",
    ):
        assert expected in text
    assert "0.123456" not in text


def test_results_table_bolds_the_best_test_rse() -> None:
    results = [{"model": "lstm", "test_rse": 0.5}, {"model": "searched", "test_rse": 0.25}]
    styled = render(report.results_table(results), styles=True)
    assert "\x1b[1m0.25" in styled
    assert "\x1b[1m0.5" not in styled


def test_the_compare_table_cuts_no_digit_in_80_columns():
    row = {
        "variant": "darts_prime:reg=admm", "seeds": 3,
        "search_seconds": 275.1, "search_seconds_std": 81.4, "search_cpu_seconds": 50.6,
        "search_valid_loss": 0.50013, "search_valid_loss_std": 0.00068, "nodes": 4,
        "params": 10885, "params_std": 4263.2, "test_rse": 0.091961, "test_rse_std": 0.00131,
        "test_corr": 0.69241, "test_corr_std": 0.0034, "cell_width": 1.5, "cell_depth": 5.0,
    }  # fmt: skip
    narrow = Console(width=80, record=True)
    narrow.print(report.compare_table([row], width=80))
    text = narrow.export_text()
    assert "…" not in text
    for shown in ("darts_prime:reg=admm", "275.1", "±81", "0.09196", "±0.001", "0.6924", "1.5/5"):
        assert shown in text, shown
    assert "CPU s, nodes, params: in compare.json" in text  # what did not fit, named
    wide = Console(width=160, record=True)
    wide.print(report.compare_table([row], width=160))
    assert "CPU s" in wide.export_text() and "compare.json" not in wide.export_text()
