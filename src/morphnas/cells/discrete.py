"""Cells built from a genotype: one op per node, its own weights, no architecture parameters.

The formulas are those of the search spaces with the mixture replaced by the chosen op, so a
derived cell computes what its strongest path in the supernet computed (without BatchNorm, as in
the DARTS evaluation cell).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from morphnas.cells.fused_darts_cell import CellPlan, FusedDartsCellSequence, group_weight
from morphnas.cells.fused_two_input_cell import FusedTwoInputCellSequence, TwoInputCellPlan
from morphnas.genotype import CELL_STATE, Genotype
from morphnas.kernels.blocks import (
    check_dropout,
    combine_nodes,
    residual_gammas,
    uniform_parameter,
    variational_mask,
)
from morphnas.kernels.fused_ops import doubled_tanh_half, kernels_allowed
from morphnas.ops import ACTIVATIONS, apply_two_input, two_input_weight_shape

if TYPE_CHECKING:
    from morphnas.channels.gates import ChannelGate


class _DerivedCell(nn.Module):
    """What the discrete cells share: a genotype run over ``(T, B, input_size)`` sequences at
    ``hidden_size``, with variational dropout on the input (``dropout_x``) and on the recurrent
    state (``dropout_h``), on its sequence kernel when ``fused`` allows.

    A subclass makes its own weights in ``_build``, from ``init_range`` (the bound of their
    uniform init) or, when that is None, from its ``_default_bound``; ``__init__`` calls it
    once, before the residual nodes' ``γ``, so every cell draws its weights in its own order.

    ``unit_gate``: None, or a per-hidden-unit ``ChannelGate`` that ``channels.recurrent``
    attaches (DNAL unit learning); a gated cell runs its eager loop with the gate applied to every
    hidden-sized state other units read (that module says which, and why).
    """

    def __init__(
        self,
        genotype: Genotype,
        input_size: int,
        hidden_size: int,
        dropout_x: float = 0.0,
        dropout_h: float = 0.0,
        init_range: float | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.genotype = genotype
        self.input_size, self.hidden_size = input_size, hidden_size
        check_dropout(dropout_x=dropout_x, dropout_h=dropout_h)
        self.dropout_x, self.dropout_h = dropout_x, dropout_h
        self.fused = fused
        self._build(self._default_bound() if init_range is None else init_range)
        self.gammas = residual_gammas(genotype.nodes, hidden_size)
        self.unit_gate: ChannelGate | None = None

    def _default_bound(self) -> float:
        """The init bound when ``init_range`` is None."""
        raise NotImplementedError

    def _build(self, bound: float) -> None:
        """Make the cell's weights, drawn from ``U(−bound, bound)``."""
        raise NotImplementedError


