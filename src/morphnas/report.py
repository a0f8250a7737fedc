"""What a run directory shows a person: its plots and the results table.

The engine appends one JSON row per epoch to ``metrics.jsonl`` (``run_files.MetricsLog``); the
plots are drawn from those rows (``run_files.read_metrics``), so any run directory (finished,
crashed or resumed) can be plotted again without its model. Figures are built on
``matplotlib.figure.Figure`` directly, never through ``pyplot``: that renders with Agg, never opens
a window, and leaves nothing in pyplot's global figure registry to close or leak, whatever backend
the caller has chosen.
"""

from __future__ import annotations

import errno
import importlib.util
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import dates as mdates
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.ticker import MaxNLocator
from rich import box
from rich.table import Table
from rich.text import Text

from morphnas.cell_shape import describe as describe_shape
from morphnas.errors import UserError
from morphnas.genotype import SPACE_ARITY, SPACE_CELLS, SPACE_STATE_NAMES, Genotype

DPI = 110
MISSING = "–"


# --------------------------------------------------------------------------- shared plot helpers


def _by_epoch(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows in epoch order, the last written winning: a resumed run may log an epoch twice."""
    latest = {row["epoch"]: row for row in rows}
    return [latest[epoch] for epoch in sorted(latest)]


def _grid(
    n_panels: int, panel_size: tuple[float, float], max_cols: int = 3
) -> tuple[Figure, list[Axes]]:
    """A figure with ``n_panels`` axes in rows of at most ``max_cols``; spare grid cells removed."""
    nrows = math.ceil(n_panels / max_cols)
    ncols = math.ceil(n_panels / nrows)  # balanced rows: 4 panels as 2 x 2, not 3 + 1
    width, height = panel_size
    fig = Figure(figsize=(width * ncols + 1.5, height * nrows + 0.8), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


def _figure_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend beside all panels, each label once, instead of a legend covering every panel."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(entries.values(), entries.keys(), loc="outside right center")


def _png_path(path: Path) -> Path:
    """Every plot is a PNG; a path with another suffix (or none) gets ``.png`` instead."""
    return Path(path).with_suffix(".png")


def check_output(path: Path) -> Path:
    """The PNG ``path`` becomes, its folder created: a one-line error instead of a traceback when
    the folder is a file or the plot's place a directory. A full or read-only disk stays an
    ``OSError`` (the CLI's message for it says to free space and run again)."""
    out = _png_path(path)
    for parent in (out.parent, *out.parent.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{parent} is a file; move it away so the plots can be written")
    if out.is_dir():
        raise UserError(f"{out} is a directory; move it away so the plot can be written")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _plot_write_error(out.parent, err)
    return out


def _plot_write_error(path: Path, err: OSError) -> None:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        raise err
    raise UserError(f"cannot write the plot {path}: {err.strerror or err}") from None


def _save(fig: Figure, path: Path) -> Path:
    out = check_output(path)
    try:
        fig.savefig(out, format="png", dpi=DPI)
    except OSError as err:
        _plot_write_error(out, err)
    return out


# --------------------------------------------------------------------------- architecture weights


def _node_op_probabilities(
    rows: Sequence[Mapping[str, Any]], n_ops: int
) -> dict[int, tuple[list[int], np.ndarray]]:
    """Per node (1-based): the epochs it exists in and its op probabilities, the op marginal.

    Summing the rows and dividing by the node's total gives one "which op does this node prefer"
    curve per op for every space: darts_rnn nodes have one softmax row per candidate input (the
    mean of the rows), two_input nodes a single row, or under input choice one row per input
    pair of a single softmax over the node (the column sums).
    """
    epochs: dict[int, list[int]] = {}
    probs: dict[int, list[np.ndarray]] = {}
    for row in rows:
        for node, edges in enumerate(row["arch"], start=1):
            edge_probs = np.atleast_2d(np.asarray(edges, dtype=float))
            if edge_probs.shape[-1] != n_ops:
                raise ValueError(
                    f"epoch {row['epoch']}, node {node}: {edge_probs.shape[-1]} op probabilities "
                    f"but {n_ops} op names"
                )
            epochs.setdefault(node, []).append(row["epoch"])
            total = max(float(edge_probs.sum()), 1e-30)  # closed sigmoid gates sum to 0
            probs.setdefault(node, []).append(edge_probs.sum(axis=0) / total)
    return {node: (epochs[node], np.stack(probs[node])) for node in sorted(epochs)}


def plot_arch_weights(rows: list[dict], op_names: Sequence[str], path: Path) -> Path:
    """One panel per node: how its op probabilities move over the search epochs.

    All panels share the epoch axis, so a node added by growth starts part-way along it, at the
    epoch it first appears. The dotted line is the uniform probability, 1 / number of ops. Every
    panel draws the ops in the same order from the same colour cycle, so an op keeps its colour.
    """
    search = _by_epoch([r for r in rows if r.get("phase") == "search" and "arch" in r])
    if not search:
        raise UserError("no search rows with architecture weights ('arch') to plot")
    series = _node_op_probabilities(search, len(op_names))
    fig, axes = _grid(len(series), panel_size=(3.6, 2.6))
    marker = "o" if len(search) <= 20 else None
    for ax, (node, (epochs, probs)) in zip(axes, series.items(), strict=True):
        for k, name in enumerate(op_names):
            ax.plot(epochs, probs[:, k], marker=marker, markersize=3, label=name)
        ax.axhline(1 / len(op_names), color="0.5", linestyle=":", linewidth=1, label="uniform")
        ax.set_title(f"node s{node}")
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax is not axes[0]:
            ax.sharex(axes[0])
    fig.suptitle("Architecture weights during search (per node: op probability, mean over edges)")
    fig.supxlabel("search epoch")
    fig.supylabel("probability")
    _figure_legend(fig, axes)
    return _save(fig, path)


# --------------------------------------------------------------------------- learning curves


def _loss_panels(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows grouped by panel: the search first, then each retrained model in order of appearance."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("phase") == "search":
            key = "search (supernet)"
        elif row.get("phase") == "train":
            key = f"retrain: {row.get('model', '?')}"
        else:
            continue
        groups.setdefault(key, []).append(row)
    order = sorted(groups, key=lambda key: not key.startswith("search"))
    return {key: _by_epoch(groups[key]) for key in order}


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """``rows[*][key]`` as floats; a missing or null value becomes NaN (a gap in the line)."""
    return np.array([np.nan if row.get(key) is None else float(row[key]) for row in rows])


def _spans_decades(values: np.ndarray, decades: float = 2) -> bool:
    """Whether positive ``values`` range over more than ``decades`` powers of ten (log y helps)."""
    finite = values[np.isfinite(values)]
    return finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > 10**decades


def _plot_losses(ax: Axes, rows: Sequence[Mapping[str, Any]]) -> None:
    epochs = np.array([row["epoch"] for row in rows])
    train, valid = _column(rows, "train_loss"), _column(rows, "valid_loss")
    ax.plot(epochs, train, color="C0", label="train")
    ax.plot(epochs, valid, color="C1", linestyle="--", label="valid")
    if np.isfinite(valid).any():
        best = int(np.nanargmin(valid))
        ax.plot(epochs[best], valid[best], "*", color="C3", markersize=10, label="best valid")
    if _spans_decades(np.concatenate([train, valid])):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_learning_curves(rows: list[dict], path: Path) -> Path:
    """Train and valid loss per epoch: one panel for the search, one per retrained model.

    Separate panels because the supernet's loss and a retrained cell's are not on one scale;
    a panel switches to log y when its losses span more than two decades.
    """
    panels = _loss_panels(rows)
    if not panels:
        raise UserError("no search or train rows to plot learning curves from")
    fig, axes = _grid(len(panels), panel_size=(4.2, 3.0))
    for ax, (title, panel_rows) in zip(axes, panels.items(), strict=True):
        _plot_losses(ax, panel_rows)
        ax.set_title(title)
    fig.suptitle("Learning curves")
    fig.supxlabel("epoch")
    fig.supylabel("loss")
    _figure_legend(fig, axes)
    return _save(fig, path)


# --------------------------------------------------------------------------- growth timeline


def plot_growth(rows: list[dict], events: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Nodes and validation loss over the search epochs, every growth and prune event marked.

    The node count is read from the search rows (``nodes``, else the length of ``arch``) so the
    plot shows what the supernet actually was at each epoch; events come from ``history.json``.
    """
    search = _by_epoch([row for row in rows if row.get("phase") == "search"])
    if not search:
        raise UserError("no search rows to plot the growth timeline from")
    epochs = [row["epoch"] for row in search]
    nodes = [row.get("nodes", len(row.get("arch", []))) for row in search]
    fig = Figure(figsize=(7.5, 5.0), dpi=DPI, layout="constrained")
    ax_nodes, ax_loss = fig.subplots(2, 1, sharex=True)
    ax_nodes.step(epochs, nodes, where="post", color="tab:blue", label="nodes")
    ax_nodes.set_ylabel("nodes")
    ax_nodes.yaxis.get_major_locator().set_params(integer=True)
    ax_loss.plot(epochs, _column(search, "valid_loss"), marker=".", color="black", label="valid")
    ax_loss.plot(epochs, _column(search, "train_loss"), ls="--", color="grey", label="train")
    ax_loss.set_ylabel("loss")
    styles = {"grow": ("tab:green", "-", "growth"), "prune": ("tab:red", ":", "prune")}
    for event in events:
        colour, style, label = styles.get(event["kind"], ("tab:grey", "-.", event["kind"]))
        for ax in (ax_nodes, ax_loss):
            ax.axvline(event["epoch"], color=colour, ls=style, lw=1.2, label=label)
    for ax in (ax_nodes, ax_loss):
        ax.grid(alpha=0.3)
    ax_loss.set_xlabel("search epoch")
    fig.suptitle("Growth timeline: the supernet's size and loss (events after the epoch's end)")
    _figure_legend(fig, [ax_nodes, ax_loss])
    return _save(fig, path)


# --------------------------------------------------------------------------- forecasts


def _as_2d(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        return array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name}: expected shape (steps, series), got {array.shape}")
    return array


def _most_variable(values: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` columns with the largest variance, largest first (ties: lower index)."""
    return [int(j) for j in np.argsort(-values.var(axis=0), kind="stable")[:k]]


def plot_forecasts(
    truth: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    columns: Sequence[str],
    path: Path,
    index: pd.DatetimeIndex | None = None,
    n_series: int = 3,
    last_n: int = 200,
) -> Path:
    """Truth (black) against each model's forecast over the last ``last_n`` test steps.

    ``truth`` and every prediction are (steps, series) arrays in original units. The ``n_series``
    series shown are those whose truth varies most over the plotted window: the first columns of
    a wide data set are arbitrary, and a nearly flat series shows nothing about a forecast.
    ``index`` (aligned with the rows of ``truth``) puts dates on the x axis instead of steps.
    """
    truth = _as_2d(truth, "truth")
    preds = {name: _as_2d(pred, f"prediction {name!r}") for name, pred in predictions.items()}
    n_steps, n_cols = truth.shape
    for name, pred in preds.items():
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {name!r} has shape {pred.shape}; truth has {truth.shape}")
    if len(columns) != n_cols:
        raise ValueError(f"{len(columns)} column names for {n_cols} series")
    if index is not None and len(index) != n_steps:
        raise ValueError(f"index has {len(index)} entries for {n_steps} steps")
    window = slice(max(0, n_steps - last_n), n_steps)
    x = index[window] if index is not None else np.arange(n_steps)[window]
    shown = _most_variable(truth[window], n_series)
    fig = Figure(figsize=(10, 2.2 * len(shown) + 1.3), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0])
    for ax, j in zip(axes, shown, strict=True):
        ax.plot(x, truth[window, j], color="black", linewidth=1.4, label="truth")
        for k, (name, pred) in enumerate(preds.items()):
            ax.plot(x, pred[window, j], color=f"C{k % 10}", linewidth=1.0, alpha=0.9, label=name)
        ax.set_title(str(columns[j]), loc="left", fontsize=10)
        ax.grid(alpha=0.3)
    _time_axis(axes[-1], index is not None, "test step")
    fig.suptitle(
        f"Test-set forecasts in original units: last {len(x)} steps, "
        f"the {len(shown)} of {n_cols} series that vary most"
    )
    _figure_legend(fig, axes)
    return _save(fig, path)


def _time_axis(ax: Axes, dated: bool, untimed: str) -> None:
    """Concise date ticks and the label ``time`` on a dated axis, else the label ``untimed``."""
    if dated:
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel("time" if dated else untimed)


def plot_future(
    history: np.ndarray,
    history_index: pd.DatetimeIndex | None,
    future: pd.DataFrame,
    columns: Sequence[str],
    levels: Sequence[float],
    path: Path,
    *,
    window: int,
    n_series: int = 3,
) -> Path:
    """The series' recent history (black), the forecast beyond it and its intervals (shaded,
    one band per level), for the ``n_series`` series that vary most over the shown history.

    ``future`` is ``forecast.csv``'s frame: its first column the times, then ``<series>`` and
    ``<series>-lo|hi-<level>``. The history shown is the last ``max(3K, 2P)`` rows, so the
    forecast's ``K`` steps sit in enough context to judge them.
    """
    steps = len(future)
    tail = min(len(history), max(3 * steps, 2 * window))
    past = np.asarray(history, dtype=float)[-tail:]
    x_past = history_index[-tail:] if history_index is not None else np.arange(len(history))[-tail:]
    x_future = future.iloc[:, 0].to_numpy()
    shown = _most_variable(past, n_series)
    fig = Figure(figsize=(10, 2.2 * len(shown) + 1.3), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0])
    for ax, j in zip(axes, shown, strict=True):
        name = str(columns[j])
        ax.plot(x_past, past[:, j], color="black", linewidth=1.2, label="history")
        for k, level in enumerate(sorted(levels, reverse=True)):
            label = f"{level:g}"
            ax.fill_between(
                x_future,
                future[f"{name}-lo-{label}"].to_numpy(),
                future[f"{name}-hi-{label}"].to_numpy(),
                color="C0",
                alpha=0.15 + 0.15 * k,
                linewidth=0,
                label=f"{label} % interval",
            )
        ax.plot(x_future, future[name].to_numpy(), color="C0", linewidth=1.4, label="forecast")
        ax.set_title(name, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
    _time_axis(axes[-1], history_index is not None, "step")
    fig.suptitle(
        f"Forecast of the next {steps} steps with split-conformal intervals: "
        f"the {len(shown)} of {len(columns)} series that vary most"
    )
    _figure_legend(fig, axes)
    return _save(fig, path)


# --------------------------------------------------------------------------- genotype graph


@dataclass(frozen=True)
class _State:
    """A box in the cell drawing: ``kind`` picks its colour (input, init, node or output)."""

    key: str
    label: str
    kind: str


_FILL = {"input": "#cfe2f3", "init": "#e6e6e6", "node": "#d9ead3", "output": "#fce5cd"}
# Per space, the boxes its cell reads before node 1 and the arrows among them; the boxes' keys are
# the state names of ``genotype.SPACE_STATE_NAMES``. A space missing here is refused by
# ``_cell_graph``, never drawn as another space's cell.
_CELL_INPUTS: dict[str, tuple[tuple[_State, ...], tuple[tuple[str, str, str], ...]]] = {
    "darts_rnn": (
        (_State("x", "xₜ", "input"), _State("h", "hₜ₋₁", "input"), _State("s0", "s0", "init")),
        (("x", "s0", ""), ("h", "s0", "")),
    ),
    "two_input": ((_State("u", "uₜ", "input"), _State("h", "hₜ₋₁", "input")), ()),
    "darts_cnn": ((_State("c_k-2", "cₖ₋₂", "input"), _State("c_k-1", "cₖ₋₁", "input")), ()),
}


def _cell_graph(genotype: Genotype) -> tuple[list[_State], list[tuple[str, str, str]]]:
    """The cell as boxes and labelled arrows ``(source, target, label)``, in topological order.

    Both renderers draw from this, so graphviz and matplotlib pictures always agree.
    """
    n, space = len(genotype.nodes), genotype.space
    if space not in _CELL_INPUTS:
        raise ValueError(f"no cell drawing for space {space!r}; add it to report._CELL_INPUTS")
    inputs, arrows = _CELL_INPUTS[space]
    if space in SPACE_CELLS:
        return _stacked_cells_graph(genotype, inputs)
    states, edges = list(inputs), list(arrows)
    names = SPACE_STATE_NAMES[space]
    if genotype.cell_state is not None:  # the carried memory cell, state -2
        states.append(_State("c", "cₜ₋₁", "input"))
    for i, node in enumerate(genotype.nodes, start=1):
        sources = [names.get(j, f"s{j}") for j in node.inputs]
        if SPACE_ARITY[space] == 1:  # one input: the op labels the edge
            states.append(_State(f"s{i}", f"s{i}", "node"))
            edges.append((sources[0], f"s{i}", node.op))
        else:  # the op labels the node, the letters its inputs (strict: two of them)
            states.append(_State(f"s{i}", f"s{i}\n{node.op}", "node"))
            edges += [(source, f"s{i}", label) for source, label in zip(sources, "ab", strict=True)]
    combined = f"mean(s1..s{n})" if genotype.output == "mean" and n > 1 else f"s{n}"
    if genotype.output_activation != "identity":
        combined = f"{genotype.output_activation}({combined})"
    states.append(
        _State("out", f"hₜ =\n{combined}" if len(combined) > 8 else f"hₜ = {combined}", "output")
    )
    sources = range(1, n + 1) if genotype.output == "mean" else [n]
    edges += [(f"s{i}", "out", "") for i in sources]
    if genotype.cell_state is not None:
        states.append(_State("c_out", f"cₜ = s{genotype.cell_state}", "output"))
        edges.append((f"s{genotype.cell_state}", "c_out", ""))
    return states, edges


def _stacked_cells_graph(
    genotype: Genotype, inputs: tuple[_State, ...]
) -> tuple[list[_State], list[tuple[str, str, str]]]:
    """A genotype of several cells (``darts_cnn``: normal and reduction) as one drawing of
    disjoint graphs, one per cell, each edge labelled by its op, the concatenation last."""
    names = SPACE_STATE_NAMES[genotype.space]
    states: list[_State] = []
    edges: list[tuple[str, str, str]] = []
    for cell, nodes in genotype.cells():
        states += [_State(f"{cell}:{s.key}", f"{cell}\n{s.label}", s.kind) for s in inputs]
        for i, node in enumerate(nodes, start=1):
            states.append(_State(f"{cell}:s{i}", f"s{i}", "node"))
            edges += [
                (f"{cell}:{names.get(j, f's{j}')}", f"{cell}:s{i}", op)
                for op, j in zip(node.op, node.inputs, strict=True)
            ]
        states.append(_State(f"{cell}:out", f"{cell} out =\nconcat(s1..s{len(nodes)})", "output"))
        edges += [(f"{cell}:s{i}", f"{cell}:out", "") for i in range(1, len(nodes) + 1)]
    return states, edges


def _genotype_title(genotype: Genotype) -> str:
    """The drawing's title: the cell's kind and size, then its width and depth (Shu et al.,
    ``morphnas.cell_shape``), which tell a wide, shallow cell at a glance."""
    n = len(genotype.nodes)
    squash = "" if genotype.output_activation == "identity" else f"{genotype.output_activation} of "
    head = f"{genotype.space} cell: {n} node{'s' * (n != 1)}, output = {squash}{genotype.output}"
    if genotype.space in SPACE_CELLS:
        cells = genotype.cells()
        each = len(cells[0][1])
        head = (
            f"{genotype.space}: {' and '.join(name for name, _ in cells)} cells, {each} "
            f"node{'s' * (each != 1)} each, output = concat"
        )
    return f"{head}\n{describe_shape(genotype)}"


def _render_graphviz(genotype: Genotype) -> bytes:
    """PNG bytes from ``dot``; the library is imported here because it is an optional extra."""
    import graphviz

    graph = graphviz.Digraph(
        graph_attr={
            "rankdir": "LR",
            "label": _genotype_title(genotype).replace("\n", r"\n"),
            "labelloc": "t",
            "dpi": str(DPI),
        },
        node_attr={"shape": "box", "style": "rounded,filled", "fontsize": "11"},
        edge_attr={"fontsize": "10"},
    )
    states, edges = _cell_graph(genotype)
    for state in states:
        graph.node(state.key, state.label.replace("\n", r"\n"), fillcolor=_FILL[state.kind])
    for source, target, label in edges:
        graph.edge(source, target, label=label)
    return graph.pipe(format="png")


def _layers(states: Sequence[_State], edges: Sequence[tuple[str, str, str]]) -> dict[str, int]:
    """Column of each state: one past the furthest of its sources, inputs in column 0."""
    sources: dict[str, list[str]] = {}
    for source, target, _ in edges:
        sources.setdefault(target, []).append(source)
    layer: dict[str, int] = {}
    for state in states:  # topological order: every source already has its layer
        layer[state.key] = 1 + max((layer[s] for s in sources.get(state.key, [])), default=-1)
    return layer


_COL_GAP, _ROW_GAP = 2.4, 1.3  # data units between box centres
_INCH_PER_UNIT = 0.75  # the same in x and y, so arcs and their midpoints are computed exactly
_FONTSIZE = 9


def _layout(states: Sequence[_State], layer: Mapping[str, int]) -> dict[str, tuple[float, float]]:
    """Box centres: one column per layer, each column's boxes centred on y = 0."""
    columns: dict[int, list[str]] = {}
    for state in states:
        columns.setdefault(layer[state.key], []).append(state.key)
    return {
        key: (col * _COL_GAP, ((len(keys) - 1) / 2 - row) * _ROW_GAP)
        for col, keys in columns.items()
        for row, key in enumerate(keys)
    }


def _box_size(label: str) -> tuple[float, float]:
    """Width and height in data units that fit ``label`` at the drawing's font size."""
    lines = label.split("\n")
    return 0.11 * max(map(len, lines)) + 0.4, 0.28 * len(lines) + 0.25


def _edge_curvature(
    edges: Sequence[tuple[str, str, str]],
    layer: Mapping[str, int],
    centre: Mapping[str, tuple[float, float]],
) -> list[float]:
    """Arc3 ``rad`` per edge, so that arrows do not run through boxes or over each other.

    An arrow that skips a column bows away from the middle of the drawing (positive ``rad``
    bends a left-to-right arrow downwards) by about one row, around the boxes in between; two
    arrows between the same pair of boxes, as in ``hadamard(s1, s1)``, bow apart.
    """
    pairs: dict[tuple[str, str], int] = {}
    for source, target, _ in edges:
        pairs[source, target] = pairs.get((source, target), 0) + 1
    seen: dict[tuple[str, str], int] = {}
    rads = []
    for source, target, _ in edges:
        k = seen.get((source, target), 0)
        seen[source, target] = k + 1
        base = 0.0
        if layer[target] - layer[source] > 1:
            (x0, y0), (x1, y1) = centre[source], centre[target]
            bulge = min(0.35, 2 * 0.8 * _ROW_GAP / math.hypot(x1 - x0, y1 - y0))
            base = -bulge if y0 + y1 > 0 else bulge
        rads.append(base + 0.5 * (k - (pairs[source, target] - 1) / 2))
    return rads


def _arc_midpoint(
    start: tuple[float, float], end: tuple[float, float], rad: float
) -> tuple[float, float]:
    """Midpoint of matplotlib's arc3 curve, the point furthest from the straight line."""
    (x0, y0), (x1, y1) = start, end
    return (x0 + x1) / 2 + rad * (y1 - y0) / 2, (y0 + y1) / 2 - rad * (x1 - x0) / 2


def _render_matplotlib(genotype: Genotype) -> Figure:
    """The same graph as graphviz would draw, laid out in columns by dependency depth.

    Box sizes follow their labels and the figure size follows the drawing's extent (arcs
    included), at a fixed number of inches per data unit, so text always fits its box.
    """
    states, edges = _cell_graph(genotype)
    layer = _layers(states, edges)
    centre = _layout(states, layer)
    size = {state.key: _box_size(state.label) for state in states}
    rads = _edge_curvature(edges, layer, centre)
    mids = [
        _arc_midpoint(centre[s], centre[t], r) for (s, t, _), r in zip(edges, rads, strict=True)
    ]
    xs = [centre[k][0] + sign * size[k][0] / 2 for k in centre for sign in (-1, 1)]
    ys = [centre[k][1] + sign * size[k][1] / 2 for k in centre for sign in (-1, 1)]
    x_lo, x_hi = min(xs + [m[0] for m in mids]) - 0.3, max(xs + [m[0] for m in mids]) + 0.3
    y_lo, y_hi = min(ys + [m[1] for m in mids]) - 0.3, max(ys + [m[1] for m in mids]) + 0.3
    spare = max(0.0, 5.0 / _INCH_PER_UNIT - (x_hi - x_lo)) / 2  # room for the title
    x_lo, x_hi = x_lo - spare, x_hi + spare
    width, height, title = (x_hi - x_lo) * _INCH_PER_UNIT, (y_hi - y_lo) * _INCH_PER_UNIT, 0.45
    fig = Figure(figsize=(width, height + title), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, height / (height + title)))
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_axis_off()
    boxes = {}
    for state in states:
        (x, y), (w, h) = centre[state.key], size[state.key]
        boxes[state.key] = FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0.05",
            facecolor=_FILL[state.kind],
            edgecolor="0.3",
            zorder=2,
        )
        ax.add_patch(boxes[state.key])
        ax.text(x, y, state.label, ha="center", va="center", fontsize=_FONTSIZE, zorder=3)
    for (source, target, label), rad, mid in zip(edges, rads, mids, strict=True):
        arrow = FancyArrowPatch(
            centre[source],
            centre[target],
            arrowstyle="-|>",
            mutation_scale=12,
            color="0.25",
            connectionstyle=f"arc3,rad={rad}",
            patchA=boxes[source],
            patchB=boxes[target],
            zorder=1,
        )
        ax.add_patch(arrow)
        if label:
            ax.text(
                *mid,
                label,
                ha="center",
                va="center",
                fontsize=_FONTSIZE - 1,
                zorder=4,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"},
            )
    fig.suptitle(_genotype_title(genotype), fontsize=10)
    return fig


def plot_genotype(genotype: Genotype, path: Path) -> Path:
    """Draw the derived cell; returns the PNG written (``path`` with its suffix set to ``.png``).

    Uses graphviz when both the ``dot`` binary and the ``graphviz`` package are present (it lays
    out large cells best), and a matplotlib drawing otherwise, so a plot never needs a system
    package.
    """
    out = check_output(path)
    if shutil.which("dot") and importlib.util.find_spec("graphviz"):
        try:
            out.write_bytes(_render_graphviz(genotype))
        except OSError as err:
            _plot_write_error(out, err)
        return out
    return _save(_render_matplotlib(genotype), out)


# --------------------------------------------------------------------------- results table

_COLUMNS = (
    ("model", "model"),
    ("params", "params"),
    ("valid_rse", "valid RSE"),
    ("test_rse", "test RSE"),
    ("test_corr", "test CORR"),
    ("test_mae", "test MAE"),
    ("test_rmse", "test RMSE"),
    ("train_seconds", "train s"),
)
# Language modelling: perplexities, and the sizes a parameter-matched comparison rests on.
_LM_COLUMNS = (
    ("model", "model"),
    ("params", "params"),
    ("recurrent_params", "non-emb params"),
    ("hidden", "hidden"),
    ("valid_ppl", "valid ppl"),
    ("test_ppl", "test ppl"),
    ("train_tokens_per_s", "train tok/s"),
    ("eval_tokens_per_s", "eval tok/s"),
    ("train_seconds", "train s"),
)
# Image classification: accuracy, and the sizes an equal-size comparison rests on.
_CLASSIFY_COLUMNS = (
    ("model", "model"),
    ("params", "params"),
    ("flops", "FLOPs"),
    ("valid_accuracy", "valid acc"),
    ("test_accuracy", "test acc"),
    ("test_loss", "test loss"),
    ("train_seconds", "train s"),
)
# Reinforcement learning (RL-DARTS): returns of fresh episodes, the figure the models are
# compared on, and the training returns beside them.
_RL_COLUMNS = (
    ("model", "model"),
    ("params", "params"),
    ("eval_return", "eval return"),
    ("eval_return_std", "± sd"),
    ("final_return", "final train return"),
    ("episodes", "episodes"),
    ("train_seconds", "train s"),
)
# Per kind of result (told by the metric it alone has): its columns, the score that picks the
# best row, and whether higher is better. Forecasting, the last, is the default.
_LAYOUTS = (
    ("eval_return", _RL_COLUMNS, "eval_return", True),
    ("test_ppl", _LM_COLUMNS, "test_ppl", False),
    ("test_accuracy", _CLASSIFY_COLUMNS, "test_accuracy", True),
    ("test_rse", _COLUMNS, "test_rse", False),
)


def _table_layout(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[tuple[tuple[str, str], ...], str, bool]:
    """The columns, best-row score and direction of a table of these result rows."""
    for marker, columns, best_key, higher in _LAYOUTS:
        if any(marker in row for row in rows):
            return columns, best_key, higher
    return _COLUMNS, "test_rse", False


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (numpy scalars included, bools not)."""
    return float(value) if isinstance(value, Real) and not isinstance(value, bool) else None


def _format_cell(key: str, value: Any) -> str:
    """4 significant digits; counts and values from 10,000 up as integers with separators."""
    if value is None:
        return MISSING
    number = _number(value)
    if number is None or key == "model":
        return str(value)
    if not math.isfinite(number):
        return str(number)
    if key in ("params", "flops") or abs(number) >= 1e4:
        return f"{round(number):,}"
    return f"{number:.4g}"


def results_table(results: Sequence[Mapping[str, Any]], title: str = "results") -> Table:
    """A rich table of models and their metrics; the best test score in bold (the lowest test
    RSE, the lowest perplexity for language models, the highest accuracy for images). A row
    marked ``degenerate`` (a cell whose output ignores its input or its state,
    ``morphnas.degenerate``) says so by its name and in the caption: its numbers are the model
    around the cell, not a cell.

    Cells are ``Text`` objects, not markup strings, so a model named like ``[red]`` prints as is.
    """
    degenerate = [r for r in results if r.get("degenerate")]
    caption = "; ".join(
        f"{r['model']}: a degenerate cell ({r.get('degenerate_reason', '')}); its numbers are "
        "the model's without a working cell"
        for r in degenerate
    )
    table = Table(title=title, caption=caption or None)
    columns, best_key, higher = _table_layout(results)
    best_position = [key for key, _ in columns].index(best_key)
    for key, header in columns:
        if key == "model":  # names are never cut; numbers may wrap their headers instead
            table.add_column(header, justify="left", no_wrap=True, min_width=8)
        else:
            table.add_column(header, justify="right")
    scores = [_number(result.get(best_key)) for result in results]
    finite = [s for s in scores if s is not None and math.isfinite(s)]
    best = (max if higher else min)(finite, default=None)
    for result, score in zip(results, scores, strict=True):
        cells = [Text(_format_cell(key, result.get(key))) for key, _ in columns]
        if result.get("degenerate"):
            cells[0].append(" (degenerate)", style="yellow")
        if best is not None and score == best:
            for position in (0, best_position):  # the model's name and its test score
                cells[position].stylize("bold")
        table.add_row(*cells)
    return table


def future_table(
    frame: pd.DataFrame,
    model: str,
    coverage: Mapping[str, Any],
    max_rows: int = 12,
    max_series: int = 3,
) -> Table:
    """The first rows of a forecast: each shown series' value and its widest interval, the
    intervals' test coverage in the caption (the whole forecast is in ``forecast.csv``)."""
    levels = coverage.get("levels", {})
    widest = max(levels, key=float) if levels else None
    values = [c for c in frame.columns[1:] if "-lo-" not in c and "-hi-" not in c]
    shown = values[:max_series]
    notes = [
        f"{label} % intervals covered {entry['test_coverage']:.1%} of the test span"
        for label, entry in levels.items()
        if entry.get("test_coverage") is not None
    ]
    hidden = len(frame) - max_rows
    if hidden > 0 or len(values) > len(shown):
        notes.append("the rest is in the CSV")
    table = Table(title=f"forecast by {model}", caption="; ".join(notes) or None)
    table.add_column(str(frame.columns[0]), no_wrap=True, min_width=10)
    for name in shown:
        header = f"{name} [{widest} %]" if widest else name
        table.add_column(header, justify="right", no_wrap=True)
    times = frame.iloc[:, 0]
    if pd.api.types.is_datetime64_any_dtype(times) and (times == times.dt.normalize()).all():
        times = times.dt.strftime("%Y-%m-%d")  # daily and coarser: no midnight clock
    for (_, row), time in zip(frame.head(max_rows).iterrows(), times, strict=False):
        cells = [Text(str(time))]
        for name in shown:
            text = f"{row[name]:.4g}"
            if widest:  # on a second line: three series fit in 80 columns
                text += f"\n[{row[f'{name}-lo-{widest}']:.3g}, {row[f'{name}-hi-{widest}']:.3g}]"
            cells.append(Text(text))
        table.add_row(*cells)
    return table


def horizon_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """Each model's test RSE and CORR at each horizon, as LSTNet reports them; the lowest RSE
    of each horizon in bold."""
    horizons = sorted({int(row["horizon"]) for row in rows})
    models = list(dict.fromkeys(str(row["model"]) for row in rows))
    found = {(str(row["model"]), int(row["horizon"])): row for row in rows}
    table = Table(title="test RSE and CORR per horizon")
    table.add_column("model", no_wrap=True)
    for horizon in horizons:
        table.add_column(f"RSE h={horizon}", justify="right")
        table.add_column(f"CORR h={horizon}", justify="right")
    best = {
        h: min(
            (found[m, h].get("test_rse") for m in models if (m, h) in found
             if isinstance(found[m, h].get("test_rse"), Real)),
            default=None,
        )
        for h in horizons
    }  # fmt: skip
    for model in models:
        cells = [Text(model)]
        for horizon in horizons:
            row = found.get((model, horizon), {})
            rse = Text(_format_cell("test_rse", row.get("test_rse")))
            if best[horizon] is not None and row.get("test_rse") == best[horizon]:
                rse.stylize("bold")
            cells += [rse, Text(_format_cell("test_corr", row.get("test_corr")))]
        table.add_row(*cells)
    return table


# --------------------------------------------------------------------------- comparison table

_COMPARE_COLUMNS = (
    ("search_seconds", "search s"),
    ("search_cpu_seconds", "CPU s"),
    ("search_valid_loss", "valid loss"),
    ("nodes", "nodes"),
    ("params", "params"),
    ("test_rse", "test RSE"),
    ("test_corr", "test CORR"),
    ("cell_shape", "width/ depth"),  # Shu et al.'s (morphnas.cell_shape): means, one column
)
_LM_COMPARE_COLUMNS = (
    *_COMPARE_COLUMNS[:5], ("valid_ppl", "valid ppl"), ("test_ppl", "test ppl"),
    _COMPARE_COLUMNS[-1],
)  # fmt: skip
_CLASSIFY_COMPARE_COLUMNS = (  # fewer: FLOPs and accuracies need the width
    ("search_seconds", "search s"),
    ("search_valid_loss", "valid loss"),
    ("params", "params"),
    ("flops", "FLOPs"),
    ("valid_accuracy", "valid acc"),
    ("test_accuracy", "test acc"),
    _COMPARE_COLUMNS[-1],
)


# Left out of a compare table, in this order, while its columns do not fit the terminal
# (compare.json keeps every one): the metrics a choice between variants rests on go last.
_COMPARE_DROP_ORDER = (
    "search_cpu_seconds", "nodes", "flops", "params", "search_seconds", "test_corr",
    "search_valid_loss",
)  # fmt: skip
_COMPARE_COLUMN_WIDTH = 9  # a mean such as 0.09196, or a std such as ±0.0007, and its padding


def compare_table(
    rows: Sequence[Mapping[str, Any]], title: str = "comparison", width: int | None = None
) -> Table:
    """Variants side by side, each metric as ``mean ± std`` over seeds (the cell's width and
    depth as their means, in one column). No vertical rules, and a std wraps under its mean.
    For a terminal ``width``, columns are left out (``_COMPARE_DROP_ORDER``; the caption names
    them) until the rest fit whole: variant names and digits are never cut."""
    longest = max((len(str(row["variant"])) for row in rows), default=7)
    columns = {
        "test_ppl": _LM_COMPARE_COLUMNS,  # language models: perplexities, not RSE
        "test_accuracy": _CLASSIFY_COMPARE_COLUMNS,
    }.get(_table_layout(rows)[1], _COMPARE_COLUMNS)
    dropped: list[str] = []
    if width is not None:
        room = width - max(longest, 7) - 7  # the variant and seeds columns with their padding
        for key in _COMPARE_DROP_ORDER:
            if len(columns) * _COMPARE_COLUMN_WIDTH <= room:
                break
            dropped += [header for k, header in columns if k == key]
            columns = tuple(c for c in columns if c[0] != key)
    caption = (
        f"{', '.join(dropped)}: in compare.json (a wider terminal shows them)" if dropped else None
    )
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("variant", no_wrap=True, min_width=min(longest, 40))  # names are not cut
    table.add_column("seeds", justify="right")
    for _, header in columns:
        table.add_column(header, justify="right", min_width=5)
    for row in rows:
        cells = [Text(str(row["variant"])), Text(str(row.get("seeds", "–")))]
        for key, _ in columns:
            if key == "cell_shape":
                cells.append(Text(_shape_cell(row)))
                continue
            mean = row.get(key)
            if mean is None:
                cells.append(Text("–"))
                continue
            text = _format_cell(key, mean) if key in ("params", "flops") else f"{mean:.4g}"
            std = row.get(f"{key}_std")
            if std is not None and row.get("seeds", 1) > 1:
                # A space before ±: in a narrow terminal the std wraps under its mean, short
                # enough (``_std_text``) not to be cut.
                text += f" ±{_std_text(key, std)}"
            cells.append(Text(text))
        table.add_row(*cells)
    return table


def _std_text(key: str, std: float) -> str:
    """A std in a compare table: counts whole, from 1 up rounded, below 1 one significant digit."""
    if key in ("params", "flops"):
        return _format_cell(key, std)
    return f"{std:,.0f}" if abs(std) >= 1 else f"{std:.1g}"


def _shape_cell(row: Mapping[str, Any]) -> str:
    """``width/depth`` of a compare row (means over seeds), or a dash where none was recorded."""
    width, depth = row.get("cell_width"), row.get("cell_depth")
    if width is None or depth is None:
        return MISSING
    return f"{width:.3g}/{depth:.3g}"


def prune_table(rows: Sequence[Mapping[str, Any]], title: str = "channel pruning") -> Table:
    """``morphnas prune``'s rows: per model and λ, the channels kept, parameters and FLOPs after
    with the factor saved, the task's test metric before and after fine-tuning, and the CPU
    latency of the masked and the pruned network (measured side by side; the rest is in
    ``summary.json``)."""
    metric = next(
        (k for k in _PRUNE_METRICS if rows and f"{k}_before" in rows[0]),
        None,
    )
    table = Table(title=title)
    headers = ["model", "λ", "kept", "params", "×", "FLOPs ×"]
    if metric is not None:
        headers += [f"{_PRUNE_METRICS[metric]} before", "after"]
    headers += ["ms masked", "ms pruned"]
    for header in headers:
        table.add_column(header, justify="left" if header == "model" else "right")
    for row in rows:
        cells = [
            str(row["model"]),
            f"{row['lambda']:g}",
            f"{row['channels_kept']}/{row['channels']}",
            f"{round(row['params_after']):,}",
            _factor(row["params_before"], row["params_after"]),
            _factor(row["flops_before"], row["flops_after"]),
        ]
        if metric is not None:
            cells += [_format_cell(metric, row.get(f"{metric}_{w}")) for w in ("before", "after")]
        cells += [f"{row['latency_ms_masked']:.3g}", f"{row['latency_ms_after']:.3g}"]
        table.add_row(*(Text(cell) for cell in cells))
    return table


_PRUNE_METRICS = {"test_accuracy": "acc", "test_rse": "RSE", "test_ppl": "ppl"}


def _factor(before: float, after: float) -> str:
    """How many times smaller ``after`` is."""
    return f"{before / after:.2f}" if after else MISSING
