"""TopoNAS: the topology marginals against explicit enumeration, the supernet's mixing against
the weighted sum over subsets, the read-out and the regulariser by hand, state, and a search per
space (spec/methods.md §9; strategies/toponas.py)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY_RUN, run_cli, tiny_supernet
from morphnas import strategies
from morphnas.errors import UserError
from morphnas.genotype import Node
from morphnas.strategies.toponas import edge_marginals, membership, subsets, topology_penalty

# Each space that chooses inputs, the options that make it do so, and the rows a derived node
# keeps (two_input's rows are already input pairs).
SPACES = [
    ("two_input", {"wiring": "search"}, 1),
    ("darts_rnn", {}, 1),
    ("darts_cnn", {"steps": 2}, 2),
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _subset_mass(strategy, j: int) -> dict[tuple[int, ...], float]:
    """Node ``j``'s (0-based) subsets with their probabilities."""
    q = torch.softmax(strategy.beta[j].detach(), 0)
    return {s: q[n] for n, s in enumerate(strategy.subsets[j])}


def _randomise(strategy) -> None:
    """β and α far from uniform, so that a wrong marginal cannot pass by symmetry."""
    with torch.no_grad():
        for b in strategy.beta:
            b.normal_(0, 2)
        for a in strategy.space.arch:
            a.normal_(0, 2)


# --------------------------------------------------------------------------- the maths


@pytest.mark.parametrize(("rows", "k"), [(1, 1), (4, 1), (5, 2), (6, 3)])
def test_marginals_equal_the_sum_over_every_enumerated_subset(rows, k):
    torch.manual_seed(rows * 10 + k)
    chosen = subsets(rows, k)
    assert len(chosen) == math.comb(rows, k)
    beta = torch.randn(len(chosen), dtype=torch.float64)
    q = torch.softmax(beta, 0)
    expected = torch.zeros(rows, dtype=torch.float64)
    for mask in range(2**rows):  # every subset of the rows as a bit mask
        held = [r for r in range(rows) if mask >> r & 1]
        if len(held) == k:
            expected[held] += q[chosen.index(tuple(held))]
    got = edge_marginals(beta, membership(chosen, rows, beta))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(), torch.tensor(float(k), dtype=torch.float64))


@pytest.mark.parametrize(("space_name", "options", "k"), SPACES)
def test_mixing_is_the_weighted_sum_over_subsets_of_their_op_mixtures(space_name, options, k):
    """``p_j = Σ_S q_j(S) · 1[r ∈ S] softmax(α_jr)``, node by node, and ``k`` read off the space."""
    space, *_ = tiny_supernet(space_name, dtype=torch.float64, **options)
    strategy = strategies.build("toponas", space)
    assert {len(s[0]) for s in strategy.subsets} == {k}
    _randomise(strategy)
    for j, (p, alpha) in enumerate(zip(strategy.mixing_weights(), space.arch, strict=True)):
        ops = torch.softmax(alpha.detach(), -1)
        expected = torch.zeros_like(ops)
        for subset, mass in _subset_mass(strategy, j).items():
            for r in subset:
                expected[r] += mass * ops[r]
        torch.testing.assert_close(p.detach(), expected)
        torch.testing.assert_close(space.read_out(alpha).detach(), expected)  # logs, prune


def test_two_input_slots_read_the_topology_marginals():
    """The space's own input choice carries the topology: slot a (b) reads state ``s`` with the
    probability of the pairs whose first (second) state is ``s``."""
    space, *_ = tiny_supernet("two_input", nodes=3, dtype=torch.float64, wiring="search")
    strategy = strategies.build("toponas", space)
    _randomise(strategy)
    i = 3
    p = strategy.mixing_weights()[i - 1].detach()
    op_weights, slot_a, slot_b = space.input_marginals(i, p)
    mass = _subset_mass(strategy, i - 1)
    pairs = space._pairs(i)
    ops = torch.softmax(space.arch[i - 1].detach(), -1)
    for state in range(-1, i):
        assert float(slot_a[state + 1]) == pytest.approx(
            sum(float(mass[(n,)]) for n, (a, _) in enumerate(pairs) if a == state)
        )
        assert float(slot_b[state + 1]) == pytest.approx(
            sum(float(mass[(n,)]) for n, (_, b) in enumerate(pairs) if b == state)
        )
    expected_ops = sum(mass[(n,)] * ops[n] for n in range(len(pairs)))
    torch.testing.assert_close(op_weights, expected_ops)


