"""The DARTS recurrent search cell (Liu et al. 2019), fused.

Exactly the cell of the reference code (spec/morphism.md §2.1): a highway init node on
``[x_t, h_{t-1}]``, nodes ``1..N`` mixing all predecessors with one matrix ``W_i`` per node shared
by its incoming edges, BatchNorm (no affine) on every node during search, output the mean of nodes
``1..N``. Fused rather than looped per primitive:

* the input half of the init projection is computed for all time steps in one matmul;
* the softmax of the architecture parameters is taken once per forward, not once per step;
* one matmul per node covers all its predecessors;
* the mixture over activations collapses to one blend per edge, because the edge is linear in
  ``f(g)``: ``Σ_k w_k [s + c ⊙ (f_k(g) − s)] = W s + c ⊙ (Σ_k w_k f_k(g) − W s)``, ``W = Σ_k w_k``;
* no host synchronisation inside the time loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from morphnas.genotype import DARTS_PRIMITIVES, Genotype, Node
from morphnas.ops import ACTIVATIONS
from morphnas.spaces.base import (
    ArchitectureMixin,
    check_dropout,
    new_alpha,
    uniform_parameter,
    variational_mask,
)


class DartsRNNSearchCell(ArchitectureMixin, nn.Module):
    """DARTS recurrent supernet; ``arch[i-1]`` is ``(i, len(primitives))``: node i's edges."""

    space = "darts_rnn"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        nodes: int = 8,
        primitives: Sequence[str] = DARTS_PRIMITIVES,
        batchnorm: bool = True,
        dropout_x: float = 0.0,
        dropout_h: float = 0.0,
        init_range: float = 0.04,
    ) -> None:
        super().__init__()
        unknown = set(primitives) - set(DARTS_PRIMITIVES)
        if unknown or not set(primitives) - {"none"}:
            raise ValueError(
                f"darts_rnn primitives must be a subset of {DARTS_PRIMITIVES} with at least one "
                f"activation; got {list(primitives)}"
            )
        if nodes < 1:
            raise ValueError("darts_rnn needs at least one node")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.op_names = tuple(primitives)
        check_dropout(dropout_x=dropout_x, dropout_h=dropout_h)
        self.dropout_x, self.dropout_h = dropout_x, dropout_h
        d = hidden_size
        self.init_weight = uniform_parameter(input_size + d, 2 * d, bound=init_range)
        self.node_weights = nn.ParameterList(
            uniform_parameter(d, 2 * d, bound=init_range) for _ in range(nodes)
        )
        self.bn = nn.BatchNorm1d(d, affine=False) if batchnorm else None
        self.arch = nn.ParameterList(new_alpha(i, len(self.op_names)) for i in range(1, nodes + 1))
        self._activations = [
            (k, ACTIVATIONS[name]) for k, name in enumerate(self.op_names) if name != "none"
        ]

    @property
    def nodes(self) -> int:
        return len(self.node_weights)

    def _norm(self, s: Tensor) -> Tensor:
        return self.bn(s) if self.bn is not None else s

    def forward(
        self, x: Tensor, h0: Tensor | None = None, weights: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        steps, batch, _ = x.shape
        d = self.hidden_size
        probs = self.mixing_weights() if weights is None else weights
        # Per node: activation weights shaped (n_act, i, 1, 1) and their sum W (i, 1, 1).
        act_cols = [k for k, _ in self._activations]
        act_w = [p[:, act_cols].T[..., None, None] for p in probs]
        total_w = [w.sum(0) for w in act_w]
        mask_x = variational_mask(batch, self.input_size, self.dropout_x, x, self.training)
        mask_h = variational_mask(batch, d, self.dropout_h, x, self.training)
        w_x, w_h = self.init_weight[: self.input_size], self.init_weight[self.input_size :]
        x_proj = (x if mask_x is None else x * mask_x) @ w_x  # hoisted out of the time loop
        h = x.new_zeros(batch, d) if h0 is None else h0
        outputs = []
        for t in range(steps):
            c0, g0 = (x_proj[t] + (h if mask_h is None else h * mask_h) @ w_h).chunk(2, dim=-1)
            s0 = self._norm(h + torch.sigmoid(c0) * (torch.tanh(g0) - h))
            states = [s0]
            masked = [s0 if mask_h is None else s0 * mask_h]
            for i, w_node in enumerate(self.node_weights):
                prev = torch.stack(states)  # (i + 1, B, d): every predecessor at once
                c, g = (torch.stack(masked) @ w_node).chunk(2, dim=-1)
                blend = sum(w * f(g) for w, (_, f) in zip(act_w[i], self._activations, strict=True))
                base = total_w[i] * prev
                s = self._norm((base + torch.sigmoid(c) * (blend - base)).sum(0))
                states.append(s)
                masked.append(s if mask_h is None else s * mask_h)
            h = torch.stack(states[1:]).mean(0)
            outputs.append(h)
        return torch.stack(outputs), h

    @torch.no_grad()
    def derive(self) -> Genotype:
        """Per node: the predecessor whose best non-``none`` probability is largest, and that op."""
        names = self.op_names
        candidates = [k for k, name in enumerate(names) if name != "none"]
        nodes = []
        for p in self.mixing_weights():
            best_p, best_k = p[:, candidates].max(dim=1)
            j = int(best_p.argmax())
            nodes.append(Node(names[candidates[int(best_k[j])]], (j,)))
        return Genotype(space=self.space, nodes=tuple(nodes), output="mean")
