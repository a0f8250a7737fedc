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

That loop is the fallback and the specification: when it can (``fused=True``, the default), the
forward hands the whole sequence to the hand-written kernel of ``spaces.fused_darts`` (one
``autograd.Function``, backward written out; tests/test_fused.py checks it against both).

Growth (``grow``) appends a residual node ``s = mean(s_1..s_N) + γ ⊙ BN(mixed)`` with ``γ = 0``,
which leaves the mean output unchanged; ``prune`` fixes every searched node to its derived edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from morphnas.genotype import DARTS_PRIMITIVES, Node
from morphnas.kernels.blocks import (
    check_dropout,
    combine_nodes,
    uniform_parameter,
    variational_mask,
)
from morphnas.ops import ACTIVATIONS
from morphnas.spaces.base import (
    ArchitectureMixin,
    SampledMixing,
    Widening,
    kernel_applies,
    new_alpha,
    parameter_like,
    sampled_scales,
)
from morphnas.spaces.fused_darts import (
    FusedDartsSequence,
    NodeSpec,
    Plan,
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
        fused: bool = True,
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
        self.fused = fused
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

    def _norm_batch_stats(self, s: Tensor) -> Tensor:
        """BatchNorm by the batch's own statistics, running statistics untouched.

        Scoring one sampled architecture (GDAS, SNAS, random search) in eval mode: the running
        statistics average over the many architectures sampled in training, and the recurrence
        amplifies their mismatch with the scored one step after step (a derived cell's valid
        forecasts reached 1e19). Like the BN recalibration of one-shot NAS, the scored cell is
        normalised by statistics of its own states.
        """
        assert self.bn is not None
        return nn.functional.batch_norm(s, None, None, training=True, eps=self.bn.eps)

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

    def _sampled_node(
        self,
        choice: int,
        scales: tuple[Tensor, Tensor],
        w_node: Tensor,
        states: list[Tensor],
        masked: list[Tensor],
    ) -> Tensor:
        """Only the sampled (predecessor, op) edge runs, scaled by its straight-through weight
        (see ``SampledMixing``): one matmul on one predecessor and one activation."""
        j, k = divmod(choice, len(self.op_names))
        op = self.op_names[k]
        s = (
            torch.zeros_like(states[0])
            if op == "none"
            else self._fixed_node(Node(op, (j,)), w_node, states, masked)
        )
        return scales[0] * s + scales[1]

    def _can_fuse(self, batch: int, probs: list[Tensor]) -> bool:
        """Whether the sequence kernel runs this forward (``base.kernel_applies``).

        A sampled mixing runs on it when BatchNorm normalises by batch statistics (training).
        The kernel has no place for a sampled node's ``Σ_{k≠c} w[k]`` (``sampled_scales``): its
        value is exactly 0, and its gradient, the sum of the BatchNorm input's gradient over the
        batch, is 0 in exact arithmetic under batch statistics, so leaving it out changes the
        architecture gradient by rounding only (the eager loop computes that zero to ~1e-9).
        Without BatchNorm, or in evaluation, the eager loop runs.
        """
        takes_sampled = self.bn is not None and self.bn.training
        return kernel_applies(self.fused, self.bn, batch, probs, takes_sampled)

    def _fused_forward(
        self, x: Tensor, h0: Tensor | None, probs: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The same function as the eager loop, by ``FusedDartsSequence``: masks drawn in the
        same order, the input projection hoisted here (autograd differentiates it), a fixed node
        as a single edge with its one activation at weight 1, a sampled node as its edge with
        its op at its straight-through weight (a sampled ``none``: no activation, value 0)."""
        batch = x.shape[1]
        mask_x = variational_mask(batch, self.input_size, self.dropout_x, x, self.training)
        mask_h = variational_mask(batch, self.hidden_size, self.dropout_h, x, self.training)
        w_x, w_h = self.init_weight[: self.input_size], self.init_weight[self.input_size :]
        x_proj = (x if mask_x is None else x * mask_x) @ w_x
        h = x.new_zeros(batch, self.hidden_size) if h0 is None else h0
        act_names = tuple(self.op_names[k] for k, _ in self._activations)
        specs, act_w = [], []
        choices = probs.choices if isinstance(probs, SampledMixing) else [None] * len(probs)
        for i, (p, choice) in enumerate(zip(probs, choices, strict=True), start=1):
            residual = str(i) in self.gammas
            node = self.fixed.get(i)
            if node is None and choice is not None:  # one edge, its one op (none: no op)
                j, k = divmod(choice, len(self.op_names))
                op = self.op_names[k]
                acts = () if op == "none" else (op,)
                specs.append(NodeSpec(j, j + 1, acts, residual))
                # (none: no column, but a view of the weight all the same, so that α's gradient
                # is 0, as eagerly, not None: an optimizer skips a parameter without one)
                weight = p.reshape(-1)[choice].view(1, 1)
                act_w.append(weight if acts else weight[:, :0])
            elif node is None:
                specs.append(NodeSpec(0, i, act_names, residual))
                act_w.append(p.index_select(1, self._act_cols))
            else:
                j = node.inputs[0]
                specs.append(NodeSpec(j, j + 1, (node.op,), residual))
                act_w.append(x.new_ones(1, 1))
        gammas = [self.gammas.get(str(i)) for i in range(1, self.nodes + 1)]
        plan = Plan(tuple(specs), self.bn)
        outputs = FusedDartsSequence.apply(
            plan, x_proj, h, w_h, mask_h, *self.node_weights, *act_w, *gammas
        )
        return outputs, outputs[-1]

    def forward(
        self, x: Tensor, h0: Tensor | None = None, weights: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        steps, batch, _ = x.shape
        d = self.hidden_size
        probs = self.mixing_weights() if weights is None else weights
        if self._can_fuse(batch, probs):
            return self._fused_forward(x, h0, probs)
        sampled = sampled_scales(probs) if isinstance(probs, SampledMixing) else None
        own_stats = sampled is not None and not self.training and self.bn is not None
        norm = self._norm_batch_stats if own_stats else self._norm
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
            s0 = norm(torch.lerp(h, torch.tanh(g0), torch.sigmoid(c0)))
            states = [s0]
            masked = states if mask_h is None else [s0 * mask_h]
            for i, w_node in enumerate(self.node_weights, start=1):
                if i in self.fixed:
                    s = self._fixed_node(self.fixed[i], w_node, states, masked)
                elif sampled is not None and sampled[i - 1] is not None:
                    choice = probs.choices[i - 1]
                    s = self._sampled_node(choice, sampled[i - 1], w_node, states, masked)
                else:
                    s = self._mixed_node(w_node, states, masked, act_w[i - 1])
                s = norm(s)
                gamma = self.gammas.get(str(i))
                if gamma is not None:
                    s = combine_nodes(states[1:], self.output) + gamma * s
                states.append(s)
                if mask_h is not None:
                    masked.append(s * mask_h)
            h = combine_nodes(states[1:], self.output)
            outputs.append(h)
        return torch.stack(outputs), h

    def _entry(self, i: int, node: Node) -> tuple[int, ...]:
        """``(predecessor, op)``: the one edge a derived node keeps (a genotype's node ``i``
        reads a state below ``i``, every one of which is a row of ``α_i``)."""
        return (node.inputs[0], self._op_column(node.op))

    @torch.no_grad()
    def node_options(self, i: int, p: Tensor) -> list[tuple[float, Node]]:
        """Every edge node ``i`` may keep, one (predecessor ``j``, op) pair with its mixing weight
        ``p[j, op]``, ``none`` left out, best first; ties go to the earlier predecessor, then the
        earlier op. The first is DARTS's rule: the strongest non-``none`` entry of the node."""
        residual = str(i) in self.gammas
        options = [
            (weight, Node(self.op_names[k], (j,), residual))
            for j, row in enumerate(p.tolist())
            for k, weight in enumerate(row)
            if self.op_names[k] != "none"
        ]
        return sorted(options, key=lambda option: -option[0])  # stable: ties keep (j, op) order

    def op_cost(self, op: str) -> tuple[int, int]:
        """(parameters, FLOPs per sample and time step) ``op`` adds to a derived node.

        Every activation uses the node's whole ``W_i`` (``d × 2d``): ``2d²`` parameters, a matmul
        of ``4d²`` FLOPs, and about ``6d`` elementwise FLOPs (sigmoid gate, activation, lerp);
        ``none`` costs nothing.
        """
        d = self.hidden_size
        return (0, 0) if op == "none" else (2 * d * d, 4 * d * d + 6 * d)

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
    def fix(self, i: int, node: Node) -> None:
        """Fix searched node ``i`` to ``node`` (pruning, or rebuilding a pruned cell on resume)."""
        self.fixed[i] = node
        self.arch[i - 1].requires_grad_(False).grad = None
