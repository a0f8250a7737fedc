"""The fused supernets against slow references written straight from spec/morphism.md §2.1–2.2.

Every reference below loops per time step, per node, per edge and per op, and computes each op from
its formula; nothing is borrowed from the library except the parameters it reads. Outputs and
gradients (every parameter, the input and the initial state) must agree.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor

from conftest import SEQUENCE_SPACES
from morphnas.cells import DartsRNNCell, TwoInputCell
from morphnas.genotype import DARTS_PRIMITIVES, KNOWN, TWO_INPUT_OPS, Genotype, Node
from morphnas.spaces import (
    SPACES,
    DartsCNNSearchNetwork,
    DartsRNNSearchCell,
    SearchSpace,
    TwoInputSearchCell,
    build,
)
from morphnas.spaces.base import SampledMixing
from morphnas.spaces.two_input import input_pairs

T, B = 4, 3
TOL64 = dict(rtol=1e-5, atol=1e-5)
# BN on a batch of 3 amplifies float32 rounding: a different summation order alone (the two-input
# kernel's, at one thread) moved one input_weight gradient entry of ~0.5 by 7.8e-4. The formulas
# are checked in float64 (TOL64).
TOL32 = dict(rtol=1e-3, atol=1e-3)

ACT = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "identity": lambda z: z,
}
SQUASH = {"identity": lambda z: z, "tanh": torch.tanh}
ADD_ACT = {
    "add_tanh": torch.tanh,
    "add_sigmoid": torch.sigmoid,
    "add_relu": torch.relu,
    "add_identity": lambda z: z,
}


# --------------------------------------------------------------------------------------------
# Slow references
# --------------------------------------------------------------------------------------------


class SlowBatchNorm:
    """BatchNorm1d without affine, from its definition, with its own copy of the running stats."""

    def __init__(self, bn: torch.nn.BatchNorm1d | None, training: bool) -> None:
        self.enabled = bn is not None
        self.training = training
        if bn is not None:
            self.eps, self.momentum = bn.eps, bn.momentum
            self.mean = bn.running_mean.clone()
            self.var = bn.running_var.clone()
            self.count = int(bn.num_batches_tracked)

    def __call__(self, s: Tensor) -> Tensor:
        if not self.enabled:
            return s
        if not self.training:
            return (s - self.mean) / torch.sqrt(self.var + self.eps)
        n = s.shape[0]
        mean = s.sum(0) / n
        var = ((s - mean) ** 2).sum(0) / n
        with torch.no_grad():
            m = self.momentum
            self.mean = (1 - m) * self.mean + m * mean
            self.var = (1 - m) * self.var + m * var * n / (n - 1)
            self.count += 1
        return (s - mean) / torch.sqrt(var + self.eps)

    def check_against(self, bn: torch.nn.BatchNorm1d | None) -> None:
        if bn is None:
            return
        torch.testing.assert_close(bn.running_mean, self.mean, **TOL64)
        torch.testing.assert_close(bn.running_var, self.var, **TOL64)
        assert int(bn.num_batches_tracked) == self.count


def draw_masks(
    batch: int, input_size: int, hidden: int, p_x: float, p_h: float, like: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """Variational masks as documented: x's mask first, then h's, each bernoulli(keep) / keep."""

    def one(size: int, p: float) -> Tensor | None:
        if p <= 0:
            return None
        keep = 1 - p
        return torch.empty(batch, size, dtype=like.dtype).bernoulli_(keep) / keep

    m_x = one(input_size, p_x)
    m_h = one(hidden, p_h)
    return m_x, m_h


def _mask(v: Tensor, m: Tensor | None) -> Tensor:
    return v if m is None else v * m


def slow_darts(cell, x, h0=None, weights=None, masks=(None, None), bn=None, fresh_masks=None):
    """DARTS recurrent search cell, one edge and one primitive at a time (spec §2.1).

    ``fresh_masks`` (a callable) draws new masks every time step: the negative control.
    """
    steps, batch, _ = x.shape
    d = cell.hidden_size
    n_nodes = len(cell.node_weights)
    names = cell.op_names
    if weights is None:
        weights = [torch.softmax(a, dim=-1) for a in cell.arch]
    bn = bn if bn is not None else SlowBatchNorm(cell.bn, cell.training)
    m_x, m_h = masks
    w0 = cell.init_weight  # rows: x first, then h
    h = torch.zeros(batch, d, dtype=x.dtype) if h0 is None else h0
    outs = []
    for t in range(steps):
        if fresh_masks is not None:
            m_x, m_h = fresh_masks()
        pre = torch.cat([_mask(x[t], m_x), _mask(h, m_h)], dim=-1) @ w0
        c0, g0 = torch.sigmoid(pre[:, :d]), torch.tanh(pre[:, d:])
        states = [bn(h + c0 * (g0 - h))]
        for i in range(n_nodes):
            w_i = cell.node_weights[i]
            p = weights[i]
            assert p.shape == (i + 1, len(names))
            total = torch.zeros(batch, d, dtype=x.dtype)
            for j in range(i + 1):
                s_j = states[j]
                cg = _mask(s_j, m_h) @ w_i
                c_ij, g_ij = torch.sigmoid(cg[:, :d]), cg[:, d:]
                for k, name in enumerate(names):
                    if name == "none":
                        continue
                    edge = s_j + c_ij * (ACT[name](g_ij) - s_j)
                    total = total + p[j, k] * edge
            states.append(bn(total))
        h = sum(states[1:]) / n_nodes
        outs.append(h)
    return torch.stack(outs), h


def slow_joint_softmax(alpha: Tensor) -> Tensor:
    """One softmax over every entry of a node's ``α``, from the definition."""
    e = torch.exp(alpha - alpha.max())
    return e / e.sum()