def _linear_case(space_name: str):
    """A supernet whose output is linear in one node's mixing weights, that node's 0-based
    index and an input: darts_cnn of one (reduction) cell read by pooling, or darts_rnn without
    BatchNorm for one time step (the last node adds linearly to the mean of the nodes)."""
    if space_name == "darts_cnn":
        space, *_ = tiny_supernet("darts_cnn", nodes=1, dtype=torch.float64, steps=2)
        x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
        return space, 3, x
    space, *_ = tiny_supernet("darts_rnn", nodes=2, dtype=torch.float64, batchnorm=False)
    return space, 1, torch.randn(1, 3, space.input_size, dtype=torch.float64)


@pytest.mark.parametrize("space_name", ["darts_cnn", "darts_rnn"])
def test_the_supernet_under_toponas_is_the_expectation_over_subsets(space_name):
    """Where the network is linear in a node's weights, its output under TopoNAS's mixing equals
    the ``q``-weighted sum of its outputs with the node restricted to each subset's edges."""
    space, j, x = _linear_case(space_name)
    space.eval()
    strategy = strategies.build("toponas", space)
    _randomise(strategy)
    mixing = [w.detach() for w in strategy.mixing_weights()]
    got = space(x, weights=mixing)[0]
    ops = torch.softmax(space.arch[j].detach(), -1)
    expected = torch.zeros_like(got)
    for subset, mass in _subset_mass(strategy, j).items():
        only = torch.zeros_like(ops)
        only[list(subset)] = ops[list(subset)]
        expected += mass * space(x, weights=[*mixing[:j], only, *mixing[j + 1 :]])[0]
    torch.testing.assert_close(got, expected)


def _set(strategy, j: int, beta_at: tuple[int, ...], alpha: dict[tuple[int, int], float]):
    """Node ``j``'s (0-based) β peaked on subset ``beta_at``, α zero but for the given entries."""
    with torch.no_grad():
        strategy.beta[j].zero_()
        strategy.beta[j][strategy.subsets[j].index(beta_at)] = 3.0
        strategy.space.arch[j].zero_()
        for entry, value in alpha.items():
            strategy.space.arch[j][entry] = value


def test_derive_takes_the_likeliest_subset_then_each_kept_edges_best_op():
    """Hand-made β and α per space: the topology comes from β alone (a row with a stronger op
    but an unlikely subset is not kept), the op from α, ``none`` never."""
    space, *_ = tiny_supernet("darts_rnn", nodes=2)
    toponas = strategies.build("toponas", space)
    relu, sigmoid = space.op_names.index("relu"), space.op_names.index("sigmoid")
    none = space.op_names.index("none")
    _set(toponas, 0, (0,), {(0, sigmoid): 2.0})
    _set(toponas, 1, (0,), {(0, none): 9.0, (0, relu): 1.0, (1, sigmoid): 8.0})
    assert toponas.derive().nodes == (Node("sigmoid", (0,)), Node("relu", (0,)))

    space, *_ = tiny_supernet("darts_cnn", steps=2)
    toponas = strategies.build("toponas", space)
    sep, pool = space.op_names.index("sep_conv_3x3"), space.op_names.index("max_pool_3x3")
    skip, none = space.op_names.index("skip_connect"), space.op_names.index("none")
    _set(toponas, 0, (0, 1), {(0, sep): 1.0, (1, pool): 1.0})
    _set(toponas, 1, (0, 2), {(0, skip): 1.0, (2, none): 5.0, (2, sep): 2.0, (1, pool): 9.0})
    _set(toponas, 2, (0, 1), {(0, pool): 1.0, (1, skip): 1.0})
    _set(toponas, 3, (1, 2), {(1, sep): 1.0, (2, skip): 1.0})
    assert toponas.derive().nodes == (
        Node(("sep_conv_3x3", "max_pool_3x3"), (-1, 0)),
        Node(("skip_connect", "sep_conv_3x3"), (-1, 1)),
        Node(("max_pool_3x3", "skip_connect"), (-1, 0)),
        Node(("sep_conv_3x3", "skip_connect"), (0, 1)),
    )

    space, *_ = tiny_supernet("two_input", wiring="search")
    toponas = strategies.build("toponas", space)
    had, add = space.op_names.index("hadamard"), space.op_names.index("add")
    pairs = space._pairs(2)
    first = space._pairs(1).index((0, -1))
    _set(toponas, 0, (first,), {(first, add): 1.0})
    _set(toponas, 1, (pairs.index((1, -1)),), {(pairs.index((1, -1)), had): 1.0, (0, add): 9.0})
    assert [(n.op, n.inputs) for n in toponas.derive().nodes] == [
        ("add", (0, -1)),
        ("hadamard", (1, -1)),
    ]


