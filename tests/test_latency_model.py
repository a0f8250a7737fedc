"""LA-DNAS's learned latency predictor (``penalty: latency_mlp``): the encoding of hand-made cells,
the gradient against finite differences, training against a known latency function (no timing
noise), the cache, growth, resume state, and a search through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tiny_supernet
from morphnas import spaces, strategies
from morphnas.genotype import Node
from morphnas.spaces.base import SampledMixing
from morphnas.strategies import latency_model as lm

TINY = lm.Settings(samples=16, repeats=1, steps=2, batch_size=4, width=8, epochs=60)


@pytest.fixture(autouse=True)
def _one_thread_own_cache(tmp_path, monkeypatch):
    """Tiny tensors run on one thread; every test gets an empty predictor cache."""
    monkeypatch.setenv("MORPHNAS_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hot(shape: tuple[int, ...], flat: int) -> torch.Tensor:
    hot = torch.zeros(shape).reshape(-1)
    hot[flat] = 1.0
    return hot.reshape(shape)


# --------------------------------------------------------------------------- encoding


def test_the_encoding_of_a_hand_made_cell():
    """Input choice: node 3 reads one of 6 input pairs; the encoding keeps only its op."""
    space = spaces.build("two_input", 3, 4, 3, wiring="search")
    n_ops = len(space.op_names)  # none, add_tanh, add_sigmoid, add_relu, add_identity, ...
    assert n_ops == 8
    # node 1: add_tanh (1) on pair 1; node 2: add_tanh on pair 4; node 3: highway (7) on pair 5
    cell = SampledMixing(
        [_hot((2, 8), 1 * 8 + 1), _hot((6, 8), 4 * 8 + 1), _hot((12, 8), 5 * 8 + 7)],
        [9, 33, 47],
    )
    expected = [
        0, 1, 0, 0, 0, 0, 0, 0,
        0, 1, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 1,
        0, 2, 0, 0, 0, 0, 0, 1,  # op counts over the cell
    ]  # fmt: skip
    assert lm.encode_mixing(cell, n_ops).tolist() == expected


def test_the_soft_encoding_is_the_expected_one_hot_encoding_and_fixed_nodes_are_their_op():
    space = spaces.build("two_input", 3, 4, 3, wiring="chain")
    space.fix(2, Node("hadamard", (1, 0)))  # op 5
    penalty = lm.LatencyModelPenalty(space, TINY)
    p1 = torch.tensor([0.5, 0.25, 0, 0, 0, 0, 0.25, 0])
    p3 = torch.tensor([0, 0, 0, 0, 1.0, 0, 0, 0])
    encoding = penalty.encoding([p1.reshape(1, 8), p3.reshape(1, 8)])
    fixed = torch.zeros(8)
    fixed[5] = 1.0
    assert torch.equal(encoding, torch.cat([p1, fixed, p3, p1 + fixed + p3]))


# --------------------------------------------------------------------------- the gradient


def test_the_penalty_gradient_matches_finite_differences():
    """d(normalised latency)/dα through softmax, the encoding and the MLP, in float64."""
    torch.manual_seed(0)
    space = spaces.build("two_input", 3, 4, 3, wiring="search")
    penalty = lm.LatencyModelPenalty(space, TINY)
    n_inputs = 4 * 8
    model = lm.LatencyMlp(n_inputs, width=16, depth=4).double()
    model.ref.fill_(2e-4)
    model.lo.fill_(1e-4)
    model.hi.fill_(4e-4)
    alphas = [torch.randn(a.shape, dtype=torch.float64, requires_grad=True) for a in space.arch]

    def value(*alpha: torch.Tensor) -> torch.Tensor:
        weights = [torch.softmax(a.reshape(-1), 0).reshape(a.shape) for a in alpha]
        return model.normalised(penalty.encoding(weights))

    assert torch.autograd.gradcheck(value, tuple(alphas), eps=1e-6, atol=1e-8, rtol=1e-6)
    grads = torch.autograd.grad(value(*alphas), alphas)
    assert all(float(g.abs().max()) > 1e-6 for g in grads)  # not a vacuous check


# --------------------------------------------------------------------------- training


def _synthetic(n: int, n_nodes: int, n_ops: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random one-hot cells and a known nonlinear latency: per-op costs that add up, and an
    interaction (op 2 right after op 1 costs extra), in seconds."""
    gen = torch.Generator().manual_seed(seed)
    ops = torch.randint(n_ops, (n, n_nodes), generator=gen)
    cost = torch.linspace(0.2, 2.0, n_ops, dtype=torch.float64)
    y = 1e-4 * (1.0 + cost[ops].sum(1))
    pairs = ((ops[:, :-1] == 1) & (ops[:, 1:] == 2)).sum(1)
    y = y * (1.0 + 0.5 * pairs)
    x = torch.stack(
        [lm.encode([torch.nn.functional.one_hot(o, n_ops).double() for o in row]) for row in ops]
    )
    return x, y


