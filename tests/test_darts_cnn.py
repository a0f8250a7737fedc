"""The darts_cnn space and the image-classification task: the supernet against its per-edge
specification, growth by appended cells, derivation, the genotype's CNN form, every strategy
and growth mode through the API, and the command line on bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_user_error, morphnas, without_times
from morphnas import api, cells, config, report, runs, strategies, tasks
from morphnas.cells.image_baselines import IMAGE_BASELINES, image_baseline
from morphnas.config import GrowthConfig
from morphnas.errors import UserError
from morphnas.genotype import CNN_OPS, Genotype, Node, from_json
from morphnas.growth import grow_checked
from morphnas.ops.cnn import reduction_cells
from morphnas.run_files import read_metrics
from morphnas.spaces import build
from morphnas.spaces.base import SampledMixing, Widening
from morphnas.spaces.darts_cnn import DartsCNNSearchNetwork
from morphnas.tasks.classification import ImageModel

GENOTYPE = Genotype(
    "darts_cnn",
    (
        Node(("sep_conv_3x3", "skip_connect"), (-1, 0)),
        Node(("max_pool_3x3", "dil_conv_5x5"), (0, 1)),
        Node(("skip_connect", "sep_conv_5x5"), (-1, 0)),
        Node(("avg_pool_3x3", "dil_conv_3x3"), (-1, 1)),
    ),
    output="concat",
)


def _supernet(cells_: int = 3, steps: int = 2, seed: int = 0) -> DartsCNNSearchNetwork:
    """A float64 supernet with random α (far from uniform, so every op's weight matters)."""
    torch.manual_seed(seed)
    net = build("darts_cnn", 2, 4, cells_, steps=steps).double()
    with torch.no_grad():
        for alpha in net.arch:
            alpha.normal_()
    return net


def _grads(value: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, params, allow_unused=False))


