"""Architecture-search strategies: the maths against brute force, their invariants, and every
strategy end to end through ``morphnas search`` on generated data (with and without growth)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch.func import functional_call, grad, vjp
from typer.testing import CliRunner

from conftest import (
    BATCH,
    HIDDEN,
    IMAGE_SPACES,
    N_SERIES,
    SEQUENCE_SPACES,
    WINDOW,
    tiny_supernet,
)
from morphnas import config, hypergrad, spaces, strategies
from morphnas.cli import app
from morphnas.genotype import DARTS_PRIMITIVES, TWO_INPUT_OPS
from morphnas.ops import recurrent
from morphnas.spaces.base import SampledMixing
from morphnas.spaces.fused_darts import FusedDartsSequence
from morphnas.spaces.fused_two_input import FusedTwoInputSequence
from morphnas.strategies import implicit
from morphnas.tasks.forecasting import ForecastModel


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add barrier waits (badly so on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Both spaces have a sequence kernel: the tests ask for the eager path where they count its op
# calls or differentiate a gradient again (the kernels' backward is once-differentiable).
EAGER = {"fused": False}


def _captured_grads(strategy, objective, train, valid):
    """The architecture gradient a strategy's step applies (read before its optimizer step)."""
    seen = []
    apply = strategy._apply
    strategy._apply = lambda grads: (seen.append([g.clone() for g in grads]), apply(grads))
    strategy.arch_step(objective, train, valid)
    strategy._apply = apply
    return seen[0]


# --------------------------------------------------------------------------- second order


@pytest.mark.parametrize(
    ("space_name", "hvp", "tol"),
    [("two_input", "exact", 1e-8), ("darts_rnn", "exact", 1e-8), ("two_input", "finite", 1e-4)],
)
def test_unrolled_strategy_equals_autograd_through_one_sgd_step(space_name, hvp, tol):
    space, model, weights, objective, train, valid = tiny_supernet(space_name, dtype=torch.float64)
    xi = 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    w_names = [names[id(w)] for w in weights]
    arch = space.arch_parameters()

    def loss_at(ws, batch):
        tensors = dict(zip(w_names, ws, strict=True))
        out = functional_call(model, tensors, (batch[0],), {"weights": space.mixing_weights()})
        return torch.mean((out - batch[1]) ** 2)

    # Brute force: dL_val(w − ξ ∇_w L_train(w, α), α)/dα by autograd through the SGD step, on
    # the eager path (the sequence kernels are differentiable once); the strategy runs fused.
    space.fused = False
    g_train = torch.autograd.grad(loss_at(weights, train), weights, create_graph=True)
    virtual = [w - xi * g for w, g in zip(weights, g_train, strict=True)]
    want = torch.autograd.grad(loss_at(virtual, valid), arch)
    space.fused = True

    strategy = strategies.build("darts", space, order=2, hvp=hvp, weight_lr=xi)
    got = _captured_grads(strategy, objective, train, valid)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=tol, atol=tol * float(w.abs().max()))


@pytest.mark.parametrize("space_name", SEQUENCE_SPACES)
@pytest.mark.parametrize(
    ("name", "options"),
    [("darts", {"order": 2, "hvp": "finite"}), ("idarts", {"steps": 1, "terms": 1})],
)
def test_bilevel_steps_run_the_sequence_kernel(monkeypatch, space_name, name, options):
    """The hypergradient's first-order products use autograd, so the kernels run there; the
    exact Hessian products (iDARTS's default) differentiate twice and take the eager path."""
    space, _, _, objective, train, valid = tiny_supernet(space_name)
    space.fused = True
    kernel = FusedTwoInputSequence if space_name == "two_input" else FusedDartsSequence
    calls = []
    apply = kernel.apply
    monkeypatch.setattr(kernel, "apply", lambda *args: calls.append(1) or apply(*args))
    grads = _captured_grads(strategies.build(name, space, **options), objective, train, valid)
    assert len(calls) >= 3  # e.g. DARTS: ∇_w L_train, ∇ L_val at w', ∇_α L_train at w ± εv
    assert all(torch.isfinite(g).all() for g in grads)


def _products_at_a_point(space_name: str, **options):
    """A float64 supernet on its kernels: the training loss, the point ``(w, α)``, a random
    direction ``v``, and torch.func's pull-backs of the weight gradient in ``w`` and in ``α``
    (the exact second-order products the tests compare with)."""
    space, _, _, objective, train, _ = tiny_supernet(
        space_name, nodes=3, dtype=torch.float64, **options
    )
    space.fused = True
    train_loss, _, weights, arch = strategies.build("idarts", space)._bilevel(
        objective, train, train
    )
    w, a = tuple(t.detach() for t in weights), tuple(t.detach() for t in arch)
    gen = torch.Generator().manual_seed(3)
    v = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in w)
    _, pull_w = vjp(lambda ws: grad(train_loss)(ws, a), w)
    _, pull_a = vjp(lambda arch_: grad(train_loss)(w, arch_), a)
    return train_loss, w, a, v, pull_w, pull_a


