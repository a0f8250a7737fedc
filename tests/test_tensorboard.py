"""TensorBoard events (morphnas.tensorboard): read back with TensorBoard's own reader, they
hold what the run's files hold — metrics rows, mixing weights, growth, genotype, HParams — once
each, resumed or not; off (``--no-tensorboard``) or without the package, a run writes none."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import TINY_RUN, run_cli
from morphnas import cli, config, genotype, run_files, tensorboard
from morphnas.errors import UserError

EVERYTHING = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}


def events(run: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance=EVERYTHING)
    return accumulator.Reload()


def scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the events should hold, worked out row by row, key by key."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if "event" in row:
            continue
        prefix = "/".join(str(row[k]) for k in ("phase", "model") if k in row)
        for key, value in row.items():
            if key in ("phase", "model", "epoch", "arch") or isinstance(value, bool | str):
                continue
            if isinstance(value, int | float):
                expected.setdefault(f"{prefix}/{key}", []).append((row["epoch"], value))
    return expected


def texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


def test_a_run_s_events_hold_its_metrics_weights_genotype_and_hparams(finished_run):
    acc = events(finished_run)
    rows = run_files.read_metrics(finished_run / "metrics.jsonl")
    got, want = scalars(acc), expected_scalars(rows)
    for tag, points in want.items():  # every number of every row, once, at its epoch
        assert [step for step, _ in got[tag]] == [step for step, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert {"search/valid_loss", "train/searched/valid_loss", "train/lstm/train_loss"} <= set(want)

    search = [row for row in rows if row.get("phase") == "search" and "arch" in row]
    assert [image.step for image in acc.Images("arch/probabilities")] == [
        row["epoch"] for row in search
    ]
    assert acc.Images("arch/probabilities")[0].encoded_image_string.startswith(b"\x89PNG")
    for node in range(1, len(search[-1]["arch"]) + 1):  # each histogram counts its node's weights
        for row, histogram in zip(search, acc.Histograms(f"arch/s{node}"), strict=True):
            weights = np.asarray(row["arch"][node - 1], dtype=float).ravel()
            assert histogram.step == row["epoch"]
            assert histogram.histogram_value.num == weights.size
            assert histogram.histogram_value.sum == pytest.approx(weights.sum(), rel=1e-6)
            assert histogram.histogram_value.max == pytest.approx(weights.max(), rel=1e-6)

    cell = genotype.load(finished_run / "genotype.json")
    [(_, text)] = texts(acc, "genotype/text_summary")
    assert text.replace("\n    ", "\n").strip() == str(cell).strip()

    summary = run_files.read_summary(finished_run)
    searched = next(r for r in summary["results"] if r["model"] == "searched")
    final = dict(scalars(acc)["hparams/test_rse"])
    assert final[0] == pytest.approx(searched["test_rse"], rel=1e-6)
    start = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["space.hidden"].number_value == 8 and hparams["task"].string_value == "forecast"


def _search_row(epoch: int, loss: float, nodes: int) -> dict:
    arch = [[[0.25, 0.75]] for _ in range(nodes)]
    return {"phase": "search", "epoch": epoch, "valid_loss": loss, "nodes": nodes, "arch": arch}


def _grow(epoch: int) -> dict:
    return {"epoch": epoch, "step": 0, "kind": "grow", "nodes_before": 1, "nodes_after": 2}


def test_a_resumed_run_rewrites_its_events_without_a_step_twice(tmp_path):
    """The stopped run had logged epoch 3 and a growth at it, past its last checkpoint (epoch
    2); the resumed one drops both and logs epoch 3 anew: the events follow the files."""
    run, settings = tmp_path / "run", config.RunConfig()
    log = run_files.MetricsLog(run / "metrics.jsonl")
    first = tensorboard.attach(log, run, settings, ("a", "b"))
    assert first is not None
    log.append(_search_row(1, 3.0, 1))
    run_files.write_json(run / "history.json", [_grow(1)])
    log.append(_search_row(2, 2.0, 2))
    run_files.write_json(run / "history.json", [_grow(1), _grow(3)])
    log.append(_search_row(3, 1.5, 3))
    log.append({"phase": "search", "event": "skipped-step", "epoch": 3, "batch": 4})

    def repair() -> None:  # what runs.continue_run does for a checkpoint at epoch 2
        log.keep(lambda row: row["epoch"] <= 2)
        run_files.write_json(run / "history.json", [_grow(1)])

    resumed = run_files.MetricsLog(run / "metrics.jsonl", before_first=repair)
    board = tensorboard.attach(resumed, run, settings, ("a", "b"))
    resumed.append(_search_row(3, 1.25, 2))
    resumed.append({"phase": "train", "model": "lstm", "epoch": 1, "valid_loss": 0.5})
    tensorboard.finish(board, settings, None, [{"model": "lstm", "test_rse": 0.7}])

    acc = events(run)
    assert [p.name for p in (run / "tensorboard").iterdir()] == [tensorboard.EVENT_FILE]
    got = scalars(acc)
    assert got["search/valid_loss"] == [(1, 3.0), (2, 2.0), (3, 1.25)]
    assert got["train/lstm/valid_loss"] == [(1, 0.5)]
    assert got["growth/nodes"] == [(1, 2.0)]
    assert [step for step, _ in texts(acc, "growth/events/text_summary")] == [1]
    assert "search/events/text_summary" not in acc.Tags()["tensors"]
    assert [image.step for image in acc.Images("arch/probabilities")] == [1, 2, 3]
    assert got["hparams/test_rse"] == [(0, pytest.approx(0.7))]


def test_off_or_without_the_package_a_run_writes_no_events(tmp_path, monkeypatch, synthetic_csv):
    tiny = [*TINY_RUN, "--set", "train.baselines=[]"]
    code, _ = run_cli("search", "--csv", str(synthetic_csv), *tiny, "--no-tensorboard",
                      "--out", str(tmp_path / "off"))  # fmt: skip
    assert code == 0 and (tmp_path / "off" / "summary.json").is_file()
    assert not (tmp_path / "off" / "tensorboard").exists()
    assert "tensorboard: false" in (tmp_path / "off" / "config.yaml").read_text()

    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails
    monkeypatch.setattr(tensorboard, "_warned", False)
    with pytest.warns(UserWarning, match="tensorboard is not installed") as warned:
        code, _ = run_cli("search", "--csv", str(synthetic_csv), *tiny,
                          "--out", str(tmp_path / "bare"))  # fmt: skip
    assert code == 0 and (tmp_path / "bare" / "summary.json").is_file()
    assert not (tmp_path / "bare" / "tensorboard").exists()
    assert len([w for w in warned if "tensorboard" in str(w.message)]) == 1


def test_resume_refuses_no_tensorboard_as_it_does_every_other_flag(tmp_path):
    with pytest.raises(UserError, match="drop --tensorboard"):
        cli._resumed("search", tmp_path, tensorboard=False)


def test_row_prefix_names_phase_model_and_lambda():
    assert tensorboard.row_prefix({"phase": "search"}) == "search"
    assert tensorboard.row_prefix({"phase": "train", "model": "gru"}) == "train/gru"
    row = {"phase": "gates", "model": "vgg", "lambda": 0.01}
    assert tensorboard.row_prefix(row) == "gates/vgg/lambda_0.01"


def test_the_heatmap_has_one_row_per_edge_in_order():
    arch = [[[0.1, 0.9]], [[0.2, 0.8], [0.3, 0.7]]]  # a node of one edge, a node of two
    labels, matrix = tensorboard.arch_matrix(arch)
    assert labels == ["s1", "s2.0", "s2.1"]
    assert matrix.tolist() == [edge for node in arch for edge in node]
