"""Run directories, from the start of a run to its resumption: where a command may write
(``claim``: refused over an existing run without ``--resume`` or ``--force``), what a run
records when it starts (``start``: ``config.yaml`` and ``run.json``), what ``--resume`` checks
before it touches anything (``resumable``, ``check_continuable``, ``checked_checkpoint``) and
the repairs it makes once it writes (``continue_run``), and replacing one (``--force``): a
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

import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morphnas import config as config_mod
from morphnas import run_files, tasks
from morphnas.config import RunConfig
from morphnas.engine.checkpoint import load as load_checkpoint
from morphnas.engine.resume import checked
from morphnas.errors import UserError

# Every run morphnas writes (search, train, compare, benchmark) starts with this file.
MARKER = "config.yaml"


# What a run directory is (``{"kind", "id", "config", "inputs"}``), written when the run starts:
# the command that started it (search or train), a run id that every checkpoint of the run also
# carries, the config it started with and the size and hash of each input file. ``--resume``
# checks all four before it touches anything, so a stopped run continues only with its own
# config, its own checkpoints and the data it started on.
KIND_FILE = "run.json"

# Keys a resumed run may change in config.yaml: the thread count (``--resume --threads``) and
# where the directory is (a run directory can be moved).
_FREE_KEYS = ("threads", "out")


def config_record(config: RunConfig) -> dict[str, Any]:
    """The part of a resolved config a resumed run must share with its start (JSON values)."""
    record = config.model_dump(mode="json")
    for key in _FREE_KEYS:
        record.pop(key, None)
    return record


def file_digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of an input file (1 MiB blocks: a large CSV is never held whole), or
    of a folder of them (an image folder: every file's relative path and bytes, in sorted
    order, so that a file added, removed, renamed or changed is seen)."""
    path = Path(path)
    digest = hashlib.sha256()
    size = 0
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode("utf-8") + b"\0")
        with file.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
                size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def start_record(
    kind: str, config: RunConfig, inputs: Iterable[Path | None] = ()
) -> dict[str, Any]:
    """The ``run.json`` of a run that starts now: a fresh id, its config and its input files."""
    return {
        "kind": kind,
        "id": uuid.uuid4().hex,
        "config": config_record(config),
        "inputs": {str(p): file_digest(p) for p in inputs if p is not None},
    }


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``run.json`` (``OSError`` to the caller, which names it)."""
    (run_dir / KIND_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def read_record(run_dir: Path) -> dict[str, Any]:
    """``run.json`` as a dict; ``{}`` for a run from before it existed. A damaged one is a
    one-line error: without it nothing a ``--resume`` must check could be checked."""
    path = run_dir / KIND_FILE
    try:
        record = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("kind", ""), str):
        raise UserError(
            f"{path} is damaged (it records what the run started with, which --resume checks); "
            "restore it from a copy, or start afresh with --force"
        )
    return record


def kind_of(run_dir: Path) -> str | None:
    """The command that started ``run_dir``: its ``run.json``, or for a run from before that
    file, a search checkpoint says search; None when nothing says."""
    kind = read_record(run_dir).get("kind")
    if kind is not None:
        return kind
    return "search" if (run_dir / "checkpoints" / "search_last.pt").is_file() else None


def check_continuable(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    """Refuse to resume ``run_dir`` with ``config`` (its config.yaml, resolved) when that file
    no longer says what the run started with, or an input file changed since; return the
    run's record (its ``id`` is what the checkpoints must carry)."""
    record = read_record(run_dir)
    started = record.get("config")
    fresh = "start afresh with --force"
    if isinstance(started, dict):
        changed = _differences(started, config_record(config))
        if changed:
            shown = "; ".join(f"{key}: {was!r} then, {now!r} now" for key, was, now in changed[:3])
            more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
            raise UserError(
                f"{run_dir / MARKER} was edited after the run started ({shown}{more}); a run "
                f"resumes only with the config it started with: put it back, or {fresh}"
            )
    for name, digest in (record.get("inputs") or {}).items():
        try:
            now = file_digest(Path(name))
        except OSError as err:
            raise UserError(
                f"cannot read {name}, an input of {run_dir} ({err.strerror}); a run resumes "
                f"on the data it started with: put the file back, or {fresh}"
            ) from None
        if now != digest:
            how = (
                f"{digest.get('bytes')} bytes then, {now['bytes']} now"
                if now["bytes"] != digest.get("bytes")
                else "same size, other content"
            )
            raise UserError(
                f"{name} changed after {run_dir} started ({how}); a run resumes on the data it "
                f"started with: restore that file, or {fresh} on the new data"
            )
    return record


