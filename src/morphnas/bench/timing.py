"""Measuring: wall time with the device drained, peak memory, thread counts, interleaved rounds.

Every part times its implementations through ``measure`` (or ``interleaved``), side by side in one
process, so that drifting load on a shared machine hits all alike; the ceiling's matmul is timed
in the same rounds (``measure_beside_ceiling``) because the machine's throughput moves within
minutes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from morphnas.bench.workloads import Workload
from morphnas.engine.runtime import apply_threads

PROBE_STEPS = 5  # time steps of the short sequence that picks an implementation's thread count


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``fn`` with the device drained before and after (GPU work is asynchronous)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def thread_candidates(device: torch.device, quick: bool = False) -> list[int]:
    """1 and every core on CPU: small recurrent kernels often lose from threading, large ones
    gain. One thread only in quick mode: on a busy machine an oversubscribed thread pool can make
    a tiny step 100× slower, which would turn a seconds-long smoke run into minutes. On CUDA the
    host threads barely matter, so the current count only."""
    if device.type == "cuda":
        return [torch.get_num_threads()]
    if quick:
        return [1]
    return sorted({1, os.cpu_count() or 1})


def _proc_status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"{field} not in /proc/self/status")
    return int(match.group(1))


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS, so the next step's allocations show up in RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cpu_peak_mb(fn: Callable[[], object]) -> float | None:
    """Resident memory one call adds at its peak: VmHWM after the call minus VmRSS before it.

    Freed memory is first returned to the OS (``gc.collect``, ``malloc_trim``) and the high-water
    mark reset to the current RSS (``"5"`` into ``/proc/self/clear_refs``), so what is counted is
    the memory this call touched beyond what was already resident (weights, inputs, the other
    implementation). ``None`` where ``/proc`` does not offer this (not Linux).
    """
    gc.collect()
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _proc_status_kb("VmRSS")
    except OSError:
        return None
    fn()
    return (_proc_status_kb("VmHWM") - base) / 1024


def _cuda_peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak allocated by the caching allocator during the call, above what was allocated before."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    return _cuda_peak_mb(fn, device) if device.type == "cuda" else _cpu_peak_mb(fn)


def _best_threads(work: Timed, device: torch.device, candidates: Sequence[int]) -> int:
    """The faster thread count on a short prefix of the sequence (cost is linear in its length,
    so the ranking carries over, and the probe stays cheap at the DARTS size).

    A count already twice as slow as the best after one probe is not timed again: a thread pool
    fighting other processes for the cores can take seconds per tiny step. The first probe step
    is a warm-up, also with a single candidate: one-time costs (kernel selection, the cuBLAS
    workspace) stay out of the probe and out of the memory measured next.
    """
    if work.threads is not None:
        return work.threads  # warmed up already (compiled modules are, by ``compile_cell``)
    probe = min(PROBE_STEPS, work.x.shape[0])
    apply_threads(candidates[0])
    work.step(probe)
    if len(candidates) == 1:
        return candidates[0]
    timings: dict[int, float] = {}
    for threads in candidates:
        apply_threads(threads)
        seconds = _seconds(lambda: work.step(probe), device)
        if seconds <= 2 * min(timings.values(), default=seconds):
            seconds = min(seconds, _seconds(lambda: work.step(probe), device))
        timings[threads] = seconds
    return min(timings, key=timings.__getitem__)


def measure(
    workloads: dict[str, Timed],
    device: torch.device,
    repeats: int,
    candidates: Sequence[int],
    probe: bool = True,
) -> dict[str, Any]:
    """Per workload: ``seconds`` (median), ``threads`` and ``peak_mb``, timed side by side.

    Order: thread probe per workload; then one full step per workload under the memory meter,
    which is also its full-length warm-up; then ``repeats`` rounds of one step of each workload
    in turn (A, B, A, B, ...), so that drifting load on a shared machine hits all alike.

    ``probe=False`` (for steps cheap enough to time twice): no prefix probe; every workload is
    timed at every thread count in the interleaved rounds and keeps its faster median, so a noisy
    probe cannot pick the wrong count.
    """
    if probe:
        counts = {
            name: [_best_threads(work, device, candidates)] for name, work in workloads.items()
        }
    else:
        counts = {
            name: list(candidates) if work.threads is None else [work.threads]
            for name, work in workloads.items()
        }
    peaks = {}
    for name, work in workloads.items():
        apply_threads(counts[name][0])
        peaks[name] = _peak_mb(work.step, device)
    runs = {(name, t): (work, t) for name, work in workloads.items() for t in counts[name]}
    seconds = interleaved(runs, device, repeats)
    best = {
        name: min(counts[name], key=lambda t, name=name: seconds[name, t]) for name in workloads
    }
    return {
        name: {"seconds": seconds[name, best[name]], "threads": best[name], "peak_mb": peaks[name]}
        for name in workloads
    }


def interleaved(
    runs: dict[Any, tuple[Timed, int]], device: torch.device, repeats: int
) -> dict[Any, float]:
    """Median seconds of one full step per run (a workload at a thread count), timed in
    ``repeats`` rounds of one step of each run in turn (A, B, A, B, ...): drifting load on a
    shared machine then hits all alike, which a block of A's then a block of B's would not."""
    times: dict[Any, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (work, threads) in runs.items():
            apply_threads(threads)
            times[name].append(_seconds(work.step, device))
    return {name: statistics.median(values) for name, values in times.items()}


def with_throughput(entry: dict[str, Any], flops: int, matmul_gflops: float) -> dict[str, Any]:
    """``entry`` with its GFLOP/s at ``flops`` a step, and that as a fraction of the ceiling's."""
    gflops = flops / entry["seconds"] / 1e9
    return {**entry, "gflops": gflops, "fraction_of_matmul": gflops / matmul_gflops}


