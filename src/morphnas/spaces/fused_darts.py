"""A hand-written forward and backward for a whole sequence of the DARTS search cell.

Why: at the sizes a search runs at on a CPU, the eager cell is bound by the *number* of ATen ops
(about 1,900 per time step with autograd's bookkeeping, ~5 µs each), not by its FLOPs
(docs/benchmarks.md). Here the forward runs without autograd recording, writes every state into
preallocated buffers (no ``stack``/``cat``), and one ``backward`` walks the sequence in reverse
with one kernel per formula (``tanh_backward``, ``native_batch_norm_backward``, one ``bmm`` for
each reduction over the activations): about a fifth of the ops, and no graph.

The cell (spec/morphism.md §2.1), per time step, with ``m`` the ``dropout_h`` mask (or 1):

* init node: ``[c₀ | g₀] = x̂_t + (m ⊙ h) W_h``, ``s₀ = BN(h + σ(c₀) ⊙ (tanh(g₀) − h))``;
* node ``i`` over its predecessors ``j`` (all of ``0..i−1`` when mixed, the chosen one when
  fixed or sampled; a sampled ``none`` has no activation), with activation weights ``w_jk`` and
  ``W_j = Σ_k w_jk``:
  ``[c | g]_j = (m ⊙ s_j) W_i``, ``F_j = Σ_k w_jk f_k(g_j)``,
  ``r_i = Σ_j W_j s_j + σ(c_j) ⊙ (F_j − W_j s_j)``, ``y_i = BN(r_i)``;
  ``s_i = y_i``, or for a grown residual node ``s_i = mean(s_1..s_{i−1}) + γ_i ⊙ y_i``;
* ``h_t = mean(s_1..s_N)``.

BatchNorm (no affine) is ``aten.native_batch_norm``, the kernel ``nn.BatchNorm1d`` itself calls,
on the module's own running buffers, so running statistics follow the same updates in the same
order (the C++ twin writes the same formulas out, ``common.h``'s ``RowNorm``). Differentiable
once: a backward with ``create_graph=True`` raises (rather than return gradients missing the
kernel's part), so second-order methods use the eager path
(``fused=False``), which ``DartsRNNSearchCell`` also picks by itself under ``torch.func`` and
inside ``fused_ops.eager_kernels``.

On CPU in float32/float64 the sequence goes to this kernel's C++ twin (``morphnas.native``,
``native/darts_supernet.h``: the same formulas, one loop per node and step, about twice as fast);
this module's Python kernel runs where that one does not (CUDA, other dtypes, no compiler,
``MORPHNAS_NATIVE=off``), and every test runs on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from morphnas import native
from morphnas.kernels import fused_ops


@dataclass(frozen=True)
class NodeSpec:
    """One node: its predecessors ``start..stop−1`` (state 0 is the init node), the activations
    blended on each edge (columns of its activation weights) and whether it is residual."""

    start: int
    stop: int
    acts: tuple[str, ...]
    residual: bool

    @property
    def edges(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, eq=False)
class Plan:
    """What the kernel needs besides tensors: the nodes and the BatchNorm (``None``: none)."""

    nodes: tuple[NodeSpec, ...]
    bn: nn.BatchNorm1d | None


class _Node:
    """One node's buffers over the sequence and their per-step views.

    ``z``: ``[σ(c) | g]`` per edge; ``acts``: ``f_k(g)`` per edge and activation; ``blend``:
    ``F − W s`` per edge; ``normed``: the BN output of a residual node (before ``γ``).
    """

    def __init__(self, spec: NodeSpec, i: int, states: Tensor, masked: Tensor) -> None:
        steps, _, batch, d = states.shape
        m, n_acts = spec.edges, len(spec.acts)
        self.spec, self.index, self.m, self.n_acts = spec, i, m, n_acts
        new = states.new_empty
        self.z = new(steps, m, batch, 2 * d)
        self.acts = new(steps, m, n_acts, batch, d)
        self.blend = new(steps, m, batch, d).unbind(0)
        self.z2d = self.z.view(steps, m * batch, 2 * d).unbind(0)
        self.c, self.g = self.z[..., :d].unbind(0), self.z[..., d:].unbind(0)
        self.act_k = [self.acts[:, :, k].unbind(0) for k in range(n_acts)]
        self.acts3 = self.acts.view(steps, m, n_acts, batch * d).unbind(0)
        self.inputs = masked[:, spec.start : spec.stop].reshape(steps, m * batch, d).unbind(0)
        self.prev = states[:, spec.start : spec.stop].unbind(0)
        self.state = states[:, i + 1].unbind(0)
        self.masked = masked[:, i + 1].unbind(0)
        self.base = states[:, 1 : i + 1].unbind(0)
        self.normed = new(steps, batch, d).unbind(0) if spec.residual else self.state
        self.mixed = new(m, 1, batch * d)
        self.mixed3 = self.mixed.view(m, batch, d)


@dataclass(frozen=True, eq=False)
class _EagerState:
    """What the eager forward keeps for its backward besides the saved tensors: the plan, the
    BatchNorm state, the per-node buffers and the whole-sequence states, ``h`` and init node
    pre-activations. One typed object on ``ctx`` rather than six untyped attributes."""

    plan: Plan
    norm: fused_ops.SequenceNorm
    nodes: list[_Node]
    states: Tensor
    hs: Tensor
    init: Tensor


class FusedDartsSequence(torch.autograd.Function):
    """``outputs = cell(x̂, h0)`` over a whole sequence; see the module docstring.

    Inputs: ``plan``; ``x_proj`` ``(T, B, 2d)``, the input half of the init projection (already
    masked and multiplied, outside, where autograd handles it); ``h0`` ``(B, d)``; ``w_h``
    ``(d, 2d)``; ``mask_h`` ``(B, d)`` or ``None``; then per node its weight ``(d, 2d)``, per node
    its activation weights ``(edges, len(acts))``, per node its ``γ`` ``(d,)`` or ``None``.
    Output: ``(T, B, d)``, the ``h_t``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        plan: Plan,
        x_proj: Tensor,
        h0: Tensor,
        w_h: Tensor,
        mask_h: Tensor | None,
        *per_node: Tensor | None,
    ) -> Tensor:
        kernel = _native_kernel(plan, x_proj)
        ctx.native = kernel  # type: ignore[attr-defined]
        if kernel is not None:
            return _native_forward(ctx, kernel, plan, x_proj, h0, w_h, mask_h, per_node)
        n = len(plan.nodes)
        weights, act_w, gammas = per_node[:n], per_node[n : 2 * n], per_node[2 * n :]
        steps, batch, two_d = x_proj.shape
        d = two_d // 2
        states = x_proj.new_empty(steps, n + 1, batch, d)  # s_0..s_N (after BN and residual)
        masked = states if mask_h is None else torch.empty_like(states)
        hs = x_proj.new_empty(steps + 1, batch, d)  # h_{t-1} of every step, then the last h
        init = x_proj.new_empty(steps, batch, two_d)  # [σ(c₀) | tanh(g₀)]
        norm = fused_ops.SequenceNorm(plan.bn, x_proj[..., :d], n + 1)
        nodes = [_Node(spec, i, states, masked) for i, spec in enumerate(plan.nodes)]
        minus_one = x_proj.new_full((), -1.0)
        edge_sums = [w.sum(1).view(-1, 1, 1) for w in act_w if w is not None]
        mix_w = [w.unsqueeze(1) for w in act_w if w is not None]
        h_t, xp_t, init_t = hs.unbind(0), x_proj.unbind(0), init.unbind(0)
        c0_t, g0_t = init[..., :d].unbind(0), init[..., d:].unbind(0)
        s0_t, ms0_t, tail_t = (
            states[:, 0].unbind(0),
            masked[:, 0].unbind(0),
            states[:, 1:].unbind(0),
        )
        h_t[0].copy_(h0)
        for t in range(steps):
            h = h_t[t]
            torch.addmm(xp_t[t], h if mask_h is None else h * mask_h, w_h, out=init_t[t])
            c0_t[t].sigmoid_()
            fused_ops.tanh_into(g0_t[t], g0_t[t], minus_one)
            torch.lerp(h, g0_t[t], c0_t[t], out=norm.raw(t, 0, s0_t[t]))
            norm.forward(t, 0, s0_t[t])
            if mask_h is not None:
                torch.mul(s0_t[t], mask_h, out=ms0_t[t])
            for i, node in enumerate(nodes):
                torch.mm(node.inputs[t], weights[i], out=node.z2d[t])  # type: ignore[arg-type]
                node.c[t].sigmoid_()
                for k, name in enumerate(node.spec.acts):
                    fused_ops.activation_into(name, node.g[t], node.act_k[k][t], minus_one)
                torch.bmm(mix_w[i], node.acts3[t], out=node.mixed)
                carried = node.prev[t] * edge_sums[i]
                torch.sub(node.mixed3, carried, out=node.blend[t])
                raw = norm.raw(t, i + 1, node.normed[t])
                torch.sum(carried.addcmul_(node.c[t], node.blend[t]), 0, out=raw)
                norm.forward(t, i + 1, node.normed[t])
                if node.spec.residual:
                    base = node.base[t].mean(0)
                    torch.addcmul(base, gammas[i], node.normed[t], out=node.state[t])  # type: ignore[arg-type]
                if mask_h is not None:
                    torch.mul(node.state[t], mask_h, out=node.masked[t])
            torch.mean(tail_t[t], 0, out=h_t[t + 1])
        _count_batches(plan, steps)
        ctx.eager = _EagerState(plan, norm, nodes, states, hs, init)  # type: ignore[attr-defined]
        ctx.save_for_backward(w_h, mask_h, *per_node)
        return hs[1:].clone()

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        fused_ops.refuse_double_backward("DARTS")
        if ctx.native is not None:  # type: ignore[attr-defined]
            return _native_backward(ctx, grad_out)
        saved: _EagerState = ctx.eager  # type: ignore[attr-defined]
        plan, norm, nodes = saved.plan, saved.norm, saved.nodes
        states, hs, init = saved.states, saved.hs, saved.init
        w_h, mask_h, *per_node = ctx.saved_tensors  # type: ignore[attr-defined]
        n = len(plan.nodes)
        weights, act_w, gammas = per_node[:n], per_node[n : 2 * n], per_node[2 * n :]
        steps, _, batch, d = states.shape
        new = grad_out.new_empty
        edge_sums = [w.sum(1).view(-1, 1, 1) for w in act_w]
        mix_w = [w.unsqueeze(1) for w in act_w]
        weights_t = [w.T for w in weights]
        d_init = new(steps, batch, 2 * d)
        d_init_t, d_c0_t, d_g0_t = (
            d_init.unbind(0),
            d_init[..., :d].unbind(0),
            d_init[..., d:].unbind(0),
        )
        d_weights = [torch.zeros_like(w) for w in weights]
        d_mixed = [new(steps, node.m, batch, d) for node in nodes]  # dF, for the arch gradient
        d_carried = [new(steps, node.m, batch, d) for node in nodes]  # d(W s)
        d_mixed_t = [buf.unbind(0) for buf in d_mixed]
        d_carried_t = [buf.unbind(0) for buf in d_carried]
        d_gammas = {i: new(steps, d) for i, node in enumerate(nodes) if node.spec.residual}
        d_gammas_t = {i: buf.unbind(0) for i, buf in d_gammas.items()}
        d_states = new(n + 1, batch, d)
        rows = d_states.unbind(0)
        grad_scaled = (grad_out / n).unbind(0)
        carry = grad_out.new_zeros(batch, d)
        scratch = [_Scratch(node, d_states) for node in nodes]
        c0_t, g0_t, h_t = init[..., :d].unbind(0), init[..., d:].unbind(0), hs.unbind(0)
        for t in reversed(range(steps)):
            torch.add(grad_scaled[t], carry, alpha=1.0 / n, out=rows[1])
            d_states[2:].copy_(rows[1].expand(n - 1, batch, d))
            rows[0].zero_()
            for i in reversed(range(n)):
                node, work = nodes[i], scratch[i]
                d_state = rows[i + 1]
                if node.spec.residual:
                    torch.sum(d_state * node.normed[t], 0, out=d_gammas_t[i][t])
                    if i > 0:
                        work.d_base.add_(d_state, alpha=1.0 / i)
                    d_state = d_state * gammas[i]
                d_raw = norm.backward(t, i + 1, d_state)
                d_f = torch.mul(node.c[t], d_raw, out=d_mixed_t[i][t])
                fused_ops.sigmoid_backward_into(node.blend[t] * d_raw, node.c[t], work.dzc)
                for k, name in enumerate(node.spec.acts):
                    fused_ops.activation_backward_into(
                        name, d_f, node.act_k[k][t], node.g[t], work.da_k[k]
                    )
                torch.bmm(mix_w[i], work.da3, out=work.dg)
                work.dzg.copy_(work.dg3)
                d_c = torch.sub(d_raw, d_f, out=d_carried_t[i][t])
                work.d_prev.addcmul_(d_c, edge_sums[i])
                d_weights[i].addmm_(node.inputs[t].T, work.dz2d)
                torch.mm(work.dz2d, weights_t[i], out=work.d_in2d)
                if mask_h is None:
                    work.d_prev.add_(work.d_in)
                else:
                    work.d_prev.addcmul_(work.d_in, mask_h)
            d_raw = norm.backward(t, 0, rows[0])
            c0, g0 = c0_t[t], g0_t[t]
            d_g0 = d_raw * c0
            fused_ops.tanh_backward_into(d_g0, g0, d_g0_t[t])
            fused_ops.sigmoid_backward_into(d_raw * (g0 - h_t[t]), c0, d_c0_t[t])
            carry = d_raw - d_g0
            d_h_in = torch.mm(d_init_t[t], w_h.T)
            if mask_h is None:
                carry.add_(d_h_in)
            else:
                carry.addcmul_(d_h_in, mask_h)
        h_in = hs[:steps] if mask_h is None else hs[:steps] * mask_h
        d_w_h = h_in.reshape(steps * batch, d).T @ d_init.view(steps * batch, 2 * d)
        d_act_w = [
            _activation_weight_grad(node, d_mixed[i], d_carried[i], states)
            for i, node in enumerate(nodes)
        ]
        d_gamma = [d_gammas[i].sum(0) if i in d_gammas else None for i in range(n)]
        d_weights = _read_weights(plan, d_weights)
        return None, d_init, carry, d_w_h, None, *d_weights, *d_act_w, *d_gamma


