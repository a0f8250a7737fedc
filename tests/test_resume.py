"""Crash and resume: a run killed at any moment and resumed ends exactly as an uninterrupted one.

The kills are real (SIGKILL or SIGTERM to a subprocess), placed deterministically by the
``MORPHNAS_CRASH_AT`` fault-injection hook (``morphnas.engine.faults``): mid-epoch, just after a
growth event, during a checkpoint write, and during retraining.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import morphnas, without_times
from morphnas import api, config
from morphnas.engine.checkpoint import load
from morphnas.engine.resume import checked
from morphnas.engine.state import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    SCHEMAS,
    SearchProgress,
    TrainProgress,
)
from morphnas.errors import UserError

RUN = [
    "search", "--csv", "", "--window", "6", "--hidden", "6", "--epochs", "4",
    "--growth", "grow-then-prune", "--nodes-start", "1", "--nodes-max", "3", "--grow-every", "1",
    "--retrain-epochs", "3", "--threads", "1", "--set", "search.batch_size=32",
    "--set", "train.baselines=[lstm]", "--json",
]  # fmt: skip


def start(csv: Path, out: Path, crash: str | None = None) -> subprocess.CompletedProcess[str]:
    args = [str(csv) if a == "" else a for a in RUN]
    return morphnas(*args, "--out", str(out), crash=crash)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def outcome(run: Path) -> dict:
    metrics = rows(run)
    arch = {
        k: v for k, v in load(run / "checkpoints" / "search_last.pt")["model"].items()
        if k.startswith("cell.arch.")
    }  # fmt: skip
    return {
        "genotype": json.loads((run / "genotype.json").read_text()),
        "summary": without_times(json.loads((run / "summary.json").read_text())),
        "metrics": without_times(metrics),
        "history": without_times(json.loads((run / "history.json").read_text())),
        "arch": arch,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["genotype"] == b["genotype"]
    assert a["summary"] == b["summary"]
    assert a["metrics"] == b["metrics"]
    assert a["history"] == b["history"]
    assert a["arch"].keys() == b["arch"].keys()
    for key in a["arch"]:
        assert torch.equal(a["arch"][key], b["arch"][key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request):
    csv = request.getfixturevalue("module_csv")
    out = tmp_path_factory.mktemp("reference") / "run"
    done = start(csv, out)
    assert done.returncode == 0, done.stderr
    return outcome(out)


@pytest.fixture(scope="module")
def module_csv(tmp_path_factory):
    import pandas as pd

    from morphnas.data import synthetic_series

    series = synthetic_series(n_steps=300, n_series=3, seed=1)
    frame = pd.DataFrame(series.values, columns=series.columns)
    path = tmp_path_factory.mktemp("data") / "series.csv"
    frame.to_csv(path, index=False, float_format="%.6f")
    return path


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, module_csv, reference):
    out = tmp_path / "run"
    # One run, killed four times at different kinds of moment, resumed after each.
    crashes = ["step:5", "growth:1", "checkpoint:3", "train-step:4"]
    done = start(module_csv, out, crash=crashes[0])
    assert done.returncode == -9
    for crash in [*crashes[1:], None]:
        done = morphnas("search", "--resume", str(out), "--json", crash=crash)
        assert done.returncode == (-9 if crash else 0), done.stderr
    assert_same(outcome(out), reference)


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("gdas", []),
        ("msdarts", []),
        (  # its curvature check in the epoch rows; an architecture step every third batch
            "idarts",
            ["--set", "search.strategy_options.hvp=finite_all", "--set", "search.weight_steps=3"],
        ),
    ],
    ids=["gdas", "msdarts", "idarts"],
)
def test_strategies_with_state_of_their_own_resume_exactly(tmp_path, module_csv, strategy, options):
    """Gumbel samples and mean-shift perturbations draw from the saved random states; iDARTS's
    epoch check and the weight steps between architecture steps follow the saved position."""
    args = [str(module_csv) if a == "" else a for a in RUN]
    extra = ["--strategy", strategy, "--retrain-epochs", "1", *options]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert morphnas(*args, *extra, "--out", str(whole)).returncode == 0
    assert morphnas(*args, *extra, "--out", str(cut), crash="step:8").returncode == -9
    done = morphnas("search", "--resume", str(cut), "--json")
    assert done.returncode == 0, done.stderr
    assert_same(outcome(cut), outcome(whole))


def test_sigterm_saves_mid_epoch_and_resume_is_exact(tmp_path, module_csv, reference):
    out = tmp_path / "run"
    done = start(module_csv, out, crash="step:4:TERM")
    assert done.returncode == 130
    line = done.stderr.strip()
    assert "\n" not in line and "--resume" in line and "Traceback" not in done.stderr
    state = load(out / "checkpoints" / "search_last.pt")
    assert state["position"] is not None  # saved inside the epoch, not at its end
    done = morphnas("search", "--resume", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert_same(outcome(out), reference)


def test_resume_rebuilds_a_pruned_and_widened_darts_supernet(tmp_path, module_csv):
    """grow-and-prune on the DARTS space with width growth: the resumed run must rebuild fixed
    nodes and a wider hidden state from the checkpoint before loading it."""
    extra = [
        "--space", "darts_rnn", "--growth", "grow-and-prune", "--grow-width", "2",
        "--retrain-epochs", "1",
    ]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = [str(module_csv) if a == "" else a for a in RUN]
    assert morphnas(*args, *extra, "--out", str(whole)).returncode == 0
    killed = morphnas(*args, *extra, "--out", str(cut), crash="step:9")
    assert killed.returncode == -9
    state = load(cut / "checkpoints" / "search_last.pt")
    assert state["shape"]["fixed"] and state["shape"]["hidden"] > 6  # grown, pruned, widened
    done = morphnas("search", "--resume", str(cut), "--json")
    assert done.returncode == 0, done.stderr
    assert_same(outcome(cut), outcome(whole))


def test_warm_up_and_candidate_retraining_resume_exactly(tmp_path, module_csv):
    """Weight-only warm-up epochs, then candidates retrained briefly and chosen on valid: killed
    (or stopped) mid warm-up, after it, inside each candidate's retraining and after the choice,
    the run ends as an uninterrupted one, choice and candidates' scores included."""
    extra = [
        "--set", "search.warmup_epochs=2", "--set", "search.select=valid",
        "--set", "search.candidates=2", "--set", "search.select_epochs=2",
    ]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = [str(module_csv) if a == "" else a for a in RUN]
    assert morphnas(*args, *extra, "--out", str(whole)).returncode == 0
    # 6 search steps an epoch, 3 retraining steps; the counts restart in every process.
    crashes = ["step:9:TERM", "step:7", "train-step:5:TERM", "train-step:4", "train-step:8"]
    done = morphnas(*args, *extra, "--out", str(cut), crash=crashes[0])
    assert done.returncode == 130, done.stderr
    for crash in [*crashes[1:], None]:
        done = morphnas("search", "--resume", str(cut), "--json", crash=crash)
        code = 130 if crash and crash.endswith("TERM") else -9 if crash else 0
        assert done.returncode == code, (crash, done.stderr)
    assert_same(outcome(cut), outcome(whole))
    selections = [json.loads((run / "selection.json").read_text()) for run in (cut, whole)]
    assert selections[0] == selections[1] and len(selections[0]) == 2
    search_rows = [r for r in rows(cut) if r["phase"] == "search"]
    assert [r.get("warmup", False) for r in search_rows] == [True, True, False, False]


