"""A run's own files: written whole (``MetricsLog``, ``write_json``: a crash never leaves half a
row or half a file), and read back through readers that validate and name file and line.

The engine writes through this module only (never through the plotting module, ``report``).

``evaluate``, ``plot``, ``compare --reuse`` and the benchmark suite read a finished (or stopped)
run's ``summary.json``, ``history.json``, ``metrics.jsonl`` and ``config.yaml`` only through these
readers. Whatever is wrong with a file (missing, a directory, not UTF-8, not JSON, JSON of the
wrong shape) is a one-line :class:`~morphnas.errors.UserError` that names the file and, where a
line can be named, the line: never a traceback, and never a silently wrong result.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from morphnas.errors import UserError

if TYPE_CHECKING:
    from morphnas.config import RunConfig

# The fix every message here ends with: a run's files are written only by morphnas, so a damaged
# one comes from a copy, an editor or a failing disk.
DAMAGED = "the file is damaged: restore it from a copy, or run the command again with --force"
_TYPE_NAMES = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "an integer"}


def _to_builtin(value: Any) -> Any:
    """``json`` fallback: numpy and torch scalars and arrays become Python numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per line, written whole so a crash loses nothing.

    Each row is written with its newline and the file closed before ``append`` returns. A log
    whose last line was cut off by a crash has that partial line dropped before the next row,
    so the row starts on a line of its own instead of fusing with it into a line nobody can
    parse.

    Opening an existing log changes nothing: a resumed run's repairs (``before_first``: drop
    the rows written after its checkpoints, rewrite the growth history) run just before its
    first row is written, so a resumed run that fails before then (a checkpoint that does not
    fit, say) leaves every file of the run as it was.

    ``on_append`` (set by ``morphnas.tensorboard.attach``) sees each row once it is in the file,
    as read back from it: every loop that logs a row feeds it, and only rows the file keeps.
    """

    def __init__(self, path: Path, before_first: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self._before_first = before_first
        self._opened = False  # no row written yet by this process
        self.on_append: Callable[[dict[str, Any]], None] | None = None
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` as one line; numpy/torch values are converted to plain numbers."""
        line = json.dumps(row, default=_to_builtin)
        self._ready()
        with self.path.open("a", encoding="utf-8") as file:
            file.write(line + "\n")
        if self.on_append is not None:
            self.on_append(json.loads(line))

    def _ready(self) -> None:
        """Before the first row: a partial last line dropped, then the owner's repairs."""
        if self._opened:
            return
        _drop_partial_last_line(self.path)
        if self._before_first is not None:
            self._before_first()
        self._opened = True

    def keep(self, predicate: Callable[[dict[str, Any]], bool]) -> None:
        """Keep only the rows ``predicate`` accepts (a resumed run drops the rows it will write
        again); the file is replaced atomically."""
        rows = [row for row in read_metrics(self.path) if predicate(row)]
        text = "".join(json.dumps(row, default=_to_builtin) + "\n" for row in rows)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)


def _drop_partial_last_line(path: Path) -> None:
    """Truncate ``path`` after its last newline, if a crash left a line without one."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically: readers see the old file or the new, never half.

    The temporary file is created in the target's directory (``os.replace`` is atomic only within
    one file system) with ``os.open`` rather than ``mkstemp``, so the result gets the usual
    umask-based permissions instead of mkstemp's owner-only 0600.
    """
    write_text(path, json.dumps(data, indent=2, default=_to_builtin) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (``write_json``'s temporary file and ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _kind(value: Any) -> str:
    """What a JSON value is, in the words of a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} not found; is this a morphnas run directory?") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a file; move it away") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def _decode(path: Path, data: bytes) -> str:
    """``data`` as UTF-8, else an error naming the line and the byte offset of the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = 1 + data.count(b"\n", 0, err.start)
        raise UserError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); {DAMAGED}"
        ) from None


def read_text(path: Path) -> str:
    """A UTF-8 text file, or a one-line error naming it (and the line of a bad byte)."""
    path = Path(path)
    return _decode(path, _read_bytes(path))


