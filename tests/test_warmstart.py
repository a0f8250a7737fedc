"""Warm start (``search.start_from``): the search begins at a known cell, as a prior on α.

After ``prefer`` the supernet derives the known cell exactly, and only that cell's α entries
moved, by exactly ``start_logit``; a run records where it started; a resumed run is not warm
started twice; every misfit is refused in one line before the run directory exists.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from morphnas import api, config, spaces
from morphnas.engine import faults
from morphnas.engine.checkpoint import load
from morphnas.engine.resume import StopRequested
from morphnas.errors import UserError
from morphnas.genotype import KNOWN, Genotype, Node

# A small cell of the two-input space under each fixed wiring (the inputs the wiring gives).
CHAIN = Genotype(
    "two_input",
    (Node("add_tanh", (0, -1)), Node("hadamard", (1, 0)), Node("add_sigmoid", (2, 1))),
    output_activation="tanh",
)
INPUT = Genotype(
    "two_input",
    (Node("add_tanh", (0, -1)), Node("hadamard", (1, -1)), Node("highway", (2, -1))),
    output_activation="tanh",
)
GRU_SPACE = {"wiring": "search", "output_activation": "identity"}


def tiny(tmp_path: Path, **search) -> config.RunConfig:
    """A GRU-sized input-choice search, as small as a run gets."""
    overrides = {
        "threads": 1,
        "out": str(tmp_path / "run"),
        "data": {"dataset": "synthetic", "window": 8},
        "space": {"name": "two_input", "nodes": 8, "hidden": 8, "options": GRU_SPACE},
        "search": {"epochs": 2, "batch_size": 128, "start_from": "gru", **search},
        "train": {"epochs": 1, "baselines": []},
    }
    return config.resolve(overrides=overrides)


def expected_after(space, genotype: Genotype, logit: float) -> list[torch.Tensor]:
    """α as it should be after the warm start: the cell's entries, and only those, + logit."""
    expected = [alpha.detach().clone() for alpha in space.arch]
    for i, node in enumerate(genotype.nodes, start=1):
        expected[i - 1][space._entry(i, node)] += logit
    return expected


@pytest.mark.parametrize(
    ("genotype", "name", "options"),
    [
        (KNOWN["gru"], "two_input", GRU_SPACE),
        (KNOWN["darts_v2"], "darts_rnn", {}),
        (CHAIN, "two_input", {"wiring": "chain"}),
        (INPUT, "two_input", {"wiring": "input"}),
    ],
    ids=["gru-search", "darts_v2", "chain", "input"],
)
def test_the_supernet_derives_the_known_cell_and_only_its_entries_moved(genotype, name, options):
    torch.manual_seed(0)
    space = spaces.build(name, 3, 8, len(genotype.nodes), **options)
    assert space.derive() != genotype  # a cold start does not derive it by chance
    expected = expected_after(space, genotype, 2.5)
    space.prefer(genotype, 2.5)
    assert space.derive() == genotype
    for alpha, want in zip(space.arch, expected, strict=True):
        assert torch.equal(alpha.detach(), want)
    assert all(bool((p > 0).all()) for p in space.mixing_weights())  # every choice keeps mass


def test_extra_supernet_nodes_stay_as_they_are():
    torch.manual_seed(1)
    space = spaces.build("two_input", 3, 8, 10, **GRU_SPACE)
    before = [alpha.detach().clone() for alpha in space.arch]
    space.prefer(KNOWN["gru"], 3.0)
    assert space.derive().nodes[:8] == KNOWN["gru"].nodes
    assert all(torch.equal(space.arch[i].detach(), before[i]) for i in (8, 9))
    assert not any(torch.equal(space.arch[i].detach(), before[i]) for i in range(8))


def test_a_warm_started_search_records_its_start(tmp_path):
    result = api.search(tiny(tmp_path))
    # 20 architecture steps of Adam at 3e-3 move no entry by 3: the run keeps GRU.
    assert result.genotype == KNOWN["gru"]
    assert result.genotype.metadata["start_from"] == "gru"
    assert result.genotype.metadata["start_logit"] == 3.0
    saved = json.loads((result.run_dir / "genotype.json").read_text())
    assert saved["metadata"]["start_from"] == "gru"
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["genotype"]["metadata"]["start_from"] == "gru"
    assert config.resolve(result.run_dir / "config.yaml").search.start_from == "gru"


def test_a_cold_search_records_no_start(tmp_path):
    cfg = tiny(tmp_path, start_from=None, epochs=1)
    result = api.search(config.resolve(base=cfg, overrides={"space": {"nodes": 2}}))
    assert "start_from" not in result.genotype.metadata


def arch(run: Path) -> list[torch.Tensor]:
    state = load(run / "checkpoints" / "search_last.pt")["model"]
    return [v for k, v in sorted(state.items()) if k.startswith("cell.arch.")]


