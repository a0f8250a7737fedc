"""Atomic checkpoints: a crash mid-write leaves the previous file intact."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from morphnas.errors import UserError


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> Any:
    """Load with ``weights_only=True`` (no arbitrary unpickling); a bad file is a ``UserError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as err:  # torch raises many types for a truncated or foreign file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load checkpoint {path}: {reason}") from None
