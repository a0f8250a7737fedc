"""The ``supernet`` part: our fused DARTS supernet against the reference loop, the two-input
supernet's sequence kernel against its own eager loop (``supernet_two_input``), and the DARTS CNN
supernet against its per-edge loop (``supernet_cnn``)."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from morphnas import native, spaces
from morphnas.bench.reference import ReferenceDartsCell, supernet_flops
from morphnas.bench.timing import Context, measure, measure_beside_ceiling, with_throughput
from morphnas.bench.workloads import CnnConfig, SupernetConfig, sequence, sgd_workload
from morphnas.bench.wrappers import CudaGraphed, PythonKernels
from morphnas.engine.runtime import apply_threads
from morphnas.spaces import DartsCNNSearchNetwork, DartsRNNSearchCell

AGREEMENT_TOL = 1e-4  # float32, outputs of ours vs the reference before any timing ...
AGREEMENT_STEPS = 10  # ... on the first steps: later, the recurrence amplifies float32 rounding
# A supernet configuration of more FLOPs a step than this is thread-probed; one of fewer (``small``:
# 4.2 GFLOP, the reference's step under half a second) is timed in full at every count, because
# the probe's pick moved the ratio there: the reference on one thread (441, 487 ms) or two (386 ms).
PROBE_ABOVE_GFLOP = 50.0
DARTS_DROPOUT_X, DARTS_DROPOUT_H = 0.75, 0.25  # DARTS search defaults (rnn/train_search.py)

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
# The CNN supernet at the image task's two budgets (docs/images.md): digits (5 cells, 8×8) and
# fashion-mnist (3 cells, 28×28), C = 8, batch 64.
CNN_CONFIGS = {
    "digits": CnnConfig(batch=64, channels=1, image=8, cells=5, hidden=8),
    "fashion": CnnConfig(batch=64, channels=1, image=28, cells=3, hidden=8),
}
QUICK_CNN_CONFIGS = {"digits": CnnConfig(batch=16, channels=1, image=8, cells=2, hidden=4)}


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


def darts_supernet(cfg: SupernetConfig, device: torch.device) -> DartsRNNSearchCell:
    """Our search cell at ``cfg`` with the DARTS search dropouts, on its default fused path."""
    return DartsRNNSearchCell(
        cfg.input_size,
        cfg.hidden,
        nodes=cfg.nodes,
        dropout_x=DARTS_DROPOUT_X,
        dropout_h=DARTS_DROPOUT_H,
    ).to(device)


def bench_supernet_config(cfg: SupernetConfig, ctx: Context, repeats: int) -> dict[str, Any]:
    """Ours vs the reference on one configuration, after checking they compute the same thing."""
    torch.manual_seed(0)
    ours = darts_supernet(cfg, ctx.device)
    reference = ReferenceDartsCell.copy_of(ours)
    x, target = sequence(cfg, cfg.input_size, ctx.device)
    apply_threads(ctx.threads[0])
    diff = check_agreement(ours, reference, x)
    if not diff <= AGREEMENT_TOL:
        raise RuntimeError(f"reference and fused supernet disagree by {diff:.2e} ({cfg})")
    modules = {"ours": ours, "reference": reference}
    if ctx.device.type == "cuda":
        modules["ours_cuda_graph"] = CudaGraphed(copy.deepcopy(ours), x)
    elif native.darts_supernet() is not None:
        modules["ours_python"] = PythonKernels(copy.deepcopy(ours))
    workloads = {name: sgd_workload(module, x, target) for name, module in modules.items()}
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
        result[name] = with_throughput(entry, flops, ceiling)
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
    x, target = sequence(cfg, cfg.input_size, ctx.device)
    apply_threads(ctx.threads[0])
    with torch.no_grad():
        diff = float((kernel(x)[0] - eager(x)[0]).abs().max())
    if not diff <= AGREEMENT_TOL:
        raise RuntimeError(f"two-input kernel and eager loop disagree by {diff:.2e} ({cfg})")
    workloads = {
        "kernel": sgd_workload(kernel, x, target),
        "eager": sgd_workload(eager, x, target),
    }
    if ctx.device.type == "cpu" and native.two_input_supernet() is not None:
        python = PythonKernels(copy.deepcopy(kernel))
        workloads["kernel_python"] = sgd_workload(python, x, target)
    measured = measure(workloads, ctx.device, repeats, ctx.threads, probe=False)  # cheap steps
    eager_seconds = measured["eager"]["seconds"]
    result = {"config": asdict(cfg), "max_abs_diff": diff, **measured}
    result["speedup"] = eager_seconds / measured["kernel"]["seconds"]
    if "kernel_python" in measured:
        result["speedup_python_kernel"] = eager_seconds / measured["kernel_python"]["seconds"]
    return result


class PerEdgeLoop(nn.Module):
    """A CNN supernet run through ``reference_forward`` (every edge computes every op, the DARTS
    code's ``MixedOp`` loop), with the ``(outputs, _)`` of the timed modules."""

    def __init__(self, net: DartsCNNSearchNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.net.reference_forward(x), None


def bench_cnn_config(cfg: CnnConfig, ctx: Context, repeats: int) -> dict[str, Any]:
    """The darts_cnn supernet (parameter-free ops shared per state, one ReLU per state, no
    ``none``) against the same weights through its per-edge loop; checked to agree first."""
    torch.manual_seed(0)
    ours = spaces.build("darts_cnn", cfg.channels, cfg.hidden, cfg.cells).to(ctx.device)
    loop = PerEdgeLoop(copy.deepcopy(ours))
    x = torch.randn(cfg.batch, cfg.channels, cfg.image, cfg.image, device=ctx.device)
    target = torch.randn(cfg.batch, ours.features, device=ctx.device)
    apply_threads(ctx.threads[0])
    with torch.no_grad():
        diff = float((ours(x)[0] - loop(x)[0]).abs().max())
    if not diff <= AGREEMENT_TOL:
        raise RuntimeError(f"CNN supernet and its per-edge loop disagree by {diff:.2e} ({cfg})")
    workloads = {"ours": sgd_workload(ours, x, target), "per_edge": sgd_workload(loop, x, target)}
    measured = measure(workloads, ctx.device, repeats, ctx.threads, probe=False)
    result = {"config": asdict(cfg), "max_abs_diff": diff, **measured}
    result["speedup"] = measured["per_edge"]["seconds"] / measured["ours"]["seconds"]
    return result
