"""Pieces shared by the search loop and the training loop."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from morphnas.errors import UserError
from morphnas.tasks.forecasting import batches

Batch = tuple[Tensor, Tensor]


def endless_batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[Batch]:
    """Shuffled batches of ``(x, y)`` forever: the validation stream of the architecture step."""
    while True:
        for idx in batches(len(x), batch_size, generator):
            yield x[idx], y[idx]


def check_finite(value: float, what: str, epoch: int) -> None:
    """Stop a diverging run with advice instead of writing garbage results."""
    if not math.isfinite(value):
        raise UserError(
            f"{what} became {value} at epoch {epoch}: training diverged; "
            "lower the learning rate (--lr) or the gradient clip, or change the seed"
        )
