"""The hand-written two-input sequence kernel (``spaces.fused_two_input``) against the eager loop.

Its values and gradients against slow per-op references are in tests/test_spaces.py
(``test_two_input_matches_slow``, both paths) and tests/test_growth_morphism.py (residual and
fixed nodes). Here: the kernel against the eager path of the same module on what those grids do
not cross (grown, pruned and widened cells with dropout and BatchNorm, the mixing weights'
gradient, BN running statistics), finite differences, and which path runs when. Every test runs
on both kernels: the C++ loops (``morphnas.native``, which must build here) and the Python ones.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from morphnas import native
from morphnas.genotype import TWO_INPUT_OPS, Node
from morphnas.spaces import TwoInputSearchCell, build
from morphnas.spaces.base import SampledMixing, Widening
from morphnas.spaces.two_input import input_pairs

T, B, N_IN, D = 5, 4, 3, 5
TOL = dict(rtol=1e-7, atol=1e-9)


@pytest.fixture(autouse=True, params=["native", "python"])
def kernel(request):
    if request.param == "native":
        assert native.two_input_supernet() is not None, "the native kernels did not build"
        yield request.param
    else:
        with native.python_kernels():
            yield request.param


def make_cell(
    nodes: int = 3,
    ops=TWO_INPUT_OPS,
    grow: int = 0,
    prune: bool = False,
    widen: int = 0,
    training: bool = True,
    **options,
) -> TwoInputSearchCell:
    """A float64 cell with random α, grown nodes with non-zero γ, maybe pruned and widened."""
    torch.manual_seed(5)
    options = {"dropout_x": 0.3, "dropout_h": 0.2, **options}
    cell = TwoInputSearchCell(N_IN, D, nodes=nodes, ops=ops, **options).double()
    if prune:
        cell.prune()
    for _ in range(grow):
        cell.grow()
    if widen:
        cell.widen(Widening.random(D, widen, noise=0.1, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        for alpha in cell.arch:
            alpha.normal_()
        for gamma in cell.gammas.values():
            gamma.normal_()
        if cell.bn is not None:
            cell.bn.running_mean.normal_()
            cell.bn.running_var.uniform_(0.5, 2.0)
    return cell.train(training)


def run(
    cell: TwoInputSearchCell, x: Tensor, h0: Tensor, weights: list[Tensor] | None, probe: Tensor
):
    """Outputs, last state, the gradients of (trainable parameters, x, h0, weights), RNG state;
    without ``weights``, the cell's own mixing weights, whose gradients reach ``α``."""
    torch.manual_seed(9)  # the same dropout masks on both paths
    out, h = cell(x, h0, weights=weights)
    rng = torch.get_rng_state()  # what the forward drew: the same masks in the same order
    loss = (out * probe).sum() + (h * probe[-1]).sum()
    wrt = [*(p for p in cell.parameters() if p.requires_grad), x, h0, *(weights or [])]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads, strict=True)]
    return out, h, grads, rng


def kernel_vs_eager(
    cell: TwoInputSearchCell,
    seed: int = 3,
    choices: list[int | None] | None = None,
    tol: dict | None = None,
    through_alpha: bool = False,
) -> dict[str, Tensor]:
    """Same values, gradients (weights, x, h0, mixing weights) and BN statistics on both paths;
    with ``choices``, for a sample (``SampledMixing``) of those choices. Its weights keep their
    softmax values rather than GDAS's one-hot ones, so that the unsampled ops' sum, a constant
    added to the chosen op's output, is not 0 in value either. ``through_alpha``: the cell's
    own mixing weights, the gradients to ``α`` compared instead. Returns the kernel's
    gradients by name."""
    tol = TOL if tol is None else tol
    assert cell.fused
    eager = copy.deepcopy(cell)
    eager.fused = False
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, N_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, cell.hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(T, B, cell.hidden_size, generator=gen, dtype=torch.float64)
    mixing = [w.detach() for w in cell.mixing_weights()]

    def leaves() -> list[Tensor] | None:
        if through_alpha:
            return None
        copies = [w.clone().requires_grad_() for w in mixing]
        return copies if choices is None else SampledMixing(copies, choices)

    out, h, grads, rng = run(cell, x, h0, leaves(), probe)
    ref_out, ref_h, ref_grads, ref_rng = run(eager, x, h0, leaves(), probe)
    assert type(out.grad_fn).__name__ == "FusedTwoInputSequenceBackward"
    assert (out.grad_fn.native is not None) == (native.two_input_supernet() is not None)
    assert type(ref_out.grad_fn).__name__ != "FusedTwoInputSequenceBackward"
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(h, ref_h, **tol)
    names = [n for n, p in cell.named_parameters() if p.requires_grad] + ["x", "h0"]
    names += [] if through_alpha else [f"weights[{i}]" for i in range(len(mixing))]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **tol, msg=lambda m, n=name: f"{n}: {m}")
    if cell.bn is not None:
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(cell.bn, buffer), getattr(eager.bn, buffer))
    assert torch.equal(rng, ref_rng)
    return dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bn", [True, False], ids=["bn", "nobn"])
