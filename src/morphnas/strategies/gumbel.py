"""Gumbel-softmax strategies: SNAS (relaxed samples) and GDAS (hard samples, one op per node).

Both treat a node's ``α`` as the logits of *one* categorical over all its entries (for
``darts_rnn``: over every (predecessor, op) pair, the one edge the derived node keeps; for
``two_input``: over the ops), so they set the space's ``read_out`` to that joint softmax and
``derive``/``prune``/the logs read the same distribution the samples come from.

* **SNAS** (Xie et al., ICLR 2019; spec §5): ``Z = softmax((α + G)/τ)``, ``G`` Gumbel noise;
  single-level: ``α`` steps on the *training* batch (a fresh sample), as the paper's
  ``min_{θ,α} E_Z[L_θ(Z)]``; ``bilevel=True`` steps on the validation batch instead. τ linear
  from 1 to 0.03 over the search (``Temp_Scheduler``); ``schedule="exponential"`` is the
  alternative spec §5 f names. Architecture gradients clipped at norm 10 as in the code.
* **GDAS** (Dong & Yang, CVPR 2019; spec §6): ``h = onehot(argmax(p̃)) − stopgrad(p̃) + p̃`` with
  ``p̃ = softmax((log softmax(α) + G)/τ)``; only the sampled op of each node runs
  (``SampledMixing``), the others add their weight as a constant so all of ``α`` gets a gradient.
  Bilevel: ``α`` on the validation batch, weights on the training batch, each with its own
  sample. τ linear from 10 to 0.1.

The weight step sees a fresh sample for both (SNAS: relaxed, GDAS: hard); scoring the supernet
(``eval_mixing``) uses the mode, the architecture ``derive`` would return.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from morphnas.spaces.base import SampledMixing, SearchSpace, joint_softmax
from morphnas.strategies.base import BatchLoss, Objective, Strategy

SCHEDULES = ("linear", "exponential")


def gumbel_like(t: Tensor) -> Tensor:
    """Standard Gumbel noise ``−log(E)``, ``E ~ Exp(1)`` (the same law as ``−log(−log U)``
    without the ``log 0`` at ``U = 0``)."""
    return -torch.empty_like(t).exponential_().log()


class _GumbelStrategy(Strategy):
    """Temperature schedule and joint read-out shared by SNAS and GDAS."""

    sampling = True
    default_tau: tuple[float, float] = (1.0, 0.03)

    def __init__(
        self,
        space: SearchSpace,
        *,
        tau_start: float | None = None,
        tau_end: float | None = None,
        schedule: str = "linear",
        **common: Any,
    ) -> None:
        super().__init__(space, **common)
        tau_start = self.default_tau[0] if tau_start is None else tau_start
        tau_end = self.default_tau[1] if tau_end is None else tau_end
        if not (tau_start > 0 and tau_end > 0):
            raise ValueError(f"temperatures must be > 0, got {tau_start!r} and {tau_end!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.tau_start, self.tau_end, self.schedule = tau_start, tau_end, schedule
        self.tau = tau_start
        space.read_out = joint_softmax

    def start_epoch(self, epoch: int, epochs: int) -> None:
        super().start_epoch(epoch, epochs)
        t = self.progress()
        if self.schedule == "linear":
            self.tau = self.tau_start + (self.tau_end - self.tau_start) * t
        else:
            self.tau = self.tau_start * (self.tau_end / self.tau_start) ** t

    def transform(self, alpha: Tensor) -> Tensor:
        """The expectation: the joint softmax of the node."""
        return joint_softmax(alpha)

    def eval_mixing(self) -> list[Tensor]:
        return self.mode()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tau": self.tau}


class Snas(_GumbelStrategy):
    """SNAS: relaxed Gumbel-softmax samples, single-level by default."""

    name = "snas"
    default_tau = (1.0, 0.03)

    def __init__(
        self,
        space: SearchSpace,
        *,
        bilevel: bool = False,
        arch_clip: float | None = 10.0,
        **common: Any,
    ) -> None:
        super().__init__(space, arch_clip=arch_clip, **common)
        self.bilevel = bilevel

    def relaxed(self, alpha: Tensor) -> Tensor:
        """One relaxed one-hot sample of a node: ``softmax((α + G)/τ)`` over all its entries."""
        flat = alpha.reshape(-1)
        return torch.softmax((flat + gumbel_like(flat)) / self.tau, dim=0).reshape(alpha.shape)

    def mixing_weights(self) -> list[Tensor]:
        return self.space.mixing_weights(self.relaxed)

    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> Tensor:
        return self._first_order_step(objective, valid_batch if self.bilevel else train_batch)


class Gdas(_GumbelStrategy):
    """GDAS: hard straight-through Gumbel samples; only the sampled op of each node runs."""

    name = "gdas"
    default_tau = (10.0, 0.1)

    def hard_sample(self) -> SampledMixing:
        """One straight-through sample per searched node (fixed nodes keep their one-hot)."""
        current = self.space.mixing_weights()
        weights: list[Tensor] = []
        picks: list[Tensor] = []
        for i, alpha in enumerate(self.space.arch, start=1):
            if i in self.space.fixed:
                weights.append(current[i - 1])
                continue
            flat = alpha.reshape(-1)
            soft = torch.softmax((torch.log_softmax(flat, 0) + gumbel_like(flat)) / self.tau, 0)
            index = soft.detach().argmax()
            hot = torch.zeros_like(soft).scatter_(0, index.reshape(1), 1.0)
            weights.append((hot - soft.detach() + soft).reshape(alpha.shape))
            picks.append(index.reshape(1))
        chosen = iter(torch.cat(picks).tolist() if picks else [])  # one host read per sample
        choices = [
            None if i in self.space.fixed else next(chosen)
            for i in range(1, len(self.space.arch) + 1)
        ]
        return SampledMixing(weights, choices)

    def mixing_weights(self) -> list[Tensor]:
        return self.hard_sample()

    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> Tensor:
        return self._first_order_step(objective, valid_batch)
