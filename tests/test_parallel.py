"""Data-parallel search (``engine.parallel``): ``torchrun -m morphnas search`` on loopback gloo.

The brute-force references: a one-process run at N × the batch for the whole search, and a
full-batch gradient for the weighted shard losses (``Group.loss``), odd and empty shards too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import TINY_RUN, run_cli
from morphnas.engine import faults
from morphnas.engine.parallel import Group, shard

RANKS = 2
# No dropout before the head: each rank draws its own masks, a one-process run other ones.
EXACT = ["--set", "train.dropout=0", "--set", "train.baselines=[]", "--retrain-epochs", "1"]


def torchrun(cwd: Path, *args: str, crash: str | None = None, **popen: object) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2 -m morphnas search ARGS`` in ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k != "MORPHNAS_CRASH_AT"}
    if crash:
        env["MORPHNAS_CRASH_AT"] = crash
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(RANKS), "-m", "morphnas", "search", *args,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        **popen,
    )  # fmt: skip


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from ``/proc``: a parent's children, recursively)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def finished(process: subprocess.Popen, timeout: float = 120) -> str:
    """Wait for a launch that must succeed; its stderr."""
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return err


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epochs(run_dir: Path) -> list[dict]:
    """The search's epoch rows."""
    return [r for r in rows(run_dir) if r["phase"] == "search" and "event" not in r]


def replicas(run_dir: Path) -> list[list[float]]:
    """Every epoch's per-rank parameter checksums."""
    return [r["checksums"] for r in rows(run_dir) if r.get("event") == "replicas"]