@pytest.mark.parametrize("output", ["last", "mean"])
@pytest.mark.parametrize("wiring", ["chain", "input"])
def test_kernel_matches_eager_on_grown_cells(wiring, output, bn, training):
    """Two residual nodes with non-zero γ on three searched ones, dropout on both inputs."""
    kernel_vs_eager(
        make_cell(grow=2, wiring=wiring, output=output, batchnorm=bn, training=training)
    )


@pytest.mark.parametrize("sharing", ["per_op", "per_node"])
@pytest.mark.parametrize("output", ["last", "mean"])
def test_kernel_matches_eager_on_pruned_then_grown_cells(output, sharing):
    """Fixed nodes (one op, its own weight slice) under searched residual ones."""
    cell = make_cell(prune=True, grow=2, output=output, weight_sharing=sharing, batchnorm=True)
    assert len(cell.fixed) == 3 and len(cell.mixed_nodes) == 2
    kernel_vs_eager(cell)


@pytest.mark.parametrize("op", ["add_tanh", "add_relu", "add_identity", "highway", "hadamard"])
def test_kernel_matches_eager_on_each_fixed_op(op):
    cell = make_cell(nodes=2, grow=1, output="mean")
    cell.fix(1, cell._choose(1, cell.mixing_weights()[0]).__class__(op, (0, -1)))
    kernel_vs_eager(cell)


def test_kernel_matches_eager_after_widening():
    """A widened cell (Net2WiderNet copies, unequal shares) under both sharing modes."""
    for sharing in ("per_op", "per_node"):
        kernel_vs_eager(make_cell(grow=1, widen=3, weight_sharing=sharing, batchnorm=True))


@pytest.mark.parametrize(
    "ops", [("add_relu", "add_identity"), ("hadamard", "add"), ("none", "highway")], ids=str
)
def test_kernel_matches_eager_on_op_subsets(ops):
    """Per-node sharing with two add ops writing one block; no weights at all; highway alone."""
    kernel_vs_eager(make_cell(ops=ops, weight_sharing="per_node", grow=1))