CEILING = "matmul"  # the ceiling's matmul, timed as one more workload among a part's (below)


@dataclass
class MatmulStep:
    """The ceiling's matmul: timed alone by ``measure_matmul``, and as a workload of ``measure``
    in the same interleaved rounds as the implementations it is the ceiling of. On a shared host
    the machine's throughput moves by a quarter within minutes (132 and 170 GFLOP/s ten minutes
    apart), so a ceiling taken at another time made ``fraction_of_matmul`` move with it (once to
    "101 % of matmul")."""

    a: Tensor
    b: Tensor
    threads: int  # its count in ``measure``: the one the run's first reading found faster

    @classmethod
    def square(cls, size: int, device: torch.device, threads: int) -> MatmulStep:
        a, b = (torch.randn(size, size, device=device) for _ in "ab")
        return cls(a, b, threads)

    def step(self, bptt: int | None = None) -> None:
        self.a @ self.b

    def gflops(self, seconds: float) -> float:
        return 2 * self.a.shape[0] ** 3 / seconds / 1e9


Timed = Workload | MatmulStep  # what ``measure`` times: a ``step`` at a thread count


def measure_beside_ceiling(
    workloads: dict[str, Workload], ctx: Context, repeats: int, probe: bool
) -> tuple[dict[str, Any], float]:
    """``measure`` of the workloads with the ceiling's matmul among them: their entries, and the
    matmul's GFLOP/s over the same rounds (its median, as theirs)."""
    ceiling = MatmulStep.square(ctx.matmul_size, ctx.device, ctx.matmul_threads)
    timed = {**workloads, CEILING: ceiling}
    measured = measure(timed, ctx.device, repeats, ctx.threads, probe=probe)
    return measured, ceiling.gflops(measured.pop(CEILING)["seconds"])


def measure_matmul(
    device: torch.device, size: int, repeats: int, candidates: Sequence[int]
) -> dict[str, Any]:
    """The machine's dense float32 matmul throughput: the best of ``repeats`` at each thread
    count, the better count kept. The best (not the median) because this is the ceiling."""
    matmul = MatmulStep.square(size, device, candidates[0])
    best: dict[int, float] = {}
    for threads in candidates:
        apply_threads(threads)
        matmul.step()  # warm-up
        best[threads] = min(_seconds(matmul.step, device) for _ in range(repeats))
    threads = min(best, key=best.__getitem__)
    return {"size": size, "threads": threads, "gflops": matmul.gflops(best[threads])}


@dataclass(frozen=True)
class Context:
    """What every part's measurement shares: the device, the thread counts to try, the size and
    thread count of the ceiling's matmul, and whether (with which backend) the ``cell`` part
    also times its cells compiled."""

    device: torch.device
    threads: tuple[int, ...]
    matmul_size: int = 512
    matmul_threads: int = 1
    compile: bool = False
    compile_backend: str = "inductor"
