"""Warm start: a search that begins at a known cell (``search.start_from``; docs/method.md).

Morphism-based NAS starts from a network that works and changes it only where that pays. A
differentiable search started from uniform ``α`` has to find a good cell from nothing, and on the
two-input space with input choice it never finds anything like GRU, although GRU is a point of
that space and, retrained, matches torch's. A warm start raises the ``α`` entry of each of a
known cell's choices by ``search.start_logit`` when a search starts (``ArchitectureMixin.prefer``):
the supernet's read-out starts concentrated on that cell, every other choice keeps its mass and
its gradient, and the search moves away where validation says so. A resumed search is not warm
started again: its checkpoint holds ``α``.
"""

from __future__ import annotations

from morphnas.config import RunConfig
from morphnas.errors import UserError
from morphnas.genotype import load_or_known
from morphnas.spaces.base import ArchitectureMixin


def _carried(cell_state: object) -> str:
    return "no cell state" if cell_state is None else f"node {cell_state} as its cell state (c)"


def warm_start(space: ArchitectureMixin, config: RunConfig) -> None:
    """Put ``config.search.start_from`` (if set) into the freshly built supernet ``space``.

    Every misfit is a one-line ``UserError``, raised before the run directory exists: what the
    config decides (the space, the node count, the cell state) here, with the key to change; what
    only the supernet knows (output rule, ops, inputs under the wiring) by ``space.prefer``.
    """
    reference = config.search.start_from
    if reference is None:
        return
    try:
        cell = load_or_known(reference)
    except UserError as err:
        raise UserError(f"search.start_from: {err}") from None
    where = f"search.start_from {reference!r}"
    if cell.space != config.space.name:
        raise UserError(
            f"{where} is a {cell.space} cell and this search's space is {config.space.name} "
            "(space.name)"
        )
    carried = config.space.options.get("cell_state")
    if cell.cell_state != carried:
        fix = (
            f"set space.options.cell_state={cell.cell_state} (with wiring=search)"
            if cell.cell_state is not None
            else "drop space.options.cell_state"
        )
        raise UserError(
            f"{where} carries {_carried(cell.cell_state)} and the supernet "
            f"{_carried(carried)}; {fix}"
        )
    nodes, start = len(cell.nodes), config.nodes_initial
    if nodes > start:
        key = "space.nodes" if config.growth.mode == "none" else "growth.nodes_start"
        raise UserError(
            f"{where} has {nodes} nodes and the search starts with {start} ({key}); "
            f"set {key} to {nodes} or more"
        )
    try:
        space.prefer(cell, config.search.start_logit)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None