def test_two_ranks_match_one_process_at_twice_the_batch(synthetic_csv: Path) -> None:
    root = synthetic_csv.parent
    common = ["--csv", str(synthetic_csv), *TINY_RUN, "--epochs", "2", *EXACT]
    launch = torchrun(root, *common, "--out", "dp")
    code, err = run_cli(
        "search", *common, "--set", "search.batch_size=128", "--out", str(root / "one")
    )
    assert code == 0, err
    finished(launch)
    assert sorted(p.name for p in root.iterdir()) == ["dp", "one", "series.csv"]  # one run dir
    one, dp = epochs(root / "one"), epochs(root / "dp")
    assert len(one) == len(dp) == 2
    for a, b in zip(one, dp, strict=True):
        assert a["train_windows"] == b["train_windows"]
        for key in ("train_loss", "valid_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5)
        assert torch.allclose(torch.tensor(b["arch"]), torch.tensor(a["arch"]), atol=1e-6)
    sums = replicas(root / "dp")
    assert len(sums) == 2 and all(len(s) == RANKS and len(set(s)) == 1 for s in sums)
    genotypes = [json.loads((root / d / "genotype.json").read_text()) for d in ("one", "dp")]
    assert genotypes[0]["nodes"] == genotypes[1]["nodes"]
    assert (root / "dp" / "summary.json").exists()


def test_sampling_and_growth_stay_identical_on_every_rank(synthetic_csv: Path) -> None:
    """GDAS draws its hard samples from the seeded global generator, and growth and pruning
    decide from all-reduced losses: every rank's weights and α agree after every epoch."""
    root = synthetic_csv.parent
    args = ["--csv", str(synthetic_csv), *TINY_RUN, "--epochs", "6", "--growth", "grow-and-prune"]
    finished(torchrun(root, *args, *EXACT, "--set", "search.strategy=gdas", "--out", "gdas"))
    sums = replicas(root / "gdas")
    assert len(sums) == 6 and all(len(set(s)) == 1 for s in sums)
    history = json.loads((root / "gdas" / "history.json").read_text())
    assert {event["kind"] for event in history} >= {"grow", "prune"}


@pytest.mark.parametrize(
    ("option", "name"),
    [("search.strategy=idarts", "idarts"), ("search.order=2", "darts order 2")],
)
def test_a_bilevel_strategy_is_refused_before_any_rank_waits(
    synthetic_csv: Path, monkeypatch: pytest.MonkeyPatch, option: str, name: str
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before joining
    out = synthetic_csv.parent / "run"
    code, err = run_cli("search", "--csv", str(synthetic_csv), *TINY_RUN, "--set", option,
                        "--out", str(out))  # fmt: skip
    assert code == 2 and len(err) == 1 and f"strategy {name} cannot" in err[0], err
    assert not out.exists()


def test_shards_cover_the_batch_once() -> None:
    for n in range(1, 12):
        batch = (torch.arange(n), torch.arange(n) * 2)
        parts = [shard(batch, r, 3) for r in range(3)]
        kept = [p for p, empty in parts if not empty]
        assert torch.equal(torch.cat([p[0] for p in kept]), batch[0])
        assert max(len(p[0]) for p in kept) - min(len(p[0]) for p in kept) <= 1
        assert all(len(p[0]) == 1 for p, empty in parts if empty)


class _Task:
    """The part of a task ``Group.loss`` reads: a mean squared error over a batch of pairs."""

    def loss(self, model: nn.Module, batch: tuple, **kwargs: object) -> torch.Tensor:
        return ((model(batch[0]) - batch[1]) ** 2).mean()

    def batch_weight(self, batch: tuple) -> int:
        return len(batch[0])


def _rank(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        group = Group(rank, RANKS, torch.device("cpu"))
        for n in (5, 1):  # shards of 2 and 3 samples; an empty shard on rank 0
            torch.manual_seed(0)
            model, x, y = nn.Linear(3, 1), torch.randn(n, 3), torch.randn(n, 1)
            value = group.loss(_Task(), model, (x, y), [])
            value.backward()
            group.average_grads(list(model.parameters()))
            results[(rank, n)] = (float(value), [p.grad.clone() for p in model.parameters()])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_losses_give_the_full_batch_gradient() -> None:
    """Unequal and empty shards: the value and averaged gradients are the full batch's."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(_free_port(), results), nprocs=RANKS)
        results = dict(results)
    for n in (5, 1):
        torch.manual_seed(0)
        model, x, y = nn.Linear(3, 1), torch.randn(n, 3), torch.randn(n, 1)
        full = _Task().loss(model, (x, y))
        full.backward()
        for rank in range(RANKS):
            value, grads = results[(rank, n)]
            assert value == pytest.approx(float(full.detach()), rel=1e-6)
            for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
                assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.long
def test_resume_after_the_launcher_is_killed(synthetic_csv: Path) -> None:
    """Rank 0 is frozen while writing its third checkpoint (epoch 2's), then the launcher and
    every rank are SIGKILLed; ``--resume`` under torchrun ends as an uninterrupted run."""
    root = synthetic_csv.parent
    args = ["--csv", str(synthetic_csv), *TINY_RUN, "--epochs", "4", *EXACT]
    whole = torchrun(root, *args, "--set", "search.strategy=gdas", "--out", "whole")
    killed = torchrun(root, *args, "--set", "search.strategy=gdas", "--out", "killed",
                      crash="checkpoint:3:STOP")  # fmt: skip
    checkpoints = root / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob(".search_last.pt.*.tmp")):
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # the temp file is written and synced before the process stops itself
    for pid in [killed.pid, *descendants(killed.pid)]:  # torchrun's workers have own sessions
        os.kill(pid, signal.SIGKILL)
    killed.communicate()
    assert not (root / "killed" / "summary.json").exists()
    finished(whole)
    resumed = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(RANKS), "-m", "morphnas", "search", "--resume", "killed"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    finished(resumed)
    a, b = epochs(root / "whole"), epochs(root / "killed")
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert (x["train_loss"], x["valid_loss"], x["arch"]) == (
            y["train_loss"], y["valid_loss"], y["arch"],
        )  # fmt: skip
    assert replicas(root / "whole") == replicas(root / "killed")
    genotypes = [json.loads((root / d / "genotype.json").read_text()) for d in ("whole", "killed")]
    assert genotypes[0]["nodes"] == genotypes[1]["nodes"]


def test_resume_with_another_process_count_is_refused(synthetic_csv: Path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["search", "--csv", str(synthetic_csv), *TINY_RUN, "--epochs", "2", "--out", str(out)]
    monkeypatch.setattr(faults, "_passed", Counter())  # the in-process count starts afresh
    monkeypatch.setenv("MORPHNAS_CRASH_AT", "step:2:TERM")
    code, _ = run_cli(*args)
    assert code == 130
    monkeypatch.delenv("MORPHNAS_CRASH_AT")
    last = out / "checkpoints" / "search_last.pt"
    state = torch.load(last, weights_only=False)
    assert state["processes"] == 1
    state["processes"] = 2
    torch.save(state, last)
    code, lines = run_cli("search", "--resume", str(out))
    assert code == 2 and "--nproc_per_node 2" in lines[-1], lines
