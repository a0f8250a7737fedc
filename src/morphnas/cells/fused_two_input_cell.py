"""A hand-written forward and backward for a whole sequence of a derived two-input cell.

Why: as for the DARTS cell (``cells.fused_darts_cell``), the eager loop is a few dozen small ATen
ops per time step plus autograd's bookkeeping for each. Here:

* **Terms on the input ``u`` are hoisted.** ``u`` does not depend on the recurrence, so every
  matmul that reads it (``u A`` or ``u B`` of an ``add_*`` node, ``u [C, H]`` of a highway) is
  one matmul over the whole sequence before the loop, and its gradients one each after it.
* **Terms on ``m ⊙ h`` share one matmul.** Every node with a term on the previous state has
  its pre-activation columns in one buffer, so one ``addmm_`` a step computes them all (the
  gated cell: one instead of three), and one its gradient.
* **Weight gradients are one ``mm`` per weight per sequence**, over all ``T·B`` rows, instead of
  autograd's one per step; the backward walks the sequence once with no graph.
* **A highway is three ops a step forward, two backward.** Its ``H`` comes doubled, so
  ``[σ(c) | tanh(g)]`` is one ``sigmoid_`` and one kernel (``2σ(2g) − 1``), and its local
  derivatives are computed once per sequence, as in the DARTS cell's kernel.

The cell (``cells.discrete.TwoInputCell``, the specification and the fallback), per time step,
with states ``u`` (input projection, ``-1``), ``m ⊙ h`` (``0``, ``m`` the ``dropout_h`` mask or
1) and the nodes, node ``i`` reading ``(a, b)``:

* ``add_*``: ``f(a A + b B)`` with ``[A; B]`` its weight; ``highway``: ``a + σ(c)(tanh(g) − a)``
  with ``[c | g] = b [C, H]``; ``hadamard``: ``a ⊙ b``; ``add``: ``a + b``;
* a grown residual node: ``base(s_1..s_{i−1}) + γ_i ⊙ op(a, b)``, ``base`` the output rule;
* ``h_t = squash(base(s_1..s_N))``.

A node the output does not depend on (``fused_ops.live_nodes``; only under ``output: last``) is
not computed, and its parameters get no gradient, as eagerly. Differentiable once
(``fused_ops.refuse_double_backward``); callers fall back to the eager loop under ``torch.func``
transforms.

On CPU in float32 and float64 the two time loops run in C++ (``native.two_input_cell``,
``native/two_input_cell.h``) on the buffers set up here; ``_forward_loop`` and ``_backward_loop``
are the Python twins, and the fallback.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from morphnas import native
from morphnas.genotype import Genotype
from morphnas.kernels import fused_ops
from morphnas.ops import ADD_OPS

U, H = 0, 1  # slots of the input projection and of the (masked) previous state


@dataclass(frozen=True)
class TwoInputCellPlan:
    """A derived two-input cell as the kernel runs it: per node its op, the slots of its two
    inputs (state ``j`` is slot ``j + 1``), and whether it is a grown residual node."""

    ops: tuple[str, ...]
    inputs: tuple[tuple[int, int], ...]
    residual: tuple[bool, ...]
    output: str
    squash: str

    @cached_property
    def live(self) -> tuple[bool, ...]:
        """Per node whether the output depends on it (``fused_ops.live_nodes``)."""
        states = [(a - 1, b - 1) for a, b in self.inputs]  # slot j is state j − 1
        return fused_ops.live_nodes(states, self.residual, self.output)

    @classmethod
    def of(cls, genotype: Genotype) -> TwoInputCellPlan:
        return cls(
            ops=tuple(node.op for node in genotype.nodes),
            inputs=tuple((node.inputs[0] + 1, node.inputs[1] + 1) for node in genotype.nodes),
            residual=tuple(node.residual for node in genotype.nodes),
            output=genotype.output,
            squash=genotype.output_activation,
        )


class _Node:
    """One node over the sequence.

    ``terms``: ``(input slot, weight rows)`` of its matmuls, of which those on ``u`` are hoisted
    out of the loop (``u_weight``), those on ``m ⊙ h`` join the cell's shared matmul
    (``h_weight``) and those on other nodes (``recurrent``) run at each step. ``z`` (set by
    ``_bind_buffers``) is the pre-activation of an ``add_*`` node, ``[σ(c) | tanh(g)]`` of a
    highway (whose matmul yields ``2g``: its ``H`` comes doubled); ``y`` is the op's output of
    a residual node, before ``γ``.
    """

    def __init__(
        self, plan: TwoInputCellPlan, i: int, weight: Tensor | None, gamma: Tensor | None, d: int
    ) -> None:
        self.op, (self.a, self.b) = plan.ops[i], plan.inputs[i]
        self.slot, self.gamma = i + 2, gamma
        if self.op in ADD_OPS:
            assert weight is not None
            self.act = ADD_OPS[self.op]
            terms = [(self.a, weight[:d]), (self.b, weight[d:])]
        elif self.op == "highway":
            assert weight is not None
            terms = [(self.b, weight)]
        else:
            terms = []
        self.terms = terms
        self.width = terms[0][1].shape[1] if terms else 0
        self.u_weight = _summed([w for slot, w in terms if slot == U])
        self.h_weight = _summed([w for slot, w in terms if slot == H])
        self.recurrent = [(slot, w) for slot, w in terms if slot not in (U, H)]

    def bind(self, z: Tensor, u_flat: Tensor) -> None:
        """Take ``z``, ``(T, B, width)``, as this node's buffer, starting as its ``u`` term."""
        self.z = z
        if self.u_weight is not None:
            z.view(u_flat.shape[0], self.width).addmm_(u_flat, self.u_weight, beta=0)
        else:
            z.zero_()

    # Per-step views, made on first use: only the Python loops read them (the native loops take
    # the whole buffers, and a view costs about a microsecond).

    @cached_property
    def z_t(self) -> tuple[Tensor, ...]:
        return self.z.unbind(0)

    @cached_property
    def gate_t(self) -> tuple[Tensor, ...]:
        """A highway's ``σ(c)`` half of ``z``."""
        return self.z[..., : self.width // 2].unbind(0)

    @cached_property
    def cand_t(self) -> tuple[Tensor, ...]:
        """A highway's ``tanh(g)`` half of ``z``."""
        return self.z[..., self.width // 2 :].unbind(0)

    @cached_property
    def y_t(self) -> tuple[Tensor, ...] | None:
        return None if self.y is None else self.y.unbind(0)


def _summed(weights: list[Tensor]) -> Tensor | None:
    """The weight of the terms on one input (``A + B`` when both read it), or ``None``."""
    return None if not weights else weights[0] if len(weights) == 1 else weights[0] + weights[1]


def _bind_buffers(nodes: list[_Node], u: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Give every node with a matmul its ``z``, and a residual node its ``y``. Nodes with a term
    on ``m ⊙ h`` get adjacent columns of one shared buffer, so that one matmul a step serves
    them all; returns that buffer ``(T, B, W)`` and its weight block ``(d, W)`` (``None`` if
    no node reads ``h``)."""
    steps, batch, d = u.shape
    u_flat = u.reshape(steps * batch, d)
    on_h = [node for node in nodes if node.h_weight is not None]
    shared = u.new_empty(steps, batch, sum(node.width for node in on_h)) if on_h else None
    start = 0
    for node in nodes:
        node.y = u.new_empty(steps, batch, d) if node.gamma is not None else None
        if node.h_weight is not None:
            assert shared is not None
            node.columns = (start, start + node.width)
            node.bind(shared[..., start : start + node.width], u_flat)
            start += node.width
        elif node.terms:
            node.bind(u.new_empty(steps, batch, node.width), u_flat)
    block = torch.cat([node.h_weight for node in on_h], 1) if on_h else None  # type: ignore[misc]
    return shared, block


class FusedTwoInputCellSequence(torch.autograd.Function):
    """``outputs = cell(u, h0)`` over a whole sequence; see the module docstring.

    Inputs: ``plan``; ``u`` ``(T, B, d)``, the input projection (masked and multiplied outside,
    where autograd handles it); ``h0`` ``(B, d)``; ``mask_h`` ``(B, d)`` or ``None``; per node
    its weight or ``None``, a highway's as ``doubled_tanh_half`` gives it; per residual node its
    ``γ`` ``(d,)``. Output: ``(T, B, d)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        plan: TwoInputCellPlan,
        u: Tensor,
        h0: Tensor,
        mask_h: Tensor | None,
        *weights_and_gammas: Tensor | None,
    ) -> Tensor:
        n = len(plan.ops)
        weights, gammas = weights_and_gammas[:n], iter(weights_and_gammas[n:])
        node_gammas = [next(gammas) if residual else None for residual in plan.residual]
        steps, batch, d = u.shape
        states = u.new_empty(steps, n + 2, batch, d)  # (u), m ⊙ h, s_1..s_N
        hs = u.new_empty(steps + 1, batch, d)  # h_{t−1} of every step, then the last h
        nodes = [  # None for a dead node: not computed, no gradient (as eagerly: None)
            _Node(plan, i, w, g, d) if plan.live[i] else None
            for i, (w, g) in enumerate(zip(weights, node_gammas, strict=True))
        ]
        live = [node for node in nodes if node is not None]
        shared, block = _bind_buffers(live, u)
        seq = _slot_sequences(u, states, hs, mask_h)
        hs[0].copy_(h0)
        ctx.native = native.two_input_cell() if native.handles(u) else None  # type: ignore[attr-defined]
        if ctx.native is not None:  # type: ignore[attr-defined]
            kernel = ctx.native  # type: ignore[attr-defined]
            ctx.native_plan = _native_plan(kernel, plan)  # type: ignore[attr-defined]
            ctx.buffers = _native_buffers(kernel, nodes, u, states, hs, mask_h, shared, block)  # type: ignore[attr-defined]
            kernel.forward(ctx.native_plan, ctx.buffers)  # type: ignore[attr-defined]
        else:
            _forward_loop(plan, live, states, seq, hs, mask_h, shared, block)
        ctx.plan, ctx.nodes, ctx.shared = plan, nodes, shared  # type: ignore[attr-defined]
        ctx.seq, ctx.hs, ctx.factors = seq, hs, False  # type: ignore[attr-defined]
        # The nodes hold the weights and γ; saving them too makes autograd refuse a backward
        # after they were changed in place.
        ctx.save_for_backward(mask_h, block, *weights_and_gammas)
        return hs[1:].clone()

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        fused_ops.refuse_double_backward("derived two-input cell")
        plan: TwoInputCellPlan = ctx.plan  # type: ignore[attr-defined]
        nodes: list[_Node | None] = ctx.nodes  # type: ignore[attr-defined]
        shared: Tensor | None = ctx.shared  # type: ignore[attr-defined]
        seq: list[Tensor] = ctx.seq  # type: ignore[attr-defined]
        # (reading the saved tensors is autograd's check that none changed in place since)
        mask_h, block = ctx.saved_tensors[:2]  # type: ignore[attr-defined]
        steps, batch, d = seq[U].shape
        d_u = grad_out.new_empty(steps, batch, d)
        d_shared = torch.empty_like(shared) if shared is not None else None
        dz = [  # d pre of add_*, d [c | g] of highway (views into d_shared for nodes on h)
            None
            if node is None or not node.terms
            else d_shared[..., slice(*node.columns)]  # type: ignore[index]
            if node.h_weight is not None
            else torch.empty_like(node.z)
            for node in nodes
        ]
        d_res = [
            torch.empty_like(node.y) if node and node.y is not None else None for node in nodes
        ]
        if ctx.native is not None:  # type: ignore[attr-defined]
            kernel, settings = ctx.native, (ctx.native_plan, ctx.buffers)  # type: ignore[attr-defined]
            d_h0 = kernel.backward(*settings, grad_out, d_u, dz, d_res, d_shared)
        else:
            d_h0 = _backward_loop(ctx, grad_out, mask_h, block, d_u, dz, d_res, d_shared)
        flat = steps * batch
        d_block = (
            seq[H].reshape(flat, d).T @ d_shared.view(flat, -1) if d_shared is not None else None
        )
        d_weights = []
        for node, d_pre in zip(nodes, dz, strict=True):
            if node is None or d_pre is None:
                d_weights.append(None)
                continue
            d_pre2d = d_pre.view(flat, node.width)
            parts = [
                d_block[:, slice(*node.columns)]  # type: ignore[index]
                if slot == H
                else seq[slot].reshape(flat, d).T @ d_pre2d
                for slot, _ in node.terms
            ]
            d_weights.append(torch.cat(parts, 0) if node.op in ADD_OPS else parts[0])
            if node.u_weight is not None:
                d_u.view(flat, d).addmm_(d_pre2d, node.u_weight.T)
        d_gammas = [
            (node.y * d_r).sum((0, 1)) if node is not None else None  # type: ignore[operator]
            for node, d_r, residual in zip(nodes, d_res, plan.residual, strict=True)
            if residual
        ]
        return None, d_u, d_h0, None, *d_weights, *d_gammas


def _forward_loop(
    plan: TwoInputCellPlan,
    live: list[_Node],
    states: Tensor,
    seq: list[Tensor],
    hs: Tensor,
    mask_h: Tensor | None,
    shared: Tensor | None,
    block: Tensor | None,
) -> None:
    """The forward's time loop on the Python kernel: the states and ``hs`` after ``hs[0]``."""
    steps = hs.shape[0] - 1
    shared_t = shared.unbind(0) if shared is not None else None
    minus_one = hs.new_full((), -1.0)
    rows, h_t = fused_ops.per_step_rows(seq), hs.unbind(0)
    output = fused_ops.SequenceOutput(plan.squash, plan.output, states[:, 2:], hs)
    for t in range(steps):
        row = rows[t]
        if mask_h is not None:  # (without a mask, slot H is h itself)
            torch.mul(h_t[t], mask_h, out=row[H])
        if shared_t is not None:
            shared_t[t].addmm_(row[H], block)
        for node in live:
            out = row[node.slot] if node.y_t is None else node.y_t[t]
            _op_forward(node, row, t, out, minus_one)
            if node.gamma is not None:
                base = fused_ops.output_rule(states[t, 1:], node.slot - 2, plan.output)
                torch.addcmul(base, node.gamma, out, out=row[node.slot])
        output.step(t, minus_one)


def _backward_loop(
    ctx: FunctionCtx,
    grad_out: Tensor,
    mask_h: Tensor | None,
    block: Tensor | None,
    d_u: Tensor,
    dz: list[Tensor | None],
    d_res: list[Tensor | None],
    d_shared: Tensor | None,
) -> Tensor:
    """The backward's time loop on the Python kernel: fills ``d_u`` (but for the hoisted
    matmuls' share), ``dz`` and ``d_res``; returns d h0."""
    plan: TwoInputCellPlan = ctx.plan  # type: ignore[attr-defined]
    nodes: list[_Node | None] = ctx.nodes  # type: ignore[attr-defined]
    seq: list[Tensor] = ctx.seq  # type: ignore[attr-defined]
    hs: Tensor = ctx.hs  # type: ignore[attr-defined]
    n, (steps, batch, d) = len(seq) - 2, seq[U].shape
    live = [(i, node) for i, node in enumerate(nodes) if node is not None]
    new = grad_out.new_empty
    d_u_t = d_u.unbind(0)
    if not ctx.factors:  # type: ignore[attr-defined]  # the first backward
        for _, node in live:
            if node.op == "highway":  # in place: later backwards (retain_graph) reuse them
                node.keep_t = fused_ops.highway_factors(
                    node.z, seq[node.a], [("tanh", d, 2 * d)], 1
                ).unbind(0)
                node.factors_t = fused_ops.pairs(node.z, 1)
        ctx.factors = True  # type: ignore[attr-defined]
    dz_t = [buf.unbind(0) if buf is not None else None for buf in dz]
    d_pairs_t = [
        fused_ops.pairs(buf, 1) if buf is not None and node.op == "highway" else None  # type: ignore[union-attr]
        for node, buf in zip(nodes, dz, strict=True)
    ]
    d_states = new(n + 2, batch, d)
    d_rows, d_rows_b = d_states.unbind(0), d_states.view(n + 2, batch, 1, 1, d).unbind(0)
    d_node_states = d_states[1:]  # index 0 is m ⊙ h, the nodes from 1: the output rule's view
    rows, h_t, out_t = fused_ops.per_step_rows(seq), hs.unbind(0), grad_out.unbind(0)
    recurrent_t = [[(slot, w.T) for slot, w in node.recurrent] if node else [] for node in nodes]
    d_out, d_y = new(batch, d), new(batch, d)
    d_y_b = d_y.view(batch, 1, 1, d)
    d_shared_t = d_shared.unbind(0) if d_shared is not None else None
    block_t = block.T if block is not None else None
    d_out.copy_(out_t[steps - 1])  # d h_t: the output's gradient, plus h_{t+1}'s share
    for t in reversed(range(steps)):
        row = rows[t]
        fused_ops.activation_backward_into(plan.squash, d_out, h_t[t + 1], h_t[t + 1], d_out)
        d_states.zero_()
        fused_ops.output_rule_backward(d_node_states, n, plan.output, d_out)
        for i, node in reversed(live):
            d_s, d_s_b = d_rows[node.slot], d_rows_b[node.slot]
            if node.gamma is not None:
                d_res[i][t].copy_(d_s)  # type: ignore[index]
                fused_ops.output_rule_backward(d_node_states, i, plan.output, d_s)
                d_s, d_s_b = torch.mul(d_s, node.gamma, out=d_y), d_y_b
            if node.op == "highway":  # [dc | dg] in one op, from the factors
                torch.mul(d_s_b, node.factors_t[t], out=d_pairs_t[i][t])  # type: ignore[index]
                d_rows[node.a].addcmul_(d_s, node.keep_t[t])
            else:
                _op_backward(node, row, d_rows, d_s, t, dz_t[i])
            for slot, w_t in recurrent_t[i]:
                d_rows[slot].addmm_(dz_t[i][t], w_t)  # type: ignore[index]
        if d_shared_t is not None:
            d_rows[H].addmm_(d_shared_t[t], block_t)
        d_u_t[t].copy_(d_rows[U])
        if t > 0:  # d h_{t−1}, added straight to the output's gradient there
            if mask_h is None:
                torch.add(out_t[t - 1], d_rows[H], out=d_out)
            else:
                torch.addcmul(out_t[t - 1], d_rows[H], mask_h, out=d_out)
    return d_rows[H].clone() if mask_h is None else d_rows[H] * mask_h


def _slot_sequences(u: Tensor, states: Tensor, hs: Tensor, mask_h: Tensor | None) -> list[Tensor]:
    """Each slot's ``(T, B, d)`` sequence, ``states[:, j]`` except where the tensor exists
    already: ``u`` itself, and without a mask ``h_{t−1}`` itself (``hs``) for ``m ⊙ h`` (a copy
    a step saved)."""
    seq = list(states.unbind(1))
    seq[U] = u
    if mask_h is None:
        seq[H] = hs[:-1]
    return seq


def _op_forward(
    node: _Node, row: tuple[Tensor, ...], t: int, out: Tensor, minus_one: Tensor
) -> None:
    """Node ``node``'s op at step ``t`` into ``out`` (its ``z`` holds its matmuls on ``u`` and
    ``m ⊙ h`` already)."""
    a, b, op = row[node.a], row[node.b], node.op
    if node.terms:
        z = node.z_t[t]
        for slot, w in node.recurrent:
            z.addmm_(row[slot], w)
        if op == "highway":  # [c | 2g] → [σ(c) | σ(2g)] → [σ(c) | tanh(g)]
            z.sigmoid_()
            fused_ops.sigmoid_to_tanh_(node.cand_t[t], minus_one)
            torch.lerp(a, node.cand_t[t], node.gate_t[t], out=out)
        else:  # z keeps the pre-activation (relu's backward reads its sign)
            fused_ops.activation_into(node.act, z, out, minus_one)
    elif op == "hadamard":
        torch.mul(a, b, out=out)
    elif op == "add":
        torch.add(a, b, out=out)
    else:
        raise KeyError(op)


def _op_backward(
    node: _Node,
    row: tuple[Tensor, ...],
    d_rows: tuple[Tensor, ...],
    d_s: Tensor,
    t: int,
    dz_t: tuple[Tensor, ...] | None,
) -> None:
    """Add the gradient of node ``node``'s op at step ``t`` (not a highway's: the caller's,
    from its factors) into its inputs' rows of ``d_rows``, all but its matmuls', which the
    caller adds from ``dz_t``."""
    op = node.op
    if op in ADD_OPS:
        assert dz_t is not None
        value = row[node.slot] if node.y_t is None else node.y_t[t]
        fused_ops.activation_backward_into(node.act, d_s, value, node.z_t[t], dz_t[t])
    elif op == "hadamard":
        d_rows[node.a].addcmul_(d_s, row[node.b])
        d_rows[node.b].addcmul_(d_s, row[node.a])
    elif op == "add":
        d_rows[node.a].add_(d_s)
        d_rows[node.b].add_(d_s)
    else:
        raise KeyError(op)


NATIVE_OPS = {"highway": 1, "hadamard": 2, "add": 3}  # two_input_cell.h's Op; add_*: 0


@functools.cache
def _native_plan(kernel: ModuleType, plan: TwoInputCellPlan) -> object:
    """``plan`` as the C++ kernel takes it, made once per cell (the plan is hashable)."""
    return kernel.Plan(
        [NATIVE_OPS.get(op, 0) for op in plan.ops],
        [native.ACTIVATION_CODES[ADD_OPS.get(op, "identity")] for op in plan.ops],
        [a for a, _ in plan.inputs],
        [b for _, b in plan.inputs],
        list(plan.residual),
        list(plan.live),
        plan.output == "mean",
        plan.squash == "tanh",
    )


def _native_buffers(
    kernel: ModuleType,
    nodes: list[_Node | None],
    u: Tensor,
    states: Tensor,
    hs: Tensor,
    mask_h: Tensor | None,
    shared: Tensor | None,
    block: Tensor | None,
) -> object:
    """The sequence's buffers and weights as the C++ loops take them (``Buffers``): the forward
    fills them, the backward reads them again."""
    return kernel.Buffers(
        u.contiguous(),  # (a view's rows are read by pointer)
        states,
        hs,
        None if mask_h is None else mask_h.contiguous(),
        shared,
        block,
        [node.z if node is not None and node.terms else None for node in nodes],
        [node.y if node is not None else None for node in nodes],
        [node.gamma if node is not None else None for node in nodes],
        [[slot for slot, _ in node.recurrent] if node else [] for node in nodes],
        [[w for _, w in node.recurrent] if node else [] for node in nodes],
    )