def _count_batches(plan: Plan, steps: int) -> None:
    """BatchNorm's ``num_batches_tracked`` advanced by the sequence's normalisations, as the
    eager loop's ``steps × (N + 1)`` calls of the module advance it."""
    counter = None if plan.bn is None or not plan.bn.training else plan.bn.num_batches_tracked
    if counter is not None:  # None also under a functional call that freezes the statistics
        counter.add_(steps * (len(plan.nodes) + 1))


class _Scratch:
    """One node's backward work buffers, reused at every step."""

    def __init__(self, node: _Node, d_states: Tensor) -> None:
        m, n_acts, (_, batch, d) = node.m, node.n_acts, d_states.shape
        new = d_states.new_empty
        self.dz = new(m, batch, 2 * d)
        self.dz2d = self.dz.view(m * batch, 2 * d)
        self.dzc, self.dzg = self.dz[..., :d], self.dz[..., d:]
        self.da = new(m, n_acts, batch, d)
        self.da_k = self.da.unbind(1)
        self.da3 = self.da.view(m, n_acts, batch * d)
        self.dg = new(m, 1, batch * d)
        self.dg3 = self.dg.view(m, batch, d)
        self.d_in = new(m, batch, d)
        self.d_in2d = self.d_in.view(m * batch, d)
        self.d_prev = d_states[node.spec.start : node.spec.stop]
        self.d_base = d_states[1 : node.index + 1]  # a residual node's base: s_1..s_{i-1}