# --------------------------------------------------------------------------- supernet vs loop


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_supernet_equals_the_per_edge_loop_in_value_and_every_gradient(mode):
    """Shared pools and skips, one ReLU per state, ``none`` skipped: the same function and the
    same gradients (weights, α and the input) as every edge computing every op on its own."""
    net = _supernet()
    net.train(mode == "train")
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    projection = torch.randn(5, net.features, dtype=torch.float64)
    params = [*net.parameters(), x]
    fast = net(x)[0]
    slow = net.reference_forward(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for g_fast, g_slow in zip(
        _grads((fast * projection).sum(), params),
        _grads((slow * projection).sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in _grads(net(x)[0].sum(), list(net.arch)))


def test_a_sampled_mixing_runs_one_op_per_node_and_equals_its_one_hot_mixture():
    """GDAS / random search: the sampled (input, op) of each node alone, in value the dense
    mixture of the one-hot weights; every α entry still gets a gradient."""
    net = _supernet()
    net.train()
    n_ops = len(CNN_OPS)
    generator = torch.Generator().manual_seed(1)
    choices, weights = [], []
    for alpha in net.arch:
        rows = alpha.shape[0]
        c = int(torch.randint(rows, (1,), generator=generator)) * n_ops + int(
            torch.randint(1, n_ops, (1,), generator=generator)
        )
        hot = torch.zeros(alpha.numel(), dtype=alpha.dtype)
        hot[c] = 1.0
        soft = torch.softmax(alpha.reshape(-1), 0)
        weights.append((hot - soft.detach() + soft).reshape(alpha.shape))  # straight-through
        choices.append(c)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    calls = []
    for cell in net.cells:
        for node in cell.edges:
            for edge in node:
                for op in edge.values():
                    op.register_forward_hook(lambda *_: calls.append(1))
    sampled = net(x, weights=SampledMixing(weights, choices))[0]
    ran = len(calls)
    dense = net.reference_forward(x, [w.detach() for w in weights])
    torch.testing.assert_close(sampled, dense, rtol=1e-10, atol=1e-10)
    assert ran <= len(net.cells) * net.steps  # at most the one sampled op per node
    grads = _grads(sampled.sum(), list(net.arch))
    assert all(bool((g != 0).any()) for g in grads)


def test_fixed_nodes_run_their_two_edges_as_the_one_hot_mixture():
    net = _supernet()
    net.eval()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    net.prune()
    assert not net.arch_parameters() and all(not a.requires_grad for a in net.arch)
    torch.testing.assert_close(net(x)[0], net.reference_forward(x), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- growth


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("last_is_reduction", [False, True])
def test_appending_a_cell_leaves_the_output_unchanged(mode, last_is_reduction):
    """The appended normal cell is residual with γ = 0: the same output on random weights and
    inputs (float64, 1e-5; it is exact), also after a reduction cell (its inputs differ in
    size); the new parameters are returned, and γ gets a gradient so the cell can open."""
    net = _supernet(cells_=3 if last_is_reduction else 4)
    assert (len(net.cells) - 1 in reduction_cells(len(net.cells))) == last_is_reduction
    for p in net.weight_parameters():  # random weights, not the init
        p.data.normal_(0, 0.3)
    net.train(mode == "train")
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    before = net(x)[0].detach()
    count = len(list(net.parameters()))
    new = net.grow()
    after = net(x)[0]
    assert net.nodes == len(net.cells) and len(list(net.parameters())) == count + len(new)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert float((after.detach() - before).abs().max()) == 0.0
    (g_gamma,) = torch.autograd.grad(after.sum(), [new[-1]])
    assert float(g_gamma.abs().max()) > 0
    net.train()
    _, diff = grow_checked(net, x, GrowthConfig())  # the engine's checked growth, again
    assert diff == 0.0


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cells_", [1, 2, 4])
def test_widening_leaves_the_classifier_unchanged_and_equals_a_wider_build(mode, cells_):
    """Net2WiderNet on C: every stage (C, 2C, 4C), the stem, the factorized reductions, a grown
    cell's γ and the head's reader, on random weights and BatchNorm statistics (float64); the
    result has the shapes of a supernet built at the new width (what a resume builds)."""
    net = _supernet(cells_=cells_)
    net.grow()
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    model = ImageModel(net, 4).double()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    model.train(mode == "train")
    x = torch.randn(6, 2, 9, 9, dtype=torch.float64)
    before = model(x).detach()
    widening = Widening.random(4, 3, 0.05, torch.Generator().manual_seed(0))
    net.widen(widening)
    model.head.weight = net.widen_reader(model.head.weight, widening)
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)
    assert net.hidden_size == 7 and net.features == model.head.weight.shape[1]
    wider = build("darts_cnn", 2, 7, cells_, steps=2)
    wider.grow()
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert shapes == {k: v.shape for k, v in wider.state_dict().items()}


# --------------------------------------------------------------------------- derivation


def test_derive_keeps_the_two_strongest_edges_each_with_its_strongest_op():
    net = build("darts_cnn", 1, 4, 2, steps=2)
    with torch.no_grad():
        for alpha in net.arch:
            alpha.zero_()
        a = net.arch[1]  # normal node 2: rows c_k-2, c_k-1, s1
        a[:, 0] = 10.0  # none is never kept, however strong
        a[0, CNN_OPS.index("sep_conv_3x3")] = 3.0
        a[1, CNN_OPS.index("max_pool_3x3")] = 1.0
        a[2, CNN_OPS.index("dil_conv_5x5")] = 2.0
    genotype = net.derive()
    assert genotype.nodes[1] == Node(("sep_conv_3x3", "dil_conv_5x5"), (-1, 1))
    options = net.node_options(2, net.mixing_weights()[1])
    scores = [score for score, _ in options]
    assert scores == sorted(scores, reverse=True) and len(options) == 3  # C(3, 2) pairs
    assert options[1][1] == Node(("sep_conv_3x3", "max_pool_3x3"), (-1, 0))
    assert len(genotype.nodes) == 4 and genotype.output == "concat"


def test_a_derived_genotype_builds_a_network_with_fresh_weights():
    net = _supernet()
    genotype = net.derive()
    network = cells.build(genotype, 2, 4, cells=3)
    features, nothing = network(torch.randn(3, 2, 8, 8))
    assert nothing is None and features.shape == (3, network.features)
    assert network.features == net.features  # same shape of stack as the supernet
    stem = sum(p.numel() for p in network.stem.parameters())
    assert sum(p.numel() for p in network.parameters()) > stem


def test_fix_and_warm_start_refuse_a_node_the_supernet_cannot_hold():
    net = build("darts_cnn", 1, 4, 2, steps=2)
    with pytest.raises(ValueError, match="two different states"):
        net.fix(1, Node(("sep_conv_3x3", "skip_connect"), (0, 0)))
    with pytest.raises(ValueError, match="not among the supernet's ops"):
        net.fix(1, Node(("conv_7x7", "skip_connect"), (-1, 0)))
    net.prefer(Genotype("darts_cnn", GENOTYPE.nodes, output="concat"), 3.0)
    assert net.derive() == GENOTYPE


# --------------------------------------------------------------------------- genotype


def test_the_cnn_genotype_round_trips_and_reads_like_the_darts_cell():
    text = GENOTYPE.to_json()
    assert json.loads(text)["nodes"][0]["op"] == ["sep_conv_3x3", "skip_connect"]
    assert from_json(text) == GENOTYPE
    shown = str(GENOTYPE)
    assert "normal cell" in shown and "reduce cell" in shown
    assert "s2 = max_pool_3x3(c_k-1) + dil_conv_5x5(s1)" in shown
    assert GENOTYPE.cells()[1][1] == GENOTYPE.nodes[2:]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nodes": [{"op": "sep_conv_3x3", "inputs": [-1, 0]}] * 2}, "one op per input"),
        ({"nodes": [{"op": ["sep_conv_3x3", "conv"], "inputs": [-1, 0]}] * 2}, "unknown op"),
        ({"nodes": [{"op": ["skip_connect"] * 2, "inputs": [-1, 0]}] * 3}, "as many each"),
        (
            {
                "nodes": [
                    {"op": ["skip_connect"] * 2, "inputs": [-1, 0]},
                    {"op": ["skip_connect"] * 2, "inputs": [-1, 1]},
                ]
            },
            r"node 2 \(node 1 of its cell\) reads state 1",
        ),
        ({"version": 2}, "needs genotype version 3"),
        ({"output": "last"}, "unknown output"),
    ],
)
def test_a_bad_cnn_genotype_is_refused_with_a_reason(change, message):
    data = {**json.loads(GENOTYPE.to_json()), **change}
    with pytest.raises(UserError, match=message):
        from_json(json.dumps(data))


