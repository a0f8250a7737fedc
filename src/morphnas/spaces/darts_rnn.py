"""The DARTS recurrent search cell (Liu et al. 2019), fused, and growable.

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

Growth (``grow``) appends a residual node ``s = mean(s_1..s_N) + γ ⊙ BN(mixed)`` with ``γ = 0``,
which leaves the mean output unchanged; ``prune`` fixes every searched node to its derived edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from morphnas.genotype import DARTS_PRIMITIVES, Node
from morphnas.ops import ACTIVATIONS
from morphnas.spaces.base import (
    ArchitectureMixin,
    Widening,
    check_dropout,
    combine_nodes,
    new_alpha,
    parameter_like,
    uniform_parameter,
    variational_mask,
)


class DartsRNNSearchCell(ArchitectureMixin, nn.Module):
    """DARTS recurrent supernet; ``arch[i-1]`` is ``(i, len(primitives))``: node i's edges."""

    space = "darts_rnn"
    output = "mean"
    output_activation = "identity"

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
        check_dropout(dropout_x=dropout_x, dropout_h=dropout_h)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.op_names = tuple(primitives)
        self.dropout_x, self.dropout_h = dropout_x, dropout_h
        self.init_range = init_range
        d = hidden_size
        self.init_weight = uniform_parameter(input_size + d, 2 * d, bound=init_range)
        self.node_weights = nn.ParameterList(
            uniform_parameter(d, 2 * d, bound=init_range) for _ in range(nodes)
        )
        self.bn = nn.BatchNorm1d(d, affine=False) if batchnorm else None
        self.arch = nn.ParameterList(new_alpha(i, len(self.op_names)) for i in range(1, nodes + 1))
        self.gammas = nn.ParameterDict()
        self.fixed: dict[int, Node] = {}
        self._activations = [
            (k, ACTIVATIONS[name]) for k, name in enumerate(self.op_names) if name != "none"
        ]
        # On the module's device, so gathering the activations' weights copies nothing from host.
        act_cols = torch.tensor([k for k, _ in self._activations])
        self.register_buffer("_act_cols", act_cols, persistent=False)

    @property
    def nodes(self) -> int:
        return len(self.node_weights)

    def _norm(self, s: Tensor) -> Tensor:
        return self.bn(s) if self.bn is not None else s

    def _mixed_node(
        self, w_node: Tensor, states: list[Tensor], masked: list[Tensor], act_w: Tensor
    ) -> Tensor:
        """``Σ_j Σ_k w_jk [s_j + c_j ⊙ (f_k(g_j) − s_j)]``, the activation blend collapsed."""
        prev = torch.stack(states)  # (i, B, d): every predecessor at once
        inputs = prev if masked is states else torch.stack(masked)
        c, g = (inputs @ w_node).chunk(2, dim=-1)
        blend = (act_w * torch.stack([f(g) for _, f in self._activations])).sum(0)
        return torch.lerp(act_w.sum(0) * prev, blend, torch.sigmoid(c)).sum(0)

    @staticmethod
    def _fixed_node(
        node: Node, w_node: Tensor, states: list[Tensor], masked: list[Tensor]
    ) -> Tensor:
        j = node.inputs[0]
        c, g = (masked[j] @ w_node).chunk(2, dim=-1)
        return torch.lerp(states[j], ACTIVATIONS[node.op](g), torch.sigmoid(c))

    def forward(
        self, x: Tensor, h0: Tensor | None = None, weights: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        steps, batch, _ = x.shape
        d = self.hidden_size
        probs = self.mixing_weights() if weights is None else weights
        # Per node: activation weights shaped (n_act, i, 1, 1), hoisted out of the time loop.
        act_w = [p.index_select(1, self._act_cols).T[..., None, None] for p in probs]
        mask_x = variational_mask(batch, self.input_size, self.dropout_x, x, self.training)
        mask_h = variational_mask(batch, d, self.dropout_h, x, self.training)
        w_x, w_h = self.init_weight[: self.input_size], self.init_weight[self.input_size :]
        x_proj = (x if mask_x is None else x * mask_x) @ w_x  # hoisted out of the time loop
        h = x.new_zeros(batch, d) if h0 is None else h0
        outputs = []
        for t in range(steps):
            c0, g0 = (x_proj[t] + (h if mask_h is None else h * mask_h) @ w_h).chunk(2, dim=-1)
            s0 = self._norm(torch.lerp(h, torch.tanh(g0), torch.sigmoid(c0)))
            states = [s0]
            masked = states if mask_h is None else [s0 * mask_h]
            for i, w_node in enumerate(self.node_weights, start=1):
                if i in self.fixed:
                    s = self._fixed_node(self.fixed[i], w_node, states, masked)
                else:
                    s = self._mixed_node(w_node, states, masked, act_w[i - 1])
                s = self._norm(s)
                gamma = self.gammas.get(str(i))
                if gamma is not None:
                    s = combine_nodes(states[1:], self.output) + gamma * s
                states.append(s)
                if mask_h is not None:
                    masked.append(s * mask_h)
            h = combine_nodes(states[1:], self.output)
            outputs.append(h)
        return torch.stack(outputs), h

    def _one_hot(self, i: int) -> Tensor:
        node = self.fixed[i]
        hot = torch.zeros_like(self.arch[i - 1])
        hot[node.inputs[0], self.op_names.index(node.op)] = 1.0
        return hot

    @torch.no_grad()
    def _choose(self, i: int, p: Tensor) -> Node:
        """The predecessor whose best non-``none`` probability is largest, and that op."""
        candidates = [k for k, name in enumerate(self.op_names) if name != "none"]
        best_p, best_k = p[:, candidates].max(dim=1)
        j = int(best_p.argmax())
        return Node(self.op_names[candidates[int(best_k[j])]], (j,), str(i) in self.gammas)

    def widen(self, widening: Widening) -> None:
        """Widen the hidden state in place, function-preserving (see ``Widening``).

        Every widened weight is a new parameter: optimizers must be rebuilt (fresh state).
        """
        w = widening
        self.init_weight = w.producer(w.reader(self.init_weight, self.input_size), blocks=2)
        for i, weight in enumerate(self.node_weights):
            self.node_weights[i] = w.producer(w.reader(weight, 0), blocks=2)
        for key, gamma in self.gammas.items():
            self.gammas[key] = w.producer(gamma, dim=0)
        if self.bn is not None:
            self.bn = w.batchnorm(self.bn)
        self.hidden_size = w.new

    def grow(self, alpha_init: str = "random") -> list[nn.Parameter]:
        """Append node N+1 as a residual node with ``γ = 0``; return the new parameters.

        ``alpha_init``: ``random`` (``1e-3·N(0,1)``, as at the start) or ``mean`` (the mean of
        the existing rows, so the new node starts from what the search has learnt so far).
        """
        n, ref = self.nodes + 1, self.init_weight
        weight = uniform_parameter(self.hidden_size, 2 * self.hidden_size, bound=self.init_range)
        weight, alpha, gamma = (
            parameter_like(ref, p)
            for p in (weight, new_alpha(n, len(self.op_names)), torch.zeros(self.hidden_size))
        )
        if alpha_init == "mean":
            with torch.no_grad():
                alpha.copy_(torch.cat(list(self.arch)).mean(0).expand(n, -1))
        self.node_weights.append(weight)
        self.arch.append(alpha)
        self.gammas[str(n)] = gamma
        return [weight, alpha, gamma]

    @torch.no_grad()
    def prune(self) -> list[int]:
        """Fix every searched node to its derived edge and op (weights kept); return their indices.

        ``W_i`` is shared by all of a node's edges, so nothing is dropped but ``α_i``, which is
        frozen and no longer searched.
        """
        pruned = []
        for i, p in enumerate(self.mixing_weights(), start=1):
            if i not in self.fixed:
                self.fixed[i] = self._choose(i, p)
                self.arch[i - 1].requires_grad_(False).grad = None
                pruned.append(i)
        return pruned
