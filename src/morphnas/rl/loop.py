"""PPO's training loop over a vectorised game: rollouts by the agent itself, GAE, epochs of
minibatch steps of one Adam over every parameter — in a search, α with the weights (RL-DARTS's
single-level, end-to-end training: the supernet acts and learns from the RL loss alone).

Everything the loop draws from is its own: the action sampler and the minibatch order use one
``torch.Generator``, each game its ``RandomState``. ``state_dict`` holds them with the agent,
the optimizer and the games mid-episode, so a loop restored from a checkpoint continues exactly
as if it had not stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical

from morphnas.errors import UserError
from morphnas.rl.agent import Agent
from morphnas.rl.envs import MinAtarVec
from morphnas.rl.ppo import gae, ppo_loss


@dataclass(frozen=True)
class PPOSettings:
    """PPO's hyperparameters (config's ``rl`` section; the RL-DARTS values where they fit)."""

    steps: int = 64
    epochs: int = 4
    minibatches: int = 4
    lr: float = 5e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    entropy: float = 0.01
    grad_clip: float = 0.5


@dataclass
class Rollout:
    """``steps`` transitions of every environment, time first."""

    obs: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    rewards: Tensor
    ended: Tensor
    last_value: Tensor


@dataclass
class Curve:
    """Every finished episode's return and the update it finished in, counted from 0 (the
    learning curve)."""

    updates: list[int] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)

    def mean_since(self, update: int) -> float | None:
        """Mean return of the episodes that finished from ``update`` on (None: none did)."""
        chosen = [r for u, r in zip(self.updates, self.returns, strict=True) if u >= update]
        return float(np.mean(chosen)) if chosen else None


class PPOLoop:
    """PPO training of ``agent`` on ``envs``, one ``update`` (a rollout and its learning) at a
    time; ``seed`` seeds the loop's sampler."""

    def __init__(self, agent: Agent, envs: MinAtarVec, settings: PPOSettings, seed: int) -> None:
        self.agent, self.envs, self.settings = agent, envs, settings
        # RL-DARTS: Adam, eps 1e-5, one optimizer for α and the weights alike.
        self.optimizer = torch.optim.Adam(agent.parameters(), lr=settings.lr, eps=1e-5)
        self.generator = torch.Generator().manual_seed(seed)
        self.update = 0
        self.curve = Curve()
        self.obs = envs.observe()

    @torch.no_grad()
    def rollout(self) -> Rollout:
        """``steps`` steps of every game by the current policy (sampled actions)."""
        s = self.settings
        columns: dict[str, list[Tensor]] = {k: [] for k in ("obs", "a", "lp", "v", "r", "d")}
        for _ in range(s.steps):
            action, log_prob, value = self.agent.act(self.obs, self.generator)
            columns["obs"].append(self.obs)
            next_obs, reward, ended, finished = self.envs.step(action.cpu())
            for value_ in (("a", action), ("lp", log_prob), ("v", value), ("r", reward)):
                columns[value_[0]].append(value_[1])
            columns["d"].append(ended)
            self.curve.updates += [self.update] * len(finished)
            self.curve.returns += finished.values()
            self.obs = next_obs
        _, last_value = self.agent(self.obs)
        stack = {k: torch.stack(v) for k, v in columns.items()}
        return Rollout(
            stack["obs"], stack["a"], stack["lp"], stack["v"], stack["r"], stack["d"], last_value
        )

    def learn(self, rollout: Rollout) -> dict[str, float]:
        """PPO's ``epochs`` passes over the rollout in ``minibatches`` shuffled minibatches;
        the mean of each loss term over the steps taken."""
        s = self.settings
        advantages, returns = gae(
            rollout.rewards, rollout.values, rollout.ended, rollout.last_value, s.gamma,
            s.gae_lambda,
        )  # fmt: skip
        flat = {
            "obs": rollout.obs.flatten(0, 1),
            "actions": rollout.actions.flatten(),
            "log_probs": rollout.log_probs.flatten(),
            "values": rollout.values.flatten(),
            "advantages": advantages.flatten(),
            "returns": returns.flatten(),
        }
        n = len(flat["actions"])
        size = max(2, n // s.minibatches)
        totals: dict[str, float] = {}
        steps = 0
        for _ in range(s.epochs):
            order = torch.randperm(n, generator=self.generator)
            for idx in order.split(size):
                parts = self._step({k: v[idx.to(v.device)] for k, v in flat.items()})
                for key, value in parts.items():
                    totals[key] = totals.get(key, 0.0) + value
                steps += 1
        return {key: value / steps for key, value in totals.items()}

    def _step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        s = self.settings
        logits, value = self.agent(batch["obs"])
        dist = Categorical(logits=logits)
        parts = ppo_loss(
            dist.log_prob(batch["actions"]), batch["log_probs"], batch["advantages"], value,
            batch["values"], batch["returns"], dist.entropy(), clip=s.clip,
            value_clip=s.value_clip, value_coef=s.value_coef, entropy_coef=s.entropy,
        )  # fmt: skip
        if not torch.isfinite(parts.total):
            raise UserError(
                f"PPO's loss became {float(parts.total)} at update {self.update + 1}; lower rl.lr"
            )
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        nn.utils.clip_grad_norm_(self.agent.parameters(), s.grad_clip)
        self.optimizer.step()
        return {
            "policy_loss": parts.policy,
            "value_loss": parts.value,
            "entropy": parts.entropy,
            "approx_kl": parts.approx_kl,
            "clip_fraction": parts.clip_fraction,
        }

    def run(self, updates: int, after_update: Callable[[dict[str, Any]], None]) -> None:
        """Train until ``updates`` updates are done (from wherever the loop stands), calling
        ``after_update`` with each update's metrics row (which logs and checkpoints)."""
        while self.update < updates:
            started = time.perf_counter()
            episodes = len(self.curve.returns)
            stats = self.learn(self.rollout())
            self.update += 1
            finished = self.curve.returns[episodes:]
            after_update(
                {
                    "update": self.update,
                    "frames": self.update * self.settings.steps * len(self.envs.envs),
                    "episodes": len(finished),
                    "mean_return": float(np.mean(finished)) if finished else None,
                    **stats,
                    "seconds": time.perf_counter() - started,
                }
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "update": self.update,
            "curve": {"updates": list(self.curve.updates), "returns": list(self.curve.returns)},
            "envs": self.envs.state_dict(),
            "obs": self.obs.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state["agent"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.update = state["update"]
        self.curve = Curve(list(state["curve"]["updates"]), list(state["curve"]["returns"]))
        self.envs.load_state_dict(state["envs"])
        self.obs = state["obs"].to(self.envs.device)


@torch.no_grad()
def evaluate(agent: Agent, envs: MinAtarVec, seed: int) -> list[float]:
    """The return of each game's first episode under the agent's sampled actions (fresh
    games: one episode each, so long episodes weigh as much as short ones)."""
    generator = torch.Generator().manual_seed(seed)
    obs = envs.observe()
    returns: dict[int, float] = {}
    while len(returns) < len(envs.envs):
        action, _, _ = agent.act(obs, generator)
        obs, _, _, finished = envs.step(action.cpu())
        for game, value in finished.items():
            returns.setdefault(game, value)
    return [returns[game] for game in sorted(returns)]