@pytest.mark.parametrize("space_name", list(spaces.SPACES))
def test_exact_hessian_products_equal_torch_func_on_the_supernets(space_name):
    """The top-level double backward (autograd on the eager loops, with the kernels switched on)
    gives the products of torch.func's vjp of the weight gradient, both kinds, and again on the
    graph it keeps."""
    train_loss, w, a, v, pull_w, pull_a = _products_at_a_point(space_name)
    curvature = hypergrad.Curvature(train_loss, w, a)
    v2 = tuple(2.0 * x for x in v)  # a second product on the same graph
    for got, (want,) in [
        (curvature.hvp(v), pull_w(v)),
        (curvature.mixed(v), pull_a(v)),
        (curvature.hvp(v2), pull_w(v2)),
    ]:
        assert any(float(x.abs().max()) > 0 for x in want)
        for g, x in zip(got, want, strict=True):
            torch.testing.assert_close(g, x, rtol=1e-10, atol=1e-12)


# ReLU's kink: a central difference across it is not the exact (almost everywhere) Hessian, so
# the central products are checked on each space's smooth ops.
SMOOTH = {
    "two_input": {"ops": tuple(op for op in TWO_INPUT_OPS if op != "add_relu")},
    "darts_rnn": {"primitives": tuple(op for op in DARTS_PRIMITIVES if op != "relu")},
}


@pytest.mark.parametrize("space_name", SEQUENCE_SPACES)
def test_central_difference_products_approach_the_exact_ones_on_the_supernets(space_name):
    """``hvp="finite_all"``: both products by central difference on the kernels, against
    torch.func's exact products; float64 and ε = 1e-5, so the O(ε²) truncation is ~1e-7 of
    the products' size (at DARTS's ε = 0.01/‖v‖ it is ~1e-3 here)."""
    train_loss, w, a, v, pull_w, pull_a = _products_at_a_point(space_name, **SMOOTH[space_name])
    curvature = hypergrad.Curvature(train_loss, w, a, hvp="finite_all", eps=1e-5)
    for got, (want,) in [(curvature.hvp(v), pull_w(v)), (curvature.mixed(v), pull_a(v))]:
        scale = max(float(x.abs().max()) for x in want)
        assert scale > 0
        for g, x in zip(got, want, strict=True):
            torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("space_name", SEQUENCE_SPACES)
def test_idarts_with_every_product_finite_runs_on_the_kernels_only(monkeypatch, space_name):
    """``hvp="finite_all"`` never takes the eager path: every product is first-order, so the
    kernel runs T inner gradients, ∇L_val, two per Neumann term and two for the mixed term;
    and the hypergradient is the exact one's, up to the central difference (float64, ε 1e-5)."""
    space, _, _, objective, train, valid = tiny_supernet(
        space_name, dtype=torch.float64, **SMOOTH[space_name]
    )
    space.fused = True
    options = {"steps": 2, "terms": 2, "weight_lr": 0.05}
    alpha = [a.detach().clone() for a in space.arch_parameters()]
    want = _captured_grads(strategies.build("idarts", space, **options), objective, train, valid)
    with torch.no_grad():  # the step moved α: back to where ``want`` was taken
        for a, before in zip(space.arch_parameters(), alpha, strict=True):
            a.copy_(before)

    def eager(*args, **kwargs):
        raise AssertionError("the eager loops ran")

    monkeypatch.setattr(hypergrad, "eager_kernels", eager)
    kernel = FusedTwoInputSequence if space_name == "two_input" else FusedDartsSequence
    calls = []
    apply = kernel.apply
    monkeypatch.setattr(kernel, "apply", lambda *args: calls.append(1) or apply(*args))
    strategy = strategies.build("idarts", space, hvp="finite_all", eps=1e-5, **options)
    got = _captured_grads(strategy, objective, train, valid)
    assert len(calls) >= 2 + 1 + 2 * 2 + 2
    for g, x in zip(got, want, strict=True):
        assert float(x.abs().max()) > 0
        torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def _inner_solution_by_hand(strategy, objective, train, valid):
    """At ``w_T`` (explicit SGD steps) for the step's losses (the seed its step will draw):
    ``w_T``, ``α``, ``∇_w L_val``, ``∇_α L_val`` and torch.func's exact products ``H·v`` and
    ``∇²_{αw} L_train·v`` (pull-backs of the training gradient), and the training loss."""
    state = torch.random.get_rng_state()
    train_loss, val_loss, weights, arch = strategy._bilevel(objective, train, valid)
    torch.random.set_rng_state(state)  # the strategy's own step draws the same seed again
    w, a = tuple(t.detach() for t in weights), tuple(t.detach() for t in arch)
    for _ in range(strategy.steps):
        step = grad(train_loss)(w, a)
        w = tuple(x - strategy.weight_lr * g for x, g in zip(w, step, strict=True))
    _, pull_w = vjp(lambda ws: grad(train_loss)(ws, a), w)
    _, pull_a = vjp(lambda arch_: grad(train_loss)(w, arch_), a)
    v0, g_a = grad(val_loss, argnums=(0, 1))(w, a)
    return {
        "w_t": w, "arch": a, "v0": v0, "g_a": g_a, "train_loss": train_loss,
        "hvp": lambda v: pull_w(v)[0], "mixed": lambda v: pull_a(v)[0],
    }  # fmt: skip