def test_pa_regulariser_by_hand():
    """Three rows, pairs (0,1), (0,2), (1,2) with q = (.5, .3, .2): the read-out keeps rows 0
    and 1, whose marginals are .8 and .7, so the leak is (2 − 1.5)/2 = .25 = (1 − q₀)/2, and
    its gradient ``−q₀(e₀ − q)/2``; passive above the margin."""
    chosen = subsets(3, 2)
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    beta = q.log().requires_grad_()
    members = membership(chosen, 3, beta)
    value = topology_penalty("pa", beta, members, margin=0.1)
    assert float(value.detach()) == pytest.approx(0.15)
    (grad,) = torch.autograd.grad(value, beta)
    torch.testing.assert_close(grad, -0.5 * 0.5 * (torch.eye(3, dtype=torch.float64)[0] - q))
    passive = topology_penalty("pa", beta, members, margin=0.3)
    assert float(passive.detach()) == 0.0
    assert float(torch.autograd.grad(passive, beta, allow_unused=True)[0].abs().sum()) == 0.0
    entropy = topology_penalty("entropy", beta, members, margin=0.0)
    assert float(entropy.detach()) == pytest.approx(float(-(q * q.log()).sum() / math.log(3)))
    (grad,) = torch.autograd.grad(entropy, beta)
    h = -(q * q.log()).sum()
    torch.testing.assert_close(grad, -q * (q.log() + h) / math.log(3))  # dH/dβ = −q(log q + H)


def test_the_regulariser_enters_the_step_and_pulls_towards_the_read_out():
    """A heavy ``pa`` term (and no loss signal to speak of) concentrates every node's subset
    distribution on its read-out subset; ``none`` leaves the leak where the loss takes it."""
    leaks = {}
    for kind in ("pa", "none"):
        space, _, _, objective, train, valid = tiny_supernet("darts_cnn", steps=2)
        strategy = strategies.build("toponas", space, topo_reg=kind, topo_weight=100.0, lr=0.3)
        for _ in range(5):
            strategy.arch_step(objective, train, valid)
        leaks[kind] = strategy.epoch_metrics()["toponas_leak"]
    assert leaks["pa"] < 0.5 * leaks["none"]


def test_state_round_trips_and_the_step_continues_identically():
    space, _, _, objective, train, valid = tiny_supernet("darts_cnn", steps=2)
    strategy = strategies.build("toponas", space)
    for _ in range(2):
        strategy.arch_step(objective, train, valid)
    state = copy.deepcopy(strategy.state_dict())  # as a checkpoint: no shared Adam tensors
    arch = [a.detach().clone() for a in space.arch]
    twin_space, _, _, twin_objective, *_ = tiny_supernet("darts_cnn", steps=2)
    with torch.no_grad():
        for own, saved in zip(twin_space.arch, arch, strict=True):
            own.copy_(saved)
    twin = strategies.build("toponas", twin_space)
    twin.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(twin.beta, strategy.beta, strict=True))
    assert twin.derive() == strategy.derive()
    strategy.arch_step(objective, train, valid)
    twin.arch_step(twin_objective, train, valid)
    for a, b in zip(twin.beta, strategy.beta, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="do not fit"):
        twin.load_state_dict({**state, "beta": state["beta"][:1]})


def test_beta_is_averaged_over_ranks_and_follows_growth():
    """A data-parallel search averages ``β``'s gradients with ``α``'s (``reduce_grads``); a
    grown node gets its ``β`` (read before the growth hook runs, then optimised after it)."""
    space, _, _, objective, train, valid = tiny_supernet("two_input", wiring="search")
    strategy = strategies.build("toponas", space)
    reduced = []
    strategy.reduce_grads = lambda params: reduced.append({id(p) for p in params})
    strategy.arch_step(objective, train, valid)
    assert {id(b) for b in strategy.beta} | {id(a) for a in space.arch} == reduced[0]
    space.grow()
    assert len(strategy.mixing_weights()) == 3 and len(strategy.beta) == 3  # growth's own check
    strategy.on_space_change()
    optimised = {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}
    assert id(strategy.beta[2]) in optimised and id(space.arch[2]) in optimised
    assert len(strategy.derive().nodes) == 3


