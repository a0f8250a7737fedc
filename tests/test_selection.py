"""Against collapse: weight warm-up, candidate cells ranked by the supernet's distribution and
chosen on valid, and the check that refuses a degenerate derived cell (docs/method.md)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from rich.console import Console
from torch import nn

from morphnas import api, config, degenerate, report, run_files, selection, spaces
from morphnas.errors import UserError
from morphnas.genotype import KNOWN, Genotype, Node
from morphnas.spaces.base import ArchitectureMixin

TINY = {
    "threads": 1,
    "data": {"dataset": "synthetic", "window": 6},
    "space": {"name": "darts_rnn", "nodes": 2, "hidden": 6},
    "search": {"epochs": 2, "batch_size": 128},
    "train": {"epochs": 1, "baselines": []},
}


def tiny(tmp_path, **search) -> config.RunConfig:
    overrides = config.merge(TINY, {"out": str(tmp_path / "run"), "search": search})
    return config.resolve(overrides=overrides)


def two_input(*nodes: tuple[str, tuple[int, int]], cell_state: int | None = None) -> Genotype:
    return Genotype(
        "two_input",
        tuple(Node(op, inputs) for op, inputs in nodes),
        output_activation="tanh",
        cell_state=cell_state,
    )


# --------------------------------------------------------------------------- node options


def darts_space(seed: int = 0, nodes: int = 3) -> spaces.base.SearchSpace:
    torch.manual_seed(seed)
    space = spaces.build("darts_rnn", 3, 8, nodes)
    with torch.no_grad():
        for alpha in space.arch:
            alpha.normal_()
    return space


def test_darts_node_options_rank_every_edge_and_put_the_derive_rule_first():
    space = darts_space()
    none = space.op_names.index("none")
    for i, p in enumerate(space.mixing_weights(), start=1):
        p = p.detach()
        options = space.node_options(i, p)
        assert len(options) == i * (len(space.op_names) - 1)  # every (predecessor, op) but none
        scores = [score for score, _ in options]
        assert scores == sorted(scores, reverse=True)
        assert all(node.op != "none" for _, node in options)
        # DARTS's rule, written out: the strongest non-none entry of the node
        masked = p.clone()
        masked[:, none] = -1
        j, k = divmod(int(masked.argmax()), len(space.op_names))
        assert options[0][1] == Node(space.op_names[k], (j,))
        assert options[0][0] == pytest.approx(float(p[j, k]))
    assert space.derive().nodes == tuple(
        space.node_options(i, p)[0][1] for i, p in enumerate(space.mixing_weights(), start=1)
    )


def test_darts_node_options_break_ties_by_predecessor_then_op():
    space = spaces.build("darts_rnn", 3, 8, 2)
    p = torch.full((2, len(space.op_names)), 0.2)
    options = space.node_options(2, p)
    assert [node for _, node in options[:2]] == [Node("tanh", (0,)), Node("relu", (0,))]
    assert options[len(space.op_names) - 1][1] == Node("tanh", (1,))


class OnlyChoose(ArchitectureMixin, nn.Module):
    """A space written before ``node_options``: it knows only ``_choose``."""

    space, output, output_activation = "two_input", "last", "tanh"

    def __init__(self) -> None:
        super().__init__()
        self.arch = nn.ParameterList([nn.Parameter(torch.tensor([0.0, 2.0, 1.0]))])
        self.fixed: dict[int, Node] = {}

    def _choose(self, i: int, p: torch.Tensor) -> Node:
        return Node(("hadamard", "add_tanh", "add")[int(p.argmax())], (0, -1))


def test_a_space_without_node_options_still_derives_and_offers_no_alternative():
    space = OnlyChoose()
    (p,) = space.mixing_weights()
    assert space.node_options(1, p) == [(1.0, Node("add_tanh", (0, -1)))]
    derived = space.derive()
    assert derived.nodes == (Node("add_tanh", (0, -1)),)
    assert [g for _, g in selection.ranked_genotypes(space, derived)] == [derived]


# --------------------------------------------------------------------------- ranked genotypes


def test_ranked_genotypes_follow_the_joint_likelihood_exactly():
    space = darts_space(seed=1)
    space.fix(2, Node("relu", (1,)))  # a fixed node stays as it was fixed
    derived = space.derive()
    ranked = list(selection.ranked_genotypes(space, derived))
    assert ranked[0][1] == derived
    assert all(g.nodes[1] == Node("relu", (1,)) for _, g in ranked)
    assert len({g.nodes for _, g in ranked}) == len(ranked) == 4 * 12  # nodes 1 and 3 searched
    probs = space.mixing_weights()
    brute = sorted(
        (
            sum(math.log(score) for score, _ in combo)
            for combo in itertools.product(
                space.node_options(1, probs[0]), space.node_options(3, probs[2])
            )
        ),
        reverse=True,
    )
    assert [score for score, _ in ranked] == pytest.approx(brute, abs=1e-12)
    # the runner-up changes the node whose best option leads its second by the smallest margin
    margins = {
        i: math.log(opts[0][0] / opts[1][0])
        for i in (1, 3)
        for opts in [space.node_options(i, probs[i - 1])]
    }
    changed = [n for n in (0, 2) if ranked[1][1].nodes[n] != derived.nodes[n]]
    assert changed == [min(margins, key=margins.get) - 1]


def test_a_strategy_cell_that_is_not_the_argmax_comes_first_unscored():
    space = darts_space(seed=2, nodes=1)
    derived = space.derive()
    other = Genotype("darts_rnn", (Node("identity", (0,)),), output="mean")
    if other == derived:
        other = Genotype("darts_rnn", (Node("tanh", (0,)),), output="mean")
    ranked = list(selection.ranked_genotypes(space, other))
    assert ranked[0] == (None, other)
    assert [g.nodes for _, g in ranked].count(other.nodes) == 1
    assert len(ranked) == len(space.op_names) - 1


# --------------------------------------------------------------------------- degenerate cells


@pytest.mark.parametrize(
    ("genotype", "expected"),
    [
        # hadamard chains: zero for ever from h_0 = 0
        (two_input(("hadamard", (0, -1)), ("hadamard", (1, 0)), ("hadamard", (2, 1))),
         {"dead": True, "input": False}),
        (two_input(("hadamard", (0, -1))), {"dead": True, "input": False}),
        # never reads u: the same output for every input sequence
        (two_input(("add_tanh", (0, 0)), ("add_sigmoid", (1, 0))),
         {"dead": True, "input": False, "recurrent": True}),
        # never reads h: no memory
        (two_input(("add_tanh", (-1, -1)), ("add_tanh", (1, -1))),
         {"dead": False, "input": True, "recurrent": False}),
    ],
    ids=["hadamard-chain", "hadamard", "no-input", "no-state"],
)  # fmt: skip
def test_degenerate_cells_are_found(genotype, expected):
    verdict = degenerate.check(genotype, 3, 16)
    assert verdict.degenerate and verdict.reason
    assert {k: getattr(verdict, k) for k in expected} == expected
    assert ("zero" in verdict.reason) == (genotype.nodes[0].op == "hadamard")


@pytest.mark.parametrize(
    "genotype",
    [
        KNOWN["darts_v2"],
        two_input(("add_tanh", (-1, 0))),
        two_input(("hadamard", (0, -1)), ("add_tanh", (1, -1))),  # dead first node, live second
        KNOWN["gru"],
        KNOWN["lstm"],  # carries c beside h
    ],
    ids=["darts_v2", "add_tanh", "hadamard-then-add_tanh", "gru", "lstm"],
)
def test_healthy_cells_pass(genotype):
    verdict = degenerate.check(genotype, 3, 16)
    assert (verdict.input, verdict.recurrent, verdict.dead) == (True, True, False)
    assert not verdict.degenerate and verdict.reason == ""
    assert verdict.to_dict()["degenerate"] is False


def test_a_residual_path_counts_although_its_scale_starts_at_zero():
    """γ = 0 in a fresh cell; training opens the path, so the check draws γ too."""
    grown = Genotype(
        "two_input",
        (Node("hadamard", (0, -1)), Node("add_tanh", (1, -1), residual=True)),
        output_activation="tanh",
    )
    assert not degenerate.check(grown, 3, 8).degenerate


def test_the_check_is_deterministic_and_leaves_the_global_random_state_alone():
    genotype = two_input(("add_tanh", (-1, 0)))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = degenerate.check(genotype, 2, 4)
    assert torch.equal(torch.get_rng_state(), before)
    assert degenerate.check(genotype, 2, 4) == first


# --------------------------------------------------------------------------- config


def test_the_warm_up_must_leave_architecture_epochs():
    with pytest.raises(UserError, match=r"warmup_epochs \(3\) must be below search\.epochs"):
        config.resolve(overrides={"search": {"epochs": 3, "warmup_epochs": 3}})
    with pytest.raises(UserError, match=r"search\.select"):
        config.resolve(overrides={"search": {"select": "test"}})
    with pytest.raises(UserError, match=r"search\.candidates"):
        config.resolve(overrides={"search": {"candidates": 0}})
    defaults = config.resolve().search
    assert (defaults.warmup_epochs, defaults.select, defaults.degenerate) == (0, "alpha", "skip")


# --------------------------------------------------------------------------- in a run


def test_warm_up_epochs_take_weight_steps_only(tmp_path):
    result = api.search(tiny(tmp_path, epochs=3, warmup_epochs=2))
    rows = [r for r in run_files.read_metrics(result.run_dir / "metrics.jsonl")]
    search = [r for r in rows if r["phase"] == "search"]
    assert [r["epoch"] for r in search] == [1, 2, 3]  # the budget is unchanged
    assert [r.get("warmup", False) for r in search] == [True, True, False]
    assert search[0]["train_loss"] != search[1]["train_loss"]  # the weights learnt
    assert search[0]["arch"] == search[1]["arch"]  # α did not
    assert search[2]["arch"] != search[1]["arch"]
    assert result.extra["selection"]["note"] is None  # the derived darts cell, healthy
    assert result.results[0]["degenerate"] is False
    assert not any(r["phase"] == "select" for r in rows)


def flag_first(monkeypatch, always: bool = False) -> list[Genotype]:
    """``degenerate.check`` that calls the first cell it sees (the derived one) dead, or every
    cell with ``always``; the others get the real check."""
    real, seen = degenerate.check, []

    def check(genotype: Genotype, input_size: int, hidden_size: int) -> degenerate.Verdict:
        seen.append(genotype)
        if always or genotype == seen[0]:
            return degenerate.Verdict(False, True, True, "dead: stub")
        return real(genotype, input_size, hidden_size)

    monkeypatch.setattr(degenerate, "check", check)
    return seen


def test_a_degenerate_derived_cell_gives_way_to_the_next_likely_one(tmp_path, monkeypatch):
    seen = flag_first(monkeypatch)
    with pytest.warns(UserWarning, match=r"the most likely cell is degenerate \(dead: stub\)"):
        result = api.search(tiny(tmp_path))
    chosen = result.extra["selection"]
    assert chosen["select"] == "alpha" and chosen["chosen"] == 2
    assert [r["degenerate"] for r in chosen["candidates"]] == [True, False]
    assert result.genotype.nodes == seen[1].nodes != seen[0].nodes
    assert result.genotype.metadata["selection"] == {"select": "alpha", "rank": 2}
    saved = json.loads((result.run_dir / "genotype.json").read_text())
    assert [n["op"] for n in saved["nodes"]] == [n.op for n in seen[1].nodes]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["selection"] == chosen and summary["results"][0]["degenerate"] is False
    assert "kept candidate 2" in chosen["note"]
    rows = run_files.read_metrics(result.run_dir / "metrics.jsonl")
    assert {"phase": "select", "event": "choice", "chosen": 2} in rows


def test_select_valid_retrains_likely_candidates_and_keeps_the_best_on_valid(tmp_path, monkeypatch):
    flag_first(monkeypatch)
    cfg = tiny(tmp_path, select="valid", candidates=3, select_epochs=2)
    with pytest.warns(UserWarning, match="degenerate"):
        result = api.search(cfg)
    chosen = result.extra["selection"]
    records = chosen["candidates"]
    assert [r["rank"] for r in records] == [1, 2, 3, 4]  # the degenerate one passed over
    assert "valid_loss" not in records[0]
    usable = records[1:]
    assert all(r["epochs"] == 2 and math.isfinite(r["valid_loss"]) for r in usable)
    assert chosen["chosen"] == min(usable, key=lambda r: r["valid_loss"])["rank"]
    kept = records[chosen["chosen"] - 1]
    assert [n.op for n in result.genotype.nodes] == [n["op"] for n in kept["nodes"]]
    rows = run_files.read_metrics(result.run_dir / "metrics.jsonl")
    for r in usable:
        curve = [x for x in rows if x.get("model") == f"candidate-{r['rank']}"]
        assert [x["phase"] for x in curve] == ["select", "select"]
        assert min(x["valid_loss"] for x in curve) == r["valid_loss"]
    assert {"phase": "select", "event": "choice", "chosen": kept["rank"]} in rows
    assert json.loads((result.run_dir / "selection.json").read_text()) == usable
    assert f"candidate {kept['rank']} of 3" in chosen["note"]


def test_no_usable_cell_is_said_plainly(tmp_path, monkeypatch):
    flag_first(monkeypatch, always=True)
    with pytest.warns(UserWarning, match="no cell among the 32 most likely is non-degenerate"):
        result = api.search(tiny(tmp_path, select="valid", candidates=2))
    chosen = result.extra["selection"]
    assert chosen["chosen"] == 1 and chosen["degenerate"] is True
    assert len(chosen["candidates"]) == 32  # every cell of this space: 4 × 8 choices
    row = result.results[0]
    assert row["degenerate"] is True and row["degenerate_reason"] == "dead: stub"
    assert not (result.run_dir / "selection.json").exists()  # nothing worth retraining briefly
    console = Console(record=True, width=200)
    console.print(report.results_table(result.results))
    text = console.export_text()
    assert "searched (degenerate)" in text and "a degenerate cell (dead: stub)" in text


def test_keep_reports_a_degenerate_cell_but_keeps_it(tmp_path, monkeypatch):
    seen = flag_first(monkeypatch)
    with pytest.warns(UserWarning, match="kept because search.degenerate is keep"):
        result = api.search(tiny(tmp_path, degenerate="keep"))
    assert len(seen) == 1 and result.genotype.nodes == seen[0].nodes
    assert result.results[0]["degenerate"] is True
