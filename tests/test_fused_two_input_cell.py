"""The derived two-input cell's sequence kernel (``cells.fused_two_input_cell``) against its
eager loop.

Both paths against the slow reference written from the formulas are in tests/test_cells.py
(``test_two_input_cell_matches_slow``, ``fused`` both ways); the refused double backward is in
tests/test_fused.py. Here: the kernel against the eager loop on what that reference does not
cover (every op reading ``u``, ``h`` and nodes, grown residual nodes, both output rules),
finite differences, and which path runs when.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from morphnas.cells import TwoInputCell
from morphnas.genotype import Genotype, Node

T, B, N_IN, D = 5, 3, 4, 6
TOL = dict(rtol=1e-9, atol=1e-10)
KERNEL = "FusedTwoInputCellSequenceBackward"

GENOTYPES = {
    "gated": Genotype(  # the bench's TWO_INPUT_GATED: LSTM-like
        "two_input",
        (
            Node("add_sigmoid", (0, -1)),
            Node("add_tanh", (0, -1)),
            Node("hadamard", (1, 2)),
            Node("highway", (3, 0)),
        ),
        output="last",
        output_activation="tanh",
    ),
    "every_input": Genotype(  # u on both sides, u as a highway's gate input, a node twice
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
    "grown_mean": Genotype(
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
    "grown_last": Genotype(
        "two_input",
        (
            Node("hadamard", (0, -1)),
            Node("add_relu", (1, 0), residual=True),
            Node("add_sigmoid", (2, -1), residual=True),
        ),
        output="last",
        output_activation="tanh",
    ),
}


def make_cell(genotype: Genotype, dropout: float = 0.3) -> TwoInputCell:
    """A float64 cell with non-zero γ, so that the residual branches carry value and gradient."""
    torch.manual_seed(3)
    cell = TwoInputCell(genotype, N_IN, D, dropout_x=dropout, dropout_h=dropout).double()
    with torch.no_grad():
        for gamma in cell.gammas.values():
            gamma.normal_()
    return cell


def run(cell: TwoInputCell, x: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Outputs, last state, and the gradients of (parameters, x, h0) of a random projection."""
    torch.manual_seed(9)  # the same dropout masks on both paths
    out, h = cell(x, h0)
    gen = torch.Generator().manual_seed(4)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum() + h.sum()
    wrt = [*cell.parameters(), x] + ([] if h0 is None else [h0])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return (
        out,
        h,
        [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads, strict=True)],
    )


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zero_h0"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("name", list(GENOTYPES))
def test_kernel_matches_eager_loop(name, dropout, training, with_h0):
    cell = make_cell(GENOTYPES[name], dropout).train(training)
    eager = copy.deepcopy(cell)
    eager.fused = False
    x = torch.randn(T, B, N_IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True) if with_h0 else None
    out, h, grads = run(cell, x, h0)
    assert type(out.grad_fn).__name__ == KERNEL
    ref_out, ref_h, ref_grads = run(eager, x, h0)
    assert type(ref_out.grad_fn).__name__ != KERNEL
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(h, ref_h, **TOL)
    names = [n for n, _ in cell.named_parameters()] + ["x", "h0"][: 1 + with_h0]
    for label, a, b in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, label=label: f"grad {label}: {m}")


def test_kernel_passes_gradcheck():
    """Finite differences through the whole kernel: every parameter, x and h0 at once."""
    cell = make_cell(GENOTYPES["grown_mean"], dropout=0.3)
    x = torch.randn(3, 2, N_IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in cell.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in cell.parameters()]

    def fn(x, h0, *tensors):
        torch.manual_seed(0)  # the same dropout masks at every evaluation
        params = dict(zip(names, tensors, strict=True))
        return torch.func.functional_call(cell, params, (x, h0))[0]

    assert type(fn(x, h0, *leaves).grad_fn).__name__ == KERNEL
    assert torch.autograd.gradcheck(fn, (x, h0, *leaves), eps=1e-6, atol=1e-5)


def test_eager_is_selectable_and_torch_func_falls_back():
    cell = make_cell(GENOTYPES["every_input"], dropout=0.0)
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    params = {k: v.detach() for k, v in cell.named_parameters()}

    def loss(p):
        return torch.func.functional_call(cell, p, (x,))[0].pow(2).sum()

    by_func = torch.func.grad(loss)(params)  # under a transform: the eager loop
    by_kernel = torch.autograd.grad(cell(x)[0].pow(2).sum(), list(cell.parameters()))
    for (name, _), g in zip(cell.named_parameters(), by_kernel, strict=True):
        torch.testing.assert_close(by_func[name], g, **TOL)
    cell.fused = False
    assert type(cell(x)[0].grad_fn).__name__ != KERNEL


def test_no_grad_and_float32_match_the_eager_loop():
    cell = make_cell(GENOTYPES["grown_last"]).float()
    eager = copy.deepcopy(cell)
    eager.fused = False
    x = torch.randn(T, B, N_IN)
    with torch.no_grad():
        torch.manual_seed(1)
        a = cell(x)[0]
        torch.manual_seed(1)
        b = eager(x)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
