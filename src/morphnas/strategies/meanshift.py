"""MS-DARTS (Hsieh et al., IEEE TAI 2024; spec §7): train the weights at a mean-shifted
perturbation of the architecture.

Per iteration, after ``warmup`` epochs (the code: 5 of 40; ours: an eighth of the search):

1. a first-order DARTS step on ``α`` (validation batch);
2. ``p = softmax(α)``; **mean shift**, ``iterations`` (T) times: draw ``samples`` (N) points
   ``x_n = p + U(−ε_t, ε_t)``, project each row onto the simplex (clamp to [0, 1], renormalise,
   a row that became all zero is set to the one-hot of its largest entry), score each point by
   its loss ``ℓ_n`` on the *training* batch, weight ``π = softmax_n(−ℓ_n)``, and move
   ``p_a ← Σ_n π_n k_{n,a} x_{n,a} / Σ_n π_n k_{n,a}`` with the Gaussian kernel
   ``k_{n,a} = exp(−‖p_a − x_{n,a}‖²/(2h²)) / (h√(2π))`` per node ``a`` (bandwidth h);
3. the weight step uses the shifted ``p`` (``mixing_weights``); ``α`` itself is unchanged.

ε_t rises linearly from ε/10 to ε over the search (ε = 0.25, h = 1, N = 3, T = 2 as in the code).
The code weights points by ``softmax(+ℓ)`` (higher-loss neighbours count more, an adversarial
flavour); we read the paper's mean shift towards *lower* loss as the default and keep the code's
sign as the quirk flag ``adversarial=True`` [INFERRED]. The kernel is per node (the code's one
distance per α tensor; our α is one tensor per node). All N·T scoring passes run without
gradients and with the same random numbers (dropout masks), so they compare architectures, not
noise. Scoring the supernet (``eval_mixing``) uses the unperturbed softmax.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from morphnas.errors import check_count
from morphnas.spaces.base import SearchSpace, joint_softmax
from morphnas.strategies.base import BatchLoss, Objective, Strategy, draw_seed


class MsDarts(Strategy):
    """MS-DARTS: first-order DARTS on ``α``, mean-shifted mixing for the weight step."""

    name = "msdarts"

    def __init__(
        self,
        space: SearchSpace,
        *,
        bandwidth: float = 1.0,
        epsilon: float = 0.25,
        samples: int = 3,
        iterations: int = 2,
        warmup: int | None = None,
        adversarial: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(space, **common)
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        check_count("samples", samples, 1)
        check_count("iterations", iterations, 1)
        if warmup is not None:
            check_count("warmup", warmup, 0, " (epochs) or None")
        self.bandwidth, self.epsilon = bandwidth, epsilon
        self.samples, self.iterations = samples, iterations
        self.warmup, self.adversarial = warmup, adversarial
        self._shifted: list[Tensor] | None = None

    @property
    def warmup_epochs(self) -> int:
        return self.epochs // 8 if self.warmup is None else self.warmup

    @property
    def radius(self) -> float:
        """ε_t: linear from ε/10 at the first epoch to ε at the last."""
        return self.epsilon * (0.1 + 0.9 * self.progress())

    def mixing_weights(self) -> list[Tensor]:
        """The shifted point of the last arch step (its training batch), else the softmax."""
        if self._shifted is not None and len(self._shifted) == len(self.space.arch):
            return self._shifted
        return self.space.mixing_weights()

    def eval_mixing(self) -> list[Tensor]:
        return self.space.mixing_weights()

    def on_space_change(self) -> None:
        super().on_space_change()
        self._shifted = None

    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> Tensor:
        self._shifted = None
        value = self._first_order_step(objective, valid_batch)
        if self.epoch > self.warmup_epochs:
            self._shifted = self.mean_shift(objective, train_batch)
        return value

    @torch.no_grad()
    def mean_shift(self, objective: Objective | BatchLoss, batch: Any) -> list[Tensor]:
        """``iterations`` mean-shift steps from ``softmax(α)`` (see the module doc)."""
        p = [w.detach() for w in self.space.mixing_weights()]
        searched = [i - 1 for i in range(1, len(p) + 1) if i not in self.space.fixed]
        seed = draw_seed()
        norm = self.bandwidth * math.sqrt(2 * math.pi)
        for _ in range(self.iterations):
            points = [self._perturb(p, searched) for _ in range(self.samples)]
            losses = []
            for point in points:
                with torch.random.fork_rng(devices=_devices(p[0])):
                    torch.manual_seed(seed)
                    losses.append(objective(batch, point).detach())
            sign = 1.0 if self.adversarial else -1.0
            pi = torch.softmax(sign * torch.stack(losses), dim=0)
            for a in searched:
                kernel = torch.stack(
                    [
                        torch.exp(-((p[a] - x[a]) ** 2).sum() / (2 * self.bandwidth**2)) / norm
                        for x in points
                    ]
                )
                w = pi * kernel
                p[a] = sum(wn * x[a] for wn, x in zip(w, points, strict=True)) / w.sum()
        return p

    def _perturb(self, p: list[Tensor], searched: list[int]) -> list[Tensor]:
        """``p + U(−ε_t, ε_t)`` on searched nodes, projected row-wise onto the simplex.

        Under a read-out with one simplex per node (``joint_softmax``: two-input input choice)
        each row keeps its share of the node's mass, so the perturbation moves the ops within a
        pair and never erases which inputs the node prefers."""
        out = list(p)
        eps = self.radius
        joint = self.space.read_out is joint_softmax
        for a in searched:
            x = (p[a] + (torch.rand_like(p[a]) * 2 - 1) * eps).clamp(0.0, 1.0)
            total = x.sum(-1, keepdim=True)
            fallback = torch.zeros_like(x).scatter_(-1, p[a].argmax(-1, keepdim=True), 1.0)
            out[a] = torch.where(total > 0, x / total.clamp_min(1e-12), fallback)
            if joint:
                out[a] = out[a] * p[a].sum(-1, keepdim=True)
        return out


def _devices(t: Tensor) -> list[torch.device]:
    return [t.device] if t.device.type == "cuda" else []