@pytest.mark.parametrize(("crash", "code"), [("train-step:9", -9), ("train-step:5:TERM", 130)])
def test_train_resume_equals_an_uninterrupted_run(tmp_path, module_csv, crash, code):
    args = [
        "train", "--baseline", "gru", "--csv", str(module_csv), "--window", "6", "--hidden", "6",
        "--retrain-epochs", "4", "--threads", "1", "--json",
    ]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert morphnas(*args, "--out", str(whole)).returncode == 0
    assert morphnas(*args, "--out", str(cut), crash=crash).returncode == code
    done = morphnas("train", "--resume", str(cut), "--json")
    assert done.returncode == 0, done.stderr
    summaries = [json.loads((run / "summary.json").read_text()) for run in (cut, whole)]
    assert without_times(summaries[0]) == without_times(summaries[1])
    assert without_times(rows(cut)) == without_times(rows(whole))


COMPARE = [
    "compare", "--csv", "", "--window", "6", "--hidden", "6", "--epochs", "2", "--growth", "none",
    "--seeds", "2", "--retrain-epochs", "2", "--threads", "1", "--set", "search.batch_size=32",
    "--json",
]  # fmt: skip


def test_a_killed_compare_continues_with_reuse(tmp_path, module_csv):
    """``compare --reuse`` resumes the run a kill stopped and runs the rest: the same table as
    a compare never stopped."""
    args = [str(module_csv) if a == "" else a for a in COMPARE]
    done = morphnas(*args, "--out", str(tmp_path / "whole"))
    assert done.returncode == 0, done.stderr
    killed = tmp_path / "killed"
    assert morphnas(*args, "--out", str(killed), crash="step:7").returncode == -9
    assert not (killed / "none-seed0" / "summary.json").exists()
    done = morphnas(*args, "--out", str(killed), "--reuse")
    assert done.returncode == 0, done.stderr
    tables = [
        without_times(json.loads((tmp_path / run / "compare.json").read_text()))
        for run in ("whole", "killed")
    ]
    assert tables[0] == tables[1]
    assert [r["seed"] for r in tables[1]["runs"]] == [0, 1]


