"""The derived cells' sequence kernels (``cells.fused_darts_cell``, ``cells.fused_two_input_cell``)
against their eager loops.

Both paths against the slow references written from the formulas are in tests/test_cells.py
(``test_darts_cell_matches_slow``, ``test_two_input_cell_matches_slow``, ``fused`` both ways);
the refused double backward is in tests/test_fused.py. Here: each kernel against its eager loop
on what those references do not cover (grown residual nodes, every output rule and squash,
shared parents in every arrangement, every op reading ``u``, ``h`` and nodes), finite
differences, the DARTS kernel's weight layout, and which path runs when. Each derived cell has
two kernels, the C++ one (``morphnas.native``, which must build here) and the Python one it falls
back to; each test runs on both.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import Tensor, nn

from morphnas import cells, native
from morphnas.bench import TWO_INPUT_GATED
from morphnas.cells.fused_darts_cell import CellPlan, group_weight
from morphnas.config import resolve
from morphnas.genotype import KNOWN, Genotype, Node

T, B, N_IN, D = 5, 3, 4, 6
TOL = dict(rtol=1e-9, atol=1e-10)
KERNEL = {
    "darts_rnn": "FusedDartsCellSequenceBackward",
    "two_input": "FusedTwoInputCellSequenceBackward",
}

GENOTYPES = {
    "darts_v2": KNOWN["darts_v2"],
    "darts_chain_last_tanh": Genotype(
        "darts_rnn",
        (Node("tanh", (0,)), Node("relu", (1,)), Node("identity", (2,))),
        output="last",
        output_activation="tanh",
    ),
    "darts_one_parent": Genotype(  # every node reads the init state: one matmul for all of them
        "darts_rnn",
        (Node("sigmoid", (0,)), Node("relu", (0,)), Node("sigmoid", (0,)), Node("tanh", (0,))),
        output="mean",
    ),
    "darts_grown_mean": Genotype(
        "darts_rnn",
        (
            Node("relu", (0,)),
            Node("tanh", (1,)),
            Node("identity", (1,), residual=True),
            Node("sigmoid", (3,), residual=True),
        ),
        output="mean",
        output_activation="tanh",
    ),
    "darts_grown_last": Genotype(
        "darts_rnn",
        (Node("tanh", (0,)), Node("relu", (0,), residual=True), Node("tanh", (2,), residual=True)),
        output="last",
        output_activation="identity",
    ),
    "darts_dead_last": Genotype(  # nothing reads nodes 2 (a residual one) and 3: dead
        "darts_rnn",
        (
            Node("tanh", (0,)),
            Node("relu", (1,), residual=True),
            Node("identity", (0,)),
            Node("sigmoid", (1,)),
        ),
        output="last",
        output_activation="identity",
    ),
    "two_input_gated": TWO_INPUT_GATED,  # LSTM-like
    "two_input_every_input": Genotype(  # u on both sides, u as a highway's gate input, a node twice
        "two_input",
        (
            Node("add_relu", (-1, -1)),
            Node("highway", (1, -1)),
            Node("add_identity", (2, 0)),
            Node("add", (3, 1)),
            Node("hadamard", (4, 4)),
            Node("highway", (0, 5)),
        ),
        output="mean",
        output_activation="tanh",
    ),
    "two_input_grown_mean": Genotype(
        "two_input",
        (
            Node("add_tanh", (0, -1)),
            Node("add_sigmoid", (1, 0)),
            Node("highway", (2, 1), residual=True),
            Node("add", (3, -1), residual=True),
        ),
        output="mean",
        output_activation="identity",
    ),
    "two_input_grown_last": Genotype(
        "two_input",
        (
            Node("hadamard", (0, -1)),
            Node("add_relu", (1, 0), residual=True),
            Node("add_sigmoid", (2, -1), residual=True),
        ),
        output="last",
        output_activation="tanh",
    ),
    "two_input_dead_last": Genotype(  # nothing reads node 2: dead
        "two_input",
        (
            Node("add_tanh", (0, -1)),
            Node("add_sigmoid", (0, -1)),
            Node("highway", (1, 0)),
        ),
        output="last",
        output_activation="tanh",
    ),
}
SPACES = ["darts_rnn", "two_input"]
GROWN = {"darts_rnn": "darts_grown_mean", "two_input": "two_input_grown_mean"}


KERNELS = ("native", "python")


def cases(names: list[str]) -> list[tuple[str, str]]:
    """``(genotype or space, kernel)`` pairs."""
    return [(name, kernel) for name in names for kernel in KERNELS]


@contextlib.contextmanager
def on(kernel: str):
    """Inside, the derived cells run on ``kernel``."""
    if kernel == "native":
        assert native.darts_cell() is not None, "the native kernels did not build"
        yield
    else:
        with native.python_kernels():
            yield


def assert_ran(out: Tensor, cell: nn.Module, kernel: str) -> None:
    """``out`` came from ``cell``'s sequence kernel, the native one exactly when asked."""
    assert type(out.grad_fn).__name__ == kernel_of(cell)
    assert (getattr(out.grad_fn, "native", None) is not None) == (kernel == "native")