def test_kernel_passes_gradcheck():
    """Finite differences through the whole kernel, every differentiable input at once."""
    cell = make_cell(nodes=2, grow=1, batchnorm=True, wiring="chain", output="mean")
    x = torch.randn(2, 2, N_IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    weights = [w.detach().requires_grad_() for w in cell.mixing_weights()]
    names = [name for name, _ in cell.named_parameters()]

    def fn(x, h0, *tensors):
        params = dict(zip(names, tensors[: len(names)], strict=True))
        torch.manual_seed(0)  # the same dropout masks at every evaluation
        mixing = list(tensors[len(names) :])
        return torch.func.functional_call(cell, params, (x, h0), {"weights": mixing})[0]

    cell.bn.eval()  # running statistics would move between finite-difference evaluations
    leaves = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    out = fn(x, h0, *leaves, *weights)
    assert type(out.grad_fn).__name__ == "FusedTwoInputSequenceBackward"
    assert torch.autograd.gradcheck(fn, (x, h0, *leaves, *weights), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("first", range(len(TWO_INPUT_OPS)), ids=TWO_INPUT_OPS)
@pytest.mark.parametrize(
    ("sharing", "bn"), [("per_op", False), ("per_node", False), ("per_op", True)]
)
def test_kernel_matches_eager_on_a_sample(first, sharing, bn):
    """A sample (GDAS's ``SampledMixing``): each sampled node as its op and the constant term
    ``ONE`` (weighted by the unsampled ops' sum) against the eager loop's ``_sampled``, the ops
    rotated so that every op is sampled at every node in turn; a grown residual node, dropout.
    Without BatchNorm, which takes the constant's gradient away, the unsampled ops' gradients
    are not 0."""
    cell = make_cell(grow=1, batchnorm=bn, weight_sharing=sharing)
    ops = cell.op_names
    choices = [
        None if i in cell.fixed else ops.index(TWO_INPUT_OPS[(first + i) % len(TWO_INPUT_OPS)])
        for i in range(1, cell.nodes + 1)
    ]
    kernel_vs_eager(cell, choices=choices)


def test_eager_is_selectable_and_sampled_mixing_runs_on_the_kernel():
    cell = make_cell()
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    assert type(cell(x)[0].grad_fn).__name__ == "FusedTwoInputSequenceBackward"
    sample = SampledMixing([torch.eye(len(cell.op_names))[1].double()] * 3, [1, 1, 1])
    assert type(cell(x, weights=sample)[0].grad_fn).__name__ == "FusedTwoInputSequenceBackward"
    cell.fused = False
    assert type(cell(x)[0].grad_fn).__name__ != "FusedTwoInputSequenceBackward"
    assert build("two_input", 2, 4, 2, fused=False).fused is False
    assert build("two_input", 2, 4, 2).fused is True


def test_no_grad_forward_matches():
    cell = make_cell(grow=1, batchnorm=True)
    eager = copy.deepcopy(cell)
    eager.fused = False
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)
        a = cell(x)[0]
        torch.manual_seed(1)
        b = eager(x)[0]
    torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(cell.bn.running_mean, eager.bn.running_mean)


def test_torch_func_transforms_fall_back_to_eager():
    """Second-order methods (hypergrad) differentiate through torch.func: same gradient."""
    cell = make_cell(dropout_x=0.0, dropout_h=0.0, grow=1)
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    params = {k: v.detach() for k, v in cell.named_parameters()}

    def loss(p):
        return torch.func.functional_call(cell, p, (x,))[0].pow(2).sum()

    by_func = torch.func.grad(loss)(params)
    by_autograd = torch.autograd.grad(cell(x)[0].pow(2).sum(), list(cell.parameters()))
    for (name, _), g in zip(cell.named_parameters(), by_autograd, strict=True):
        torch.testing.assert_close(by_func[name], g, **TOL)


@pytest.mark.parametrize("wiring", ["chain", "search"])
def test_float32_kernel_matches_eager(wiring):
    """The dtype searches run in: agreement at float32 rounding over a short sequence, fixed
    wiring and input choice alike."""
    cell = make_cell(grow=1, wiring=wiring).float()
    eager = copy.deepcopy(cell)
    eager.fused = False
    x = torch.randn(T, B, N_IN)
    torch.manual_seed(2)
    a = cell(x)[0]
    torch.manual_seed(2)
    b = eager(x)[0]
    assert type(a.grad_fn).__name__ == "FusedTwoInputSequenceBackward"
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# Input choice (``wiring: search``): each mixed node reads its slots' mixtures of the states
# -1 … i-1; sampled and fixed nodes read one pair, ``u`` in either slot.


def nonzero(grads: dict[str, Tensor], prefix: str) -> None:
    """Every gradient whose name starts with ``prefix`` is there and not all zero."""
    named = [name for name in grads if name.startswith(prefix)]
    assert named, prefix
    for name in named:
        assert grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("output", ["last", "mean"])
@pytest.mark.parametrize("sharing", ["per_op", "per_node"])
@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_input_choice_kernel_matches_eager(nodes, sharing, output):
    """Mixed nodes reading their slots' mixtures, a grown residual node (γ ≠ 0) on top, dropout
    on both inputs: values and every gradient, to the mixing weights (hence the slot weights)
    and, through the cell's own read-out, to ``α``."""
    cell = make_cell(nodes=nodes, grow=1, wiring="search", output=output, weight_sharing=sharing)
    grads = kernel_vs_eager(cell)
    nonzero(grads, "weights[")
    nonzero(kernel_vs_eager(cell, through_alpha=True), "arch.")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_choice_kernel_matches_eager_with_batchnorm(training):
    kernel_vs_eager(make_cell(grow=1, wiring="search", batchnorm=True, training=training))


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "nobn"])
def test_input_choice_kernel_matches_eager_with_fixed_nodes(bn):
    """Fixed nodes among mixed ones: ``u`` read as ``a`` (by an ``add_*`` op), as ``b`` (by
    highway, whose ``u`` product is hoisted), a pair of nodes; then the whole cell pruned by
    ``node_options`` and grown again."""
    cell = make_cell(nodes=4, grow=1, wiring="search", output="mean", batchnorm=bn)
    cell.fix(1, Node("add_tanh", (-1, 0)))
    cell.fix(2, Node("highway", (1, -1)))
    cell.fix(4, Node("hadamard", (3, 2)))
    assert cell.mixed_nodes == [3, 5]
    kernel_vs_eager(cell)
    pruned = make_cell(nodes=3, wiring="search", prune=True, grow=2, batchnorm=bn)
    assert len(pruned.fixed) == 3 and pruned.mixed_nodes == [4, 5]
    kernel_vs_eager(pruned)


