"""Memory-lean search on darts_cnn: partial channels (PC-DARTS) against a brute-force loop,
K = 1 against the plain supernet, cell recomputation against none, edge normalisation's β
saved, resumed and scoring the derived edges, and the options' bad values refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import morphnas, run_cli
from morphnas import spaces
from morphnas.bench.memory import CNN_VARIANTS, Checkpointed, bench_cnn
from morphnas.bench.workloads import CnnConfig
from morphnas.engine.checkpoint import load
from test_darts_cnn import _images


def _net(**options):
    """Three cells (normal, reduction, normal) of two steps, C = 8, float64, α and β drawn far
    from uniform so that every weight matters."""
    torch.manual_seed(0)
    net = spaces.build("darts_cnn", 2, 8, 3, steps=2, **options).double()
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_()
    return net


def _brute_force(net, x):
    """PC-DARTS's computation written out: per edge, the full mixed op (every op, ``none``
    included) on the state's channels selected by an index, the others passed through (a 2×2
    max pool on a strided edge), the two concatenated and permuted channel by channel
    (``out[c·K + g] = in[g·C/K + c]``), and the node the ``softmax(β)``-weighted sum of its
    edges."""
    weights = net.mixing_weights()
    s0 = s1 = net.stem(x)
    for cell in net.cells:
        base = net.cell_alpha_index(cell)
        k, channels = cell.partial, cell.channels
        group = channels // k
        chosen = torch.arange(group)
        passed = torch.arange(group, channels)
        order = torch.tensor([g * group + c for c in range(group) for g in range(k)])
        states = cell.inputs(s0, s1)
        for i in range(net.steps):
            number = base + i + 1
            w = weights[number - 1]
            b = (
                torch.softmax(net.betas[number - 1], 0)
                if net.betas and number not in net.fixed
                else None
            )
            fixed = net.fixed.get(number)
            node = 0.0
            for j, state in enumerate(states):
                if fixed is not None and j - 1 not in fixed.inputs:
                    continue  # a fixed node keeps its two edges, bypasses included
                mixed = sum(
                    w[j, op] * cell.op(name, i, j, state[:, chosen], None)
                    for op, name in enumerate(net.op_names)
                )
                edge = mixed
                if k > 1:
                    rest = state[:, passed]
                    if cell.stride(j) == 2:
                        rest = F.max_pool2d(rest, 2, 2, ceil_mode=True)
                    edge = torch.cat([mixed, rest], 1)[:, order]
                node = node + (1.0 if b is None else b[j]) * edge
            states.append(node)
        s0, s1 = s1, torch.cat(states[-net.multiplier :], 1)
    return s1.mean(dim=(2, 3))


def _grads(net, out):
    """Gradients of every trainable parameter (zeros for the edges a pruned node dropped)."""
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize(
    "options",
    [
        {"partial_channels": 2},
        {"partial_channels": 4},
        {"partial_channels": 2, "edge_normalisation": False},
        {"partial_channels": 1, "edge_normalisation": True},
    ],
    ids=["k2", "k4", "k2-no-edge-norm", "k1-edge-norm"],
)
def test_partial_channels_compute_pc_darts_mixed_edges(options):
    net = _net(**options)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)  # odd: the bypass pool rounds up
    for pruned in (False, True):  # searched nodes, then every node fixed to its derived edges
        if pruned:
            net.prune()
        ours, brute = net(x)[0], _brute_force(net, x)
        torch.testing.assert_close(ours, brute, rtol=1e-10, atol=1e-12)
        for a, b in zip(_grads(net, ours), _grads(net, brute), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(net.reference_forward(x), brute, rtol=1e-10, atol=1e-12)


def test_one_partial_channel_is_the_plain_supernet():
    torch.manual_seed(0)
    plain = spaces.build("darts_cnn", 2, 8, 3, steps=2)
    torch.manual_seed(0)
    k1 = spaces.build("darts_cnn", 2, 8, 3, steps=2, partial_channels=1, recompute=False)
    assert plain.state_dict().keys() == k1.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, k1.state_dict()[key]), key
    assert len(k1.arch_parameters()) == len(plain.arch_parameters()) == 4  # no β
    x = torch.randn(4, 2, 8, 8)
    assert torch.equal(plain(x)[0], k1(x)[0])


def _saved_bytes(net, x):
    """Bytes autograd keeps for backward during ``net``'s forward (inputs to the checkpointed
    cells only, under recomputation)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)[0]
    return out, total