def test_the_genotype_drawing_shows_both_cells(tmp_path):
    out = report.plot_genotype(GENOTYPE, tmp_path / "g.png")
    assert out.stat().st_size > 1000
    states, edges = report._cell_graph(GENOTYPE)
    assert {s.key for s in states} >= {"normal:s1", "reduce:s2", "normal:out", "reduce:out"}
    assert ("reduce:c_k-2", "reduce:s2", "avg_pool_3x3") in edges


# --------------------------------------------------------------------------- the task, end to end


def _images(tmp_path, n_per_class: int = 12, size: int = 8):
    """A small learnable .npz: three classes, each a bright stripe in its own place."""
    generator = np.random.default_rng(0)
    x = generator.normal(0, 0.3, (3 * n_per_class, size, size)).astype(np.float32)
    y = np.repeat(np.arange(3), n_per_class)
    for k in range(3):
        x[y == k, :, 2 * k : 2 * k + 2] += 2.0
    path = tmp_path / "images.npz"
    np.savez(path, x=x, y=y)
    return path


def _config(tmp_path, **overrides):
    base = {
        "task": "classify",
        "data": {"images": str(_images(tmp_path))},
        "space": {"nodes": 2, "hidden": 4, "options": {"steps": 1}},
        "search": {"epochs": 2, "batch_size": 16},
        "train": {"epochs": 1, "batch_size": 16},
        "out": str(tmp_path / "run"),
        "threads": 1,
    }
    return config.resolve(overrides=config.merge(base, overrides))


