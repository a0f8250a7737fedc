"""Kinds of learning problem, as objects: what a run of each kind reads, the model it wraps
around a cell, the engine's view of its data (``tasks.base.Task``), how a trained model is scored,
what else a result row says, and the plots it draws.

``api`` asks ``tasks.kind_for(config)`` for the run's kind and calls it; it never asks which kind
it holds. A new kind of task is one module with one ``TaskKind`` subclass, and one line in the
registry (``tasks.KINDS``); config's ``task`` takes its choices from there.

Why a class rather than a bag of functions: the kind holds the run's config, which every one of
these decisions reads (window, layout and head for forecasting; embedding, BPTT and vocabulary
for language models), so its methods take only what changes between calls — the data, a cell,
a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from morphnas.config import RunConfig
    from morphnas.genotype import Genotype
    from morphnas.tasks.base import Task


class TaskKind(ABC):
    """One kind of task for one run's ``config``. Subclasses set ``name`` (the value of config's
    ``task``) and implement the abstract methods; the others have defaults that fit a task with
    no baseline of its own, no per-sample predictions and no plots."""

    name: ClassVar[str]
    # Config values of this kind's own budget, used where a person gave none (config applies
    # them before it checks anything).
    defaults: ClassVar[Mapping[str, Any]] = {}
    # Baselines only this kind has (besides the recurrent cells every kind trains): a model
    # without a cell (``wrap(None, ...)``) or one ``reference`` gives without training.
    baselines: ClassVar[tuple[str, ...]] = ()
    # What the kind's models read, matched against the search space's (``modality`` of the
    # classes in ``spaces.SPACES``): config refuses a space of another modality.
    modality: ClassVar[str] = "sequences"

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    @classmethod
    def check(cls, config: RunConfig) -> None:
        """Refuse, with a ``ValueError`` saying what to change, a config this kind cannot run
        (config calls it when it validates, so the refusal is a one-line config error). A kind
        that can run any config keeps this default."""
        return None

    # --- data ----------------------------------------------------------------------------------

    @abstractmethod
    def load(self) -> Any:
        """The run's data, on its device, checked (a bad file is a ``UserError``)."""

    def data_file(self) -> Path | None:
        """The user's data file the run reads, or None for a named dataset; ``inputs`` and
        ``run_name`` follow from it, so a kind that reads one file says only which."""
        return None

    def inputs(self) -> tuple[Path, ...]:
        """The user's files the run reads (their size and hash go to ``run.json``, so that a
        resumed run is refused if one changed)."""
        file = self.data_file()
        return (file,) if file is not None else ()

    def run_name(self) -> str:
        """What a default run directory is named after (its data: the file's stem, else the
        dataset's name)."""
        file = self.data_file()
        return file.stem if file is not None else self.config.data.dataset

    @abstractmethod
    def budget(self) -> str:
        """The task's part of a run's budget, in a few words (the benchmark tables show it)."""

    def summary(self, data: Any) -> dict[str, Any]:
        """Keys the data adds to ``summary.json`` (e.g. what became of each CSV column)."""
        return {}

    # --- model ---------------------------------------------------------------------------------

    @abstractmethod
    def input_size(self, data: Any) -> int:
        """Features the cell reads per step."""

    @abstractmethod
    def wrap(self, cell: nn.Module | None, data: Any, hidden: int) -> nn.Module:
        """The task's model around ``cell`` (a supernet, a derived cell or a baseline; None for
        a model without a recurrent part, which a kind may refuse), on the run's device."""

    def baseline(self, name: str, data: Any, hidden: int) -> nn.Module:
        """The body of the baseline ``name`` at width ``hidden`` (``wrap`` puts the task's model
        around it): torch's recurrent cells, unless the kind has baselines of its own."""
        from morphnas import cells  # on demand: cells import the kernels

        return cells.baseline(name, self.input_size(data), hidden)

    def baseline_hidden(self, name: str, data: Any, reference: Genotype | None) -> int:
        """The hidden size of the baseline ``name`` beside the searched cell ``reference``."""
        return self.config.space.hidden

    # --- training and scoring ------------------------------------------------------------------

    @abstractmethod
    def engine_task(self, data: Any, batch_size: int) -> Task:
        """The engine's view of the data: batches, loss, validation loss."""

    @abstractmethod
    def score(self, model: nn.Module, data: Any) -> dict[str, float]:
        """The result row's metrics of a trained model, on the validation and test spans."""

    def reference(self, name: str, data: Any) -> tuple[dict[str, Any], Tensor | None] | None:
        """A baseline that needs no training (its result row and test predictions), or None
        when ``name`` is a model to build and train."""
        return None

    def row_extras(self, model: nn.Module, task: Task, seconds: float, epochs: int) -> dict:
        """Keys a trained model's result row adds beyond ``score`` (e.g. throughput)."""
        return {}

    def test_predictions(self, model: nn.Module, data: Any) -> Tensor | None:
        """A trained model's predictions on the test span, for ``plots`` (None: none drawn)."""
        return None

    def plots(self, run_dir: Path, data: Any, predictions: dict[str, Tensor]) -> None:
        """The task's own plots of a finished run, from each model's test predictions (none by
        default: the learning curves every run draws are the run's, not the task's)."""
        return None
