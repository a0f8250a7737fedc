"""Growth of the search backbone during one-shot search: triggers, checked morphisms, the two modes.

Our reading of Jie & Gao (spec/morphism.md §3–§4): the unit of growth is one node, appended as a
residual node whose scale starts at zero, so the supernet's function is unchanged by construction
— and every growth is *checked*: the cell's output on a fixed probe batch is compared before and
after, and a difference above the tolerance stops the run as a bug.

* ``grow-then-prune`` (mode 1): grow during search, derive once at the end.
* ``grow-and-prune`` (mode 2): at each growth event, first fix every searched node to its best op
  (keeping that op's weights), then append a fresh searched node; at the end fix the last one. The
  result needs no separate derivation and its weights are the inherited ones.
* ``none``: fixed-size search, the control of every comparison.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from morphnas.config import GrowthConfig
from morphnas.spaces.base import GrowableSpace, Widening

MODES = ("none", "grow-then-prune", "grow-and-prune")


class GrowthCheckError(RuntimeError):
    """A growth changed the network's function: a bug in a morphism, never a user error."""


@dataclass(frozen=True)
class GrowthEvent:
    """One transformation of the backbone, as recorded in ``history.json``."""

    epoch: int
    step: int
    kind: str  # "grow", "widen" or "prune"
    nodes_before: int
    nodes_after: int
    max_abs_diff: float | None  # output change on the probe batch (growth only)
    valid_loss_before: float
    valid_loss_after: float
    pruned_nodes: tuple[int, ...] = ()
    width_before: int | None = None
    width_after: int | None = None
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def growth_interval(config: GrowthConfig, epochs: int, nodes_max: int) -> int:
    """Epochs between scheduled growths: the configured value, or an even spread of the growths
    over the search that leaves the last stretch to the full-size cell."""
    if config.every is not None:
        return config.every
    return max(1, epochs // (nodes_max - config.nodes_start + 1))


class GrowthTrigger:
    """Decides after each epoch whether the backbone grows: on a schedule or on a plateau.

    Plateau: the validation loss has not improved on its best by more than ``min_delta``
    (relative) for ``patience`` epochs. Never at the last epoch, which would leave a node untrained.
    """

    def __init__(self, config: GrowthConfig, epochs: int, nodes_max: int) -> None:
        self.config, self.epochs, self.nodes_max = config, epochs, nodes_max
        self.interval = growth_interval(config, epochs, nodes_max)
        self.best, self.waited = math.inf, 0

    def __call__(self, epoch: int, valid_loss: float, nodes: int) -> bool:
        improved = valid_loss < self.best * (1.0 - self.config.min_delta)
        self.best = min(self.best, valid_loss)
        self.waited = 0 if improved else self.waited + 1
        if nodes >= self.nodes_max or epoch >= self.epochs:
            return False
        if self.config.trigger == "schedule":
            return epoch % self.interval == 0
        if self.waited >= self.config.patience:
            self.waited = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.waited = state["best"], state["waited"]


@torch.no_grad()
def probe_output(space: nn.Module, probe: Tensor) -> Tensor:
    """The cell's outputs over a fixed batch in eval mode (the caller's mode is restored)."""
    was_training = space.training
    space.eval()
    try:
        return space(probe)[0]
    finally:
        space.train(was_training)


def grow_checked(
    space: GrowableSpace, probe: Tensor, config: GrowthConfig
) -> tuple[list[nn.Parameter], float]:
    """Append one node and prove the function did not change; return (new params, max |Δ|)."""
    before = probe_output(space, probe)
    new_params = space.grow(alpha_init=config.alpha_init)
    after = probe_output(space, probe)
    diff = float((after - before).abs().max())
    if not diff <= config.tolerance:  # also catches NaN
        raise GrowthCheckError(
            f"growth to {space.nodes} nodes changed the cell's output by {diff:.3g} "
            f"(tolerance {config.tolerance:g}): the morphism is broken, please report this"
        )
    return new_params, diff


def widen_checked(
    model: nn.Module, probe: Tensor, config: GrowthConfig, generator: torch.Generator
) -> float:
    """Widen the cell's hidden state (and the head that reads it) by ``width_step`` units and
    prove the forecasts did not change; return max |Δ| on the probe windows."""
    space: GrowableSpace = model.cell
    extra = config.width_step
    if config.width_max is not None:
        extra = min(extra, config.width_max - space.hidden_size)
    before = probe_output(model, probe)
    widening = Widening.random(space.hidden_size, extra, config.width_noise, generator)
    space.widen(widening)
    reader = getattr(space, "widen_reader", None)  # a head that reads more than one block
    if reader is not None:
        model.head.weight = reader(model.head.weight, widening)
    else:
        model.head.weight = widening.reader(model.head.weight, 0, dim=1)
    after = probe_output(model, probe)
    diff = float((after - before).abs().max())
    if not diff <= config.tolerance:
        raise GrowthCheckError(
            f"widening to {space.hidden_size} units changed the forecasts by {diff:.3g} "
            f"(tolerance {config.tolerance:g}): the morphism is broken, please report this"
        )
    return diff


class Growth:
    """Applies a growth mode to a space during search and records every event."""

    def __init__(
        self,
        model: nn.Module,
        config: GrowthConfig,
        epochs: int,
        nodes_max: int,
        probe: Tensor,
        valid_loss: Callable[[], float],
        seed: int = 0,
        cell_probe: Tensor | None = None,
    ) -> None:
        """``probe``: a fixed batch of model inputs (widening checks the model's output on it);
        ``cell_probe``: the same batch as the cell's input sequence (growth checks the cell's
        outputs at every step on it). Without it, ``probe`` is taken as windows ``(B, P, m)``."""
        self.model, self.config = model, config
        self.space: GrowableSpace = model.cell
        self.probe = probe
        self.cell_probe = probe.transpose(0, 1) if cell_probe is None else cell_probe
        self.valid_loss = valid_loss
        self.trigger = GrowthTrigger(config, epochs, nodes_max)
        self.generator = torch.Generator().manual_seed(seed)
        self.events: list[GrowthEvent] = []

    def state_dict(self) -> dict[str, Any]:
        """Trigger, width-noise generator and the events so far (for an exact resume)."""
        return {
            "trigger": self.trigger.state_dict(),
            "generator": self.generator.get_state(),
            "events": [event.to_dict() for event in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trigger.load_state_dict(state["trigger"])
        self.generator.set_state(state["generator"])
        self.events = [
            GrowthEvent(**{**e, "pruned_nodes": tuple(e["pruned_nodes"])}) for e in state["events"]
        ]

    @property
    def enabled(self) -> bool:
        return self.config.mode != "none"

    def after_epoch(self, epoch: int, step: int, valid_loss: float) -> bool:
        """Transform the backbone if the trigger fires; return whether anything changed."""
        if not self.enabled or not self.trigger(epoch, valid_loss, self.space.nodes):
            return False
        if self.config.mode == "grow-and-prune":
            valid_loss = self.prune(epoch, step, valid_loss)
        nodes_before = self.space.nodes
        _, diff = grow_checked(self.space, self.cell_probe, self.config)
        valid_after = self.valid_loss()
        self.events.append(
            GrowthEvent(
                epoch, step, "grow", nodes_before, self.space.nodes, diff,
                valid_loss, valid_after, time=time.time(),
            )
        )  # fmt: skip
        if self._may_widen():
            width_before = self.space.hidden_size
            diff = widen_checked(self.model, self.probe, self.config, self.generator)
            self.events.append(
                GrowthEvent(
                    epoch, step, "widen", self.space.nodes, self.space.nodes, diff,
                    valid_after, self.valid_loss(), width_before=width_before,
                    width_after=self.space.hidden_size, time=time.time(),
                )
            )  # fmt: skip
        return True

    def _may_widen(self) -> bool:
        limit = self.config.width_max
        return self.config.width_step > 0 and (limit is None or self.space.hidden_size < limit)

    def prune(self, epoch: int, step: int, valid_loss: float) -> float:
        """Fix every searched node to its best op; log the loss before and after (no morphism)."""
        pruned = self.space.prune()
        after = self.valid_loss()
        nodes = self.space.nodes
        self.events.append(
            GrowthEvent(
                epoch, step, "prune", nodes, nodes, None, valid_loss, after,
                pruned_nodes=tuple(pruned), time=time.time(),
            )
        )  # fmt: skip
        return after

    def finish(self, epoch: int, step: int, valid_loss: float) -> bool:
        """Mode 2 ends by fixing the last searched node(s); return whether anything changed."""
        if self.config.mode != "grow-and-prune" or not self.space.mixed_nodes:
            return False
        self.prune(epoch, step, valid_loss)
        return True
