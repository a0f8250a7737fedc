"""``morphnas prune RUN``: DNAL's channel stages on a finished run, its rows, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import morphnas, run_cli, without_times
from morphnas import config as config_mod

IMAGES = ["--task", "classify", "--limit", "300", "--hidden", "4", "--threads", "1"]
# Few epochs of everything: the point is the machinery, not the accuracy.
QUICK = ["--arch-epochs", "2", "--finetune-epochs", "2"]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vgg") / "run"
    done = morphnas(
        "train", "--baseline", "vgg_small", *IMAGES, "--retrain-epochs", "2", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def series_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gru") / "run"
    done = morphnas(
        "train", "--baseline", "gru", "--dataset", "synthetic", "--window", "6", "--hidden", "6",
        "--threads", "1", "--retrain-epochs", "2", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def _refused(*args: str, fragments: tuple[str, ...]) -> None:
    """``morphnas ARGS`` in-process (no interpreter start): exit 2 and one stderr line holding
    every fragment."""
    code, lines = run_cli(*args)
    assert code == 2 and len(lines) == 1, lines
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


def _summary(run: Path) -> dict:
    return json.loads((run / "prune" / "summary.json").read_text())


def _comparable(summary: dict) -> list[dict]:
    """Rows without what differs between any two runs (wall-clock times and latencies)."""
    return [
        {k: v for k, v in row.items() if "seconds" not in k and not k.startswith("latency")}
        for row in summary["results"]
    ]


def test_prune_gives_one_row_per_lambda_with_smaller_networks(image_run, tmp_path):
    run = _copy(image_run, tmp_path)
    done = morphnas("prune", str(run), "--lambdas", "0,0.3", *QUICK)
    assert done.returncode == 0, done.stderr
    assert "channel pruning" in done.stdout
    rows = _summary(run)["results"]
    assert [(r["model"], r["lambda"]) for r in rows] == [("vgg_small", 0.0), ("vgg_small", 0.3)]
    for row in rows:
        for key in ("params", "flops", "test_accuracy", "valid_accuracy"):
            assert {f"{key}_before", f"{key}_after"} <= row.keys()
        assert row["params_after"] <= row["params_before"]
        assert 0 < row["channels_kept"] <= row["channels"]
        assert row["latency_ms_masked"] > 0 and row["latency_ms_after"] > 0
    strong = rows[1]
    assert strong["params_after"] < strong["params_before"]
    assert strong["flops_after"] < strong["flops_before"]
    assert strong["channels_kept"] < rows[0]["channels_kept"]  # λ prunes
    # The pruned network's state is saved, and its gates' read-out with it.
    saved = torch.load(run / "prune" / "masks" / "vgg_small_0.3.pt", weights_only=True)
    assert sum(int(m.sum()) for m in saved["masks"].values()) == strong["channels_kept"]
    assert (run / "prune" / "models" / "vgg_small_0.3.pt").is_file()
    phases = {json.loads(line)["phase"] for line in (run / "prune" / "metrics.jsonl").open()}
    assert phases == {"gates", "finetune"}


def test_prune_on_a_forecasting_run_gates_hidden_units(series_run, tmp_path):
    run = _copy(series_run, tmp_path)
    done = morphnas("prune", str(run), "--lambdas", "0.5", *QUICK, "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["results"]
    assert row["model"] == "gru" and row["channels"] == 6
    assert {"test_rse_before", "test_rse_after", "valid_rse_before"} <= row.keys()
    assert row["params_after"] <= row["params_before"]


RESUMED = ["--lambdas", "0.3", *QUICK]


@pytest.fixture(scope="module")
def uninterrupted(image_run, tmp_path_factory) -> Path:
    whole = _copy(image_run, tmp_path_factory.mktemp("whole"), "whole")
    assert morphnas("prune", str(whole), *RESUMED).returncode == 0
    return whole


@pytest.mark.parametrize("crash", ["gates-step:3", "checkpoint:2", "train-step:2"])
def test_prune_killed_at_any_stage_resumes_to_the_same_masks_and_metrics(
    image_run, uninterrupted, tmp_path, crash
):
    """SIGKILL in the gate stage, while a checkpoint is being written, or while fine-tuning;
    ``--resume`` then ends where the uninterrupted command does."""
    whole = uninterrupted
    killed = _copy(image_run, tmp_path, "killed")
    done = morphnas("prune", str(killed), *RESUMED, crash=crash)
    assert done.returncode != 0 and not (killed / "prune" / "summary.json").exists()
    resumed = morphnas("prune", str(killed), *RESUMED, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _comparable(_summary(killed)) == _comparable(_summary(whole))
    logs = [
        [without_times(json.loads(line)) for line in (r / "prune" / "metrics.jsonl").open()]
        for r in (whole, killed)
    ]
    assert logs[0] == logs[1]  # the rows a crash left after the last checkpoint were dropped
    masks = [
        torch.load(r / "prune" / "masks" / "vgg_small_0.3.pt", weights_only=True)["masks"]
        for r in (whole, killed)
    ]
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--lambdas", "-1e-4"], ["λ must be >= 0"]),
        (["--lambdas", "abc"], ["lambdas"]),
        (["--threshold", "1.5"], ["threshold"]),
        (["--threshold", "0"], ["threshold"]),
        (["--models", "lstm"], ["no model 'lstm'", "vgg_small"]),
        (["--penalty", "cubic"], ["penalty"]),
    ],
)
def test_bad_prune_options_are_one_line_errors(image_run, args, fragments):
    _refused("prune", str(image_run), *args, fragments=fragments)
    assert not (image_run / "prune").exists()  # nothing written for a refused command


def test_prune_refuses_runs_it_cannot_prune(tmp_path):
    language = tmp_path / "lm"
    language.mkdir()
    cfg = config_mod.resolve(overrides={"task": "lm"})
    (language / "config.yaml").write_text(config_mod.dump(cfg))
    _refused(
        "prune", str(language), fragments=("--task lm run", "--task classify and --task forecast")
    )
    _refused("prune", str(tmp_path / "nowhere"), fragments=("not found",))
    lenet = tmp_path / "lenet"
    trained = morphnas("train", "--baseline", "lenet", *IMAGES, "--retrain-epochs", "1",
                       "--out", str(lenet))  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    _refused("prune", str(lenet), fragments=("no model to prune", "BatchNorm"))
    _refused("prune", str(lenet), "--models", "lenet", fragments=("cannot prune lenet",))
    assert not (lenet / "prune").exists()


def test_an_existing_prune_directory_needs_resume_or_force(image_run, tmp_path):
    run = _copy(image_run, tmp_path)
    args = ["--lambdas", "0.3", "--arch-epochs", "1", "--finetune-epochs", "0"]
    assert morphnas("prune", str(run), *args).returncode == 0
    _refused("prune", str(run), *args, fragments=("--resume", "--force"))
    _refused(
        "prune", str(run), "--lambdas", "0.2", "--arch-epochs", "1", "--resume",
        fragments=("other options", "lambdas"),
    )  # fmt: skip
    assert morphnas("prune", str(run), *args, "--resume").returncode == 0  # done: same rows
    again = morphnas("prune", str(run), "--lambdas", "0.2", "--arch-epochs", "1", "--force")
    assert again.returncode == 0, again.stderr
    assert [r["lambda"] for r in _summary(run)["results"]] == [0.2]


def test_search_with_dnal_at_channel_level_prunes_what_it_retrained(tmp_path):
    out = tmp_path / "dnal"
    options = "search.strategy_options"
    done = morphnas(
        "search", *IMAGES, "--strategy", "dnal", "--epochs", "1", "--retrain-epochs", "1",
        "--nodes", "2", "--set", f"{options}.level=channels", "--set", f"{options}.lambdas=[0.3]",
        "--set", f"{options}.arch_epochs=1", "--set", f"{options}.finetune_epochs=1",
        "--set", "train.baselines=[resnet20]", "--out", str(out), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["channels"]
    assert [r["model"] for r in rows] == ["searched", "resnet20"]
    assert (
        yaml.safe_load((out / "config.yaml").read_text())["search"]["strategy_options"]["level"]
        == "channels"
    )
    assert _summary(out)["results"] == rows
