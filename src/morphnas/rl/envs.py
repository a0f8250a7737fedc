"""MinAtar games (Young & Tian 2019: small Atari-like games in numpy, the ``minatar`` package of
the ``rl`` extra) as one vectorised environment whose whole state can be checkpointed.

Our choices, each stated in docs/rl.md: the agent acts through the game's minimal action set
(Breakout: no-op, left, right), which MinAtar's own agents do not use but which spares PPO the
three duplicate actions; an episode is cut after ``max_steps`` steps (a good Breakout agent
never loses) and the cut is treated as an ending, without bootstrapping from its last state;
MinAtar's sticky actions (probability 0.1) and difficulty ramping stay as the package sets them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from morphnas.errors import UserError

# The five MinAtar games (``minatar.environments``), named as the package names them.
GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")


def _minatar() -> Any:
    """The ``minatar`` package, or a one-line error saying how to install it."""
    try:
        import minatar
    except ImportError:
        raise UserError(
            "--task rl needs the MinAtar games: pip install 'morphnas[rl]' (or pip install minatar)"
        ) from None
    return minatar


class MinAtarVec:
    """``n`` copies of one MinAtar game stepped together, each reset on its own when its
    episode ends; observations ``(n, channels, 10, 10)`` float32 on ``device``.

    Each game draws from its own ``RandomState`` (its sticky actions and the game's randomness),
    seeded from ``seed`` (an int or a list of ints: NumPy's ``SeedSequence`` entropy, so that
    runs of different seeds, and a run's training and evaluation games, never share a stream),
    so a run is repeatable, and ``state_dict`` holds every game's variables and
    random state: a checkpoint continues mid-episode exactly.
    """

    def __init__(
        self,
        game: str,
        n: int,
        seed: int | list[int],
        max_steps: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if game not in GAMES:
            raise UserError(f"unknown env {game!r}; --env takes one of {', '.join(GAMES)}")
        minatar = _minatar()
        self.game, self.max_steps, self.device = game, max_steps, torch.device(device)
        self.envs = [minatar.Environment(game) for _ in range(n)]
        for env, own in zip(self.envs, np.random.SeedSequence(seed).generate_state(n), strict=True):
            env.seed(int(own))
            env.reset()
        self.actions = list(self.envs[0].minimal_action_set())
        self.episode_return = np.zeros(n)
        self.episode_length = np.zeros(n, dtype=np.int64)

    @property
    def channels(self) -> int:
        return int(self.envs[0].state_shape()[2])

    @property
    def n_actions(self) -> int:
        return len(self.actions)

    def observe(self) -> Tensor:
        """Every game's current screen, channels first."""
        frames = np.stack([env.state() for env in self.envs]).astype(np.float32)
        return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous().to(self.device)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[int, float]]:
        """Act (indices into the minimal action set); returns the next observations (a finished
        game's first screen of its next episode), rewards, episode-ended flags and the return of
        each episode that ended, by game."""
        rewards = np.zeros(len(self.envs), dtype=np.float32)
        ended = np.zeros(len(self.envs), dtype=np.float32)
        finished = {}
        for i, (env, action) in enumerate(zip(self.envs, actions.tolist(), strict=True)):
            reward, terminal = env.act(self.actions[action])
            rewards[i] = reward
            self.episode_return[i] += reward
            self.episode_length[i] += 1
            if terminal or self.episode_length[i] >= self.max_steps:
                ended[i] = 1.0
                finished[i] = float(self.episode_return[i])
                self.episode_return[i], self.episode_length[i] = 0.0, 0
                env.reset()
        return (
            self.observe(),
            torch.from_numpy(rewards).to(self.device),
            torch.from_numpy(ended).to(self.device),
            finished,
        )

    def state_dict(self) -> dict[str, Any]:
        """Every game's variables, sticky-action memory and random state, as tensors, numbers,
        strings, lists and dicts (a checkpoint is loaded with ``weights_only``)."""
        games = []
        for env in self.envs:
            variables = {k: v for k, v in vars(env.env).items() if k != "random"}
            games.append(
                {
                    "game": encode(variables),
                    "last_action": int(env.last_action),
                    "random": encode(env.random.get_state()),
                }
            )
        return {
            "games": games,
            "episode_return": torch.from_numpy(self.episode_return.copy()),
            "episode_length": torch.from_numpy(self.episode_length.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["games"]) != len(self.envs):
            raise ValueError(f"{len(state['games'])} games saved, {len(self.envs)} built")
        for env, saved in zip(self.envs, state["games"], strict=True):
            env.random.set_state(decode(saved["random"]))
            vars(env.env).update(decode(saved["game"]))
            env.env.random = env.random  # one RandomState, shared as ``Environment.seed`` does
            env.last_action = saved["last_action"]
        self.episode_return = state["episode_return"].numpy().copy()
        self.episode_length = state["episode_length"].numpy().copy()


def encode(value: Any) -> Any:
    """A game's variables (numpy arrays and scalars, lists, tuples, dicts, numbers) as values
    ``torch.load(weights_only=True)`` reads back: each tagged with its kind so that ``decode``
    restores arrays, tuples and numpy scalars as they were."""
    if isinstance(value, np.ndarray):
        return {"array": torch.from_numpy(np.ascontiguousarray(value)), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return {"scalar": value.item(), "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return {"list": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {str(k): encode(v) for k, v in value.items()}}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"cannot checkpoint a game variable of type {type(value).__name__}")


def decode(value: dict[str, Any]) -> Any:
    """The inverse of ``encode``."""
    if "array" in value:
        return value["array"].numpy().astype(value["dtype"], copy=True)
    if "scalar" in value:
        return np.dtype(value["dtype"]).type(value["scalar"])
    if "tuple" in value:
        return tuple(decode(v) for v in value["tuple"])
    if "list" in value:
        return [decode(v) for v in value["list"]]
    if "dict" in value:
        return {k: decode(v) for k, v in value["dict"].items()}
    return value["value"]