def test_training_recovers_a_known_latency_function():
    x, y = _synthetic(200, 4, 5, seed=0)
    settings = lm.Settings(samples=200, epochs=400, mixup=0.0)
    model, info = lm.train_predictor(x, y, settings)
    assert info["test_error"] < 0.03
    assert info["test_error"] < info["median_error"] / 5  # far better than a constant
    assert info["test_samples"] == 30
    test = lm.split(len(y), settings.seed)[2]
    brute = sum(abs(float(model(x[i].float())) - float(y[i])) / float(y[i]) for i in test)
    assert info["test_error"] == pytest.approx(brute / len(test), rel=1e-4)


def test_mixup_teaches_the_expected_latency_between_cells():
    """With mixup, a soft encoding halfway between two cells predicts about the mean of their
    latencies (additive costs, no interaction here)."""
    gen = torch.Generator().manual_seed(1)
    n_ops, n_nodes = 5, 3
    ops = torch.randint(n_ops, (200, n_nodes), generator=gen)
    cost = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    y = 1e-4 * (0.2 + cost[ops].sum(1))

    def encoding(row: torch.Tensor) -> torch.Tensor:
        return lm.encode([torch.nn.functional.one_hot(o, n_ops).double() for o in row])

    x = torch.stack([encoding(row) for row in ops])
    model, _ = lm.train_predictor(x, y, lm.Settings(samples=200, epochs=400, mixup=1.0))
    fast, slow = torch.tensor([0, 0, 0]), torch.tensor([4, 4, 4])
    half = (0.5 * (encoding(fast) + encoding(slow))).float()
    mean = 0.5 * float(1e-4 * (0.2 + cost[fast].sum() + 0.2 + cost[slow].sum()))
    assert float(model(half)) == pytest.approx(mean, rel=0.1)


def test_bad_settings_and_image_spaces_are_refused():
    with pytest.raises(ValueError, match="latency_samples must be >= 8"):
        lm.Settings(samples=2)
    with pytest.raises(ValueError, match="latency_repeats must be >= 1"):
        lm.Settings(repeats=0)
    image_space = spaces.build("darts_cnn", 1, 4, 2, steps=1)
    with pytest.raises(ValueError, match="latency_mlp times recurrent cells"):
        strategies.build("darts", image_space, penalty="latency_mlp")


# --------------------------------------------------------------------------- the cache


def test_the_cache_hits_misses_and_retrains_a_corrupt_file():
    space = spaces.build("two_input", 2, 4, 2)
    warned: list[str] = []
    first, info = lm.load_or_fit(space, TINY, warn=warned.append)
    path = Path(info["path"])
    assert not info["cached"] and path.exists() and info["samples"] == 16
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temp file
    x = lm.encode_mixing(space.mixing_weights(), len(space.op_names))
    again, info = lm.load_or_fit(space, TINY, warn=warned.append)
    assert info["cached"] and torch.equal(again(x), first(x)) and not warned
    # another setting, thread count or size: another file
    other_settings = lm.Settings(**{**vars(TINY), "seed": 1})
    _, info = lm.load_or_fit(space, other_settings)
    assert not info["cached"] and Path(info["path"]) != path
    # garbage, then another key's file under this name: a warning each, retrained, rewritten
    path.write_bytes(b"not a checkpoint")
    _, info = lm.load_or_fit(space, TINY, warn=warned.append)
    assert not info["cached"] and "unreadable" in warned[-1]
    path.write_bytes(lm.cache_path(space, other_settings).read_bytes())
    _, info = lm.load_or_fit(space, TINY, warn=warned.append)
    assert not info["cached"] and "another space/size" in warned[-1]
    _, info = lm.load_or_fit(space, TINY, warn=warned.append)
    assert info["cached"] and len(warned) == 2