def read_json(path: Path, expect: type = dict) -> Any:
    """A JSON file whose top level is ``expect`` (``dict`` or ``list``)."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path} is empty; {DAMAGED}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}); {DAMAGED}"
        ) from None
    if not isinstance(data, expect):
        raise UserError(
            f"{path}: expected {_TYPE_NAMES.get(expect, expect.__name__)} at the top level, "
            f"found {_kind(data)}; {DAMAGED}"
        )
    return data


# --------------------------------------------------------------------------- metrics.jsonl


def _check_row(path: Path, number: int, row: Any) -> dict[str, Any]:
    """A metrics row: a JSON object; a search or train row has an integer epoch and numeric (or
    null) losses, which the plots rely on."""
    if not isinstance(row, dict):
        raise UserError(
            f"{path}: line {number}: expected a JSON object (one row), found {_kind(row)}; "
            f"{DAMAGED}"
        )
    if row.get("phase") in ("search", "train"):
        epoch = row.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise UserError(
                f'{path}: line {number}: "epoch" must be an integer, found {_kind(epoch)}; '
                f"{DAMAGED}"
            )
        for key in ("train_loss", "valid_loss"):
            value = row.get(key)
            if value is not None and not _is_number(value):
                raise UserError(
                    f'{path}: line {number}: "{key}" must be a number or null, found '
                    f"{_kind(value)}; {DAMAGED}"
                )
    return row


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl, skipping a last line cut off mid-write by a crash.

    Only the last line, and only when it lacks its newline (a row is written whole, with its
    newline), may be cut off; any other unreadable line means the file was damaged by something
    else, which is reported with its line number rather than silently dropped.
    """
    path = Path(path)
    data = _read_bytes(path)
    end = data.rfind(b"\n") + 1
    lines, cut_off = _decode(path, data[:end]).split("\n")[:-1], data[end:]
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path}: line {number}: not valid JSON ({err.msg}, column {err.colno}); {DAMAGED}"
            ) from None
        rows.append(_check_row(path, number, row))
    if cut_off.strip():
        try:
            row = json.loads(cut_off.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return rows  # the partial row a crash left: dropped
        rows.append(_check_row(path, len(lines) + 1, row))
    return rows


# --------------------------------------------------------------------------- history.json


def read_history(path: Path) -> list[dict[str, Any]]:
    """The growth and prune events of ``history.json``: a list of objects, each with its
    ``kind`` (a string) and ``epoch`` (an integer)."""
    path = Path(path)
    events = read_json(path, list)
    for i, event in enumerate(events):
        where = f"{path}: event {i + 1}"
        if not isinstance(event, dict):
            raise UserError(f"{where}: expected a JSON object, found {_kind(event)}; {DAMAGED}")
        if not isinstance(event.get("kind"), str):
            found = _kind(event.get("kind")) if "kind" in event else "nothing"
            raise UserError(f'{where}: "kind" must be a string, found {found}; {DAMAGED}')
        epoch = event.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            found = _kind(epoch) if "epoch" in event else "nothing"
            raise UserError(f'{where}: "epoch" must be an integer, found {found}; {DAMAGED}')
    return events


# --------------------------------------------------------------------------- summary.json


def check_run_dir(run_dir: Path) -> Path:
    """``run_dir``, which must be an existing directory."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} not found")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory")
    return run_dir


def _field(path: Path, where: str, value: Any, expect: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, expect):
        raise UserError(
            f"{path}: {where} must be {_TYPE_NAMES[expect]}, found {_kind(value)}; {DAMAGED}"
        )
    return value


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's ``summary.json``, with the fields ``evaluate``, ``compare`` and the suite
    rely on checked: ``models`` (objects with a ``name`` that is a plain file name and a
    ``kind``), ``results`` (objects with a ``model``), ``genotype`` (an object or null; present
    when a model is of kind ``genotype``) and ``hidden`` (an integer, when present)."""
    run_dir = check_run_dir(run_dir)
    path = run_dir / "summary.json"
    if not path.exists():
        raise UserError(f"{run_dir} is not a finished morphnas run (no summary.json)")
    summary = read_json(path, dict)
    for key in ("models", "results"):
        if key not in summary:
            raise UserError(f'{path}: no "{key}" (a finished run lists its {key}); {DAMAGED}')
        _field(path, f'"{key}"', summary[key], list)
    for i, model in enumerate(summary["models"]):
        _field(path, f"models[{i}]", model, dict)
        name = _field(path, f"models[{i}].name", model.get("name"), str)
        _field(path, f"models[{i}].kind", model.get("kind"), str)
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise UserError(
                f"{path}: models[{i}].name {name!r} is not a model's file name; {DAMAGED}"
            )
    for i, result in enumerate(summary["results"]):
        _field(path, f"results[{i}]", result, dict)
        _field(path, f"results[{i}].model", result.get("model"), str)
    genotype = summary.get("genotype")
    if genotype is not None:
        _field(path, '"genotype"', genotype, dict)
    if not genotype and any(m["kind"] == "genotype" for m in summary["models"]):
        raise UserError(f'{path}: a model of kind "genotype" but no "genotype"; {DAMAGED}')
    if "hidden" in summary:
        hidden = _field(path, '"hidden"', summary["hidden"], int)
        if hidden < 1:
            raise UserError(f'{path}: "hidden" must be at least 1, found {hidden}; {DAMAGED}')
    return summary


# --------------------------------------------------------------------------- config.yaml


def written_task(run_dir: Path) -> str:
    """The task a run's ``config.yaml`` names as written, read before the config is validated
    (another task's config may not validate as this command's, and deserves the command's own
    message); ``forecast`` where it names none or cannot be read (reading the config says why).
    """
    import yaml  # imported here, as config is

    path = check_run_dir(run_dir) / "config.yaml"
    try:
        raw = yaml.safe_load(read_text(path)) if path.is_file() else None
    except yaml.YAMLError:
        return "forecast"
    return str(raw.get("task", "forecast")) if isinstance(raw, dict) else "forecast"


def best_on_valid(results: list[dict[str, Any]], names: Collection[str]) -> str | None:
    """The one of ``names`` whose ``results`` row has the lowest finite ``valid_rse`` (the
    model a forecast or an export uses by default: chosen on valid, never on test)."""
    scores = {
        row["model"]: float(row["valid_rse"])
        for row in results
        if row.get("model") in names
        and isinstance(row.get("valid_rse"), int | float)
        and math.isfinite(row["valid_rse"])
    }
    return min(scores, key=scores.__getitem__) if scores else None


def read_config(run_dir: Path) -> RunConfig:
    """The resolved config a run was made with (its ``config.yaml``)."""
    from morphnas import config as config_mod  # imported here: config is heavy (pydantic)

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise UserError(f"{path} not found; a run needs the config it was made with")
    read_text(path)  # missing, a directory, unreadable, not UTF-8: named with the line
    return config_mod.resolve(path)
