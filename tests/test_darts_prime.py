"""DARTS-PRIME (``strategies/darts_prime.py``) and the cell analysis (``cell_shape.py``): the
schedules, ADMM and crb against hand computation, resume, the CLI end to end, bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import TINY_RUN, run_cli, tiny_supernet
from morphnas import cell_shape, spaces, strategies
from morphnas.genotype import KNOWN, Genotype, Node
from morphnas.strategies.darts_prime import DartsPrime

# --------------------------------------------------------------------------- the schedules


def _prime(space_name: str = "two_input", seed: int = 0, **options) -> tuple[DartsPrime, tuple]:
    """The strategy on a tiny supernet, and its ``(objective, train batch, valid batch)``."""
    space, _, _, objective, train, valid = tiny_supernet(space_name, seed=seed)
    strategy = strategies.build("darts_prime", space, **options)
    assert isinstance(strategy, DartsPrime)
    return strategy, (objective, train, valid)


def test_dynamic_schedule_follows_a_hand_simulated_sequence():
    """EWMA c = 0.2 of the squared norms, α step iff 0 < EWMA < τ, τ × 1.05 or × 1.05^-2."""
    strategy, _ = _prime(schedfreq=2)
    norms = [0.5, 2.0, 2.0, 0.0, 0.0]
    # By hand: before step 0 no norm is known (no step, τ = 1.05); then EWMAs 0.5, 0.8,
    # 1.04, 0.832, 0.6656 against τ = 1.05, 1.05^-1, 1.05^-3, 1.05^-2, 1.05^-4.
    want_steps = [False, True, True, False, True, True]
    want_tau = [1.05, 1.05**-1, 1.05**-3, 1.05**-2, 1.05**-4, 1.05**-6]
    want_ewma = [0.5, 0.8, 1.04, 0.832, 0.6656]
    steps, taus, ewmas = [], [], []
    for k in range(6):
        steps.append(strategy.wants_arch_step(k, 1))
        taus.append(strategy.tau)
        if k < len(norms):
            strategy.observe_weight_grad(norms[k])
            ewmas.append(strategy.fi_ewma)
    assert steps == want_steps
    assert taus == pytest.approx(want_tau, rel=1e-12)
    assert ewmas == pytest.approx(want_ewma, rel=1e-12)


def test_dynamic_schedule_never_steps_on_a_zero_ewma_and_tau_keeps_growing():
    strategy, _ = _prime(threshold=0.5)
    for k in range(4):
        assert not strategy.wants_arch_step(k, 1)
        strategy.observe_weight_grad(0.0)
    assert strategy.tau == pytest.approx(0.5 * 1.05**4)


def test_static_and_every_schedules():
    static, _ = _prime(schedule="static", schedfreq=3)
    # Counted across epochs: the step index the engine passes does not reset it.
    assert [static.wants_arch_step(k % 2, 1) for k in range(7)] == [
        True, False, False, True, False, False, True,
    ]  # fmt: skip
    every, _ = _prime(schedule="every")
    assert [every.wants_arch_step(k, 2) for k in range(5)] == [True, False, True, False, True]


# --------------------------------------------------------------------------- ADMM


def test_admm_updates_z_and_u_by_hand():
    """darts_rnn (ops none, tanh, relu, sigmoid, identity), softmax per edge row."""
    strategy, _ = _prime("darts_rnn", reg="admm")
    space = strategy.space
    with torch.no_grad():
        space.arch[0].copy_(torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0]]))
        space.arch[1].copy_(torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]]))
    strategy.u[1] = torch.tensor([[0.0, 0.0, 0.0, 0.5, -1.5]])
    strategy.u[2] = torch.zeros(2, 5)
    strategy.admm_update()
    # Node 1: α + U = [0, 1, 0, .5, .5], best entry other than none: tanh.
    assert torch.equal(strategy.z[1], torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]]))
    # U ← 0.2·U + α − Z (raw α) = [0,0,0,.1,-.3] + [0,1,0,0,2] − [0,1,0,0,0].
    assert torch.allclose(strategy.u[1], torch.tensor([[0.0, 0.0, 0.0, 0.1, 1.7]]))
    # Node 2: row 0 puts its mass on none (left out); row 1's relu is the strongest edge.
    assert torch.equal(strategy.z[2], torch.tensor([[0.0] * 5, [0.0, 0.0, 1.0, 0.0, 0.0]]))
    assert torch.allclose(strategy.u[2], torch.tensor([[5.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0]]))
    # The α loss's term: (ρ/2)·‖softmax(α) − Z + U‖ over both nodes, written out.
    total = 0.0
    for alpha, z, u in ((space.arch[0], strategy.z[1], strategy.u[1]),
                        (space.arch[1], strategy.z[2], strategy.u[2])):  # fmt: skip
        for row, zr, ur in zip(alpha.tolist(), z.tolist(), u.tolist(), strict=True):
            exps = [math.exp(a) for a in row]
            terms = zip(exps, zr, ur, strict=True)
            total += sum((e / sum(exps) - zi + ui) ** 2 for e, zi, ui in terms)
    assert float(strategy.regulariser().detach()) == pytest.approx(
        0.1 / 2 * math.sqrt(total), rel=1e-6
    )


def test_admm_updates_every_admm_every_arch_steps_on_every_space():
    for space_name in spaces.SPACES:
        strategy, (objective, train, valid) = _prime(space_name, reg="admm", admm_every=2)
        z0 = {i: z.clone() for i, z in strategy.z.items()}
        strategy.arch_step(objective, train, valid)
        assert all(torch.equal(z0[i], z) for i, z in strategy.z.items())  # not yet
        strategy.arch_step(objective, train, valid)
        for i, z in strategy.z.items():  # now one-hot rows of the derived choice
            assert set(z.unique().tolist()) <= {0.0, 1.0} and not torch.equal(z0[i], z)
        assert strategy.derive() is not None


# --------------------------------------------------------------------------- crb


def test_crb_clamps_initialises_near_uniform_and_masks_for_good():
    strategy, (objective, train, valid) = _prime("darts_rnn", crb=True, reg="none", lr=1e-6)
    space, n_ops = strategy.space, len(strategy.space.op_names)
    for alpha in space.arch:
        assert torch.allclose(alpha, torch.full_like(alpha, 1 / n_ops), atol=1e-3)
    with torch.no_grad():
        space.arch[0].copy_(torch.tensor([[-0.1, 0.5, 1.5, -0.2, 0.3]]))
    assert torch.equal(strategy.mixing_weights()[0], torch.tensor([[0.0, 0.5, 1.0, 0.0, 0.3]]))
    strategy.arch_step(objective, train, valid)
    assert torch.equal(strategy.masks[1], torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]]))
    assert space.arch[0][0, 0] == 0 and space.arch[0][0, 3] == 0
    with torch.no_grad():  # as if the optimiser pushed a masked entry back up
        space.arch[0][0, 0] = 0.4
    strategy.arch_step(objective, train, valid)
    assert space.arch[0][0, 0] == 0 and strategy.masks[1][0, 0] == 0


# --------------------------------------------------------------------------- resume


def _drive(strategy: DartsPrime, batches: tuple, norms: list[float]) -> list[bool]:
    taken = []
    for k, norm in enumerate(norms):
        take = strategy.wants_arch_step(k, 1)
        if take:
            strategy.arch_step(*batches)
        strategy.observe_weight_grad(norm)
        taken.append(take)
    return taken


def test_state_dict_round_trip_mid_schedule_continues_identically():
    options = {"reg": "admm", "admm_every": 2, "crb": True, "schedfreq": 1, "threshold": 3.0}
    norms = [1.0, 0.5, 4.0, 0.2, 0.1, 20.0, 0.3, 0.1, 0.1, 0.1]
    first, batches = _prime("darts_rnn", **options)
    start = [a.detach().clone() for a in first.space.arch]
    taken = _drive(first, batches, norms[:5])
    saved = copy.deepcopy(first.state_dict())  # Adam's state is updated in place
    model_state = {k: v.clone() for k, v in batches[0].model.state_dict().items()}
    taken += _drive(first, batches, norms[5:])
    assert taken == [False, True, True, True, True, True, False, False, False, True]

    second, (objective, *_) = _prime("darts_rnn", seed=7, **options)  # restored, not built
    assert not all(torch.equal(a, b) for a, b in zip(start, second.space.arch, strict=True))
    objective.model.load_state_dict(model_state)
    second.on_space_change()
    second.load_state_dict(saved)
    assert _drive(second, (objective, *batches[1:]), norms[5:]) == taken[5:]
    assert second.tau == first.tau and second.fi_ewma == first.fi_ewma
    for name in ("z", "u", "masks"):
        mine, theirs = getattr(first, name), getattr(second, name)
        assert all(torch.equal(mine[i], theirs[i]) for i in mine)
    for a, b in zip(first.space.arch, second.space.arch, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- CLI


def test_compare_darts_and_darts_prime_end_to_end(synthetic_csv, tmp_path):
    out = tmp_path / "cmp"
    code, err = run_cli(
        "compare", "--csv", str(synthetic_csv), *TINY_RUN, "--seeds", "1",
        "--strategy", "darts,darts_prime:threshold=100", "--set", "train.baselines=[]",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    table = json.loads((out / "compare.json").read_text())["table"]
    assert [row["variant"] for row in table] == ["darts", "darts_prime:threshold=100"]
    run = out / "darts_prime:threshold=100-seed0"
    summary = json.loads((run / "summary.json").read_text())
    shape = summary["cell_shape"]
    assert shape["width"] == table[1]["cell_width"] and shape["depth"] == table[1]["cell_depth"]
    assert len(summary["genotype"]["nodes"]) == 2 and shape["depth"] >= 2
    epochs = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"epoch"' in line and '"search"' in line
    ]
    # τ = 100 ≫ FI: α steps from the second step on (the first has no EWMA yet). τ moved by
    # ×1.05 per step without and ×1.05^-10 per step with: log₁.₀₅(τ/100) + 11·steps counts
    # the steps, a whole number above the α steps.
    steps, tau = epochs[-1]["arch_steps"], epochs[-1]["tau"]
    decisions = math.log(tau / 100, 1.05) + 11 * steps
    assert steps >= 1 and decisions == pytest.approx(round(decisions)) and decisions > steps


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ("schedule=hourly", "schedule must be one of"),
        ("reg=l1", "reg must be one of"),
        ("rho=-0.1", "rho must be >= 0"),
        ("schedfreq=0", "schedfreq must be an integer >= 1"),
    ],
)
def test_bad_options_are_one_line_errors(synthetic_csv, tmp_path, option, fragment):
    code, err = run_cli(
        "compare", "--csv", str(synthetic_csv), *TINY_RUN, "--seeds", "1",
        "--strategy", f"darts_prime:{option}", "--out", str(tmp_path / "c"),
    )  # fmt: skip
    assert code == 2 and len(err) == 1 and fragment in err[0], err


def test_bad_option_through_set_on_search(synthetic_csv, tmp_path):
    code, err = run_cli(
        "search", "--csv", str(synthetic_csv), *TINY_RUN, "--strategy", "darts_prime",
        "--set", "search.strategy_options.reg=admmm", "--out", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 2 and len(err) == 1 and "reg must be one of" in err[0], err


# --------------------------------------------------------------------------- cell shape


def _shape(genotype: Genotype) -> tuple[float, int]:
    found = cell_shape.summary(genotype)
    return found["width"], found["depth"]


def test_known_cells_width_and_depth_by_hand():
    # LSTM: i, f, g, o read (u, h): 4; f ⊙ c reads c (an input) and f: ½; tanh(c') + u: ½.
    # Longest: u → i → i⊙g → c' → tanh(c') → h' → out: 6 edges.
    assert _shape(KNOWN["lstm"]) == (5.0, 6)
    # GRU: r, z and W_hn h (h, u) read inputs only: 3; n (u, r⊙…) and h − n (h, n): ½ each.
    # Longest: u → r → r⊙… → n → h−n → z⊙(h−n) → h' → out: 7 edges.
    assert _shape(KNOWN["gru"]) == (4.0, 7)
    # DARTS-V2 RNN: only s1 reads s0; longest s0 → s1 → s2 → s5 → s6 (or s8) → mean: 5.
    assert _shape(KNOWN["darts_v2"]) == (1.0, 5)


def test_chain_versus_wide_cells_and_dead_nodes():
    chain = Genotype("darts_rnn", tuple(Node("tanh", (i,)) for i in range(4)), output="last")
    assert _shape(chain) == (1.0, 5)  # s0 → s1 → s2 → s3 → s4 → out
    wide = Genotype("darts_rnn", tuple(Node("relu", (0,)) for _ in range(4)), output="mean")
    assert _shape(wide) == (4.0, 2)
    # output last: s1..s3 never reach s4's output, so they count for nothing.
    dead = Genotype("darts_rnn", tuple(Node("relu", (0,)) for _ in range(4)), output="last")
    assert _shape(dead) == (1.0, 2)
    # A grown (residual) node also reads its base s1: s2 = s1 + γ ⊙ relu(s0).
    grown = Genotype("darts_rnn", (Node("tanh", (0,)), Node("relu", (0,), True)), output="last")
    assert _shape(grown) == (1.5, 3)


def test_darts_cnn_cells_each_and_the_darts_v2_normal_cell():
    # DARTS-V2's normal cell (Liu et al. 2019): 3.5 wide (the last node reads c_k-2 and node
    # 0), 3 deep (c → s1 → s4 → concat); a reduction cell of nodes reading inputs: 4 and 2.
    normal = (
        Node(("sep_conv_3x3", "sep_conv_3x3"), (-1, 0)),
        Node(("sep_conv_3x3", "sep_conv_3x3"), (-1, 0)),
        Node(("sep_conv_3x3", "skip_connect"), (0, -1)),
        Node(("skip_connect", "dil_conv_3x3"), (-1, 1)),
    )
    reduce = tuple(Node(("max_pool_3x3", "skip_connect"), (-1, 0)) for _ in range(4))
    genotype = Genotype("darts_cnn", normal + reduce, output="concat")
    found = cell_shape.summary(genotype)
    assert (found["width"], found["depth"]) == (3.5, 3)
    assert found["cells"] == {"normal": {"width": 3.5, "depth": 3},
                              "reduce": {"width": 4.0, "depth": 2}}  # fmt: skip
    assert cell_shape.describe(genotype) == ("normal: width 3.5, depth 3; reduce: width 4, depth 2")


def _paths_brute_force(genotype: Genotype) -> int:
    """The longest input-to-output path, every path listed: from each output node back along
    every incoming edge to an input (state < 1), plus the edge into the output."""
    nodes = genotype.nodes
    n = len(nodes)
    outputs = {n} if genotype.output == "last" else set(range(1, n + 1))
    paths = [[o] for o in outputs]
    done = []
    while paths:
        path = paths.pop()
        if path[-1] < 1:
            done.append(path)
        else:
            paths += [[*path, j] for j in nodes[path[-1] - 1].inputs]
    return max(len(path) for path in done)  # its states = its edges, the output's included


def test_depth_matches_brute_force_path_enumeration_on_random_cells():
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        n = int(torch.randint(1, 7, (1,), generator=gen))
        nodes = tuple(
            Node("add", tuple(int(torch.randint(-1, i, (1,), generator=gen)) for _ in "ab"))
            for i in range(1, n + 1)
        )
        output = ("mean", "last")[int(torch.randint(2, (1,), generator=gen))]
        genotype = Genotype("two_input", nodes, output=output)
        assert cell_shape.summary(genotype)["depth"] == _paths_brute_force(genotype)