def slow_input_choice(
    i: int, p: Tensor, states: dict, first: int = -1
) -> tuple[Tensor, Tensor, Tensor]:
    """Input choice (``wiring: search``), pair by pair: row ``r`` of ``p`` is the ordered pair
    ``(a_r, b_r)`` of distinct states among ``first .. i-1`` (``first`` -2 when the cell carries
    ``c``); each slot reads the states weighted by the mass of the rows that put them there, the
    ops are weighted by their column mass, both divided by the node's total mass where it
    exceeds one."""
    pairs = [(a, b) for a in range(first, i) for b in range(first, i) if a != b]
    assert p.shape[0] == len(pairs)
    mass = p.sum().clamp_min(1.0)  # the total, where over one
    a_mix = torch.zeros_like(states[-1])
    b_mix = torch.zeros_like(states[-1])
    for r, (ja, jb) in enumerate(pairs):
        share = p[r].sum() / mass
        a_mix = a_mix + share * states[ja]
        b_mix = b_mix + share * states[jb]
    ops = torch.stack([p[:, k].sum() for k in range(p.shape[1])]) / mass
    return a_mix, b_mix, ops


def slow_two_input(cell, x, h0=None, weights=None, masks=(None, None), bn=None, c0=None):
    """Two-input supernet, one node and one op at a time (spec §2.2).

    ``h_t`` is the last node or the mean of the nodes, then squashed by ``output_activation``;
    the squashed value is what the next step reads as ``h_{t-1}``. A cell with a
    ``cell_state`` also reads node ``cell_state``'s previous value as state -2 (from ``c0``, or
    zero) and returns ``(outputs, h, c)``.
    """
    steps, batch, _ = x.shape
    d = cell.hidden_size
    n_nodes = len(cell.node_weights)
    names = cell.op_names
    add_names = [n for n in names if n in ADD_ACT]
    search = cell.wiring == "search"
    if weights is None:
        softmax = slow_joint_softmax if search else (lambda a: torch.softmax(a, dim=-1))
        weights = [softmax(a) for a in cell.arch]
    bn = bn if bn is not None else SlowBatchNorm(cell.bn, cell.training)
    m_x, m_h = masks
    h = torch.zeros(batch, d, dtype=x.dtype) if h0 is None else h0
    carried = cell.cell_state
    c = torch.zeros(batch, d, dtype=x.dtype) if c0 is None else c0
    outs = []
    for t in range(steps):
        u = _mask(x[t], m_x) @ cell.input_weight + cell.input_bias
        states = {-1: u, 0: _mask(h, m_h)}
        if carried is not None:
            states[-2] = c
        for i in range(1, n_nodes + 1):
            nw = cell.node_weights[i - 1]
            p = weights[i - 1]
            if search:
                a, b, p = slow_input_choice(i, p, states, -2 if carried is not None else -1)
            else:
                a = states[i - 1]
                b = states[i - 2] if cell.wiring == "chain" else states[-1]
            assert p.shape == (len(names),)
            total = torch.zeros(batch, d, dtype=x.dtype)
            for k, name in enumerate(names):
                if name == "none":
                    o = torch.zeros(batch, d, dtype=x.dtype)
                elif name in ADD_ACT:
                    if cell.weight_sharing == "per_op":
                        q = add_names.index(name)
                        cols = slice(q * d, (q + 1) * d)
                    else:
                        assert nw.add_weight.shape == (2 * d, d)
                        cols = slice(0, d)
                    A, Bm = nw.add_weight[:d, cols], nw.add_weight[d:, cols]
                    o = ADD_ACT[name](a @ A + b @ Bm)
                elif name == "hadamard":
                    o = a * b
                elif name == "add":
                    o = a + b
                elif name == "highway":
                    C, H = nw.highway_weight[:, :d], nw.highway_weight[:, d:]
                    o = a + torch.sigmoid(b @ C) * (torch.tanh(b @ H) - a)
                else:
                    raise AssertionError(name)
                total = total + p[k] * o
            states[i] = bn(total)
        nodes = [states[i] for i in range(1, n_nodes + 1)]
        h = nodes[-1] if cell.output == "last" else sum(nodes) / n_nodes
        h = SQUASH[cell.output_activation](h)
        if carried is not None:
            c = states[carried]
            if cell.cell_bound is not None:
                c = cell.cell_bound * torch.tanh(c / cell.cell_bound)
        outs.append(h)
    if carried is not None and c0 is not None:
        return torch.stack(outs), h, c
    return torch.stack(outs), h


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def grads(out: Tensor, h: Tensor, wrt: list[Tensor]) -> list[Tensor]:
    gen = torch.Generator().manual_seed(123)
    r1 = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    r2 = torch.randn(h.shape, generator=gen, dtype=h.dtype)
    loss = (out * r1).sum() + (h * r2).sum()
    gs = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, gs, strict=True)]


def randomise_bn(cell) -> None:
    """Give eval-mode BatchNorm non-trivial running statistics."""
    if cell.bn is not None:
        gen = torch.Generator().manual_seed(7)
        cell.bn.running_mean.copy_(0.3 * torch.randn(cell.hidden_size, generator=gen))
        cell.bn.running_var.copy_(0.5 + torch.rand(cell.hidden_size, generator=gen))


def inputs(n_in: int, d: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, n_in, generator=gen, dtype=dtype).requires_grad_()
    h0 = (0.5 * torch.randn(B, d, generator=gen, dtype=dtype)).requires_grad_()
    return x, h0


