"""First-order DARTS (Liu et al. 2019): the architecture gradient is ∂L_val/∂α at fixed weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from morphnas.optim import rebuild_optimizer
from morphnas.spaces.base import SearchSpace
from morphnas.strategies.base import BatchLoss, Strategy


class DartsFirstOrder(Strategy):
    """Adam on the architecture parameters with validation batches (DARTS RNN: lr 3e-3, wd 1e-3).

    Only the architecture gradient is computed (``torch.autograd.grad`` on ``α``), so the weights'
    ``.grad`` fields are never touched by the architecture step.
    """

    name = "darts"

    def __init__(self, space: SearchSpace, lr: float = 3e-3, weight_decay: float = 1e-3) -> None:
        super().__init__(space)
        self.optimizer = torch.optim.Adam(space.arch_parameters(), lr=lr, weight_decay=weight_decay)

    def on_space_change(self) -> None:
        """New nodes' ``α`` get fresh Adam state; surviving ones keep theirs exactly."""
        self.optimizer = rebuild_optimizer(self.optimizer, self.space.arch_parameters())

    def arch_step(self, loss: BatchLoss, train_batch: Any, valid_batch: Any) -> Tensor:
        del train_batch  # first order: the weights are taken as they are
        params = self.space.arch_parameters()
        value = loss(valid_batch, self.space.mixing_weights())
        grads = torch.autograd.grad(value, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self.optimizer.step()
        return value.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
