"""Building blocks of the hand-written recurrent kernels (``fused_darts``, ``fused_two_input``).

Each writes into a caller's buffer (``out=``) so that a time step allocates almost nothing, and
each backward is one ATen kernel (``tanh_backward`` etc.) instead of autograd's chain of small
ops. The forward values saved for the backward are the activations' *outputs* where the
derivative is cheaper from them (``tanh``, ``sigmoid``), the pre-activation for ``relu``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property

import torch
from torch import Tensor, nn

aten = torch.ops.aten


def tanh_into(z: Tensor, out: Tensor, minus_one: Tensor) -> Tensor:
    """``tanh(z)`` into ``out``; on CPU as ``2σ(2z) − 1``.

    Why: this build's CPU ``tanh`` kernel costs about 3.4 ns per float32 element, ``sigmoid``
    about 1.2 ns, so the identity halves the most expensive elementwise op of the DARTS cell.
    It is exact in real arithmetic; in float32 it differs from ``torch.tanh`` by a few ulps of 1
    (absolute ~1e-7), far below what the float32 recurrence itself amplifies. ``minus_one`` is
    a 0-dim ``−1``: a Python scalar operand costs about 2 µs more per call here.
    """
    if not z.is_cpu:  # (``device.type`` costs ~0.4 µs a call here)
        return torch.tanh(z, out=out)
    torch.add(z, z, out=out).sigmoid_()
    return sigmoid_to_tanh_(out, minus_one)


def sigmoid_to_tanh_(value: Tensor, minus_one: Tensor) -> Tensor:
    """``value = σ(2z)`` turned into ``tanh(z) = 2σ(2z) − 1`` in place, one kernel: a kernel
    that computes ``2z`` anyway (doubled weights) gets ``tanh`` from the ``sigmoid_`` it runs."""
    return torch.add(minus_one, value, alpha=2, out=value)


def activation_into(name: str, z: Tensor, out: Tensor, minus_one: Tensor) -> Tensor:
    """One DARTS activation of ``z`` written into ``out`` (``minus_one``: see ``tanh_into``)."""
    if name == "tanh":
        return tanh_into(z, out, minus_one)
    if name == "sigmoid":
        return torch.sigmoid(z, out=out)
    if name == "relu":
        return torch.clamp_min(z, 0.0, out=out)
    if name == "identity":  # in place (``out is z``) there is nothing to do
        return out if out is z else out.copy_(z)
    raise KeyError(name)


def activation_backward_into(
    name: str, grad: Tensor, value: Tensor, pre: Tensor, out: Tensor
) -> Tensor:
    """``grad · f'(pre)`` into ``out``, from the saved output ``value = f(pre)`` where cheaper."""
    if name == "tanh":
        return aten.tanh_backward.grad_input(grad, value, grad_input=out)
    if name == "sigmoid":
        return aten.sigmoid_backward.grad_input(grad, value, grad_input=out)
    if name == "relu":
        return aten.threshold_backward.grad_input(grad, pre, 0.0, grad_input=out)
    if name == "identity":
        return out if out is grad else out.copy_(grad)
    raise KeyError(name)


def sigmoid_backward_into(grad: Tensor, value: Tensor, out: Tensor) -> Tensor:
    """``grad · σ'`` from ``value = σ(z)``, into ``out``."""
    return aten.sigmoid_backward.grad_input(grad, value, grad_input=out)


def tanh_backward_into(grad: Tensor, value: Tensor, out: Tensor) -> Tensor:
    """``grad · tanh'`` from ``value = tanh(z)``, into ``out``."""
    return aten.tanh_backward.grad_input(grad, value, grad_input=out)


def doubled_tanh_half(weight: Tensor) -> Tensor:
    """``[C | G]`` as ``[C | 2G]``, how the derived cells' kernels take a highway's weight (the
    DARTS init node's, and its input projection's): ``tanh(g)`` is then ``2σ(2g) − 1`` from the
    matmul's ``2g``, its ``sigmoid_`` shared with the gate's, and ``slope_`` halves the slope."""
    d = weight.shape[-1] // 2
    return torch.cat([weight[..., :d], doubled(weight[..., d:])], dim=-1)


def doubled(weight: Tensor) -> Tensor:
    """``2 w``, exactly: doubling only moves the exponent, so the kernels' results do not move."""
    return weight + weight