def make_cell(genotype: Genotype, dropout: float = 0.3) -> nn.Module:
    """A float64 cell with non-zero γ (so residual branches carry value and gradient); DARTS
    weights large enough for its gates to matter."""
    torch.manual_seed(3)
    extra = {"init_range": 0.5} if genotype.space == "darts_rnn" else {}
    cell = cells.build(genotype, N_IN, D, dropout_x=dropout, dropout_h=dropout, **extra)
    cell = cell.double()
    with torch.no_grad():
        for gamma in cell.gammas.values():
            gamma.normal_()
    return cell


def kernel_of(cell: nn.Module) -> str:
    return KERNEL[cell.genotype.space]


def run(
    cell: nn.Module, x: Tensor, h0: Tensor | None
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """Outputs, last state, and the gradients of (parameters, x, h0) of a random projection
    (``None`` for a parameter the output does not depend on: a dead node's)."""
    torch.manual_seed(9)  # the same dropout masks on both paths
    out, h = cell(x, h0)
    gen = torch.Generator().manual_seed(4)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum() + h.sum()
    wrt = [*cell.parameters(), x] + ([] if h0 is None else [h0])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return out, h, list(grads)


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zero_h0"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize(("name", "kernel"), cases(list(GENOTYPES)))
def test_kernel_matches_eager_loop(name, kernel, dropout, training, with_h0):
    cell = make_cell(GENOTYPES[name], dropout).train(training)
    eager = copy.deepcopy(cell)
    eager.fused = False
    x = torch.randn(T, B, N_IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True) if with_h0 else None
    with on(kernel):
        out, h, grads = run(cell, x, h0)
    assert_ran(out, cell, kernel)
    ref_out, ref_h, ref_grads = run(eager, x, h0)
    assert type(ref_out.grad_fn).__name__ != kernel_of(cell)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(h, ref_h, **TOL)
    names = [n for n, _ in cell.named_parameters()] + ["x", "h0"][: 1 + with_h0]
    for label, a, b in zip(names, grads, ref_grads, strict=True):
        assert (a is None) == (b is None), f"grad {label}: kernel {a}, eager {b}"
        if a is not None:
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, label=label: f"grad {label}: {m}")


DEAD = {
    "darts_dead_last": (
        (True, False, False, True),
        {"node_weights.1", "node_weights.2", "gammas.2"},
    ),
    "two_input_dead_last": ((True, False, True), {"node_weights.1"}),
}


@pytest.mark.parametrize(("name", "kernel"), cases(list(DEAD)))
def test_dead_nodes_are_skipped_and_get_no_gradient(name, kernel):
    """A node the output does not depend on is not computed by the kernel, and its weights
    (and γ) get no gradient, ``None``, as on the eager loop; so weight decay leaves them alone."""
    live, dead = DEAD[name]
    cell = make_cell(GENOTYPES[name], dropout=0.0)
    assert cell._plan.live == live
    with on(kernel):
        out = cell(torch.randn(T, B, N_IN, dtype=torch.float64))[0]
    assert_ran(out, cell, kernel)
    out.sum().backward()
    assert {n for n, p in cell.named_parameters() if p.grad is None} == dead


@pytest.mark.parametrize(("space", "kernel"), cases(SPACES))
def test_kernel_passes_gradcheck(space, kernel):
    """Finite differences through the whole kernel: every parameter, x and h0 at once."""
    cell = make_cell(GENOTYPES[GROWN[space]], dropout=0.3)
    x = torch.randn(3, 2, N_IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in cell.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in cell.parameters()]

    def fn(x, h0, *tensors):
        torch.manual_seed(0)  # the same dropout masks at every evaluation
        params = dict(zip(names, tensors, strict=True))
        return torch.func.functional_call(cell, params, (x, h0))[0]

    with on(kernel):
        assert_ran(fn(x, h0, *leaves), cell, kernel)
        assert torch.autograd.gradcheck(fn, (x, h0, *leaves), eps=1e-6, atol=1e-5)