def compare(cell, slow, x, h0, tol, weights=None, seed=0, fused_weights=None):
    """Fused vs slow: outputs, gradients w.r.t. every parameter, x, h0 (and custom weights)."""
    params = list(cell.parameters())
    extra = list(weights) if weights is not None else []
    wrt = [*params, x, h0, *extra]
    slow_bn = SlowBatchNorm(cell.bn, cell.training)

    torch.manual_seed(seed)
    m_x, m_h = draw_masks(B, cell.input_size, cell.hidden_size, cell.dropout_x, cell.dropout_h, x)
    if not cell.training:
        m_x = m_h = None
    ref_out, ref_h = slow(cell, x, h0, weights=weights, masks=(m_x, m_h), bn=slow_bn)
    ref_g = grads(ref_out, ref_h, wrt)

    torch.manual_seed(seed)
    out, h = cell(x, h0, weights=weights if fused_weights is None else fused_weights)
    g = grads(out, h, wrt)

    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(h, ref_h, **tol)
    torch.testing.assert_close(h, out[-1], rtol=0, atol=0)
    names = [n for n, _ in cell.named_parameters()] + ["x", "h0"] + [f"w{i}" for i in extra]
    for name, a, b in zip(names, g, ref_g, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
    slow_bn.check_against(cell.bn)
    return out


def make_darts(n_in, d, nodes, prims, bn, training, dtype=torch.float64, **kw):
    torch.manual_seed(11)
    cell = DartsRNNSearchCell(n_in, d, nodes=nodes, primitives=prims, batchnorm=bn, **kw)
    with torch.no_grad():  # non-trivial architecture parameters
        for a in cell.arch:
            a.normal_()
    cell = cell.to(dtype)
    randomise_bn(cell)
    cell.train(training)
    return cell


def make_two(n_in, d, nodes, ops, wiring, output, sharing, bn, training, dtype=torch.float64, **kw):
    torch.manual_seed(12)
    cell = TwoInputSearchCell(
        n_in,
        d,
        nodes=nodes,
        ops=ops,
        wiring=wiring,
        output=output,
        weight_sharing=sharing,
        batchnorm=bn,
        **kw,
    )
    with torch.no_grad():
        for a in cell.arch:
            a.normal_()
        cell.input_bias.normal_()
    cell = cell.to(dtype)
    randomise_bn(cell)
    cell.train(training)
    return cell


DARTS_PRIM_SETS = [
    DARTS_PRIMITIVES,
    ("tanh", "relu", "sigmoid", "identity"),  # no 'none'
    ("none", "sigmoid"),
    ("identity",),  # a single op
    ("relu", "none", "tanh"),  # 'none' not first
]
TWO_OP_SETS = [
    TWO_INPUT_OPS,
    ("add_tanh", "add_sigmoid", "add_relu", "add_identity", "hadamard", "add", "highway"),
    ("hadamard",),
    ("none", "highway", "add_relu"),
    ("add_sigmoid", "add", "add_tanh"),
]
SIZES = [(3, 5), (5, 2)]  # (input_size, hidden)


# --------------------------------------------------------------------------------------------
# DARTS recurrent search cell
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bn", [True, False], ids=["bn", "nobn"])
@pytest.mark.parametrize("prims", DARTS_PRIM_SETS, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("nodes", [1, 2, 5])
def test_darts_fused_matches_slow(nodes, prims, bn, training):
    n_in, d = SIZES[nodes % 2]
    cell = make_darts(n_in, d, nodes, prims, bn, training)
    x, h0 = inputs(n_in, d)
    compare(cell, slow_darts, x, h0, TOL64)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("nodes", [1, 3])
def test_darts_float32(nodes, training):
    cell = make_darts(4, 5, nodes, DARTS_PRIMITIVES, True, training, dtype=torch.float32)
    x, h0 = inputs(4, 5, dtype=torch.float32)
    compare(cell, slow_darts, x, h0, TOL32)


def test_darts_default_h0_is_zero():
    cell = make_darts(3, 5, 2, DARTS_PRIMITIVES, True, True)
    x, _ = inputs(3, 5)
    out, h = cell(x)
    ref_out, ref_h = slow_darts(cell, x, None)
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(h, ref_h, **TOL64)


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "nobn"])
@pytest.mark.parametrize("nodes", [1, 3])
def test_darts_dropout_masks_shared_across_time(nodes, bn):
    cell = make_darts(3, 5, nodes, DARTS_PRIMITIVES, bn, True, dropout_x=0.4, dropout_h=0.3)
    x, h0 = inputs(3, 5)
    out = compare(cell, slow_darts, x, h0, TOL64, seed=5)

    # Negative control: masks redrawn every step give a different answer, so the comparison
    # above is not vacuous and really pins "one mask per sequence".
    torch.manual_seed(5)

    def fresh():
        return draw_masks(B, 3, 5, 0.4, 0.3, x)

    fresh_out, _ = slow_darts(cell, x, h0, fresh_masks=fresh, bn=SlowBatchNorm(cell.bn, True))
    assert not torch.allclose(out, fresh_out)
    # And the masks matter at all in training mode.
    no_drop = copy.deepcopy(cell)
    no_drop.dropout_x = no_drop.dropout_h = 0.0
    assert not torch.allclose(out, no_drop(x, h0)[0])


@pytest.mark.parametrize("which", ["x", "h"])
def test_darts_single_dropout(which):
    kw = {"dropout_x": 0.5} if which == "x" else {"dropout_h": 0.5}
    cell = make_darts(3, 5, 2, DARTS_PRIMITIVES, False, True, **kw)
    x, h0 = inputs(3, 5)
    compare(cell, slow_darts, x, h0, TOL64, seed=9)


def test_darts_eval_ignores_dropout():
    cell = make_darts(3, 5, 3, DARTS_PRIMITIVES, True, False, dropout_x=0.5, dropout_h=0.5)
    x, h0 = inputs(3, 5)
    compare(cell, slow_darts, x, h0, TOL64)  # the reference draws no masks in eval mode
    plain = copy.deepcopy(cell)
    plain.dropout_x = plain.dropout_h = 0.0
    torch.manual_seed(0)
    a = cell(x, h0)[0]
    b = plain(x, h0)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # eval forward consumes no random numbers
    torch.manual_seed(3)
    cell(x, h0)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))


