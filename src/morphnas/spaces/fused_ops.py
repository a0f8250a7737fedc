"""Elementwise building blocks of the hand-written recurrent kernels (``fused_darts``).

Each writes into a caller's buffer (``out=``) so that a time step allocates almost nothing, and
each backward is one ATen kernel (``tanh_backward`` etc.) instead of autograd's chain of small
ops. The forward values saved for the backward are the activations' *outputs* where the
derivative is cheaper from them (``tanh``, ``sigmoid``), the pre-activation for ``relu``.
"""

from __future__ import annotations

import torch
from torch import Tensor

aten = torch.ops.aten


def tanh_into(z: Tensor, out: Tensor, one: Tensor) -> Tensor:
    """``tanh(z)`` into ``out``; on CPU as ``2σ(2z) − 1``.

    Why: this build's CPU ``tanh`` kernel costs about 3.4 ns per float32 element, ``sigmoid``
    about 1.2 ns, so the identity halves the most expensive elementwise op of the DARTS cell.
    It is exact in real arithmetic; in float32 it differs from ``torch.tanh`` by a few ulps of 1
    (absolute ~1e-7), far below what the float32 recurrence itself amplifies. ``one`` is a 0-dim
    tensor: a Python scalar operand costs about 2 µs more per call here.
    """
    if z.device.type != "cpu":
        return torch.tanh(z, out=out)
    torch.add(z, z, out=out).sigmoid_()
    return out.add_(out).sub_(one)


def activation_into(name: str, z: Tensor, out: Tensor, one: Tensor) -> Tensor:
    """One DARTS activation of ``z`` written into ``out`` (``one``: see ``tanh_into``)."""
    if name == "tanh":
        return tanh_into(z, out, one)
    if name == "sigmoid":
        return torch.sigmoid(z, out=out)
    if name == "relu":
        return torch.clamp_min(z, 0.0, out=out)
    if name == "identity":
        return out.copy_(z)
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
        return out.copy_(grad)
    raise KeyError(name)


def sigmoid_backward_into(grad: Tensor, value: Tensor, out: Tensor) -> Tensor:
    """``grad · σ'`` from ``value = σ(z)``, into ``out``."""
    return aten.sigmoid_backward.grad_input(grad, value, grad_input=out)


def tanh_backward_into(grad: Tensor, value: Tensor, out: Tensor) -> Tensor:
    """``grad · tanh'`` from ``value = tanh(z)``, into ``out``."""
    return aten.tanh_backward.grad_input(grad, value, grad_input=out)
