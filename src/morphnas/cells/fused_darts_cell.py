"""A hand-written forward and backward for a whole sequence of a derived DARTS cell.

Why: retraining a derived cell runs thousands of sequences of it, and eagerly each time step is
about a hundred small ATen ops plus autograd's bookkeeping for every one of them. Two changes
make the kernel cheaper than that loop (docs/benchmarks.md, ``cell``):

* **Nodes that read the same state share one matmul.** The weights of all children of state
  ``j`` are concatenated as ``[C_1 … C_k | G_1 … G_k]``, so one ``mm`` gives every child's
  ``[c | g]`` (DARTS_V2: five matmuls a step, not eight).
* **One ``sigmoid`` per matmul.** Children are ordered ``sigmoid``, ``tanh``, ``relu``,
  ``identity``, so the gates and the ``sigmoid`` and ``tanh`` values are adjacent columns; a
  ``tanh`` child's ``G`` is doubled in the block (the init node's by the caller), so the
  matmul yields ``2g`` and ``tanh(g) = 2σ(2g) − 1`` is the shared ``sigmoid_`` plus one
  kernel. Doubling is exact in floating point.
* **Weight gradients are one ``mm`` per weight per sequence**, over all ``T·B`` rows at once,
  instead of autograd's one per step with only ``B`` rows.
* **What does not depend on the incoming gradient is computed once per sequence**: the local
  derivatives ``∂s_i/∂c``, ``∂s_i/∂g`` and ``∂s_i/∂s_j`` of every node and step are a few
  whole-sequence ops before the reverse walk, so a node's backward step is three elementwise
  ops and its children's matmul; no graph is recorded.

The cell (``cells.discrete.DartsRNNCell``, the specification and the fallback), per time step,
with ``m`` the ``dropout_h`` mask (or 1):

* init node: ``[c₀ | g₀] = x̂_t + (m ⊙ h) W_h``, ``s₀ = h + σ(c₀) ⊙ (tanh(g₀) − h)``;
* node ``i`` with parent ``j``: ``[c | g] = (m ⊙ s_j) W_i``,
  ``y_i = s_j + σ(c) ⊙ (f_i(g) − s_j)``; ``s_i = y_i``, or for a grown residual node
  ``s_i = base(s_1..s_{i−1}) + γ_i ⊙ y_i`` with ``base`` the output rule;
* ``h_t = squash(base(s_1..s_N))``.

A node the output does not depend on (``fused_ops.live_nodes``; only under ``output: last``) is
not computed, and its parameters get no gradient, as eagerly. Differentiable once
(``fused_ops.refuse_double_backward``); callers fall back to the eager loop under ``torch.func``
transforms.

On CPU in float32 and float64 the sequence runs on this kernel's C++ twin instead
(``native.darts_cell``, ``native/darts_cell.h``): the same inputs and formulas, one pass over the
rows per node and step.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from morphnas import native
from morphnas.genotype import Genotype
from morphnas.kernels import fused_ops


@dataclass(frozen=True)
class CellPlan:
    """A derived DARTS cell as the kernel runs it.

    ``parents[i]`` is node ``i+1``'s input state, ``acts[i]`` its activation, ``residual[i]``
    whether it is a grown residual node; ``groups`` lists, for every state with children, the
    state and its children (0-based node indices), in the column order of its weight block.
    """

    parents: tuple[int, ...]
    acts: tuple[str, ...]
    residual: tuple[bool, ...]
    output: str
    squash: str

    @classmethod
    def of(cls, genotype: Genotype) -> CellPlan:
        return cls(
            parents=tuple(node.inputs[0] for node in genotype.nodes),
            acts=tuple(node.op for node in genotype.nodes),
            residual=tuple(node.residual for node in genotype.nodes),
            output=genotype.output,
            squash=genotype.output_activation,
        )

    @cached_property  # read by the cell and the kernel at every forward
    def groups(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """Per state with live children: the state, and its live children in
        ``ACTIVATION_ORDER`` (so that children with the same activation are adjacent columns,
        one op for all of them, and those the gates' ``sigmoid_`` computes come first)."""
        kids = [i for i in range(len(self.parents)) if self.live[i]]
        return tuple(
            (j, tuple(sorted((i for i in kids if self.parents[i] == j), key=self._act)))
            for j in sorted({self.parents[i] for i in kids})
        )

    @cached_property
    def live(self) -> tuple[bool, ...]:
        """Per node whether the output depends on it (``live_nodes``)."""
        return fused_ops.live_nodes([(p,) for p in self.parents], self.residual, self.output)

    def _act(self, i: int) -> tuple[int, int]:
        return ACTIVATION_ORDER[self.acts[i]], i


ACTIVATION_ORDER = {"sigmoid": 0, "tanh": 1, "relu": 2, "identity": 3}
BY_SIGMOID = ("sigmoid", "tanh")  # the activations the gates' ``sigmoid_`` computes


def group_weight(weights: list[Tensor], acts: list[str], d: int) -> Tensor:
    """The children's ``(d, 2d)`` weights ``[C_i | G_i]`` as one ``(d, 2dk)`` block
    ``[C_1 … C_k | G_1 … G_k]``, a ``tanh`` child's ``G`` doubled (``doubled_tanh_half``);
    autograd splits the gradient back (and doubles it for those columns)."""
    values = [
        fused_ops.doubled(w[:, d:]) if act == "tanh" else w[:, d:]
        for w, act in zip(weights, acts, strict=True)
    ]
    return torch.cat([w[:, :d] for w in weights] + values, dim=1)


class _Group:
    """One parent state's children over the sequence: ``z`` holds ``[σ(c) | f(g)]`` per step
    after the forward and the backward's factors after ``to_factors``; ``dz`` their gradients
    (allocated by the backward: an evaluation pass never needs them)."""

    def __init__(
        self, parent: int, children: tuple[int, ...], acts: tuple[str, ...], like: Tensor
    ) -> None:
        steps, batch, d = like.shape
        k = len(children)
        self.parent, self.children, self.k, self.d = parent, children, k, d
        # Runs of adjacent children with one activation: (name, first column, end column).
        self.runs = []
        for name, run in itertools.groupby(range(k), key=lambda r: acts[children[r]]):
            cols = list(run)
            self.runs.append((name, (k + cols[0]) * d, (k + cols[-1] + 1) * d))
        by_sigmoid = sum(acts[i] in BY_SIGMOID for i in children)
        self.z = like.new_empty(steps, batch, 2 * d * k)
        self.z_t = self.z.unbind(0)
        self.c = [self.z[..., r * d : (r + 1) * d].unbind(0) for r in range(k)]
        self.f = [self.z[..., (k + r) * d : (k + r + 1) * d].unbind(0) for r in range(k)]
        self.sigmoid_t = self.z[..., : (k + by_sigmoid) * d].unbind(0)  # gates, σ and tanh
        self.finish = [
            (FINISH[name], self.z[..., lo:hi].unbind(0))
            for name, lo, hi in self.runs
            if name in FINISH
        ]

    def activate(self, t: int, minus_one: Tensor) -> None:
        """``[σ(c) | f(g)]`` in place at step ``t``, once its matmul has written ``[c | g]``
        (``2g`` in a ``tanh`` child's columns)."""
        self.sigmoid_t[t].sigmoid_()
        for finish, values in self.finish:
            finish(values[t], minus_one)

    def to_factors(self, parent: Tensor) -> None:
        """Turn ``z`` into the factors of the backward that do not depend on the incoming
        gradient, for the whole sequence at once, so that the children's step is one op for
        all their ``[dc | dg]`` and one per child for the parent's share.

        With ``y = s + σ(c)(f(g) − s)`` and ``s`` the parent state (``parent``, ``(T, B, d)``):
        ``∂y/∂c = (f − s) σ(1 − σ)`` replaces ``σ(c)``, ``∂y/∂g = σ f'(g)`` replaces ``f(g)``,
        and ``∂y/∂s = 1 − σ`` goes to ``keep``. In place, once: the backward needs the forward's
        values only through these factors, so later backwards (``retain_graph``) reuse them.
        """
        self.keep = fused_ops.highway_factors(self.z, parent, self.runs, self.k)
        k, d = self.k, self.d
        self.keep_t = [self.keep[..., r * d : (r + 1) * d].unbind(0) for r in range(k)]
        self.factors_t = fused_ops.pairs(self.z, k)

    def grad_buffers(self, d_states: Tensor) -> None:
        """Fresh gradient buffers ``dz`` for one backward, and the children's rows of
        ``d_states`` (``(N + 1, B, d)``, row ``i + 1`` node ``i``'s) in column order: a view
        when they are evenly spaced (always, for one child), else gathered (``index``) at
        every step into ``picked``."""
        self.dz = torch.empty_like(self.z)
        self.dz_t, self.d_pairs_t = self.dz.unbind(0), fused_ops.pairs(self.dz, self.k)
        rows = [i + 1 for i in self.children]
        stride = rows[1] - rows[0] if self.k > 1 else 1
        self.index: Tensor | None = None
        if stride > 0 and rows == list(range(rows[0], rows[-1] + 1, stride)):
            picked = d_states[rows[0] : rows[-1] + 1 : stride]
        else:
            self.index = torch.tensor(rows, device=d_states.device)
            picked = self.picked = d_states.new_empty(self.k, *d_states.shape[1:])
        self.d_children = picked.unbind(0)
        self.d_children_b = picked.transpose(0, 1).unsqueeze(1)  # (B, 1, k, d) against ``pairs``

    def backward_step(self, t: int, d_states: Tensor, d_parent: Tensor) -> None:
        """The children's ``[dc | dg]`` at step ``t`` (from their final rows of ``d_states``)
        and their share ``Σ_r d s_r ∂y_r/∂s`` of the parent's gradient (the matmul's share is
        the caller's)."""
        if self.index is not None:
            torch.index_select(d_states, 0, self.index, out=self.picked)
        torch.mul(self.d_children_b, self.factors_t[t], out=self.d_pairs_t[t])
        for d_child, keep in zip(self.d_children, self.keep_t, strict=True):
            d_parent.addcmul_(d_child, keep[t])


def _init_factors(init: Tensor, h_prev: Tensor) -> tuple[tuple[Tensor, ...], ...]:
    """The init node's factors, per step, as ``_Group.to_factors`` (in place in ``init``): the
    init node is one highway blend of ``h`` with ``tanh``. Per step ``[∂y/∂c | ∂y/∂g]`` as
    ``(B, 2, 1, d)`` and ``∂y/∂h``."""
    d = h_prev.shape[-1]
    keep = fused_ops.highway_factors(init, h_prev, [("tanh", d, 2 * d)], 1)
    return fused_ops.pairs(init, 1), keep.unbind(0)


FINISH = {"tanh": fused_ops.sigmoid_to_tanh_, "relu": lambda value, _: value.clamp_min_(0.0)}
"""What a column run needs after the gates' ``sigmoid_`` (``sigmoid``: nothing more;
``identity``: nothing at all)."""


@dataclass(frozen=True)
class _Node:
    """What one node's step needs, looked up once per sequence rather than once per step."""

    group: _Group
    column: int  # its place among its group's children
    parent: int
    gamma: Tensor | None


def _nodes(plan: CellPlan, groups: list[_Group], gammas: tuple[Tensor, ...]) -> list[_Node | None]:
    """Per node its ``_Node``, ``None`` for a dead one (``CellPlan.live``)."""
    slot = {i: (g, r) for g in groups for r, i in enumerate(g.children)}
    gamma_iter = iter(gammas)
    nodes: list[_Node | None] = []
    for i, res in enumerate(plan.residual):
        gamma = next(gamma_iter) if res else None
        nodes.append(_Node(*slot[i], plan.parents[i], gamma) if plan.live[i] else None)
    return nodes


class FusedDartsCellSequence(torch.autograd.Function):
    """``outputs = cell(x̂, h0)`` over a whole sequence; see the module docstring.

    Inputs: ``plan``; ``x_proj`` ``(T, B, 2d)``, the input half of the init projection (masked
    and multiplied outside, where autograd handles it); ``h0`` ``(B, d)``; ``w_h`` ``(d, 2d)``;
    ``mask_h`` ``(B, d)`` or ``None``; one weight block per group (``group_weight``); one ``γ``
    ``(d,)`` per residual node. ``x_proj`` and ``w_h`` come with their ``g`` half doubled
    (``doubled_tanh_half``), the blocks with their ``tanh`` columns doubled. Output:
    ``(T, B, d)``, the ``h_t``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        plan: CellPlan,
        x_proj: Tensor,
        h0: Tensor,
        w_h: Tensor,
        mask_h: Tensor | None,
        *blocks_and_gammas: Tensor,
    ) -> Tensor:
        n_groups = len(plan.groups)
        blocks, gammas = blocks_and_gammas[:n_groups], blocks_and_gammas[n_groups:]
        ctx.native = native.darts_cell() if native.handles(x_proj) else None  # type: ignore[attr-defined]
        if ctx.native is not None:  # type: ignore[attr-defined]
            # by the C++ kernel (``native.darts_cell``)
            kernel = ctx.native  # type: ignore[attr-defined]
            settings = ctx.native_plan = _native_plan(kernel, plan)  # type: ignore[attr-defined]
            output, *buffers = kernel.forward(settings, x_proj, h0, w_h, mask_h, blocks, gammas)
            ctx.buffers, ctx.n_blocks = buffers, len(blocks)  # type: ignore[attr-defined]
            ctx.save_for_backward(w_h, mask_h, *blocks, *gammas)
            return output
        steps, batch, two_d = x_proj.shape
        d, n = two_d // 2, len(plan.parents)
        states = x_proj.new_empty(steps, n + 1, batch, d)  # s_0..s_N
        masked = states if mask_h is None else torch.empty_like(states)
        # Residual nodes' op output, before γ (a placeholder when there are none).
        ys = x_proj.new_empty(steps, n if any(plan.residual) else 0, batch, d)
        hs = x_proj.new_empty(steps + 1, batch, d)  # h_{t−1} of every step, then the last h
        init = x_proj.new_empty(steps, batch, two_d)  # [σ(c₀) | tanh(g₀)]
        groups = [_Group(j, kids, plan.acts, x_proj[..., :d]) for j, kids in plan.groups]
        children_of: list[tuple[_Group, Tensor] | None] = [None] * (n + 1)
        for group, block in zip(groups, blocks, strict=True):
            children_of[group.parent] = (group, block)
        nodes = _nodes(plan, groups, gammas)
        minus_one = x_proj.new_full((), -1.0)
        state_t, masked_t, ys_t = map(fused_ops.per_step_rows, (states, masked, ys))
        h_t, xp_t, init_t = hs.unbind(0), x_proj.unbind(0), init.unbind(0)
        c0_t, g0_t = init[..., :d].unbind(0), init[..., d:].unbind(0)
        output = fused_ops.SequenceOutput(plan.squash, plan.output, states[:, 1:], hs)
        h_t[0].copy_(h0)
        for t in range(steps):
            h, row, masked_row = h_t[t], state_t[t], masked_t[t]
            torch.addmm(xp_t[t], h if mask_h is None else h * mask_h, w_h, out=init_t[t])
            init_t[t].sigmoid_()
            fused_ops.sigmoid_to_tanh_(g0_t[t], minus_one)
            torch.lerp(h, g0_t[t], c0_t[t], out=row[0])
            for j in range(n + 1):
                if j > 0:  # node j−1 computes state j
                    node = nodes[j - 1]
                    if node is None:  # dead: nothing reads it, and it reads nothing live
                        continue
                    value, gate = node.group.f[node.column][t], node.group.c[node.column][t]
                    if node.gamma is None:
                        torch.lerp(row[node.parent], value, gate, out=row[j])
                    else:
                        y = torch.lerp(row[node.parent], value, gate, out=ys_t[t][j - 1])
                        torch.addcmul(
                            fused_ops.output_rule(states[t], j - 1, plan.output),
                            node.gamma,
                            y,
                            out=row[j],
                        )
                if mask_h is not None:
                    torch.mul(row[j], mask_h, out=masked_row[j])
                children = children_of[j]
                if children is not None:  # state j is final: its children's matmul
                    group, block = children
                    torch.mm(masked_row[j], block, out=group.z_t[t])
                    group.activate(t, minus_one)
            output.step(t, minus_one)
        ctx.plan, ctx.groups, ctx.nodes = plan, groups, nodes  # type: ignore[attr-defined]
        ctx.states, ctx.masked, ctx.ys = states, masked, ys  # type: ignore[attr-defined]
        ctx.hs, ctx.init, ctx.init_factors = hs, init, None  # type: ignore[attr-defined]
        ctx.save_for_backward(w_h, mask_h, *blocks, *gammas)
        return hs[1:].clone()

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        fused_ops.refuse_double_backward("derived DARTS cell")
        if ctx.native is not None:  # type: ignore[attr-defined]
            return _native_backward(ctx, grad_out)
        plan: CellPlan = ctx.plan  # type: ignore[attr-defined]
        groups: list[_Group] = ctx.groups  # type: ignore[attr-defined]
        nodes: list[_Node] = ctx.nodes  # type: ignore[attr-defined]
        states: Tensor = ctx.states  # type: ignore[attr-defined]
        masked: Tensor = ctx.masked  # type: ignore[attr-defined]
        ys: Tensor = ctx.ys  # type: ignore[attr-defined]
        hs: Tensor = ctx.hs  # type: ignore[attr-defined]
        init: Tensor = ctx.init  # type: ignore[attr-defined]
        w_h, mask_h, *blocks = ctx.saved_tensors[: 2 + len(groups)]  # type: ignore[attr-defined]
        steps, n1, batch, d = states.shape
        n = n1 - 1
        new = grad_out.new_empty
        if ctx.init_factors is None:  # type: ignore[attr-defined]  # the first backward
            for group in groups:
                group.to_factors(states[:, group.parent])
            ctx.init_factors = _init_factors(init, hs[:steps])  # type: ignore[attr-defined]
        init_factors_t, keep0_t = ctx.init_factors  # type: ignore[attr-defined]
        d_states = new(n + 1, batch, d)
        rows = d_states.unbind(0)
        children_of: list[tuple[_Group, Tensor] | None] = [None] * (n + 1)
        for group, block in zip(groups, blocks, strict=True):
            group.grad_buffers(d_states)
            children_of[group.parent] = (group, block.T)
        d_init = new(steps, batch, 2 * d)
        d_init_t, d_init_pairs_t = d_init.unbind(0), fused_ops.pairs(d_init, 1)
        d_s0_b = d_states[0].view(batch, 1, 1, d)  # against the init node's (B, 2, 1, d) pairs
        d_res = torch.zeros_like(ys)  # d s_i of residual nodes, for γ's gradient at the end
        d_res_t = fused_ops.per_step_rows(d_res)
        d_in, d_base = new(batch, d), new(batch, d)
        h_t, out_t = hs.unbind(0), grad_out.unbind(0)
        d_h0, no_output = new(batch, d), grad_out.new_zeros(())
        d_base.copy_(out_t[steps - 1])  # d h_t: the output's gradient, plus h_{t+1}'s share
        for t in reversed(range(steps)):
            fused_ops.activation_backward_into(plan.squash, d_base, h_t[t + 1], h_t[t + 1], d_base)
            d_states.zero_()
            fused_ops.output_rule_backward(d_states, n, plan.output, d_base)
            for j in reversed(range(n + 1)):
                children = children_of[j]
                if children is not None:  # all children of state j are done: d(m ⊙ s_j)
                    group, block_t = children
                    group.backward_step(t, d_states, rows[j])
                    if mask_h is None:
                        rows[j].addmm_(group.dz_t[t], block_t)
                    else:
                        rows[j].addcmul_(torch.mm(group.dz_t[t], block_t, out=d_in), mask_h)
                if j == 0:
                    break
                node = nodes[j - 1]
                if node is not None and node.gamma is not None:
                    # row j final: its own share, then the op's
                    d_res_t[t][j - 1].copy_(rows[j])
                    fused_ops.output_rule_backward(d_states, j - 1, plan.output, rows[j])
                    rows[j].mul_(node.gamma)
            torch.mul(d_s0_b, init_factors_t[t], out=d_init_pairs_t[t])
            # d h_{t−1}, added straight to the output's gradient there (d h0 at the first step)
            before, d_prev = (out_t[t - 1], d_base) if t > 0 else (no_output, d_h0)
            torch.addcmul(before, rows[0], keep0_t[t], out=d_prev)
            if mask_h is None:
                d_prev.addmm_(d_init_t[t], w_h.T)
            else:
                d_prev.addcmul_(torch.mm(d_init_t[t], w_h.T, out=d_in), mask_h)
        flat = steps * batch
        h_in = hs[:steps] if mask_h is None else hs[:steps] * mask_h
        d_w_h = h_in.reshape(flat, d).T @ d_init.view(flat, 2 * d)
        d_blocks = [
            masked[:, g.parent].reshape(flat, d).T @ g.dz.view(flat, 2 * d * g.k) for g in groups
        ]
        d_gammas = [  # None for a dead node, as eagerly
            (ys[:, i] * d_res[:, i]).sum((0, 1)) if plan.live[i] else None
            for i, res in enumerate(plan.residual)
            if res
        ]
        return None, d_init, d_h0, d_w_h, None, *d_blocks, *d_gammas


@functools.cache
def _native_plan(kernel: ModuleType, plan: CellPlan) -> object:
    """``plan`` as the C++ kernel takes it, made once per cell (the plan is hashable)."""
    return kernel.Plan(
        list(plan.parents),
        [native.ACTIVATION_CODES[act] for act in plan.acts],
        list(plan.residual),
        list(plan.live),
        [parent for parent, _ in plan.groups],
        [list(children) for _, children in plan.groups],
        plan.output == "mean",
        plan.squash == "tanh",
    )


def _native_backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """``FusedDartsCellSequence.backward`` by the C++ kernel: ``None`` for a dead node's ``γ``."""
    w_h, mask_h, *rest = ctx.saved_tensors  # type: ignore[attr-defined]
    blocks, gammas = rest[: ctx.n_blocks], rest[ctx.n_blocks :]  # type: ignore[attr-defined]
    kernel, settings, buffers = ctx.native, ctx.native_plan, ctx.buffers  # type: ignore[attr-defined]
    d_init, d_h0, d_w_h, *d_rest = kernel.backward(
        settings, grad_out, buffers, w_h, mask_h, blocks, gammas
    )
    d_blocks, d_gammas = d_rest[: len(blocks)], d_rest[len(blocks) :]
    d_gammas = [None if dg.numel() == 0 else dg for dg in d_gammas]
    return None, d_init, d_h0, d_w_h, None, *d_blocks, *d_gammas