@pytest.mark.parametrize("kind", ["random", "onehot"])
@pytest.mark.parametrize("bn", [True, False], ids=["bn", "nobn"])
def test_darts_custom_weights(kind, bn):
    nodes = 4
    cell = make_darts(3, 5, nodes, DARTS_PRIMITIVES, bn, True)
    gen = torch.Generator().manual_seed(4)
    ws = []
    for i in range(1, nodes + 1):
        if kind == "random":
            w = torch.rand(i, len(DARTS_PRIMITIVES), generator=gen, dtype=torch.float64)
        else:
            w = torch.zeros(i, len(DARTS_PRIMITIVES), dtype=torch.float64)
            w[int(torch.randint(i, (1,), generator=gen)), 1 + (i % 4)] = 1.0
        ws.append(w.requires_grad_())
    x, h0 = inputs(3, 5)
    compare(cell, slow_darts, x, h0, TOL64, weights=ws)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_darts_onehot_equals_discrete_cell(seed, training):
    nodes, n_in, d = 4, 3, 5
    gen = torch.Generator().manual_seed(seed)
    acts = DARTS_PRIMITIVES[1:]
    genotype_nodes = []
    for i in range(1, nodes + 1):
        op = acts[int(torch.randint(4, (1,), generator=gen))]
        genotype_nodes.append(Node(op, (int(torch.randint(i, (1,), generator=gen)),)))
    genotype = Genotype("darts_rnn", tuple(genotype_nodes), output="mean")

    kw = dict(dropout_x=0.3, dropout_h=0.2)
    sup = make_darts(n_in, d, nodes, DARTS_PRIMITIVES, False, training, **kw)
    disc = DartsRNNCell(genotype, n_in, d, **kw).double().train(training)
    with torch.no_grad():
        disc.init_weight.copy_(sup.init_weight)
        for dw, sw in zip(disc.node_weights, sup.node_weights, strict=True):
            dw.copy_(sw)
    onehot = []
    for i, node in enumerate(genotype.nodes, start=1):
        w = torch.zeros(i, len(DARTS_PRIMITIVES), dtype=torch.float64)
        w[node.inputs[0], DARTS_PRIMITIVES.index(node.op)] = 1.0
        onehot.append(w)
    x, h0 = inputs(n_in, d)
    torch.manual_seed(8)
    out_sup, h_sup = sup(x, h0, weights=onehot)
    torch.manual_seed(8)
    out_disc, h_disc = disc(x, h0)
    torch.testing.assert_close(out_sup, out_disc, **TOL64)
    torch.testing.assert_close(h_sup, h_disc, **TOL64)


# --------------------------------------------------------------------------------------------
# Two-input supernet
# --------------------------------------------------------------------------------------------


MODES = [(False, True), (True, True), (True, False)]  # (batchnorm, training)


# (weight_sharing, output_activation): both values of each, not every pair, to keep it quick.
VARIANTS = [("per_op", "tanh"), ("per_node", "identity")]


@pytest.mark.parametrize("mode", MODES, ids=["nobn-train", "bn-train", "bn-eval"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
@pytest.mark.parametrize("output", ["last", "mean"])
@pytest.mark.parametrize("wiring", ["chain", "input"])
@pytest.mark.parametrize("ops", TWO_OP_SETS, ids=lambda o: "-".join(o))
@pytest.mark.parametrize("nodes", [1, 2, 5])
@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "eager"])
def test_two_input_matches_slow(fused, nodes, ops, wiring, output, variant, mode):
    """Both paths of the supernet, the hand-written sequence kernel and the eager loop."""
    bn, training = mode
    sharing, squash = variant
    n_in, d = SIZES[nodes % 2]
    cell = make_two(
        n_in,
        d,
        nodes,
        ops,
        wiring,
        output,
        sharing,
        bn,
        training,
        output_activation=squash,
        fused=fused,
    )
    x, h0 = inputs(n_in, d)
    compare(cell, slow_two_input, x, h0, TOL64)