STRATEGY_CASES = [
    (name, {}) for name in strategies.STRATEGIES if name != "e2nas"
] + [  # e2nas: one choice per node, refused on darts_cnn (tests/test_strategies.py)
    ("darts", {"order": 2}),
    ("darts", {"penalty": "flops"}),
    ("darts", {"penalty": "params", "proximity": 0.1}),
]


@pytest.mark.parametrize(("name", "search"), STRATEGY_CASES)
def test_every_strategy_searches_darts_cnn_and_retrains_beside_the_baselines(
    tmp_path, name, search
):
    cfg = _config(tmp_path, search={"strategy": name, **search})
    result = api.search(cfg)
    assert result.genotype.space == "darts_cnn" and len(result.genotype.nodes) == 2
    assert [r["model"] for r in result.results] == ["searched", *IMAGE_BASELINES]
    for row in result.results:
        assert 0 <= row["test_accuracy"] <= 1 and row["params"] > 0 and row["flops"] > 0
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["image_shape"] == [1, 8, 8] and summary["classes"] == ["0", "1", "2"]


@pytest.mark.parametrize("mode", ["grow-then-prune", "grow-and-prune"])
def test_both_growth_modes_append_checked_cells(tmp_path, mode):
    cfg = _config(
        tmp_path,
        search={"epochs": 3},
        growth={"mode": mode, "nodes_start": 1, "nodes_max": 3, "every": 1},
    )
    result = api.search(cfg)
    history = json.loads((result.run_dir / "history.json").read_text())
    grows = [e for e in history if e["kind"] == "grow"]
    assert [(e["nodes_before"], e["nodes_after"]) for e in grows] == [(1, 2), (2, 3)]
    assert all(e["max_abs_diff"] <= 1e-5 for e in grows)
    if mode == "grow-and-prune":
        assert [r["model"] for r in result.results][:2] == ["searched", "one-shot"]
        assert any(e["kind"] == "prune" for e in history)
    saved = torch.load(result.run_dir / "models" / "searched.pt", weights_only=False)
    assert any(key.startswith("cell.cells.2.") for key in saved["state_dict"])  # 3 cells


def test_width_growth_widens_checked_and_retrains_at_the_new_width(tmp_path):
    cfg = _config(
        tmp_path,
        search={"epochs": 3},
        growth={"mode": "grow-then-prune", "nodes_start": 1, "nodes_max": 2, "width_step": 2},
    )
    result = api.search(cfg)
    history = json.loads((result.run_dir / "history.json").read_text())
    widen = [e for e in history if e["kind"] == "widen"]
    assert [(e["width_before"], e["width_after"]) for e in widen] == [(4, 6)]
    assert widen[0]["max_abs_diff"] <= 1e-5
    assert result.extra["hidden"] == 6
    saved = torch.load(result.run_dir / "models" / "searched.pt", weights_only=False)
    assert saved["state_dict"]["cell.stem.0.weight"].shape[0] == 3 * 6  # retrained at C = 6


