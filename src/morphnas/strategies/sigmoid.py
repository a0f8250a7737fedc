"""DNAL (Guo et al., Pattern Recognition 2022; spec §4): scaled-sigmoid gates with a β schedule.

Every entry of ``α`` (an op of a node, or a (predecessor, op) edge in ``darts_rnn``) gets a gate
``g = σ(β·α)``; the supernet *sums* the gated ops (no softmax, no sampling — like DNAL's
ProxylessNAS supernet, where a mixed edge sums all candidates). As β grows geometrically from 1
to 10⁴ over the search (spec: ×(10⁴)^{1/E} at the start of every epoch, so the first epoch
already uses β ≈ 10^{4/E}), the gates tend to the step function ``1[α > 0]``: a continuation
from a smooth problem to the binary keep/drop problem. The architecture loss adds the sparsity
penalty ``λ Σ σ(β·α)`` (our reading of the paper; the code's ``λ Σ σ(α)`` without β is the quirk
flag ``unscaled_penalty``).

Our reading where the spec is open [INFERRED]: DNAL trains weights, then gates with frozen
weights, then fine-tunes (three stages). Here the gates train *jointly* with the weights in the
one-shot loop (Adam on validation batches, like every strategy), so the same loop, growth and
comparisons apply. The read-out is DNAL's threshold ``σ(β·α) > 0.9``; our cells hold exactly one
op per node, so a node keeps its strongest gate among those over the threshold, and the strongest
gate overall if none passes (``derive`` reports how many nodes needed that fallback). Because σ
is monotone, the chosen op is the argmax of ``α`` among non-``none`` entries either way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from morphnas.channels.options import ChannelOptions
from morphnas.genotype import Genotype
from morphnas.spaces.base import SearchSpace
from morphnas.strategies.base import BatchLoss, Objective, Strategy, none_mask

LEVELS = ("ops", "channels")


class ScaledSigmoid:
    """``α ↦ σ(β·α)`` with a β the schedule moves (a picklable callable, used as read-out)."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def __call__(self, alpha: Tensor) -> Tensor:
        return torch.sigmoid(self.beta * alpha)


class Dnal(Strategy):
    """DNAL gates ``σ(β·α)`` with a geometric β schedule, a sparsity penalty and a threshold."""

    name = "dnal"

    def __init__(
        self,
        space: SearchSpace,
        *,
        beta_start: float = 1.0,
        beta_end: float = 1e4,
        sparsity: float = 1e-3,
        threshold: float = 0.9,
        unscaled_penalty: bool = False,
        level: str = "ops",
        lambdas: tuple[float, ...] = (1e-2,),
        arch_epochs: int = 10,
        finetune_epochs: int | None = None,
        finetune_lr: float | None = None,
        channel_penalty: str = "unscaled",
        **common: Any,
    ) -> None:
        super().__init__(space, **common)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        # ``level=channels``: after the searched network and the baselines are retrained (DNAL's
        # weight stage, gates off), DNAL's channel stages run on them (``morphnas.prune``) with
        # these options; β's range and the threshold are the op search's own.
        self.channel_options: ChannelOptions | None = None
        if level == "channels":
            try:
                self.channel_options = ChannelOptions(
                    lambdas=tuple(lambdas), arch_epochs=arch_epochs, beta_start=beta_start,
                    beta_end=beta_end, threshold=threshold, penalty=channel_penalty,
                    finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                )  # fmt: skip
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
        if not (beta_start > 0 and beta_end >= beta_start):
            raise ValueError(
                f"need 0 < beta_start <= beta_end, got {beta_start!r} and {beta_end!r}"
            )
        if not sparsity >= 0:
            raise ValueError(f"sparsity must be >= 0, got {sparsity!r}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        self.beta_start, self.beta_end = beta_start, beta_end
        self.sparsity, self.threshold = sparsity, threshold
        self.unscaled_penalty = unscaled_penalty
        self.gate = ScaledSigmoid(beta_start)
        space.read_out = self.gate
        self.fallback_nodes = 0

    @property
    def beta(self) -> float:
        return self.gate.beta

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """``β_e = β_0 · (β_E/β_0)^{e/E}``: multiplied by the same factor before every epoch."""
        super().start_epoch(epoch, epochs)
        ratio = self.beta_end / self.beta_start
        self.gate.beta = self.beta_start * ratio ** (epoch / self.epochs)

    def transform(self, alpha: Tensor) -> Tensor:
        return self.gate(alpha)

    def cost_weights(self, alpha: Tensor) -> Tensor:
        """Each gate is the probability that its op is kept (independent keep/drop decisions)."""
        return self.gate(alpha)

    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> Tensor:
        return self._first_order_step(objective, valid_batch)

    def regulariser(self) -> Tensor | None:
        total = super().regulariser()
        if self.sparsity == 0:
            return total
        scale = 1.0 if self.unscaled_penalty else self.beta
        gates = sum(torch.sigmoid(scale * a).sum() for a in self.space.arch_parameters())
        term = self.sparsity * gates
        return term if total is None else total + term

    def binary_fraction(self, tolerance: float = 0.01) -> float:
        """Share of searched gates within ``tolerance`` of 0 or 1 (1.0: fully binary)."""
        gates = [self.gate(a.detach()).reshape(-1) for a in self.space.arch_parameters()]
        if not gates:
            return 1.0
        g = torch.cat(gates)
        return float(((g < tolerance) | (g > 1 - tolerance)).float().mean())

    @torch.no_grad()
    def derive(self) -> Genotype:
        """Threshold read-out (see the module doc); counts nodes with no gate over it."""
        self.fallback_nodes = 0
        for alpha in self.space.arch_parameters():
            gates = self.gate(alpha).masked_fill(none_mask(self.space, alpha), -math.inf)
            if not bool((gates > self.threshold).any()):
                self.fallback_nodes += 1
        return self.space.derive()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "beta": self.beta}
