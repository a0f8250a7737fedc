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

Input choice (``wiring: search``): a mixed node reads, instead of two fixed states, the
mixtures ``a = Σ_j P(a = j) s_j`` and ``b = Σ_j P(b = j) s_j`` over the states ``-1 … i−1``
(``TwoInputSearchCell.input_marginals``; its slot weights are inputs of the function, like the
op weights), written at every step into a buffer of the node's own; backward, ``d a`` and
``d b`` are kept for every step, each state gets ``P(a = j) d a + P(b = j) d b`` within the step,
and the slot weights' gradients ``Σ ⟨s_j, d a⟩`` are taken once per sequence, after the loop. A
sampled or fixed node of such a cell reads its one pair, ``u`` in either slot.

When ``b`` is ``u`` (node 1 under ``chain`` wiring, every node under ``input`` wiring, a sampled
or fixed node that reads ``u`` as ``b``) the ``u M_b`` product is taken for all steps in one
matmul before the loop, and its gradients after. Weight, op-weight and slot-weight gradients are
reduced once per sequence, not once per step.
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
from morphnas.kernels import fused_ops
from morphnas.ops import ADD_OPS

# The constant term of a sampled node (GDAS's hard sample, ``base.SampledMixing``): 1 everywhere,
# weighted by the unsampled ops' ``Σ_{k≠c} w_k``, so that each gets its gradient (Σ d mixed).
ONE = "one"


@dataclass(frozen=True)
class TwoInputNodeSpec:
    """One node: the states it reads (``-1`` is ``u``, ``0`` is ``h``, ``j`` node ``j``; both
    ``None`` under input choice: the mixtures its slot weights make of the states ``-1 … i−1``),
    its terms in the order of its op weights, for each ``add_*`` term the first column of its
    block of ``pre``, the first column of the highway block (``None``: no highway) and whether it
    is residual. A sampled node's terms are its op and ``ONE``."""

    a: int | None
    b: int | None
    terms: tuple[str, ...]
    add_columns: tuple[int, ...]
    highway_column: int | None
    residual: bool

    @property
    def chooses(self) -> bool:
        """Whether the node reads mixtures of states (input choice) rather than two states."""
        return self.a is None

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


def _per_step(name: str) -> cached_property[tuple[Tensor, ...]]:
    """A cached per-time-step view of the ``(T, ...)`` buffer attribute ``name``: its
    ``unbind(0)``, taken on first read, as the loops index it by step."""
    return cached_property(lambda self: getattr(self, name).unbind(0))


