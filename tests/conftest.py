"""Shared fixtures: small generated data only, never a download."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from morphnas import cli, spaces
from morphnas.data import synthetic_series
from morphnas.strategies import Objective
from morphnas.tasks.classification import ImageModel
from morphnas.tasks.forecasting import ForecastModel


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches a run may fill (E2NAS's trained graph VAEs) go to a folder of this session, shared
    by its tests and the CLI they start, never to the user's ``~/.cache``."""
    os.environ["MORPHNAS_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def synthetic_csv(tmp_path: Path) -> Path:
    """A small synthetic multivariate series as a daily CSV with a ``date`` column."""
    return _daily_csv(tmp_path / "series.csv")


def _daily_csv(path: Path) -> Path:
    series = synthetic_series(n_steps=240, n_series=3, seed=1)
    frame = pd.DataFrame(series.values, columns=series.columns)
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=len(frame), freq="D"))
    frame.to_csv(path, index=False, float_format="%.6f")
    return path


# A search on `_daily_csv` in seconds: tiny budgets, the default baselines.
TINY_RUN = [
    "--epochs", "1", "--retrain-epochs", "2", "--nodes", "2", "--hidden", "8", "--window", "8",
    "--threads", "1",
]  # fmt: skip


def _finished_run(root: Path, *extra: str) -> Path:
    out = root / "run"
    done = CliRunner().invoke(
        cli.app, ["search", "--csv", str(_daily_csv(root / "series.csv")), *TINY_RUN, *extra,
                  "--out", str(out)],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    return out


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished forecasting run of the two-input space on a daily CSV (``date`` column, three
    series), with every default baseline (LSTM, GRU, ar, naive, snaive, VAR) beside the searched
    cell. Shared by the session: copy it
    (``shutil.copytree``) before writing into it."""
    return _finished_run(tmp_path_factory.mktemp("finished-two-input"))


@pytest.fixture(scope="session")
def finished_darts_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run with the DARTS recurrent space and no baselines. Read-only, like
    ``finished_run``."""
    root = tmp_path_factory.mktemp("finished-darts-rnn")
    return _finished_run(root, "--space", "darts_rnn", "--set", "train.baselines=[]")


# Helpers for the tests that run the CLI (in a subprocess, or in-process) and compare runs or
# their files: plain functions, imported as `from conftest import ...`.


def morphnas(*args: str, crash: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MORPHNAS_CRASH_AT"}
    if crash:
        env["MORPHNAS_CRASH_AT"] = crash
    return subprocess.run(
        [sys.executable, "-m", "morphnas.cli", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


def assert_user_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A bad-input exit: code 2, no traceback, one stderr line holding every fragment."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def without_times(value):
    """A run's record with wall-clock fields removed (they differ between any two runs)."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if "seconds" not in k and k != "time"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def run_cli(*args: str) -> tuple[int, list[str]]:
    """The CLI in-process: exit code and the non-empty stderr lines."""
    result = CliRunner().invoke(cli.app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()]


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: a hash of a file's bytes, "dir" for a folder."""
    return {
        str(p.relative_to(root)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


# The registered spaces by what their networks read: a test of the recurrent machinery (sequence
# kernels, forecasting) takes the first list, a test of any supernet takes spaces.SPACES.
SEQUENCE_SPACES = spaces.of_modality("sequences")
IMAGE_SPACES = spaces.of_modality("images")

# A tiny supernet for the strategy tests (test_strategies, test_e2nas): its sizes, and its set-up.
N_SERIES, HIDDEN, WINDOW, BATCH = 2, 4, 5, 8
# An image space's tiny set-up: one channel, IMAGE × IMAGE pixels, CLASSES classes, one node
# per cell (so that a derived genotype has two nodes, as a two-node recurrent cell has).
IMAGE, CLASSES = 4, 3


def tiny_supernet(
    space_name: str = "two_input", nodes: int = 2, dtype=torch.float32, seed: int = 0, **options
):
    """A tiny supernet in a forecaster (no dropout; an image space: in a classifier), its
    Objective and a train/valid batch; ``options`` go to the space.

    Eager spaces: a fused kernel's hand-written backward is once-differentiable, and the
    brute-force references differentiate through a gradient."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if space_name in IMAGE_SPACES:  # a classifier of random images
        space = spaces.build(space_name, 1, HIDDEN, nodes, **{"steps": 1, **options})
        model = ImageModel(space, CLASSES).to(dtype)

        def loss(batch, mixing):
            return F.cross_entropy(model(batch[0], weights=mixing), batch[1])

        def batch():
            return (
                torch.randn(BATCH, 1, IMAGE, IMAGE, generator=gen, dtype=dtype),
                torch.randint(CLASSES, (BATCH,), generator=gen),
            )
    else:
        space = spaces.build(space_name, N_SERIES, HIDDEN, nodes, fused=False, **options)
        model = ForecastModel(space, HIDDEN, N_SERIES, 0.0, 3, "last").to(dtype)
        mse = nn.MSELoss()

        def loss(batch, mixing):
            return mse(model(batch[0], weights=mixing), batch[1])

        def batch():
            return (
                torch.randn(BATCH, WINDOW, N_SERIES, generator=gen, dtype=dtype),
                torch.randn(BATCH, N_SERIES, generator=gen, dtype=dtype),
            )

    arch_ids = {id(p) for p in space.arch}
    weights = [p for p in model.parameters() if id(p) not in arch_ids]

    return space, model, weights, Objective(model, loss, weights), batch(), batch()