@pytest.mark.parametrize("mode", MODES, ids=["nobn-train", "bn-train", "bn-eval"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
@pytest.mark.parametrize("output", ["last", "mean"])
@pytest.mark.parametrize("ops", TWO_OP_SETS, ids=lambda o: "-".join(o))
@pytest.mark.parametrize("nodes", [1, 4])
def test_input_choice_matches_slow(nodes, ops, output, variant, mode):
    """Input choice (``wiring: search``) against the pair-by-pair reference: outputs and the
    gradient of every parameter, the pair-by-op ``α`` included."""
    bn, training = mode
    sharing, squash = variant
    n_in, d = SIZES[nodes % 2]
    cell = make_two(
        n_in, d, nodes, ops, "search", output, sharing, bn, training, output_activation=squash
    )
    assert [a.shape for a in cell.arch] == [(i * (i + 1), len(ops)) for i in range(1, nodes + 1)]
    x, h0 = inputs(n_in, d)
    compare(cell, slow_two_input, x, h0, TOL64)


@pytest.mark.parametrize("kind", ["per-row", "unnormalised", "closed-gates"])
def test_input_choice_takes_any_mixing_weights(kind):
    """Mixing weights that are not one softmax over the node (a per-row softmax, DNAL's
    sigmoid gates, mostly closed ones) mean the same marginals: every entry divided by the
    node's total mass where it exceeds one."""
    nodes, ops = 3, TWO_INPUT_OPS
    cell = make_two(3, 5, nodes, ops, "search", "mean", "per_op", False, True)
    gen = torch.Generator().manual_seed(7)
    ws = []
    for a in cell.arch:
        w = torch.rand(a.shape, generator=gen, dtype=torch.float64)
        if kind == "per-row":
            w = w / w.sum(-1, keepdim=True)
        elif kind == "closed-gates":  # total mass below one
            w = w * 0.5 / w.sum()
        ws.append(w.requires_grad_())
    x, h0 = inputs(3, 5)
    compare(cell, slow_two_input, x, h0, TOL64, weights=ws)


# A cell with inputs no fixed wiring reaches: h and u at several nodes, a gate times a node.
CHOSEN_CELL = (
    Node("add_sigmoid", (-1, 0)),
    Node("add_tanh", (0, -1)),
    Node("hadamard", (1, 2)),
    Node("highway", (3, -1)),
    Node("add", (4, 0)),
)


def _pair_entry(cell: TwoInputSearchCell, i: int, node: Node) -> int:
    """The flat index of ``node``'s (pair, op) entry in node ``i``'s ``α``."""
    row = input_pairs(i, -1 if cell.cell_state is None else -2).index(node.inputs)
    return row * len(cell.op_names) + cell.op_names.index(node.op)


def _copy_into_discrete(sup: TwoInputSearchCell, disc: TwoInputCell, genotype: Genotype) -> None:
    d = sup.hidden_size
    add_names = [n for n in sup.op_names if n.startswith("add_")]
    with torch.no_grad():
        disc.input_weight.copy_(sup.input_weight)
        disc.input_bias.copy_(sup.input_bias)
        slot = 0
        for node, nw in zip(genotype.nodes, sup.node_weights, strict=True):
            if node.op in add_names:
                q = add_names.index(node.op)
                disc.node_weights[slot].copy_(nw.add_weight[:, q * d : (q + 1) * d])
                slot += 1
            elif node.op == "highway":
                disc.node_weights[slot].copy_(nw.highway_weight)
                slot += 1
        assert slot == len(disc.node_weights)


@pytest.mark.parametrize("how", ["one-hot", "sampled"])
@pytest.mark.parametrize("output", ["last", "mean"])
def test_input_choice_one_pair_and_op_is_the_discrete_cell(how, output):
    """A one-hot (pair, op) per node, dense or as a hard sample (GDAS), computes the discrete
    cell of that genotype; a sample's gradient still reaches every entry of every ``α``."""
    n_in, d = 3, 5
    genotype = Genotype("two_input", CHOSEN_CELL, output=output, output_activation="tanh")
    sup = make_two(
        n_in, d, len(CHOSEN_CELL), TWO_INPUT_OPS, "search", output, "per_op", False, True
    )
    disc = TwoInputCell(genotype, n_in, d).double()
    _copy_into_discrete(sup, disc, genotype)
    weights, choices = [], []
    for i, (node, alpha) in enumerate(zip(CHOSEN_CELL, sup.arch, strict=True), start=1):
        probs = torch.softmax(alpha.reshape(-1), 0)
        choice = _pair_entry(sup, i, node)
        hot = torch.zeros_like(probs)
        hot[choice] = 1.0
        weights.append((hot - probs.detach() + probs).reshape(alpha.shape))  # straight-through
        choices.append(choice)
    mixing = SampledMixing(weights, choices) if how == "sampled" else weights
    x, h0 = inputs(n_in, d)
    out_sup, h_sup = sup(x, h0, weights=mixing)
    out_disc, h_disc = disc(x, h0)
    torch.testing.assert_close(out_sup, out_disc, **TOL64)
    torch.testing.assert_close(h_sup, h_disc, **TOL64)
    out_sup.sum().backward()
    for alpha in sup.arch:
        assert alpha.grad is not None and bool((alpha.grad != 0).all())


# (nodes, cell_state): c from the first, a middle and the last node.
CARRIED = [(1, 1), (3, 2), (4, 4)]


@pytest.mark.parametrize("mode", MODES[:2], ids=["nobn-train", "bn-train"])
@pytest.mark.parametrize("output", ["last", "mean"])
@pytest.mark.parametrize(("nodes", "cell_state"), CARRIED)
def test_cell_state_matches_slow(nodes, cell_state, output, mode):
    """A supernet that carries ``c`` (``cell_state``) against the pair-by-pair reference:
    ``c_{t-1}`` is one more candidate state of every slot, node ``cell_state`` its next value."""
    bn, training = mode
    n_in, d = SIZES[nodes % 2]
    cell = make_two(
        n_in, d, nodes, TWO_INPUT_OPS, "search", output, "per_op", bn, training,
        cell_state=cell_state,
    )  # fmt: skip
    assert [a.shape[0] for a in cell.arch] == [(i + 2) * (i + 1) for i in range(1, nodes + 1)]
    x, h0 = inputs(n_in, d)
    compare(cell, slow_two_input, x, h0, TOL64)


@pytest.mark.parametrize("bound", [10.0, 0.5, None])
@pytest.mark.parametrize(("nodes", "cell_state"), CARRIED)
def test_cell_state_carried_across_calls(nodes, cell_state, bound):
    """``forward_with_state`` takes and returns ``(h, c)``, as a language model carries it
    across BPTT windows: outputs, the last ``(h, c)`` and the gradients of every parameter,
    ``x``, ``h0`` and ``c0`` against the reference."""
    n_in, d = SIZES[nodes % 2]
    cell = make_two(
        n_in, d, nodes, TWO_INPUT_OPS, "search", "mean", "per_node", False, False,
        cell_state=cell_state, cell_bound=bound,
    )  # fmt: skip
    x, h0 = inputs(n_in, d)
    c0 = torch.randn(B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    c0.requires_grad_()
    wrt = [*cell.parameters(), x, h0, c0]
    ref = slow_two_input(cell, x, h0, c0=c0)
    out, (h, c) = cell.forward_with_state(x, (h0, c0))
    for got, want in zip((out, h, c), ref, strict=True):
        torch.testing.assert_close(got, want, **TOL64)
    probe = [torch.randn_like(t) for t in ref]
    loss = sum((t * w).sum() for t, w in zip((out, h, c), probe, strict=True))
    ref_loss = sum((t * w).sum() for t, w in zip(ref, probe, strict=True))
    got, want = torch.autograd.grad(loss, wrt), torch.autograd.grad(ref_loss, wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL64)
    assert cell.forward_with_state(x, h0)[1][1].shape == (B, d)  # a bare h: c from zero


@pytest.mark.parametrize("how", ["one-hot", "sampled"])
def test_lstm_is_a_point_of_the_cell_state_supernet(how):
    """With ``cell_state=7`` and 9 nodes the supernet holds ``KNOWN["lstm"]``: one (pair, op)
    per node, dense or sampled, computes the discrete LSTM cell, ``(h, c)`` included, and a warm
    start at it derives it."""
    n_in, d, lstm = 3, 5, KNOWN["lstm"]
    sup = make_two(
        n_in, d, 9, TWO_INPUT_OPS, "search", "last", "per_op", False, True,
        output_activation="identity", cell_state=7, cell_bound=None,
    )  # fmt: skip
    disc = TwoInputCell(lstm, n_in, d).double()
    _copy_into_discrete(sup, disc, lstm)
    weights, choices = [], []
    for i, (node, alpha) in enumerate(zip(lstm.nodes, sup.arch, strict=True), start=1):
        choice = _pair_entry(sup, i, node)
        hot = torch.zeros(alpha.numel(), dtype=alpha.dtype)
        hot[choice] = 1.0
        weights.append(hot.reshape(alpha.shape))
        choices.append(choice)
    mixing = SampledMixing(weights, choices) if how == "sampled" else weights
    x, h0 = inputs(n_in, d)
    c0 = torch.randn(B, d, dtype=torch.float64)
    out_sup, (h_sup, c_sup) = sup.forward_with_state(x, (h0, c0), weights=mixing)
    out_disc, (h_disc, c_disc) = disc.forward_with_state(x, (h0, c0))
    for got, want in ((out_sup, out_disc), (h_sup, h_disc), (c_sup, c_disc)):
        torch.testing.assert_close(got, want, **TOL64)
    sup.prefer(lstm, 40.0)
    assert sup.derive() == lstm


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cell_state": 2, "wiring": "chain"}, r"cell_state needs wiring 'search'"),
        ({"cell_state": 4, "wiring": "search"}, r"cell_state 4 is not a node of a 3-node cell"),
        ({"cell_state": True, "wiring": "search"}, r"cell_state must be a node number"),
        ({"cell_state": 1, "wiring": "search", "cell_bound": 0.0}, r"cell_bound must be positive"),
    ],
)
def test_cell_state_refusals(options, message):
    with pytest.raises(ValueError, match=message):
        TwoInputSearchCell(3, 4, nodes=3, **options)


def test_cell_state_warm_start_must_match():
    """A warm start's cell carries what the supernet carries, or it is refused by name."""
    sup = TwoInputSearchCell(3, 4, nodes=9, wiring="search", output_activation="identity")
    with pytest.raises(ValueError, match=r"carries node 7 as its cell state and the supernet"):
        sup.prefer(KNOWN["lstm"], 5.0)


def test_input_choice_derive_hand_set():
    """The likeliest op with the likeliest pair of distinct inputs, both conditioned on an op
    other than ``none`` (a pair whose mass is on ``none`` is not chosen)."""
    ops = TWO_INPUT_OPS  # none add_tanh add_sigmoid add_relu add_identity hadamard add highway
    cell = TwoInputSearchCell(3, 4, nodes=3, ops=ops, wiring="search")
    with torch.no_grad():
        for a in cell.arch:
            a.zero_()
        pairs2 = input_pairs(2)
        cell.arch[0][input_pairs(1).index((0, -1)), ops.index("none")] = 9.0  # none: skipped
        cell.arch[0][input_pairs(1).index((-1, 0)), ops.index("add_sigmoid")] = 3.0
        cell.arch[1][pairs2.index((1, 0)), ops.index("hadamard")] = 6.0
        cell.arch[2][:, ops.index("highway")] = 1.0  # the op, whatever the pair
        cell.arch[2][input_pairs(3).index((2, -1)), ops.index("add_tanh")] = 2.0  # its pair
        cell.arch[2][input_pairs(3).index((1, 2)), 0] = 6.0  # mass on 'none' picks no inputs
    g = cell.derive()
    assert g.nodes == (
        Node("add_sigmoid", (-1, 0)),
        Node("hadamard", (1, 0)),
        Node("highway", (2, -1)),
    )
    options = cell.node_options(2, cell.mixing_weights()[1])
    scores = [score for score, _ in options]
    assert scores == sorted(scores, reverse=True)
    assert all(n.inputs[0] != n.inputs[1] and n.op != "none" for _, n in options)
    assert len(options) == (len(ops) - 1) * 3 * 2


@pytest.mark.parametrize("cell_state", [None, 2])
def test_input_choice_prune_keeps_the_chosen_inputs(cell_state):
    """A pruned node reads its chosen inputs: the pruned supernet is the derived cell (which
    carries the same ``c``)."""
    n_in, d = 3, 5
    sup = make_two(
        n_in, d, 3, TWO_INPUT_OPS, "search", "last", "per_op", False, False,
        cell_state=cell_state, cell_bound=None,
    )  # fmt: skip
    genotype = sup.derive()
    assert genotype.cell_state == cell_state
    sup.prune()
    assert [sup.fixed[i] for i in (1, 2, 3)] == list(genotype.nodes)
    for i in (1, 2, 3):
        hot = sup.mixing_weights()[i - 1]
        assert float(hot.reshape(-1)[_pair_entry(sup, i, genotype.nodes[i - 1])]) == 1.0
    disc = TwoInputCell(genotype, n_in, d).double().eval()
    with torch.no_grad():
        disc.input_weight.copy_(sup.input_weight)
        disc.input_bias.copy_(sup.input_bias)
        weights = [nw.weight for nw in sup.node_weights if nw.weight is not None]
        for target, source in zip(disc.node_weights, weights, strict=True):
            target.copy_(source)
    x, h0 = inputs(n_in, d)
    torch.testing.assert_close(sup(x, h0)[0], disc(x, h0)[0], **TOL64)


def test_two_input_eval_without_bn():
    cell = make_two(3, 5, 3, TWO_INPUT_OPS, "chain", "mean", "per_op", False, False)
    x, h0 = inputs(3, 5)
    compare(cell, slow_two_input, x, h0, TOL64)


@pytest.mark.parametrize("sharing", ["per_op", "per_node"])
def test_two_input_weight_shapes(sharing):
    d = 5
    ops = ("none", "add_tanh", "hadamard", "add_relu", "highway", "add_identity")
    cell = TwoInputSearchCell(3, d, nodes=2, ops=ops, weight_sharing=sharing)
    n_add = 3 if sharing == "per_op" else 1
    assert cell.input_weight.shape == (3, d)
    for nw in cell.node_weights:
        assert nw.add_weight.shape == (2 * d, n_add * d)
        assert nw.highway_weight.shape == (d, 2 * d)
    assert [a.shape for a in cell.arch] == [(len(ops),)] * 2
    no_weights = TwoInputSearchCell(3, d, nodes=1, ops=("hadamard", "add"))
    assert no_weights.node_weights[0].add_weight is None
    assert no_weights.node_weights[0].highway_weight is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("wiring", ["chain", "input"])
def test_two_input_float32(wiring, training):
    cell = make_two(
        4, 5, 3, TWO_INPUT_OPS, wiring, "mean", "per_op", True, training, dtype=torch.float32
    )
    x, h0 = inputs(4, 5, dtype=torch.float32)
    compare(cell, slow_two_input, x, h0, TOL32)


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "nobn"])
@pytest.mark.parametrize("wiring", ["chain", "input"])
def test_two_input_dropout_masks_shared_across_time(wiring, bn):
    cell = make_two(
        3, 5, 3, TWO_INPUT_OPS, wiring, "mean", "per_op", bn, True, dropout_x=0.4, dropout_h=0.3
    )
    x, h0 = inputs(3, 5)
    out = compare(cell, slow_two_input, x, h0, TOL64, seed=5)
    no_drop = copy.deepcopy(cell)
    no_drop.dropout_x = no_drop.dropout_h = 0.0
    assert not torch.allclose(out, no_drop(x, h0)[0])