def _activation_weight_grad(
    node: _Node, d_mixed: Tensor, d_carried: Tensor, states: Tensor
) -> Tensor:
    """``∂L/∂w_jk = Σ ⟨dF_j, f_k(g_j)⟩ + Σ ⟨d(W_j s_j), s_j⟩`` over steps, batch and units,
    reduced once per sequence rather than once per step.

    Every product is written into ``d_carried``, spent once its own product is taken: a fresh
    temporary per product would be as large as the node's saved states, 86 MB a node at the
    DARTS size. Side by side there, the reductions took 0.26 s a step instead of 0.32 s with
    freed memory kept (``runtime.keep_freed_memory``), 0.4 s instead of 1.9 s without, and the
    step's peak fell by 0.2 GB.
    """
    spec = node.spec
    products = d_carried
    prev = states[:, spec.start : spec.stop]
    per_edge = torch.mul(d_carried, prev, out=products).sum((0, 2, 3))
    per_act = [torch.mul(act, d_mixed, out=products).sum((0, 2, 3)) for act in node.acts.unbind(2)]
    if not per_act:  # a sampled ``none``: no activation weights
        return d_mixed.new_zeros(node.m, 0)
    return torch.stack(per_act, 1) + per_edge.unsqueeze(1)


def _native_kernel(plan: Plan, x_proj: Tensor) -> ModuleType | None:
    """The C++ twin (``morphnas.native``) where it applies: on CPU, in float32 or float64, for
    the activations it knows; ``None`` sends the sequence through this module's Python kernel."""
    if not native.handles(x_proj):
        return None
    if any(act not in native.ACTIVATION_CODES for node in plan.nodes for act in node.acts):
        return None
    return native.darts_supernet()


