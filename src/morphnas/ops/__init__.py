"""Candidate operations of the recurrent search spaces, one registry per family."""

from morphnas.ops.recurrent import ACTIVATIONS, ADD_OPS, activation, two_input_op

__all__ = ["ACTIVATIONS", "ADD_OPS", "activation", "two_input_op"]
