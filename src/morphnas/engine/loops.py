"""Pieces shared by the search loop and the training loop."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from morphnas.errors import UserError
from morphnas.tasks.base import Task


def check_finite(value: float, what: str, epoch: int, section: str = "train") -> None:
    """Stop a diverging run with advice instead of writing garbage results. ``section`` is the
    config section whose optimizer diverged (``train``: retraining and a search's candidate
    retraining, ``search.select``, both use train's), named in the options the advice gives."""
    if not math.isfinite(value):
        raise UserError(
            f"{what} became {value} at epoch {epoch}: training diverged; lower the learning "
            f"rate (--set {section}.lr=VALUE) or the gradient clip (--set {section}.clip=VALUE), "
            "or change the seed (--seed)"
        )


def draw_epoch(
    task: Task,
    generator: torch.Generator,
    device: torch.device,
    fraction: float = 1.0,
    saved: dict[str, Any] | None = None,
) -> tuple[list[Any], Tensor, Tensor, int]:
    """One epoch's batches, the generator state they were drawn from, and the running loss sum
    and sample count: fresh, or — with ``saved``, a checkpoint written inside this epoch — the
    same batches redrawn from its epoch-start state, with the generator and sums it saved."""
    start = generator.get_state() if saved is None else saved["epoch_generator"]
    generator.set_state(start)
    batches = task.epoch_batches(generator, fraction)
    if saved is None:
        return batches, start, torch.zeros((), device=device), 0
    generator.set_state(saved["generator"])
    total, count = saved["totals"]
    return batches, start, total.to(device), count