class DartsRNNCell(_DerivedCell):
    """The DARTS evaluation cell: highway init node, then ``s_i = s_j + c ⊙ (f(g) − s_j)``.

    The output is the genotype's: DARTS derives ``mean`` (of nodes 1..N) with no squashing.
    With ``fused=True`` (the default) the sequence runs on ``cells.fused_darts_cell``'s kernel
    whenever it can; the eager loop below is its specification and fallback.
    """

    def _default_bound(self) -> float:
        return 0.04  # the DARTS code's init range

    def _build(self, bound: float) -> None:
        self._plan = CellPlan.of(self.genotype)
        d = self.hidden_size
        self.init_weight = uniform_parameter(self.input_size + d, 2 * d, bound=bound)
        self.node_weights = nn.ParameterList(
            uniform_parameter(d, 2 * d, bound=bound) for _ in self.genotype.nodes
        )

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        steps, batch, _ = x.shape
        d = self.hidden_size
        mask_x = variational_mask(batch, self.input_size, self.dropout_x, x, self.training)
        mask_h = variational_mask(batch, d, self.dropout_h, x, self.training)
        w_x, w_h = self.init_weight[: self.input_size], self.init_weight[self.input_size :]
        x_in = x if mask_x is None else x * mask_x
        h = x.new_zeros(batch, d) if h0 is None else h0
        gate = self.unit_gate
        if gate is None and self.fused and kernels_allowed():
            return self._fused_forward(x_in, h, mask_h)
        if gate is not None:
            h = gate(h)
        x_proj = x_in @ w_x
        acts = [ACTIVATIONS[node.op] for node in self.genotype.nodes]
        squash = ACTIVATIONS[self.genotype.output_activation]
        gate_h = gate is not None and not _keeps_zero(self.genotype.output_activation)
        outputs = []
        for t in range(steps):
            c0, g0 = (x_proj[t] + (h if mask_h is None else h * mask_h) @ w_h).chunk(2, dim=-1)
            states = [h + torch.sigmoid(c0) * (torch.tanh(g0) - h)]
            if gate is not None:
                states[0] = gate(states[0])
            for i, (node, w_node, f) in enumerate(
                zip(self.genotype.nodes, self.node_weights, acts, strict=True), start=1
            ):
                s_prev = states[node.inputs[0]]
                c, g = ((s_prev if mask_h is None else s_prev * mask_h) @ w_node).chunk(2, dim=-1)
                s = s_prev + torch.sigmoid(c) * (f(g) - s_prev)
                if node.residual:
                    s = combine_nodes(states[1:], self.genotype.output) + self.gammas[str(i)] * s
                states.append(s if gate is None else gate(s))
            h = squash(combine_nodes(states[1:], self.genotype.output))
            if gate_h:
                h = gate(h)
            outputs.append(h)
        return torch.stack(outputs), h

    def _fused_forward(
        self, x_in: Tensor, h0: Tensor, mask_h: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        d, plan = self.hidden_size, self._plan
        blocks = [
            group_weight(
                [self.node_weights[i] for i in children], [plan.acts[i] for i in children], d
            )
            for _, children in plan.groups
        ]
        gammas = [self.gammas[str(i)] for i, n in enumerate(self.genotype.nodes, 1) if n.residual]
        init_weight = doubled_tanh_half(self.init_weight)  # the kernel's tanh(g₀) = 2σ(2g₀) − 1
        x_proj, w_h = x_in @ init_weight[: self.input_size], init_weight[self.input_size :]
        outputs = FusedDartsCellSequence.apply(
            self._plan, x_proj, h0, w_h, mask_h, *blocks, *gammas
        )
        return outputs, outputs[-1]


class TwoInputCell(_DerivedCell):
    """A discrete two-input cell: each node one op on its two input states.

    ``u_t = x_t W_x + b_x``: the input bias gives every op that reads ``u`` an affine term, which
    is what lets the space hold a GRU or an LSTM exactly (their gates have biases). A genotype
    with a ``cell_state`` node also carries that node's value ``c`` from step to step (state -2).

    With ``fused=True`` (the default) the sequence runs on ``cells.fused_two_input_cell``'s
    kernel whenever it can (not for a cell that carries ``c``, which the kernel does not know);
    the eager loop below is its specification and fallback.
    """

    def _default_bound(self) -> float:
        return 1.0 / math.sqrt(self.hidden_size)

    def _build(self, bound: float) -> None:
        self._plan = TwoInputCellPlan.of(self.genotype)
        d = self.hidden_size
        self.input_weight = uniform_parameter(self.input_size, d, bound=bound)
        self.input_bias = nn.Parameter(torch.zeros(d))
        # One weight per node: [A; B] (2d x d) for add ops, [C, H] (d x 2d) for highway, else none.
        self.node_weights = nn.ParameterList()
        self._weight_slot: list[int | None] = []
        for node in self.genotype.nodes:
            shape = two_input_weight_shape(node.op, d)
            if shape is not None:
                self._weight_slot.append(len(self.node_weights))
                self.node_weights.append(uniform_parameter(*shape, bound=bound))
            else:
                self._weight_slot.append(None)

    def _node(self, i: int, a: Tensor, b: Tensor) -> Tensor:
        slot = self._weight_slot[i]
        weight = self.node_weights[slot] if slot is not None else None
        return apply_two_input(self.genotype.nodes[i].op, weight, a, b)

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(outputs, h_last)`` from ``h0`` (zeros if None); a carried ``c`` starts at zero."""
        outputs, h, _ = self._sequence(x, h0, None)
        return outputs, h

    def forward_with_state(
        self, x: Tensor, state: Tensor | tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        """The outputs and the whole carried state, ``(h, c)`` for a cell with a ``cell_state``
        node, else ``h``: a language model carries it across BPTT windows, as it does an LSTM's.

        ``state``: what a previous call returned (a bare ``h`` starts ``c`` at zero)."""
        if self.genotype.cell_state is None:
            return self(x, state)  # through ``forward``, so a compiled forward is used
        h0, c0 = (state, None) if state is None or isinstance(state, Tensor) else state
        outputs, h, c = self._sequence(x, h0, c0)
        assert c is not None
        return outputs, (h, c)

    def _sequence(
        self, x: Tensor, h0: Tensor | None, c0: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Outputs, last ``h`` and last ``c`` (None when the cell carries none)."""
        steps, batch, _ = x.shape
        mask_x = variational_mask(batch, self.input_size, self.dropout_x, x, self.training)
        mask_h = variational_mask(batch, self.hidden_size, self.dropout_h, x, self.training)
        u_all = (x if mask_x is None else x * mask_x) @ self.input_weight + self.input_bias
        h = x.new_zeros(batch, self.hidden_size) if h0 is None else h0
        carried = self.genotype.cell_state
        gate = self.unit_gate
        if carried is None and gate is None and self.fused and kernels_allowed():
            return (*self._fused_forward(u_all, h, mask_h), None)
        c = x.new_zeros(batch, self.hidden_size) if carried is not None and c0 is None else c0
        if gate is not None:
            u_all, h = gate(u_all), gate(h)
            c = None if c is None else gate(c)
        squash = ACTIVATIONS[self.genotype.output_activation]
        gate_h = gate is not None and not _keeps_zero(self.genotype.output_activation)
        outputs = []
        for t in range(steps):
            states = {-1: u_all[t], 0: h if mask_h is None else h * mask_h}
            if c is not None:
                states[CELL_STATE] = c
            node_states: list[Tensor] = []
            for i, node in enumerate(self.genotype.nodes):
                a, b = (states[j] for j in node.inputs)
                s = self._node(i, a, b)
                if node.residual:
                    s = (
                        combine_nodes(node_states, self.genotype.output)
                        + self.gammas[str(i + 1)] * s
                    )
                if gate is not None:
                    s = gate(s)
                states[i + 1] = s
                node_states.append(s)
            h = squash(combine_nodes(node_states, self.genotype.output))
            if gate_h:
                h = gate(h)
            if carried is not None:
                c = states[carried]
            outputs.append(h)
        return torch.stack(outputs), h, c

    def _fused_forward(
        self, u_all: Tensor, h0: Tensor, mask_h: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        weights = [
            None if slot is None else self._kernel_weight(node.op, self.node_weights[slot])
            for node, slot in zip(self.genotype.nodes, self._weight_slot, strict=True)
        ]
        gammas = [self.gammas[str(i)] for i, n in enumerate(self.genotype.nodes, 1) if n.residual]
        outputs = FusedTwoInputCellSequence.apply(self._plan, u_all, h0, mask_h, *weights, *gammas)
        return outputs, outputs[-1]

    @staticmethod
    def _kernel_weight(op: str, weight: Tensor) -> Tensor:
        """A highway's ``[C, H]`` goes in as ``[C, 2H]``: its ``tanh`` is ``2σ(2g) − 1``."""
        return doubled_tanh_half(weight) if op == "highway" else weight


def _keeps_zero(activation: str) -> bool:
    """Whether ``activation(0) = 0``: then a combination of gated (zero) states stays zero."""
    return float(ACTIVATIONS[activation](torch.zeros(()))) == 0.0