def test_resume_refuses_a_finished_run_and_extra_flags(tmp_path, module_csv):
    missing = morphnas("search", "--resume", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "not found" in missing.stderr
    cfg_dir = tmp_path / "run"
    cfg_dir.mkdir()
    (cfg_dir / "config.yaml").write_text("seed: 0\n")
    extra = morphnas("search", "--resume", str(cfg_dir), "--epochs", "3")
    assert extra.returncode == 2 and "drop --epochs" in extra.stderr
    (cfg_dir / "summary.json").write_text("{}")
    finished = morphnas("search", "--resume", str(cfg_dir))
    assert finished.returncode == 2 and "nothing to resume" in finished.stderr


def test_an_existing_run_is_never_overwritten_without_force(tmp_path, module_csv):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = start(module_csv, out)
    assert done.returncode == 2 and "--resume" in done.stderr and "--force" in done.stderr
    assert (out / "keep.txt").read_text() == "mine"


TINY = {
    "data": {"dataset": "synthetic", "window": 6},
    "space": {"nodes": 2, "hidden": 6},
    "search": {"epochs": 3, "batch_size": 128},
    "train": {"epochs": 2, "baselines": []},
    "threads": 1,
}


def _poison_after(monkeypatch, calls: int) -> None:
    """Make the forecasting loss non-finite from the ``calls``-th training-mode call on."""
    from morphnas.tasks import forecasting

    original, seen = forecasting.ForecastTask.loss, {"n": 0}

    def loss(self, model, batch, **kwargs):
        value = original(self, model, batch, **kwargs)
        if model.training and "weights" in kwargs:
            seen["n"] += 1
            if calls <= seen["n"] < calls + 4:  # a short burst: a retry gets past it
                return value * math.nan
        return value

    monkeypatch.setattr(forecasting.ForecastTask, "loss", loss)


def test_nan_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    _poison_after(monkeypatch, calls=30)
    cfg = config.resolve(overrides={**TINY, "out": str(tmp_path / "run")})
    with pytest.raises(UserError) as err:
        api.search(cfg)
    message = str(err.value)
    assert "diverged" in message and "search_last.pt" in message and "\n" not in message
    state = load(tmp_path / "run" / "checkpoints" / "search_last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_retry_restarts_from_the_checkpoint_at_half_the_rates(tmp_path, monkeypatch):
    _poison_after(monkeypatch, calls=30)
    overrides = config.merge(TINY, {"out": str(tmp_path / "run")})
    overrides["search"] = {**TINY["search"], "nan_policy": "retry"}
    cfg = config.resolve(overrides=overrides)
    result = api.search(cfg)
    logged = rows(tmp_path / "run")
    retries = [r for r in logged if r.get("event") == "nan-retry"]
    assert retries and retries[0]["lr_scale"] == 0.5
    epochs = [r["epoch"] for r in logged if r.get("phase") == "search" and "train_loss" in r]
    assert epochs == [1, 2, 3]
    assert math.isfinite(result.extra["search_valid_loss"])
    state = load(tmp_path / "run" / "checkpoints" / "search_last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.search.lr / 2)


class _InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_a_weight_step_whose_gradient_overflows_is_skipped_and_logged(tmp_path, monkeypatch):
    """A hard-sampled cell whose gradient overflows (seen with E2NAS and GDAS on births) used to
    turn every weight NaN through the clip; its step is skipped and the search goes on."""
    from morphnas.tasks import forecasting

    original, seen = forecasting.ForecastTask.loss, {"n": 0}

    def loss(self, model, batch, **kwargs):
        value = original(self, model, batch, **kwargs)
        mixing = kwargs.get("weights")
        weight_step = model.training and mixing and not any(w.requires_grad for w in mixing)
        if weight_step:
            seen["n"] += 1
            if seen["n"] in (3, 5):
                return _InfiniteGradient.apply(value)
        return value

    monkeypatch.setattr(forecasting.ForecastTask, "loss", loss)
    cfg = config.resolve(overrides={**TINY, "out": str(tmp_path / "run")})
    result = api.search(cfg)
    skipped = [r for r in rows(tmp_path / "run") if r.get("event") == "skipped-step"]
    assert [(r["epoch"], r["batch"]) for r in skipped] == [(1, 2), (1, 4)]
    assert math.isfinite(result.extra["search_valid_loss"])
    state = load(tmp_path / "run" / "checkpoints" / "search_last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("existed", [False, True], ids=["new-out", "empty-out"])
def test_a_run_that_diverges_before_its_first_checkpoint_leaves_nothing(
    tmp_path, monkeypatch, existed
):
    """Nothing a --resume could continue: the directory is cleared and the message says so, so
    that the corrected command runs with the same --out (not "already holds files")."""
    out = tmp_path / "run"
    if existed:
        out.mkdir()
    _poison_after(monkeypatch, calls=1)
    cfg = config.resolve(overrides={**TINY, "out": str(out)})
    with pytest.raises(UserError) as err:
        api.search(cfg)
    message = str(err.value)
    assert "diverged" in message and f"nothing was saved, so {out} was cleared" in message
    assert "\n" not in message
    assert out.is_dir() == existed and (not existed or not any(out.iterdir()))
    monkeypatch.undo()
    assert api.search(cfg).run_dir == out  # the same --out, no --force needed


# The flat layout of version-1 checkpoints: files written before the loop state became
# dataclasses (issue 28) hold exactly these keys, in this order, and must keep resuming.
V1_KEYS = {
    "search": [
        "format", "version", "kind", "run", "epoch", "step", "best", "valid_loss", "retries",
        "position", "elapsed", "cpu", "totals", "model", "shape", "optimizer", "strategy",
        "growth", "task", "rng", "generator", "epoch_generator", "valid_stream",
    ],
    "train": [
        "format", "version", "kind", "run", "name", "epoch", "best", "best_epoch", "position",
        "elapsed", "totals", "model", "optimizer", "best_state", "rng", "generator",
        "epoch_generator", "task",
    ],
}  # fmt: skip
# Keys added since, each optional, so that a version-1 file still resumes.
ADDED_SINCE_V1 = {"search": ["processes"], "train": []}


@pytest.mark.parametrize("kind", ["search", "train"])
def test_checkpoints_keep_the_version_1_layout(kind):
    schema = SCHEMAS[kind]
    entries = {key: None for key in [*schema.before, *schema.after]}
    built = schema.build({"id": "x"}, schema.progress(), **entries)
    assert list(built) == V1_KEYS[kind] + ADDED_SINCE_V1[kind]
    assert all(schema.after[key].optional for key in ADDED_SINCE_V1[kind])
    assert (built["format"], built["version"], built["kind"]) == (
        CHECKPOINT_FORMAT,
        CHECKPOINT_VERSION,
        kind,
    )
    with pytest.raises(TypeError):  # a loop that forgets an entry is a bug, caught at once
        schema.build(None, schema.progress(), **dict(list(entries.items())[1:]))


def _valid(kind: str) -> dict:
    """A checkpoint of ``kind`` that passes ``checked``, built from the schema's own rules."""
    schema = SCHEMAS[kind]
    samples = {dict: {}, torch.Tensor: torch.zeros(1), str: "searched", int: 1}
    entries = {
        key: [torch.zeros(()), 0] if key == "totals" else samples[rule.types]
        for key, rule in {**schema.before, **schema.after}.items()
    }
    return schema.build(None, schema.progress(), **entries)


def test_progress_resumes_after_a_complete_or_inside_an_epoch():
    saved = SearchProgress(epoch=3, step=40, best=0.5, valid_loss=0.6, position=None, elapsed=9.0)
    progress = SearchProgress()
    assert not progress.resume(saved.state_dict())  # complete: the next epoch, from its start
    assert (progress.epoch, progress.position, progress.step) == (4, 0, 40)
    inside = TrainProgress(epoch=2, best=0.4, best_epoch=1, position=7, elapsed=3.0)
    progress_ = TrainProgress()
    assert progress_.resume(inside.state_dict())  # mid-epoch: the saved batch of that epoch
    assert progress_ == inside


def test_a_checkpoint_from_before_cpu_time_still_resumes():
    state = _valid("search")
    del state["cpu"]  # written before the search counted CPU seconds
    assert checked(state, "search_last.pt", "search", None) is state
    progress = SearchProgress(cpu=5.0)
    progress.resume(state)
    assert progress.cpu == 0.0
    train = _valid("train")
    del train["task"]  # written before training carried a task's state
    assert checked(train, "train_x.pt", "train", None) is train


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("step", True, "holds a bool as step"),
        ("epoch", 0, "holds epoch 0, below 1"),
        ("position", -1, "holds position -1, below 0"),
        ("best", "low", "holds a str as best"),
        ("cpu", "1s", "holds a str as cpu"),
        ("valid_stream", KeyError, "lacks valid_stream"),
    ],
)
def test_checked_refuses_a_counter_of_the_wrong_type_or_range(key, value, problem):
    state = _valid("search")
    if value is KeyError:
        del state[key]
    else:
        state[key] = value
    with pytest.raises(UserError, match=problem):
        checked(state, "search_last.pt", "search", None)
