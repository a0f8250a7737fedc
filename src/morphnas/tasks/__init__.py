"""Tasks: what a cell is trained to do, with its head, loss and metrics.

``KINDS`` is the registry of task kinds (``tasks.kinds.TaskKind``): config's ``task`` names one,
and ``kind_for`` builds it for a run. A new task is one module and one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from morphnas.rl.kind import ReinforcementLearning
from morphnas.tasks.classification import Classification
from morphnas.tasks.forecasting import Forecasting
from morphnas.tasks.kinds import TaskKind
from morphnas.tasks.language import LanguageModelling

if TYPE_CHECKING:
    from morphnas.config import RunConfig

KINDS: dict[str, type[TaskKind]] = {
    Forecasting.name: Forecasting,
    LanguageModelling.name: LanguageModelling,
    Classification.name: Classification,
    ReinforcementLearning.name: ReinforcementLearning,
}


def kind_for(config: RunConfig) -> TaskKind:
    """The task kind of a run (config's ``task``, which config checks against ``KINDS``)."""
    return KINDS[config.task](config)


__all__ = ["KINDS", "TaskKind", "kind_for"]
