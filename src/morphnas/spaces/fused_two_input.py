"""A hand-written forward and backward for a whole sequence of the two-input search cell.

Why: as for the DARTS cell (``fused_darts``), at search sizes on a CPU the eager two-input cell is
bound by the number of ATen ops autograd records and replays (a ``cat``, a matmul, a chunk, one
activation per ``add_*`` op, a ``stack`` and a reduction per node and step, and as many again
backwards), not by its FLOPs. Here the forward runs without autograd, writes into preallocated
buffers, and one ``backward`` walks the sequence in reverse with one kernel per formula; the
parts that do not depend on the recurrence leave the time loop in both directions.

The cell (spec/morphism.md §2.2), per time step; state ``-1`` is ``u_t`` (the input projection,
computed outside, where autograd handles it) and state ``0`` is ``m ⊙ h_{t−1}`` (``m`` the
``dropout_h`` mask, or 1). Node ``i`` reads states ``(a, b)`` and has one matrix
``M_i = [M_a; M_b]`` (``2d × width``) whose column blocks serve its weighted ops:

* ``pre = a M_a + b M_b``; an ``add_*`` term is ``f(pre[block])``, a highway term is
  ``a + σ(c) ⊙ (tanh(g) − a)`` with ``[c | g] = pre[block]`` (``M_a`` is zero there);
  ``hadamard`` is ``a ⊙ b`` and ``add`` is ``a + b``;
* ``mixed = Σ_k w_k term_k`` (``w`` the op weights; a fixed node is one term at weight 1);
* ``y = BN(mixed)``; ``s_i = y``, or for a grown residual node ``s_i = base + γ_i ⊙ y`` with
  ``base`` the output rule over ``s_1..s_{i−1}`` (the last one, or their mean);
* ``h_t = squash(last or mean of s_1..s_N)``.

When ``b`` is ``u`` (node 1 under ``chain`` wiring, every node under ``input`` wiring) the
``u M_b`` product is taken for all steps in one matmul before the loop, and its gradients after.
Weight and op-weight gradients are reduced once per sequence, not once per step.
Differentiable once, like ``FusedDartsSequence``: a backward with ``create_graph=True`` raises,
and the space falls back to its eager loop under ``torch.func`` transforms and inside
``fused_ops.eager_kernels``.

On CPU in float32 and float64 the two time loops run in C++ (``native.two_input_supernet``,
``native/two_input_supernet.h``) on the buffers set up here; ``_forward_loop`` and
``_backward_loop`` are the Python twins, and the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from morphnas import native
from morphnas.ops import ADD_OPS
from morphnas.spaces.fused_ops import (
    SequenceNorm,
    activation_backward_into,
    activation_into,
    refuse_double_backward,
    sigmoid_backward_into,
    tanh_backward_into,
    tanh_into,
)

# The constant term of a sampled node (GDAS's hard sample, ``base.SampledMixing``): 1 everywhere,
# weighted by the unsampled ops' ``Σ_{k≠c} w_k``, so that each gets its gradient (Σ d mixed).
ONE = "one"


@dataclass(frozen=True)
class TwoInputNodeSpec:
    """One node: the states it reads (``a ≥ 0``, its predecessor; ``b`` may be ``-1``, which is
    ``u``; ``0`` is ``h``), its terms in the order of its op weights, for each ``add_*`` term the
    first column of its block of ``pre``, the first column of the highway block (``None``: no
    highway) and whether it is residual. A sampled node's terms are its op and ``ONE``."""

    a: int
    b: int
    terms: tuple[str, ...]
    add_columns: tuple[int, ...]
    highway_column: int | None
    residual: bool

    def program(self) -> list[tuple[str, int, int, bool]]:
        """Per term: its kind (``hadamard``, ``add``, ``highway``, or an ``add_*`` op's
        activation), its index, its ``add_*`` block (else 0), and whether it is the first term
        to write that block's gradient (under ``per_node`` sharing later ones add to it)."""
        program, seen, block = [], set(), 0
        for k, name in enumerate(self.terms):
            if name not in ADD_OPS:
                program.append((name, k, 0, False))
                continue
            column = self.add_columns[block]
            program.append((ADD_OPS[name], k, block, column not in seen))
            seen.add(column)
            block += 1
        return program


