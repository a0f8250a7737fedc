"""Measured, side-by-side performance figures (``morphnas bench``; DESIGN §6, docs/benchmarks.md).

Four parts, each a comparison measured in one process so that the ratios mean something on a
noisy, shared machine:

* ``supernet``: one training step of our fused ``DartsRNNSearchCell`` against the loop of the DARTS
  reference code (``ReferenceDartsCell`` below, same parameters, checked to compute the same
  function), both against the machine's own dense-matmul throughput; (``supernet_two_input``)
  the two-input supernet's sequence kernel against its own eager loop; and (``supernet_cnn``)
  the DARTS CNN supernet against its per-edge loop;
* ``cell``: derived discrete cells against ``torch.nn.LSTM``/``GRU`` (fused kernels) per FLOP,
  and with ``compile=True`` the same cells under ``torch.compile`` as well;
* ``search``: seconds per epoch of the real search engine, per strategy and space;
* ``threads``: the fused supernet's training step at one thread and at every core over a grid of
  ``batch × hidden``, the measurement behind ``engine.runtime.MULTITHREAD_FROM``.

Timings are medians of interleaved repeats after a warm-up, each implementation at its faster
thread count (the ``threads`` part times every count); FLOPs are counted analytically (matmuls
only). Nothing here asserts a time: the numbers are for people, the tests only check that they
exist and that the reference is right.

The package, one module per job: ``timing`` (wall time, peak memory, thread counts, interleaved
rounds), ``workloads`` (sizes and the timed training step), ``reference`` (the DARTS reference
cell, FLOP counts), ``wrappers`` (Python kernels, CUDA graphs), ``parts/`` (one module per part,
with its sizes), ``machine`` (where the figures come from) and ``tables`` (the rich tables);
here, ``run_bench``, which runs the parts in order between two readings of the matmul ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from morphnas.bench.machine import machine_info
from morphnas.bench.parts import cell, search, supernet, threads
from morphnas.bench.parts.cell import DARTS_V2, TWO_INPUT_GATED
from morphnas.bench.parts.threads import multithread_crossover, thread_point
from morphnas.bench.reference import ReferenceDartsCell, cell_flops, supernet_flops
from morphnas.bench.tables import bench_table
from morphnas.bench.timing import Context, measure_matmul, thread_candidates
from morphnas.engine.runtime import apply_threads, resolve_device

PARTS = ("supernet", "cell", "search", "threads")  # in the order they run
# Defaults; ``repeats=`` overrides all of them. The big supernet steps take seconds each.
REPEATS = {
    "supernet:small": 7, "supernet:darts": 3, "cell": 5, "search": 3, "threads": 3, "matmul": 5,
}  # fmt: skip
QUICK_REPEATS = {
    "supernet:small": 2, "supernet:darts": 2, "cell": 2, "search": 1, "threads": 2, "matmul": 2,
}  # fmt: skip


def _repeats(key: str, quick: bool, repeats: int | None) -> int:
    """The caller's ``repeats`` for every part, else the part's default (quick or full)."""
    if repeats is not None:
        return repeats
    return (QUICK_REPEATS if quick else REPEATS)[key]


def run_bench(
    parts: Sequence[str] = PARTS,
    *,
    quick: bool = False,
    device: str = "cpu",
    repeats: int | None = None,
    compile: bool = False,
    compile_backend: str = "inductor",
) -> dict[str, Any]:
    """Measure the requested parts; a JSON-serialisable dict with stable keys (see
    docs/benchmarks.md, "Output keys"). The caller's thread count and RNG state are restored.

    ``compile`` adds the derived cells under ``torch.compile`` to the ``cell`` part. Opt-in:
    on CPU, compiling a 35-step unroll takes minutes. ``compile_backend`` is for the tests
    (``"aot_eager"`` traces in seconds); the figures are inductor's."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown bench part(s) {unknown}; expected some of {list(PARTS)}")
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    dev = resolve_device(device)
    threads_before = torch.get_num_threads()
    rng_devices = [dev] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            return _run_parts(parts, dev, quick, repeats, compile, compile_backend)
    finally:
        apply_threads(threads_before)