def _native_settings(kernel: ModuleType, plan: Plan) -> tuple[object, ...]:
    """The nodes and the BatchNorm as the C++ kernel takes them: its ``Plan`` (which says
    whether there is a BatchNorm), the running mean and variance (``None`` also when a
    functional call freezes them), training, momentum and eps."""
    specs = plan.nodes
    nodes = kernel.Plan(
        [s.start for s in specs],
        [s.stop for s in specs],
        [[native.ACTIVATION_CODES[a] for a in s.acts] for s in specs],
        [s.residual for s in specs],
        plan.bn is not None,
    )
    bn = plan.bn
    if bn is None:
        return nodes, None, None, False, 0.0, 0.0
    return nodes, bn.running_mean, bn.running_var, bn.training, bn.momentum, bn.eps


def _native_forward(
    ctx: FunctionCtx,
    kernel: ModuleType,
    plan: Plan,
    x_proj: Tensor,
    h0: Tensor,
    w_h: Tensor,
    mask_h: Tensor | None,
    per_node: tuple[Tensor | None, ...],
) -> Tensor:
    """``FusedDartsSequence.forward`` by the C++ kernel: the same output and BatchNorm updates."""
    n = len(plan.nodes)
    weights, act_w, gammas = per_node[:n], per_node[n : 2 * n], per_node[2 * n :]
    settings = _native_settings(kernel, plan)
    nodes, mean, var, training, momentum, eps = settings
    output, *buffers = kernel.forward(
        nodes, x_proj, h0, w_h, mask_h, weights, act_w, gammas, mean, var, training, momentum, eps
    )
    _count_batches(plan, x_proj.shape[0])
    ctx.settings, ctx.buffers, ctx.plan = settings, buffers, plan  # type: ignore[attr-defined]
    ctx.save_for_backward(w_h, mask_h, *per_node)
    return output


