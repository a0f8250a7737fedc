"""Search spaces: supernets with architecture parameters, a mixing-weight forward and ``derive()``."""

from __future__ import annotations

from typing import Any

from torch import nn

from morphnas.spaces.base import SearchSpace
from morphnas.spaces.darts_rnn import DartsRNNSearchCell
from morphnas.spaces.two_input import TwoInputSearchCell

SPACES: dict[str, type[nn.Module]] = {
    "darts_rnn": DartsRNNSearchCell,
    "two_input": TwoInputSearchCell,
}


def build(name: str, input_size: int, hidden_size: int, nodes: int, **options: Any) -> nn.Module:
    """Build the supernet ``name`` for inputs of ``input_size`` features and ``hidden_size`` state."""
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; expected one of {sorted(SPACES)}")
    return SPACES[name](input_size, hidden_size, nodes=nodes, **options)


__all__ = ["SPACES", "DartsRNNSearchCell", "SearchSpace", "TwoInputSearchCell", "build"]
