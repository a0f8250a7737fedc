"""Recurrent candidate operations.

Unary activations (the DARTS recurrent primitives) and the two-input operations of the two-input
backbone. The op names are the vocabulary of ``morphnas.genotype``; this module gives them meaning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _identity(x: Tensor) -> Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "identity": _identity,
}

# Two-input ops of the form act(A a + B b): name -> activation name.
ADD_OPS: dict[str, str] = {
    "add_tanh": "tanh",
    "add_sigmoid": "sigmoid",
    "add_relu": "relu",
    "add_identity": "identity",
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    return ACTIVATIONS[name]


def two_input_op(
    name: str, a: Tensor, b: Tensor, pre: Tensor | None = None, gate: Tensor | None = None
) -> Tensor:
    """Apply one two-input op.

    ``pre`` is ``A a + B b`` for the ``add_*`` ops; ``gate`` is ``b @ [C, H]`` (2d wide) for
    ``highway``. Parameter-free ops ignore both. Kept as plain functions so that the discrete cells
    and the tests' slow references share one definition of each op.
    """
    if name == "none":
        return torch.zeros_like(a)
    if name == "hadamard":
        return a * b
    if name == "add":
        return a + b
    if name in ADD_OPS:
        assert pre is not None
        return ACTIVATIONS[ADD_OPS[name]](pre)
    if name == "highway":
        assert gate is not None
        c, g = gate.chunk(2, dim=-1)
        return a + torch.sigmoid(c) * (torch.tanh(g) - a)
    raise KeyError(name)


def apply_two_input(name: str, weight: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """One two-input op with its own weight: ``[A; B]`` (2d × d) for ``add_*``, ``[C, H]``
    (d × 2d) for ``highway``, ``None`` for the parameter-free ops."""
    if name in ADD_OPS:
        assert weight is not None
        return two_input_op(name, a, b, pre=torch.cat([a, b], dim=-1) @ weight)
    if name == "highway":
        assert weight is not None
        return two_input_op(name, a, b, gate=b @ weight)
    return two_input_op(name, a, b)


def two_input_weight_shape(name: str, hidden_size: int) -> tuple[int, int] | None:
    """The shape of one op's own weight, or ``None`` for a parameter-free op."""
    d = hidden_size
    if name in ADD_OPS:
        return (2 * d, d)
    if name == "highway":
        return (d, 2 * d)
    return None
