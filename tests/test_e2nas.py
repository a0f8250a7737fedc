"""E2NAS (``--strategy e2nas``): the straight-through gradient through the decoder, the
three-way complementation loss, the novelty term and the η schedule against brute force; the
argmax read-out; an exact state round trip; and a search end to end.

Most tests decode with ``ToyVae``, a small non-autoregressive stand-in for the graph VAE with the
same interface (``node_probs``, ``encode``), so they test the strategy and not the VAE's training;
the end-to-end tests use the real one (``morphnas.latent``), trained into a temporary cache."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import HIDDEN, N_SERIES, tiny_supernet
from morphnas import spaces, strategies
from morphnas.cli import app
from morphnas.spaces.base import SampledMixing
from morphnas.strategies import e2nas
from morphnas.strategies.base import one_hot_like


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyVae(nn.Module):
    """Per node a linear head ``z → logits`` over the node's allowed entries (no
    autoregression); ``encode`` is a linear map of the concatenated one-hot positions."""

    def __init__(self, table, nz: int, dtype=torch.float64) -> None:
        super().__init__()
        self.table = table
        self.heads = nn.ModuleList(nn.Linear(nz, len(e)) for e in table.entries)
        self.enc = nn.Linear(sum(len(e) for e in table.entries), nz)
        self.to(dtype)

    def node_probs(self, z, sample=False, generator=None):
        probs, chosen = [], []
        for head, entries, shape in zip(
            self.heads, self.table.entries, self.table.shapes, strict=True
        ):
            p = torch.softmax(head(z), 0)
            if sample:
                pos = int(torch.multinomial(p.detach(), 1, generator=generator))
            else:
                pos = int(p.detach().argmax())
            index = torch.tensor(entries)
            full = p.new_zeros(math.prod(shape)).scatter(0, index, p)
            probs.append(full.reshape(shape))
            chosen.append(entries[pos])
        return probs, chosen

    def encode(self, positions):
        hots = [
            nn.functional.one_hot(positions[:, k], len(e)).to(self.enc.weight)
            for k, e in enumerate(self.table.entries)
        ]
        mu = self.enc(torch.cat(hots, 1))
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return self.node_probs(z)[1]


@pytest.fixture
def toy(monkeypatch):
    """Strategies built in the test decode with a ``ToyVae`` (seeded, float64)."""

    def load(table, nz, hs, progress=None):
        torch.manual_seed(123)  # inside the strategy's fork_rng: the run's generator is kept
        return ToyVae(table, nz), {"cached": False, "seconds": 0.0}

    monkeypatch.setattr(e2nas, "load_vae", load)


def _setup(*args, **options):
    """``tiny_supernet`` in float64 (the gradient checks compare against finite differences)."""
    return tiny_supernet(*args, dtype=torch.float64, **options)


# --------------------------------------------------------------------------- pure pieces


def test_eta_schedule_explores_first_and_exploits_last():
    sigma = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert e2nas.exploration_weight(1, 10, 10.0) == pytest.approx(1 - sigma(10 * (0.2 - 1)))
    assert e2nas.exploration_weight(1, 10, 10.0) == pytest.approx(0.999665, abs=1e-6)
    assert e2nas.exploration_weight(10, 10, 10.0) == pytest.approx(1 - sigma(10.0), rel=1e-9)
    assert e2nas.exploration_weight(10, 10, 10.0) == pytest.approx(4.5398e-5, rel=1e-4)
    assert e2nas.exploration_weight(5, 10, 10.0) == pytest.approx(0.5)
    assert e2nas.exploration_weight(3, 10, 0.0) == pytest.approx(0.5)  # r = 0: constant
    assert e2nas.exploration_weight(10, 10, 1e4) == 0.0  # no overflow
    assert e2nas.exploration_weight(1, 10, 1e4) == 1.0


def test_novelty_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    archive = torch.randn(50, 5, generator=gen, dtype=torch.float64) * 0.3 + 1.0
    z = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(e2nas.archive_log_density(z, archive), z)
    eps = 1e-6
    want = torch.empty(5, dtype=torch.float64)
    for d in range(5):
        step = torch.zeros(5, dtype=torch.float64)
        step[d] = eps
        hi = e2nas.archive_log_density(z.detach() + step, archive)
        lo = e2nas.archive_log_density(z.detach() - step, archive)
        want[d] = (hi - lo) / (2 * eps)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-8)
    # The value is the mean per-dimension Gaussian log-density of the archive's fit.
    mu, sd = archive.mean(0), archive.std(0, unbiased=False)
    ref = torch.distributions.Normal(mu, sd).log_prob(z.detach()).mean()
    assert float(e2nas.archive_log_density(z.detach(), archive)) == pytest.approx(float(ref))
    # Descending the loss term log p(z) moves z away from the archive (towards novelty).
    moved = z.detach() - 0.01 * got
    assert (moved - mu).norm() > (z.detach() - mu).norm()


def test_complement_differs_from_the_current_exactly_where_the_previous_agreed():
    torch.manual_seed(0)
    allowed = [list(range(5)), [0, 2, 4, 6], None, [3]]
    for _ in range(200):
        prev = [int(torch.randint(5, ())), [0, 2, 4, 6][int(torch.randint(4, ()))], None, 3]
        cur = [int(torch.randint(5, ())), [0, 2, 4, 6][int(torch.randint(4, ()))], None, 3]
        comp = e2nas.complement(prev, cur, allowed)
        for k in range(2):
            if prev[k] == cur[k]:
                assert comp[k] != cur[k] and comp[k] in allowed[k]
            else:
                assert comp[k] == cur[k]
        assert comp[2] is None and comp[3] == 3  # fixed node; a single allowed entry stays


# --------------------------------------------------------------------------- the strategy


def _hots(space, chosen):
    """Leaf one-hot mixing weights of the architecture ``chosen`` (for ``∂L/∂W``)."""
    return [
        one_hot_like(a.detach(), c).requires_grad_()
        for a, c in zip(space.arch, chosen, strict=True)
    ]


@pytest.fixture
def graph_vae(monkeypatch):
    """Strategies built in the test decode with the real graph VAE (small, trained in place)."""
    from morphnas.latent.vae import train_vae

    monkeypatch.setattr(
        e2nas, "load_vae", lambda table, nz, hs, progress=None: train_vae(table, nz=nz, hs=hs)
    )


@pytest.mark.parametrize("vae", ["toy", "graph_vae"])
@pytest.mark.parametrize("space_name", ["two_input", "darts_rnn"])
def test_straight_through_gradient_is_autograd_through_the_decoder_probabilities(
    request, vae, space_name
):
    """``∂L(W)/∂z`` with ``W = H − sg(q) + q`` equals ``Σ_i ⟨∂L/∂W_i, ∂q_i/∂z⟩``, the chain rule
    through the decoder's probabilities taken separately (the Jacobian of ``q``; the graph VAE
    decodes autoregressively, so ``q`` is taken under the same draws)."""
    request.getfixturevalue(vae)
    space, _, _, objective, _, valid = _setup(space_name)
    strategy = strategies.build("e2nas", space, nz=8, hs=16)
    strategy.start_epoch(1, 2)
    torch.manual_seed(7)
    probs, chosen = strategy._decode(stochastic=True)
    got = torch.autograd.grad(objective(valid, strategy._mixing(probs, chosen)), strategy.z)[0]

    hots = _hots(space, chosen)
    dl_dw = torch.autograd.grad(objective(valid, SampledMixing(hots, chosen)), hots)

    def q(z):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            ps, picks = strategy.vae.node_probs(strategy._vae_input(z), sample=True)
        assert picks == chosen
        return torch.cat([p.reshape(-1) for p in ps]).to(z)

    jac = torch.autograd.functional.jacobian(q, strategy.z.detach())
    want = torch.cat([g.reshape(-1) for g in dl_dw]) @ jac
    assert got.abs().max() > 0
    tol = 1e-9 if vae == "toy" else 1e-5  # the graph VAE computes in float32
    assert torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_latent_gradient_is_the_authors_softmax_over_z(toy):
    space, _, _, objective, _, valid = _setup("two_input")
    entries = sum(a.numel() for a in space.arch)
    with pytest.raises(ValueError, match=f"nz equal to .*{entries}"):
        strategies.build("e2nas", space, gradient="latent", nz=entries + 1)
    strategy = strategies.build("e2nas", space, gradient="latent", nz=entries)
    strategy.start_epoch(1, 2)
    probs, chosen = strategy._decode(stochastic=True)
    got = torch.autograd.grad(objective(valid, strategy._mixing(probs, chosen)), strategy.z)[0]
    hots = _hots(space, chosen)
    dl_dw = torch.autograd.grad(objective(valid, SampledMixing(hots, chosen)), hots)
    flat = torch.cat([g.reshape(-1) for g in dl_dw])
    jac = torch.autograd.functional.jacobian(lambda z: torch.softmax(z, 0), strategy.z.detach())
    assert torch.allclose(got, flat @ jac, rtol=1e-9, atol=1e-12)


def _table_loss(space):
    """A loss whose gradient says which architectures it saw: ``Σ_i P[i, c_i]`` over the nodes'
    chosen entries ``c_i`` (read from the SampledMixing), ``P`` a parameter table."""
    width = 4 * max(a.numel() for a in space.arch)  # room for a grown node
    table = nn.Parameter(torch.randn(len(space.arch) + 2, width, dtype=torch.float64))
    seen = []

    def loss(batch, mixing):
        assert isinstance(mixing, SampledMixing)
        assert not any(w.requires_grad for w in mixing)
        seen.append(list(mixing.choices))
        return sum(table[i, c] for i, c in enumerate(mixing.choices) if c is not None)

    return table, seen, loss


@pytest.mark.parametrize("mode", ["gradient", "value_only", "off"])
def test_complementation_gradient_comes_from_three_networks_or_one(toy, mode):
    space, *_ = _setup("two_input", nodes=3)
    strategy = strategies.build("e2nas", space, nz=4, complementation=mode)
    strategy.start_epoch(1, 2)
    table, seen, loss = _table_loss(space)
    strategy.weight_loss(loss, None)  # the first step has no a_prev
    assert len(seen) == 1
    seen.clear()
    value = strategy.weight_loss(loss, None)
    (grad,) = torch.autograd.grad(value, table)
    if mode == "off":
        assert len(seen) == 1
        (cur,) = seen
        prev = comp = None
    else:
        cur, prev, comp = seen
        assert all((k != c) == (p == c) for c, p, k in zip(cur, prev, comp, strict=True))

    def part(choices):
        return sum(float(table[i, c].detach()) for i, c in enumerate(choices))

    lam = 0.5
    want_grad = torch.zeros_like(table)
    if mode == "gradient":
        for choices, w in ((cur, 1 - lam), (prev, lam / 2), (comp, lam / 2)):
            for i, c in enumerate(choices):
                want_grad[i, c] += w
    else:
        for i, c in enumerate(cur):
            want_grad[i, c] += 1.0
    assert torch.equal(grad, want_grad)
    if mode == "off":
        assert float(value.detach()) == pytest.approx(part(cur))
    else:
        three = (1 - lam) * part(cur) + lam / 2 * (part(prev) + part(comp))
        assert float(value.detach()) == pytest.approx(three)


def test_complementation_changes_exactly_the_nodes_where_the_samples_agreed(toy):
    space, *_ = _setup("darts_rnn", nodes=3)
    strategy = strategies.build("e2nas", space, nz=4)
    strategy.start_epoch(1, 2)
    _, seen, loss = _table_loss(space)
    for _ in range(20):
        seen.clear()
        strategy.weight_loss(loss, None)
        if len(seen) < 3:
            continue
        cur, prev, comp = seen
        for i, (c, p, k) in enumerate(zip(cur, prev, comp, strict=True)):
            allowed = strategy.table.entries[i]
            assert k in allowed
            assert (k != c) == (p == c)


def test_argmax_read_out_is_deterministic_and_leaves_the_generator(toy):
    space, _, _, objective, train, valid = _setup("darts_rnn", nodes=3)
    strategy = strategies.build("e2nas", space, nz=4)
    strategy.start_epoch(1, 2)
    for _ in range(3):
        strategy.arch_step(objective, train, valid)
    state = torch.get_rng_state()
    first, second = strategy.eval_mixing(), strategy.eval_mixing()
    assert first.choices == second.choices
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    genotype = strategy.derive()
    assert strategy.derive() == genotype
    assert torch.equal(torch.get_rng_state(), state)
    # It is the argmax decoding of z, and the space's read-out agrees with it.
    _, chosen = strategy.vae.node_probs(strategy.z.detach(), sample=False)
    assert first.choices == chosen
    assert genotype.nodes == strategy.table.genotype(chosen).nodes


def test_arch_step_moves_z_only_and_novelty_joins_when_the_archive_is_full(toy):
    space, _, weights, objective, train, valid = _setup("two_input")
    strategy = strategies.build("e2nas", space, nz=4, archive=3)
    strategy.start_epoch(1, 10)
    before = [w.detach().clone() for w in weights]
    z0 = strategy.z.detach().clone()
    for k in range(4):
        assert strategy.novelty_term().requires_grad == (k >= 3)
        value = strategy.arch_step(objective, train, valid)
        assert math.isfinite(float(value)) and not value.requires_grad
    assert not torch.equal(z0, strategy.z)
    assert all(torch.equal(b, w) for b, w in zip(before, weights, strict=True))
    assert len(strategy.archive) == 3
    metrics = strategy.epoch_metrics()
    assert metrics["e2nas_eta"] == pytest.approx(e2nas.exploration_weight(1, 10, 10.0))
    assert metrics["e2nas_novelty"] != 0.0
    code = strategies.build("e2nas", space, nz=4, archive=3, novelty="code")
    code.archive = strategy.archive.clone()
    assert not code.novelty_term().requires_grad
    off = strategies.build("e2nas", space, nz=4, archive=3, novelty=False)  # YAML's `off`
    assert off.novelty == "off"
    off.archive = strategy.archive.clone()
    assert float(off.novelty_term()) == 0.0


def test_a_nan_loss_leaves_z_as_it_was_for_the_engines_nan_policy(toy):
    """A diverged supernet (NaN validation loss) must not make z NaN: the next decode would
    fail with a traceback before the engine could retry or stop (seen on births)."""
    space, _, _, objective, train, valid = _setup("two_input")
    strategy = strategies.build("e2nas", space, nz=4)
    strategy.start_epoch(1, 10)
    z0 = strategy.z.detach().clone()

    def diverged(batch, mixing):
        return objective(batch, mixing) * float("nan")

    value = strategy.arch_step(diverged, train, valid)
    assert math.isnan(float(value))
    assert torch.equal(strategy.z.detach(), z0)
    assert all(torch.isfinite(w).all() for w in strategy.weight_mixing())


def test_state_round_trip_continues_exactly(toy):
    space, _, _, objective, train, valid = _setup("two_input", nodes=3)
    strategy = strategies.build("e2nas", space, nz=4, archive=2)
    strategy.start_epoch(1, 3)
    _, _, loss = _table_loss(space)
    for _ in range(3):
        strategy.arch_step(objective, train, valid)
        strategy.weight_loss(loss, None)
    state = copy.deepcopy(strategy.state_dict())  # Adam's state tensors are live
    rng = torch.get_rng_state()

    def next_steps(s):
        s.arch_step(objective, train, valid)
        sample = s.weight_mixing()
        return s.z.detach().clone(), sample.choices, s.prev, s.archive.clone()

    want = next_steps(strategy)
    fresh = strategies.build("e2nas", space, nz=4, archive=2)
    fresh.start_epoch(1, 3)
    fresh.load_state_dict(state)
    torch.set_rng_state(rng)
    got = next_steps(fresh)
    assert torch.equal(got[0], want[0])
    assert got[1] == want[1] and got[2] == want[2]
    assert torch.equal(got[3], want[3])


def test_bad_options_are_value_errors():
    space = spaces.build("two_input", N_SERIES, HIDDEN, 2)
    with pytest.raises(ValueError, match="unknown e2nas option"):
        strategies.build("e2nas", space, bogus=1)
    for option, value, match in [
        ("complementation", "all", "complementation must be one of"),
        ("complementation", True, "complementation must be one of"),
        ("novelty", 1, "novelty must be one of"),
        ("novelty", "gpnd", "novelty must be one of"),
        ("gradient", "reinforce", "gradient must be one of"),
        ("z_init", "zero", "z_init must be one of"),
        ("complement_weight", 1.5, "complement_weight"),
        ("nz", 0, "nz must be an integer"),
        ("archive", True, "archive must be an integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            strategies.build("e2nas", space, **{option: value})


def test_z_init_encode_starts_from_the_current_genotype(toy):
    space, *_ = _setup("two_input")
    strategy = strategies.build("e2nas", space, nz=4, z_init="encode")
    genotype = space.derive()
    strategy.start_epoch(1, 2)
    positions = strategy.table.positions(strategy.table.choices(genotype))
    mu, _ = strategy.vae.encode(torch.tensor([positions]))
    assert torch.allclose(strategy.z.detach(), mu.reshape(-1))


# --------------------------------------------------------------------------- end to end

TINY = [
    "--epochs", "2", "--retrain-epochs", "1", "--nodes", "2", "--hidden", "4", "--window", "5",
    "--set", "train.baselines=[]", "--strategy", "e2nas", "--threads", "1",
    "--set", "search.strategy_options.nz=8", "--set", "search.strategy_options.hs=16",
]  # fmt: skip


@pytest.fixture(scope="module")
def vae_cache(tmp_path_factory):
    """One VAE cache for this module's searches (each table trains once), never ``~/.cache``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MORPHNAS_CACHE", str(tmp_path_factory.mktemp("e2nas-cache")))
        yield


