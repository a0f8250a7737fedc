"""TensorBoard events for every run: a view of the run's own files, in ``RUN/tensorboard/``.

What goes in, all in one TensorBoard run (the directory ``RUN/tensorboard``):

* each row of ``metrics.jsonl`` the moment it is appended (``attach`` hooks
  ``run_files.MetricsLog``, which every loop writes through): its numbers as scalars tagged
  ``<phase>[/<model>][/lambda_<λ>]/<key>`` (``search/valid_loss``, ``train/lstm/valid_loss``),
  the row's epoch as the step; a row that records an event (a skipped step, a NaN retry, the
  choice of a candidate) as text under ``<phase>/events``;
* a search row's mixing weights: one histogram per node (``arch/s<n>``) and a heatmap of every
  edge's op probabilities (``arch/probabilities``);
* each growth event of ``history.json``: a line of text (``growth/events``) and the scalar
  ``growth/nodes`` (``growth/width`` where the hidden state widened), at the event's epoch;
* at the end (``finish``): the genotype as text, and the run's HParams: the ``HPARAMS`` keys of
  its config, and the searched (or trained) model's final figures as ``hparams/<metric>``.

Why the records are written by hand (``RecordWriter`` on a file opened for appending, as
metrics.jsonl is) rather than through ``SummaryWriter``: no writer thread to flush and close
when a run stops or crashes, nothing buffered to lose, and one file of a fixed name, so two
equal runs leave the same file names.

Why the file is rebuilt from ``metrics.jsonl`` and ``history.json`` when a process writes its
first row: a resumed run drops the rows written after its checkpoints and writes them again,
and TensorBoard cannot forget one tag's step (its purge drops every tag's later steps). Rebuilt
from the repaired files, a resumed run's events are those of an uninterrupted run: no step twice.

``tensorboard`` (the ``track`` extra) is imported only by ``attach``: without it a run writes no
events and warns once; ``tensorboard: false`` (``--no-tensorboard``) writes none, silently.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from morphnas import run_files

if TYPE_CHECKING:
    from morphnas.config import RunConfig
    from morphnas.genotype import Genotype

EVENT_FILE = "events.out.tfevents.morphnas"  # "tfevents" in the name is what TensorBoard reads
# The config keys shown as HParams: what tells two runs of a comparison apart.
HPARAMS = (
    "task", "seed", "space.name", "space.nodes", "space.hidden", "search.strategy",
    "search.order", "search.epochs", "search.lr", "search.arch_lr", "search.batch_size",
    "growth.mode", "train.epochs", "train.lr", "train.batch_size", "data.window", "data.horizon",
)  # fmt: skip
# Row keys that say whose row it is, not what was measured.
_IDENTITY = frozenset({"phase", "model", "lambda", "epoch", "event", "arch"})
_BINS = np.linspace(0.0, 1.0, 21)  # probabilities and gates lie in [0, 1]
_warned = False


@dataclass(frozen=True)
class _Kit:
    """The TensorBoard pieces a board writes with, imported once by ``attach``."""

    event: Any  # tensorboard's Event message
    summary_pb2: Any
    record_writer: Any
    summary: Any  # torch.utils.tensorboard.summary: text, histogram and hparams summaries


def _load() -> _Kit | None:
    """The TensorBoard pieces, or None where the package (the ``track`` extra) is missing."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard import summary
    except ImportError:
        return None
    return _Kit(event_pb2.Event, summary_pb2, RecordWriter, summary)


def attach(
    log: run_files.MetricsLog, run_dir: Path, config: RunConfig, op_names: Sequence[str] = ()
) -> Board | None:
    """Mirror ``log``'s rows into ``run_dir/tensorboard`` from its next row on (``op_names``:
    the search space's, to label the heatmap); None where the config or the missing package
    says no events."""
    global _warned
    if not config.tensorboard:
        return None
    kit = _load()
    if kit is None:
        if not _warned:
            _warned = True
            warnings.warn(
                "tensorboard is not installed: no TensorBoard events are written (pip install "
                "'morphnas[track]', or pass --no-tensorboard to say so)",
                stacklevel=2,
            )
        return None
    board = Board(Path(run_dir), log.path, kit, tuple(op_names))
    log.on_append = board.row
    return board


