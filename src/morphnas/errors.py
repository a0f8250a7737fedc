"""The one exception type that reaches users as a one-line message (exit code 2), never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a person: a file, a flag, a config value. The message says what and how to fix it."""
