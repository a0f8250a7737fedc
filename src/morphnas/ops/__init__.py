"""Candidate operations of the recurrent search spaces, one registry per family."""

from morphnas.ops.recurrent import (
    ACTIVATIONS,
    ADD_OPS,
    activation,
    apply_two_input,
    two_input_op,
    two_input_weight_shape,
)

__all__ = [
    "ACTIVATIONS",
    "ADD_OPS",
    "activation",
    "apply_two_input",
    "two_input_op",
    "two_input_weight_shape",
]