def _native_backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """``FusedDartsSequence.backward`` by the C++ kernel (``None`` for the absent ``γ``)."""
    w_h, mask_h, *per_node = ctx.saved_tensors  # type: ignore[attr-defined]
    nodes, mean, var, training, _, eps = ctx.settings  # type: ignore[attr-defined]
    n = len(per_node) // 3
    weights, act_w, gammas = per_node[:n], per_node[n : 2 * n], per_node[2 * n :]
    buffers = ctx.buffers  # type: ignore[attr-defined]
    d_init, d_h0, d_w_h, *rest = ctx.native.backward(  # type: ignore[attr-defined]
        nodes, grad_out, buffers, w_h, mask_h, weights, act_w, gammas, mean, var, training, eps
    )
    d_weights, d_act_w, d_gammas = rest[:n], rest[n : 2 * n], rest[2 * n :]
    d_weights = _read_weights(ctx.plan, d_weights)  # type: ignore[attr-defined]
    d_gammas = [None if g is None else dg for dg, g in zip(d_gammas, gammas, strict=True)]
    return None, d_init, d_h0, d_w_h, None, *d_weights, *d_act_w, *d_gammas


def _read_weights(plan: Plan, d_weights: list[Tensor]) -> list[Tensor | None]:
    """The node weights' gradients, ``None`` for a node with no activation (a sampled
    ``none``): the eager loop does not read its weight, so autograd leaves it without one (and
    weight decay leaves it alone)."""
    return [g if spec.acts else None for spec, g in zip(plan.nodes, d_weights, strict=True)]
