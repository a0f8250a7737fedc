"""The two-input recurrent backbone (Jie & Gao), fused; our reading of the paper (morphism.md §2.2).

Every candidate op takes two inputs ``(a, b)``. Seeds: ``u_t = x_t W_x + b_x`` (state -1) and
``h_{t-1}`` (state 0). Wiring ``chain``: node ``i`` reads ``(s_{i-1}, s_{i-2})``, so node 1 sees
``(h_{t-1}, u_t)``; wiring ``input``: node ``i`` reads ``(s_{i-1}, u_t)`` ("input injection");
wiring ``search``: node ``i`` *chooses* its two inputs among every earlier state (``u_t``,
``h_{t-1}``, ``s_1 … s_{i-1}``), topology variables searched beside the ops. A mixed node is
``Σ_k softmax(α_i)_k · o_k(a, b)``; the output is the last node or the mean, squashed by
``tanh`` by default (``output_activation``): LSTM and GRU keep their state bounded by
construction, and without a squash a cell of parameter-free ``add`` nodes (``s2 = s1 + h``)
multiplies the state at every step and overflows within a few dozen steps.

Growth (``grow``) appends a residual node ``s = base + γ ⊙ mixed(a, b)`` with ``γ = 0``, where
``base`` is the output rule over the existing nodes, so the cell's function is unchanged;
``prune`` fixes every searched node to its strongest op, keeping only that op's weights.

Input choice (``wiring: search``), our design: node ``i``'s ``α`` has one row per ordered pair
of distinct candidate states ``(a, b)`` and one column per op, as a DARTS node has one row per
predecessor, so every strategy (softmax, Gumbel, sampling, sigmoid gates, penalties) searches it
unchanged; its read-out is one softmax over the whole node (a per-row softmax would give every
pair the same mass and leave the input choice unlearnable). The dense forward is the mean-field
relaxation of that joint distribution: its op marginal mixes the ops, and each input slot reads
the marginal mixture of the candidate states, ``ā = Σ_j P(a = j) s_j``, ``b̄`` alike. Under the
product of the marginals that is the exact expectation for the bilinear ops
(``E[a ⊙ b] = E[a] ⊙ E[b]`` for independent slots, ``E[a + b]`` likewise) and moves the mixture
inside the activation for the weighted ones; it costs one weighted sum per slot instead of one
op evaluation per pair (the pair count grows as ``i²``), and a hard sample (GDAS, random search)
runs exactly its one pair and op. Derivation takes the ``(op, a, b)``, ``a ≠ b``, with the
largest product of marginals (``node_options``).

Fused: the input projection runs once for all time steps, the softmax once per forward, the
``add_*`` ops of a node share one matmul on ``[a, b]`` (one ``2d × n·d`` block), the highway op
one matmul on ``b``, and the time loop has no host synchronisation. That eager loop is the
fallback and the specification: when it can (``fused=True``, the default), the forward hands the
whole sequence to the hand-written kernel of ``spaces.fused_two_input`` (one
``autograd.Function``, backward written out; tests/test_fused_two_input.py checks it). A sample
(GDAS, random search: ``SampledMixing``) goes to the kernel too, each sampled node as its op and
a constant term weighted by the unsampled ops' sum, as ``_sampled`` computes it, and so does
input choice: a mixed node's op marginal and slot weights (``input_marginals``, once per
forward) go in, and the kernel mixes the states into each slot at every step; a sampled or
fixed node reads its one pair. A cell that carries a cell state (``cell_state``) runs the eager
loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from morphnas.genotype import (
    CELL_STATE,
    OUTPUT_ACTIVATIONS,
    SPACE_OUTPUTS,
    TWO_INPUT_OPS,
    Node,
)
from morphnas.kernels.blocks import (
    check_dropout,
    combine_nodes,
    uniform_parameter,
    variational_mask,
)
from morphnas.ops import ACTIVATIONS, ADD_OPS, apply_two_input
from morphnas.spaces.base import (
    ArchitectureMixin,
    SampledMixing,
    Widening,
    joint_softmax,
    kernel_applies,
    new_alpha,
    parameter_like,
    sampled_scales,
)
from morphnas.spaces.fused_two_input import (
    ONE,
    FusedTwoInputSequence,
    TwoInputNodeSpec,
    TwoInputPlan,
)

WIRINGS = ("chain", "input", "search")
WEIGHT_SHARING = ("per_op", "per_node")


def _check_cell_state(cell_state: int | None, nodes: int, wiring: str) -> None:
    """``cell_state`` names one of the ``nodes`` and comes with input choice: under a fixed
    wiring no node reads ``c_{t-1}``, so carrying it would change nothing."""
    if cell_state is None:
        return
    if isinstance(cell_state, bool) or not isinstance(cell_state, int):
        raise ValueError(f"two_input cell_state must be a node number; got {cell_state!r}")
    if not 1 <= cell_state <= nodes:
        raise ValueError(
            f"two_input cell_state {cell_state} is not a node of a {nodes}-node cell; give "
            f"1..{nodes} (an LSTM has 9 nodes and carries node 7)"
        )
    if wiring != "search":
        raise ValueError(
            f"two_input cell_state needs wiring 'search' (got {wiring!r}): under a fixed wiring "
            "no node reads the carried c"
        )


def _b_only(highway_weight: Tensor | None) -> Tensor | None:
    """A highway's ``[C H]`` (``d × 2d``) as the kernel's node matrix ``[0; C H]``: it reads
    ``b`` only."""
    if highway_weight is None:
        return None
    return torch.cat([torch.zeros_like(highway_weight), highway_weight])


def node_inputs(i: int, wiring: str) -> tuple[int, int]:
    """The two states node ``i`` (1-based) reads under a fixed wiring (``chain``/``input``)."""
    if wiring == "search":
        raise ValueError("under wiring 'search' a node's inputs are searched, not fixed")
    return (i - 1, i - 2) if wiring == "chain" else (i - 1, -1)


@functools.cache
def input_pairs(i: int, first: int = -1) -> tuple[tuple[int, int], ...]:
    """The ordered pairs of distinct states node ``i`` may read under ``wiring: search``: every
    earlier state, ``u_t`` (-1), ``h_{t-1}`` (0) and ``s_1 … s_{i-1}``, and ``c_{t-1}`` (-2)
    when ``first`` is -2 (a supernet with a ``cell_state``). Row ``r`` of the node's ``α`` is
    pair ``r``."""
    states = range(first, i)
    return tuple((a, b) for a in states for b in states if a != b)


class TwoInputNodeWeights(nn.Module):
    """The weights of one mixed node: ``[A_k; B_k]`` for the add ops, ``[C, H]`` for highway.

    ``per_op``: each add op has its own ``A_k, B_k`` (one ``2d × n·d`` matrix); ``per_node``: the
    add ops share one ``2d × d`` matrix, the DARTS-like variant with fewer parameters.
    """

    def __init__(self, hidden_size: int, n_add: int, highway: bool, sharing: str, bound: float):
        super().__init__()
        d = hidden_size
        width = n_add if sharing == "per_op" else min(n_add, 1)
        self.add_weight = uniform_parameter(2 * d, width * d, bound=bound) if width else None
        self.highway_weight = uniform_parameter(d, 2 * d, bound=bound) if highway else None


class FixedNodeWeights(nn.Module):
    """A pruned node: one op and only its own weight (``None`` for parameter-free ops)."""

    def __init__(self, op: str, weight: Tensor | None) -> None:
        super().__init__()
        self.op = op
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None


class TwoInputSearchCell(ArchitectureMixin, nn.Module):
    """Two-input supernet. ``arch[i-1]`` has shape ``(len(ops),)``: one mixture per node; under
    ``wiring: search`` ``(len(input_pairs(i)), len(ops))``: one row per candidate input pair."""

    space = "two_input"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        nodes: int = 4,
        ops: Sequence[str] = TWO_INPUT_OPS,
        wiring: str = "chain",
        output: str = "last",
        output_activation: str = "tanh",
        weight_sharing: str = "per_op",
        batchnorm: bool = False,
        dropout_x: float = 0.0,
        dropout_h: float = 0.0,
        init_range: float | None = None,
        fused: bool = True,
        cell_state: int | None = None,
        cell_bound: float | None = 10.0,
    ) -> None:
        super().__init__()
        if set(ops) - set(TWO_INPUT_OPS) or not set(ops) - {"none"}:
            raise ValueError(
                f"two_input ops must be a subset of {TWO_INPUT_OPS} with at least one op other "
                f"than none; got {list(ops)}"
            )
        for name, value, allowed in (
            ("wiring", wiring, WIRINGS),
            ("output", output, SPACE_OUTPUTS["two_input"]),
            ("output_activation", output_activation, OUTPUT_ACTIVATIONS),
            ("weight_sharing", weight_sharing, WEIGHT_SHARING),
        ):
            if value not in allowed:
                raise ValueError(f"two_input {name} must be one of {allowed}; got {value!r}")
        if nodes < 1:
            raise ValueError("two_input needs at least one node")
        _check_cell_state(cell_state, nodes, wiring)
        if cell_bound is not None and not cell_bound > 0:
            raise ValueError(f"two_input cell_bound must be positive or None; got {cell_bound}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.op_names = tuple(ops)
        self.wiring, self.output, self.weight_sharing = wiring, output, weight_sharing
        self.output_activation = output_activation
        self._squash = ACTIVATIONS[output_activation]
        check_dropout(dropout_x=dropout_x, dropout_h=dropout_h)
        self.dropout_x, self.dropout_h = dropout_x, dropout_h
        self.init_range = 1.0 / math.sqrt(hidden_size) if init_range is None else init_range
        self.fused = fused
        self.input_choice = wiring == "search"
        self.cell_state, self.cell_bound = cell_state, cell_bound
        # The first candidate state: c_{t-1} (-2) when the cell carries one, else u_t (-1).
        self._first = CELL_STATE if cell_state is not None else -1
        if self.input_choice:
            # One categorical over (pair, op) per node: see the module docstring.
            self.read_out = joint_softmax
        self.add_ops = [name for name in self.op_names if name in ADD_OPS]
        self._op_index = {name: k for k, name in enumerate(self.op_names)}
        # The order in which _mixed produces op outputs ('none' produces none).
        self._term_ops = (
            *self.add_ops,
            *(op for op in ("hadamard", "add", "highway") if op in ops),
        )
        term_index = torch.tensor([self._op_index[name] for name in self._term_ops])
        self.register_buffer("_term_index", term_index, persistent=False)
        n_add = len(self.add_ops) if weight_sharing == "per_op" else min(len(self.add_ops), 1)
        self._add_width = n_add * hidden_size
        self.input_weight = uniform_parameter(input_size, hidden_size, bound=self.init_range)
        # u_t = x_t W_x + b_x: with fewer inputs than hidden units b_x gives every op that reads
        # u an affine term of its own, the biases LSTM and GRU gates have (genotype.KNOWN).
        self.input_bias = nn.Parameter(torch.zeros(hidden_size))
        self.node_weights = nn.ModuleList(self._new_node_weights() for _ in range(nodes))
        self.bn = nn.BatchNorm1d(hidden_size, affine=False) if batchnorm else None
        self.arch = nn.ParameterList(self._new_alpha(i) for i in range(1, nodes + 1))
        self.gammas = nn.ParameterDict()
        self.fixed: dict[int, Node] = {}

    def _new_node_weights(self) -> TwoInputNodeWeights:
        return TwoInputNodeWeights(
            self.hidden_size,
            len(self.add_ops),
            "highway" in self.op_names,
            self.weight_sharing,
            self.init_range,
        )

    def _new_alpha(self, i: int) -> nn.Parameter:
        """Node ``i``'s ``α``: one row of op logits, or one per input pair (``wiring: search``)."""
        if self.input_choice:
            return new_alpha(len(self._pairs(i)), len(self.op_names))
        return new_alpha(len(self.op_names))

    @property
    def nodes(self) -> int:
        return len(self.node_weights)

    def _bound_cell(self, c: Tensor) -> Tensor:
        """The carried ``c``, softly bounded: ``K tanh(c / K)`` (``cell_bound`` = K; None: as
        is). An LSTM's forget gate keeps its ``c`` from growing geometrically; a supernet's
        mixture has linear paths from ``c`` to ``c`` (``add_identity``) whose gain can exceed
        one, and without the bound the search overflows within an epoch. Within ``|c| ≲ K/3``
        the bound is nearly the identity (2 % off at ``K/3``); derived cells carry ``c`` as is."""
        if self.cell_bound is None:
            return c
        return self.cell_bound * torch.tanh(c / self.cell_bound)

    def _pairs(self, i: int) -> tuple[tuple[int, int], ...]:
        """Node ``i``'s candidate input pairs (``wiring: search``), ``c_{t-1}`` among them when
        the cell carries one."""
        return input_pairs(i, self._first)

    def input_marginals(self, i: int, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Node ``i``'s mixing weights ``p`` (pairs × ops, ``wiring: search``) as marginals:
        the op weights, and the probability that slot ``a`` (then ``b``) reads state ``j``, at
        position ``j + 1`` (state -1, ``u_t``, first), or ``j + 2`` when the cell carries
        ``c_{t-1}`` (state -2, then first). Each is divided by the node's total
        mass where it exceeds one, so a per-row softmax means what one softmax over the node
        means, and sigmoid gates (DNAL) that are mostly closed shrink the node towards zero, as
        their plain sum would, instead of dividing by a vanishing mass."""
        pairs, offset = self._pairs(i), -self._first
        mass = p.sum().clamp_min(1.0)
        rows = p.sum(-1) / mass
        first = torch.tensor([a + offset for a, _ in pairs], device=p.device)
        second = torch.tensor([b + offset for _, b in pairs], device=p.device)
        slot_a = rows.new_zeros(i + offset).index_add(0, first, rows)
        slot_b = rows.new_zeros(i + offset).index_add(0, second, rows)
        return p.sum(0) / mass, slot_a, slot_b

    def _inputs(self, i: int) -> tuple[int, int]:
        """The two states a fixed-input node reads: a pruned node's own, else the wiring's."""
        fixed = self.fixed.get(i)
        if fixed is None:
            return node_inputs(i, self.wiring)
        a, b = fixed.inputs
        return a, b

    def _sampled_node(self, i: int, choice: int) -> tuple[str, tuple[int, int]]:
        """The op and inputs of a hard sample's entry ``choice`` (a flat index into ``α``)."""
        if not self.input_choice:
            return self.op_names[choice], node_inputs(i, self.wiring)
        row, k = divmod(choice, len(self.op_names))
        return self.op_names[k], self._pairs(i)[row]

    def _node_plan(self, p: Tensor, weights: TwoInputNodeWeights) -> tuple[Tensor | None, Tensor]:
        """Once per forward: the node's merged matrix and its op weights in term order.

        ``[A_1..A_n | 0; B_1..B_n | C H]`` (``2d × (n·d + 2d)``) lets one matmul on ``[a, b]``
        serve every weighted op of the node at each step; the op weights are gathered once
        instead of being indexed at every step.
        """
        blocks = []
        if weights.add_weight is not None:
            blocks.append(weights.add_weight)
        if weights.highway_weight is not None:
            zeros = weights.highway_weight.new_zeros(self.hidden_size, 2 * self.hidden_size)
            blocks.append(torch.cat([zeros, weights.highway_weight], dim=0))
        merged = torch.cat(blocks, dim=1) if len(blocks) > 1 else (blocks[0] if blocks else None)
        return merged, p.index_select(0, self._term_index)

    def _mixed(self, plan: tuple[Tensor | None, Tensor], a: Tensor, b: Tensor) -> Tensor:
        """``Σ_k p_k o_k(a, b)`` for one node: every op's output, then one weighted reduction."""
        merged, op_weights = plan
        terms = []
        if merged is not None:
            pre = torch.cat([a, b], dim=-1) @ merged
            width = self._add_width
            chunks = (
                pre[:, :width].chunk(len(self.add_ops), dim=-1)
                if self.weight_sharing == "per_op"
                else [pre[:, :width]] * len(self.add_ops)
            )
            terms += [
                ACTIVATIONS[ADD_OPS[name]](z) for name, z in zip(self.add_ops, chunks, strict=True)
            ]
        if "hadamard" in self._op_index:
            terms.append(a * b)
        if "add" in self._op_index:
            terms.append(a + b)
        if "highway" in self._op_index:
            c, g = pre[:, self._add_width :].chunk(2, dim=-1)
            terms.append(torch.lerp(a, torch.tanh(g), torch.sigmoid(c)))
        if len(terms) == 1:
            return op_weights[0] * terms[0]
        return torch.tensordot(op_weights, torch.stack(terms), dims=1)

    def _can_fuse(self, batch: int, probs: list[Tensor]) -> bool:
        """Whether the sequence kernel runs this forward (``base.kernel_applies``); it takes
        a hard sample too, each sampled node as its op and the constant ``ONE``, and input
        choice, each mixed node reading its slots' mixtures of the states."""
        return kernel_applies(self.fused, self.bn, batch, probs, takes_sampled=True)

    def _fused_spec(self, i: int, choice: int | None = None) -> TwoInputNodeSpec:
        """Node ``i``'s inputs, terms and column blocks: mixed (every op; under input choice it
        reads its slots' mixtures, ``a`` and ``b`` None), fixed (its one op and pair) or sampled
        (op ``choice`` then ``ONE``, as ``_sampled`` computes it, and the sampled pair)."""
        residual, d = str(i) in self.gammas, self.hidden_size
        fixed = self.fixed.get(i)
        op: str | None = None
        a: int | None
        b: int | None
        if fixed is not None:
            op, (a, b) = fixed.op, self._inputs(i)
        elif choice is not None:
            op, (a, b) = self._sampled_node(i, choice)
        else:
            a, b = (None, None) if self.input_choice else node_inputs(i, self.wiring)
        if op is not None:
            terms = () if op == "none" else (op,)
            if fixed is None:  # sampled
                terms += (ONE,)
            add_columns = (0,) if op in ADD_OPS else ()
            highway = 0 if op == "highway" else None
            return TwoInputNodeSpec(a, b, terms, add_columns, highway, residual)
        per_op = self.weight_sharing == "per_op"
        add_columns = tuple(k * d if per_op else 0 for k in range(len(self.add_ops)))
        highway = self._add_width if "highway" in self._op_index else None
        return TwoInputNodeSpec(a, b, self._term_ops, add_columns, highway, residual)

    def _fused_forward(
        self, x: Tensor, h0: Tensor | None, probs: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The same function as the eager loop, by ``FusedTwoInputSequence``: masks drawn in
        the same order, the input projection and each node's merged matrix built here (autograd
        differentiates them), a fixed node as its one op at weight 1, under input choice a
        mixed node's op and slot weights from ``input_marginals`` (autograd takes them to α)."""
        batch = x.shape[1]
        mask_x = variational_mask(batch, self.input_size, self.dropout_x, x, self.training)
        mask_h = variational_mask(batch, self.hidden_size, self.dropout_h, x, self.training)
        u_all = (x if mask_x is None else x * mask_x) @ self.input_weight + self.input_bias
        h = x.new_zeros(batch, self.hidden_size) if h0 is None else h0
        sampled = sampled_scales(probs) if isinstance(probs, SampledMixing) else None
        specs, weights, op_weights = [], [], []
        slots: list[tuple[Tensor | None, Tensor | None]] = []
        for i, (p, node) in enumerate(zip(probs, self.node_weights, strict=True), start=1):
            scales = None if sampled is None else sampled[i - 1]
            choice = None if scales is None else probs.choices[i - 1]
            spec = self._fused_spec(i, choice)
            slots.append((None, None))
            if isinstance(node, FixedNodeWeights):
                weights.append(_b_only(node.weight) if node.op == "highway" else node.weight)
                op_weights.append(x.new_ones(len(spec.terms)))
            elif scales is not None:  # w[c] · op_c(a, b) + Σ_{k≠c} w[k], as ``_sampled``
                op, _ = self._sampled_node(i, choice)  # type: ignore[arg-type]
                weight = self._op_weight(node, op)
                weights.append(_b_only(weight) if op == "highway" else weight)
                # (w[c], Σ_{k≠c} w[k]) for (op, ONE); a sampled ``none`` has the constant alone
                op_weights.append(torch.stack(scales[-len(spec.terms) :]))
            else:
                if spec.chooses:  # the op marginal, and each slot's weights over states -1 … i-1
                    p, slots[-1] = self._slot_weights(i, p)
                merged, op_w = self._node_plan(p, node)
                weights.append(merged)
                op_weights.append(op_w)
            specs.append(spec)
        gammas = [self.gammas.get(str(i)) for i in range(1, self.nodes + 1)]
        slots_a, slots_b = zip(*slots, strict=True)
        plan = TwoInputPlan(tuple(specs), self.output, self.output_activation, self.bn)
        outputs = FusedTwoInputSequence.apply(
            plan, u_all, h, mask_h, *weights, *op_weights, *gammas, *slots_a, *slots_b
        )
        return outputs, outputs[-1]

    def _slot_weights(self, i: int, p: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``input_marginals`` as the kernel takes them: the op marginal and the two slots'
        weights over the states ``-1 … i−1`` (the kernel knows no carried ``c``)."""
        op_weights, slot_a, slot_b = self.input_marginals(i, p)
        if slot_a.shape[0] != i + 1:
            raise ValueError("the two-input kernel reads the states -1 … i-1 only")
        return op_weights, (slot_a, slot_b)

    def forward(
        self, x: Tensor, h0: Tensor | None = None, weights: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(outputs, h_last)`` from ``h0`` (zeros if None); a carried ``c`` starts at zero."""
        outputs, h, _ = self._sequence(x, h0, None, weights)
        return outputs, h

    def forward_with_state(
        self,
        x: Tensor,
        state: Tensor | tuple[Tensor, Tensor] | None = None,
        weights: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        """The outputs and the whole carried state: ``(h, c)`` with a ``cell_state``, else ``h``
        (a language model carries it across BPTT windows, as ``cells.TwoInputCell`` does)."""
        if self.cell_state is None:
            return self(x, state, weights=weights)
        h0, c0 = (state, None) if state is None or isinstance(state, Tensor) else state
        outputs, h, c = self._sequence(x, h0, c0, weights)
        assert c is not None
        return outputs, (h, c)

    def _sequence(
        self, x: Tensor, h0: Tensor | None, c0: Tensor | None, weights: list[Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Outputs, last ``h`` and last ``c`` (None when the cell carries none)."""
        steps, batch, _ = x.shape
        probs = self.mixing_weights() if weights is None else weights
        if self.cell_state is None and self._can_fuse(batch, probs):
            return (*self._fused_forward(x, h0, probs), None)
        sampled = sampled_scales(probs) if isinstance(probs, SampledMixing) else None
        mask_x = variational_mask(batch, self.input_size, self.dropout_x, x, self.training)
        mask_h = variational_mask(batch, self.hidden_size, self.dropout_h, x, self.training)
        u_all = (x if mask_x is None else x * mask_x) @ self.input_weight + self.input_bias
        plans: list[tuple[Tensor | None, Tensor] | None] = []
        slots: list[tuple[Tensor, Tensor] | None] = []  # input marginals, wiring 'search'
        for i, (p, node) in enumerate(zip(probs, self.node_weights, strict=True), start=1):
            if isinstance(node, FixedNodeWeights) or (sampled and sampled[i - 1] is not None):
                plans.append(None)
                slots.append(None)
            elif self.input_choice:
                op_weights, slot_a, slot_b = self.input_marginals(i, p)
                plans.append(self._node_plan(op_weights, node))
                slots.append((slot_a, slot_b))
            else:
                plans.append(self._node_plan(p, node))
                slots.append(None)
        h = x.new_zeros(batch, self.hidden_size) if h0 is None else h0
        carried = self.cell_state
        c = x.new_zeros(batch, self.hidden_size) if carried is not None and c0 is None else c0
        outputs = []
        for t in range(steps):
            u = u_all[t]
            states = {-1: u, 0: h if mask_h is None else h * mask_h}
            if c is not None:
                states[CELL_STATE] = c
            node_states: list[Tensor] = []
            for i, node in enumerate(self.node_weights, start=1):
                if isinstance(node, FixedNodeWeights):
                    a, b = (states[j] for j in self._inputs(i))
                    s = apply_two_input(node.op, node.weight, a, b)
                elif sampled is not None and sampled[i - 1] is not None:
                    op, pair = self._sampled_node(i, probs.choices[i - 1])
                    a, b = (states[j] for j in pair)
                    s = self._sampled(op, sampled[i - 1], node, a, b)
                elif self.input_choice:
                    slot = slots[i - 1]
                    stacked = torch.stack([states[j] for j in range(self._first, i)])
                    a, b = (torch.tensordot(w, stacked, dims=1) for w in slot)
                    s = self._mixed(plans[i - 1], a, b)
                else:
                    a, b = (states[j] for j in self._inputs(i))
                    s = self._mixed(plans[i - 1], a, b)
                s = self.bn(s) if self.bn is not None else s
                gamma = self.gammas.get(str(i))
                if gamma is not None:
                    s = combine_nodes(node_states, self.output) + gamma * s
                states[i] = s
                node_states.append(s)
            h = self._squash(combine_nodes(node_states, self.output))
            if carried is not None:
                c = self._bound_cell(states[carried])
            outputs.append(h)
        return torch.stack(outputs), h, c

    def _sampled(
        self,
        op: str,
        scales: tuple[Tensor, Tensor],
        node: TwoInputNodeWeights,
        a: Tensor,
        b: Tensor,
    ) -> Tensor:
        """Only the sampled op runs (with only its own weight slice), scaled by its
        straight-through weight (see ``SampledMixing``)."""
        return scales[0] * apply_two_input(op, self._op_weight(node, op), a, b) + scales[1]

    def op_cost(self, op: str) -> tuple[int, int]:
        """(parameters, FLOPs per sample and time step) ``op`` adds to a derived node.

        ``add_*``: its own ``[A; B]`` (``2d × d``), a ``4d²`` matmul and ``2d`` elementwise;
        ``highway``: ``[C, H]`` (``d × 2d``), a ``4d²`` matmul and about ``6d`` elementwise;
        ``hadamard``/``add``: ``d`` FLOPs and no parameters; ``none``: nothing.
        """
        d = self.hidden_size
        if op in ADD_OPS:
            return 2 * d * d, 4 * d * d + 2 * d
        if op == "highway":
            return 2 * d * d, 4 * d * d + 6 * d
        return (0, d) if op in ("hadamard", "add") else (0, 0)

    def _entry(self, i: int, node: Node) -> tuple[int, ...]:
        """``(op,)`` under a fixed wiring, which gives the inputs; ``(input pair, op)`` under
        ``wiring: search``, whose pairs are of distinct states."""
        k = self._op_column(node.op)
        if not self.input_choice:
            wired = node_inputs(i, self.wiring)
            if node.inputs != wired:
                raise ValueError(
                    f"node {i} reads states {list(node.inputs)}, but wiring {self.wiring!r} "
                    f"gives node {i} states {list(wired)}"
                )
            return (k,)
        pairs = self._pairs(i)
        if node.inputs not in pairs:
            raise ValueError(
                f"node {i} reads states {list(node.inputs)}; under wiring 'search' a node "
                f"reads two distinct states among {self._first}..{i - 1}"
            )
        return (pairs.index(node.inputs), k)  # type: ignore[arg-type]

    @torch.no_grad()
    def node_options(self, i: int, p: Tensor) -> list[tuple[float, Node]]:
        """Node ``i``'s discrete choices under mixing weights ``p``, best first, with scores.

        Fixed wiring: every op but ``none``, scored by its weight. ``wiring: search``: every
        (op, a, b) with ``a ≠ b``, scored by the product of the marginals (``input_marginals``)
        of the entries other than ``none`` (a derived node is never ``none``, so mass a pair
        puts on ``none`` does not choose it): the likeliest op with the likeliest pair of
        distinct inputs.
        """
        residual = str(i) in self.gammas
        ops = [k for k, name in enumerate(self.op_names) if name != "none"]
        if not self.input_choice:
            inputs = node_inputs(i, self.wiring)
            ranked = sorted(ops, key=lambda k: -float(p[k]))
            return [(float(p[k]), Node(self.op_names[k], inputs, residual)) for k in ranked]
        op_weights, slot_a, slot_b = self.input_marginals(i, p[:, ops])
        n, first = len(slot_a), self._first
        scores = op_weights[:, None, None] * slot_a[None, :, None] * slot_b[None, None, :]
        scores = scores - 2 * torch.eye(n, dtype=scores.dtype, device=scores.device)
        order = torch.argsort(scores.reshape(-1), descending=True, stable=True).tolist()
        options = []
        for flat in order:
            k, rest = divmod(flat, n**2)
            a, b = divmod(rest, n)
            if a != b:
                node = Node(self.op_names[ops[k]], (a + first, b + first), residual)
                options.append((float(scores.reshape(-1)[flat]), node))
        return options

    def _choose(self, i: int, p: Tensor) -> Node:
        """The best of ``node_options``: the strongest op other than ``none`` (and, under
        ``wiring: search``, its likeliest distinct inputs)."""
        return self.node_options(i, p)[0][1]

    def _op_weight(self, node: TwoInputNodeWeights, op: str) -> Tensor | None:
        """The slice of a mixed node's weights that belongs to one op."""
        if op == "highway":
            return node.highway_weight
        if op not in ADD_OPS:
            return None
        if self.weight_sharing == "per_node":
            return node.add_weight
        k, d = self.add_ops.index(op), self.hidden_size
        return node.add_weight[:, k * d : (k + 1) * d]

    def widen(self, widening: Widening) -> None:
        """Widen the hidden state in place, function-preserving (see ``Widening``).

        Every widened weight is a new parameter: optimizers must be rebuilt (fresh state).
        """
        w = widening
        self.input_weight = w.producer(self.input_weight, dim=1)
        self.input_bias = w.producer(self.input_bias, dim=0)
        for node in self.node_weights:
            if isinstance(node, FixedNodeWeights):
                if node.weight is not None:
                    node.weight = self._widen_matrix(w, node.weight, node.op != "highway")
                continue
            if node.add_weight is not None:
                node.add_weight = self._widen_matrix(w, node.add_weight, True)
            if node.highway_weight is not None:
                node.highway_weight = self._widen_matrix(w, node.highway_weight, False)
        for key, gamma in self.gammas.items():
            self.gammas[key] = w.producer(gamma, dim=0)
        if self.bn is not None:
            self.bn = w.batchnorm(self.bn)
        self.hidden_size = w.new
        self._add_width = self._add_width // w.old * w.new

    @staticmethod
    def _widen_matrix(w: Widening, matrix: Tensor, reads_a_and_b: bool) -> nn.Parameter:
        """``[A; B]`` (reads a and b, ``2d × k·d``) or ``[C, H]`` (reads b, ``d × 2d``)."""
        rows = w.reader(matrix, 0)
        if reads_a_and_b:
            rows = w.reader(rows, w.new)
        return w.producer(rows, blocks=matrix.shape[1] // w.old, dim=1)

    def grow(self, alpha_init: str = "random") -> list[nn.Parameter]:
        """Append node N+1 as a residual node with ``γ = 0``; return the new parameters.

        ``alpha_init``: ``random`` (``1e-3·N(0,1)``) or ``mean`` (the mean of the searched
        nodes' ``α``, so the new node starts from what the search has learnt so far).
        """
        n, ref = self.nodes + 1, self.input_weight
        node = self._new_node_weights().to(device=ref.device, dtype=ref.dtype)
        searched = [self.arch[i - 1] for i in self.mixed_nodes]
        alpha, gamma = (
            parameter_like(ref, p) for p in (self._new_alpha(n), torch.zeros(self.hidden_size))
        )
        if alpha_init == "mean" and searched:
            # Under input choice the nodes' pair rows differ: the new node starts from their
            # mean op preference, with every pair of inputs alike.
            with torch.no_grad():
                alpha.copy_(
                    torch.stack([a.reshape(-1, alpha.shape[-1]).mean(0) for a in searched]).mean(0)
                )
        self.node_weights.append(node)
        self.arch.append(alpha)
        self.gammas[str(n)] = gamma
        return [*node.parameters(), alpha, gamma]

    @torch.no_grad()
    def prune(self) -> list[int]:
        """Fix every searched node to its strongest op; return their indices.

        The node keeps that op's weights (its slice of the node's matrices) and drops the others'
        and its ``α``, which is frozen. Pruning is not function-preserving: the other ops'
        contributions vanish.
        """
        pruned = []
        for i, p in enumerate(self.mixing_weights(), start=1):
            if i in self.fixed:
                continue
            self.fix(i, self._choose(i, p))
            pruned.append(i)
        return pruned

    @torch.no_grad()
    def fix(self, i: int, node: Node) -> None:
        """Fix searched node ``i`` to ``node`` (pruning, or rebuilding a pruned cell on resume)."""
        weights = self.node_weights[i - 1]
        self.node_weights[i - 1] = FixedNodeWeights(node.op, self._op_weight(weights, node.op))
        self.fixed[i] = node
        self.arch[i - 1].requires_grad_(False).grad = None
