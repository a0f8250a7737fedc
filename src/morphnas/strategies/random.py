"""Random search with weight sharing (Li & Talwalkar, UAI 2019): the baseline to beat.

Every weight step trains the shared weights under a fresh *uniformly random* discrete
architecture (each searched node one (predecessor, op) entry, ``none`` excluded, only that op run:
``SampledMixing``); ``α`` never learns. At the end, ``derive`` draws ``candidates`` (K)
architectures, scores each with the trained shared weights on the *whole* validation split
(``Objective.full_valid_loss``, which the engine sets; without it, on the validation batches the
arch steps have seen), and returns the best. The pick is written into ``α`` (a large logit on the
chosen entry), so the genotype's probabilities and the read-out agree with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from morphnas.errors import check_count
from morphnas.genotype import Genotype
from morphnas.spaces.base import SampledMixing, SearchSpace, joint_softmax
from morphnas.strategies.base import BatchLoss, Objective, Strategy, one_hot_like

PICK_LOGIT = 10.0  # α of the picked entry; the others are 0 (softmax ≈ 1 on the pick)
KEEP_BATCHES = 8  # validation batches kept for the fallback pick


class RandomSearch(Strategy):
    """Uniform random architectures per step; best of ``candidates`` on valid at the end."""

    name = "random"
    sampling = True

    def __init__(self, space: SearchSpace, *, candidates: int = 10, **common: Any) -> None:
        super().__init__(space, **common)
        check_count("candidates", candidates, 1)
        self.candidates = candidates
        self.objective: Objective | BatchLoss | None = None
        self._batches: list[Any] = []
        self.scores: list[float] = []
        space.read_out = joint_softmax
        self._allowed = [k for k, name in enumerate(space.op_names) if name != "none"]

    def sample(self) -> SampledMixing:
        """One uniformly random discrete architecture (searched nodes), as a hard sample."""
        n_ops, allowed = len(self.space.op_names), self._allowed

        def uniform(alpha: Tensor) -> int:
            entry = int(torch.randint(alpha.numel() // n_ops * len(allowed), (1,)))
            return (entry // len(allowed)) * n_ops + allowed[entry % len(allowed)]

        return self.discrete_sample(uniform).detach()

    def mixing_weights(self) -> list[Tensor]:
        return self.sample()

    def eval_mixing(self) -> list[Tensor]:
        """A fixed architecture (the argmax of the untrained ``α``) so scores are comparable."""
        return self.mode()

    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> Tensor:
        """No architecture learning: remember the objective (for the final pick) and report the
        loss of a random architecture on the validation batch."""
        del train_batch
        self.objective = objective
        self._batches = [*self._batches[-(KEEP_BATCHES - 1) :], valid_batch]
        with torch.no_grad():
            return objective(valid_batch, self.sample()).detach()

    @torch.no_grad()
    def score(self, mixing: SampledMixing) -> float:
        """Validation loss of one architecture with the shared weights (lower is better)."""
        objective = self.objective
        if isinstance(objective, Objective) and objective.full_valid_loss is not None:
            return float(objective.full_valid_loss(mixing))
        if objective is None or not self._batches:
            raise RuntimeError("random search has seen no validation data to pick with")
        model = getattr(objective, "model", None)
        was_training = model.training if model is not None else None
        if model is not None:
            model.eval()
        try:
            losses = [float(objective(batch, mixing)) for batch in self._batches]
        finally:
            if model is not None:
                model.train(was_training)
        return sum(losses) / len(losses)

    @torch.no_grad()
    def derive(self) -> Genotype:
        """Best of ``candidates`` random architectures on validation, written into ``α``."""
        if not self.space.arch_parameters():
            return self.space.derive()
        if self.objective is None:
            return self.space.derive()
        samples = [self.sample() for _ in range(self.candidates)]
        self.scores = [self.score(s) for s in samples]
        best = samples[min(range(len(samples)), key=self.scores.__getitem__)]
        for i, alpha in enumerate(self.space.arch, start=1):
            choice = best.choices[i - 1]
            if choice is not None and i not in self.space.fixed:
                alpha.copy_(PICK_LOGIT * one_hot_like(alpha, choice))
        return self.space.derive()