def _neumann_terms(hvp, v0, gamma: float, terms: int) -> list:
    """``p_k = (I − γH)^k v₀`` for k = 0..K, one product at a time."""
    ps = [v0]
    for _ in range(terms):
        ps.append(tuple(x - gamma * h for x, h in zip(ps[-1], hvp(ps[-1]), strict=True)))
    return ps


def _tuple_sum(parts: list) -> tuple:
    return tuple(sum(xs) for xs in zip(*parts, strict=True))


def test_idarts_step_is_the_neumann_hypergradient_with_its_own_gamma():
    """The α gradient iDARTS applies is ``∇_α L_val − ∇²_{αw} L_train · γ Σ_k p_k`` with the
    configured γ, apart from the inner steps' ``weight_lr``; brute force by torch.func."""
    space, _, _, objective, train, valid = tiny_supernet(dtype=torch.float64)
    options = {"steps": 2, "terms": 2, "gamma": 0.3, "weight_lr": 0.05, "power_iters": 0}
    strategy = strategies.build("idarts", space, **options)
    at = _inner_solution_by_hand(strategy, objective, train, valid)
    got = _captured_grads(strategy, objective, train, valid)
    series = _tuple_sum(_neumann_terms(at["hvp"], at["v0"], 0.3, 2))
    mixed = at["mixed"](tuple(0.3 * x for x in series))
    for g, a, m in zip(got, at["g_a"], mixed, strict=True):
        assert float(m.abs().max()) > 1e-6
        torch.testing.assert_close(g, a - m, rtol=1e-9, atol=1e-12)


def test_idarts_diagonal_hessian_is_the_official_approx_variant():
    """``hessian="diagonal"`` (architect_approx.py): ``d = H·g/‖g‖`` with ``g = ∇_w L_train`` at
    ``w_T``, the direction ``γ v₀ ⊙ Σ_k (1 − γd)^k``; brute force by torch.func's products."""
    space, _, _, objective, train, valid = tiny_supernet(dtype=torch.float64)
    options = {"steps": 2, "terms": 2, "gamma": 0.3, "weight_lr": 0.05, "power_iters": 0}
    strategy = strategies.build("idarts", space, hessian="diagonal", **options)
    at = _inner_solution_by_hand(strategy, objective, train, valid)
    g = grad(at["train_loss"])(at["w_t"], at["arch"])  # before the step moves α (``at["arch"]``)
    norm = float(torch.sqrt(sum((x * x).sum() for x in g)))
    diag = at["hvp"](tuple(x / norm for x in g))
    direction = tuple(
        0.3 * v * sum((1 - 0.3 * d) ** k for k in range(3))
        for v, d in zip(at["v0"], diag, strict=True)
    )
    got = _captured_grads(strategy, objective, train, valid)
    for got_i, a, m in zip(got, at["g_a"], at["mixed"](direction), strict=True):
        assert float(m.abs().max()) > 1e-6
        torch.testing.assert_close(got_i, a - m, rtol=1e-9, atol=1e-12)