@dataclass(frozen=True, eq=False)
class TwoInputPlan:
    """What the kernel needs besides tensors: nodes, output rule and squash, BatchNorm."""

    nodes: tuple[TwoInputNodeSpec, ...]
    output: str  # "last" or "mean"
    squash: str  # "tanh" or "identity"
    bn: nn.BatchNorm1d | None


class _Node:
    """One node's forward buffers over the sequence and the per-step views the loops use.

    ``pre``: ``a M_a + b M_b`` (``σ``/``tanh`` applied in place on the highway block);
    ``terms``: every term, stacked so that the mixture is one ``mm`` with the op weights;
    ``normed``: a residual node's BN output (before ``γ``).

    The per-step views (``*_t``) are made on first use: only the Python loops read them. A view
    costs about a microsecond, a sequence needs hundreds per node, and the native loops, which
    take the whole buffers, would pay for them without reading one.
    """

    def __init__(
        self,
        spec: TwoInputNodeSpec,
        weight: Tensor | None,
        u: Tensor,
        state: Tensor,
        norm: SequenceNorm,
        index: int,
    ) -> None:
        steps, batch, d = u.shape
        new = u.new_empty
        self.spec, self.weight, self.norm, self.index = spec, weight, norm, index
        self.hoisted = weight is not None and spec.b == -1
        if weight is not None:
            # Only the add_* blocks read a; the highway block (last) reads b alone.
            self.a_cols = weight.shape[1] if spec.highway_column is None else spec.highway_column
            self.w_a, self.w_b = weight[:d, : self.a_cols], weight[d:]
            if self.hoisted:  # b M_b of every step in one matmul, before the loop
                self.pre = (u.reshape(steps * batch, d) @ self.w_b).view(steps, batch, -1)
            else:
                self.pre = new(steps, batch, weight.shape[1])
        self.program = spec.program()
        self.terms = new(steps, len(spec.terms), batch, d)
        for k, name in enumerate(spec.terms):
            if name == ONE:  # written once here: neither loop writes it
                self.terms[:, k].fill_(1.0)
        self.state_all = state
        self.normed = new(steps, batch, d) if spec.residual else state

    @cached_property
    def pre_t(self) -> tuple[Tensor, ...]:
        return self.pre.unbind(0)

    @cached_property
    def pre_a_t(self) -> tuple[Tensor, ...]:
        return self.pre[..., : self.a_cols].unbind(0)

    @cached_property
    def _blocks_t(
        self,
    ) -> tuple[list[tuple[Tensor, ...]], tuple[Tensor, ...], tuple[Tensor, ...]]:
        return _blocks(self.pre, self.spec, self.terms.shape[-1])

    @property
    def add_t(self) -> list[tuple[Tensor, ...]]:
        """Per ``add_*`` term, its block of ``pre``."""
        return self._blocks_t[0]

    @property
    def gate_t(self) -> tuple[Tensor, ...]:
        """The highway's gate block of ``pre`` (empty without highway)."""
        return self._blocks_t[1]

    @property
    def cand_t(self) -> tuple[Tensor, ...]:
        """The highway's candidate block of ``pre`` (empty without highway)."""
        return self._blocks_t[2]

    @cached_property
    def term_t(self) -> list[tuple[Tensor, ...]]:
        return [row.unbind(0) for row in self.terms.unbind(0)]

    @cached_property
    def flat_t(self) -> tuple[Tensor, ...]:
        steps, n_terms, batch, d = self.terms.shape
        return self.terms.view(steps, n_terms, batch * d).unbind(0)

    @cached_property
    def state_t(self) -> tuple[Tensor, ...]:
        return self.state_all.unbind(0)

    @cached_property
    def normed_t(self) -> tuple[Tensor, ...]:
        return self.normed.unbind(0)

    @cached_property
    def mix_t(self) -> list[Tensor]:
        """The mixture's destination: BN's input, else the BN-less output itself."""
        return [
            self.norm.raw(t, self.index, normed).view(1, -1)
            for t, normed in enumerate(self.normed_t)
        ]


