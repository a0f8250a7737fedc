"""The exception that reaches users as a one-line message (exit code 2), never a traceback,
and the argument check that the library's constructors share."""

from __future__ import annotations

import os
from pathlib import Path

# What a path is when opening it fails with ELOOP (the message's middle; the caller names the
# file before it and the fix after it).
LINK_LOOP = "is a symbolic link loop (a link that leads back to itself)"


class UserError(Exception):
    """Bad input from a person (a file, a flag, a config value): what is wrong and how to fix it."""


def check_count(name: str, value: object, minimum: int, hint: str = "") -> None:
    """A count (steps, terms, samples, ...) must be an ``int`` of at least ``minimum``; a ``bool``
    is refused although Python counts it as one (``steps=True`` is a slip, not 1). ``hint`` goes
    after the bound in the message, e.g. ``" (0: off)"``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{hint}, got {value!r}")


def dangling_link(path: str | os.PathLike[str]) -> str | None:
    """``is a symbolic link to 'target', which does not exist`` when a path that was not found
    is such a link (the message's middle, as ``LINK_LOOP``); None when it is simply missing."""
    if not os.path.islink(path):
        return None
    return f"is a symbolic link to {str(Path(path).readlink())!r}, which does not exist"
