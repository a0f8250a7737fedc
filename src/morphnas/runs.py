"""Run directories: which command started one (``run.json``, what ``--resume`` checks, so that
``train --resume`` never finishes a stopped search), and replacing one (``--force``): a
transaction, so that a directory never holds two runs and nothing of the old run is ever read
by the new one.

``--force`` over a directory that holds a run does not write into it: when the new run is
about to write its first file (every check a person can fail — config, data, space, strategy
options, the output path — has passed by then), the old directory is renamed, in one atomic
step, to a sibling ``<name>.old-<time>-<pid>``; a fresh directory takes its place and receives
the new ``config.yaml``; then the old run is deleted. If that start fails (or is interrupted),
the old run is put back as it was. A process killed between the rename and the deletion leaves
the old run whole in that sibling, for the person to delete.

Where the directory itself cannot be renamed (a mount point, or a parent this user may not
write) its entries are moved, one rename each, into a hidden ``.old-<time>-<pid>`` folder inside
it, which is deleted the same way; nothing in morphnas reads such a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from morphnas.errors import UserError

# Every run morphnas writes (search, train, compare, benchmark) starts with this file.
MARKER = "config.yaml"


# Which command started a run directory, {"kind": "search" | "train"}: what --resume checks.
KIND_FILE = "run.json"


def record_kind(run_dir: Path, kind: str) -> None:
    """Write which command started ``run_dir`` (``OSError`` to the caller, which names it)."""
    (run_dir / KIND_FILE).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")


def kind_of(run_dir: Path) -> str | None:
    """The command that started ``run_dir``: its ``run.json``, or for a run from before that
    file, a search checkpoint says search; None when nothing says."""
    try:
        kind = json.loads((run_dir / KIND_FILE).read_text("utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if isinstance(kind, str):
        return kind
    return "search" if (run_dir / "checkpoints" / "search_last.pt").is_file() else None


def holds_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and next(run_dir.iterdir(), None) is not None


def check_replaceable(run_dir: Path, inputs: Iterable[Path | None] = ()) -> None:
    """Refuse, before any work, a ``--force`` that would delete more than an old run: a
    directory that holds no morphnas run, one that holds the working directory, or one that
    holds an input file of the new run (``inputs``: its CSV or corpus)."""
    if not holds_files(run_dir):
        return
    if not (run_dir / MARKER).is_file():
        raise UserError(
            f"output directory {run_dir} holds files but no morphnas run (no {MARKER}); --force "
            "replaces only a run: choose another --out, or empty it yourself"
        )
    where = run_dir.resolve()
    if Path.cwd().resolve().is_relative_to(where):
        raise UserError(
            f"--force would delete {run_dir}, which holds the working directory; run from "
            "elsewhere or choose another --out"
        )
    for path in inputs:
        if path is not None and Path(path).resolve().is_relative_to(where):
            raise UserError(
                f"--force would delete {path}, an input of this run, with the old run in "
                f"{run_dir}; move it out or choose another --out"
            )


@dataclass(frozen=True)
class _Aside:
    old: Path  # where the old run's entries now are
    home: Path  # the run directory (symlinks resolved)
    inside: bool  # ``old`` is a folder inside ``home`` (the directory could not be renamed)


def replace_run(run_dir: Path, start: Callable[[], None]) -> None:
    """Run ``start`` (it creates ``run_dir`` and writes the new run's first file) in place of
    the old run in ``run_dir``: the old one is moved aside first, deleted after ``start``
    succeeds, and put back if it fails. Without files in ``run_dir`` this is ``start()``."""
    if not holds_files(run_dir):
        start()
        return
    aside = _move_aside(run_dir)
    try:
        start()
    except BaseException:
        _put_back(aside)
        raise
    try:
        shutil.rmtree(aside.old)
    except OSError as err:
        warnings.warn(
            f"the old run, moved to {aside.old}, could not be deleted ({err.strerror}); "
            "the new run does not read it: delete it yourself",
            stacklevel=3,
        )


def _move_aside(run_dir: Path) -> _Aside:
    home = run_dir.resolve()  # a symlinked --out goes on pointing at the new run
    stamp = f"old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    sibling = home.with_name(f"{home.name}.{stamp}")
    try:
        home.rename(sibling)
    except OSError:
        pass  # a mount point, or a parent we may not write: empty it in place instead
    else:
        try:
            home.mkdir()
        except OSError as err:
            sibling.rename(home)
            raise _cannot(run_dir, err) from None
        return _Aside(sibling, home, inside=False)
    inside = home / f".{stamp}"
    moved: list[Path] = []
    try:
        inside.mkdir()
        for entry in sorted(home.iterdir()):
            if entry != inside:
                entry.rename(inside / entry.name)
                moved.append(entry)
    except OSError as err:
        for entry in moved:
            (inside / entry.name).rename(entry)
        if inside.is_dir():
            inside.rmdir()
        raise _cannot(run_dir, err) from None
    return _Aside(inside, home, inside=True)


def _put_back(aside: _Aside) -> None:
    """The old run where it was, the failed start's files gone."""
    try:
        if aside.inside:
            for entry in aside.home.iterdir():
                if entry != aside.old:
                    _delete(entry)
            for entry in aside.old.iterdir():
                entry.rename(aside.home / entry.name)
            aside.old.rmdir()
        else:
            shutil.rmtree(aside.home, ignore_errors=True)
            aside.old.rename(aside.home)
    except OSError as err:
        warnings.warn(
            f"the new run could not start and the old run could not be put back "
            f"({err.strerror}): it is whole in {aside.old}",
            stacklevel=4,
        )


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _cannot(run_dir: Path, err: OSError) -> UserError:
    return UserError(
        f"cannot move the old run in {run_dir} out of the way ({err.strerror}); it is kept as "
        "it was: delete it yourself or choose another --out"
    )
