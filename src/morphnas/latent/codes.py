"""What each node of a supernet may choose, as data the graph VAE can learn (E2NAS, methods.md §3).

A genotype of either recurrent space is a DAG whose nodes are operations (D-VAE's ops-on-nodes
format): node ``i`` applies one op to earlier states. Its discrete choice is exactly one entry of
its ``α`` other than ``none`` (darts_rnn: (predecessor, op); two_input: (op,) under a fixed wiring,
(input pair, op) under ``wiring: search``), so the table lists, per node, those entries and the
genotype ``Node`` each stands for. It is read from a live supernet through the ``SearchSpace``
protocol (one-hot mixing weights and ``node_options``), so it follows whatever the supernet allows
(its op subset, wiring, cell state, grown residual nodes) without knowing either space's layout.

Three indexings of a node's choice are used:

* the *flat entry* ``e``: an index into ``α.reshape(-1)`` (what strategies and spaces use);
* the *position*: an index into ``entries[i]`` (dense, what the VAE's data tensors hold);
* the *(row, column)* of ``α`` viewed as ``(rows, ops)``: the op is always the last axis, a row
  names the inputs the node reads (one row when the wiring fixes them).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from morphnas.genotype import CELL_STATE, SPACE_FIRST_STATE, Genotype, Node


@dataclass(frozen=True)
class ChoiceTable:
    """What each node of a supernet may choose: per node, its α shape and every non-`none` flat
    entry of α with the discrete genotype Node it stands for.

    ``output``, ``output_activation`` and ``cell_state`` are the supernet's output rule, used by
    ``genotype`` to build a cell the supernet could have derived; ``op_names`` its α columns.
    """

    space: str  # "darts_rnn" | "two_input"
    key: str  # stable text naming everything the table depends on; the cache key
    shapes: tuple[tuple[int, ...], ...]  # α shape per node (node i = index i-1)
    entries: tuple[tuple[int, ...], ...]  # per node: the allowed flat entries (non-none), ascending
    nodes_of: tuple[tuple[Node, ...], ...]  # per node: the Node of each allowed entry (same order)
    op_names: tuple[str, ...] = ()
    output: str = "last"
    output_activation: str = "identity"
    cell_state: int | None = None

    @classmethod
    def from_space(cls, space: Any) -> ChoiceTable:
        """Read the table from a live supernet (``morphnas.spaces.*``).

        Each non-``none`` entry is offered to ``space.node_options`` as a one-hot mixing weight;
        its best option is the Node the entry stands for, and ``space._entry`` must map that
        Node back to the same entry (checked: a space whose read-out merged two entries would
        otherwise give the VAE a choice it cannot express). Fixed nodes are treated as searchable,
        our reading: E2NAS searches every node in latent space.
        """
        op_names = tuple(space.op_names)
        shapes, entries, nodes_of = [], [], []
        for i, alpha in enumerate(space.arch, start=1):
            shape = tuple(int(s) for s in alpha.shape)
            allowed, nodes = _node_choices(space, i, shape, op_names)
            shapes.append(shape)
            entries.append(allowed)
            nodes_of.append(nodes)
        cell_state = getattr(space, "cell_state", None)
        fields = {
            "space": space.space,
            "op_names": op_names,
            "output": space.output,
            "output_activation": space.output_activation,
            "cell_state": cell_state,
        }
        key = _make_key(fields, tuple(shapes), tuple(nodes_of), getattr(space, "wiring", None))
        return cls(
            key=key,
            shapes=tuple(shapes),
            entries=tuple(entries),
            nodes_of=tuple(nodes_of),
            **fields,
        )

    @property
    def nodes(self) -> int:
        return len(self.shapes)

    @property
    def first_state(self) -> int:
        """The lowest state index a node may read: -2 (``c``) with a cell state, else the
        space's own first (darts_rnn 0, two_input -1)."""
        return CELL_STATE if self.cell_state is not None else SPACE_FIRST_STATE[self.space]

    @property
    def arity(self) -> int:
        return len(self.nodes_of[0][0].inputs)

    @property
    def size(self) -> int:
        """How many genotypes the table holds (an exact Python int: it overflows int64)."""
        return math.prod(len(e) for e in self.entries)

    def columns(self) -> int:
        """The number of op columns of every α (its last axis)."""
        return self.shapes[0][-1]

    def choices(self, genotype: Genotype) -> tuple[int, ...]:
        """The flat entry per node that stands for ``genotype``; ``ValueError`` naming the first
        node that is not among this table's choices."""
        if genotype.space != self.space or len(genotype.nodes) != self.nodes:
            raise ValueError(
                f"genotype is a {len(genotype.nodes)}-node {genotype.space} cell; this table is "
                f"for {self.nodes}-node {self.space} cells"
            )
        out = []
        for i, node in enumerate(genotype.nodes, start=1):
            lookup = self._lookup[i - 1]
            if node not in lookup:
                raise ValueError(
                    f"node {i} ({node.op} of states {list(node.inputs)}"
                    f"{', residual' if node.residual else ''}) is not one of node {i}'s "
                    f"{len(lookup)} choices in this {self.space} table"
                )
            out.append(self.entries[i - 1][lookup[node]])
        return tuple(out)

    def genotype(self, choices: Sequence[int], like: Genotype | None = None) -> Genotype:
        """The genotype whose node ``i`` is flat entry ``choices[i-1]``; its output rule and cell
        state are the supernet's, or ``like``'s (with its metadata) when given."""
        positions = self.positions(choices)
        nodes = tuple(self.nodes_of[i][p] for i, p in enumerate(positions))
        ref: Any = like if like is not None else self
        return Genotype(
            space=self.space,
            nodes=nodes,
            output=ref.output,
            output_activation=ref.output_activation,
            cell_state=ref.cell_state,
            metadata=dict(like.metadata) if like is not None else {},
        )

    def positions(self, choices: Sequence[int]) -> tuple[int, ...]:
        """Flat entries -> positions into ``entries[i]``; ``ValueError`` for a `none` or
        out-of-range entry."""
        if len(choices) != self.nodes:
            raise ValueError(f"{len(choices)} choices for a {self.nodes}-node table")
        out = []
        for i, e in enumerate(choices):
            index = self._entry_index[i].get(int(e))
            if index is None:
                raise ValueError(f"entry {int(e)} is not an allowed choice of node {i + 1}")
            out.append(index)
        return tuple(out)

    def flat(self, positions: Sequence[int]) -> tuple[int, ...]:
        """Positions into ``entries[i]`` -> flat entries."""
        return tuple(self.entries[i][int(p)] for i, p in enumerate(positions))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``[n, nodes]`` positions into ``entries[i]``, uniform per node (so uniform over the
        table's genotypes)."""
        counts = torch.tensor([len(e) for e in self.entries], dtype=torch.float64)
        u = torch.rand(n, self.nodes, generator=generator, dtype=torch.float64)
        return (u * counts).long().clamp_max(counts.long() - 1)

    def enumerate_all(self) -> Tensor:
        """Every genotype as positions, ``[size, nodes]`` (only for small tables)."""
        axes = [torch.arange(len(e)) for e in self.entries]
        return torch.cartesian_prod(*axes).reshape(-1, self.nodes)

    # ---- lookups built on first use (``cached_property`` writes the instance's ``__dict__``,
    # which a frozen dataclass allows) -----------------------------------------------------------

    @functools.cached_property
    def _lookup(self) -> list[dict[Node, int]]:
        """Per node: the position of each Node among its entries."""
        return [{n: p for p, n in enumerate(nodes)} for nodes in self.nodes_of]

    @functools.cached_property
    def _entry_index(self) -> list[dict[int, int]]:
        """Per node: the position of each allowed flat entry."""
        return [{e: p for p, e in enumerate(entries)} for entries in self.entries]


def _node_choices(
    space: Any, i: int, shape: tuple[int, ...], op_names: tuple[str, ...]
) -> tuple[tuple[int, ...], tuple[Node, ...]]:
    """Node ``i``'s allowed flat entries (every entry whose op column is not ``none``) and the
    Node each stands for.

    ``node_options`` is asked once per α row (one-hot on the row's first non-``none`` column):
    the row fixes the inputs and the column the op, so the row's other entries are that Node with
    its op replaced; ``space._entry`` then confirms every one (a space without ``_entry`` is asked
    entry by entry). Once per row rather than per entry: 8-node ``wiring: search`` has 4,000
    entries and ``node_options`` ranks them all at each call.
    """
    columns = shape[-1]
    numel = math.prod(shape)
    ops = [k for k, name in enumerate(op_names) if name != "none"]
    if not ops:
        raise ValueError(f"node {i} has no choice other than 'none'")
    exact = getattr(space, "_entry", None) is None
    allowed, nodes = [], []
    for row in range(numel // columns):
        base = _read_out(space, i, shape, row * columns + ops[0])
        for k in ops:
            e = row * columns + k
            node = _read_out(space, i, shape, e) if exact else replace(base, op=op_names[k])
            _check_inverse(space, i, node, e, shape)
            allowed.append(e)
            nodes.append(node)
    return tuple(allowed), tuple(nodes)


def _read_out(space: Any, i: int, shape: tuple[int, ...], e: int) -> Node:
    """The Node that one-hot mixing weights on flat entry ``e`` derive to."""
    hot = torch.zeros(math.prod(shape))
    hot[e] = 1.0
    return space.node_options(i, hot.reshape(shape))[0][1]


def _check_inverse(space: Any, i: int, node: Node, e: int, shape: tuple[int, ...]) -> None:
    """``space._entry(i, node)`` must be entry ``e`` again: the table is a bijection."""
    entry = getattr(space, "_entry", None)
    if entry is None:
        return
    back = entry(i, node)
    flat = 0
    for index, size in zip(back, shape, strict=True):
        flat = flat * size + int(index)
    if flat != e:
        raise ValueError(
            f"node {i}: entry {e} reads out as {node}, which the space maps back to entry {flat}"
        )


def _make_key(
    fields: dict[str, Any],
    shapes: tuple[tuple[int, ...], ...],
    nodes_of: tuple[tuple[Node, ...], ...],
    wiring: str | None,
) -> str:
    """Readable where it matters (space, nodes, ops, wiring, output rule, cell state, residual
    nodes), plus a digest of every entry's Node so that nothing the VAE was trained on can
    change without the key changing."""
    text = repr([[(n.op, n.inputs, n.residual) for n in nodes] for nodes in nodes_of])
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    residual = [i for i, nodes in enumerate(nodes_of, start=1) if nodes[0].residual]
    return (
        f"{fields['space']}|nodes={len(shapes)}|ops={','.join(fields['op_names'])}"
        f"|wiring={wiring}|output={fields['output']}/{fields['output_activation']}"
        f"|cell_state={fields['cell_state']}|residual={residual}"
        f"|shapes={';'.join('x'.join(map(str, s)) for s in shapes)}|entries={digest}"
    )