@pytest.mark.parametrize("which", ["x", "h"])
def test_two_input_single_dropout(which):
    kw = {"dropout_x": 0.5} if which == "x" else {"dropout_h": 0.5}
    cell = make_two(3, 5, 2, TWO_INPUT_OPS, "chain", "last", "per_op", False, True, **kw)
    x, h0 = inputs(3, 5)
    compare(cell, slow_two_input, x, h0, TOL64, seed=9)


def test_two_input_eval_ignores_dropout():
    cell = make_two(
        3,
        5,
        3,
        TWO_INPUT_OPS,
        "input",
        "last",
        "per_node",
        True,
        False,
        dropout_x=0.5,
        dropout_h=0.5,
    )
    x, h0 = inputs(3, 5)
    compare(cell, slow_two_input, x, h0, TOL64)
    plain = copy.deepcopy(cell)
    plain.dropout_x = plain.dropout_h = 0.0
    torch.testing.assert_close(cell(x, h0)[0], plain(x, h0)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["random", "onehot"])
@pytest.mark.parametrize("sharing", ["per_op", "per_node"])
def test_two_input_custom_weights(kind, sharing):
    nodes, ops = 4, TWO_INPUT_OPS
    cell = make_two(3, 5, nodes, ops, "chain", "mean", sharing, True, True)
    gen = torch.Generator().manual_seed(4)
    ws = []
    for _ in range(nodes):
        if kind == "random":
            w = torch.rand(len(ops), generator=gen, dtype=torch.float64)
        else:
            w = torch.zeros(len(ops), dtype=torch.float64)
            w[int(torch.randint(1, len(ops), (1,), generator=gen))] = 1.0
        ws.append(w.requires_grad_())
    x, h0 = inputs(3, 5)
    compare(cell, slow_two_input, x, h0, TOL64, weights=ws)


