"""Discrete models: cells built from a genotype, and the LSTM/GRU baselines.

All share one interface, ``forward(x, h0=None) -> (outputs, h_last)``: a recurrent cell takes
``x`` of shape ``(T, B, input_size)``, so a task's model never knows which kind of cell it holds;
a ``darts_cnn`` network takes images and returns ``(features, None)``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from torch import nn

from morphnas.cells.baselines import BASELINES, RecurrentBaseline
from morphnas.cells.darts_cnn import DartsCNNNetwork
from morphnas.cells.discrete import DartsRNNCell, TwoInputCell
from morphnas.genotype import Genotype

if TYPE_CHECKING:
    from morphnas.config import RunConfig

CELLS: dict[str, type[nn.Module]] = {
    "darts_rnn": DartsRNNCell,
    "two_input": TwoInputCell,
    "darts_cnn": DartsCNNNetwork,
}


def build(genotype: Genotype, input_size: int, hidden_size: int, **options: Any) -> nn.Module:
    """The discrete cell a genotype describes, with fresh weights (for retraining from scratch)."""
    return CELLS[genotype.space](genotype, input_size, hidden_size, **options)


def options_for(genotype: Genotype, config: RunConfig) -> dict[str, Any]:
    """What ``genotype``'s derived cell takes from the run's config: the space options its
    constructor also takes (recurrent cells: dropout, init, ``fused``; the others are
    search-only), and, for a network that stacks cells (``darts_cnn``), the stack's depth: the
    supernet's at the end of the search (``space.nodes``, or ``growth.nodes_max``)."""
    accepted = set(inspect.signature(CELLS[genotype.space]).parameters)
    options = {k: v for k, v in config.space.options.items() if k in accepted}
    if "cells" in accepted:
        options["cells"] = config.nodes_max
    return options


def baseline(name: str, input_size: int, hidden_size: int) -> nn.Module:
    """``lstm`` or ``gru`` behind the cells' interface (PyTorch's fused kernels)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(BASELINES)}")
    return RecurrentBaseline(name, input_size, hidden_size)


__all__ = [
    "BASELINES",
    "CELLS",
    "DartsCNNNetwork",
    "DartsRNNCell",
    "TwoInputCell",
    "baseline",
    "build",
    "options_for",
]
