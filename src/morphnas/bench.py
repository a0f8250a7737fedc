"""Measured, side-by-side performance figures (``morphnas bench``; DESIGN §6, docs/benchmarks.md).

Four parts, each a comparison measured in one process so that the ratios mean something on a
noisy, shared machine:

* ``supernet``: one training step of our fused ``DartsRNNSearchCell`` against the loop of the DARTS
  reference code (``ReferenceDartsCell`` below, same parameters, checked to compute the same
  function), both against the machine's own dense-matmul throughput; and (``supernet_two_input``)
  the two-input supernet's sequence kernel against its own eager loop;
* ``cell``: derived discrete cells against ``torch.nn.LSTM``/``GRU`` (fused kernels) per FLOP,
  and with ``compile=True`` the same cells under ``torch.compile`` as well;
* ``search``: seconds per epoch of the real search engine, per strategy and space;
* ``threads``: the fused supernet's training step at one thread and at every core over a grid of
  ``batch × hidden``, the measurement behind ``engine.runtime.MULTITHREAD_FROM``.

Timings are medians of interleaved repeats after a warm-up, each implementation at its faster
thread count (the ``threads`` part times every count); FLOPs are counted analytically (matmuls
only). Nothing here asserts a time: the numbers are for people, the tests only check that they
exist and that the reference is right.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn

from morphnas import cells, native, spaces, strategies
from morphnas.config import SearchConfig
from morphnas.data import make_windows, synthetic_series
from morphnas.engine.compiled import compile_cell
from morphnas.engine.runtime import (
    MULTITHREAD_FROM,
    apply_threads,
    choose_threads,
    malloc_policy,
    resolve_device,
)
from morphnas.engine.search import search as run_search
from morphnas.genotype import DARTS_PRIMITIVES, KNOWN, Genotype, Node
from morphnas.ops import ACTIVATIONS
from morphnas.report import MetricsLog
from morphnas.spaces import DartsRNNSearchCell
from morphnas.tasks.forecasting import ForecastModel, ForecastTask

PARTS = ("supernet", "cell", "search", "threads")
AGREEMENT_TOL = 1e-4  # float32, outputs of ours vs the reference before any timing ...
AGREEMENT_STEPS = 10  # ... on the first steps: later, the recurrence amplifies float32 rounding
PROBE_STEPS = 5  # time steps of the short sequence that picks an implementation's thread count
# A supernet configuration of more FLOPs a step than this is thread-probed; one of fewer (``small``:
# 4.2 GFLOP, the reference's step under half a second) is timed in full at every count, because
# the probe's pick moved the ratio there: the reference on one thread (441, 487 ms) or two (386 ms).
PROBE_ABOVE_GFLOP = 50.0
DARTS_DROPOUT_X, DARTS_DROPOUT_H = 0.75, 0.25  # DARTS search defaults (rnn/train_search.py)
SGD_LR = 1e-3  # small, so that repeated steps keep the weights (and the timings) ordinary

# DARTS_V2, the recurrent cell of the DARTS paper (quark0/darts rnn/genotypes.py), concat 1..8.
DARTS_V2 = KNOWN["darts_v2"]  # the 8-node cell of the DARTS paper
# A gated two-input cell in the spirit of GRU: gate ⊙ candidate, then a highway onto h.
TWO_INPUT_GATED = Genotype(
    space="two_input",
    nodes=(
        Node("add_sigmoid", (0, -1)),  # s1 = σ(A h + B u)      a gate
        Node("add_tanh", (0, -1)),  # s2 = tanh(A h + B u)      a candidate
        Node("hadamard", (1, 2)),  # s3 = s1 ⊙ s2
        Node("highway", (3, 0)),  # s4 = s3 + σ(C h) ⊙ (tanh(H h) − s3)
    ),
    output="last",
    output_activation="tanh",
)


@dataclass(frozen=True)
class SupernetConfig:
    """One supernet workload; ``input_size = hidden`` as in DARTS language modelling."""

    batch: int
    hidden: int
    bptt: int
    nodes: int

    @property
    def input_size(self) -> int:
        return self.hidden


def _grid(
    batches: Sequence[int],
    hiddens: Sequence[int],
    bptt: int,
    nodes: int,
    skip: frozenset[tuple[int, int]] = frozenset(),
) -> tuple[SupernetConfig, ...]:
    """Every ``(batch, hidden)`` pair but those in ``skip``, smallest batch first."""
    pairs = [(b, h) for b in batches for h in hiddens if (b, h) not in skip]
    return tuple(SupernetConfig(b, h, bptt, nodes) for b, h in pairs)


@dataclass(frozen=True)
class CellConfig:
    batch: int
    hidden: int
    bptt: int


SUPERNET_CONFIGS = {
    "small": SupernetConfig(batch=64, hidden=64, bptt=35, nodes=8),
    "darts": SupernetConfig(batch=256, hidden=300, bptt=35, nodes=8),
}
QUICK_SUPERNET_CONFIGS = {
    "small": SupernetConfig(batch=16, hidden=32, bptt=6, nodes=3),
    "darts": SupernetConfig(batch=32, hidden=48, bptt=6, nodes=4),
}
# The two-input supernet's kernel against its own eager loop: the supernet part's small size and
# the search default (hidden 32, 4 nodes, window 24, batch 64; ``SEARCH_SETUP``).
TWO_INPUT_CONFIGS = {
    "small": SUPERNET_CONFIGS["small"],
    "search": SupernetConfig(batch=64, hidden=32, bptt=24, nodes=4),
}
QUICK_TWO_INPUT_CONFIGS = {"small": QUICK_SUPERNET_CONFIGS["small"]}
CELL_CONFIGS = {
    "small": CellConfig(batch=64, hidden=64, bptt=35),
    "large": CellConfig(batch=64, hidden=300, bptt=35),
}
QUICK_CELL_CONFIGS = {
    "small": CellConfig(batch=8, hidden=16, bptt=6),
    "large": CellConfig(batch=8, hidden=48, bptt=6),
}
# The thread-policy grid: products from 1,024 to 32,768 around the threshold, at the DARTS bptt
# and node count. Batch 256 × hidden 300 (the supernet part's ``darts``, already timed there at
# its faster count, 4–6 s a step) would cost as much as the rest of the grid together.
THREADS_CONFIGS = _grid(
    (32, 64, 256), (32, 64, 128, 300), bptt=35, nodes=8, skip=frozenset({(256, 300)})
)
QUICK_THREADS_CONFIGS = _grid((8, 16), (16, 32), bptt=6, nodes=3)
# Defaults; ``repeats=`` overrides all of them. The big supernet steps take seconds each.
REPEATS = {
    "supernet:small": 7, "supernet:darts": 3, "cell": 5, "search": 3, "threads": 3, "matmul": 5,
}  # fmt: skip
QUICK_REPEATS = {
    "supernet:small": 2, "supernet:darts": 2, "cell": 2, "search": 1, "threads": 2, "matmul": 2,
}  # fmt: skip
SEARCH_SETUP = {"hidden": 32, "nodes": 4, "window": 24, "n_series": 8, "batch_size": 64}
# ``search.<variant>``: a strategy with options other than its defaults, timed beside them.
SEARCH_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "idarts_finite_all": ("idarts", {"hvp": "finite_all"}),
}


# --------------------------------------------------------------------------- the reference


class ReferenceDartsCell(nn.Module):
    """The DARTS search cell written as the reference code runs it (``rnn/model_search.py``).

    Kept deliberately straightforward, because it is the yardstick our fused cell is measured
    against: per time step the softmax of ``α`` is recomputed, ``x_t`` and ``h_{t-1}`` are
    concatenated for one init GEMM; per node the dropout mask is re-applied to the whole stack of
    predecessor states (one GEMM over the stack, as the reference does), then per primitive a
    full highway blend over every predecessor edge and a probability-weighted sum over the edges;
    BatchNorm; ``torch.cat`` grows the state stack. Masks are drawn like ours (same RNG calls), so
    with the same seed both cells compute the same function.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        nodes: int = 8,
        dropout_x: float = 0.0,
        dropout_h: float = 0.0,
    ) -> None:
        super().__init__()
        d = hidden_size
        self.input_size, self.hidden_size, self.steps = input_size, hidden_size, nodes
        self.dropout_x, self.dropout_h = dropout_x, dropout_h
        self._W0 = nn.Parameter(torch.zeros(input_size + d, 2 * d))
        self._Ws = nn.ParameterList(nn.Parameter(torch.zeros(d, 2 * d)) for _ in range(nodes))
        self.weights = nn.Parameter(torch.zeros(nodes * (nodes + 1) // 2, len(DARTS_PRIMITIVES)))
        self.bn = nn.BatchNorm1d(d, affine=False)

    @classmethod
    def copy_of(cls, cell: DartsRNNSearchCell) -> ReferenceDartsCell:
        """A reference cell holding copies of ``cell``'s parameters (its ``α`` rows stacked)."""
        if cell.op_names != DARTS_PRIMITIVES or cell.fixed or len(cell.gammas) or cell.bn is None:
            raise ValueError("the reference covers the plain DARTS supernet only")
        ref = cls(cell.input_size, cell.hidden_size, cell.nodes, cell.dropout_x, cell.dropout_h)
        ref = ref.to(device=cell.init_weight.device, dtype=cell.init_weight.dtype)
        with torch.no_grad():
            ref._W0.copy_(cell.init_weight)
            for mine, theirs in zip(ref._Ws, cell.node_weights, strict=True):
                mine.copy_(theirs)
            ref.weights.copy_(torch.cat(list(cell.arch)))
        return ref

    def _mask(self, batch: int, size: int, p: float, like: Tensor) -> Tensor | None:
        if not self.training or p <= 0.0:
            return None
        return like.new_empty(batch, size).bernoulli_(1.0 - p) / (1.0 - p)

    def _init_state(
        self, x: Tensor, h_prev: Tensor, x_mask: Tensor | None, h_mask: Tensor | None
    ) -> Tensor:
        xm = x if x_mask is None else x * x_mask
        hm = h_prev if h_mask is None else h_prev * h_mask
        c0, h0 = torch.split(torch.cat([xm, hm], dim=-1).mm(self._W0), self.hidden_size, dim=-1)
        return h_prev + c0.sigmoid() * (h0.tanh() - h_prev)

    def cell(
        self, x: Tensor, h_prev: Tensor, x_mask: Tensor | None, h_mask: Tensor | None
    ) -> Tensor:
        d = self.hidden_size
        s0 = self.bn(self._init_state(x, h_prev, x_mask, h_mask))
        probs = torch.softmax(self.weights, dim=-1)
        offset, states = 0, s0.unsqueeze(0)
        for i in range(self.steps):
            masked = states if h_mask is None else states * h_mask.unsqueeze(0)
            ch = masked.view(-1, d).mm(self._Ws[i]).view(i + 1, -1, 2 * d)
            c, h = torch.split(ch, d, dim=-1)
            c = c.sigmoid()
            s = torch.zeros_like(s0)
            for k, name in enumerate(DARTS_PRIMITIVES):
                if name == "none":
                    continue
                unweighted = states + c * (ACTIVATIONS[name](h) - states)
                s += torch.sum(probs[offset : offset + i + 1, k, None, None] * unweighted, dim=0)
            s = self.bn(s)
            states = torch.cat([states, s.unsqueeze(0)], 0)
            offset += i + 1
        return torch.mean(states[-self.steps :], dim=0)

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        steps, batch, _ = x.shape
        x_mask = self._mask(batch, self.input_size, self.dropout_x, x)
        h_mask = self._mask(batch, self.hidden_size, self.dropout_h, x)
        hidden = x.new_zeros(batch, self.hidden_size) if h0 is None else h0
        hiddens = []
        for t in range(steps):
            hidden = self.cell(x[t], hidden, x_mask, h_mask)
            hiddens.append(hidden)
        return torch.stack(hiddens), hidden


# --------------------------------------------------------------------------- FLOP counts


def supernet_flops(batch: int, input_size: int, hidden: int, bptt: int, nodes: int) -> int:
    """Matmul FLOPs of one training step of the DARTS supernet (forward ×3 for the backward).

    Per time step: the init GEMM ``(B, in+d) @ (in+d, 2d)``, and for node ``i`` one
    ``(B, d) @ (d, 2d)`` per predecessor (``i`` of them). A multiply-add is 2 FLOPs. Elementwise
    work (activations, blends, BatchNorm) is not counted.
    """
    d = hidden
    init = 2 * batch * (input_size + d) * 2 * d
    node_edges = nodes * (nodes + 1) // 2
    edges = node_edges * 2 * batch * d * 2 * d
    return 3 * bptt * (init + edges)


def cell_flops(model: Genotype | str, batch: int, input_size: int, hidden: int, bptt: int) -> int:
    """Matmul FLOPs of one forward+backward of a discrete cell or ``lstm``/``gru`` (×3 forward).

    LSTM: ``(B, in) @ (in, 4d)`` and ``(B, d) @ (d, 4d)`` per step; GRU the same with 3 gates.
    DARTS cell: the init GEMM plus one ``(B, d) @ (d, 2d)`` per node. Two-input cell: the input
    projection ``(B, in) @ (in, d)``, ``[a, b] @ (2d, d)`` per ``add_*`` node and
    ``b @ (d, 2d)`` per ``highway`` node; ``hadamard``/``add`` have no matmul. The DARTS
    kernel's mean of the nodes, a ``(1, N) @ (N, B·d)`` per step (``1/(2d)`` of one node's
    FLOPs), is not counted.
    """
    d = hidden
    gates = {"lstm": 4, "gru": 3}
    if isinstance(model, str):
        per_step = 2 * batch * (input_size + d) * gates[model] * d
    elif model.space == "darts_rnn":
        per_step = 2 * batch * (input_size + d) * 2 * d + len(model.nodes) * 2 * batch * d * 2 * d
    else:
        weighted = sum(node.op.startswith("add_") or node.op == "highway" for node in model.nodes)
        per_step = 2 * batch * input_size * d + weighted * 2 * batch * 2 * d * d
    return 3 * bptt * per_step


# --------------------------------------------------------------------------- measuring


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


@dataclass
class Workload:
    """One implementation's training step on a fixed batch: MSE on all outputs, backward, and
    (with an optimizer) a step on every parameter, architecture parameters included.

    ``threads`` pins the thread count instead of probing for it. Compiled modules need that:
    inductor bakes the thread count of compile time into its CPU kernels (so timing other
    counts would time a mix), and the unroll is specialised on the sequence length (so the
    probe's shorter prefix would compile the module all over again).
    """

    module: nn.Module
    x: Tensor
    target: Tensor
    optimizer: torch.optim.Optimizer | None = None
    threads: int | None = None

    def step(self, bptt: int | None = None) -> None:
        """One step on the whole sequence, or on its first ``bptt`` steps (the thread probe)."""
        x, target = (self.x, self.target) if bptt is None else (self.x[:bptt], self.target[:bptt])
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.module.zero_grad(set_to_none=True)
        outputs, _ = self.module(x)
        F.mse_loss(outputs, target).backward()
        if self.optimizer is not None:
            self.optimizer.step()


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
    seconds = _interleaved(runs, device, repeats)
    best = {
        name: min(counts[name], key=lambda t, name=name: seconds[name, t]) for name in workloads
    }
    return {
        name: {"seconds": seconds[name, best[name]], "threads": best[name], "peak_mb": peaks[name]}
        for name in workloads
    }


def _interleaved(
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


def _with_throughput(entry: dict[str, Any], flops: int, matmul_gflops: float) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- the parts


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


def _sequence(
    cfg: SupernetConfig | CellConfig, input_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    x = torch.randn(cfg.bptt, cfg.batch, input_size, device=device)
    return x, torch.randn(cfg.bptt, cfg.batch, cfg.hidden, device=device)


def check_agreement(ours: DartsRNNSearchCell, reference: ReferenceDartsCell, x: Tensor) -> float:
    """Max |ours − reference| over the outputs of the first ``AGREEMENT_STEPS`` time steps, same
    seed (so the same dropout masks), training mode.

    Only a prefix, because this recurrence is badly conditioned: by step 35 of the DARTS
    configuration both float32 implementations are ~1e-3 away from a float64 run (and from each
    other), so a full-length float32 comparison would test the cell's conditioning, not the code.
    Any error in a formula shows at the first step; exactness over whole sequences, gradients
    included, is tested in float64 (tests/test_bench.py).
    """
    x = x[:AGREEMENT_STEPS]
    with torch.no_grad():
        torch.manual_seed(1)
        mine, _ = ours(x)
        torch.manual_seed(1)
        theirs, _ = reference(x)
    return float((mine - theirs).abs().max())


def _supernet(cfg: SupernetConfig, device: torch.device) -> DartsRNNSearchCell:
    """Our search cell at ``cfg`` with the DARTS search dropouts, on its default fused path."""
    return DartsRNNSearchCell(
        cfg.input_size,
        cfg.hidden,
        nodes=cfg.nodes,
        dropout_x=DARTS_DROPOUT_X,
        dropout_h=DARTS_DROPOUT_H,
    ).to(device)


def _sgd_workload(module: nn.Module, x: Tensor, target: Tensor) -> Workload:
    """A full training step: the supernet parts time the optimizer step as well."""
    return Workload(module, x, target, torch.optim.SGD(module.parameters(), lr=SGD_LR))


def bench_supernet_config(cfg: SupernetConfig, ctx: Context, repeats: int) -> dict[str, Any]:
    """Ours vs the reference on one configuration, after checking they compute the same thing."""
    torch.manual_seed(0)
    ours = _supernet(cfg, ctx.device)
    reference = ReferenceDartsCell.copy_of(ours)
    x, target = _sequence(cfg, cfg.input_size, ctx.device)
    apply_threads(ctx.threads[0])
    diff = check_agreement(ours, reference, x)
    if not diff <= AGREEMENT_TOL:
        raise RuntimeError(f"reference and fused supernet disagree by {diff:.2e} ({cfg})")
    modules = {"ours": ours, "reference": reference}
    if ctx.device.type == "cuda":
        modules["ours_cuda_graph"] = CudaGraphed(copy.deepcopy(ours), x)
    elif native.darts_supernet() is not None:
        modules["ours_python"] = PythonKernels(copy.deepcopy(ours))
    workloads = {name: _sgd_workload(module, x, target) for name, module in modules.items()}
    flops = supernet_flops(cfg.batch, cfg.input_size, cfg.hidden, cfg.bptt, cfg.nodes)
    probe = flops > PROBE_ABOVE_GFLOP * 1e9
    measured, ceiling = measure_beside_ceiling(workloads, ctx, repeats, probe)
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "gflop": flops / 1e9,
        "max_abs_diff": diff,
        "agreement_steps": min(AGREEMENT_STEPS, cfg.bptt),
        "matmul_gflops": ceiling,
    }
    for name, entry in measured.items():
        result[name] = _with_throughput(entry, flops, ceiling)
    result["speedup"] = result["reference"]["seconds"] / result["ours"]["seconds"]
    if "ours_cuda_graph" in result:
        graphed = result["ours_cuda_graph"]["seconds"]
        result["speedup_cuda_graph"] = result["reference"]["seconds"] / graphed
    if "ours_python" in result:
        python = result["ours_python"]["seconds"]
        result["speedup_python_kernel"] = result["reference"]["seconds"] / python
    return result


def bench_two_input_config(cfg: SupernetConfig, ctx: Context, repeats: int) -> dict[str, Any]:
    """The two-input supernet (every op, chain wiring) on its sequence kernel against the same
    module's eager loop (``fused=False``): no outside reference exists for this space, so the
    figure is what the kernel buys. Checked to agree (whole sequence; the output is squashed)."""
    torch.manual_seed(0)
    kernel = spaces.TwoInputSearchCell(cfg.input_size, cfg.hidden, nodes=cfg.nodes).to(ctx.device)
    eager = copy.deepcopy(kernel)
    eager.fused = False
    x, target = _sequence(cfg, cfg.input_size, ctx.device)
    apply_threads(ctx.threads[0])
    with torch.no_grad():
        diff = float((kernel(x)[0] - eager(x)[0]).abs().max())
    if not diff <= AGREEMENT_TOL:
        raise RuntimeError(f"two-input kernel and eager loop disagree by {diff:.2e} ({cfg})")
    workloads = {
        "kernel": _sgd_workload(kernel, x, target),
        "eager": _sgd_workload(eager, x, target),
    }
    if ctx.device.type == "cpu" and native.two_input_supernet() is not None:
        python = PythonKernels(copy.deepcopy(kernel))
        workloads["kernel_python"] = _sgd_workload(python, x, target)
    measured = measure(workloads, ctx.device, repeats, ctx.threads, probe=False)  # cheap steps
    eager_seconds = measured["eager"]["seconds"]
    result = {"config": asdict(cfg), "max_abs_diff": diff, **measured}
    result["speedup"] = eager_seconds / measured["kernel"]["seconds"]
    if "kernel_python" in measured:
        result["speedup_python_kernel"] = eager_seconds / measured["kernel_python"]["seconds"]
    return result


class PythonKernels(nn.Module):
    """``module`` run on the Python kernels where the native ones would run
    (``native.python_kernels``): what the native kernel buys, timed side by side."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Any:
        with native.python_kernels():
            return self.module(x)


class CudaGraphed(nn.Module):
    """A module whose forward and backward over one input shape replay CUDA graphs.

    A recurrent step launches hundreds of tiny kernels; on a GPU their launch overhead, not the
    arithmetic, is the cost. ``make_graphed_callables`` records them once for the captured shape
    and replays them as one graph (the same results to the bit in our checks); any other shape,
    and eval mode, run eagerly. Capture takes seconds and must be redone after the module changes
    shape (a growth).
    """

    def __init__(self, module: nn.Module, x: Tensor) -> None:
        super().__init__()
        self.module = module.train()
        self._eager = module.forward
        torch.cuda.make_graphed_callables(module, (x,))
        self._graphed = module.forward
        self._shape = tuple(x.shape)

    def forward(self, x: Tensor) -> Any:
        replay = self.training and tuple(x.shape) == self._shape
        return self._graphed(x) if replay else self._eager(x)


EAGER_SUFFIX = "_eager"  # ``cell.<config>.<model>_eager``: the same cell on its eager loop
PYTHON_SUFFIX = "_python"  # ``cell.<config>.<model>_python``: on its Python kernel, not native
NATIVE_CELLS = {"darts": native.darts_cell, "two_input": native.two_input_cell}
CELL_MODELS: dict[str, Genotype | str] = {
    "darts": DARTS_V2,
    "darts" + EAGER_SUFFIX: DARTS_V2,  # the kernels' gains, measured side by side
    "two_input": TWO_INPUT_GATED,
    "two_input" + EAGER_SUFFIX: TWO_INPUT_GATED,
    "lstm": "lstm",
    "gru": "gru",
}


def _cell_module(name: str, model: Genotype | str, size: int) -> nn.Module:
    if isinstance(model, Genotype):
        eager = {"fused": False} if name.endswith(EAGER_SUFFIX) else {}
        return cells.build(model, size, size, **eager)
    return cells.baseline(model, size, size)


COMPILED_SUFFIX = "_compiled"  # ``cell.<config>.<model>_compiled``: the model under torch.compile
# The derived cells (LSTM/GRU are cuDNN/ATen kernels already; a compiled cell runs its eager loop,
# so ``<model>_eager`` would be ``<model>`` again).
COMPILABLE = tuple(
    name
    for name, model in CELL_MODELS.items()
    if isinstance(model, Genotype) and not name.endswith(EAGER_SUFFIX)
)


def _output_diff(module: nn.Module, other: nn.Module, x: Tensor) -> float:
    """Max |module(x) − other(x)| over all outputs, same seed (same dropout masks), training mode.

    Each forward is followed by a backward, as in a timed step: a compiled module is guarded on
    the grad mode (``no_grad`` would compile it again) and its CUDA graphs expect the backward.
    """
    outputs = []
    for cell in (module, other):
        torch.manual_seed(1)
        out, _ = cell(x)
        outputs.append(out.detach().clone())  # a CUDA graph's replay overwrites its outputs
        out.sum().backward()
        cell.zero_grad(set_to_none=True)
    return float((outputs[0] - outputs[1]).abs().max())


def _compiled_workloads(
    cfg: CellConfig, ctx: Context, modules: dict[str, nn.Module], x: Tensor, target: Tensor
) -> tuple[dict[str, Workload], dict[str, dict[str, Any]]]:
    """A compiled deep copy of every derived cell in ``modules``, and per copy whether it
    compiled, the compile seconds (``None`` after an eager fallback) and ``max_abs_diff``, its
    output's distance to the eager cell's on ``x``.

    The copies run at the thread count the project's policy picks for this size (if among the
    candidates), fixed at compile time (``Workload.threads`` says why)."""
    threads = choose_threads(cfg.hidden, cfg.batch, device=ctx.device)
    threads = threads if threads in ctx.threads else ctx.threads[0]
    apply_threads(threads)  # before compiling: inductor reads it while generating kernels
    workloads: dict[str, Workload] = {}
    info: dict[str, dict[str, Any]] = {}
    for name in COMPILABLE:
        module = copy.deepcopy(modules[name])
        seconds = compile_cell(module, x, backend=ctx.compile_backend)
        workloads[name + COMPILED_SUFFIX] = Workload(module, x, target, threads=threads)
        info[name + COMPILED_SUFFIX] = {
            "compiled": seconds is not None,
            "compile_seconds": seconds,
            "max_abs_diff": _output_diff(module, modules[name], x),
        }
    return workloads, info


def bench_cell_config(cfg: CellConfig, ctx: Context, repeats: int) -> dict[str, Any]:
    """Derived cells vs LSTM/GRU at one size: forward+backward, input size = hidden size; with
    ``ctx.compile`` also the derived cells compiled, timed in the same interleaved rounds."""
    torch.manual_seed(0)
    x, target = _sequence(cfg, cfg.hidden, ctx.device)
    modules = {
        name: _cell_module(name, model, cfg.hidden).to(ctx.device)
        for name, model in CELL_MODELS.items()
    }
    models = dict(CELL_MODELS)
    for name, kernel in NATIVE_CELLS.items():
        if ctx.device.type == "cpu" and kernel() is not None:
            modules[name + PYTHON_SUFFIX] = PythonKernels(copy.deepcopy(modules[name]))
            models[name + PYTHON_SUFFIX] = CELL_MODELS[name]
    workloads = {name: Workload(module, x, target) for name, module in modules.items()}
    compiled: dict[str, dict[str, Any]] = {}
    if ctx.compile:
        compiled_workloads, compiled = _compiled_workloads(cfg, ctx, modules, x, target)
        workloads.update(compiled_workloads)
        models.update({name: CELL_MODELS[name.removesuffix(COMPILED_SUFFIX)] for name in compiled})
    measured, ceiling = measure_beside_ceiling(workloads, ctx, repeats, probe=False)  # cheap
    result: dict[str, Any] = {"config": asdict(cfg), "matmul_gflops": ceiling}
    for name, model in models.items():
        flops = cell_flops(model, cfg.batch, cfg.hidden, cfg.hidden, cfg.bptt)
        result[name] = _with_throughput(measured[name], flops, ceiling)
        result[name]["gflop"] = flops / 1e9
        result[name].update(compiled.get(name, {}))
    lstm = result["lstm"]["gflops"]
    result["gflops_vs_lstm"] = {name: result[name]["gflops"] / lstm for name in models}
    return result


def _search_epoch_seconds(
    strategy_name: str,
    space_name: str,
    data: Any,
    device: torch.device,
    options: dict[str, Any] | None = None,
) -> tuple[float, int]:
    """One epoch of the real search loop (arch step + weight step per batch, the epoch's
    validation pass and checkpoint included) with the strategy's ``options``; returns seconds
    and batches."""
    setup = SEARCH_SETUP
    torch.manual_seed(0)
    n_series = setup["n_series"]
    space = spaces.build(space_name, n_series, setup["hidden"], setup["nodes"])
    model = ForecastModel(space, setup["hidden"], n_series).to(device)
    strategy = strategies.build(strategy_name, space, **(options or {}))
    train = tuple(t.to(device) for t in data.train)
    valid = tuple(t.to(device) for t in data.valid)
    config = SearchConfig(strategy=strategy_name, epochs=1, batch_size=setup["batch_size"])
    with tempfile.TemporaryDirectory(prefix="morphnas-bench-") as tmp, warnings.catch_warnings():
        # iDARTS's curvature check runs (and is timed) as in a search, but its verdict on γ is
        # about a search's quality, not this timing: the search command reports it.
        warnings.filterwarnings("ignore", message="iDARTS: ", category=RuntimeWarning)
        outcome = run_search(
            model,
            strategy,
            ForecastTask(train, valid, setup["batch_size"]),  # type: ignore[arg-type]
            config,
            seed=0,
            log=MetricsLog(Path(tmp) / "metrics.jsonl"),
            checkpoint_dir=Path(tmp) / "checkpoints",
        )
    batches = -(-len(data.train[0]) // setup["batch_size"])
    return outcome.seconds, batches


def bench_search(device: torch.device, repeats: int, quick: bool) -> dict[str, Any]:
    """Seconds per search epoch for every strategy and space, on synthetic data, with the
    thread count the project's own policy picks for this size."""
    setup = SEARCH_SETUP
    series = synthetic_series(n_steps=400 if quick else 2000, n_series=setup["n_series"], seed=0)
    data = make_windows(series, setup["window"], 1)
    apply_threads(choose_threads(setup["hidden"], setup["batch_size"], device=device))
    result: dict[str, Any] = {}
    runs_of = {name: (name, {}) for name in strategies.STRATEGIES} | SEARCH_VARIANTS
    for key, (strategy_name, options) in runs_of.items():
        result[key] = {}
        # The median of ``repeats`` for first-order DARTS, the reference; one epoch for the
        # others, so that the whole bench stays within minutes (an iDARTS epoch is ~20× DARTS').
        count = repeats if key == "darts" else 1
        for space_name in spaces.SPACES:
            runs = [
                _search_epoch_seconds(strategy_name, space_name, data, device, options)
                for _ in range(count)
            ]
            result[key][space_name] = {
                "seconds_per_epoch": statistics.median(seconds for seconds, _ in runs),
                "batches_per_epoch": runs[0][1],
                "threads": torch.get_num_threads(),
                "config": {**setup, "train_windows": len(data.train[0])},
            }
    return result


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
    x, target = _sequence(cfg, cfg.input_size, device)
    work = _sgd_workload(_supernet(cfg, device), x, target)
    for threads in candidates:
        apply_threads(threads)
        work.step()
    runs = {str(threads): (work, threads) for threads in candidates}
    seconds = _interleaved(runs, device, repeats)
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


# --------------------------------------------------------------------------- entry points


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def machine_info(device: torch.device, quick: bool) -> dict[str, Any]:
    """Where the figures come from; the load average says whether the CPU was shared."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": name,
        "cpu_name": _cpu_name(),
        "cpu_count": os.cpu_count() or 1,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "load_average_1min": load,
        "malloc": malloc_policy(),  # "keep": freed memory reused (runtime.keep_freed_memory)
        "native": native_kernels(device),
        "quick": quick,
    }


def native_kernels(device: torch.device) -> dict[str, float | None]:
    """Per native kernel, the seconds its library took to build (or load from the cache) in this
    run, or ``None`` where it does not run: off, not built here, or not on this device (CPU
    only). The kernels share one library, so those that run report the same seconds."""
    kernels = {
        "darts_supernet": native.darts_supernet,
        "darts_cell": native.darts_cell,
        "two_input_cell": native.two_input_cell,
        "two_input_supernet": native.two_input_supernet,
    }
    return {
        name: native.build_seconds if device.type == "cpu" and kernel() is not None else None
        for name, kernel in kernels.items()
    }


def _repeats(key: str, quick: bool, repeats: int | None) -> int:
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
    """Measure one part into ``result``: its entry, and ``supernet_two_input`` with ``supernet``."""
    device = ctx.device
    if part == "supernet":
        configs = QUICK_SUPERNET_CONFIGS if quick else SUPERNET_CONFIGS
        result["supernet"] = {
            name: bench_supernet_config(cfg, ctx, _repeats(f"supernet:{name}", quick, repeats))
            for name, cfg in configs.items()
        }
        two_input = QUICK_TWO_INPUT_CONFIGS if quick else TWO_INPUT_CONFIGS
        result["supernet_two_input"] = {
            name: bench_two_input_config(cfg, ctx, _repeats("supernet:small", quick, repeats))
            for name, cfg in two_input.items()
        }
    elif part == "cell":
        cell_configs = QUICK_CELL_CONFIGS if quick else CELL_CONFIGS
        result["cell"] = {
            name: bench_cell_config(cfg, ctx, _repeats("cell", quick, repeats))
            for name, cfg in cell_configs.items()
        }
    elif part == "search":
        result["search"] = bench_search(device, _repeats("search", quick, repeats), quick)
    else:
        configs = QUICK_THREADS_CONFIGS if quick else THREADS_CONFIGS
        result["threads"] = bench_threads(configs, ctx, _repeats("threads", quick, repeats))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _supernet_table(result: dict[str, Any]) -> Table:
    table = Table(title="Supernet training step: our kernel vs the DARTS reference loop")
    for column in ("config", "impl", "threads", "s/step", "GFLOP/s", "% matmul", "peak MB"):
        table.add_column(column, justify="left" if column in ("config", "impl") else "right")
    table.add_column("speedup", justify="right")
    for name, entry in result["supernet"].items():
        c = entry["config"]
        label = f"{name} B{c['batch']} H{c['hidden']} T{c['bptt']} N{c['nodes']}"
        impls = [i for i in ("ours", "ours_cuda_graph", "ours_python", "reference") if i in entry]
        speedups = {
            "ours": "speedup",
            "ours_cuda_graph": "speedup_cuda_graph",
            "ours_python": "speedup_python_kernel",
        }
        for impl in impls:
            e = entry[impl]
            table.add_row(
                label if impl == impls[0] else "",
                impl,
                str(e["threads"]),
                _fmt(e["seconds"]),
                _fmt(e["gflops"]),
                f"{100 * e['fraction_of_matmul']:.1f}",
                _fmt(e["peak_mb"], 4),
                f"{entry[speedups[impl]]:.2f}×" if impl in speedups else "",
            )
    return table


def _two_input_table(result: dict[str, Any]) -> Table:
    table = Table(title="Two-input supernet training step: sequence kernel vs eager loop")
    for column in ("config", "impl", "threads", "s/step", "peak MB", "speedup"):
        table.add_column(column, justify="left" if column in ("config", "impl") else "right")
    for name, entry in result["supernet_two_input"].items():
        c = entry["config"]
        label = f"{name} B{c['batch']} H{c['hidden']} T{c['bptt']} N{c['nodes']}"
        speedups = {"kernel": "speedup", "kernel_python": "speedup_python_kernel"}
        impls = [i for i in ("kernel", "kernel_python", "eager") if i in entry]
        for impl in impls:
            e = entry[impl]
            table.add_row(
                label if impl == "kernel" else "",
                impl,
                str(e["threads"]),
                _fmt(e["seconds"]),
                _fmt(e["peak_mb"], 4),
                f"{entry[speedups[impl]]:.2f}×" if impl in speedups else "",
            )
    return table


def _cell_table(result: dict[str, Any]) -> Table:
    """One row per model and config; the compile columns only when compiled cells were run."""
    table = Table(title="Discrete cells vs LSTM/GRU: forward + backward")
    columns = ["config", "model", "threads", "s/step", "GFLOP/s", "% matmul", "× LSTM GFLOP/s"]
    with_compile = any(
        model.endswith(COMPILED_SUFFIX)
        for entry in result["cell"].values()
        for model in entry["gflops_vs_lstm"]
    )
    if with_compile:
        columns += ["compile s", "max |Δ|"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("config", "model") else "right")
    for name, entry in result["cell"].items():
        c = entry["config"]
        for i, model in enumerate(entry["gflops_vs_lstm"]):  # CELL_MODELS, then compiled ones
            e = entry[model]
            compile_cells = []
            if with_compile:
                compiled = e.get("compiled")
                seconds = "eager fallback" if compiled is False else _fmt(e.get("compile_seconds"))
                compile_cells = [seconds, _fmt(e.get("max_abs_diff"), 2)]
            table.add_row(
                f"{name} B{c['batch']} H{c['hidden']} T{c['bptt']}" if i == 0 else "",
                model,
                str(e["threads"]),
                _fmt(e["seconds"]),
                _fmt(e["gflops"]),
                f"{100 * e['fraction_of_matmul']:.1f}",
                f"{entry['gflops_vs_lstm'][model]:.2f}",
                *compile_cells,
            )
    return table


def _search_table(result: dict[str, Any]) -> Table:
    table = Table(title="Search: seconds per epoch (real engine, synthetic data)")
    for column in ("strategy", "space", "threads", "batches", "s/epoch"):
        table.add_column(column, justify="left" if column in ("strategy", "space") else "right")
    for strategy_name, by_space in result["search"].items():
        for space_name, e in by_space.items():
            table.add_row(
                strategy_name,
                space_name,
                str(e["threads"]),
                str(e["batches_per_epoch"]),
                _fmt(e["seconds_per_epoch"]),
            )
    return table


def _threads_table(result: dict[str, Any]) -> Table:
    part = result["threads"]
    c = part["config"]
    caption = (
        f"crossover (all cores faster from this B×H up): {part['crossover_product'] or '–'}; "
        f"policy MULTITHREAD_FROM = {part['multithread_from']}, "
        f"{part['policy_mismatches']} point(s) where it picks the slower count"
    )
    table = Table(
        title=f"Threads: fused supernet training step (T{c['bptt']} N{c['nodes']})",
        caption=caption,
    )
    counts = [str(t) for t in part["candidates"]]
    columns = ["batch", "hidden", "B×H", *(f"s @{t}" for t in counts)]
    for column in (*columns, "faster", "all-core speedup", "policy", "agrees"):
        table.add_column(column, justify="right")
    for p in part["points"]:
        agrees = {True: "yes", False: "NO", None: "–"}[p["policy_agrees"]]
        table.add_row(
            str(p["batch"]),
            str(p["hidden"]),
            str(p["product"]),
            *(_fmt(p["seconds"][t]) for t in counts),
            str(p["faster_threads"]),
            f"{p['speedup_all_cores']:.2f}×",
            str(p["policy_threads"]),
            agrees,
        )
    return table


def bench_table(result: dict[str, Any]) -> list[Table]:
    """Human-readable tables of a ``run_bench`` result: machine, then one table per part."""
    m = result["machine"]
    machine = Table(title="Machine")
    columns = ("device", "cores", "torch", "load (1 min)", "matmul GFLOP/s", "before, after")
    for column in (*columns, "matmul threads"):
        machine.add_column(column)
    machine.add_row(
        f"{m['device']} ({m['device_name']})",
        str(m["cpu_count"]),
        m["torch"],
        _fmt(m["load_average_1min"], 2),
        _fmt(result["matmul_gflops"]),
        ", ".join(_fmt(gflops) for gflops in result["matmul"]["readings"]),
        str(result["matmul"]["threads"]),
    )
    tables = [machine]
    builders = {
        "supernet": _supernet_table,
        "supernet_two_input": _two_input_table,
        "cell": _cell_table,
        "search": _search_table,
        "threads": _threads_table,
    }
    tables += [build(result) for part, build in builders.items() if part in result]
    wall = Table(title="Wall seconds of this run")
    for column in result["wall_seconds"]:
        wall.add_column(column, justify="right")
    wall.add_row(*(f"{seconds:.1f}" for seconds in result["wall_seconds"].values()))
    return [*tables, wall]


__all__ = [
    "DARTS_V2",
    "PARTS",
    "TWO_INPUT_GATED",
    "ReferenceDartsCell",
    "bench_table",
    "cell_flops",
    "multithread_crossover",
    "run_bench",
    "supernet_flops",
    "thread_point",
]