# Together the two choices use every op but 'none'.
ONEHOT_CHOICES = [
    ("add_tanh", "add_sigmoid", "add_relu", "add_identity"),
    ("hadamard", "highway", "add", "add_relu"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("output", ["last", "mean"])
@pytest.mark.parametrize("wiring", ["chain", "input"])
@pytest.mark.parametrize("seed", [0, 1])
def test_two_input_onehot_equals_discrete_cell(seed, wiring, output, training):
    squash = ("tanh", "identity")[(seed + (wiring == "input")) % 2]
    nodes, n_in, d = 4, 3, 5
    ops = TWO_INPUT_OPS
    chosen = ONEHOT_CHOICES[seed]
    inputs_of = (lambda i: (i - 1, i - 2)) if wiring == "chain" else (lambda i: (i - 1, -1))
    genotype = Genotype(
        "two_input",
        tuple(Node(op, inputs_of(i)) for i, op in enumerate(chosen, start=1)),
        output=output,
        output_activation=squash,
    )
    kw = dict(dropout_x=0.3, dropout_h=0.2)
    sup = make_two(
        n_in,
        d,
        nodes,
        ops,
        wiring,
        output,
        "per_op",
        False,
        training,
        output_activation=squash,
        **kw,
    )
    disc = TwoInputCell(genotype, n_in, d, **kw).double().train(training)
    _copy_into_discrete(sup, disc, genotype)
    onehot = [torch.eye(len(ops), dtype=torch.float64)[ops.index(op)] for op in chosen]
    x, h0 = inputs(n_in, d)
    torch.manual_seed(8)
    out_sup, h_sup = sup(x, h0, weights=onehot)
    torch.manual_seed(8)
    out_disc, h_disc = disc(x, h0)
    torch.testing.assert_close(out_sup, out_disc, **TOL64)
    torch.testing.assert_close(h_sup, h_disc, **TOL64)


# --------------------------------------------------------------------------------------------
# derive()
# --------------------------------------------------------------------------------------------


def _set_arch(cell, rows) -> None:
    with torch.no_grad():
        for a, r in zip(cell.arch, rows, strict=True):
            a.copy_(torch.tensor(r, dtype=a.dtype))


def test_darts_derive_hand_set():
    cell = DartsRNNSearchCell(3, 4, nodes=3)  # primitives: none tanh relu sigmoid identity
    _set_arch(
        cell,
        [
            # node 1: 'none' is largest and must be skipped -> relu
            [[5.0, 1.0, 2.0, 0.0, 0.0]],
            # node 2: edge 0 has the larger non-none *logit* (tanh 4) but 'none' dominates its
            # softmax (p ~ 0.0025); edge 1's sigmoid has p ~ 0.83 -> (sigmoid, 1)
            [[10.0, 4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0, 0.0]],
            # node 3: predecessor 1, tanh
            [[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]],
        ],
    )
    g = cell.derive()
    assert g.space == "darts_rnn"
    assert g.output == "mean"
    assert g.nodes == (Node("relu", (0,)), Node("sigmoid", (1,)), Node("tanh", (1,)))


def test_darts_derive_without_none_and_reordered():
    cell = DartsRNNSearchCell(3, 4, nodes=2, primitives=("identity", "none", "tanh"))
    _set_arch(cell, [[[0.0, 9.0, 1.0]], [[2.0, 0.0, 0.0], [0.0, 0.0, 0.5]]])
    assert cell.derive().nodes == (Node("tanh", (0,)), Node("identity", (0,)))
    cell = DartsRNNSearchCell(3, 4, nodes=1, primitives=("sigmoid", "identity"))
    _set_arch(cell, [[[0.0, 0.1]]])
    assert cell.derive().nodes == (Node("identity", (0,)),)


@pytest.mark.parametrize("squash", ["tanh", "identity"])
@pytest.mark.parametrize("output", ["last", "mean"])
@pytest.mark.parametrize("wiring", ["chain", "input"])
def test_two_input_derive_hand_set(wiring, output, squash):
    ops = TWO_INPUT_OPS  # none add_tanh add_sigmoid add_relu add_identity hadamard add highway
    cell = TwoInputSearchCell(
        3, 4, nodes=3, ops=ops, wiring=wiring, output=output, output_activation=squash
    )
    _set_arch(
        cell,
        [
            [9.0, 0.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0],  # 'none' largest -> hadamard
            [0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # add_sigmoid
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1],  # highway
        ],
    )
    g = cell.derive()
    expect_inputs = [(0, -1), (1, 0), (2, 1)] if wiring == "chain" else [(0, -1), (1, -1), (2, -1)]
    assert g.space == "two_input"
    assert g.output == output
    assert g.output_activation == squash
    assert g.ops() == ["hadamard", "add_sigmoid", "highway"]
    assert [n.inputs for n in g.nodes] == expect_inputs


def test_two_input_derive_subset_without_none():
    cell = TwoInputSearchCell(3, 4, nodes=2, ops=("add", "hadamard"))
    _set_arch(cell, [[0.0, 1.0], [1.0, 0.0]])
    assert cell.derive().ops() == ["hadamard", "add"]


@pytest.mark.parametrize("space", SEQUENCE_SPACES)
def test_derived_genotype_builds_a_discrete_cell(space):
    from morphnas import cells

    cell = build(space, 3, 4, 3)
    g = cell.derive()
    disc = cells.build(g, 3, 4)
    out, h = disc(torch.randn(T, B, 3))
    assert out.shape == (T, B, 4) and h.shape == (B, 4)


# --------------------------------------------------------------------------------------------
# Parameters, state_dict, protocol, build
# --------------------------------------------------------------------------------------------


SPACE_CONFIGS = [
    ("darts_rnn", {}),
    ("darts_rnn", {"batchnorm": False, "primitives": ("tanh", "none")}),
    ("two_input", {}),
    ("two_input", {"weight_sharing": "per_node", "batchnorm": True}),
    ("two_input", {"ops": ("hadamard", "add")}),
]


@pytest.mark.parametrize(("space", "options"), SPACE_CONFIGS)
def test_arch_and_weight_parameters_partition(space, options):
    cell = build(space, 3, 4, 3, **options)
    arch = cell.arch_parameters()
    weights = cell.weight_parameters()
    ids_all = [id(p) for p in cell.parameters()]
    ids_arch = [id(p) for p in arch]
    ids_w = [id(p) for p in weights]
    assert len(ids_arch) == 3
    assert not set(ids_arch) & set(ids_w)
    assert sorted(ids_arch + ids_w) == sorted(ids_all)
    assert len(set(ids_all)) == len(ids_all)

    sd = cell.state_dict()
    arch_keys = sorted(k for k in sd if k.startswith("arch."))
    assert arch_keys == [f"arch.{i}" for i in range(3)]
    by_id = {id(p): n for n, p in cell.named_parameters()}
    assert sorted(by_id[i] for i in ids_arch) == arch_keys
    for i, p in enumerate(arch):
        assert torch.equal(sd[f"arch.{i}"], p.detach())
    assert all(not by_id[i].startswith("arch.") for i in ids_w)
    assert isinstance(cell, SearchSpace)


@pytest.mark.parametrize("space", list(SPACES))
def test_mixing_weights_are_softmax(space):
    cell = build(space, 3, 4, 3)
    for a, w in zip(cell.arch, cell.mixing_weights(), strict=True):
        torch.testing.assert_close(w, torch.exp(a) / torch.exp(a).sum(-1, keepdim=True))


def test_darts_arch_shapes_and_init():
    cell = DartsRNNSearchCell(3, 4, nodes=5)
    assert [tuple(a.shape) for a in cell.arch] == [(i, 5) for i in range(1, 6)]
    assert cell.init_weight.shape == (7, 8)
    assert all(w.shape == (4, 8) for w in cell.node_weights)
    assert all(a.abs().max() < 0.02 for a in cell.arch)  # 1e-3 * N(0, 1)


def test_build_returns_registered_spaces():
    assert isinstance(build("darts_rnn", 3, 4, 2), DartsRNNSearchCell)
    assert isinstance(build("two_input", 3, 4, 2), TwoInputSearchCell)
    assert isinstance(build("darts_cnn", 3, 4, 2), DartsCNNSearchNetwork)
    assert set(SPACES) == {"darts_rnn", "two_input", "darts_cnn"}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("nope", {}),
        ("DARTS_RNN", {}),
        ("darts_rnn", {"primitives": ("tanh", "swish")}),
        ("darts_rnn", {"primitives": ("none",)}),
        ("darts_rnn", {"primitives": ()}),
        ("darts_rnn", {"nodes": 0}),
        ("two_input", {"ops": ("hadamard", "conv")}),
        ("two_input", {"ops": ("none",)}),
        ("two_input", {"wiring": "dag"}),
        ("two_input", {"output": "max"}),
        ("two_input", {"output_activation": "relu"}),
        ("two_input", {"weight_sharing": "global"}),
        ("two_input", {"nodes": 0}),
        ("two_input", {"nodes": -1}),
    ],
)
def test_build_rejects_bad_name_or_options(name, options):
    opts = dict(options)
    nodes = opts.pop("nodes", 2)
    with pytest.raises(ValueError):
        build(name, 3, 4, nodes, **opts)


