"""Width and depth of a discrete cell (Shu, Wang, Cai, "Understanding architectures learnt by
cell-based neural architecture search", ICLR 2020), so a user sees whether a search drifted to
the wide, shallow cells that paper finds NAS favours (fast to train, not always best on test).

Our reading of the paper's definitions, on the cell's graph (states and the edges that read
them):

* **depth**: the number of edges on the longest path from one of the cell's inputs to its
  output (the edge from a node into the output counts, so a node reading only inputs gives 2);
* **width**: the sum, over intermediate nodes, of the share of a node's incoming edges that come
  straight from the cell's inputs: a node reading only inputs counts 1 (one node width: C
  channels in a CNN, the hidden size here), one reading an input and another node ½, one reading
  nodes only 0 (the paper: a node partly connected to the inputs has its width "deducted by the
  percentage of intermediate nodes" it reads). The DARTS normal cell is 3.5 wide and 3 deep.

How our spaces map onto that graph:

* ``darts_cnn``: each cell (normal, reduction) on its own; inputs ``c_{k-2}``, ``c_{k-1}``; every
  node feeds the output (concat). The summary's top level is the normal cell, as in the paper.
* ``darts_rnn``: the single input is the init node ``s0`` (the highway on ``[x_t, h_{t-1}]``
  plays the part of the CNN's preprocessing, which the paper does not count).
* ``two_input``: inputs ``u_t`` and ``h_{t-1}``, and ``c_{t-1}`` when the cell carries one; the
  outputs are the nodes of its output rule (every node for ``mean``, the last for ``last``)
  and the carried node. A node reading the same state twice has two edges from it.
* A residual node (grown) also reads its base: ``s_{i-1}`` (output ``last``) or ``s_1..s_{i-1}``
  (``mean``).
* Nodes from which no path reaches an output (possible under ``last``) compute nothing the cell
  returns, and count for neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from morphnas.genotype import CELL_STATE, SPACE_FIRST_STATE, Genotype, Node


@dataclass(frozen=True)
class CellShape:
    width: float  # in node widths
    depth: int  # edges


def _edges(genotype: Genotype, nodes: tuple[Node, ...]) -> list[list[int]]:
    """Per node (0-based list for 1-based nodes), the states its incoming edges leave from."""
    sources = []
    for i, node in enumerate(nodes, start=1):
        base = []
        if node.residual:
            base = [i - 1] if genotype.output == "last" else list(range(1, i))
        sources.append([*node.inputs, *(j for j in base if j >= 1)])
    return sources


def _outputs(genotype: Genotype, n: int) -> set[int]:
    """The nodes the cell's output reads (and the carried cell-state node)."""
    found = {n} if genotype.output == "last" else set(range(1, n + 1))
    if genotype.cell_state is not None:
        found.add(genotype.cell_state)
    return found


def shape_of(genotype: Genotype, nodes: tuple[Node, ...]) -> CellShape:
    """Width and depth of one cell of ``genotype`` given by its ``nodes`` (module doc)."""
    sources = _edges(genotype, nodes)
    n = len(nodes)
    outputs = _outputs(genotype, n)
    # Live nodes: those with a path to an output (walk back from the outputs).
    live = set(outputs)
    for i in range(n, 0, -1):
        if i in live:
            live.update(j for j in sources[i - 1] if j >= 1)
    is_input = {j for j in range(CELL_STATE, 1) if j >= SPACE_FIRST_STATE[genotype.space]}
    if genotype.cell_state is not None:
        is_input.add(CELL_STATE)
    hops = {j: 0 for j in is_input}
    for i in range(1, n + 1):
        hops[i] = 1 + max(hops[j] for j in sources[i - 1])
    width = sum(
        sum(j in is_input for j in sources[i - 1]) / len(sources[i - 1])
        for i in range(1, n + 1)
        if i in live
    )
    return CellShape(width=float(width), depth=1 + max(hops[i] for i in outputs))


def cell_shapes(genotype: Genotype) -> list[tuple[str, CellShape]]:
    """``(cell name, shape)`` per cell: one unnamed cell, or darts_cnn's normal and reduce."""
    return [(name, shape_of(genotype, nodes)) for name, nodes in genotype.cells()]


def summary(genotype: Genotype) -> dict[str, Any]:
    """``summary.json``'s ``cell_shape``: the (normal) cell's width and depth, and with several
    cells each one's under ``cells``."""
    shapes = cell_shapes(genotype)
    first = shapes[0][1]
    found: dict[str, Any] = {"width": first.width, "depth": first.depth}
    if len(shapes) > 1:
        found["cells"] = {name: {"width": s.width, "depth": s.depth} for name, s in shapes}
    return found


def describe(genotype: Genotype) -> str:
    """One line, e.g. ``width 3.5, depth 3`` (per cell for darts_cnn)."""
    parts = [
        f"{name + ': ' if name else ''}width {s.width:g}, depth {s.depth}"
        for name, s in cell_shapes(genotype)
    ]
    return "; ".join(parts)


def columns(shape: dict[str, Any] | None) -> dict[str, float]:
    """A run's ``cell_shape`` as compare's flat ``cell_width``/``cell_depth`` (none if absent)."""
    if not shape:
        return {}
    return {"cell_width": shape["width"], "cell_depth": shape["depth"]}
