"""Train a table's VAE once and keep it: E2NAS trains its D-VAE offline (methods.md §3a), so a
second search in the same space loads it instead of training again.

One file per (table key, nz, hs, seed, format version), named
``<space>-<nodes>n-<sha256(...)[:16]>.pt`` under ``cache_dir()``, holding its metadata beside the
``state_dict`` and written atomically (temp file + ``os.replace``), so that a crash mid-write
leaves either the old file or none. Loading trusts nothing: the stored key, sizes and version
must match what was asked (the hash already makes names differ, this catches a renamed or
colliding file), and a file that does not load or does not match is rebuilt with a one-line
warning, never used and never fatal.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from morphnas import caches
from morphnas.latent.codes import ChoiceTable
from morphnas.latent.vae import GraphVae, TrainConfig, freeze, train_vae

FORMAT = "morphnas.e2nas-vae"
FORMAT_VERSION = 1

__all__ = ["FORMAT_VERSION", "cache_dir", "cache_path", "load_or_train", "train_vae"]


def cache_dir() -> Path:
    """``$MORPHNAS_CACHE/e2nas`` if ``MORPHNAS_CACHE`` is set, else ``~/.cache/morphnas/e2nas``."""
    return caches.cache_dir("e2nas")


def cache_path(table: ChoiceTable, *, nz: int, hs: int, seed: int) -> Path:
    """The file a table's VAE is kept in."""
    text = f"{table.key}|nz={nz}|hs={hs}|seed={seed}|v{FORMAT_VERSION}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir() / f"{table.space}-{table.nodes}n-{digest}.pt"


def load_or_train(
    table: ChoiceTable,
    *,
    nz: int = 16,
    hs: int = 64,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    warn: Callable[[str], None] | None = None,
    config: TrainConfig | None = None,
) -> tuple[GraphVae, dict]:
    """The frozen VAE of ``table`` (eval mode, no weight gradients), loaded from the cache when a
    matching file is there, else trained and saved.

    ``info``: ``path``, ``cached`` (loaded, not trained), ``seconds`` (training seconds, 0 when
    cached), ``accuracy`` (held-out exact reconstruction when it was trained), ``steps``. A
    file that cannot be saved (read-only cache) costs a warning, not the search.
    """
    warn = warn or _default_warn
    path = cache_path(table, nz=nz, hs=hs, seed=seed)
    if path.exists():
        loaded = _load(path, table, nz=nz, hs=hs, seed=seed, warn=warn)
        if loaded is not None:
            return loaded
    vae, info = train_vae(table, nz=nz, hs=hs, seed=seed, progress=progress, config=config)
    info = {**info, "path": str(path), "cached": False}
    try:
        _save(path, vae, table, nz=nz, hs=hs, seed=seed, info=info)
    except OSError as err:
        warn(f"e2nas: could not cache the VAE at {path} ({err.strerror or err}); using it unsaved")
    return vae, info


def _default_warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _header(table: ChoiceTable, *, nz: int, hs: int, seed: int) -> dict[str, Any]:
    """What a cache file must say it is: written with the weights, compared on load."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": table.key,
        "nz": nz,
        "hs": hs,
        "seed": seed,
    }


def _load(
    path: Path, table: ChoiceTable, *, nz: int, hs: int, seed: int, warn: Callable[[str], None]
) -> tuple[GraphVae, dict] | None:
    """The cached VAE, or ``None`` (after one warning) when the file is unreadable, of another
    format or version, or for another table/size/seed."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: truncated, garbage, another pickle
        warn(f"e2nas: cached VAE {path.name} is unreadable ({type(err).__name__}); retraining")
        return None
    expected = _header(table, nz=nz, hs=hs, seed=seed)
    if not isinstance(blob, dict):
        warn(f"e2nas: cached VAE {path.name} is not a VAE file; retraining")
        return None
    wrong = [name for name, value in expected.items() if blob.get(name) != value]
    if wrong:
        warn(f"e2nas: cached VAE {path.name} is for another {'/'.join(wrong)}; retraining")
        return None
    vae = GraphVae(table, nz=nz, hs=hs)
    try:
        vae.load_state_dict(blob["state_dict"])
    except (KeyError, RuntimeError, TypeError) as err:
        warn(
            f"e2nas: cached VAE {path.name} has unusable weights ({type(err).__name__}); retraining"
        )
        return None
    info = {
        "path": str(path),
        "cached": True,
        "seconds": 0.0,
        "trained_seconds": float(blob.get("seconds", 0.0)),
        "accuracy": float(blob.get("accuracy", float("nan"))),
        "steps": int(blob.get("steps", 0)),
    }
    return freeze(vae), info


def _save(
    path: Path,
    vae: GraphVae,
    table: ChoiceTable,
    *,
    nz: int,
    hs: int,
    seed: int,
    info: dict[str, Any],
) -> None:
    """Write the VAE and its metadata atomically."""
    blob = {
        **_header(table, nz=nz, hs=hs, seed=seed),
        "accuracy": float(info["accuracy"]),
        "seconds": float(info["seconds"]),
        "steps": int(info["steps"]),
        "saved": time.time(),
        "state_dict": vae.state_dict(),
    }
    caches.save_atomic(blob, path)
