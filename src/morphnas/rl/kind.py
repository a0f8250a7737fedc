"""``--task rl``: RL-DARTS (Miao et al. 2021) on a MinAtar game, as a task kind.

The kind's own loop (``own_search``) replaces the supervised engine's: a PPO agent whose encoder
is the ``darts_cnn`` supernet searches its cell end to end on the RL loss, the cell is read out
as DARTS does, and the derived network and the hand-designed encoder (``minatar_cnn``) are each
trained from scratch with the same PPO and compared on their returns (``morphnas.rl.run``).
The supervised pieces of a ``TaskKind`` (batches, a validation loss) have no meaning here and
refuse with a one-line error, so ``morphnas train --task rl`` says what to run instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from morphnas.errors import UserError
from morphnas.rl.agent import COORDINATES, HAND_DESIGNED, Agent, MinAtarCNN
from morphnas.tasks.kinds import TaskKind

if TYPE_CHECKING:
    from morphnas.api import RunResult
    from morphnas.config import RunConfig
    from morphnas.engine.progress import Progress
    from morphnas.genotype import Genotype
    from morphnas.rl.envs import MinAtarVec
    from morphnas.tasks.base import Task

ONLY_SEARCH = "--task rl runs as `morphnas search --task rl --env GAME` (PPO, not batches)"


class ReinforcementLearning(TaskKind):
    """A PPO agent on a MinAtar game with a searched DARTS CNN cell as its encoder, against the
    hand-designed MinAtar network, scored by the mean return of fresh episodes."""

    name = "rl"
    modality = "images"
    baselines = (HAND_DESIGNED,)
    # The CPU budget (docs/rl.md): a one-cell supernet (a reduction cell of two nodes, C = 8)
    # and 40 updates of 8 × 64 frames per phase, a few minutes a phase on one free core.
    defaults: ClassVar[Mapping[str, Any]] = {
        "space": {
            "name": "darts_cnn", "nodes": 1, "hidden": 8,
            "options": {"steps": 2, "stem_multiplier": 2},
        },
        "train": {"baselines": [HAND_DESIGNED]},
    }  # fmt: skip

    @classmethod
    def check(cls, config: RunConfig) -> None:
        foreign = [name for name in config.train.baselines if name != HAND_DESIGNED]
        if foreign:
            raise ValueError(
                f"baselines {foreign} are not RL encoders; --task rl trains {HAND_DESIGNED}"
            )
        if config.growth.mode != "none":
            raise ValueError("--task rl searches a fixed supernet; drop --growth")

    # --- the run -----------------------------------------------------------------------------

    def own_search(
        self, run_dir: Path, *, progress: Progress | None, force: bool, resume: bool
    ) -> RunResult:
        """Search, read out, retrain and compare (``morphnas.rl.run.search``)."""
        from morphnas.rl import run  # on demand: it imports the API, which imports the kinds

        return run.search(self.config, run_dir, progress=progress, force=force, resume=resume)

    def load(self) -> MinAtarVec:
        """One game of the run's env, for its shape (a missing ``rl`` extra is refused here)."""
        from morphnas.rl.envs import MinAtarVec

        return MinAtarVec(self.config.rl.env, 1, [self.config.seed], self.config.rl.max_steps)

    def run_name(self) -> str:
        return self.config.rl.env

    def budget(self) -> str:
        rl = self.config.rl
        return (
            f"{rl.updates} search + {rl.retrain_updates} retrain PPO updates of "
            f"{rl.envs}×{rl.steps} frames"
        )

    def summary(self, data: MinAtarVec) -> dict[str, Any]:
        return {"env": data.game, "env_channels": data.channels, "env_actions": data.n_actions}

    # --- model -------------------------------------------------------------------------------

    def input_size(self, data: MinAtarVec) -> int:
        """The game's channels and the two coordinate planes (``rl.agent``)."""
        return data.channels + COORDINATES

    def wrap(self, cell: nn.Module | None, data: MinAtarVec, hidden: int) -> nn.Module:
        if cell is None:
            raise ValueError("an RL agent needs an encoder")
        return Agent(cell, data.n_actions, self.config.rl.features)

    def baseline(self, name: str, data: MinAtarVec, hidden: int) -> nn.Module:
        if name != HAND_DESIGNED:
            raise ValueError(f"unknown RL encoder {name!r}; --task rl trains {HAND_DESIGNED}")
        return MinAtarCNN(self.input_size(data))

    def baseline_hidden(self, name: str, data: Any, reference: Genotype | None) -> int:
        return self.config.space.hidden

    # --- what a supervised task has and an RL one does not -----------------------------------

    def engine_task(self, data: Any, batch_size: int) -> Task:
        raise UserError(ONLY_SEARCH)

    def score(self, model: nn.Module, data: Any) -> dict[str, float]:
        raise UserError(ONLY_SEARCH)
