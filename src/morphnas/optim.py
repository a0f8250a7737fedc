"""Optimizers across a changing parameter set (a growing or pruned supernet)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]
) -> torch.optim.Optimizer:
    """The same optimizer over a new parameter list: survivors keep their state exactly, new
    parameters start fresh, dropped ones are forgotten."""
    params = list(params)
    rebuilt = type(optimizer)(params, **optimizer.defaults)
    for p in params:
        if p in optimizer.state:
            rebuilt.state[p] = optimizer.state[p]
    return rebuilt