# Sequence spaces: the image supernet's thousands of weights make its dense Hessian minutes of
# work; its second-order products are checked against torch.func above.
@pytest.mark.parametrize("space_name", SEQUENCE_SPACES)
def test_idarts_curvature_check_matches_the_dense_hessian(space_name):
    """Spec 2f's diagnostic: λ_max at ``w_T`` by power iteration equals the dominant eigenvalue
    of the dense Hessian there, and γλ_max goes to the epoch's metrics with the γ in use."""
    space, _, _, objective, train, valid = tiny_supernet(space_name, dtype=torch.float64)
    strategy = strategies.build("idarts", space, power_iters=400, gamma=0.01, weight_lr=0.05)
    at = _inner_solution_by_hand(strategy, objective, train, valid)
    train_loss, w_t, a = at["train_loss"], at["w_t"], at["arch"]
    dense = torch.func.hessian(lambda f: train_loss(hypergrad._unflatten(f, w_t), a))(
        hypergrad._flatten(w_t)
    )
    eigenvalues = torch.linalg.eigvalsh(dense)
    top = float(eigenvalues[eigenvalues.abs().argmax()])
    assert strategy.epoch_metrics() == {}
    strategy.arch_step(objective, train, valid)
    metrics = strategy.epoch_metrics()
    assert metrics["lambda_max"] == pytest.approx(top, rel=1e-4)
    assert metrics["gamma_lambda_max"] == pytest.approx(0.01 * metrics["lambda_max"], rel=1e-12)


def test_idarts_curvature_check_runs_once_an_epoch_and_changes_nothing(monkeypatch):
    """One check per epoch, kept across a resume in the middle of it; it reads pure losses
    only, so α after the steps is the same to the bit with the check or without it."""
    runs = []
    top_eigenvalue = hypergrad.top_eigenvalue
    monkeypatch.setattr(
        implicit, "top_eigenvalue", lambda *args: runs.append(1) or top_eigenvalue(*args)
    )
    alphas = {}
    for iters in (0, 3):
        space, _, _, objective, train, valid = tiny_supernet(seed=4)
        strategy = strategies.build("idarts", space, power_iters=iters)
        for epoch in (1, 2):
            strategy.start_epoch(epoch, 2)
            for _ in range(2):
                strategy.arch_step(objective, train, valid)
            if iters:
                assert len(runs) == epoch
                assert set(strategy.epoch_metrics()) == {"lambda_max", "gamma_lambda_max"}
        alphas[iters] = [a.detach().clone() for a in space.arch_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(alphas[0], alphas[3], strict=True))
    resumed = strategies.build("idarts", space, power_iters=3)
    resumed.load_state_dict(strategy.state_dict())
    resumed.start_epoch(2, 2)
    resumed.arch_step(objective, train, valid)
    assert len(runs) == 2
    assert resumed.epoch_metrics() == strategy.epoch_metrics()


def test_idarts_warns_once_when_gamma_times_lambda_max_reaches_one():
    """The hint names the option to set and a γ that passes the check."""
    space, _, _, objective, train, valid = tiny_supernet()
    probe = strategies.build("idarts", space, power_iters=20)
    probe.arch_step(objective, train, valid)
    top = abs(probe.epoch_metrics()["lambda_max"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategies.build("idarts", space, gamma=0.5 / top, power_iters=20).arch_step(
            objective, train, valid
        )
    strategy = strategies.build("idarts", space, gamma=4.0 / top, power_iters=20)
    with pytest.warns(RuntimeWarning, match=r"search\.strategy_options\.gamma to") as caught:
        for epoch in (1, 2):
            strategy.start_epoch(epoch, 2)
            strategy.arch_step(objective, train, valid)
    assert len(caught) == 1
    assert strategy.epoch_metrics()["gamma_lambda_max"] >= 1


def test_idarts_residual_noise_moves_the_weights_by_the_official_codes_change():
    """Spec 2e.1's quirk: the live weights end ``−ε(p₁ + … + p_K)`` away, ``p_k = (I − γH)^k v₀``
    at ``w_T`` and the stepped α, ``ε = 0.01/‖v₀‖``; brute force by torch.func's exact products."""
    space, _, weights, objective, train, valid = tiny_supernet(dtype=torch.float64)
    options = {"steps": 1, "terms": 2, "gamma": 0.2, "weight_lr": 0.05, "power_iters": 0}
    strategy = strategies.build("idarts", space, residual_noise=True, **options)
    before = [w.detach().clone() for w in weights]
    state = torch.random.get_rng_state()
    strategy.arch_step(objective, train, valid)  # α moves first, then the noise is taken
    torch.random.set_rng_state(state)
    live = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w, b in zip(weights, before, strict=True):
            w.copy_(b)
    at = _inner_solution_by_hand(strategy, objective, train, valid)
    v0 = at["v0"]
    total = _tuple_sum(_neumann_terms(at["hvp"], v0, 0.2, 2)[1:])
    eps = 0.01 / float(torch.sqrt(sum((v * v).sum() for v in v0)))
    for got, b, step in zip(live, before, total, strict=True):
        torch.testing.assert_close(got - b, -eps * step, rtol=1e-7, atol=1e-12)
    assert any(float((g - b).abs().max()) > 1e-6 for g, b in zip(live, before, strict=True))


def test_second_order_term_is_not_zero():
    """A silent fall-back to first order (NeroLoh/darts-tensorflow#1) would pass many tests."""
    space, _, _, objective, train, valid = tiny_supernet()
    first = _captured_grads(strategies.build("darts", space, lr=1e-12), objective, train, valid)
    second = _captured_grads(
        strategies.build("darts", space, order=2, weight_lr=0.5, lr=1e-12), objective, train, valid
    )
    diff = max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))
    assert diff > 1e-6