def test_baselines_are_as_wide_as_brings_them_nearest_the_searched_networks_size(tmp_path):
    cfg = _config(tmp_path, space={"hidden": 8})
    kind = tasks.kind_for(cfg)
    data = kind.load()

    def size(model):
        return sum(p.numel() for p in model.parameters())

    target = size(
        kind.wrap(cells.build(GENOTYPE, 1, 8, **cells.options_for(GENOTYPE, cfg)), data, 8)
    )
    for name in IMAGE_BASELINES:
        width = kind.baseline_hidden(name, data, GENOTYPE)
        gaps = {
            w: abs(size(kind.wrap(kind.baseline(name, data, w), data, w)) - target)
            for w in (width - 1, width, width + 1)
            if w >= 1
        }
        assert min(gaps, key=gaps.get) == width, (name, gaps)
    assert kind.baseline_hidden("lenet", data, None) == 8  # nothing to match: space.hidden


def test_compare_runs_strategies_on_images(tmp_path):
    cfg = _config(tmp_path, search={"epochs": 1}, train={"baselines": []})
    variants = [
        ("darts", {"search": {"strategy": "darts"}}),
        ("gdas", {"search": {"strategy": "gdas"}}),
    ]
    result = api.compare(cfg, variants, seeds=[0, 1])
    assert [row["variant"] for row in result.results] == ["darts", "gdas"]
    for row in result.results:
        assert row["seeds"] == 2 and 0 <= row["test_accuracy"] <= 1 and row["flops"] > 0
        assert math.isfinite(row["test_accuracy_std"])


def test_image_model_wraps_any_network_with_features():
    model = ImageModel(cells.build(GENOTYPE, 1, 4, cells=2), 5)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 5)


# --------------------------------------------------------------------------- the command line


def test_search_on_digits_prints_accuracy_params_and_flops_per_row(tmp_path):
    done = morphnas(
        "search", "--task", "classify", "--dataset", "digits", "--limit", "60", "--nodes", "2",
        "--hidden", "4", "--epochs", "1", "--retrain-epochs", "1", "--set", "space.options.steps=1",
        "--out", str(tmp_path / "run"), "--threads", "1", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["results"]
    assert [r["model"] for r in rows] == ["searched", *IMAGE_BASELINES]
    assert all({"test_accuracy", "params", "flops"} <= row.keys() for row in rows)


@pytest.mark.parametrize("name", IMAGE_BASELINES)
def test_train_each_image_baseline_alone_and_evaluate_it(tmp_path, name):
    """``train --baseline NAME`` on images: one row, at ``--hidden`` (nothing to match), and
    ``evaluate`` rebuilds the saved model by its name and scores it the same."""
    out = tmp_path / "run"
    done = morphnas(
        "train", "--task", "classify", "--baseline", name, "--images", str(_images(tmp_path)),
        "--hidden", "4", "--retrain-epochs", "2", "--set", "train.batch_size=16",
        "--out", str(out), "--threads", "1", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["results"]
    assert [r["model"] for r in rows] == [name]
    (row,) = rows
    assert 0 <= row["test_accuracy"] <= 1 and math.isfinite(row["test_loss"])
    assert row["params"] > 0 and row["flops"] > 0
    body = image_baseline(name, 1, 4, (8, 8))  # --hidden 4 on 1-channel 8x8 images
    assert row["params"] == sum(p.numel() for p in ImageModel(body, 3).parameters())
    again = morphnas("evaluate", str(out), "--json")
    assert again.returncode == 0, again.stderr
    (scored,) = json.loads(again.stdout)["results"]
    assert scored["test_accuracy"] == row["test_accuracy"] and scored["flops"] == row["flops"]


def test_bad_images_are_one_line_errors(tmp_path):
    from PIL import Image

    folder = tmp_path / "folder"
    for name, size in (("a", 8), ("b", 9)):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (size, size)).save(folder / name / f"{i}.png")
    args = ("search", "--task", "classify", "--out", str(tmp_path / "run"), "--images")
    assert_user_error(morphnas(*args, str(folder)), "8x8", "9x9")
    (folder / "b" / "notes.png").write_text("not an image")
    npz = tmp_path / "bad.npz"
    np.savez(npz, images=np.zeros((4, 8, 8)))
    assert_user_error(morphnas(*args, str(npz)), "bad.npz", "x")
    assert not (tmp_path / "run").exists()  # nothing was started


def test_fashion_mnist_absent_is_aassert_user_error(tmp_path):
    import os

    env_dir = tmp_path / "empty"
    env_dir.mkdir()
    os.environ["MORPHNAS_FASHION_MNIST"] = str(env_dir)
    try:
        done = morphnas(
            "search", "--task", "classify", "--dataset", "fashion-mnist", "--out",
            str(tmp_path / "run"),
        )  # fmt: skip
    finally:
        del os.environ["MORPHNAS_FASHION_MNIST"]
    assert_user_error(done, "Fashion-MNIST", "MORPHNAS_FASHION_MNIST")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--task", "classify", "--space", "two_input"), "--task forecast or lm"),
        (("--space", "darts_cnn"), "--task classify"),
        (("--task", "classify", "--csv", "x.csv"), "--images"),
        (("--task", "classify", "--dataset", "births"), "not an image dataset"),
    ],
)
def test_a_space_of_another_modality_or_series_data_is_refused(tmp_path, args, fragment):
    assert_user_error(morphnas("search", *args, "--out", str(tmp_path / "run")), fragment)


