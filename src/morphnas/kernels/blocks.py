"""Recurrent building blocks shared by the supernets (``spaces``), the derived cells (``cells``)
and the language model (``tasks.language``).

They live here, below all three, so that a derived cell or a task never imports a search space:
the output rule, the residual scales of grown nodes, the init and the locked dropout must be the
same in a supernet and in the cell derived from it, or retraining would not reproduce the search.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from morphnas.genotype import Node


def combine_nodes(node_states: list[Tensor], output: str) -> Tensor:
    """A cell's output rule over its node states (before squashing): the last, or the mean.

    The same rule gives a residual node its base, so appending one is function-preserving.
    """
    return node_states[-1] if output == "last" else torch.stack(node_states).mean(0)


def residual_gammas(nodes: Iterable[Node], hidden_size: int) -> nn.ParameterDict:
    """``γ_i`` (zeros) for every residual node, keyed by its 1-based index."""
    return nn.ParameterDict(
        {
            str(i): nn.Parameter(torch.zeros(hidden_size))
            for i, n in enumerate(nodes, 1)
            if n.residual
        }
    )


def uniform_parameter(*shape: int, bound: float) -> nn.Parameter:
    """A weight drawn from ``U(−bound, bound)``, the DARTS recurrent init (``init_range``), so
    that a supernet and the cell derived from it start from the same distribution."""
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def check_dropout(**probabilities: float) -> None:
    """Dropout probabilities must lie in [0, 1): ``p = 1`` would divide the mask by zero."""
    for name, p in probabilities.items():
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")


def variational_mask(
    batch: int, size: int, p: float, like: Tensor, training: bool
) -> Tensor | None:
    """One dropout mask per sequence, shared by every time step (locked / variational dropout)."""
    if not training or p <= 0.0:
        return None
    keep = 1.0 - p
    return like.new_empty(batch, size).bernoulli_(keep) / keep
