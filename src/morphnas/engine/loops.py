"""Pieces shared by the search loop and the training loop."""

from __future__ import annotations

import math

from morphnas.errors import UserError


def check_finite(value: float, what: str, epoch: int) -> None:
    """Stop a diverging run with advice instead of writing garbage results."""
    if not math.isfinite(value):
        raise UserError(
            f"{what} became {value} at epoch {epoch}: training diverged; "
            "lower the learning rate (--lr) or the gradient clip, or change the seed"
        )
