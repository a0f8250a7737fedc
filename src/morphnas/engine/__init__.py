"""The loops: one-shot search and training from scratch, with checkpoints and progress."""

from morphnas.engine.search import SearchOutcome, search
from morphnas.engine.train import TrainOutcome, train

__all__ = ["SearchOutcome", "TrainOutcome", "search", "train"]
