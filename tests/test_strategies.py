"""Architecture-search strategies: the maths against brute force, their invariants, and every
strategy end to end through ``morphnas search`` on generated data (with and without growth)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vjp
from typer.testing import CliRunner

from morphnas import hypergrad, spaces, strategies
from morphnas.cli import app
from morphnas.genotype import DARTS_PRIMITIVES, TWO_INPUT_OPS
from morphnas.ops import recurrent
from morphnas.spaces.base import SampledMixing
from morphnas.spaces.fused_darts import FusedDartsSequence
from morphnas.spaces.fused_two_input import FusedTwoInputSequence
from morphnas.strategies import Objective
from morphnas.tasks.forecasting import ForecastModel

N_SERIES, HIDDEN, WINDOW, BATCH = 2, 4, 5, 8


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


def _setup(
    space_name: str = "two_input", nodes: int = 2, dtype=torch.float32, seed: int = 0, **options
):
    """A tiny supernet in a forecaster (no dropout), its Objective and a train/valid batch;
    ``options`` go to the space.

    Eager spaces: a fused kernel's hand-written backward is once-differentiable, and the
    brute-force references below differentiate through a gradient."""
    torch.manual_seed(seed)
    space = spaces.build(space_name, N_SERIES, HIDDEN, nodes, **EAGER, **options)
    model = ForecastModel(space, HIDDEN, N_SERIES, 0.0, 3, "last").to(dtype)
    arch_ids = {id(p) for p in space.arch}
    weights = [p for p in model.parameters() if id(p) not in arch_ids]
    mse = nn.MSELoss()

    def loss(batch, mixing):
        return mse(model(batch[0], weights=mixing), batch[1])

    gen = torch.Generator().manual_seed(seed + 1)

    def batch():
        return (
            torch.randn(BATCH, WINDOW, N_SERIES, generator=gen, dtype=dtype),
            torch.randn(BATCH, N_SERIES, generator=gen, dtype=dtype),
        )

    return space, model, weights, Objective(model, loss, weights), batch(), batch()


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
    space, model, weights, objective, train, valid = _setup(space_name, dtype=torch.float64)
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


@pytest.mark.parametrize("space_name", ["two_input", "darts_rnn"])
@pytest.mark.parametrize(
    ("name", "options"),
    [("darts", {"order": 2, "hvp": "finite"}), ("idarts", {"steps": 1, "terms": 1})],
)
def test_bilevel_steps_run_the_sequence_kernel(monkeypatch, space_name, name, options):
    """The hypergradient's first-order products use autograd, so the kernels run there; the
    exact Hessian products (iDARTS's default) differentiate twice and take the eager path."""
    space, _, _, objective, train, valid = _setup(space_name)
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
    space, _, _, objective, train, _ = _setup(space_name, nodes=3, dtype=torch.float64, **options)
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


@pytest.mark.parametrize("space_name", ["two_input", "darts_rnn"])
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


@pytest.mark.parametrize("space_name", ["two_input", "darts_rnn"])
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


@pytest.mark.parametrize("space_name", ["two_input", "darts_rnn"])
def test_idarts_with_every_product_finite_runs_on_the_kernels_only(monkeypatch, space_name):
    """``hvp="finite_all"`` never takes the eager path: every product is first-order, so the
    kernel runs T inner gradients, ∇L_val, two per Neumann term and two for the mixed term;
    and the hypergradient is the exact one's, up to the central difference (float64, ε 1e-5)."""
    space, _, _, objective, train, valid = _setup(
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


def test_second_order_term_is_not_zero():
    """A silent fall-back to first order (NeroLoh/darts-tensorflow#1) would pass many tests."""
    space, _, _, objective, train, valid = _setup()
    first = _captured_grads(strategies.build("darts", space, lr=1e-12), objective, train, valid)
    second = _captured_grads(
        strategies.build("darts", space, order=2, weight_lr=0.5, lr=1e-12), objective, train, valid
    )
    diff = max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))
    assert diff > 1e-6


# --------------------------------------------------------------------------- invariants

VARIANTS = [
    ("darts", {}),
    ("darts", {"order": 2}),
    ("darts", {"order": 2, "perturb_unrolled": True}),
    ("idarts", {"steps": 1, "terms": 1}),
    ("snas", {}),
    ("gdas", {}),
    ("dnal", {}),
    ("msdarts", {"warmup": 0}),
    ("random", {}),
    ("darts", {"penalty": "flops", "proximity": 0.1}),
]


@pytest.mark.parametrize("space_name", ["two_input", "darts_rnn"])
@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_arch_step_leaves_the_weights_bit_identical(space_name, name, options):
    space, _, weights, objective, train, valid = _setup(space_name)
    strategy = strategies.build(name, space, **options)
    strategy.start_epoch(2, 4)
    alpha_before = [a.detach().clone() for a in space.arch_parameters()]
    for _ in range(2):
        before = [w.detach().clone() for w in weights]
        value = strategy.arch_step(objective, train, valid)
        assert math.isfinite(float(value))
        assert all(torch.equal(b, w) for b, w in zip(before, weights, strict=True))
        assert all(w.grad is None for w in weights)
    moved = any(
        not torch.equal(a, b) for a, b in zip(alpha_before, space.arch_parameters(), strict=True)
    )
    assert moved == (name != "random")
    mixing = strategy.weight_mixing()
    assert all(not m.requires_grad for m in mixing)
    assert isinstance(mixing, SampledMixing) == (name in ("gdas", "random"))
    assert len(strategy.derive().nodes) == 2


def test_unknown_option_and_bad_value_are_value_errors():
    space = spaces.build("two_input", N_SERIES, HIDDEN, 2)
    with pytest.raises(ValueError, match="unknown gdas option"):
        strategies.build("gdas", space, bogus=1)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        strategies.build("darts", space, order=3)
    with pytest.raises(ValueError, match="steps"):
        strategies.build("idarts", space, steps=0)


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


@pytest.mark.parametrize("space_name", ["two_input", "darts_rnn"])
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
    space, _, _, objective, train, valid = _setup()
    strategy = strategies.build("gdas", space, lr=1e-12)
    grads = _captured_grads(strategy, objective, train, valid)
    assert all(bool((g != 0).all()) for g in grads)


# --------------------------------------------------------------------------- DNAL


def test_dnal_gates_become_binary_as_beta_grows():
    space, _, _, objective, train, valid = _setup()
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
    space, _, _, objective, train, valid = _setup()
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
    space, _, _, objective, train, valid = _setup()
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
        ["--strategy", "snas", "--penalty", "params"],
        ["--strategy", "gdas"],
        ["--strategy", "dnal"],
        ["--strategy", "msdarts"],
        ["--strategy", "random"],
    ],
    ids=lambda f: "-".join(f[1:2] + f[3:4]).replace("search.strategy_options.", ""),
)
def test_search_runs_every_strategy_end_to_end(tmp_path, synthetic_csv, flags, growth):
    grow = ["--growth", "grow-then-prune", "--nodes-start", "1"] if growth else []
    out = tmp_path / "run"
    args = ["search", "--csv", str(synthetic_csv), *TINY, *flags, *grow, "--out", str(out)]
    done = CliRunner().invoke(app, [*args, "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert len(result["genotype"]["nodes"]) == 2
    assert result["genotype"]["metadata"]["strategy"] == flags[1]
    assert math.isfinite(result["results"][0]["test_rse"])


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
