"""The hand-written DARTS sequence kernels against slow, obvious versions: the Python one
(``spaces.fused_darts``) and its C++ twin (``morphnas.native``), each test on both.

Three-way: the fused path, the eager path of the same module (``fused=False``) and a per-edge,
per-primitive reference written here from spec/morphism.md §2.1 (with residual and fixed nodes,
dropout masks and BatchNorm from its definition, running statistics included). Float64, 1e-5:
outputs, the last state, and the gradients of every parameter, the input, the initial state
and the mixing weights; ``gradcheck`` on tiny shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from morphnas import cells, native
from morphnas.bench import TWO_INPUT_GATED
from morphnas.genotype import DARTS_PRIMITIVES, KNOWN, Node
from morphnas.spaces import DartsRNNSearchCell, build
from morphnas.spaces.base import SampledMixing

T, B, N_IN, D = 4, 3, 3, 5
TOL = dict(rtol=1e-5, atol=1e-5)
ACT = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "identity": lambda z: z,
}


class SlowNorm:
    """BatchNorm1d (no affine) from its definition, tracking its own running statistics."""

    def __init__(self, bn: nn.BatchNorm1d | None) -> None:
        self.bn = bn
        if bn is not None:
            self.mean, self.var = bn.running_mean.clone(), bn.running_var.clone()
            self.count = int(bn.num_batches_tracked)

    def __call__(self, s: Tensor) -> Tensor:
        bn = self.bn
        if bn is None:
            return s
        if not bn.training:
            return (s - self.mean) / torch.sqrt(self.var + bn.eps)
        n = s.shape[0]
        mean = s.sum(0) / n
        var = ((s - mean) ** 2).sum(0) / n
        with torch.no_grad():
            m = bn.momentum
            self.mean = (1 - m) * self.mean + m * mean
            self.var = (1 - m) * self.var + m * var * n / (n - 1)
            self.count += 1
        return (s - mean) / torch.sqrt(var + bn.eps)


def slow_cell(cell: DartsRNNSearchCell, x, h0, weights, norm: SlowNorm, seed: int) -> Tensor:
    """One edge and one primitive at a time; masks drawn like the module (x's, then h's)."""
    torch.manual_seed(seed)
    d = cell.hidden_size
    masks = []
    for size, p in ((cell.input_size, cell.dropout_x), (d, cell.dropout_h)):
        keep = 1 - p
        on = cell.training and p > 0
        masks.append(torch.empty(B, size, dtype=x.dtype).bernoulli_(keep) / keep if on else 1.0)
    m_x, m_h = masks
    h, outs = h0, []
    for t in range(T):
        pre = torch.cat([x[t] * m_x, h * m_h], dim=-1) @ cell.init_weight
        c0, g0 = torch.sigmoid(pre[:, :d]), torch.tanh(pre[:, d:])
        states = [norm(h + c0 * (g0 - h))]
        for i in range(1, cell.nodes + 1):
            w = cell.node_weights[i - 1]
            if i in cell.fixed:
                node = cell.fixed[i]
                edges = [(node.inputs[0], node.op, 1.0)]
            else:
                edges = [
                    (j, name, weights[i - 1][j, k])
                    for j in range(i)
                    for k, name in enumerate(cell.op_names)
                    if name != "none"
                ]
            total = torch.zeros_like(h)
            for j, name, p in edges:
                z = (states[j] * m_h) @ w
                c, g = torch.sigmoid(z[:, :d]), z[:, d:]
                total = total + p * (states[j] + c * (ACT[name](g) - states[j]))
            s = norm(total)
            if str(i) in cell.gammas:
                s = sum(states[1:]) / (i - 1) + cell.gammas[str(i)] * s
            states.append(s)
        h = sum(states[1:]) / cell.nodes
        outs.append(h)
    return torch.stack(outs)


@pytest.fixture(params=["native", "python"])
def kernel(request):
    """The DARTS supernet's two kernels: the C++ one (``morphnas.native``, which must build
    here) and the Python one it falls back to; each is checked against the slow versions."""
    if request.param == "native":
        assert native.darts_supernet() is not None, "the native DARTS kernel did not build"
        yield request.param
    else:
        with native.python_kernels():
            yield request.param


def make_cell(
    nodes=3, bn=True, training=True, grow=0, fix=(), dropout=(0.3, 0.4), prims=DARTS_PRIMITIVES
):
    torch.manual_seed(5)
    cell = DartsRNNSearchCell(
        N_IN, D, nodes=nodes, primitives=prims, batchnorm=bn, dropout_x=dropout[0],
        dropout_h=dropout[1],
    )  # fmt: skip
    for _ in range(grow):
        cell.grow()
    cell = cell.double()
    with torch.no_grad():
        for a in cell.arch:
            a.normal_()
        for g in cell.gammas.values():
            g.normal_()  # non-zero: the residual branch must carry gradient and value
        if cell.bn is not None:
            cell.bn.running_mean.normal_(0, 0.3)
            cell.bn.running_var.uniform_(0.5, 1.5)
    for i, (j, op) in fix:
        cell.fixed[i] = Node(op, (j,))
    return cell.train(training)


def run(cell: nn.Module, x, h0, weights, seed: int, probe: Tensor):
    """Outputs, last state and the gradients of (parameters, x, h0, weights)."""
    torch.manual_seed(seed)
    out, h = cell(x, h0, weights=weights)
    loss = (out * probe).sum() + (h * probe[-1]).sum()
    wrt = [*cell.parameters(), x, h0, *weights]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return (
        out,
        h,
        [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads, strict=True)],
    )


def three_way(cell: DartsRNNSearchCell, seed: int = 3) -> None:
    """Fused, eager and slow agree: values, gradients and BN running statistics."""
    eager = copy.deepcopy(cell)
    eager.fused = False
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, N_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, D, generator=gen, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(T, B, D, generator=gen, dtype=torch.float64)
    weights = [w.detach().requires_grad_() for w in cell.mixing_weights()]

    norm = SlowNorm(copy.deepcopy(cell.bn))
    ref = slow_cell(cell, x, h0, weights, norm, seed)
    ref_loss = (ref * probe).sum() + (ref[-1] * probe[-1]).sum()
    wrt = [*cell.parameters(), x, h0, *weights]
    ref_grads = torch.autograd.grad(ref_loss, wrt, allow_unused=True)
    ref_grads = [
        torch.zeros_like(w) if g is None else g for w, g in zip(wrt, ref_grads, strict=True)
    ]

    fused = run(cell, x, h0, weights, seed, probe)
    slow_path = run(eager, x, h0, [w.detach().requires_grad_() for w in weights], seed, probe)
    names = [n for n, _ in cell.named_parameters()] + ["x", "h0"]
    names += [f"weights[{i}]" for i in range(len(weights))]
    for label, (out, h, grads) in (("fused", fused), ("eager", slow_path)):
        torch.testing.assert_close(out, ref, **TOL, msg=f"{label} outputs")
        torch.testing.assert_close(h, ref[-1], **TOL, msg=f"{label} h")
        for name, g, r in zip(names, grads, ref_grads, strict=True):
            torch.testing.assert_close(
                g, r, **TOL, msg=lambda m, n=name, lb=label: f"{lb} {n}: {m}"
            )
    if cell.bn is not None:
        for module in (cell.bn, eager.bn):
            torch.testing.assert_close(module.running_mean, norm.mean, **TOL)
            torch.testing.assert_close(module.running_var, norm.var, **TOL)
            assert int(module.num_batches_tracked) == norm.count


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bn", [True, False], ids=["bn", "nobn"])
@pytest.mark.parametrize("nodes", [1, 3])
def test_fused_matches_eager_and_slow(nodes, bn, training, kernel):
    three_way(make_cell(nodes=nodes, bn=bn, training=training))


@pytest.mark.parametrize("prims", [("sigmoid",), ("relu", "none", "identity"), ("tanh", "relu")])
def test_fused_matches_with_other_primitive_sets(prims, kernel):
    three_way(make_cell(prims=prims))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_matches_with_grown_and_fixed_nodes(training, kernel):
    """Residual nodes with non-zero γ, and fixed nodes (one edge, one op) among searched ones."""
    cell = make_cell(nodes=3, grow=2, fix=[(2, (0, "relu")), (4, (3, "tanh"))], training=training)
    three_way(cell)


def test_fused_matches_without_dropout(kernel):
    three_way(make_cell(dropout=(0.0, 0.0)))


def test_fused_matches_eager_with_frozen_batchnorm_statistics(kernel):
    """A functional call that replaces BatchNorm's running buffers by ``None``, as the bilevel
    strategies' pure losses do (``Objective.functional``): batch statistics on every path."""
    cell = make_cell(training=True)
    eager = copy.deepcopy(cell)
    eager.fused = False
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    frozen = {f"bn.{name}": None for name in ("running_mean", "running_var", "num_batches_tracked")}
    results = []
    for module in (cell, eager):
        params = dict(module.named_parameters())
        torch.manual_seed(0)
        out = torch.func.functional_call(module, {**params, **frozen}, (x,))[0]
        fused = type(out.grad_fn).__name__ == "FusedDartsSequenceBackward"
        assert fused is (module is cell)
        results.append((out, torch.autograd.grad(out.pow(2).sum(), list(params.values()))))
    (out, grads), (want, wanted) = results
    torch.testing.assert_close(out, want, **TOL)
    for g, w in zip(grads, wanted, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def straight_through_sample(cell: DartsRNNSearchCell, choices: list[int | None]):
    """GDAS's sample (``strategies.gumbel``): per node a one-hot at ``choices[i]`` whose
    gradient reaches every entry of ``α`` through ``softmax(α)``; ``α`` as leaves."""
    alphas = [a.detach().clone().requires_grad_() for a in cell.arch]
    weights = []
    for alpha, c in zip(alphas, choices, strict=True):
        soft = torch.softmax(alpha.reshape(-1), 0)
        hot = torch.zeros_like(soft)
        if c is not None:
            hot[c] = 1.0
        weights.append((hot - soft.detach() + soft).reshape(alpha.shape))
    return alphas, SampledMixing(weights, choices)


@pytest.mark.parametrize("grow", [0, 1])
def test_a_sampled_mixing_in_training_runs_the_kernel_as_the_eager_loop(grow, kernel):
    """GDAS and random search: each node's sampled edge and op, ``none`` included, on the
    kernel under batch statistics; values and gradients (weights, ``x``, ``h0``, every ``α``)
    as the eager loop's one-op-per-node path, and ``None`` for a ``none`` node's weight."""
    cell = make_cell(nodes=4, grow=grow, fix=[(3, (1, "tanh"))])
    n_ops = len(cell.op_names)
    none = cell.op_names.index("none")
    # node 1: edge 0 relu; node 2: edge 1 none; node 3 fixed; node 4: edge 2 sigmoid
    choices = [cell.op_names.index("relu"), n_ops + none, None, 2 * n_ops + 1]
    choices += [0] * (len(cell.arch) - len(choices))  # a grown node: edge 0, the first op
    eager = copy.deepcopy(cell)
    eager.fused = False
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, B, N_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, D, generator=gen, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(T, B, D, generator=gen, dtype=torch.float64)
    results = []
    for module in (cell, eager):
        alphas, sample = straight_through_sample(module, choices)
        torch.manual_seed(6)
        out, h = module(x, h0, weights=sample)
        loss = (out * probe).sum() + (h * probe[-1]).sum()
        wrt = [*module.parameters(), x, h0, *alphas]
        results.append((out, torch.autograd.grad(loss, wrt, allow_unused=True)))
    (out, grads), (ref, ref_grads) = results
    assert type(out.grad_fn).__name__ == "FusedDartsSequenceBackward"
    assert type(ref.grad_fn).__name__ != "FusedDartsSequenceBackward"
    torch.testing.assert_close(out, ref, **TOL)
    names = [n for n, _ in cell.named_parameters()] + ["x", "h0"]
    names += [f"alpha[{i}]" for i in range(len(cell.arch))]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        assert (g is None) == (r is None), f"{name}: kernel {g}, eager {r}"
        if g is not None:
            torch.testing.assert_close(g, r, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert grads[names.index("node_weights.1")] is None  # the none node's


def test_a_sampled_mixing_without_batch_statistics_runs_eagerly():
    """The sampled nodes' ``Σ_{k≠c} w[k]`` has a gradient the kernel leaves out, exactly 0
    only under batch statistics: without BatchNorm, or in evaluation, the eager loop runs."""
    for cell in (make_cell(bn=False), make_cell(training=False)):
        _, sample = straight_through_sample(cell, [0] * len(cell.arch))
        out, _ = cell(torch.randn(T, B, N_IN, dtype=torch.float64), weights=sample)
        assert type(out.grad_fn).__name__ != "FusedDartsSequenceBackward"


def test_fused_passes_gradcheck(kernel):
    """Finite differences through the whole kernel, every differentiable input at once."""
    cell = make_cell(nodes=2, grow=1, fix=[(2, (1, "sigmoid"))])
    x = torch.randn(2, 2, N_IN, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    weights = [w.detach().requires_grad_() for w in cell.mixing_weights()]
    names = [name for name, _ in cell.named_parameters()]

    def fn(x, h0, *tensors):
        params = dict(zip(names, tensors[: len(names)], strict=True))
        torch.manual_seed(0)  # the same dropout masks at every evaluation
        mixing = list(tensors[len(names) :])
        return torch.func.functional_call(cell, params, (x, h0), {"weights": mixing})[0]

    leaves = [p.detach().clone().requires_grad_(p.requires_grad) for p in cell.parameters()]
    assert torch.autograd.gradcheck(fn, (x, h0, *leaves, *weights), eps=1e-6, atol=1e-5)


def test_fused_path_is_taken_and_eager_is_selectable(kernel):
    cell = make_cell()
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    out, _ = cell(x)
    assert type(out.grad_fn).__name__ == "FusedDartsSequenceBackward"
    assert (out.grad_fn.native is not None) == (kernel == "native")
    cell.fused = False
    out, _ = cell(x)
    assert type(out.grad_fn).__name__ != "FusedDartsSequenceBackward"
    assert build("darts_rnn", 2, 4, 2, fused=False).fused is False
    assert build("darts_rnn", 2, 4, 2).fused is True


def test_no_grad_forward_matches(kernel):
    cell = make_cell()
    eager = copy.deepcopy(cell)
    eager.fused = False
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)
        a = cell(x)[0]
        torch.manual_seed(1)
        b = eager(x)[0]
    torch.testing.assert_close(a, b, **TOL)


def test_torch_func_transforms_fall_back_to_eager():
    """Second-order methods (hypergrad) differentiate through torch.func: same gradient.
    (No BatchNorm: its running-statistics update is an in-place write torch.func refuses.)"""
    cell = make_cell(bn=False, dropout=(0.0, 0.0))
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    params = {k: v.detach() for k, v in cell.named_parameters()}

    def loss(p):
        return torch.func.functional_call(cell, p, (x,))[0].pow(2).sum()

    by_func = torch.func.grad(loss)(params)
    by_autograd = torch.autograd.grad(cell(x)[0].pow(2).sum(), list(cell.parameters()))
    for (name, _), g in zip(cell.named_parameters(), by_autograd, strict=True):
        torch.testing.assert_close(by_func[name], g, **TOL)


KERNEL_CELLS = {
    "darts_supernet": lambda: build("darts_rnn", N_IN, D, 2),
    "two_input_supernet": lambda: build("two_input", N_IN, D, 2),
    "darts_cell": lambda: cells.build(KNOWN["darts_v2"], N_IN, D),
    "two_input_cell": lambda: cells.build(TWO_INPUT_GATED, N_IN, D),
}


@pytest.mark.parametrize("name", list(KERNEL_CELLS))
def test_double_backward_through_any_kernel_is_refused(name):
    """Every sequence kernel's backward is hand-written and once-only: create_graph must fail
    loudly rather than return a gradient whose graph silently lacks the kernel's part, and the
    eager path (``fused=False``) must then give the second-order graph."""
    cell = KERNEL_CELLS[name]().double()
    weight = next(cell.parameters())
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(cell(x)[0].sum(), weight, create_graph=True)
    cell.fused = False
    (grad,) = torch.autograd.grad(cell(x)[0].sum(), weight, create_graph=True)
    assert grad.requires_grad
