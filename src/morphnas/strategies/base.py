"""The strategy interface: how architecture parameters are parameterised and get their step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from torch import Tensor

from morphnas.spaces.base import SearchSpace

# A loss on one batch under given mixing weights: the strategy picks the weights, the task the loss.
BatchLoss = Callable[[Any, list[Tensor]], Tensor]


class Strategy(ABC):
    """One architecture-search method over a space seen only through ``SearchSpace``.

    The search loop asks a strategy for the mixing weights of the weight step
    (``mixing_weights``) and lets it update the architecture parameters from a train and a
    validation batch (``arch_step``). State that must survive a resume goes in ``state_dict``.
    """

    name: str

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def mixing_weights(self) -> list[Tensor]:
        """Mixing weights for the weight step and for evaluating the supernet."""
        return self.space.mixing_weights()

    @abstractmethod
    def arch_step(self, loss: BatchLoss, train_batch: Any, valid_batch: Any) -> Tensor:
        """Update the architecture parameters; return the (detached) validation loss."""

    def on_space_change(self) -> None:  # noqa: B027 - optional hook, stateless strategies skip it
        """The space grew or was pruned: follow its new architecture parameters."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
