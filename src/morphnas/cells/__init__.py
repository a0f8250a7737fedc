"""Discrete recurrent models: cells built from a genotype, and the LSTM/GRU baselines.

All share one interface, ``forward(x, h0=None) -> (outputs, h_last)`` with ``x`` of shape
``(T, B, input_size)``, so a task's model never knows which kind of cell it holds.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from morphnas.cells.baselines import BASELINES, RecurrentBaseline
from morphnas.cells.discrete import DartsRNNCell, TwoInputCell
from morphnas.genotype import Genotype

_CELLS: dict[str, type[nn.Module]] = {"darts_rnn": DartsRNNCell, "two_input": TwoInputCell}


def build(genotype: Genotype, input_size: int, hidden_size: int, **options: Any) -> nn.Module:
    """The discrete cell a genotype describes, with fresh weights (for retraining from scratch)."""
    return _CELLS[genotype.space](genotype, input_size, hidden_size, **options)


def baseline(name: str, input_size: int, hidden_size: int) -> nn.Module:
    """``lstm`` or ``gru`` behind the cells' interface (PyTorch's fused kernels)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(BASELINES)}")
    return RecurrentBaseline(name, input_size, hidden_size)


__all__ = ["BASELINES", "DartsRNNCell", "TwoInputCell", "baseline", "build"]