def test_a_resumed_run_is_not_warm_started_again(tmp_path, monkeypatch):
    """Stopped mid-epoch, its start cell's file gone, the run resumes from the checkpoint's α
    and ends where an uninterrupted run does."""
    cell = tmp_path / "start.json"
    CHAIN.save(cell)
    small = {"space": {"nodes": 3, "hidden": 6, "options": {"wiring": "chain"}}}
    runs = {}
    for name in ("whole", "cut"):
        overrides = {
            "threads": 1,
            "out": str(tmp_path / name),
            "data": {"dataset": "synthetic", "window": 6},
            "search": {"epochs": 2, "batch_size": 64, "start_from": str(cell)},
            "train": {"epochs": 1, "baselines": []},
            **small,
        }
        runs[name] = config.resolve(overrides=overrides)
    api.search(runs["whole"])
    monkeypatch.setattr(faults, "_passed", Counter())
    monkeypatch.setenv("MORPHNAS_CRASH_AT", "step:3:TERM")
    with pytest.raises(StopRequested):
        api.search(runs["cut"])
    monkeypatch.delenv("MORPHNAS_CRASH_AT")
    assert load(tmp_path / "cut" / "checkpoints" / "search_last.pt")["position"] == 3
    cell.unlink()  # a resumed run does not read it: α is in the checkpoint
    api.search(api.resume_config(tmp_path / "cut"), resume=True)
    for a, b in zip(arch(tmp_path / "cut"), arch(tmp_path / "whole"), strict=True):
        assert torch.equal(a, b)
    genotypes = [json.loads((tmp_path / n / "genotype.json").read_text()) for n in runs]
    assert genotypes[0] == genotypes[1] and genotypes[0]["metadata"]["start_from"] == str(cell)
    assert [Node(n["op"], tuple(n["inputs"])) for n in genotypes[0]["nodes"]] == list(CHAIN.nodes)


def write(tmp_path: Path, genotype: Genotype) -> str:
    path = tmp_path / "cell.json"
    genotype.save(path)
    return str(path)


# (config change, what the one-line message says); the start cell is gru unless given.
REFUSALS = {
    "another space": ({"start_from": "darts_v2"}, r"is a darts_rnn cell .* space is two_input"),
    "too few nodes": ({"space": {"nodes": 6}}, r"has 8 nodes .* set space\.nodes to 8 or more"),
    "growth": (
        {"growth": {"mode": "grow-then-prune", "nodes_start": 4}},
        r"starts with 4 \(growth\.nodes_start\); set growth\.nodes_start to 8",
    ),
    "fixed wiring": (
        {"space": {"options": {**GRU_SPACE, "wiring": "chain"}}},
        r"node 1 reads states \[-1, 0\], but wiring 'chain' gives node 1 states \[0, -1\]",
    ),
    "cell state": (
        {"start_from": "lstm", "space": {"nodes": 9}},
        r"carries node 7 as its cell state \(c\) and the supernet no cell state; set "
        r"space\.options\.cell_state=7",
    ),
    "no cell state": (
        {"space": {"options": {**GRU_SPACE, "cell_state": 8}}},
        r"carries no cell state and the supernet node 8 .*; drop space\.options\.cell_state",
    ),
    "op": (
        {"space": {"options": {**GRU_SPACE, "ops": ["add_tanh", "add_sigmoid", "add"]}}},
        r"op 'add_identity' is not among the supernet's ops",
    ),
    "output rule": (
        {"space": {"options": {"output_activation": "tanh"}}},
        r"output_activation=identity\) is not the supernet's .*output_activation=tanh",
    ),
    "no file": ({"start_from": "gru.json"}, r"search\.start_from: genotype file not found"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_misfit_is_one_line_before_the_run_directory(tmp_path, case):
    change, message = REFUSALS[case]
    change = dict(change)
    cfg = tiny(tmp_path, start_from=change.pop("start_from", "gru"))
    cfg = config.resolve(base=cfg, overrides=change)
    with pytest.raises(UserError, match=message) as err:
        api.search(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("genotype", "options", "message"),
    [
        (
            Genotype("two_input", (Node("add_tanh", (-1, 0)), Node("hadamard", (1, 1)))),
            {},
            r"node 2 reads states \[1, 1\]; under wiring 'search' a node reads two distinct",
        ),
        (
            Genotype(
                "two_input", (Node("add_tanh", (0, -1)), Node("hadamard", (1, 0), residual=True))
            ),
            {"wiring": "chain"},  # output_activation identity, as tiny's
            r"node 2 is residual \(a grown node\) and the supernet's node 2 is not residual",
        ),
    ],
    ids=["same input twice", "residual"],
)
def test_a_cell_file_the_supernet_cannot_hold_is_refused(tmp_path, genotype, options, message):
    cfg = tiny(tmp_path, start_from=write(tmp_path, genotype))
    cfg = config.resolve(base=cfg, overrides={"space": {"nodes": 2, "options": options}})
    with pytest.raises(UserError, match=message) as err:
        api.search(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_refused_cell_moves_no_alpha():
    """Every node is checked before any entry moves: a misfit in the last node changes nothing."""
    space = spaces.build("two_input", 3, 8, 3, wiring="chain")
    before = [alpha.detach().clone() for alpha in space.arch]
    bad = Genotype("two_input", (*CHAIN.nodes[:2], Node("add", (2, -1))), output_activation="tanh")
    with pytest.raises(ValueError, match="node 3 reads states"):
        space.prefer(bad, 3.0)
    assert all(torch.equal(a.detach(), b) for a, b in zip(space.arch, before, strict=True))


@pytest.mark.parametrize(
    ("search", "key"),
    [({"start_logit": 0}, "start_logit"), ({"start_logit": float("inf")}, "start_logit"),
     ({"start_from": ""}, "start_from")],
)  # fmt: skip
def test_the_config_refuses_a_useless_start(search, key):
    with pytest.raises(UserError, match=rf"search\.{key}"):
        config.resolve(overrides={"search": search})
    defaults = config.resolve().search
    assert (defaults.start_from, defaults.start_logit) == (None, 3.0)