def pairs(buffer: Tensor, k: int) -> tuple[Tensor, ...]:
    """``(T, B, 2dk)`` ``[C_1 … C_k | G_1 … G_k]`` columns as per-step ``(B, 2, k, d)``."""
    steps, batch, width = buffer.shape
    return buffer.view(steps, batch, 2, k, width // (2 * k)).unbind(0)


def highway_factors(z: Tensor, parent: Tensor, runs: list[tuple[str, int, int]], k: int) -> Tensor:
    """``z``, ``[σ(c_1..c_k) | f(g_1..g_k)]`` of ``k`` highway blends of ``parent`` (``(T, B,
    d)``), turned in place into ``[∂y/∂c | ∂y/∂g]``: ``(f − s) σ(1 − σ)`` and ``σ f'(g)``, with
    ``f`` given per column run ``(name, first, end)``; returns ``∂y/∂s = 1 − σ``."""
    steps, batch, width = z.shape
    d = parent.shape[-1]
    gates, values = z[..., : width // 2], z[..., width // 2 :]
    spread = values.view(steps, batch, k, d) - parent.unsqueeze(2)  # f − s per child
    keep = torch.sub(1.0, gates)
    for name, lo, hi in runs:
        slope_(name, z[..., lo:hi])
    values.mul_(gates)
    gates.mul_(keep).mul_(spread.view(steps, batch, k * d))
    return keep


def slope_(name: str, value: Tensor) -> None:
    """The slope of ``value = f(g)`` in its matmul column, in place: ``(1 − f²)/2`` for
    ``tanh`` (the column holds ``2g``), ``f(1 − f)``, ``[f > 0]`` or 1."""
    if name == "tanh":
        value.square_().sub_(1.0).mul_(-0.5)
    elif name == "sigmoid":
        value.mul_(torch.sub(1.0, value))
    elif name == "relu":
        value.copy_(value > 0)
    elif name == "identity":
        value.fill_(1.0)
    else:
        raise KeyError(name)


class SequenceOutput:
    """``h_t = squash(base(s_1..s_N))`` into ``hs[t + 1]`` (``nodes``: ``(T, N, B, d)``, each
    step's node states, contiguous per step) in at most three kernels: the mean
    is one matmul with a row of ``1/N`` (``2/N`` under ``tanh``, which is then ``2σ(2x) − 1``),
    where ``torch.mean`` plus ``tanh_into`` were six."""

    def __init__(self, squash: str, output: str, nodes: Tensor, hs: Tensor) -> None:
        steps, n, batch, d = nodes.shape
        self.tanh, self.mean = squash == "tanh", output == "mean"
        self.out_t = hs[1:].view(steps, 1, batch * d).unbind(0)
        if self.mean:
            self.average = nodes.new_full((1, n), (2.0 if self.tanh else 1.0) / n)
            self.nodes_t = [step.view(n, batch * d) for step in nodes.unbind(0)]
        else:
            self.nodes_t = [step[-1].view(1, batch * d) for step in nodes.unbind(0)]

    def step(self, t: int, minus_one: Tensor) -> None:
        out, nodes = self.out_t[t], self.nodes_t[t]
        if self.mean:
            torch.mm(self.average, nodes, out=out)
        elif self.tanh:
            torch.add(nodes, nodes, out=out)
        else:
            out.copy_(nodes)
        if self.tanh:
            sigmoid_to_tanh_(out.sigmoid_(), minus_one)


def live_nodes(
    inputs: list[tuple[int, ...]], residual: tuple[bool, ...], output: str
) -> tuple[bool, ...]:
    """Per node of a derived cell whether its output depends on it. ``inputs[i]``: node ``i``'s
    input states, node ``j`` being state ``j + 1`` (lower states are not nodes). Under ``mean``
    every node is; under ``last`` node ``N`` and, backwards, the inputs of live nodes and the
    base of a live residual node (under ``last``, the node before it). The kernels skip the
    others, so their parameters get no gradient (``None``) as in the eager loop, where they are
    computed and then not read."""
    n = len(inputs)
    if output != "last":
        return (True,) * n
    live = [False] * n
    live[-1] = True
    for i in reversed(range(n)):
        if not live[i]:
            continue
        for state in inputs[i]:
            if state >= 1:
                live[state - 1] = True
        if residual[i] and i >= 1:
            live[i - 1] = True
    return tuple(live)


def per_step_rows(slots: Tensor | Sequence[Tensor]) -> list[tuple[Tensor, ...]]:
    """``rows[t][j]``, slot ``j`` at step ``t``, as views made once: at these sizes a view costs
    as much as a small op. ``slots``: one ``(T, N, ...)`` buffer, or each slot's ``(T, ...)``
    sequence where the slots live in different tensors."""
    if isinstance(slots, Tensor):
        return [step.unbind(0) for step in slots.unbind(0)]
    return list(zip(*(slot.unbind(0) for slot in slots), strict=True))


def output_rule(states: Tensor, count: int, output: str) -> Tensor:
    """A cell's output rule over ``s_1..s_count`` of one step's states (index 0 is not a node):
    the last, or the mean (``kernels.blocks.combine_nodes``)."""
    return states[count] if output == "last" else states[1 : count + 1].mean(0)


def output_rule_backward(d_states: Tensor, count: int, output: str, grad: Tensor) -> None:
    """Add ``grad``, the gradient of ``output_rule(states, count)``, into ``d_states``."""
    if output == "last":
        d_states[count].add_(grad)
    else:
        d_states[1 : count + 1].add_(grad, alpha=1.0 / count)


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vjp``, ``jvp``, ``vmap``) is running: the
    kernel is differentiable once and has no ``setup_context``, so callers fall back to eager."""
    return bool(torch._C._are_functorch_transforms_active())


_eager = ContextVar("morphnas_eager_kernels", default=False)  # inside ``eager_kernels``


@contextmanager
def eager_kernels() -> Iterator[None]:
    """Run the eager loops instead of the sequence kernels inside (this thread): for a graph
    that autograd will differentiate again (``create_graph=True``), which a kernel's once-only
    backward refuses."""
    token = _eager.set(True)
    try:
        yield
    finally:
        _eager.reset(token)


def kernels_allowed() -> bool:
    """Whether a once-differentiable sequence kernel may run: not under a ``torch.func``
    transform, not inside ``eager_kernels``."""
    return not _eager.get() and not transforms_active()


def refuse_double_backward(kernel: str) -> None:
    """Raise inside a kernel's hand-written backward when it runs with ``create_graph=True``:
    its formulas are not recorded, so a second derivative would silently lack its part."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the fused {kernel} kernel is differentiable once (create_graph=True was asked); "
            "build the space with fused=False for higher-order gradients"
        )