def _blocks(
    buffer: Tensor, spec: TwoInputNodeSpec, d: int
) -> tuple[list[tuple[Tensor, ...]], tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Per-step views of a ``(T, B, width)`` buffer laid out like ``pre``: each ``add_*``
    term's block, the highway gate block and its candidate block (empty without highway)."""
    add = [buffer[..., c : c + d].unbind(0) for c in spec.add_columns]
    c = spec.highway_column
    if c is None:
        return add, (), ()
    return add, buffer[..., c : c + d].unbind(0), buffer[..., c + d : c + 2 * d].unbind(0)


class FusedTwoInputSequence(torch.autograd.Function):
    """``outputs = cell(u, h0)`` over a whole sequence; see the module docstring.

    Inputs: ``plan``; ``u`` ``(T, B, d)``; ``h0`` ``(B, d)``; ``mask_h`` ``(B, d)`` or ``None``;
    then per node its matrix ``(2d, width)`` or ``None``, per node its op weights
    ``(len(terms),)``, per node its ``γ`` ``(d,)`` or ``None``. Output: ``(T, B, d)``, the ``h_t``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        plan: TwoInputPlan,
        u: Tensor,
        h0: Tensor,
        mask_h: Tensor | None,
        *per_node: Tensor | None,
    ) -> Tensor:
        n = len(plan.nodes)
        weights, op_w, gammas = per_node[:n], per_node[n : 2 * n], per_node[2 * n :]
        steps, batch, d = u.shape
        hs = u.new_empty(steps + 1, batch, d)  # h_{t-1} of every step, then the last h
        h0_states = hs[:steps] if mask_h is None else u.new_empty(steps, batch, d)
        node_states = u.new_empty(n, steps, batch, d)
        seq = [u, h0_states, *node_states.unbind(0)]  # state j at seq[j + 1]
        norm = SequenceNorm(plan.bn, u, n)
        nodes = [
            _Node(spec, weights[i], u, node_states[i], norm, i) for i, spec in enumerate(plan.nodes)
        ]
        hs[0].copy_(h0)
        ctx.native = native.two_input_supernet() if native.handles(u) else None  # type: ignore[attr-defined]
        if ctx.native is not None:  # type: ignore[attr-defined]
            kernel = ctx.native  # type: ignore[attr-defined]
            ctx.sequence = _native_sequence(
                kernel, plan, nodes, norm, seq, hs, mask_h, op_w, gammas
            )  # type: ignore[attr-defined]
            kernel.forward(ctx.sequence)  # type: ignore[attr-defined]
        else:
            _forward_loop(plan, nodes, norm, seq, node_states, hs, mask_h, op_w, gammas)
        counter = None if plan.bn is None or not plan.bn.training else plan.bn.num_batches_tracked
        if counter is not None:  # None also under a functional call that freezes the statistics
            counter.add_(steps * n)
        ctx.plan, ctx.norm, ctx.nodes = plan, norm, nodes  # type: ignore[attr-defined]
        ctx.seq, ctx.hs = seq, hs  # type: ignore[attr-defined]
        ctx.save_for_backward(mask_h, *per_node)
        return hs[1:].clone()

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        refuse_double_backward("two-input")
        plan: TwoInputPlan = ctx.plan  # type: ignore[attr-defined]
        norm: SequenceNorm = ctx.norm  # type: ignore[attr-defined]
        nodes: list[_Node] = ctx.nodes  # type: ignore[attr-defined]
        seq: list[Tensor] = ctx.seq  # type: ignore[attr-defined]
        hs: Tensor = ctx.hs  # type: ignore[attr-defined]
        mask_h, *per_node = ctx.saved_tensors  # type: ignore[attr-defined]
        n = len(plan.nodes)
        op_w, gammas = per_node[n : 2 * n], per_node[2 * n :]
        steps, batch, d = seq[0].shape
        d_u = torch.zeros_like(seq[0], memory_format=torch.contiguous_format)
        d_pre = [
            grad_out.new_empty(node.pre.shape) if node.weight is not None else None
            for node in nodes
        ]
        if ctx.native is not None:  # type: ignore[attr-defined]
            kernel, sequence = ctx.native, ctx.sequence  # type: ignore[attr-defined]
            d_op_w = [torch.zeros(w.shape, dtype=w.dtype) for w in op_w]  # type: ignore[union-attr]
            d_gamma = [None if g is None else torch.zeros(g.shape, dtype=g.dtype) for g in gammas]
            no_gamma = d_u.new_empty(0)
            d_gamma_in = [no_gamma if g is None else g for g in d_gamma]
            carry = kernel.backward(sequence, grad_out, d_u, d_pre, d_op_w, d_gamma_in)
        else:
            carry, d_op_w, d_gamma = _backward_loop(
                plan, nodes, norm, seq, hs, grad_out, mask_h, op_w, gammas, d_u, d_pre
            )
        d_weights: list[Tensor | None] = []
        for node, dp in zip(nodes, d_pre, strict=True):
            if dp is None:
                d_weights.append(None)
                continue
            spec, flat = node.spec, dp.view(steps * batch, -1)
            a_seq, b_seq = (seq[j + 1].reshape(steps * batch, d) for j in (spec.a, spec.b))
            d_w = torch.zeros_like(node.weight)  # the highway block of M_a stays 0: it is not read
            torch.mm(a_seq.T, flat[:, : node.a_cols], out=d_w[:d, : node.a_cols])
            torch.mm(b_seq.T, flat, out=d_w[d:])
            if node.hoisted:
                d_u.view(steps * batch, d).addmm_(flat, node.w_b.T)
            d_weights.append(d_w)
        return None, d_u, carry, None, *d_weights, *d_op_w, *d_gamma


def _forward_loop(
    plan: TwoInputPlan,
    nodes: list[_Node],
    norm: SequenceNorm,
    seq: list[Tensor],
    node_states: Tensor,
    hs: Tensor,
    mask_h: Tensor | None,
    op_w: tuple[Tensor | None, ...],
    gammas: tuple[Tensor | None, ...],
) -> None:
    """The forward's time loop on the Python kernel: the states and ``hs`` after ``hs[0]``."""
    n, steps = len(nodes), hs.shape[0] - 1
    at = [s.unbind(0) for s in seq]
    rows = [w.view(1, -1) for w in op_w]  # type: ignore[union-attr]
    bases = [node_states[: i - 1].unbind(1) if i > 1 else () for i in range(1, n + 1)]
    all_t = node_states.unbind(1)
    minus_one = hs.new_full((), -1.0)
    h_t = hs.unbind(0)
    for t in range(steps):
        if mask_h is not None:
            torch.mul(h_t[t], mask_h, out=at[1][t])
        for i, node in enumerate(nodes):
            spec = node.spec
            a, b = at[spec.a + 1][t], at[spec.b + 1][t]
            if node.weight is not None:
                if not node.hoisted:
                    torch.mm(b, node.w_b, out=node.pre_t[t])
                if node.a_cols:
                    node.pre_a_t[t].addmm_(a, node.w_a)
            terms = node.term_t[t]
            for kind, k, block, _ in node.program:
                if kind == "hadamard":
                    torch.mul(a, b, out=terms[k])
                elif kind == "add":
                    torch.add(a, b, out=terms[k])
                elif kind == "highway":
                    gate, cand = node.gate_t[t].sigmoid_(), node.cand_t[t]
                    tanh_into(cand, cand, minus_one)
                    torch.lerp(a, cand, gate, out=terms[k])
                elif kind == ONE:
                    continue
                else:  # an add_* op's activation
                    activation_into(kind, node.add_t[block][t], terms[k], minus_one)
            torch.mm(rows[i], node.flat_t[t], out=node.mix_t[t])
            norm.forward(t, i, node.normed_t[t])
            if spec.residual:
                base = at[i + 1][t] if plan.output == "last" else bases[i][t].mean(0)
                torch.addcmul(base, gammas[i], node.normed_t[t], out=node.state_t[t])  # type: ignore[arg-type]
        h, last = h_t[t + 1], at[n + 1][t]
        if plan.output == "mean":
            last = torch.mean(all_t[t], 0, out=h)
        if plan.squash == "tanh":
            tanh_into(last, h, minus_one)
        elif plan.output == "last":
            h.copy_(last)


def _backward_loop(
    plan: TwoInputPlan,
    nodes: list[_Node],
    norm: SequenceNorm,
    seq: list[Tensor],
    hs: Tensor,
    grad_out: Tensor,
    mask_h: Tensor | None,
    op_w: list[Tensor | None],
    gammas: list[Tensor | None],
    d_u: Tensor,
    d_pre: list[Tensor | None],
) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """The backward's time loop on the Python kernel: fills ``d_u`` (all but the hoisted
    matmuls' share) and ``d_pre``; returns d h0 and the op weights' and ``γ``'s gradients."""
    n, (steps, batch, d) = len(nodes), seq[0].shape
    new = grad_out.new_empty
    at = [s.unbind(0) for s in seq]
    d_u_t = d_u.unbind(0)
    d_states = new(n + 1, batch, d)  # d s_0 .. d s_N at the current step
    rows = d_states.unbind(0)
    base_rows = [d_states[1:i] for i in range(1, n + 1)]
    d_pre_a = [
        x[..., : node.a_cols].unbind(0) if x is not None else ()
        for x, node in zip(d_pre, nodes, strict=True)
    ]
    d_blocks = [
        _blocks(x, node.spec, d) if x is not None else ([], (), ())
        for x, node in zip(d_pre, nodes, strict=True)
    ]
    d_op_w = [torch.zeros_like(w).view(-1, 1) for w in op_w]  # type: ignore[arg-type]
    w_k = [w.unbind(0) for w in op_w]  # type: ignore[union-attr]
    d_gammas = {i: new(steps, d) for i, node in enumerate(nodes) if node.spec.residual}
    scratch = new(batch, d)
    d_h = new(batch, d)
    carry = grad_out.new_zeros(batch, d)
    h_t = hs.unbind(0)
    for t in reversed(range(steps)):
        torch.add(grad_out[t], carry, out=d_h)
        if plan.squash == "tanh":
            tanh_backward_into(d_h, h_t[t + 1], d_h)
        d_states.zero_()
        if plan.output == "last":
            rows[n].copy_(d_h)
        else:
            d_states[1:].copy_(d_h.div_(n).expand(n, batch, d))
        for i in reversed(range(n)):
            node, spec = nodes[i], nodes[i].spec
            d_s = rows[i + 1]
            if spec.residual:
                torch.sum(d_s * node.normed_t[t], 0, out=d_gammas[i][t])
                if plan.output == "last":
                    rows[i].add_(d_s)
                else:
                    base_rows[i].add_(d_s, alpha=1.0 / i)
                d_s = d_s * gammas[i]
            d_mixed = norm.backward(t, i, d_s)
            d_op_w[i].addmm_(node.flat_t[t], d_mixed.view(-1, 1))
            a, b = at[spec.a + 1][t], at[spec.b + 1][t]
            d_a = rows[spec.a]
            d_b = d_u_t[t] if spec.b == -1 else rows[spec.b]
            _terms_backward(node, t, d_mixed, w_k[i], a, b, d_a, d_b, d_blocks[i], scratch)
            if node.weight is not None:
                if node.a_cols:
                    d_a.addmm_(d_pre_a[i][t], node.w_a.T)
                if not node.hoisted:
                    d_b.addmm_(d_pre[i][t], node.w_b.T)  # type: ignore[index]
        carry = rows[0].clone() if mask_h is None else rows[0] * mask_h
    d_gamma = [d_gammas[i].sum(0) if i in d_gammas else None for i in range(n)]
    return carry, [g.view(-1) for g in d_op_w], d_gamma


def _terms_backward(
    node: _Node,
    t: int,
    d_mixed: Tensor,
    w: tuple[Tensor, ...],
    a: Tensor,
    b: Tensor,
    d_a: Tensor,
    d_b: Tensor,
    d_blocks: tuple[list[tuple[Tensor, ...]], tuple[Tensor, ...], tuple[Tensor, ...]],
    scratch: Tensor,
) -> None:
    """Step ``t`` of one node: ``d term_k = w_k · d mixed`` through each term into ``d a``,
    ``d b`` (accumulated) and the node's ``d pre`` blocks (written; shared blocks summed)."""
    d_add, d_gate, d_cand = d_blocks
    for kind, k, block, first in node.program:
        if kind == ONE:  # reads no state
            continue
        if kind == "hadamard":
            d_term = d_mixed * w[k]
            d_a.addcmul_(d_term, b)
            d_b.addcmul_(d_term, a)
        elif kind == "add":
            d_a.addcmul_(d_mixed, w[k])
            d_b.addcmul_(d_mixed, w[k])
        elif kind == "highway":  # a + σ(c) ⊙ (tanh(g) − a), σ(c) and tanh(g) saved in pre
            gate, cand = node.gate_t[t], node.cand_t[t]
            d_term = d_mixed * w[k]
            d_cand_term = d_term * gate
            tanh_backward_into(d_cand_term, cand, d_cand[t])
            sigmoid_backward_into(d_term * (cand - a), gate, d_gate[t])
            d_a.add_(d_term).sub_(d_cand_term)
        else:  # an add_* op: its activation's derivative at its block of pre
            value, pre, target = node.term_t[t][k], node.add_t[block][t], d_add[block][t]
            if first:
                activation_backward_into(kind, d_mixed, value, pre, target).mul_(w[k])
            else:
                activation_backward_into(kind, d_mixed, value, pre, scratch)
                target.addcmul_(scratch, w[k])


# two_input_supernet.h's Kind (an add_* op: 0)
NATIVE_KINDS = {"highway": 1, "hadamard": 2, "add": 3, ONE: 4}


def _native_sequence(
    kernel: ModuleType,
    plan: TwoInputPlan,
    nodes: list[_Node],
    norm: SequenceNorm,
    seq: list[Tensor],
    hs: Tensor,
    mask_h: Tensor | None,
    op_w: tuple[Tensor | None, ...],
    gammas: tuple[Tensor | None, ...],
) -> object:
    """The sequence's buffers and weights as the C++ loops take them (``Sequence``): the
    forward fills them, the backward reads them again."""
    sequence = kernel.Sequence()
    sequence.u, sequence.h_in, sequence.hs = seq[0].contiguous(), seq[1], hs
    sequence.mask = None if mask_h is None else mask_h.contiguous()
    sequence.output_mean, sequence.squash_tanh = plan.output == "mean", plan.squash == "tanh"
    sequence.nodes = [
        _native_node(kernel, node, w, g) for node, w, g in zip(nodes, op_w, gammas, strict=True)
    ]
    bn = plan.bn
    if bn is not None:
        sequence.bn, sequence.bn_training = True, bn.training
        sequence.running_mean, sequence.running_var = bn.running_mean, bn.running_var
        sequence.bn_pre = norm.pre_all
        if bn.training:
            sequence.bn_mean, sequence.bn_invstd = norm.mean_all, norm.invstd_all
            sequence.momentum = bn.momentum
        else:
            sequence.bn_scale = norm.scale
        sequence.eps = bn.eps
    return sequence


def _native_node(
    kernel: ModuleType, node: _Node, op_w: Tensor | None, gamma: Tensor | None
) -> object:
    """One node as the C++ loops take it (``Node``)."""
    spec, out = node.spec, kernel.Node()
    out.a, out.b = spec.a, spec.b
    program = node.program
    out.kinds = [NATIVE_KINDS.get(kind, 0) for kind, _, _, _ in program]
    out.acts = [native.ACTIVATION_CODES.get(kind, 3) for kind, _, _, _ in program]
    out.columns = [
        spec.add_columns[block] if kind in native.ACTIVATION_CODES else 0
        for kind, _, block, _ in program
    ]
    out.first = [first for _, _, _, first in program]
    out.residual = spec.residual
    out.terms, out.normed, out.state = node.terms, node.normed, node.state_all
    out.op_w, out.gamma = op_w.contiguous(), gamma
    if node.weight is not None:
        out.highway_column = -1 if spec.highway_column is None else spec.highway_column
        out.a_cols, out.hoisted = node.a_cols, node.hoisted
        out.pre, out.w_a, out.w_b = node.pre, node.w_a, node.w_b
    return out