def _run_parts(
    parts: Sequence[str],
    device: torch.device,
    quick: bool,
    repeats: int | None,
    compile: bool,
    compile_backend: str,
) -> dict[str, Any]:
    """The parts in ``PARTS`` order between two readings of the matmul ceiling, each timed."""
    started = time.perf_counter()
    wall: dict[str, float] = {}
    result: dict[str, Any] = {"machine": machine_info(device, quick), "wall_seconds": wall}
    result.update(matmul={}, matmul_gflops=None)  # measured before and after the parts
    candidates = thread_candidates(device, quick)
    size, matmul_repeats = 512 if quick else 2048, _repeats("matmul", quick, repeats)
    readings = [measure_matmul(device, size, matmul_repeats, candidates)]
    ctx = Context(device, tuple(candidates), size, readings[0]["threads"], compile, compile_backend)
    wall["setup"] = time.perf_counter() - started
    for part in PARTS:
        if part in parts:
            part_started = time.perf_counter()
            _run_part(part, result, ctx, quick, repeats)
            wall[part] = time.perf_counter() - part_started
    ceiling_started = time.perf_counter()
    readings.append(measure_matmul(device, size, matmul_repeats, candidates))
    wall["ceiling"] = time.perf_counter() - ceiling_started
    # The machine's limit, for the record: the higher of a reading before the parts and one
    # after them (one alone moves with the host). The fractions are against their own rounds'.
    best = max(readings, key=lambda reading: reading["gflops"])
    result["matmul"] = {**best, "readings": [reading["gflops"] for reading in readings]}
    result["matmul_gflops"] = best["gflops"]
    wall["total"] = time.perf_counter() - started
    return result


def _run_part(
    part: str, result: dict[str, Any], ctx: Context, quick: bool, repeats: int | None
) -> None:
    """Measure one part into ``result``: its entry, and ``supernet_two_input`` with ``supernet``.

    Each part's sizes are read from its module here (not imported by name), so that a test can
    shrink them with ``monkeypatch``."""
    if part == "supernet":
        configs = supernet.QUICK_SUPERNET_CONFIGS if quick else supernet.SUPERNET_CONFIGS
        result["supernet"] = {
            name: supernet.bench_supernet_config(
                cfg, ctx, _repeats(f"supernet:{name}", quick, repeats)
            )
            for name, cfg in configs.items()
        }
        two_input = supernet.QUICK_TWO_INPUT_CONFIGS if quick else supernet.TWO_INPUT_CONFIGS
        result["supernet_two_input"] = {
            name: supernet.bench_two_input_config(
                cfg, ctx, _repeats("supernet:small", quick, repeats)
            )
            for name, cfg in two_input.items()
        }
        cnn = supernet.QUICK_CNN_CONFIGS if quick else supernet.CNN_CONFIGS
        result["supernet_cnn"] = {
            name: supernet.bench_cnn_config(cfg, ctx, _repeats("supernet:small", quick, repeats))
            for name, cfg in cnn.items()
        }
    elif part == "cell":
        cell_configs = cell.QUICK_CELL_CONFIGS if quick else cell.CELL_CONFIGS
        result["cell"] = {
            name: cell.bench_cell_config(cfg, ctx, _repeats("cell", quick, repeats))
            for name, cfg in cell_configs.items()
        }
    elif part == "search":
        search_repeats = _repeats("search", quick, repeats)
        result["search"] = search.bench_search(ctx.device, search_repeats, quick)
    elif part == "threads":
        configs = threads.QUICK_THREADS_CONFIGS if quick else threads.THREADS_CONFIGS
        result["threads"] = threads.bench_threads(configs, ctx, _repeats("threads", quick, repeats))
    else:
        raise ValueError(f"bench part {part!r} has no runner; add one to _run_part")


__all__ = [
    "DARTS_V2",
    "PARTS",
    "TWO_INPUT_GATED",
    "ReferenceDartsCell",
    "bench_table",
    "cell_flops",
    "machine_info",
    "multithread_crossover",
    "run_bench",
    "supernet_flops",
    "thread_point",
]