def _epoch_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get("phase") == "search" and "valid_loss" in row]


OFF = [  # a bare `off` is YAML's false
    "--set", "search.strategy_options.complementation=off",
    "--set", "search.strategy_options.novelty=off",
]  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [[], ["--growth", "grow-then-prune", "--nodes-start", "1"], OFF],
    ids=["fixed", "grow", "off"],
)
def test_search_with_e2nas_end_to_end(tmp_path, synthetic_csv, vae_cache, extra):
    out = tmp_path / "run"
    args = ["search", "--csv", str(synthetic_csv), *TINY, *extra, "--out", str(out), "--json"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert len(result["genotype"]["nodes"]) == 2
    assert result["genotype"]["metadata"]["strategy"] == "e2nas"
    assert math.isfinite(result["results"][0]["test_rse"])
    epochs = _epoch_rows(out)
    assert len(epochs) == 2
    assert all(0 <= row["e2nas_eta"] <= 1 for row in epochs)


def test_sigkill_then_resume_equals_an_uninterrupted_e2nas_search(
    tmp_path, synthetic_csv, vae_cache
):
    from conftest import morphnas, without_times

    args = ["search", "--csv", str(synthetic_csv), *TINY, "--set", "search.batch_size=16"]
    args[args.index("--epochs") + 1] = "3"
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert morphnas(*args, "--out", str(whole)).returncode == 0
    assert morphnas(*args, "--out", str(cut), crash="step:8").returncode == -9
    done = morphnas("search", "--resume", str(cut), "--json")
    assert done.returncode == 0, done.stderr
    for name in ("genotype.json",):
        assert (cut / name).read_text() == (whole / name).read_text()

    def search_figures(rows):  # e2nas_vae_*: whether this run trained the VAE or found it cached
        return [{k: v for k, v in r.items() if not k.startswith("e2nas_vae_")} for r in rows]

    assert search_figures(without_times(_epoch_rows(cut))) == search_figures(
        without_times(_epoch_rows(whole))
    )


@pytest.mark.parametrize("prune", [False, True], ids=["grow", "prune-then-grow"])
def test_growth_loads_the_new_vae_and_re_encodes_z_from_the_current_genotype(toy, prune):
    space, _, _, objective, train, valid = _setup("two_input", nodes=1)
    strategy = strategies.build("e2nas", space, nz=4)
    strategy.start_epoch(1, 3)
    _, _, loss = _table_loss(space)
    for _ in range(2):
        strategy.arch_step(objective, train, valid)
        strategy.weight_loss(loss, None)
    before = strategy.derive()
    if prune:
        space.prune()
    space.grow()
    genotype = space.derive()  # the old nodes' argmax decoding, the new node's fresh α
    assert genotype.nodes[0] == before.nodes[0]
    # The growth check scores the grown supernet before the engine calls on_space_change.
    mixing = strategy.eval_mixing()
    assert len(mixing) == 2 and strategy.table.nodes == 2
    assert mixing.choices[0] is None if prune else mixing.choices[0] is not None
    positions = strategy.table.positions(strategy.table.choices(genotype))
    mu, _ = strategy.vae.encode(torch.tensor([positions]))
    assert torch.allclose(strategy.z.detach(), mu.reshape(-1).to(strategy.z))
    assert strategy.prev is None and len(strategy.archive) == 0
    strategy.on_space_change()
    assert strategy.optimizer.param_groups[0]["params"] == [strategy.z]
    assert not strategy.optimizer.state
    strategy.arch_step(objective, train, valid)
    strategy.weight_loss(loss, None)
    value = strategy.weight_loss(loss, None)
    assert math.isfinite(float(value.detach()))
    assert len(strategy.derive().nodes) == 2
    if prune:
        assert strategy.derive().nodes[0] == before.nodes[0]


def test_a_heavy_penalty_on_q_lowers_the_expected_cost(toy):
    space, _, _, objective, train, valid = _setup("two_input")
    strategy = strategies.build(
        "e2nas", space, nz=4, penalty="params", penalty_weight=100.0, lr=0.05
    )
    strategy.start_epoch(2, 2)

    def cost():
        with torch.no_grad():
            probs, _ = strategy._decode(stochastic=False, grad=False)
            return float(strategy._penalties(probs)) / 100.0

    before = cost()
    for _ in range(30):
        strategy.arch_step(objective, train, valid)
    assert cost() < before - 0.05


def test_e2nas_vae_command_builds_every_size_a_growing_search_visits_then_finds_them(
    tmp_path, vae_cache
):
    args = [
        "e2nas-vae", "--space", "darts_rnn", "--nodes", "2", "--growth", "grow-then-prune",
        "--nodes-start", "1", "--set", "search.strategy_options.nz=8",
        "--set", "search.strategy_options.hs=16", "--json",
    ]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    records = json.loads(first.stdout)
    assert [r["nodes"] for r in records] == [1, 2]
    assert not any(r["e2nas_vae_cached"] for r in records)
    assert all(r["e2nas_vae_seconds"] > 0 for r in records)
    # A search of the same space and growth then trains nothing: its summary says so.
    data = ["--epochs", "1", "--retrain-epochs", "1", "--hidden", "4", "--window", "5"]
    again = CliRunner().invoke(app, args)
    assert all(r["e2nas_vae_cached"] for r in json.loads(again.stdout))
    out = tmp_path / "run"
    search = [
        "search", "--dataset", "synthetic", *data, "--space", "darts_rnn", "--nodes", "2",
        "--growth", "grow-then-prune", "--nodes-start", "1", "--strategy", "e2nas",
        "--set", "search.strategy_options.nz=8", "--set", "search.strategy_options.hs=16",
        "--set", "train.baselines=[]", "--threads", "1", "--out", str(out), "--json",
    ]  # fmt: skip
    done = CliRunner().invoke(app, search)
    assert done.exit_code == 0, done.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["e2nas_vae_cached"] == 1.0 and summary["e2nas_vae_seconds"] == 0.0


def test_an_unknown_e2nas_option_is_one_line_and_exit_2(tmp_path):
    done = CliRunner().invoke(
        app, ["e2nas-vae", "--space", "darts_rnn", "--set", "search.strategy_options.nzz=8"]
    )
    assert done.exit_code == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nzz" in lines[0] and "nz" in lines[0]