def test_a_killed_image_search_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL mid-search (after growth and widening), then --resume: the same genotype, the
    same epoch rows and the same test accuracies as a run that never stopped."""
    images = _images(tmp_path)
    args = [
        "search", "--task", "classify", "--images", str(images), "--nodes", "3", "--hidden", "4",
        "--epochs", "3", "--retrain-epochs", "1", "--set", "space.options.steps=1",
        "--set", "search.batch_size=16", "--set", "train.batch_size=16", "--growth",
        "grow-then-prune", "--nodes-start", "1", "--grow-every", "1", "--grow-width", "2",
        "--threads", "1", "--json",
    ]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = morphnas(*args, "--out", str(whole))
    assert done.returncode == 0, done.stderr
    assert morphnas(*args, "--out", str(cut), crash="step:6").returncode == -9
    resumed = morphnas("search", "--resume", str(cut), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert (cut / "genotype.json").read_text() == (whole / "genotype.json").read_text()

    def rows(run):
        return [r for r in read_metrics(run / "metrics.jsonl") if r.get("phase") == "search"]

    assert without_times(rows(cut)) == without_times(rows(whole))
    scores = [
        [(r["model"], r["test_accuracy"]) for r in json.loads(out.stdout)["results"]]
        for out in (done, resumed)
    ]
    assert scores[0] == scores[1]


def test_an_image_folder_is_recorded_so_that_a_resume_sees_any_change(tmp_path):
    """``run.json`` keeps a digest of the whole folder: a search on a folder runs, and adding,
    renaming or editing an image changes the digest that ``--resume`` compares."""
    from PIL import Image

    folder = tmp_path / "images"
    generator = np.random.default_rng(0)
    for name in ("cat", "dog", "owl"):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            pixels = (generator.random((8, 8)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    cfg = _config(tmp_path, data={"images": str(folder)}, search={"epochs": 1})
    result = api.search(cfg)
    record = json.loads((result.run_dir / "run.json").read_text())
    before = record["inputs"][str(folder)]
    assert before == runs.file_digest(folder) and before["bytes"] > 0
    seen = {before["sha256"]}
    (folder / "owl" / "3.png").rename(folder / "owl" / "9.png")
    seen.add(runs.file_digest(folder)["sha256"])
    Image.new("L", (8, 8)).save(folder / "owl" / "9.png")
    seen.add(runs.file_digest(folder)["sha256"])
    Image.new("L", (8, 8)).save(folder / "cat" / "5.png")
    seen.add(runs.file_digest(folder)["sha256"])
    assert len(seen) == 4
