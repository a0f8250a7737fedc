"""Atomic checkpoints: a crash or a full disk mid-write leaves the previous file intact.

Both directions fail as one-line ``UserError``s, because both are about the user's files, not
bugs: writing can hit a full disk or a read-only directory; reading can meet a file truncated by
an old crash, a corrupted copy, or something that is not a morphnas checkpoint at all.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from morphnas.engine.faults import crash_point
from morphnas.errors import UserError

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive (the default since PyTorch 1.6)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``.

    The rename is the only step that touches ``path``, so a failure before it (e.g. the disk
    fills up) leaves the previous checkpoint as it was; the partial temp file is removed so it
    does not hold on to the space. An ``OSError`` becomes a ``UserError`` that says what to do.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(_write_message(err, path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        crash_point("checkpoint")
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is not None:
            raise UserError(_write_message(cause, path)) from None
        raise
    _sync_directory(path.parent)


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write. torch's zip writer turns a full disk into a
    ``RuntimeError`` ("unexpected pos ...") raised while the real ``OSError`` is handled, so
    the exception chain is searched, not just the exception's type."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _sync_directory(directory: Path) -> None:
    """fsync the directory so the rename itself survives a power cut (best effort: not every
    platform or file system lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_message(err: OSError, path: Path) -> str:
    reason = err.strerror or type(err).__name__
    if err.errno in _NO_SPACE:
        fix = (
            f"free some disk space, then resume the run (--resume); any earlier {path.name} "
            "is intact"
        )
    elif err.errno in _NOT_WRITABLE:
        fix = f"make {path.parent} writable or choose another --out"
    else:
        fix = "check the output directory (--out)"
    return f"cannot save {path}: {reason}; {fix}"


def load(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True`` (no arbitrary unpickling); a bad file is a ``UserError``.

    Each way a file can be bad gets its own message: missing, empty, truncated (a zip archive
    without its end), not a PyTorch file, or a pickle of Python objects that a morphnas
    checkpoint never holds (refused unopened, for safety). Only a dict is a morphnas checkpoint.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(len(_ZIP_MAGIC))
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}; check the run directory") from None
    except OSError as err:
        raise UserError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    recreate = (
        "delete it and --resume to redo that part of a stopped run, or run again with --force"
    )
    if not head:
        raise UserError(
            f"checkpoint {path} is empty (0 bytes: the write that made it was cut short); "
            f"{recreate}"
        )
    if head != _ZIP_MAGIC:
        raise UserError(
            f"{path} is not a morphnas checkpoint (not a PyTorch zip file; corrupted, or a "
            "different kind of file); check the path"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns on stderr for some foreign files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path} is not a morphnas checkpoint: it holds Python objects other than tensors, "
            "which are not unpickled for safety; check the path"
        ) from None
    except Exception as err:  # torch raises many types for a truncated or corrupted archive
        reason = " ".join(str(err).split()).split(". ")[0][:160] or type(err).__name__
        raise UserError(
            f"checkpoint {path} is truncated or corrupted ({reason}); {recreate}"
        ) from None
    if not isinstance(state, dict):
        raise UserError(
            f"{path} is not a morphnas checkpoint (it holds a {type(state).__name__}, not a "
            "dict of tensors); check the path"
        )
    return state