@pytest.mark.parametrize("k", [1, 2])
def test_recompute_gives_the_same_loss_gradients_and_running_statistics(k):
    plain, lean = _net(partial_channels=k), _net(partial_channels=k, recompute=True)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    (out_plain, kept_plain), (out_lean, kept_lean) = _saved_bytes(plain, x), _saved_bytes(lean, x)
    assert kept_lean < kept_plain / 3  # the cells' insides were not kept ...
    torch.testing.assert_close(out_lean, out_plain, rtol=0, atol=0)
    for a, b in zip(_grads(lean, out_lean), _grads(plain, out_plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)  # ... but recomputed
    for key, value in plain.state_dict().items():  # BatchNorm statistics moved once, not twice
        torch.testing.assert_close(lean.state_dict()[key], value, rtol=0, atol=0)


def test_a_checkpointed_recurrent_sequence_redraws_the_same_dropout_masks():
    """The recurrent supernet's fused kernel under ``checkpoint`` (what the memory bench
    measures): with variational dropout on, the recomputation sees the forward's masks."""
    torch.manual_seed(1)
    cell = spaces.build("darts_rnn", 3, 6, 3, dropout_x=0.5, dropout_h=0.5).double()
    wrapped = Checkpointed(cell)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    results = []
    for module in (cell, wrapped):
        torch.manual_seed(7)
        out = module(x)[0]
        results.append((out, _grads(cell, out)))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_memory_bench_measures_every_cnn_variant():
    result = bench_cnn(CnnConfig(batch=2, channels=1, image=4, cells=1, hidden=4), 1, 1)
    for name in CNN_VARIANTS:
        assert result[name]["seconds"] > 0 and result[name]["peak_mb"] is not None


def test_edge_normalisation_scores_derived_edges_by_beta_times_alpha():
    net = _net(partial_channels=2)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.zero_()
        # Normal node 2 (three incoming edges): α prefers sep_conv_3x3 on edges 0 and 1, weakly
        # on edge 2; β prefers edge 2 by far. PC-DARTS's score softmax(β)_j · softmax(α_j)_k
        # keeps edges 2 and 0 (edge 0 beats edge 1 on β); α alone would keep 0 and 1.
        sep = net.op_names.index("sep_conv_3x3")
        net.arch[1][0, sep] = net.arch[1][1, sep] = 3.0
        net.arch[1][2, sep] = 1.0
        net.betas[1].copy_(torch.tensor([1.0, 0.0, 4.0]))
    assert net.derive().nodes[1].inputs == (-1, 1)  # rows 0 and 2: states -1 and 1
    clone = _net(partial_channels=2)
    clone.load_state_dict(net.state_dict())
    assert torch.equal(clone.betas[1], net.betas[1]) and clone.derive() == net.derive()
    assert {id(b) for b in net.betas} <= {id(p) for p in net.arch_parameters()}
    assert not {id(b) for b in net.betas} & {id(p) for p in net.weight_parameters()}


@pytest.mark.long  # three CLI processes (whole, killed, resumed)
def test_a_killed_partial_channel_search_resumes_with_its_beta(tmp_path):
    """SIGKILL mid-search with partial channels and recomputation, then --resume: the same
    genotype and the same searched β as the run that never stopped."""
    args = [
        "search", "--task", "classify", "--images", str(_images(tmp_path)), "--nodes", "2",
        "--hidden", "4", "--epochs", "2", "--retrain-epochs", "1", "--threads", "1", "--json",
        "--set", "space.options.steps=1", "--set", "space.options.partial_channels=2",
        "--set", "space.options.recompute=true", "--set", "search.batch_size=16",
        "--set", "train.batch_size=16", "--set", "train.baselines=[]",
    ]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert morphnas(*args, "--out", str(whole)).returncode == 0
    assert morphnas(*args, "--out", str(cut), crash="step:3").returncode == -9
    resumed = morphnas("search", "--resume", str(cut), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((cut / "genotype.json").read_text()) == json.loads(
        (whole / "genotype.json").read_text()
    )
    model = [load(run / "checkpoints" / "search_last.pt")["model"] for run in (whole, cut)]
    betas = sorted(k for k in model[0] if k.startswith("cell.betas."))
    assert betas and betas == sorted(k for k in model[1] if k.startswith("cell.betas."))
    for key in betas:
        assert torch.equal(model[0][key], model[1][key]), key
        assert not torch.allclose(model[0][key], torch.zeros(()), atol=1e-2)  # it was searched


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["space.options.partial_channels=3"], "must divide space.hidden"),
        (["space.options.partial_channels=0"], "partial_channels must be at least 1"),
        (["space.options.partial_channels=2", "search.strategy=dnal"], "edge_normalisation"),
        (["space.options.recompute=true", "search.order=2"], "hypergradient"),
    ],
)
def test_bad_memory_lean_options_are_one_line_user_errors(tmp_path, sets, fragment):
    args = ["search", "--task", "classify", "--images", str(_images(tmp_path)), "--hidden", "4"]
    for item in sets:
        args += ["--set", item]
    code, lines = run_cli(*args, "--out", str(tmp_path / "run"))
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "run").exists()
