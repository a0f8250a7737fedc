"""The architecture as data: the only thing that crosses from search to retraining and plots.

A genotype is a list of nodes, each an operation applied to earlier states, plus the rule that turns
node states into the cell's output. State indices are shared by both recurrent spaces:

* ``darts_rnn``: state 0 is the highway init node ``s_0`` (on ``[x_t, h_{t-1}]``); node ``i``
  (1-based) applies one activation edge to one earlier state ``j < i``.
* ``two_input``: state -1 is the projected input ``u_t = W_x x_t + b_x``, state 0 is
  ``h_{t-1}``; node ``i`` applies a two-input operation to two earlier states ``a, b < i``. A
  cell with a ``cell_state`` node also carries that node's value to the next step, as an LSTM
  carries its memory cell: there state -2 is ``c_{t-1}`` (zero at the first step).
* ``darts_cnn`` (the DARTS CNN cell): a genotype holds two cells, the normal cell's nodes then
  the reduction cell's, as many of each. In either, state -1 is ``c_{k-2}`` and state 0
  ``c_{k-1}`` (the outputs of the two cells before it), and node ``i`` of that cell is the sum
  of two edges: its ``op`` is a pair, ``op[0]`` applied to state ``inputs[0]`` plus ``op[1]``
  applied to ``inputs[1]``. The cell's output is the concatenation of its nodes.

The JSON form carries ``format`` and ``version`` so that files written today stay readable, and
loading validates everything a discrete cell relies on, with messages a person can act on.
Version 2 added ``cell_state``, version 3 the ``darts_cnn`` space (ops given per input); older
files still load, meaning the same.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from morphnas.errors import LINK_LOOP, UserError, dangling_link

FORMAT = "morphnas.genotype"
VERSION = 3
# The fields of the JSON form; anything else is refused, because a misspelt optional field
# ("ouptut") would otherwise be ignored and the cell silently built with the default.
FIELDS = (
    "format", "version", "space", "output", "output_activation", "cell_state", "nodes", "metadata",
)  # fmt: skip
# Per version read, the fields it may hold: version 1 predates the carried cell state.
VERSION_FIELDS = {1: tuple(f for f in FIELDS if f != "cell_state"), 2: FIELDS, 3: FIELDS}
NODE_FIELDS = ("op", "inputs", "residual")

DARTS_PRIMITIVES = ("none", "tanh", "relu", "sigmoid", "identity")
TWO_INPUT_OPS = (
    "none",
    "add_tanh",
    "add_sigmoid",
    "add_relu",
    "add_identity",
    "hadamard",
    "add",
    "highway",
)

# The DARTS CNN operations (Liu et al. 2019, cnn/genotypes.py PRIMITIVES), in their order.
CNN_OPS = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
# CNN_OPS without weights: what a cell collapses to when the search prefers them.
CNN_PARAMETER_FREE = ("max_pool_3x3", "avg_pool_3x3", "skip_connect")

# Per space: the ops a node may carry (never 'none': derivation skips it), the number of inputs
# per node, the lowest state index a node may read, and the output rules it supports.
SPACE_OPS: dict[str, tuple[str, ...]] = {
    "darts_rnn": DARTS_PRIMITIVES[1:],
    "two_input": TWO_INPUT_OPS[1:],
    "darts_cnn": CNN_OPS[1:],
}
SPACE_ARITY = {"darts_rnn": 1, "two_input": 2, "darts_cnn": 2}
SPACE_FIRST_STATE = {"darts_rnn": 0, "two_input": -1, "darts_cnn": -1}
# Spaces whose node takes one op per input (a pair for darts_cnn) instead of one op of all of
# them, and the cells a genotype of the space holds (their nodes one after another, as many
# each); the first version that knows the space.
OP_PER_INPUT = ("darts_cnn",)
SPACE_CELLS: dict[str, tuple[str, ...]] = {"darts_cnn": ("normal", "reduce")}
SPACE_SINCE = {"darts_cnn": 3}
# The most nodes a genotype may have: twice the search spaces' own limit (space.nodes ≤ 32), room
# for hand-written cells, and a bound on what a corrupt or hostile file can make us build.
MAX_NODES = 64
CELL_STATE = -2  # the index of c_{t-1} in a two_input cell that carries a cell state
# Per space: the names of the states a node may read below node 1 (the cell's inputs), shared by
# the text form and the drawings (``report``) so that both name a state alike.
SPACE_STATE_NAMES: dict[str, dict[int, str]] = {
    "darts_rnn": {0: "s0"},
    "two_input": {CELL_STATE: "c", -1: "u", 0: "h"},
    "darts_cnn": {-1: "c_k-2", 0: "c_k-1"},
}
OUTPUTS = ("mean", "last", "concat")
# The output rules each space supports (a CNN cell concatenates its nodes' channels).
SPACE_OUTPUTS = {
    "darts_rnn": ("mean", "last"),
    "two_input": ("mean", "last"),
    "darts_cnn": ("concat",),
}
# Squashing applied to the combined node states to form h_t: "tanh" keeps the recurrent state
# bounded whatever ops a cell uses (a cell of parameter-free adds otherwise grows without bound).
OUTPUT_ACTIVATIONS = ("identity", "tanh")


@dataclass(frozen=True)
class Node:
    """One node of a discrete cell: ``op`` applied to the states listed in ``inputs``.

    A ``residual`` node (one added by growth) computes ``base + γ ⊙ op(...)``, where ``base`` is
    the cell's output rule applied to the nodes before it (``s_{i-1}`` for ``last``, the mean of
    ``s_1..s_{i-1}`` for ``mean``) and ``γ`` a learned vector that starts at zero: appending such a
    node leaves the cell's function unchanged, which is what makes growth a morphism.
    """

    op: str | tuple[str, ...]  # a tuple, one op per input, in the spaces of OP_PER_INPUT
    inputs: tuple[int, ...]
    residual: bool = False


@dataclass(frozen=True)
class Genotype:
    """A discrete recurrent cell; ``metadata`` (how it was found) is informative only.

    ``cell_state`` (two_input only): the 1-based node whose value the cell carries to the next
    step beside ``h``, readable there as state -2; ``None``: the cell carries ``h`` alone. It is
    what lets the space hold an LSTM, whose memory cell is not its output.
    """

    space: str
    nodes: tuple[Node, ...]
    output: str = "last"
    output_activation: str = "identity"
    cell_state: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "space": self.space,
            "output": self.output,
            "output_activation": self.output_activation,
            "cell_state": self.cell_state,
            "nodes": [
                {"op": _op_json(n.op), "inputs": list(n.inputs), "residual": n.residual}
                for n in self.nodes
            ],
            "metadata": self.metadata,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically (temp file + rename): a full disk leaves the old file."""
        path = Path(path)
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_json() + "\n")
            os.replace(tmp, path)
        except OSError as err:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise UserError(
                f"cannot save genotype {path}: {err.strerror or err}; check that the directory "
                "exists, is writable and has free space"
            ) from None

    def ops(self) -> list[str]:
        """Every op of the cell, node by node (both ops of a node that takes one per input)."""
        return [op for n in self.nodes for op in ((n.op,) if isinstance(n.op, str) else n.op)]

    def cells(self) -> list[tuple[str, tuple[Node, ...]]]:
        """The cells the genotype holds, ``(name, nodes)``: one unnamed cell in the recurrent
        spaces, the normal and the reduction cell in ``darts_cnn``."""
        names = SPACE_CELLS.get(self.space, ("",))
        size = len(self.nodes) // len(names)
        return [(name, self.nodes[k * size : (k + 1) * size]) for k, name in enumerate(names)]

    def __str__(self) -> str:
        """Readable one-line-per-node text, e.g. ``s2 = hadamard(s1, h)``."""
        names = SPACE_STATE_NAMES[self.space]  # a known space: ``validate`` checked it

        def state(i: int) -> str:
            return names.get(i, f"s{i}")

        if self.space in OP_PER_INPUT:
            lines = [f"{self.space} cells, output = concat of nodes"]
            for name, nodes in self.cells():
                lines.append(f"  {name} cell:")
                for i, node in enumerate(nodes, start=1):
                    edges = (
                        f"{op}({state(j)})" for op, j in zip(node.op, node.inputs, strict=True)
                    )
                    lines.append(f"    s{i} = {' + '.join(edges)}")
            return "\n".join(lines)
        rule = "last node" if self.output == "last" else "mean of nodes"
        if self.output_activation != "identity":
            rule = f"{self.output_activation}({rule})"
        carried = "" if self.cell_state is None else f", c_t = s{self.cell_state}"
        lines = [f"{self.space} cell, h_t = {rule}{carried}"]
        for i, node in enumerate(self.nodes, start=1):
            op = f"{node.op}({', '.join(state(j) for j in node.inputs)})"
            if node.residual:
                base = f"s{i - 1}" if self.output == "last" else f"mean(s1..s{i - 1})"
                op = f"{base} + γ{i} ⊙ {op}"
            lines.append(f"  s{i} = {op}")
        return "\n".join(lines)