# --------------------------------------------------------------------------- in a search


def _additive_timings(space, cells, settings, progress=None) -> torch.Tensor:
    """Stands in for ``time_cells``: op k of any node costs (k + 1) * 10 µs, plus 50 µs."""
    del settings, progress
    n_ops = len(space.op_names)
    cost = (torch.arange(n_ops, dtype=torch.float64) + 1) * 1e-5
    encodings = torch.stack([lm.encode_mixing(c, n_ops).double() for c in cells])
    return 5e-5 + encodings[:, -n_ops:] @ cost  # the op counts


def test_a_heavy_penalty_lowers_the_predicted_latency_and_growth_gets_its_own_predictor(
    monkeypatch,
):
    """Through the whole pipeline (fit, encoding, penalty, strategy step) on known timings."""
    monkeypatch.setattr(lm, "time_cells", _additive_timings)
    space, _, _, objective, train, valid = tiny_supernet(nodes=2)
    strategy = strategies.build(
        "darts", space, penalty="latency_mlp", penalty_weight=100.0, lr=0.05, latency_samples=48
    )
    strategy.penalty.settings = lm.Settings(samples=48, width=16, epochs=300)

    def cost() -> float:
        searched = space.arch_parameters()
        weights = [strategy.cost_weights(a) for a in searched]
        return float(strategy.penalty.expected(weights, searched).detach())

    before = cost()
    for _ in range(10):
        strategy.arch_step(objective, train, valid)
    assert cost() < before - 0.1
    space.grow()
    strategy.on_space_change()
    strategy.arch_step(objective, train, valid)
    assert sorted(strategy.penalty.info) == ["2x4", "3x4"]
    # a resumed search reuses the predictors: nothing timed, nothing read from the cache
    state = strategy.state_dict()
    value = cost()
    for file in Path(strategy.penalty.info["3x4"]["path"]).parent.iterdir():
        file.unlink()
    resumed = strategies.build("darts", space, penalty="latency_mlp", latency_samples=16)
    resumed.load_state_dict(state)
    weights = [strategy.cost_weights(a) for a in space.arch_parameters()]
    assert float(resumed.penalty.expected(weights, space.arch_parameters()).detach()) == value
    assert not any(Path(strategy.penalty.info["3x4"]["path"]).parent.iterdir())


def test_a_growing_search_with_latency_mlp_through_the_cli(tmp_path, synthetic_csv):
    options = [
        "--set", "search.strategy_options.latency_samples=12",
        "--set", "search.strategy_options.latency_repeats=1",
        "--nodes", "2", "--hidden", "4", "--threads", "1",
        "--growth", "grow-then-prune", "--nodes-start", "1", "--csv", str(synthetic_csv),
    ]  # fmt: skip
    code, err = run_cli("latency-model", *options, "--json")
    assert code == 0, err
    code, err = run_cli(
        "search", *options, "--epochs", "2", "--retrain-epochs", "1", "--window", "5",
        "--set", "train.baselines=[]", "--penalty", "latency_mlp", "--penalty-weight", "1",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 0, err
    cache = sorted((tmp_path / "cache" / "latency").iterdir())
    assert [p.name.split("-")[1] for p in cache] == ["1n", "2n"]  # the search found both
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert math.isfinite(summary["results"][0]["test_rse"])


def test_bad_latency_options_are_one_line_errors(synthetic_csv):
    code, err = run_cli(
        "latency-model", "--csv", str(synthetic_csv), "--threads", "1",
        "--set", "search.strategy_options.latency_samples=3",
    )  # fmt: skip
    assert code == 2 and len(err) == 1 and "latency_samples must be >= 8" in err[0]