class _Node:
    """One node's forward buffers over the sequence and the per-step views the loops use.

    ``pre``: ``a M_a + b M_b`` (``σ``/``tanh`` applied in place on the highway block);
    ``terms``: every term, stacked so that the mixture is one ``mm`` with the op weights;
    ``normed``: a residual node's BN output (before ``γ``); ``a_all``, ``b_all``: what the
    node reads, two states or (input choice) its own buffer of their mixtures.

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
        norm: fused_ops.SequenceNorm,
        index: int,
        seq: list[Tensor],
        slots: tuple[Tensor | None, Tensor | None],
    ) -> None:
        steps, batch, d = u.shape
        new = u.new_empty
        self.spec, self.weight, self.norm, self.index = spec, weight, norm, index
        self.hoisted = weight is not None and spec.b == -1
        self.slot_a, self.slot_b = slots
        if spec.chooses:  # written at every step by the loops
            self.inputs: Tensor | None = new(2, steps, batch, d)
            self.a_all, self.b_all = self.inputs.unbind(0)
        else:
            self.inputs = None
            self.a_all, self.b_all = seq[spec.a + 1], seq[spec.b + 1]  # type: ignore[operator]
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

    a_t = _per_step("a_all")
    b_t = _per_step("b_all")

    @cached_property
    def slots_k(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """Input choice: per state ``j`` (from ``-1``), its weights in slots ``a`` and ``b``."""
        return tuple(zip(self.slot_a.unbind(0), self.slot_b.unbind(0), strict=True))  # type: ignore[union-attr]

    pre_t = _per_step("pre")

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

    state_t = _per_step("state_all")
    normed_t = _per_step("normed")

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
    ``(len(terms),)``, per node its ``γ`` ``(d,)`` or ``None``, per node its slot weights ``a``
    ``(i + 1,)`` (input choice; else ``None``), per node those of slot ``b``. Output:
    ``(T, B, d)``, the ``h_t``.
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
        weights, op_w, gammas = per_node[:n], per_node[n : 2 * n], per_node[2 * n : 3 * n]
        slots = zip(per_node[3 * n : 4 * n], per_node[4 * n :], strict=True)
        steps, batch, d = u.shape
        hs = u.new_empty(steps + 1, batch, d)  # h_{t-1} of every step, then the last h
        h0_states = hs[:steps] if mask_h is None else u.new_empty(steps, batch, d)
        node_states = u.new_empty(n, steps, batch, d)
        seq = [u, h0_states, *node_states.unbind(0)]  # state j at seq[j + 1]
        norm = fused_ops.SequenceNorm(plan.bn, u, n)
        nodes = [
            _Node(spec, weights[i], u, node_states[i], norm, i, seq, slot)
            for i, (spec, slot) in enumerate(zip(plan.nodes, slots, strict=True))
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
        ctx.seq, ctx.hs, ctx.node_states = seq, hs, node_states  # type: ignore[attr-defined]
        ctx.save_for_backward(mask_h, *per_node)
        return hs[1:].clone()

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        fused_ops.refuse_double_backward("two-input")
        plan: TwoInputPlan = ctx.plan  # type: ignore[attr-defined]
        norm: fused_ops.SequenceNorm = ctx.norm  # type: ignore[attr-defined]
        nodes: list[_Node] = ctx.nodes  # type: ignore[attr-defined]
        seq: list[Tensor] = ctx.seq  # type: ignore[attr-defined]
        hs: Tensor = ctx.hs  # type: ignore[attr-defined]
        mask_h, *per_node = ctx.saved_tensors  # type: ignore[attr-defined]
        n = len(plan.nodes)
        op_w, gammas = per_node[n : 2 * n], per_node[2 * n : 3 * n]
        steps, batch, d = seq[0].shape
        d_u = torch.zeros_like(seq[0], memory_format=torch.contiguous_format)
        d_pre = [
            grad_out.new_empty(node.pre.shape) if node.weight is not None else None
            for node in nodes
        ]
        # Input choice: d a and d b of every step (accumulated, hence zeros), for the slot weights
        d_in = [torch.zeros_like(node.inputs) if node.spec.chooses else None for node in nodes]
        if ctx.native is not None:  # type: ignore[attr-defined]
            kernel, sequence = ctx.native, ctx.sequence  # type: ignore[attr-defined]
            d_op_w = [torch.zeros(w.shape, dtype=w.dtype) for w in op_w]  # type: ignore[union-attr]
            d_gamma = [None if g is None else torch.zeros(g.shape, dtype=g.dtype) for g in gammas]
            no_gamma = d_u.new_empty(0)
            d_gamma_in = [no_gamma if g is None else g for g in d_gamma]
            d_a_in, d_b_in = ([None if x is None else x[k] for x in d_in] for k in (0, 1))
            carry = kernel.backward(
                sequence, grad_out, d_u, d_pre, d_op_w, d_gamma_in, d_a_in, d_b_in
            )
        else:
            carry, d_op_w, d_gamma = _backward_loop(
                plan, nodes, norm, seq, hs, grad_out, mask_h, op_w, gammas, d_u, d_pre, d_in
            )
        needed = ctx.needs_input_grad[4 + 3 * n :]  # type: ignore[attr-defined]
        d_slots = _slot_gradients(seq, ctx.node_states, d_in, needed)  # type: ignore[attr-defined]
        d_weights: list[Tensor | None] = []
        for node, dp, dx in zip(nodes, d_pre, d_in, strict=True):
            if dp is None:
                d_weights.append(None)
                continue
            flat = dp.view(steps * batch, -1)
            if dx is None:
                a_seq, b_seq = (x.reshape(steps * batch, d) for x in (node.a_all, node.b_all))
            else:  # the mixtures: a buffer of the node's own, contiguous
                a_seq, b_seq = node.inputs.view(2, steps * batch, d).unbind(0)  # type: ignore[union-attr]
            d_w = torch.zeros_like(node.weight)  # the highway block of M_a stays 0: it is not read
            torch.mm(a_seq.T, flat[:, : node.a_cols], out=d_w[:d, : node.a_cols])
            torch.mm(b_seq.T, flat, out=d_w[d:])
            if node.hoisted:
                d_u.view(steps * batch, d).addmm_(flat, node.w_b.T)
            d_weights.append(d_w)
        d_slot_a, d_slot_b = zip(*d_slots, strict=True)
        return None, d_u, carry, None, *d_weights, *d_op_w, *d_gamma, *d_slot_a, *d_slot_b


def _slot_gradients(
    seq: list[Tensor],
    node_states: Tensor,
    d_in: list[Tensor | None],
    needed: tuple[bool, ...],
) -> list[tuple[Tensor | None, Tensor | None]]:
    """Per node, the gradients of its slot weights ``a`` and ``b`` (input choice; else
    ``None``): ``Σ_{t, batch} ⟨s_j, d a⟩`` for each state ``j``, over the whole sequence at once.
    ``needed``: ``needs_input_grad`` from the slot weights ``a`` on."""
    n, grads = len(d_in), []
    for i, dx in enumerate(d_in):
        if dx is None or not (needed[i] or needed[n + i]):
            grads.append((None, None))
            continue
        flat = dx.view(2, -1)  # d a; d b
        rows = [flat @ seq[0].reshape(-1), flat @ seq[1].reshape(-1)]  # u, h (each (2,))
        d_slots = torch.stack(rows)
        if i > 0:  # nodes 1 … i: one product
            d_slots = torch.cat([d_slots, node_states[:i].reshape(i, -1) @ flat.T])
        grads.append((d_slots[:, 0], d_slots[:, 1]))
    return grads


def _forward_loop(
    plan: TwoInputPlan,
    nodes: list[_Node],
    norm: fused_ops.SequenceNorm,
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
            a, b = node.a_t[t], node.b_t[t]
            if spec.chooses:  # the slots' mixtures of the states -1 … i
                (w_a, w_b), *rest = node.slots_k
                torch.mul(at[0][t], w_a, out=a)
                torch.mul(at[0][t], w_b, out=b)
                for j, (w_a, w_b) in enumerate(rest, start=1):
                    a.addcmul_(at[j][t], w_a)
                    b.addcmul_(at[j][t], w_b)
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
                    fused_ops.tanh_into(cand, cand, minus_one)
                    torch.lerp(a, cand, gate, out=terms[k])
                elif kind == ONE:
                    continue
                else:  # an add_* op's activation
                    fused_ops.activation_into(kind, node.add_t[block][t], terms[k], minus_one)
            torch.mm(rows[i], node.flat_t[t], out=node.mix_t[t])
            norm.forward(t, i, node.normed_t[t])
            if spec.residual:
                base = at[i + 1][t] if plan.output == "last" else bases[i][t].mean(0)
                torch.addcmul(base, gammas[i], node.normed_t[t], out=node.state_t[t])  # type: ignore[arg-type]
        h, last = h_t[t + 1], at[n + 1][t]
        if plan.output == "mean":
            last = torch.mean(all_t[t], 0, out=h)
        if plan.squash == "tanh":
            fused_ops.tanh_into(last, h, minus_one)
        elif plan.output == "last":
            h.copy_(last)


def _backward_loop(
    plan: TwoInputPlan,
    nodes: list[_Node],
    norm: fused_ops.SequenceNorm,
    seq: list[Tensor],
    hs: Tensor,
    grad_out: Tensor,
    mask_h: Tensor | None,
    op_w: list[Tensor | None],
    gammas: list[Tensor | None],
    d_u: Tensor,
    d_pre: list[Tensor | None],
    d_in: list[Tensor | None],
) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """The backward's time loop on the Python kernel: fills ``d_u`` (all but the hoisted
    matmuls' share), ``d_pre`` and (input choice) ``d_in``, zeros, with d a and d b; returns
    d h0 and the op weights' and ``γ``'s gradients."""
    n, (steps, batch, d) = len(nodes), seq[0].shape
    new = grad_out.new_empty
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
    d_in_t = [None if x is None else (x[0].unbind(0), x[1].unbind(0)) for x in d_in]
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
            fused_ops.tanh_backward_into(d_h, h_t[t + 1], d_h)
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
            a, b = node.a_t[t], node.b_t[t]
            if spec.chooses:
                d_a, d_b = d_in_t[i][0][t], d_in_t[i][1][t]  # type: ignore[index]
            else:
                d_a, d_b = (d_u_t[t] if j == -1 else rows[j] for j in (spec.a, spec.b))
            _terms_backward(node, t, d_mixed, w_k[i], a, b, d_a, d_b, d_blocks[i], scratch)
            if node.weight is not None:
                if node.a_cols:
                    d_a.addmm_(d_pre_a[i][t], node.w_a.T)
                if not node.hoisted:
                    d_b.addmm_(d_pre[i][t], node.w_b.T)  # type: ignore[index]
            if spec.chooses:  # each state j gets P(a = j) d a + P(b = j) d b
                for j, (w_a, w_b) in enumerate(node.slots_k):
                    target = d_u_t[t] if j == 0 else rows[j - 1]
                    target.addcmul_(d_a, w_a).addcmul_(d_b, w_b)
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
            fused_ops.tanh_backward_into(d_cand_term, cand, d_cand[t])
            fused_ops.sigmoid_backward_into(d_term * (cand - a), gate, d_gate[t])
            d_a.add_(d_term).sub_(d_cand_term)
        else:  # an add_* op: its activation's derivative at its block of pre
            value, pre, target = node.term_t[t][k], node.add_t[block][t], d_add[block][t]
            if first:
                fused_ops.activation_backward_into(kind, d_mixed, value, pre, target).mul_(w[k])
            else:
                fused_ops.activation_backward_into(kind, d_mixed, value, pre, scratch)
                target.addcmul_(scratch, w[k])


# two_input_supernet.h's Kind (an add_* op: 0)
NATIVE_KINDS = {"highway": 1, "hadamard": 2, "add": 3, ONE: 4}


def _native_sequence(
    kernel: ModuleType,
    plan: TwoInputPlan,
    nodes: list[_Node],
    norm: fused_ops.SequenceNorm,
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
    if spec.chooses:
        out.choice = True
        out.slot_a, out.slot_b = node.slot_a.contiguous(), node.slot_b.contiguous()  # type: ignore[union-attr]
        out.a_in, out.b_in = node.a_all, node.b_all
    else:
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
