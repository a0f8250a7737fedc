"""Architecture-search strategies, one file per method family, chosen by name."""

from __future__ import annotations

import inspect
from typing import Any

from morphnas.spaces.base import SearchSpace
from morphnas.strategies.base import BatchLoss, Objective, Strategy, detach_mixing
from morphnas.strategies.darts import Darts, DartsFirstOrder
from morphnas.strategies.gumbel import Gdas, Snas
from morphnas.strategies.implicit import IDarts
from morphnas.strategies.meanshift import MsDarts
from morphnas.strategies.penalties import PENALTIES, CostPenalty
from morphnas.strategies.random import RandomSearch
from morphnas.strategies.sigmoid import Dnal

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Darts, IDarts, Snas, Gdas, Dnal, MsDarts, RandomSearch)
}


def options_of(name: str) -> list[str]:
    """The keyword options strategy ``name`` accepts (its own and the shared ones)."""
    accepted: set[str] = set()
    for cls in STRATEGIES[name].__mro__:
        if cls is object or "__init__" not in vars(cls):
            continue
        params = inspect.signature(vars(cls)["__init__"]).parameters.values()
        accepted |= {
            p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "space"
        }
    return sorted(accepted)


def build(name: str, space: SearchSpace, **options: Any) -> Strategy:
    """Strategy ``name`` on ``space``; an unknown name or option is a ``ValueError`` that lists
    what is accepted (the API turns it into a one-line user error)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    unknown = sorted(set(options) - set(options_of(name)))
    if unknown:
        raise ValueError(
            f"unknown {name} option(s) {unknown}; accepted: {', '.join(options_of(name))}"
        )
    return STRATEGIES[name](space, **options)


__all__ = [
    "PENALTIES",
    "STRATEGIES",
    "BatchLoss",
    "CostPenalty",
    "Darts",
    "DartsFirstOrder",
    "Dnal",
    "Gdas",
    "IDarts",
    "MsDarts",
    "Objective",
    "RandomSearch",
    "Snas",
    "Strategy",
    "build",
    "detach_mixing",
    "options_of",
]
