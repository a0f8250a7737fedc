"""Architecture-search strategies, one file per method, chosen by name."""

from __future__ import annotations

from typing import Any

from morphnas.spaces.base import SearchSpace
from morphnas.strategies.base import BatchLoss, Strategy
from morphnas.strategies.darts import DartsFirstOrder

STRATEGIES: dict[str, type[Strategy]] = {"darts": DartsFirstOrder}


def build(name: str, space: SearchSpace, **options: Any) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](space, **options)


__all__ = ["STRATEGIES", "BatchLoss", "DartsFirstOrder", "Strategy", "build"]
