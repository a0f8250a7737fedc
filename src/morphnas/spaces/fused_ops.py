"""Building blocks of the hand-written recurrent kernels (``fused_darts``, ``fused_two_input``).

Each writes into a caller's buffer (``out=``) so that a time step allocates almost nothing, and
each backward is one ATen kernel (``tanh_backward`` etc.) instead of autograd's chain of small
ops. The forward values saved for the backward are the activations' *outputs* where the
derivative is cheaper from them (``tanh``, ``sigmoid``), the pre-activation for ``relu``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from morphnas.spaces.base import SampledMixing

aten = torch.ops.aten


def tanh_into(z: Tensor, out: Tensor, minus_one: Tensor) -> Tensor:
    """``tanh(z)`` into ``out``; on CPU as ``2σ(2z) − 1``.

    Why: this build's CPU ``tanh`` kernel costs about 3.4 ns per float32 element, ``sigmoid``
    about 1.2 ns, so the identity halves the most expensive elementwise op of the DARTS cell.
    It is exact in real arithmetic; in float32 it differs from ``torch.tanh`` by a few ulps of 1
    (absolute ~1e-7), far below what the float32 recurrence itself amplifies. ``minus_one`` is
    a 0-dim ``−1``: a Python scalar operand costs about 2 µs more per call here.
    """
    if z.device.type != "cpu":
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


def per_step_rows(buffer: Tensor) -> list[tuple[Tensor, ...]]:
    """``buffer[t][j]`` as views made once: at these sizes a view costs as much as a small op."""
    return [step.unbind(0) for step in buffer.unbind(0)]


def output_rule(states: Tensor, count: int, output: str) -> Tensor:
    """A cell's output rule over ``s_1..s_count`` of one step's states (index 0 is not a node):
    the last, or the mean (``spaces.base.combine_nodes``)."""
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


def refuse_double_backward(kernel: str) -> None:
    """Raise inside a kernel's hand-written backward when it runs with ``create_graph=True``:
    its formulas are not recorded, so a second derivative would silently lack its part."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the fused {kernel} kernel is differentiable once (create_graph=True was asked); "
            "build the space with fused=False for higher-order gradients"
        )


def kernel_applies(fused: bool, bn: nn.BatchNorm1d | None, batch: int, mixing: object) -> bool:
    """Whether a space's sequence kernel runs this forward.

    Not when the user chose the eager path (``fused=False``), not for a sampled mixing (one op
    per node, already cheap eagerly), not under ``torch.func`` transforms (the exact Hessian
    products of ``hypergrad`` differentiate twice; a kernel's backward is hand-written and
    once-only), and not for BatchNorm settings the kernels do not reproduce.
    """
    return (
        fused
        and not isinstance(mixing, SampledMixing)
        and not transforms_active()
        and supports_batchnorm(bn, batch)
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
    because at these sizes making a view costs about as much as a small kernel.
    """

    def __init__(self, bn: nn.BatchNorm1d | None, like: Tensor, states: int) -> None:
        self.bn = bn
        if bn is None:
            return
        steps, batch, d = like.shape
        self.pre = [row.unbind(0) for row in like.new_empty(steps, states, batch, d).unbind(0)]
        if bn.training:
            stats = like.new_empty(2, steps, states, d)
            self.mean = [row.unbind(0) for row in stats[0].unbind(0)]
            self.invstd = [row.unbind(0) for row in stats[1].unbind(0)]
        else:
            assert bn.running_var is not None
            self.scale = torch.rsqrt(bn.running_var + bn.eps)

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