def _op_json(op: str | tuple[str, ...]) -> str | list[str]:
    return op if isinstance(op, str) else list(op)


def _check_node_count(count: int) -> None:
    """A cell of more than ``MAX_NODES`` nodes is refused before it is built: a file with a
    million nodes would otherwise run for minutes before anything is said."""
    if count > MAX_NODES:
        raise UserError(
            f"genotype: {count} nodes; a cell may have at most {MAX_NODES} (searches grow to "
            "32 at most: space.nodes); check the file"
        )


def validate(genotype: Genotype) -> None:
    """Raise ``UserError`` unless every node names a known op and reads only earlier states."""
    space = genotype.space
    if space not in SPACE_OPS:
        raise UserError(
            f"genotype: unknown space {_short(space)}; expected one of {sorted(SPACE_OPS)}"
        )
    outputs = SPACE_OUTPUTS[space]
    if genotype.output not in outputs:
        raise UserError(
            f"genotype: unknown output {_short(genotype.output)} for space {space}; expected "
            f"one of {outputs}"
        )
    if genotype.output_activation not in OUTPUT_ACTIVATIONS:
        raise UserError(
            f"genotype: unknown output_activation {_short(genotype.output_activation)}; "
            f"expected one of {OUTPUT_ACTIVATIONS}"
        )
    if not genotype.nodes:
        raise UserError("genotype: 'nodes' is empty; a cell needs at least one node")
    _check_node_count(len(genotype.nodes))
    _validate_cell_state(genotype)
    cells = SPACE_CELLS.get(space, ("",))
    if len(genotype.nodes) % len(cells):
        raise UserError(
            f"genotype: {len(genotype.nodes)} nodes; a {space} genotype holds its "
            f"{' and '.join(cells)} cells' nodes one after the other, as many each"
        )
    size = len(genotype.nodes) // len(cells)
    for i, node in enumerate(genotype.nodes, start=1):
        _validate_node(genotype, i, node, (i - 1) % size + 1)


