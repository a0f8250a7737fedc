"""Degenerate cells: a derived cell whose output ignores its input or its state, or never varies.

A search that collapses to parameter-free ops can derive such a cell. On the two-input backbone,
``s1 = hadamard(h, u)`` is zero for ever from ``h_0 = 0``, and so is every cell built on it: the
model's forecast is then its linear (AR) head alone, and the results table compares that head, not
a cell. ``check`` tells it from the genotype, before any retraining: it builds the cell at the run's
sizes with fresh random weights, runs it step by step from ``h_0 = 0`` and asks autograd whether
``h_t`` depends on ``x_t`` and on the carried state, and whether ``h_t`` varies with the input at
all. Every parameter is drawn at random, biases and residual scales ``γ`` included: they start at
zero in a real cell, which would hide a path that training opens. float64 and exact zeros make the
answers structural (a dependence the ops cut is exactly 0), not a threshold on a magnitude.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from morphnas import cells
from morphnas.genotype import Genotype

DRAWS = 3  # independent random weights; a dependence seen in any draw counts
STEPS = 6  # time steps from h_0 = 0
BATCH = 8  # input sequences per draw
# What counts as "no dependence" / "the same for every sequence": cut paths give exact zeros, so
# this only absorbs float64 rounding (weights are scaled so that real dependences are O(1)).
TOLERANCE = 1e-12


@dataclass(frozen=True)
class Verdict:
    """How a cell's output ``h_t`` behaves when run from ``h_0 = 0``."""

    input: bool  # ∂h_t/∂x_t ≠ 0 at some step: it reads the current input
    recurrent: bool  # ∂h_t/∂h_{t-1} (or the carried c) ≠ 0 at some step: it has a memory
    dead: bool  # h_t is the same for every input sequence at every step (zero, or constant)
    reason: str  # why it is degenerate, for a person; empty when it is not

    @property
    def degenerate(self) -> bool:
        """A cell that is dead, ignores its input or has no recurrence is not a recurrent cell."""
        return self.dead or not self.input or not self.recurrent

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "degenerate": self.degenerate}


def check(genotype: Genotype, input_size: int, hidden_size: int, seed: int = 0) -> Verdict:
    """Whether ``genotype``'s cell reads its input, carries state and varies, at these sizes.

    Deterministic in ``seed``; the global random state is left as it was (a run's later draws do
    not depend on whether a check ran).
    """
    if getattr(cells.CELLS[genotype.space], "modality", "sequences") == "images":
        return _check_images(genotype, input_size, hidden_size, seed)
    reads_input = reads_state = varies = nonzero = False
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        for _ in range(DRAWS):
            cell = _fresh_cell(genotype, input_size, hidden_size)
            x = torch.randn(STEPS, BATCH, input_size, dtype=torch.float64)
            state: Tensor | tuple[Tensor, ...] = x.new_zeros(BATCH, hidden_size)  # h_0 = 0
            for t in range(STEPS):
                x_t = x[t : t + 1].clone().requires_grad_(True)
                leaves = _leaves(state)
                h, state = _step(cell, x_t, leaves[0] if len(leaves) == 1 else tuple(leaves))
                projection = torch.randn_like(h)
                grads = torch.autograd.grad(
                    (h * projection).sum(), [x_t, *leaves], allow_unused=True
                )
                reads_input |= _nonzero(grads[0])
                reads_state |= any(_nonzero(g) for g in grads[1:])
                h = h.detach()
                varies |= bool((h - h[:1]).abs().max() > TOLERANCE * (1 + h.abs().max()))
                nonzero |= bool(h.abs().max() > TOLERANCE)
                state = _detached(state)
    dead = not varies
    reasons = []
    if dead:  # the rest follows, or no longer matters
        reasons.append(
            "dead: its output is exactly zero at every step from h_0 = 0"
            if not nonzero
            else "dead: its output is the same whatever the input"
        )
    else:
        if not reads_input:
            reasons.append("its output never depends on the current input")
        if not reads_state:
            reasons.append("its output never depends on the previous state (no recurrence)")
    return Verdict(reads_input, reads_state, dead, "; ".join(reasons))


def _check_images(genotype: Genotype, channels: int, width: int, seed: int) -> Verdict:
    """An image network has no state to carry (``recurrent`` is true: nothing is missing), and
    its stem and its cells' preprocessing read the input whatever the ops; what is checked is
    that its features vary with the image and depend on it (three cells: both reductions)."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        network = cells.build(genotype, channels, width, cells=3).double().eval()
        x = torch.randn(BATCH, channels, 8, 8, dtype=torch.float64, requires_grad=True)
        features = network(x)[0]
        (grad,) = torch.autograd.grad((features * torch.randn_like(features)).sum(), [x])
    spread = (features - features[:1]).abs().max()
    varies = bool(spread > TOLERANCE * (1 + features.abs().max()))
    reads = _nonzero(grad)
    reason = "" if varies and reads else "dead: its features are the same whatever the image"
    return Verdict(reads, True, not (varies and reads), reason)


def _fresh_cell(genotype: Genotype, input_size: int, hidden_size: int) -> nn.Module:
    """The discrete cell in float64 and eval mode (no dropout), on its eager loop (the
    specification), every parameter uniform in ±1/√d so that pre-activations stay O(1)."""
    cell = cells.build(genotype, input_size, hidden_size, fused=False).double().eval()
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for parameter in cell.parameters():
            parameter.uniform_(-bound, bound)
    return cell


def _step(
    cell: nn.Module, x_t: Tensor, state: Tensor | tuple[Tensor, ...]
) -> tuple[Tensor, Tensor | tuple[Tensor, ...]]:
    """One time step: ``h_t`` and the state carried to the next (``h``, or ``(h, c)`` for a cell
    that carries a memory cell beside its output)."""
    carry = getattr(cell, "forward_with_state", None)
    if carry is not None:
        outputs, new_state = carry(x_t, state)
    else:
        outputs, new_state = cell(x_t, state)
    return outputs[-1], new_state


def _leaves(state: Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    """The carried state as fresh leaves, to differentiate this step's output by."""
    parts = state if isinstance(state, tuple) else (state,)
    return [part.detach().requires_grad_(True) for part in parts]


def _detached(state: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    if isinstance(state, tuple):
        return tuple(part.detach() for part in state)
    return state.detach()


def _nonzero(grad: Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().max() > TOLERANCE)