def supports_batchnorm(bn: nn.BatchNorm1d | None, batch: int) -> bool:
    """Whether the kernel reproduces ``bn``: running statistics with a fixed momentum, no
    affine, and more than one sample when it normalises by batch statistics."""
    if bn is None:
        return True
    return (
        bn.track_running_stats
        and bn.momentum is not None
        and not bn.affine
        and (not bn.training or batch > 1)
    )


class SequenceNorm:
    """BatchNorm (no affine) of state ``k`` at step ``t``, as ``nn.BatchNorm1d`` computes it;
    ``like`` is any ``(steps, batch, d)`` tensor of the sequence's dtype and device.

    Training: ``torch.native_batch_norm`` (the kernel ``F.batch_norm`` calls) on the module's own
    running buffers, keeping the raw input, mean and inverse std for the backward. Evaluation:
    the running statistics. ``None``: the identity. Per-step views are made once (``unbind``),
    because at these sizes making a view costs about as much as a small kernel, and on first
    use: the native loops take the whole buffers (``pre_all`` etc.) and read no view.
    """

    def __init__(self, bn: nn.BatchNorm1d | None, like: Tensor, states: int) -> None:
        self.bn = bn
        if bn is None:
            return
        steps, batch, d = like.shape
        self.pre_all = like.new_empty(steps, states, batch, d)
        if bn.training:
            stats = like.new_empty(2, steps, states, d)
            self.mean_all, self.invstd_all = stats[0], stats[1]
        else:
            assert bn.running_var is not None
            self.scale = torch.rsqrt(bn.running_var + bn.eps)

    @cached_property
    def pre(self) -> list[tuple[Tensor, ...]]:
        return [row.unbind(0) for row in self.pre_all.unbind(0)]

    @cached_property
    def mean(self) -> list[tuple[Tensor, ...]]:
        return [row.unbind(0) for row in self.mean_all.unbind(0)]

    @cached_property
    def invstd(self) -> list[tuple[Tensor, ...]]:
        return [row.unbind(0) for row in self.invstd_all.unbind(0)]

    def raw(self, t: int, k: int, out: Tensor) -> Tensor:
        """Where the raw (pre-BN) state goes: ``out`` itself without BatchNorm."""
        return out if self.bn is None else self.pre[t][k]

    def forward(self, t: int, k: int, out: Tensor) -> None:
        bn = self.bn
        if bn is None:
            return
        if bn.training:
            torch.native_batch_norm(
                self.pre[t][k],
                None,
                None,
                bn.running_mean,
                bn.running_var,
                True,
                bn.momentum,  # type: ignore[arg-type]  # checked by supports_batchnorm
                bn.eps,
                out=(out, self.mean[t][k], self.invstd[t][k]),
            )
        else:
            torch.sub(self.pre[t][k], bn.running_mean, out=out).mul_(self.scale)

    def backward(self, t: int, k: int, grad: Tensor) -> Tensor:
        bn = self.bn
        if bn is None:
            return grad
        if not bn.training:
            return grad * self.scale
        return aten.native_batch_norm_backward.default(
            grad,
            self.pre[t][k],
            None,
            bn.running_mean,
            bn.running_var,
            self.mean[t][k],
            self.invstd[t][k],
            True,
            bn.eps,
            [True, False, False],
        )[0]