def test_bad_options_and_a_space_without_input_choice_are_refused():
    space, *_ = tiny_supernet("darts_rnn")
    with pytest.raises(ValueError, match="topo_reg must be one of"):
        strategies.build("toponas", space, topo_reg="bogus")
    with pytest.raises(ValueError, match="topo_margin"):
        strategies.build("toponas", space, topo_margin=1.0)
    space, *_ = tiny_supernet("two_input")
    with pytest.raises(UserError, match=r"space\.options\.wiring=search"):
        strategies.build("toponas", space)


# --------------------------------------------------------------------------- end to end

NO_BASELINES = ["--set", "train.baselines=[]", "--strategy", "toponas", "--json"]


def test_fixed_wiring_is_a_one_line_user_error(tmp_path, synthetic_csv):
    out = tmp_path / "run"
    code, lines = run_cli(
        "search", "--csv", str(synthetic_csv), *TINY_RUN, *NO_BASELINES, "--out", str(out)
    )
    assert code == 2 and len(lines) == 1, lines
    assert "--set space.options.wiring=search" in lines[0]
    assert not out.exists()


def _images(tmp_path):
    generator = np.random.default_rng(0)
    x = generator.normal(0, 0.3, (24, 8, 8)).astype(np.float32)
    y = np.repeat(np.arange(3), 8)
    path = tmp_path / "images.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.mark.parametrize("space_name", ["two_input", "darts_rnn", "darts_cnn"])
def test_a_search_per_space_derives_a_cell_and_logs_the_topology(
    tmp_path, synthetic_csv, space_name
):
    out = tmp_path / "run"
    if space_name == "darts_cnn":
        data = ["--task", "classify", "--images", str(_images(tmp_path)), "--epochs", "1"]
        data += ["--retrain-epochs", "1", "--nodes", "1", "--hidden", "4", "--threads", "1"]
        data += ["--set", "space.options.steps=2"]
    else:
        data = ["--csv", str(synthetic_csv), *TINY_RUN]
        data += ["--set", "space.options.wiring=search"] if space_name == "two_input" else []
    code, lines = run_cli("search", *data, "--space", space_name, *NO_BASELINES, "--out", str(out))
    assert code == 0, lines
    genotype = json.loads((out / "genotype.json").read_text())
    assert genotype["space"] == space_name and genotype["metadata"]["strategy"] == "toponas"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if row.get("phase") == "search" and "valid_loss" in row]
    assert epochs and all(0 < row["toponas_top"] <= 1 for row in epochs)
    assert all(0 <= row["toponas_leak"] < 1 for row in epochs)
    state = torch.load(out / "checkpoints" / "search_last.pt", weights_only=False)
    assert len(state["strategy"]["beta"]) == len(genotype["nodes"])


def test_compare_checks_a_variant_on_its_own_space(tmp_path, synthetic_csv):
    """compare's up-front check builds the variant's space with its options: toponas passes
    under input choice (and fails, one line, before any run, without it)."""
    args = ["compare", "--csv", str(synthetic_csv), *TINY_RUN, "--strategy", "toponas"]
    args += ["--set", "train.baselines=[]", "--seeds", "1"]
    code, lines = run_cli(*args, "--out", str(tmp_path / "bad"))
    assert code == 2 and len(lines) == 1 and "wiring=search" in lines[0], lines
    assert not (tmp_path / "bad").exists()


@pytest.mark.long
def test_sigkill_then_resume_equals_an_uninterrupted_toponas_search(tmp_path, synthetic_csv):
    """β and its Adam state are in the checkpoint: a search killed mid-epoch and resumed logs
    the same epochs and derives the same cell as one never interrupted."""
    from conftest import morphnas, without_times

    args = ["search", "--csv", str(synthetic_csv), *TINY_RUN, *NO_BASELINES[:-1]]
    args += ["--space", "darts_rnn", "--set", "search.batch_size=16"]
    args[args.index("--epochs") + 1] = "3"
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert morphnas(*args, "--out", str(whole)).returncode == 0
    assert morphnas(*args, "--out", str(cut), crash="step:8").returncode == -9
    done = morphnas("search", "--resume", str(cut), "--json")
    assert done.returncode == 0, done.stderr
    assert (cut / "genotype.json").read_text() == (whole / "genotype.json").read_text()

    def epochs(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return without_times([r for r in rows if r.get("phase") == "search" and "valid_loss" in r])

    assert epochs(cut) == epochs(whole)
