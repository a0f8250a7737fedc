"""The exception that reaches users as a one-line message (exit code 2), never a traceback,
and the argument check that the library's constructors share."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a person (a file, a flag, a config value): what is wrong and how to fix it."""


def check_count(name: str, value: object, minimum: int, hint: str = "") -> None:
    """A count (steps, terms, samples, ...) must be an ``int`` of at least ``minimum``; a ``bool``
    is refused although Python counts it as one (``steps=True`` is a slip, not 1). ``hint`` goes
    after the bound in the message, e.g. ``" (0: off)"``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{hint}, got {value!r}")