def finish(
    board: Board | None,
    config: RunConfig,
    genotype: Genotype | None,
    results: Sequence[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> None:
    """The end of a run: its genotype and HParams (nothing where ``attach`` gave no board)."""
    if board is not None:
        board.finish(config, genotype, results, extra or {})


class Board:
    """The event file of one run, written as the run goes (see the module's docstring)."""

    def __init__(self, run_dir: Path, metrics: Path, kit: _Kit, op_names: tuple[str, ...]) -> None:
        self.path = run_dir / "tensorboard" / EVENT_FILE
        self.history = run_dir / "history.json"
        self.metrics, self.kit, self.op_names = metrics, kit, op_names
        self.started = False  # the file rebuilt by this process
        self.growth_written = 0  # events of history.json already in the file

    def row(self, row: dict[str, Any]) -> None:
        """``MetricsLog.on_append``: a row now in metrics.jsonl, and growth since the last one."""
        if not self.started:
            self._rebuild()  # metrics.jsonl holds ``row`` already
            return
        self._append([*self._row_events(row), *self._growth_events()])

    def finish(
        self,
        config: RunConfig,
        genotype: Genotype | None,
        results: Sequence[dict[str, Any]],
        extra: dict[str, Any],
    ) -> None:
        """Growth not yet written (the search's last), the genotype and the HParams."""
        if not self.started:  # a resumed run with nothing left to train: rebuilt all the same
            self._rebuild()
        events = self._growth_events()
        if genotype is not None:
            text = "\n".join("    " + line for line in str(genotype).splitlines())
            events.append(self._event(0, self.kit.summary.text("genotype", text)))
        events += self._hparams(config, results, extra)
        self._append(events)

    # ----------------------------------------------------------------------- writing

    def _rebuild(self) -> None:
        """Write the file afresh from metrics.jsonl and history.json, replacing it whole."""
        self.started, self.growth_written = True, 0
        events = [self.kit.event(wall_time=time.time(), file_version="brain.Event:2")]
        for row in run_files.read_metrics(self.metrics):
            events += self._row_events(row)
        events += self._growth_events()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(".rebuilt.tmp")  # no "tfevents": TensorBoard never reads it
        with tmp.open("wb") as file:
            self._records(file, events)
        os.replace(tmp, self.path)

    def _append(self, events: list[Any]) -> None:
        if events:
            with self.path.open("ab") as file:
                self._records(file, events)

    def _records(self, file: io.BufferedWriter, events: list[Any]) -> None:
        writer = self.kit.record_writer(file)
        for event in events:
            writer.write(event.SerializeToString())

    def _event(self, step: int, *summaries: Any) -> Any:
        values = [value for summary in summaries for value in summary.value]
        summary = self.kit.summary_pb2.Summary(value=values)
        return self.kit.event(wall_time=time.time(), step=step, summary=summary)

    def _scalars(self, step: int, scalars: dict[str, float]) -> Any:
        summary, value = self.kit.summary_pb2.Summary, self.kit.summary_pb2.Summary.Value
        values = [value(tag=tag, simple_value=number) for tag, number in scalars.items()]
        return self._event(step, summary(value=values))

    # ----------------------------------------------------------------------- what is written

    def _row_events(self, row: dict[str, Any]) -> list[Any]:
        """A metrics row: its numbers as scalars, or an event row as text; a search row's
        mixing weights as histograms and a heatmap."""
        step = row["epoch"] if _is_int(row.get("epoch")) else 0
        prefix = row_prefix(row)
        if "event" in row:
            return [self._event(step, self.kit.summary.text(f"{prefix}/events", json.dumps(row)))]
        scalars = {
            f"{prefix}/{key}": float(value)
            for key, value in row.items()
            if key not in _IDENTITY and _is_number(value)
        }
        events = [self._scalars(step, scalars)] if scalars else []
        if row.get("phase") == "search" and row.get("arch"):
            events.append(self._arch(step, row["arch"]))
        return events

    def _arch(self, step: int, arch: list[Any]) -> Any:
        """Mixing weights: one histogram per node, and the heatmap of every edge."""
        histograms = [
            self.kit.summary.histogram(f"arch/s{node}", np.asarray(edges, dtype=float), _BINS)
            for node, edges in enumerate(arch, start=1)
        ]
        labels, matrix = arch_matrix(arch)
        names = self.op_names if len(self.op_names) == matrix.shape[1] else ()
        png = heatmap_png(matrix, labels, names, step)
        width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR
        image = self.kit.summary_pb2.Summary.Image(
            height=height, width=width, colorspace=4, encoded_image_string=png
        )
        value = self.kit.summary_pb2.Summary.Value(tag="arch/probabilities", image=image)
        return self._event(step, *histograms, self.kit.summary_pb2.Summary(value=[value]))

    def _growth_events(self) -> list[Any]:
        """The events of history.json not yet in the file: text and ``growth/nodes``."""
        if not self.history.is_file():
            return []
        history = run_files.read_history(self.history)
        fresh, self.growth_written = history[self.growth_written :], len(history)
        events = []
        for event in fresh:
            scalars = {"growth/nodes": float(event["nodes_after"])}
            if event.get("width_after") is not None:
                scalars["growth/width"] = float(event["width_after"])
            line = self.kit.summary.text("growth/events", growth_line(event))
            events += [self._scalars(event["epoch"], scalars), self._event(event["epoch"], line)]
        return events

    def _hparams(
        self, config: RunConfig, results: Sequence[dict[str, Any]], extra: dict[str, Any]
    ) -> list[Any]:
        """The HParams session of this run: config keys, and final figures as scalars."""
        metrics = final_metrics(results, extra)
        if not metrics:
            return []
        tags = {f"hparams/{key}": value for key, value in metrics.items()}
        summaries = self.kit.summary.hparams(hparams_of(config), dict.fromkeys(tags, 0.0))
        return [self._event(0, summary) for summary in summaries] + [self._scalars(0, tags)]


# --------------------------------------------------------------------------- pure helpers


def row_prefix(row: dict[str, Any]) -> str:
    """Whose row: ``search``, ``train/lstm``, ``gates/vgg/lambda_0.01``."""
    parts = [str(row.get("phase", "run"))]
    if row.get("model") is not None:
        parts.append(str(row["model"]))
    if row.get("lambda") is not None:
        parts.append(f"lambda_{row['lambda']}")
    return "/".join(parts)


def arch_matrix(arch: list[Any]) -> tuple[list[str], np.ndarray]:
    """Every edge's op probabilities as the rows of one matrix, labelled ``s<node>`` (a node of
    one row) or ``s<node>.<edge>``."""
    labels, rows = [], []
    for node, edges in enumerate(arch, start=1):
        edge_rows = np.atleast_2d(np.asarray(edges, dtype=float))
        for edge, probabilities in enumerate(edge_rows):
            labels.append(f"s{node}" if len(edge_rows) == 1 else f"s{node}.{edge}")
            rows.append(probabilities)
    return labels, np.stack(rows)


def heatmap_png(
    matrix: np.ndarray, labels: Sequence[str], op_names: Sequence[str], epoch: int
) -> bytes:
    """The heatmap as PNG bytes, drawn on a bare ``Figure`` (Agg, no pyplot: as ``report``).

    Drawn once per search epoch, so kept cheap: fixed margins, no colour bar and no numbers in
    the cells (the histograms hold the values); the colours run from 0 to the epoch's largest
    probability, named in the title, so near-uniform weights early in a search still differ."""
    from matplotlib.figure import Figure  # loaded by report already, in a run

    n_rows, n_ops = matrix.shape
    width, height = 1.4 + 0.45 * n_ops, 1.3 + 0.2 * n_rows
    fig = Figure(figsize=(width, height), dpi=80)
    ax = fig.add_axes((0.9 / width, 1.0 / height, 1 - 1.1 / width, 1 - 1.3 / height))
    top = float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 1.0
    ax.imshow(matrix, vmin=0.0, vmax=max(top, 1e-6), cmap="viridis", aspect="auto")
    names = op_names or [str(k) for k in range(n_ops)]
    ax.set_xticks(range(n_ops), names, rotation=45, ha="right")
    ax.set_yticks(range(n_rows), labels)
    ax.tick_params(labelsize=7)
    ax.set_title(f"op probabilities, epoch {epoch} (yellow: {top:.3g})", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def growth_line(event: dict[str, Any]) -> str:
    """One growth event of history.json for a person."""
    line = f"epoch {event['epoch']}: {event['kind']}, {event['nodes_before']} → "
    line += f"{event['nodes_after']} nodes"
    if event.get("width_after") is not None:
        line += f", width {event.get('width_before')} → {event['width_after']}"
    if event.get("pruned_nodes"):
        line += f", fixed nodes {list(event['pruned_nodes'])}"
    before, after = event.get("valid_loss_before"), event.get("valid_loss_after")
    if _is_number(before) and _is_number(after):
        line += f"; valid loss {before:.4g} → {after:.4g}"
    return line


def hparams_of(config: RunConfig) -> dict[str, Any]:
    """The ``HPARAMS`` keys of ``config`` that hold a value TensorBoard shows."""
    values = {}
    for key in HPARAMS:
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part, None)
        if isinstance(value, bool | int | float | str):
            values[key] = value
    return values


def final_metrics(results: Sequence[dict[str, Any]], extra: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of the searched model's row (a ``train`` run: its one model) and the
    run's own (``search_valid_loss``, ``nodes``...)."""
    rows = [row for row in results if row.get("model") == "searched"] or list(results[:1])
    figures = {**extra, **(rows[0] if rows else {})}
    return {
        key: float(value)
        for key, value in figures.items()
        if _is_number(value) and math.isfinite(value)
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