# --------------------------------------------------------------------------- invariants

# Every registered strategy (a new one is covered at once), sized for two steps where its
# defaults would be slow (idarts) or still warming up (msdarts), then settings worth their own run.
SMALL = {
    "idarts": {"steps": 1, "terms": 1},
    "msdarts": {"warmup": 0},
    "e2nas": {"nz": 8, "hs": 16},  # its graph VAE, trained once per test space, at a small size
}
VARIANTS = [(name, SMALL.get(name, {})) for name in strategies.STRATEGIES] + [
    ("darts", {"order": 2}),
    ("darts", {"order": 2, "perturb_unrolled": True}),
    ("darts", {"penalty": "flops", "proximity": 0.1}),
]


@pytest.mark.parametrize("space_name", list(spaces.SPACES))
@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_arch_step_leaves_the_weights_bit_identical(space_name, name, options):
    # toponas searches inputs: two_input offers that under its own option (wiring: search)
    wants = getattr(strategies.STRATEGIES[name], "space_options", {}).get(space_name, {})
    space, _, weights, objective, train, valid = tiny_supernet(space_name, **wants)
    if name == "e2nas" and space_name in IMAGE_SPACES:  # one choice per node: refused, said why
        with pytest.raises(ValueError, match="two edges"):
            strategies.build(name, space, **options)
        return
    strategy = strategies.build(name, space, **options)
    strategy.start_epoch(2, 4)
    # What the architecture step optimises: α, or E2NAS's latent code.
    searched = [p for group in strategy.optimizer.param_groups for p in group["params"]]
    alpha_before = [a.detach().clone() for a in searched]
    for _ in range(2):
        before = [w.detach().clone() for w in weights]
        value = strategy.arch_step(objective, train, valid)
        assert math.isfinite(float(value))
        assert all(torch.equal(b, w) for b, w in zip(before, weights, strict=True))
        assert all(w.grad is None for w in weights)
    moved = any(not torch.equal(a, b) for a, b in zip(alpha_before, searched, strict=True))
    assert moved == (name != "random")
    mixing = strategy.weight_mixing()
    assert all(not m.requires_grad for m in mixing)
    assert isinstance(mixing, SampledMixing) == (name in ("gdas", "random", "e2nas"))
    assert len(strategy.derive().nodes) == 2


def test_unknown_option_and_bad_value_are_value_errors():
    space = spaces.build("two_input", N_SERIES, HIDDEN, 2)
    with pytest.raises(ValueError, match="unknown gdas option"):
        strategies.build("gdas", space, bogus=1)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        strategies.build("darts", space, order=3)
    with pytest.raises(ValueError, match="steps"):
        strategies.build("idarts", space, steps=0)
    with pytest.raises(ValueError, match="gamma"):
        strategies.build("idarts", space, gamma=0.0)
    with pytest.raises(ValueError, match="power_iters"):
        strategies.build("idarts", space, power_iters=-1)
    with pytest.raises(ValueError, match="hessian must be one of"):
        strategies.build("idarts", space, hessian="approx")
    with pytest.raises(ValueError, match="residual_noise"):
        strategies.build("idarts", space, hessian="diagonal", residual_noise=True)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("idarts", "steps", True),  # a bool is a slip, not the count 1
        ("idarts", "terms", 1.0),
        ("idarts", "power_iters", False),
        ("random", "candidates", 0),
        ("msdarts", "samples", True),
        ("msdarts", "iterations", 0),
        ("msdarts", "warmup", True),
        ("msdarts", "warmup", -1),
    ],
)
def test_counts_are_integers_not_bools(name, option, value):
    space = spaces.build("two_input", N_SERIES, HIDDEN, 2)
    with pytest.raises(ValueError, match=rf"^{option}\b.* must be an integer >= \d"):
        strategies.build(name, space, **{option: value})


# --------------------------------------------------------------------------- Gumbel


def _frequencies(choices: list[int], n: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(choices), minlength=n).double() / len(choices)


