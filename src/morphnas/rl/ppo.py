"""PPO's two formulas (Schulman et al. 2017), apart from any network or environment, so that
each is checked against a hand computation: generalised advantage estimation and the clipped
loss (surrogate, clipped value loss, entropy bonus)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def gae(
    rewards: Tensor,
    values: Tensor,
    ended: Tensor,
    last_value: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Advantages and returns ``(T, n)`` of a rollout of ``T`` steps of ``n`` environments.

    ``ended[t]``: the episode ended at step ``t`` (the next observation starts a new one), so
    neither the next value nor the next advantage flows back across it; ``last_value``: the
    value of the observation after the rollout. The recursion runs backwards over time and at
    once over the environments: ``δ_t = r_t + γ V_{t+1} (1 − d_t) − V_t``,
    ``A_t = δ_t + γλ (1 − d_t) A_{t+1}``; returns are ``A + V`` (the value targets).
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(len(rewards))):
        alive = 1.0 - ended[t]
        delta = rewards[t] + gamma * next_value * alive - values[t]
        running = delta + gamma * lam * alive * running
        advantages[t] = running
        next_value = values[t]
    return advantages, advantages + values


@dataclass(frozen=True)
class LossParts:
    """The loss PPO minimises and what each of its terms was (for the metrics log)."""

    total: Tensor
    policy: float
    value: float
    entropy: float
    approx_kl: float
    clip_fraction: float


def ppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    value: Tensor,
    old_value: Tensor,
    returns: Tensor,
    entropy: Tensor,
    *,
    clip: float,
    value_clip: float,
    value_coef: float,
    entropy_coef: float,
) -> LossParts:
    """PPO's loss on one minibatch (1-D tensors, one entry per sample).

    Advantages are normalised over the minibatch (mean 0, standard deviation 1), as the
    reference implementations do. Policy: ``−mean(min(ρ A, clip(ρ, 1 ± ε) A))`` with
    ``ρ = exp(log π − log π_old)``. Value (``value_clip`` > 0): ``½ mean(max((V − R)²,
    (V_old + clip(V − V_old, ±ε_v) − R)²))``, as the RL-DARTS PPO config (value clip 0.2);
    ``value_clip`` 0: ``½ mean((V − R)²)``. Total: policy + ``value_coef`` · value −
    ``entropy_coef`` · mean entropy.
    """
    adv = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)
    ratio = torch.exp(log_prob - old_log_prob)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    policy = -surrogate.mean()
    squared = (value - returns) ** 2
    if value_clip > 0:
        clipped = old_value + (value - old_value).clamp(-value_clip, value_clip)
        squared = torch.max(squared, (clipped - returns) ** 2)
    value_loss = 0.5 * squared.mean()
    mean_entropy = entropy.mean()
    total = policy + value_coef * value_loss - entropy_coef * mean_entropy
    with torch.no_grad():
        log_ratio = log_prob - old_log_prob
        approx_kl = float(((ratio - 1) - log_ratio).mean())  # Schulman's low-variance k3
        clip_fraction = float(((ratio - 1).abs() > clip).float().mean())
    return LossParts(
        total,
        float(policy.detach()),
        float(value_loss.detach()),
        float(mean_entropy.detach()),
        approx_kl,
        clip_fraction,
    )
