"""Free-form constructor options (``space.options``, ``search.strategy_options``), typed by the
constructor they go to.

They reach a space or a strategy as keyword arguments, so its signature is the one place that
says which names exist and what type each takes. YAML already reads true/false/yes/no/on/off as
booleans and 3 / 1e-3 as numbers; text that reaches here (a quoted value, or a word YAML does not
know, such as ``maybe``) is converted only where that is unambiguous, or refused naming the
option. ``try_space`` builds the space once at a tiny size so that its own range checks run when
the config is resolved, before any run directory exists.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

INT64_MAX = 2**63 - 1
"""The largest integer any config key takes: seeds (torch and NumPy generators, run as a 64-bit
signed value) and every count, so no value overflows inside torch or NumPy later."""


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True}
_BOOL_WORDS |= {"false": False, "no": False, "off": False, "0": False}
_BOOL_HINT = "true or false (or yes/no, on/off, 1/0)"


def space_names() -> tuple[str, ...]:
    """The registered search spaces (``spaces.SPACES``), in registry order: the config accepts
    what the registry holds, and a new space needs no second list."""
    from morphnas import spaces  # on demand: spaces import torch modules and native kernels

    return tuple(spaces.SPACES)


def strategy_names() -> tuple[str, ...]:
    """The registered strategies (``strategies.STRATEGIES``), in registry order."""
    from morphnas import strategies  # on demand, as space_names

    return tuple(strategies.STRATEGIES)


def baseline_names() -> tuple[str, ...]:
    """Every baseline a run can train beside its cell: torch's recurrent cells
    (``cells.BASELINES``), the published cells (``genotype.PUBLISHED_BASELINES``) and each task
    kind's own (``TaskKind.baselines``; config refuses another kind's)."""
    from morphnas import cells, tasks  # on demand, as space_names
    from morphnas.genotype import PUBLISHED_BASELINES

    own = [name for kind in tasks.KINDS.values() for name in kind.baselines]
    return (*cells.BASELINES, *PUBLISHED_BASELINES, *own)


@functools.cache
def space_option_types(name: str) -> dict[str, Any]:
    """The options space ``name`` takes (its constructor's parameters but the sizes) and their
    annotated types."""
    from morphnas import spaces  # on demand: spaces import torch modules and native kernels

    init = spaces.SPACES[name].__init__
    return _parameter_types(
        init, lambda p: p.name not in ("self", "input_size", "hidden_size", "nodes")
    )


@functools.cache
def strategy_option_types(name: str) -> dict[str, Any]:
    """The keyword options strategy ``name`` takes (its own and the shared ones, as
    ``strategies.options_of``) and their annotated types."""
    from morphnas import strategies

    found: dict[str, Any] = {}
    for cls in strategies.STRATEGIES[name].__mro__:
        if cls is not object and "__init__" in vars(cls):
            own = _parameter_types(vars(cls)["__init__"], _keyword_only)
            for key, kind in own.items():
                found.setdefault(key, kind)
    found.pop("space", None)
    return found


def _keyword_only(parameter: inspect.Parameter) -> bool:
    return parameter.kind is inspect.Parameter.KEYWORD_ONLY


def _parameter_types(
    function: Callable[..., Any], keep: Callable[[inspect.Parameter], bool]
) -> dict[str, Any]:
    hints = typing.get_type_hints(function)
    parameters = inspect.signature(function).parameters.values()
    return {p.name: hints.get(p.name, Any) for p in parameters if keep(p)}


def checked_options(
    owner: str, options: Mapping[Any, Any], kinds: Mapping[str, Any]
) -> dict[str, Any]:
    """``options`` for ``owner``'s constructor, each converted to its annotated type where that
    is unambiguous; an unknown name, or a value of the wrong type, is a ``ValueError`` naming
    the option and what it takes."""
    unknown = sorted((key for key in options if key not in kinds), key=str)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(kinds), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close and len(unknown) == 1 else ""
        if "nodes" in unknown:
            hint = " (the node count is space.nodes, --nodes)"
        accepted = ", ".join(sorted(kinds))
        raise ValueError(f"unknown {owner} option(s) {unknown}{hint}; accepted: {accepted}")
    return {key: _option_value(owner, key, value, kinds[key]) for key, value in options.items()}


def _option_value(owner: str, key: str, value: Any, annotation: Any) -> Any:
    """``value`` as parameter ``key`` (typed ``annotation``) takes it, or a ``ValueError``.
    Handled: ``bool``, ``int``, ``float``, ``str`` and ``Sequence[str]``, each optionally
    ``| None``; another type is passed on as given (the constructor checks it)."""
    union = typing.get_origin(annotation) in (Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    kinds = [arg for arg in args if arg is not type(None)]
    what = f"{owner} option {key}"
    if value is None:
        if type(None) in args or len(kinds) != 1 or kinds[0] is Any:
            return None
        raise ValueError(f"{what} takes {_describe(kinds[0])}, not null")
    if len(kinds) != 1:
        return value
    kind, origin = kinds[0], typing.get_origin(kinds[0])
    if kind is bool:
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ValueError(f"{what} must be {_BOOL_HINT}, got {short_repr(value)}")
    if kind is int:
        number = _integer(value)
        if number is None:
            raise ValueError(f"{what} must be an integer, got {short_repr(value)}")
        return number
    if kind is float:
        real = _real(value)
        if real is None:
            raise ValueError(f"{what} must be a number, got {short_repr(value)}")
        if not math.isfinite(real):
            raise ValueError(f"{what} must be a finite number, got {short_repr(value)}")
        return value if type(value) in (int, float) else real
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{what} must be text, got {short_repr(value)}")
        return value
    if origin in (Sequence, list, tuple) and typing.get_args(kind)[:1] == (str,):
        if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            return list(value)
        raise ValueError(f"{what} must be a list of names, e.g. [a, b], got {short_repr(value)}")
    return value


def _describe(kind: Any) -> str:
    names = {bool: _BOOL_HINT, int: "an integer", float: "a number", str: "text"}
    return names.get(kind, "a value")


def _integer(value: Any) -> int | None:
    """An integer given as one, as an integral float (``1e3``) or as text; else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return _integer(int(value.strip()))
        except ValueError:
            value = _real(value)
    if isinstance(value, numbers.Integral):
        number = int(value)
        return number if abs(number) <= INT64_MAX else None
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return _integer(int(value))
    return None


def _real(value: Any) -> float | None:
    """A number given as one or as text (``'3e-4'``), as a float; else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, str):
            return float(value.strip())
        if isinstance(value, numbers.Real):
            return float(value)
    except (ValueError, OverflowError):
        return None
    return None


def try_space(name: str, nodes: int, options: Mapping[str, Any]) -> None:
    """Build space ``name`` on one feature and two hidden units with ``options``, so that its
    constructor's own checks (ranges, names, the carried cell state) run now. The global random
    generator is left as it was (a config may be resolved after a run seeded it)."""
    import torch

    from morphnas import spaces

    with torch.random.fork_rng(devices=[]):
        try:
            # two hidden units per channel group (darts_cnn's partial_channels must divide
            # the width; config checks space.hidden against it)
            width = 2 * options.get("partial_channels", 1)
            spaces.build(name, 1, width, nodes, **options)
        except (TypeError, ValueError) as err:
            raise ValueError(str(err).replace("\n", " ")) from None
        except Exception as err:  # e.g. torch's RuntimeError on an init range below zero
            reason = str(err).replace("\n", " ")
            raise ValueError(f"the {name} space cannot be built with them: {reason}") from None


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