@pytest.mark.parametrize("name", ["gdas", "snas"])
def test_gumbel_sample_frequencies_match_the_softmax(name):
    """argmax(log p + G) ~ Categorical(p) (Gumbel-max), whatever the temperature."""
    torch.manual_seed(0)
    space = spaces.build("two_input", N_SERIES, HIDDEN, 1)
    with torch.no_grad():
        logits = torch.tensor([0.0, 1.5, -1.0, 0.5, 2.0, -0.5, 1.0, 0.2, -2.0])
        space.arch[0].copy_(logits[: space.arch[0].numel()])
    strategy = strategies.build(name, space)
    strategy.start_epoch(1, 10)
    n, draws = space.arch[0].numel(), 4000
    if name == "gdas":
        choices = [strategy.hard_sample().choices[0] for _ in range(draws)]
    else:
        choices = [int(strategy.mixing_weights()[0].argmax()) for _ in range(draws)]
    freq = _frequencies(choices, n)
    p = torch.softmax(space.arch[0].detach().double(), 0)
    # Pearson χ² with n−1 = 7 degrees of freedom: 24.3 is its 0.999 quantile.
    assert n == 8
    chi2 = float((draws * (freq - p) ** 2 / p).sum())
    assert chi2 < 24.3


def test_darts_rnn_samples_one_edge_per_node_from_the_joint_softmax():
    torch.manual_seed(1)
    space = spaces.build("darts_rnn", N_SERIES, HIDDEN, 2)
    strategy = strategies.build("gdas", space)
    choices = [strategy.hard_sample().choices[1] for _ in range(3000)]  # node 2: 2 edges × 5 ops
    freq = _frequencies(choices, 10)
    p = torch.softmax(space.arch[1].detach().double().reshape(-1), 0)
    assert float((3000 * (freq - p) ** 2 / p).sum()) < 27.9  # χ²(9) 0.999 quantile


@pytest.mark.parametrize("space_name", SEQUENCE_SPACES)
def test_gdas_runs_only_the_sampled_op(space_name, monkeypatch):
    """Count every call of a candidate activation: the sampled path calls one per node and
    step, the dense path all of them; both give the same value."""
    calls: dict[str, int] = {}
    for op_name, fn in list(recurrent.ACTIVATIONS.items()):

        def counted(x, _fn=fn, _name=op_name):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(x)

        monkeypatch.setitem(recurrent.ACTIVATIONS, op_name, counted)
    torch.manual_seed(0)
    space = spaces.build(space_name, N_SERIES, HIDDEN, 2, **EAGER)
    n_ops = len(space.op_names)
    if space_name == "two_input":
        ops = ["add_relu", "add_sigmoid"]
        choices = [space.op_names.index(op) for op in ops]
    else:
        ops = ["relu", "sigmoid"]
        choices = [space.op_names.index("relu"), n_ops + space.op_names.index("sigmoid")]
    weights = []
    for alpha, c in zip(space.arch, choices, strict=True):
        hot = torch.zeros(alpha.numel())
        hot[c] = 1.0
        weights.append(hot.reshape(alpha.shape))
    x = torch.randn(WINDOW, BATCH, N_SERIES)
    # Training mode, no dropout: both paths normalise by batch statistics (in eval mode a sample
    # uses its own, the mixture the running ones: see the batch-statistics test below).
    space.train()
    calls.clear()
    sampled, _ = space(x, weights=SampledMixing(weights, choices))
    squash = {"tanh": WINDOW} if space_name == "two_input" else {}  # the output's tanh
    assert calls == {"relu": WINDOW, "sigmoid": WINDOW, **squash}
    calls.clear()
    dense, _ = space(x, weights=weights)
    assert sum(calls.values()) > 4 * WINDOW  # the dense path runs every candidate
    assert torch.allclose(sampled, dense, atol=1e-6)


def test_gdas_gradient_reaches_every_alpha():
    space, _, _, objective, train, valid = tiny_supernet()
    strategy = strategies.build("gdas", space, lr=1e-12)
    grads = _captured_grads(strategy, objective, train, valid)
    assert all(bool((g != 0).all()) for g in grads)


# --------------------------------------------------------------------------- DNAL


def test_dnal_gates_become_binary_as_beta_grows():
    space, _, _, objective, train, valid = tiny_supernet()
    strategy = strategies.build("dnal", space)
    epochs, fractions = 10, []
    for epoch in range(1, epochs + 1):
        strategy.start_epoch(epoch, epochs)
        strategy.arch_step(objective, train, valid)
        fractions.append(strategy.binary_fraction())
    assert strategy.beta == pytest.approx(1e4)
    assert fractions[0] < 0.2
    assert fractions[-1] > 0.95
    assert strategy.derive().nodes[0].op in space.op_names


