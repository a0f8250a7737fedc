"""The genotype as data: exact JSON round trip, readable text, and clear refusal of bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from morphnas import genotype as gt
from morphnas.errors import UserError
from morphnas.genotype import Genotype, Node

# The published DARTS cell, with metadata that exercises JSON's corners.
DARTS_V2 = dataclasses.replace(
    gt.KNOWN["darts_v2"], metadata={"seed": 2, "probs": [[0.1, 0.9]], "note": "ünïcode ok"}
)
LSTM_LIKE = Genotype(
    "two_input",
    (
        Node("add_sigmoid", (0, -1)),
        Node("add_tanh", (0, -1)),
        Node("hadamard", (1, 2)),
        Node("highway", (3, 0)),
        Node("add", (-1, -1)),
    ),
    output="last",
    output_activation="tanh",
)
GENOTYPES = [DARTS_V2, LSTM_LIKE, Genotype("two_input", (Node("add_identity", (0, -1)),), "mean")]


def valid_dict() -> dict:
    return {
        "format": "morphnas.genotype",
        "version": 1,
        "space": "two_input",
        "output": "last",
        "nodes": [{"op": "hadamard", "inputs": [0, -1]}, {"op": "add_tanh", "inputs": [1, 0]}],
        "metadata": {},
    }


def with_(**changes) -> str:
    d = valid_dict()
    for key, value in changes.items():
        if value is ...:
            del d[key]
        else:
            d[key] = value
    return json.dumps(d)


@pytest.mark.parametrize("g", GENOTYPES, ids=["darts_v2", "lstm_like", "single"])
def test_json_round_trip_exact(g):
    text = g.to_json()
    back = gt.from_json(text)
    assert back == g
    assert back.nodes == g.nodes and back.space == g.space and back.output == g.output
    assert back.output_activation == g.output_activation
    assert back.metadata == g.metadata  # metadata is excluded from ==, so check it on its own
    assert all(isinstance(j, int) for n in back.nodes for j in n.inputs)
    assert isinstance(back.nodes, tuple) and all(isinstance(n.inputs, tuple) for n in back.nodes)
    assert back.to_json() == text  # byte-for-byte stable
    assert gt.from_dict(json.loads(text)) == g


def test_json_has_format_and_version():
    d = json.loads(LSTM_LIKE.to_json())
    assert d["format"] == gt.FORMAT == "morphnas.genotype"
    assert d["version"] == gt.VERSION == 3
    assert d["cell_state"] is None
    assert d["nodes"][2] == {"op": "hadamard", "inputs": [1, 2], "residual": False}
    assert d["output"] == "last" and d["output_activation"] == "tanh"


@pytest.mark.parametrize("g", GENOTYPES, ids=["darts_v2", "lstm_like", "single"])
def test_file_save_load(g, tmp_path):
    path = tmp_path / "genotype.json"
    g.save(path)
    back = gt.load(path)
    assert back == g and back.metadata == g.metadata
    assert gt.load(str(path)) == g
    assert path.read_text(encoding="utf-8").endswith("\n")


def test_equality_and_hash_ignore_metadata():
    a = Genotype("darts_rnn", (Node("tanh", (0,)),), "mean", metadata={"a": 1})
    b = Genotype("darts_rnn", (Node("tanh", (0,)),), "mean", metadata={"b": 2})
    assert a == b
    assert a != Genotype("darts_rnn", (Node("relu", (0,)),), "mean")


def test_missing_optional_fields_take_their_defaults():
    d = valid_dict()
    del d["output"], d["metadata"]
    g = gt.from_dict(d)
    assert g.output == "last" and g.metadata == {}
    assert g.output_activation == "identity"  # files written before the field existed


def test_equality_sees_output_activation():
    nodes = (Node("add", (0, -1)),)
    assert Genotype("two_input", nodes) != Genotype("two_input", nodes, output_activation="tanh")


def test_str_is_readable():
    text = str(LSTM_LIKE)
    lines = text.splitlines()
    assert lines[0] == "two_input cell, h_t = tanh(last node)"
    assert lines[1:] == [
        "  s1 = add_sigmoid(h, u)",
        "  s2 = add_tanh(h, u)",
        "  s3 = hadamard(s1, s2)",
        "  s4 = highway(s3, h)",
        "  s5 = add(u, u)",
    ]
    darts = str(DARTS_V2).splitlines()
    assert darts[0] == "darts_rnn cell, h_t = mean of nodes"
    assert darts[1] == "  s1 = sigmoid(s0)"
    assert darts[6] == "  s6 = sigmoid(s5)"
    assert len(darts) == 9


def test_ops():
    assert LSTM_LIKE.ops() == ["add_sigmoid", "add_tanh", "hadamard", "highway", "add"]


# --------------------------------------------------------------------------------------------
# Malformed input: a UserError whose message names the problem
# --------------------------------------------------------------------------------------------

BAD = [
    ("not json", "{nope", "not valid JSON"),
    ("empty text", "", "not valid JSON"),
    ("top level list", "[1, 2]", "JSON object"),
    ("wrong format", with_(format="darts.genotype"), "format"),
    ("missing format", with_(format=...), "format"),
    ("wrong version", with_(version=4), "version"),
    ("string version", with_(version="1"), "version"),
    ("boolean version", with_(version=True), "version"),
    ("missing version", with_(version=...), "version"),
    ("missing nodes", with_(nodes=...), "nodes"),
    ("missing space", with_(space=...), "space"),
    ("nodes not a list", with_(nodes={"op": "add"}), "nodes"),
    ("empty nodes", with_(nodes=[]), "empty"),
    ("node not an object", with_(nodes=["hadamard"]), "node 1"),
    ("node without inputs", with_(nodes=[{"op": "hadamard"}]), "inputs"),
    (
        "unknown op",
        with_(nodes=[{"op": "hadamard", "inputs": [0, -1]}, {"op": "conv3x3", "inputs": [1, 0]}]),
        "conv3x3",
    ),
    ("none op", with_(nodes=[{"op": "none", "inputs": [0, -1]}]), "'none'"),
    (
        "op of the other space",
        with_(nodes=[{"op": "tanh", "inputs": [0, -1]}]),
        "unknown op 'tanh'",
    ),
    ("op not a string", with_(nodes=[{"op": 3, "inputs": [0, -1]}]), "string 'op'"),
    ("too few inputs", with_(nodes=[{"op": "hadamard", "inputs": [0]}]), "1 inputs"),
    ("too many inputs", with_(nodes=[{"op": "add", "inputs": [0, -1, 0]}]), "3 inputs"),
    (
        "darts arity",
        with_(space="darts_rnn", nodes=[{"op": "tanh", "inputs": [0, 0]}]),
        "2 inputs",
    ),
    (
        "dangling input (later node)",
        with_(nodes=[{"op": "hadamard", "inputs": [0, 2]}, {"op": "add", "inputs": [1, 0]}]),
        "reads state 2",
    ),
    ("self input", with_(nodes=[{"op": "hadamard", "inputs": [1, 0]}]), "reads state 1"),
    ("below the seeds", with_(nodes=[{"op": "hadamard", "inputs": [0, -2]}]), "reads state -2"),
    (
        "darts reads u",
        with_(space="darts_rnn", nodes=[{"op": "tanh", "inputs": [-1]}]),
        "reads state -1",
    ),
    ("float input", with_(nodes=[{"op": "hadamard", "inputs": [0, -1.0]}]), "integer"),
    ("string input", with_(nodes=[{"op": "hadamard", "inputs": ["0", -1]}]), "integer"),
    ("boolean input", with_(nodes=[{"op": "hadamard", "inputs": [False, True]}]), "integer"),
    ("null input", with_(nodes=[{"op": "hadamard", "inputs": [0, None]}]), "integer"),
    ("inputs not a list", with_(nodes=[{"op": "hadamard", "inputs": 0}]), "integer"),
    ("unknown space", with_(space="darts_cnn"), "darts_cnn"),
    ("space not a string", with_(space=1), "space"),
    ("unknown output", with_(output="max"), "max"),
    ("output not a string", with_(output=None), "output"),
    ("metadata not an object", with_(metadata=[1]), "metadata"),
    ("unknown output_activation", with_(output_activation="relu"), "output_activation 'relu'"),
    ("output_activation not a string", with_(output_activation=1), "output_activation"),
]


@pytest.mark.parametrize(("text", "needle"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_json_is_refused_with_a_clear_message(text, needle):
    with pytest.raises(UserError) as info:
        gt.from_json(text)
    message = str(info.value)
    assert needle in message
    assert message.startswith("genotype")
    assert "\n" not in message


@pytest.mark.parametrize(("text", "needle"), [b[1:] for b in BAD[:7]], ids=[b[0] for b in BAD[:7]])
def test_malformed_file_names_the_file(text, needle, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        gt.load(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "genotype.json"
    with pytest.raises(UserError, match="not found") as info:
        gt.load(path)
    assert str(path) in str(info.value)


def test_unreadable_file_is_a_user_error(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match=r"binary\.json"):
        gt.load(path)
    with pytest.raises(UserError, match="cannot read"):
        gt.load(tmp_path)  # a directory


def test_direct_construction_is_validated_too():
    with pytest.raises(UserError, match="unknown op"):
        Genotype("darts_rnn", (Node("hadamard", (0,)),), "mean")
    with pytest.raises(UserError, match="reads state 1"):
        Genotype("darts_rnn", (Node("tanh", (1,)),), "mean")
    with pytest.raises(UserError, match="empty"):
        Genotype("two_input", (), "last")
    with pytest.raises(UserError, match="unknown space"):
        Genotype("cnn", (Node("tanh", (0,)),), "mean")
    with pytest.raises(UserError, match="unknown output"):
        Genotype("two_input", (Node("add", (0, -1)),), "first")
    with pytest.raises(UserError, match="unknown output_activation"):
        Genotype("two_input", (Node("add", (0, -1)),), "last", output_activation="sigmoid")


def test_every_op_of_each_space_is_accepted():
    for op in gt.SPACE_OPS["darts_rnn"]:
        Genotype("darts_rnn", (Node(op, (0,)),), "mean")
    for op in gt.SPACE_OPS["two_input"]:
        Genotype("two_input", (Node(op, (0, -1)),), "last")
    assert "none" not in gt.SPACE_OPS["darts_rnn"] + gt.SPACE_OPS["two_input"]


def test_a_cell_beyond_the_node_limit_is_refused_before_it_is_built(tmp_path):
    """A file with a huge node count is one line at once (it used to run for minutes), in the
    file and in code; a cell at the limit is fine."""
    node = {"op": "add", "inputs": [-1, 0]}
    data = {"format": gt.FORMAT, "version": gt.VERSION, "space": "two_input"}
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({**data, "nodes": [node] * 1_000_000}))
    with pytest.raises(UserError, match=r"1000000 nodes; a cell may have at most 64") as err:
        gt.load(path)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"65 nodes; a cell may have at most 64"):
        Genotype("two_input", (Node("add", (-1, 0)),) * 65)
    assert len(gt.from_dict({**data, "nodes": [node] * 64}).nodes) == 64
