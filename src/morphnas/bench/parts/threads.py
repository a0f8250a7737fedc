"""The ``threads`` part: the fused supernet's training step at one thread and at every core over a
grid of ``batch × hidden``, the measurement behind ``engine.runtime.MULTITHREAD_FROM``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from morphnas.bench.parts.supernet import darts_supernet
from morphnas.bench.timing import Context, interleaved
from morphnas.bench.workloads import SupernetConfig, grid, sequence, sgd_workload
from morphnas.engine.runtime import MULTITHREAD_FROM, apply_threads, choose_threads

# The thread-policy grid: products from 1,024 to 32,768 around the threshold, at the DARTS bptt
# and node count. Batch 256 × hidden 300 (the supernet part's ``darts``, already timed there at
# its faster count, 4–6 s a step) would cost as much as the rest of the grid together.
THREADS_CONFIGS = grid(
    (32, 64, 256), (32, 64, 128, 300), bptt=35, nodes=8, skip=frozenset({(256, 300)})
)
QUICK_THREADS_CONFIGS = grid((8, 16), (16, 32), bptt=6, nodes=3)


def thread_point(
    cfg: SupernetConfig, seconds: dict[int, float], policy_threads: int
) -> dict[str, Any]:
    """One grid point's entry from its median seconds per thread count (pure, so testable on
    hand-made numbers). Ties go to fewer threads: they leave cores to other processes."""
    counts = sorted(seconds)
    faster = min(counts, key=seconds.__getitem__)
    return {
        "batch": cfg.batch,
        "hidden": cfg.hidden,
        "product": cfg.batch * cfg.hidden,
        "seconds": {str(t): seconds[t] for t in counts},  # JSON object keys are strings
        "faster_threads": faster,
        "all_cores_faster": len(counts) > 1 and faster == counts[-1],
        "speedup_all_cores": seconds[counts[0]] / seconds[counts[-1]],
        "policy_threads": policy_threads,
        "policy_agrees": policy_threads == faster if policy_threads in seconds else None,
    }


def multithread_crossover(points: Sequence[dict[str, Any]]) -> int | None:
    """The smallest measured ``batch × hidden`` from which every point at that product or above
    ran faster on all cores: the value for ``MULTITHREAD_FROM`` that agrees with the whole upper
    end of the grid (points below it may still go either way). ``None`` when all cores lost at
    the largest product (the crossover, if any, lies above the grid) or were not tried."""
    losses = [p["product"] for p in points if not p["all_cores_faster"]]
    above = [p["product"] for p in points if p["product"] > max(losses, default=0)]
    return min(above, default=None)


def _time_thread_counts(
    cfg: SupernetConfig, device: torch.device, repeats: int, candidates: Sequence[int]
) -> dict[int, float]:
    """Median seconds of one training step of the fused supernet at each thread count.

    The same module and batch at every count, so only the thread count differs; one full step
    per count first as a warm-up (the thread pool's start, the full-length allocations)."""
    torch.manual_seed(0)
    x, target = sequence(cfg, cfg.input_size, device)
    work = sgd_workload(darts_supernet(cfg, device), x, target)
    for threads in candidates:
        apply_threads(threads)
        work.step()
    runs = {str(threads): (work, threads) for threads in candidates}
    seconds = interleaved(runs, device, repeats)
    return {threads: seconds[str(threads)] for threads in candidates}


def bench_threads(configs: Sequence[SupernetConfig], ctx: Context, repeats: int) -> dict[str, Any]:
    """One thread vs every core over a grid of sizes, against what ``choose_threads`` picks.

    Each implementation elsewhere runs at its faster count, which hides how much the wrong count
    costs and where the crossover lies; here every count is timed at every size."""
    points = [
        thread_point(
            cfg,
            _time_thread_counts(cfg, ctx.device, repeats, ctx.threads),
            choose_threads(cfg.hidden, cfg.batch, device=ctx.device),
        )
        for cfg in configs
    ]
    return {
        "config": {"bptt": configs[0].bptt, "nodes": configs[0].nodes},
        "candidates": list(ctx.threads),
        "points": points,
        "crossover_product": multithread_crossover(points),
        "multithread_from": MULTITHREAD_FROM,
        "policy_mismatches": sum(p["policy_agrees"] is False for p in points),
    }