# --------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("kind", ["params", "flops", "latency"])
def test_a_heavy_penalty_lowers_the_expected_cost(kind):
    space, _, _, objective, train, valid = tiny_supernet()
    strategy = strategies.build("darts", space, penalty=kind, penalty_weight=100.0, lr=0.05)

    def cost() -> float:
        searched = space.arch_parameters()
        weights = [strategy.cost_weights(a) for a in searched]
        return float(strategy.penalty.expected(weights, searched).detach())

    before = cost()
    for _ in range(10):
        strategy.arch_step(objective, train, valid)
    assert cost() < 0.8 * before


def test_proximity_pulls_towards_the_derived_cell():
    space, _, _, objective, train, valid = tiny_supernet()
    strategy = strategies.build("darts", space, proximity=100.0, lr=0.05)
    strategy.start_epoch(4, 4)
    best = [int(torch.softmax(a, -1).argmax()) for a in space.arch_parameters()]
    top = [float(torch.softmax(a.detach(), -1).max()) for a in space.arch_parameters()]
    for _ in range(10):
        strategy.arch_step(objective, train, valid)
    after = [torch.softmax(a, -1) for a in space.arch_parameters()]
    for p, k, t in zip(after, best, top, strict=True):
        if space.op_names[k] != "none":
            assert float(p[k]) > t


# --------------------------------------------------------------------------- end to end

TINY = [
    "--epochs", "2", "--retrain-epochs", "1", "--nodes", "2", "--hidden", "4", "--window", "5",
    "--set", "train.baselines=[]",
]  # fmt: skip