def _differences(then: Any, now: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two config records."""
    if isinstance(then, dict) and isinstance(now, dict):
        found = []
        for key in list(then) + [k for k in now if k not in then]:
            found += _differences(then.get(key), now.get(key), f"{prefix}{key}.")
        return found
    return [] if then == now else [(prefix.rstrip("."), then, now)]


@contextmanager
def dropped_if_nothing_saved(run_dir: Path, existed: bool) -> Iterator[None]:
    """A new run that fails with a ``UserError`` before it saved a checkpoint or a model (a
    loss that diverged in the first epoch, say) holds nothing a ``--resume`` could continue:
    its directory is removed (emptied, if it existed before the run), so that the corrected
    command runs with the same ``--out``, and the message says so."""
    try:
        yield
    except UserError as err:
        if run_dir.is_dir() and not any(run_dir.rglob("*.pt")):
            try:
                for entry in run_dir.iterdir():
                    _delete(entry)
                if not existed:
                    run_dir.rmdir()
            except OSError:
                raise err from None
            raise UserError(f"{err}; nothing was saved, so {run_dir} was cleared") from None
        raise


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


def claim(
    config: RunConfig, kind: str, force: bool, resume: bool = False, *, reuse: bool = False
) -> Path:
    """The run directory this command will write: refused if it already holds a run, unless the
    command resumes it (then it must hold an unfinished run), continues it (a compare's
    ``reuse``) or replaces it (``force``: only a morphnas run, and not one that holds this
    run's input or working directory; the replacement itself waits for ``start``)."""
    if resume:
        run_dir = resumable(config.out, kind)
        check_continuable(run_dir, config)
        return run_dir
    name = tasks.kind_for(config).run_name()
    run_dir = config.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{name}"
    if not writable_dir(run_dir) or not any(run_dir.iterdir()) or reuse:
        return run_dir
    if not force:
        raise UserError(
            f"output directory {run_dir} already holds files; choose another --out, "
            "pass --resume to continue it, or --force to replace it"
        )
    check_replaceable(run_dir, tasks.kind_for(config).inputs())
    return run_dir


def writable_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` exists; refuse now an --out that could not be created or written,
    rather than after the data were loaded or a search ran (nothing is created here)."""
    fix = "choose another --out"
    try:
        existing = run_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            where = "is a file" if existing == run_dir else f"is inside {existing}, a file"
            raise UserError(f"output path {run_dir} {where}; {fix}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(
                f"cannot write to output directory {run_dir}: {existing} is not writable "
                f"(permission denied); {fix} or make it writable"
            )
        if existing == run_dir:
            next(run_dir.iterdir(), None)  # readable too: it is checked for an earlier run
        return existing == run_dir
    except OSError as err:
        raise UserError(f"cannot use output directory {run_dir}: {err.strerror}; {fix}") from None


def resumable(run_dir: Path | None, kind: str | None = None) -> Path:
    """``run_dir``, checked before anything in it is touched: an unfinished morphnas run of the
    command ``kind`` (a search resumed by ``train`` would finish as a one-model run, its search
    lost; a train run resumed by ``search`` would run a whole search inside it)."""
    if run_dir is not None and not Path(run_dir).exists():
        raise UserError(f"run directory {run_dir} not found; give the --out of the stopped run")
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a morphnas run directory (no config.yaml) to resume")
    if (Path(run_dir) / "summary.json").is_file():
        raise UserError(
            f"{run_dir} has finished (summary.json exists): nothing to resume; `morphnas "
            f"evaluate {run_dir}` scores it again, --force runs it again from the start"
        )
    try:
        blank = not (Path(run_dir) / "config.yaml").read_text("utf-8", "replace").strip()
    except OSError:
        blank = False  # named when it is read
    if blank:
        raise UserError(
            f"{Path(run_dir) / 'config.yaml'} is empty; put back the config the run started "
            f'with (run.json holds a copy, under "config"), or start afresh with --force'
        )
    started = kind_of(Path(run_dir))
    if kind is not None and started is not None and started != kind:
        raise UserError(
            f"{run_dir} is a {started} run, not a {kind} run; continue it with "
            f"`morphnas {started} --resume {run_dir}`"
        )
    return Path(run_dir)


def start(run_dir: Path, config: RunConfig, kind: str | None, *, replace: bool = False) -> None:
    """Create the run directory and save the resolved config, its thread count included (set
    by the caller; a resumed run keeps it, whatever else runs on the machine then), and for a
    run ``--resume`` continues, ``run.json``: its ``kind`` (search, train), id, config and
    input files (``start_record``), which ``--resume`` checks.

    ``replace`` (``--force``): an old run in ``run_dir`` is moved aside first and deleted once
    the config is written, or put back if that fails (``replace_run``)."""
    inputs = tasks.kind_for(config).inputs()
    record = start_record(kind, config, inputs) if kind is not None else None

    def begin() -> None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if record is not None:  # a run --resume continues: search or train
                write_record(run_dir, record)
            (run_dir / "config.yaml").write_text(config_mod.dump(config), encoding="utf-8")
        except OSError as err:
            raise UserError(
                f"cannot write to output directory {run_dir}: {err.strerror}; choose another "
                "--out or free space / fix its permissions"
            ) from None

    if replace:
        replace_run(run_dir, begin)
    else:
        begin()


def continue_run(
    run_dir: Path, config: RunConfig, saved: dict[str, Any] | None
) -> Callable[[], None]:
    """Check what a stopped run holds, and return the repairs that bring its files back to the
    state of its checkpoints: the metrics rows written after them dropped (they will be written
    again), the growth history likewise, and a new thread count (``--resume --threads``) saved.

    Every check is made now: each checkpoint and saved model must be whole and of this run
    (``checked_checkpoint``), every metrics line readable. The repairs run when the resumed run
    writes its first row (``run_files.MetricsLog``), so a resume that fails before then — a
    checkpoint that does not fit the model built from the config, say — changes no file.
    """
    search_done = 0
    if saved is not None:
        search_done = saved["epoch"] if saved["position"] is None else saved["epoch"] - 1
    trained = {}
    for path in (run_dir / "models").glob("*.pt"):
        checked_checkpoint(path, "model", run_dir)
        trained[path.stem] = float("inf")
    for path in (run_dir / "checkpoints").glob("train_*.pt"):
        state = checked_checkpoint(path, "train", run_dir)
        name = path.stem.removeprefix("train_")
        if name not in trained:
            trained[name] = state["epoch"] if state["position"] is None else state["epoch"] - 1
    metrics = run_files.MetricsLog(run_dir / "metrics.jsonl")
    run_files.read_metrics(metrics.path)  # a damaged line is refused now, naming it

    def keep(row: dict[str, Any]) -> bool:
        if row.get("phase") == "search":
            return row.get("epoch", 0) <= search_done
        return row.get("epoch", 0) <= trained.get(row.get("model", ""), 0)

    def repair() -> None:
        metrics.keep(keep)
        if saved is not None:
            run_files.write_json(run_dir / "history.json", saved["growth"]["events"])
        on_file = config_mod.resolve(run_dir / "config.yaml")
        if on_file.threads != config.threads:
            update = config_mod.resolve(base=on_file, overrides={"threads": config.threads})
            (run_dir / "config.yaml").write_text(config_mod.dump(update), encoding="utf-8")

    return repair


def checked_checkpoint(path: Path, kind: str, run_dir: Path) -> dict[str, Any]:
    """A whole checkpoint of ``kind`` written by this version of morphnas for the run in
    ``run_dir`` (the id in its ``run.json``), or a one-line error."""
    return checked(load_checkpoint(path), path, kind, read_record(run_dir).get("id"))


def stamp(run_dir: Path) -> dict[str, Any] | None:
    """What every checkpoint of the run in ``run_dir`` carries under ``run``: its id."""
    run_id = read_record(run_dir).get("id")
    return {"id": run_id} if run_id else None
