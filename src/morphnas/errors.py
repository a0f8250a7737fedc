"""The exception that reaches users as a one-line message (exit code 2), never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a person (a file, a flag, a config value): what is wrong and how to fix it."""