@pytest.mark.parametrize("growth", [False, True], ids=["fixed", "grow"])
@pytest.mark.parametrize(
    "flags",
    [
        ["--strategy", "darts"],
        ["--strategy", "darts", "--order", "2"],
        ["--strategy", "idarts", "--set", "search.strategy_options.steps=1"],
        ["--strategy", "idarts", "--set", "search.strategy_options.hvp=finite_all"],
        ["--strategy", "idarts", "--set", "search.strategy_options.hessian=diagonal"],
        ["--strategy", "snas", "--penalty", "params"],
        ["--strategy", "gdas"],
        ["--strategy", "dnal"],
        ["--strategy", "msdarts"],
        ["--strategy", "random"],
    ],
    ids=lambda f: "-".join(f[1:2] + f[3:4]).replace("search.strategy_options.", ""),
)
@pytest.mark.parametrize("wiring", ["chain", "search"])
def test_search_runs_every_strategy_end_to_end(tmp_path, synthetic_csv, flags, growth, wiring):
    """Every strategy, on a fixed wiring and on input choice (the node's inputs searched)."""
    grow = ["--growth", "grow-then-prune", "--nodes-start", "1"] if growth else []
    grow += ["--set", f"space.options.wiring={wiring}"]
    out = tmp_path / "run"
    args = ["search", "--csv", str(synthetic_csv), *TINY, *flags, *grow, "--out", str(out)]
    done = CliRunner().invoke(app, [*args, "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert len(result["genotype"]["nodes"]) == 2
    assert result["genotype"]["metadata"]["strategy"] == flags[1]
    assert math.isfinite(result["results"][0]["test_rse"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if row.get("phase") == "search" and "valid_loss" in row]
    assert len(epochs) == 2
    checked = [math.isfinite(row.get("gamma_lambda_max", math.nan)) for row in epochs]
    assert checked == [flags[1] == "idarts"] * 2  # iDARTS's curvature check, every epoch


def test_a_bad_strategy_option_is_one_line_with_exit_code_2(tmp_path, synthetic_csv):
    out = tmp_path / "run"
    args = ["search", "--csv", str(synthetic_csv), *TINY, "--strategy", "gdas"]
    done = CliRunner().invoke(
        app, [*args, "--set", "search.strategy_options.bogus=1", "--out", str(out)]
    )
    assert done.exit_code == 2
    assert "unknown gdas option" in done.output and "tau_start" in done.output
    assert not out.exists()


def test_a_sampled_darts_cell_is_scored_with_its_own_batch_statistics():
    """In eval mode a SampledMixing ignores BN running statistics (averaged over other sampled
    cells): corrupting them changes nothing, while the softmax mixture does use them."""
    torch.manual_seed(0)
    space = spaces.build("darts_rnn", 3, 5, 3).eval()
    x = torch.randn(6, 16, 3)
    gdas = strategies.build("gdas", space)
    sample = gdas.mode().detach()
    before, _ = space(x, weights=sample)
    mixed_before, _ = space(x)
    space.bn.running_var.fill_(1e-4)
    after, _ = space(x, weights=sample)
    mixed_after, _ = space(x)
    assert torch.equal(before, after) and torch.isfinite(after).all()
    assert not torch.allclose(mixed_before, mixed_after)


@pytest.mark.parametrize("weight_steps", [1, 3])
def test_weight_steps_per_architecture_step(tmp_path, weight_steps, monkeypatch):
    """``search.weight_steps`` n: the architecture steps on batches 0, n, 2n, … of each epoch,
    every batch still takes its weight step (spec 2f's "weight steps per α step")."""
    from morphnas.config import SearchConfig
    from morphnas.data import make_windows, synthetic_series
    from morphnas.engine.search import search as run_search
    from morphnas.run_files import MetricsLog
    from morphnas.tasks.forecasting import ForecastTask

    torch.manual_seed(0)
    data = make_windows(synthetic_series(n_steps=200, n_series=N_SERIES, seed=0), WINDOW, 1)
    space = spaces.build("two_input", N_SERIES, HIDDEN, 2)
    model = ForecastModel(space, HIDDEN, N_SERIES)
    strategy = strategies.build("darts", space)
    arch_calls, weight_calls = [], []
    step = strategy.arch_step
    monkeypatch.setattr(strategy, "arch_step", lambda *a: arch_calls.append(1) or step(*a))
    mixing = strategy.weight_mixing
    monkeypatch.setattr(strategy, "weight_mixing", lambda: weight_calls.append(1) or mixing())
    search_config = SearchConfig(epochs=2, batch_size=16, weight_steps=weight_steps)
    task = ForecastTask(data.train, data.valid, 16)
    run_search(
        model, strategy, task, search_config, seed=0, log=MetricsLog(tmp_path / "metrics.jsonl"),
        checkpoint_dir=tmp_path / "checkpoints",
    )  # fmt: skip
    batches = -(-len(data.train[0]) // 16)
    assert batches % weight_steps != 0 or weight_steps == 1  # a short last group is covered
    assert len(weight_calls) == 2 * batches
    assert len(arch_calls) == 2 * -(-batches // weight_steps)


def test_compare_variants_carry_their_own_strategy_options(tmp_path, synthetic_csv):
    """``--strategy darts,idarts:gamma=1e-3:power_iters=2``: each variant's run uses its own
    options (``1e-3`` a number, as ``--set`` reads it), and options darts does not take do not
    reach it."""
    out = tmp_path / "cmp"
    args = ["compare", "--csv", str(synthetic_csv), *TINY, "--seeds", "1", "--out", str(out)]
    variants = "darts,idarts:gamma=1e-3:power_iters=2"
    done = CliRunner().invoke(app, [*args, "--strategy", variants, "--json"])
    assert done.exit_code == 0, done.output
    runs = json.loads(done.stdout)["runs"]
    assert [r["variant"] for r in runs] == ["darts", "idarts:gamma=1e-3:power_iters=2"]
    idarts = out / "idarts:gamma=1e-3:power_iters=2-seed0"
    saved = config.resolve(idarts / "config.yaml").search
    assert saved.strategy == "idarts" and saved.strategy_options == {
        "gamma": 1e-3,
        "power_iters": 2,
    }
    rows = [json.loads(line) for line in (idarts / "metrics.jsonl").read_text().splitlines()]
    checked = [r for r in rows if "gamma_lambda_max" in r]
    assert len(checked) == 2
    for row in checked:
        assert row["gamma_lambda_max"] == pytest.approx(1e-3 * row["lambda_max"], rel=1e-12)
    assert config.resolve(out / "darts-seed0" / "config.yaml").search.strategy_options == {}


@pytest.mark.parametrize(
    ("variants", "fragment"),
    [
        ("darts,idarts:gamma=-1", "compare variant 'idarts:gamma=-1': search.strategy_options: "
         "gamma must be > 0"),
        ("idarts:gamma", "a variant's options go as NAME:KEY=VALUE"),
        ("darts:gamma=1", "unknown darts option(s) ['gamma']"),
        ("darts,darts", "lists a variant twice"),
    ],
)  # fmt: skip
def test_a_bad_compare_variant_is_one_line_before_any_run(
    tmp_path, synthetic_csv, variants, fragment
):
    out = tmp_path / "cmp"
    args = ["compare", "--csv", str(synthetic_csv), *TINY, "--seeds", "1", "--out", str(out)]
    done = CliRunner().invoke(app, [*args, "--strategy", variants])
    assert done.exit_code == 2
    assert fragment in done.output and len(done.output.strip().splitlines()) == 1, done.output
    assert not out.exists()