def _validate_node(genotype: Genotype, number: int, node: Node, i: int) -> None:
    """Node ``number`` of the genotype, node ``i`` of its own cell: known ops, as many inputs as
    the space takes, each an earlier state of that cell."""
    space = genotype.space
    arity, first = SPACE_ARITY[space], SPACE_FIRST_STATE[space]
    if genotype.cell_state is not None:
        first = CELL_STATE
    per_input = space in OP_PER_INPUT
    ops = node.op if per_input and isinstance(node.op, tuple) else (node.op,)
    if per_input and (not isinstance(node.op, tuple) or len(node.op) != arity):
        raise UserError(
            f"genotype: node {number} needs one op per input in space {space}: a list of "
            f"{arity} ops, e.g. {list(SPACE_OPS[space][-2:])}"
        )
    for op in ops:
        if op not in SPACE_OPS[space]:
            raise UserError(
                f"genotype: node {number} has unknown op {_short(op)} for space {space}; "
                f"{_did_you_mean(str(op), SPACE_OPS[space])}"
                f"expected one of {list(SPACE_OPS[space])}"
            )
    if len(node.inputs) != arity:
        raise UserError(
            f"genotype: node {number} has {len(node.inputs)} inputs; {space} nodes take {arity}"
        )
    if not isinstance(node.residual, bool):
        raise UserError(f"genotype: node {number} 'residual' must be true or false")
    if node.residual and (i == 1 or per_input):
        why = "there is no cell output before it" if i == 1 else f"{space} cells grow by cells"
        raise UserError(f"genotype: node {number} cannot be residual ({why})")
    where = f"node {number}" if number == i else f"node {number} (node {i} of its cell)"
    for j in node.inputs:
        if j >= i:
            later = "itself" if j == i else f"node {j}, which comes after it"
            raise UserError(
                f"genotype: {where} reads state {j}, i.e. {later} (a cell is computed in "
                f"order); it may read states {first}..{i - 1}"
            )
        if j < first:
            hint = ""
            if j == CELL_STATE and CELL_STATE in SPACE_STATE_NAMES[space]:
                hint = " (state -2, c, exists only in a cell with a 'cell_state' node)"
            raise UserError(
                f"genotype: {where} reads state {j}, which does not exist{hint} (states of "
                f"{space} start at {first}); it may read states {first}..{i - 1}"
            )


