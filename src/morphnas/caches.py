"""The per-machine caches of artefacts a search trains once and reuses (E2NAS's graph VAEs,
LA-DNAS's latency predictors): where they live, and how a file is written so that a crash or a
concurrent writer never leaves a half-written one behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def cache_dir(name: str) -> Path:
    """``$MORPHNAS_CACHE/<name>`` if ``MORPHNAS_CACHE`` is set, else
    ``~/.cache/morphnas/<name>``."""
    root = os.environ.get("MORPHNAS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "morphnas") / name


def save_atomic(blob: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``: a reader sees
    the old file or the whole new one. Raises ``OSError`` (the caller decides whether a cache
    that cannot be written matters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(blob, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
