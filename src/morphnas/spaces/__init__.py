"""Search spaces: supernets with architecture parameters, a mixing forward and ``derive()``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from morphnas.spaces.base import SearchSpace
from morphnas.spaces.darts_cnn import DartsCNNSearchNetwork
from morphnas.spaces.darts_rnn import DartsRNNSearchCell
from morphnas.spaces.two_input import TwoInputSearchCell

SPACES: dict[str, type[nn.Module]] = {
    "darts_rnn": DartsRNNSearchCell,
    "two_input": TwoInputSearchCell,
    "darts_cnn": DartsCNNSearchNetwork,
}


def of_modality(modality: str) -> list[str]:
    """The registered spaces whose networks read ``modality`` (``sequences`` or ``images``)."""
    return [
        name for name, cls in SPACES.items() if getattr(cls, "modality", "sequences") == modality
    ]


def build(name: str, input_size: int, hidden_size: int, nodes: int, **options: Any) -> nn.Module:
    """The supernet ``name`` for ``input_size`` features and a ``hidden_size`` state."""
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; expected one of {sorted(SPACES)}")
    accepted = set(inspect.signature(SPACES[name]).parameters) - {"input_size", "hidden_size"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"unknown {name} option(s) {unknown}; accepted: {sorted(accepted - {'nodes'})}"
        )
    return SPACES[name](input_size, hidden_size, nodes=nodes, **options)


__all__ = [
    "SPACES",
    "DartsCNNSearchNetwork",
    "DartsRNNSearchCell",
    "SearchSpace",
    "TwoInputSearchCell",
    "build",
]