def _validate_cell_state(genotype: Genotype) -> None:
    """``cell_state`` names a node of a two_input cell, or is ``None``."""
    cell_state, n = genotype.cell_state, len(genotype.nodes)
    if cell_state is None:
        return
    if CELL_STATE not in SPACE_STATE_NAMES[genotype.space]:
        carry = [name for name, states in SPACE_STATE_NAMES.items() if CELL_STATE in states]
        raise UserError(
            f"genotype: 'cell_state' is for {', '.join(carry)} cells; a {genotype.space} cell "
            "carries only h (remove 'cell_state')"
        )
    if isinstance(cell_state, bool) or not isinstance(cell_state, int) or not 1 <= cell_state <= n:
        raise UserError(
            f"genotype: cell_state {_short(cell_state)} is not a node of this cell; give the "
            f"number (1..{n}) of the node whose value is carried as c, or null"
        )


def from_dict(data: Any) -> Genotype:
    """Build a genotype from parsed JSON, checking format, version and every field's type."""
    if not isinstance(data, dict):
        raise UserError("genotype: expected a JSON object at the top level")
    if data.get("format") != FORMAT:
        raise UserError(f"genotype: 'format' must be {FORMAT!r}; is this a morphnas genotype file?")
    _check_version(data.get("version"))
    if data["version"] == 1 and "cell_state" in data:
        raise UserError("genotype: 'cell_state' needs genotype version 2 (this file says 1)")
    _check_fields(data, VERSION_FIELDS[data["version"]], "the top level")
    for key in ("space", "nodes"):
        if key not in data:
            raise UserError(f"genotype: missing field {key!r}")
    if not isinstance(data["nodes"], list):
        raise UserError("genotype: 'nodes' must be a list of {'op', 'inputs'} objects")
    _check_node_count(len(data["nodes"]))
    nodes = []
    for i, raw in enumerate(data["nodes"], start=1):
        if not isinstance(raw, dict) or not {"op", "inputs"} <= raw.keys():
            raise UserError(f"genotype: node {i} must be an object with 'op' and 'inputs'")
        _check_fields(raw, NODE_FIELDS, f"node {i}")
        inputs, op = raw["inputs"], raw["op"]
        if isinstance(op, list) and all(isinstance(o, str) for o in op):
            op = tuple(op)  # one op per input (darts_cnn); validate checks the space takes it
        if (
            not isinstance(op, str | tuple)
            or not isinstance(inputs, list)
            or not all(isinstance(j, int) and not isinstance(j, bool) for j in inputs)
        ):
            raise UserError(
                f"genotype: node {i} needs a string 'op' (a list of strings, one per input, in "
                "darts_cnn) and a list of integer 'inputs'"
            )
        nodes.append(Node(op, tuple(inputs), raw.get("residual", False)))
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise UserError("genotype: 'metadata' must be an object")
    space = data["space"]
    if not isinstance(space, str):
        raise UserError("genotype: 'space', 'output' and 'output_activation' must be strings")
    if SPACE_SINCE.get(space, 1) > data["version"]:
        raise UserError(
            f"genotype: space {space} needs genotype version {SPACE_SINCE[space]} (this file "
            f"says {data['version']})"
        )
    output = data.get("output", "concat" if space in SPACE_CELLS else "last")
    squash = data.get("output_activation", "identity")
    if not all(isinstance(v, str) for v in (output, squash)):
        raise UserError("genotype: 'space', 'output' and 'output_activation' must be strings")
    cell_state = data.get("cell_state")
    return Genotype(
        space=space,
        nodes=tuple(nodes),
        output=output,
        output_activation=squash,
        cell_state=cell_state,
        metadata=metadata,
    )


