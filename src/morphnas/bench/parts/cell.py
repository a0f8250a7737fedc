"""The ``cell`` part: derived discrete cells against ``torch.nn.LSTM``/``GRU`` per FLOP, on their
kernels, their eager loops, their Python kernels and (opt-in) under ``torch.compile``."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from morphnas import cells, native
from morphnas.bench.reference import cell_flops
from morphnas.bench.timing import Context, measure_beside_ceiling, with_throughput
from morphnas.bench.workloads import CellConfig, Workload, sequence
from morphnas.bench.wrappers import PythonKernels
from morphnas.engine.compiled import compile_cell
from morphnas.engine.runtime import apply_threads, choose_threads
from morphnas.genotype import KNOWN, Genotype, Node

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

CELL_CONFIGS = {
    "small": CellConfig(batch=64, hidden=64, bptt=35),
    "large": CellConfig(batch=64, hidden=300, bptt=35),
}
QUICK_CELL_CONFIGS = {
    "small": CellConfig(batch=8, hidden=16, bptt=6),
    "large": CellConfig(batch=8, hidden=48, bptt=6),
}

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
    """The model ``name`` of ``CELL_MODELS`` at ``size`` (input = hidden): a derived cell, on its
    eager loop for ``<model>_eager``, or a ``torch.nn`` baseline."""
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
    x, target = sequence(cfg, cfg.hidden, ctx.device)
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
        result[name] = with_throughput(measured[name], flops, ceiling)
        result[name]["gflop"] = flops / 1e9
        result[name].update(compiled.get(name, {}))
    lstm = result["lstm"]["gflops"]
    result["gflops_vs_lstm"] = {name: result[name]["gflops"] / lstm for name in models}
    return result