@pytest.mark.parametrize("value", [1.0, -0.1])
@pytest.mark.parametrize("space", SEQUENCE_SPACES)
def test_build_rejects_dropout_out_of_range(space, value):
    """A dropout probability must lie in [0, 1).

    Today neither space checks it: p = 1 builds, and a training forward returns NaN (the mask is
    bernoulli(0) / 0); p < 0 silently means no dropout; p > 1 fails only at forward time.
    """
    for option in ("dropout_x", "dropout_h"):
        with pytest.raises(ValueError, match="dropout"):
            build(space, 3, 4, 2, **{option: value})


def test_unknown_space_message_lists_choices():
    with pytest.raises(ValueError, match="darts_rnn"):
        build("nope", 3, 4, 2)


def test_variational_mask_scale():
    """Sanity of the reference's assumption: masks are 0 or 1/keep, one per (batch, unit)."""
    from morphnas.kernels.blocks import variational_mask

    like = torch.zeros(1, dtype=torch.float64)
    torch.manual_seed(0)
    m = variational_mask(200, 7, 0.25, like, True)
    assert m.shape == (200, 7)
    vals = set(m.unique().tolist())
    assert vals <= {0.0, 1 / 0.75}
    assert math.isclose(m.mean().item(), 1.0, abs_tol=0.1)
    assert variational_mask(3, 7, 0.25, like, False) is None
    assert variational_mask(3, 7, 0.0, like, True) is None