def _check_version(version: Any) -> None:
    """Versions 1..VERSION are read; a newer one is named as such, so the fix (upgrade) is
    clear."""
    readable = f"versions 1..{VERSION}"
    if isinstance(version, bool) or not isinstance(version, int):
        raise UserError(
            f"genotype: 'version' must be an integer, got {_short(version)} (this morphnas "
            f"reads {readable})"
        )
    if version > VERSION:
        raise UserError(
            f"genotype: written by a newer morphnas (genotype version {version}; this one reads "
            f"{readable}); upgrade morphnas (pip install -U morphnas)"
        )
    if version not in VERSION_FIELDS:
        raise UserError(
            f"genotype: version {version} is not a genotype version this morphnas reads "
            f"({readable}); write the file again with morphnas"
        )


def _check_fields(data: dict[Any, Any], known: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in known:
            raise UserError(
                f"genotype: unknown field {_short(key)} at {where}; "
                f"{_did_you_mean(str(key), known)}fields are {', '.join(known)}"
            )


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _short(value: Any) -> str:
    """A value's repr cut to a length that keeps an error message on one readable line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def from_json(text: str) -> Genotype:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"genotype: not valid JSON ({err.msg} at line {err.lineno})") from None
    except (ValueError, RecursionError) as err:  # e.g. a 5000-digit integer, or deep nesting
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise UserError(f"genotype: not usable JSON ({_short(reason)[1:-1]})") from None
    return from_dict(data)


def load(path: str | Path) -> Genotype:
    """Read a genotype file; every failure is a one-line ``UserError`` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if dangling := dangling_link(path):
            raise UserError(
                f"genotype file {path} {dangling}; fix the link or give the path of the "
                "genotype.json"
            ) from None
        raise UserError(f"genotype file not found: {path}{_known_hint(str(path))}") from None
    except IsADirectoryError:
        raise UserError(
            f"cannot read genotype file {path}: it is a directory; give the genotype.json inside it"
        ) from None
    except UnicodeDecodeError as err:
        raise UserError(
            f"cannot read genotype file {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} "
            f"at offset {err.start}); give the genotype.json a search wrote"
        ) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(
                f"genotype file {path} {LINK_LOOP}; give the path of the real genotype.json"
            ) from None
        raise UserError(f"cannot read genotype file {path}: {err.strerror or err}") from None
    try:
        return from_json(text)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


# Published cells, usable as baselines (``train.baselines``) and by name in ``train --genotype``.
KNOWN: dict[str, Genotype] = {
    # The recurrent cell DARTS found on Penn Treebank (Liu et al. 2019, rnn/genotypes.py).
    "darts_v2": Genotype(
        "darts_rnn",
        (
            Node("sigmoid", (0,)),
            Node("relu", (1,)),
            Node("relu", (1,)),
            Node("identity", (1,)),
            Node("tanh", (2,)),
            Node("sigmoid", (5,)),
            Node("tanh", (3,)),
            Node("relu", (5,)),
        ),
        output="mean",
        metadata={"source": "DARTS (Liu et al. 2019), PTB search, rnn/genotypes.py DARTS_V2"},
    ),
    # GRU and LSTM as points of the two-input space: with suitable weights these cells compute
    # torch.nn.GRUCell / LSTMCell exactly (tests/test_known_cells.py copies the weights over).
    # Each op reading u gets its bias through b_x, the input bias of u = x W_x + b_x.
    "gru": Genotype(
        "two_input",
        (
            Node("add_sigmoid", (-1, 0)),  # r = σ(W_ir x + b_ir + W_hr h + b_hr)
            Node("add_sigmoid", (-1, 0)),  # z = σ(W_iz x + b_iz + W_hz h + b_hz)
            Node("add_identity", (0, -1)),  # W_hn h + b_hn (the u term supplies b_hn alone)
            Node("hadamard", (1, 3)),  # r ⊙ (W_hn h + b_hn)
            Node("add_tanh", (-1, 4)),  # n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
            Node("add_identity", (0, 5)),  # h − n
            Node("hadamard", (2, 6)),  # z ⊙ (h − n)
            Node("add", (5, 7)),  # h' = n + z ⊙ (h − n) = (1 − z) ⊙ n + z ⊙ h
        ),
        metadata={
            "source": "GRU (Cho et al. 2014) in torch.nn.GRUCell's form (r, z, n), written as a "
            "two_input cell: s1 = r, s2 = z, s5 = n, s8 = h'"
        },
    ),
    "lstm": Genotype(
        "two_input",
        (
            Node("add_sigmoid", (-1, 0)),  # i
            Node("add_sigmoid", (-1, 0)),  # f
            Node("add_tanh", (-1, 0)),  # g
            Node("add_sigmoid", (-1, 0)),  # o
            Node("hadamard", (2, CELL_STATE)),  # f ⊙ c
            Node("hadamard", (1, 3)),  # i ⊙ g
            Node("add", (5, 6)),  # c' = f ⊙ c + i ⊙ g
            Node("add_tanh", (7, -1)),  # tanh(c') (A = I, no u term)
            Node("hadamard", (4, 8)),  # h' = o ⊙ tanh(c')
        ),
        cell_state=7,
        metadata={
            "source": "LSTM (Hochreiter & Schmidhuber 1997) in torch.nn.LSTMCell's form (i, f, g, "
            "o), written as a two_input cell: s7 = c' is carried as c, s9 = h'"
        },
    ),
}

# Baseline names that stand for a published cell of ``KNOWN``, retrained from scratch. KNOWN's
# "lstm" and "gru" go by ``*_genotype`` here: the bare names are torch.nn's LSTM and GRU.
PUBLISHED_BASELINES = {"darts_v2": "darts_v2", "lstm_genotype": "lstm", "gru_genotype": "gru"}


def load_or_known(reference: str | Path) -> Genotype:
    """A genotype file, or the name of a published cell in ``KNOWN`` when no such file exists."""
    if not Path(reference).exists() and str(reference) in KNOWN:
        return KNOWN[str(reference)]
    return load(reference)


def _known_hint(reference: str) -> str:
    """For a missing file: the published cells, nearest first, since the name may be one."""
    close = difflib.get_close_matches(reference, list(KNOWN), n=1)
    if close:
        return f"; did you mean the published cell {close[0]!r}?"
    return f" (or name a published cell: {', '.join(KNOWN)})"