def test_children_of_one_state_share_a_block_ordered_by_activation():
    """DARTS_V2: eight nodes, five parent states, so five matmuls a step; the children of a
    state are ordered sigmoid, tanh, relu, identity so that the gates' ``sigmoid_`` also covers
    the sigmoid and tanh values, and each other activation is one op over adjacent columns."""
    plan = CellPlan.of(KNOWN["darts_v2"])
    # (relu, relu, identity) under state 1, (sigmoid, relu) under state 5
    assert plan.groups == ((0, (0,)), (1, (1, 2, 3)), (2, (4,)), (3, (6,)), (5, (5, 7)))
    shuffled = CellPlan.of(GENOTYPES["darts_one_parent"])
    assert shuffled.groups == ((0, (0, 2, 3, 1)),)  # sigmoid, sigmoid, tanh, relu
    weights = [torch.randn(D, 2 * D) for _ in range(3)]
    block = group_weight(weights, ["sigmoid", "tanh", "relu"], D)
    x = torch.randn(B, D)
    z = x @ block
    for r, (w, scale) in enumerate(zip(weights, (1, 2, 1), strict=True)):  # [c | g] = x W_r
        c, g = (x @ w).chunk(2, dim=-1)
        torch.testing.assert_close(z[:, r * D : (r + 1) * D], c)
        torch.testing.assert_close(z[:, (3 + r) * D : (4 + r) * D], scale * g)  # tanh: 2g


@pytest.mark.parametrize("space", SPACES)
def test_eager_is_selectable_and_torch_func_falls_back(space):
    cell = make_cell(GENOTYPES[GROWN[space]], dropout=0.0)
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    params = {k: v.detach() for k, v in cell.named_parameters()}

    def loss(p):
        return torch.func.functional_call(cell, p, (x,))[0].pow(2).sum()

    by_func = torch.func.grad(loss)(params)  # under a transform: the eager loop
    by_kernel = torch.autograd.grad(cell(x)[0].pow(2).sum(), list(cell.parameters()))
    for (name, _), g in zip(cell.named_parameters(), by_kernel, strict=True):
        torch.testing.assert_close(by_func[name], g, **TOL)
    cell.fused = False
    assert type(cell(x)[0].grad_fn).__name__ != kernel_of(cell)


@pytest.mark.parametrize(("space", "kernel"), cases(SPACES))
def test_a_second_backward_gives_the_same_gradient(space, kernel):
    """A second backward (``retain_graph=True``, as Jacobians and ``gradcheck`` do) gives the
    same gradient: the DARTS Python kernel's first backward turns the forward's values into its
    factors in place, and the second must reuse them, not redo it."""
    cell = make_cell(GENOTYPES[GROWN[space]])
    x = torch.randn(T, B, N_IN, dtype=torch.float64, requires_grad=True)
    with on(kernel):
        out = cell(x)[0]
    assert_ran(out, cell, kernel)
    first = torch.autograd.grad(out.sum(), [x, *cell.parameters()], retain_graph=True)
    second = torch.autograd.grad(out.sum(), [x, *cell.parameters()])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("space", "kernel"), cases(SPACES))
def test_no_grad_and_float32_match_the_eager_loop(space, kernel):
    cell = make_cell(GENOTYPES[GROWN[space]]).float()
    eager = copy.deepcopy(cell)
    eager.fused = False
    x = torch.randn(T, B, N_IN)
    with torch.no_grad(), on(kernel):
        torch.manual_seed(1)
        a = cell(x)[0]
        torch.manual_seed(1)
        b = eager(x)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_space_option_fused_reaches_the_discrete_cells():
    """``space.options.fused: false`` keeps retraining on the eager loop too."""
    config = resolve(overrides={"space": {"options": {"fused": False, "dropout_h": 0.2}}})
    assert cells.options_for(KNOWN["darts_v2"], config) == {"fused": False, "dropout_h": 0.2}


def test_a_node_weight_changed_before_the_backward_is_refused():
    """The two-input kernel reads its node weights again in the backward: changing one in place
    in between (an optimizer step too early) must fail as autograd fails eagerly."""
    cell = make_cell(GENOTYPES["two_input_gated"])
    loss = cell(torch.randn(T, B, N_IN, dtype=torch.float64))[0].sum()
    with torch.no_grad():
        cell.node_weights[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
