"""Memory-lean search, measured: peak memory and seconds per search step of the DARTS CNN
supernet in full, with partial channels (K = 2, 4; PC-DARTS) and with cell recomputation, and
of the recurrent supernet (darts_rnn) with its fused kernel, its eager loop, and its whole
sequence under ``torch.utils.checkpoint``.

Not a ``morphnas bench`` part (a DARTS-size CNN step takes tens of seconds on a CPU, too long
for the bench's CI run): ``python -m morphnas.bench.memory [--batch N] [--repeats R] [--quick]``
(docs/method.md, "Memory-lean search", has its table). Every variant of a
space is measured in one process, side by side (``timing.measure``: one step per variant under
the memory meter, then interleaved timed rounds), so the ratios hold on a shared machine. Peak
memory on a CPU is the resident-set high-water mark a step adds (``VmHWM`` after it minus
``VmRSS`` before it, freed heap handed back first): what the process really touched, allocator
and autograd buffers included; on CUDA, the caching allocator's peak.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from morphnas import spaces
from morphnas.bench.timing import measure
from morphnas.bench.workloads import (
    CnnConfig,
    SupernetConfig,
    Workload,
    sequence,
    sgd_workload,
)
from morphnas.engine.runtime import apply_threads

# DARTS's CNN search (cnn/train_search.py): C = 16, 8 cells of 4 steps, CIFAR's 32×32 images
# (batch 64 there; the CPU default measures a smaller batch: memory is linear in it).
CNN_DARTS = CnnConfig(batch=16, channels=3, image=32, cells=8, hidden=16)
CNN_QUICK = CnnConfig(batch=4, channels=3, image=16, cells=3, hidden=8)
RNN_DARTS = SupernetConfig(batch=256, hidden=300, bptt=35, nodes=8)
RNN_QUICK = SupernetConfig(batch=16, hidden=32, bptt=8, nodes=3)
CNN_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "partial_k2": {"partial_channels": 2},
    "partial_k4": {"partial_channels": 4},
    "recompute": {"recompute": True},
    "partial_k4_recompute": {"partial_channels": 4, "recompute": True},
}


class Checkpointed(nn.Module):
    """A recurrent supernet whose whole sequence runs under ``checkpoint`` (the one segment a
    fused sequence kernel offers): its saved tensors are dropped after the forward and rebuilt
    by rerunning it in backward, with the same dropout masks (``preserve_rng_state``)."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return checkpoint(self.cell, x, use_reentrant=False)


@contextmanager
def _isolated() -> Iterator[None]:
    """The caller's random state and thread count, as ``run_bench`` keeps them."""
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        apply_threads(threads)


def bench_cnn(cfg: CnnConfig, repeats: int, threads: int) -> dict[str, Any]:
    """Every ``CNN_VARIANTS`` supernet on the same batch (weights drawn from the same seed)."""
    with _isolated():
        return _bench_cnn(cfg, repeats, threads)


def _bench_cnn(cfg: CnnConfig, repeats: int, threads: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(cfg.batch, cfg.channels, cfg.image, cfg.image)
    nets = {}
    for name, options in CNN_VARIANTS.items():
        torch.manual_seed(0)
        nets[name] = spaces.build("darts_cnn", cfg.channels, cfg.hidden, cfg.cells, **options)
    target = torch.randn(cfg.batch, nets["full"].features)  # every variant's features
    workloads = {name: sgd_workload(net, x, target) for name, net in nets.items()}
    return {"config": asdict(cfg), **_measured(workloads, repeats, threads)}


def _measured(workloads: dict[str, Workload], repeats: int, threads: int) -> dict[str, Any]:
    """``timing.measure`` after one warm-up step of each variant, so that one-time costs (thread
    pools, lazy initialisation) do not land on the first variant's peak."""
    for work in workloads.values():
        work.step()
    return measure(workloads, torch.device("cpu"), repeats, [threads], probe=False)


def bench_rnn(cfg: SupernetConfig, repeats: int, threads: int) -> dict[str, Any]:
    """darts_rnn at DARTS's search dropouts: fused kernel, eager loop, fused under checkpoint."""
    with _isolated():
        return _bench_rnn(cfg, repeats, threads)


def _bench_rnn(cfg: SupernetConfig, repeats: int, threads: int) -> dict[str, Any]:
    device = torch.device("cpu")
    torch.manual_seed(0)
    x, target = sequence(cfg, cfg.input_size, device)
    workloads = {}
    for name in ("fused", "eager", "fused_recompute"):
        torch.manual_seed(0)
        cell = spaces.build(
            "darts_rnn",
            cfg.input_size,
            cfg.hidden,
            cfg.nodes,
            dropout_x=0.75,
            dropout_h=0.25,
            fused=name != "eager",
        )
        module = Checkpointed(cell) if name == "fused_recompute" else cell
        workloads[name] = sgd_workload(module, x, target)
    return {"config": asdict(cfg), **_measured(workloads, repeats, threads)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, help="CNN batch (default 16; DARTS: 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--spaces", default="darts_cnn,darts_rnn")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    cnn = CNN_QUICK if args.quick else CNN_DARTS
    if args.batch:
        cnn = CnnConfig(args.batch, cnn.channels, cnn.image, cnn.cells, cnn.hidden)
    result: dict[str, Any] = {}
    chosen = args.spaces.split(",")
    if "darts_cnn" in chosen:
        result["darts_cnn"] = bench_cnn(cnn, args.repeats, args.threads)
    if "darts_rnn" in chosen:
        rnn = RNN_QUICK if args.quick else RNN_DARTS
        result["darts_rnn"] = bench_rnn(rnn, args.repeats, args.threads)
    for space, part in result.items():
        base = next(v for k, v in part.items() if k != "config")
        print(f"{space} {part['config']}")
        print(f"  {'variant':<22} {'peak MB':>9} {'× full':>7} {'s/step':>8} {'× full':>7}")
        for name, row in part.items():
            if name == "config":
                continue
            print(
                f"  {name:<22} {row['peak_mb']:>9.0f} {row['peak_mb'] / base['peak_mb']:>7.2f} "
                f"{row['seconds']:>8.3f} {row['seconds'] / base['seconds']:>7.2f}"
            )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
