"""Architecture-search strategies, one file per method family, chosen by name."""

from __future__ import annotations

import inspect
import re
from typing import Any

from morphnas.spaces.base import SearchSpace
from morphnas.strategies.base import BatchLoss, Objective, Strategy, detach_mixing
from morphnas.strategies.darts import Darts, DartsFirstOrder
from morphnas.strategies.darts_prime import DartsPrime
from morphnas.strategies.e2nas import E2nas
from morphnas.strategies.gumbel import Gdas, Snas
from morphnas.strategies.implicit import IDarts
from morphnas.strategies.meanshift import MsDarts
from morphnas.strategies.penalties import PENALTIES, CostPenalty
from morphnas.strategies.random import RandomSearch
from morphnas.strategies.sigmoid import Dnal
from morphnas.strategies.toponas import TopoNas

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (Darts, IDarts, Snas, Gdas, Dnal, MsDarts, RandomSearch, E2nas, DartsPrime, TopoNas)
}


def _annotations_of(name: str) -> dict[str, str]:
    """Strategy ``name``'s keyword options (its own and the shared ones) and their annotations."""
    found: dict[str, str] = {}
    for cls in STRATEGIES[name].__mro__:
        if cls is object or "__init__" not in vars(cls):
            continue
        for p in inspect.signature(vars(cls)["__init__"]).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "space":
                found.setdefault(p.name, str(p.annotation))
    return found


def options_of(name: str) -> list[str]:
    """The keyword options strategy ``name`` accepts (its own and the shared ones)."""
    return sorted(_annotations_of(name))


def build(name: str, space: SearchSpace, **options: Any) -> Strategy:
    """Strategy ``name`` on ``space``; an unknown name or option, or text where an option takes a
    number, is a ``ValueError`` that says what is accepted (the API turns it into a one-line user
    error; the strategies' own checks then see numbers only)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    annotations = _annotations_of(name)
    unknown = sorted(set(options) - set(annotations))
    if unknown:
        raise ValueError(
            f"unknown {name} option(s) {unknown}; accepted: {', '.join(options_of(name))}"
        )
    for key, value in options.items():
        kinds = set(re.findall(r"\w+", annotations[key]))
        numeric = bool(kinds & {"int", "float"}) and not kinds & {"str", "tuple", "list"}
        if numeric and value is not None and not isinstance(value, int | float):
            raise ValueError(f"{name} option {key} must be a number, got {value!r}")
    return STRATEGIES[name](space, **options)


__all__ = [
    "PENALTIES",
    "STRATEGIES",
    "BatchLoss",
    "CostPenalty",
    "Darts",
    "DartsFirstOrder",
    "Dnal",
    "E2nas",
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