@pytest.mark.parametrize("first", range(len(TWO_INPUT_OPS)), ids=TWO_INPUT_OPS)
@pytest.mark.parametrize("sharing", ["per_op", "per_node"])
def test_input_choice_kernel_matches_eager_on_a_sample(first, sharing):
    """A sample under input choice: each sampled node its op and its pair (``u`` first or
    second in turn), the ops and pairs rotated; the grown node is left mixed (reading its
    slots' mixtures) in every other case, and a pruned node reads its own pair."""
    cell = make_cell(nodes=3, grow=1, wiring="search", weight_sharing=sharing)
    cell.fix(2, Node("add_relu", (-1, 1)))
    ops = cell.op_names
    choices: list[int | None] = []
    for i in range(1, cell.nodes + 1):
        if i in cell.fixed or (i == cell.nodes and first % 2):
            choices.append(None)
            continue
        row = (first + i) % len(input_pairs(i))
        k = ops.index(TWO_INPUT_OPS[(first + i) % len(TWO_INPUT_OPS)])
        choices.append(row * len(ops) + k)
    kernel_vs_eager(cell, choices=choices)


def test_input_choice_kernel_passes_gradcheck():
    """Finite differences through the kernel under input choice, the mixing weights (from which
    the slot weights come) among the inputs: scaled to a mass of 1.25, off the kink that
    ``input_marginals``' division by a mass over one has at a softmax's mass of exactly 1."""
    cell = make_cell(nodes=2, grow=1, batchnorm=True, wiring="search", output="mean")
    x = torch.randn(2, 2, N_IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    weights = [(1.25 * w).detach().requires_grad_() for w in cell.mixing_weights()]
    names = [name for name, _ in cell.named_parameters()]

    def fn(x, h0, *tensors):
        params = dict(zip(names, tensors[: len(names)], strict=True))
        torch.manual_seed(0)
        mixing = list(tensors[len(names) :])
        return torch.func.functional_call(cell, params, (x, h0), {"weights": mixing})[0]

    cell.bn.eval()
    leaves = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    out = fn(x, h0, *leaves, *weights)
    assert type(out.grad_fn).__name__ == "FusedTwoInputSequenceBackward"
    assert torch.autograd.gradcheck(fn, (x, h0, *leaves, *weights), eps=1e-6, atol=1e-5)
