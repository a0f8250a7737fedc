"""What every search space offers a strategy, and the small pieces the recurrent spaces share."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from morphnas.genotype import Genotype


@runtime_checkable
class SearchSpace(Protocol):
    """A supernet seen through architecture parameters, mixing weights and derivation.

    A strategy never looks inside a space: it reads ``arch_parameters()``, turns them into mixing
    weights (one tensor per node, the last axis over the space's ``op_names``), and passes those to
    ``forward``. ``derive()`` discretises the current architecture parameters.
    """

    op_names: tuple[str, ...]

    def arch_parameters(self) -> list[nn.Parameter]: ...

    def weight_parameters(self) -> list[nn.Parameter]: ...

    def mixing_weights(self) -> list[Tensor]: ...

    def forward(
        self, x: Tensor, h0: Tensor | None = None, weights: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]: ...

    def derive(self) -> Genotype: ...


class ArchitectureMixin:
    """Architecture parameters live in ``self.arch`` (an ``nn.ParameterList``, one entry per node).

    Keeping them in their own container puts them in ``state_dict`` under ``arch.*`` and lets the
    weights be separated from them by identity, never by matching names.
    """

    arch: nn.ParameterList

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.arch)

    def weight_parameters(self) -> list[nn.Parameter]:
        arch_ids = {id(p) for p in self.arch}
        return [p for p in self.parameters() if id(p) not in arch_ids]  # type: ignore[attr-defined]

    def mixing_weights(self) -> list[Tensor]:
        """DARTS' continuous relaxation: a softmax over the ops of every node (or edge row)."""
        return [torch.softmax(alpha, dim=-1) for alpha in self.arch]


def new_alpha(*shape: int) -> nn.Parameter:
    """Architecture parameters start near uniform, as in DARTS: ``1e-3 * N(0, 1)``."""
    return nn.Parameter(1e-3 * torch.randn(*shape))


def uniform_parameter(*shape: int, bound: float) -> nn.Parameter:
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
