"""The PPO agent: an image encoder (the ``darts_cnn`` supernet, a derived network, or the
hand-designed MinAtar network) under RL-DARTS's torso — ReLU → Linear(``features``) → ReLU —
and a policy and a value head.

Two inputs the encoders read besides the game's channels: a row and a column coordinate plane
(CoordConv, Liu et al. 2018). Our addition: the DARTS network ends in global average pooling,
which would otherwise discard where the ball and the paddle are; with the planes a conv can
put a position into a channel's mean. Both encoders read the same planes, so the comparison is
between encoders, not inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Categorical

# The hand-designed encoder's name as a baseline (``train.baselines``).
HAND_DESIGNED = "minatar_cnn"
COORDINATES = 2


class MinAtarCNN(nn.Module):
    """MinAtar's own network (Young & Tian 2019): one 3×3 conv of 16 channels, no padding, ReLU,
    flattened (the torso adds its Linear(128)); ``forward`` returns ``(features, None)`` as the
    cell networks do."""

    def __init__(self, input_size: int, channels: int = 16, size: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(input_size, channels, 3)
        self.features = channels * (size - 2) ** 2

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return torch.relu(self.conv(x)).flatten(1), None


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, x: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``module``'s activations on ``x``
    (one pass in train mode, a cumulative average), then leave the module in eval mode.

    Why: the agent runs its BatchNorms on running statistics, frozen (docs/rl.md); left at their
    initial mean 0 and variance 1 they normalise nothing, and the DARTS network's signal fades
    through its stacked convolutions (its features barely depend on the screen). Calibrated
    once on the game's screens, each BatchNorm starts as a true normalisation of its input, a
    data-dependent initialisation that stays fixed while PPO learns.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one pass sets the batch's statistics
    module.train()
    module(x)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    module.eval()


def with_coordinates(x: Tensor) -> Tensor:
    """``x`` ``(N, C, H, W)`` with a row and a column plane in [-1, 1] appended."""
    n, _, height, width = x.shape
    rows = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype).view(1, 1, height, 1)
    cols = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype).view(1, 1, 1, width)
    return torch.cat([x, rows.expand(n, 1, height, width), cols.expand(n, 1, height, width)], dim=1)


class Agent(nn.Module):
    """Actor and critic sharing ``encoder``; ``encoder_kwargs`` of ``forward`` go to the encoder
    (a supernet may take mixing weights; by default it mixes by softmax(α), which is how α
    learns from the RL loss)."""

    def __init__(self, encoder: nn.Module, n_actions: int, features: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.torso = nn.Sequential(nn.ReLU(), nn.Linear(encoder.features, features), nn.ReLU())
        self.policy = nn.Linear(features, n_actions)
        self.value = nn.Linear(features, 1)

    def forward(self, x: Tensor, **encoder_kwargs: Any) -> tuple[Tensor, Tensor]:
        """Action logits ``(N, actions)`` and values ``(N,)`` of observations ``x``."""
        features, _ = self.encoder(with_coordinates(x), **encoder_kwargs)
        hidden = self.torso(features)
        return self.policy(hidden), self.value(hidden).squeeze(-1)

    def act(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Sampled actions (drawn with ``generator``), their log-probabilities, and values."""
        logits, value = self(x)
        probs = torch.softmax(logits, dim=-1)
        action = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return action, Categorical(logits=logits).log_prob(action), value
