"""Growth in the search loop: triggers, checks, optimizer surgery, history, modes, compare."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SEQUENCE_SPACES
from morphnas import api, config, spaces
from morphnas.config import GrowthConfig
from morphnas.engine.search import streamed_fraction
from morphnas.errors import UserError
from morphnas.growth import (
    GrowthCheckError,
    GrowthTrigger,
    grow_checked,
    growth_interval,
    widen_checked,
)
from morphnas.optim import rebuild_optimizer
from morphnas.report import plot_growth
from morphnas.run_files import read_metrics
from morphnas.spaces.base import Widening
from morphnas.tasks.forecasting import ForecastModel

TINY = {
    "data": {"dataset": "synthetic", "window": 6},
    "space": {"nodes": 3, "hidden": 6},
    "search": {"epochs": 4, "batch_size": 128},
    "train": {"epochs": 2, "baselines": []},
}


def tiny(tmp_path, **growth):
    overrides = config.merge(TINY, {"out": str(tmp_path / "run"), "growth": growth})
    return config.resolve(overrides=overrides)


def test_schedule_spreads_growths_and_never_fires_at_the_end():
    cfg = GrowthConfig(mode="grow-then-prune", nodes_start=1)
    assert growth_interval(cfg, epochs=20, nodes_max=4) == 5
    trigger = GrowthTrigger(cfg, epochs=20, nodes_max=4)
    nodes, fired = 1, []
    for epoch in range(1, 21):
        if trigger(epoch, 1.0, nodes):
            nodes += 1
            fired.append(epoch)
    assert fired == [5, 10, 15] and nodes == 4
    assert not GrowthTrigger(GrowthConfig(every=1), epochs=3, nodes_max=9)(3, 1.0, 1)


def test_plateau_fires_after_patience_epochs_without_relative_improvement():
    trigger = GrowthTrigger(
        GrowthConfig(trigger="plateau", patience=2, min_delta=0.1), epochs=50, nodes_max=5
    )
    losses = [1.0, 0.8, 0.75, 0.74, 0.5, 0.49, 0.48]
    fired = [e for e, loss in enumerate(losses, 1) if trigger(e, loss, 1)]
    # 0.75 and 0.74 are within 10% of 0.8: the second of them fires; 0.49, 0.48 of 0.5 likewise.
    assert fired == [4, 7]


def test_streamed_fraction_grows_to_the_full_span():
    shares = [streamed_fraction(4, e, 8) for e in range(1, 9)]
    assert shares == sorted(shares) and shares[0] == 0.25 and shares[-1] == 1.0
    assert [streamed_fraction(1, e, 3) for e in (1, 2, 3)] == [1.0, 1.0, 1.0]


def test_rebuild_optimizer_keeps_survivors_state_exactly():
    keep, drop = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.Adam([keep, drop], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (keep.sum() ** 2 + drop.sum() ** 2).backward()
        opt.step()
    before = {k: v.clone() for k, v in opt.state[keep].items()}
    new = torch.nn.Parameter(torch.randn(4))
    rebuilt = rebuild_optimizer(opt, [keep, new])
    assert rebuilt.defaults == opt.defaults
    for key, value in before.items():
        assert torch.equal(rebuilt.state[keep][key], value)
    assert new not in rebuilt.state and drop not in rebuilt.state


def test_a_growth_that_changes_the_function_stops_the_run():
    space = spaces.build("two_input", 3, 5, 1)
    real_grow = space.grow

    def broken_grow(alpha_init="random"):
        params = real_grow(alpha_init)
        params[-1].data.fill_(0.5)  # gamma no longer zero: not a morphism
        return params

    space.grow = broken_grow
    with pytest.raises(GrowthCheckError, match="changed the cell's output"):
        grow_checked(space, torch.randn(4, 2, 3), GrowthConfig())


@pytest.mark.parametrize("space", SEQUENCE_SPACES)
def test_grow_then_prune_records_every_checked_growth(tmp_path, space):
    cfg = tiny(tmp_path, mode="grow-then-prune", nodes_start=1, every=1)
    cfg = config.resolve(base=cfg, overrides={"space": {"name": space}})
    result = api.search(cfg)
    history = json.loads((result.run_dir / "history.json").read_text())
    assert [e["kind"] for e in history] == ["grow", "grow"]
    assert [(e["nodes_before"], e["nodes_after"]) for e in history] == [(1, 2), (2, 3)]
    for event in history:
        assert event["max_abs_diff"] <= 1e-5
        assert event["valid_loss_after"] == pytest.approx(event["valid_loss_before"], rel=1e-4)
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["phase"] == "search"]
    assert [r["nodes"] for r in rows] == [1, 2, 3, 3]
    assert [len(r["arch"]) for r in rows][-1] >= 3
    genotype = result.genotype
    assert len(genotype.nodes) == 3
    assert [n.residual for n in genotype.nodes] == [False, True, True]
    assert (result.run_dir / "plots" / "growth.png").is_file()
    assert result.extra["growth_events"] == 2


def test_grow_and_prune_fixes_nodes_and_scores_the_one_shot_cell(tmp_path):
    cfg = tiny(tmp_path, mode="grow-and-prune", nodes_start=1, every=1)
    result = api.search(cfg)
    history = json.loads((result.run_dir / "history.json").read_text())
    assert [e["kind"] for e in history] == ["prune", "grow", "prune", "grow", "prune"]
    assert [e["pruned_nodes"] for e in history if e["kind"] == "prune"] == [[1], [2], [3]]
    assert all(e["width_before"] is None and e["time"] > 1e9 for e in history)
    models = [r["model"] for r in result.results]
    assert models == ["searched", "one-shot"]
    one_shot = result.results[1]
    assert one_shot["test_rse"] > 0 and one_shot["params"] > 0
    # The one-shot cell and the retrained cell are the same architecture: same weight count.
    assert one_shot["params"] == result.results[0]["params"]


def test_streaming_search_sees_the_span_arrive(tmp_path):
    cfg = tiny(tmp_path)
    cfg = config.resolve(base=cfg, overrides={"search": {"stream": 4}})
    result = api.search(cfg)
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["phase"] == "search"]
    windows = [r["train_windows"] for r in rows]
    assert windows == sorted(windows) and windows[0] < windows[-1]


def test_compare_runs_every_variant_and_seed(tmp_path):
    cfg = tiny(tmp_path)
    variants = [
        ("none", {"growth": {"mode": "none"}}),
        ("g1", {"growth": {"mode": "grow-then-prune"}}),
    ]
    result = api.compare(cfg, variants, [0, 1])
    saved = json.loads((result.run_dir / "compare.json").read_text())
    assert [(r["variant"], r["seed"]) for r in saved["runs"]] == [
        ("none", 0), ("g1", 0), ("none", 1), ("g1", 1),
    ]  # fmt: skip
    table = {row["variant"]: row for row in saved["table"]}
    runs = [r["test_rse"] for r in saved["runs"] if r["variant"] == "none"]
    assert table["none"]["test_rse"] == pytest.approx(sum(runs) / 2)
    assert table["none"]["test_rse_std"] == pytest.approx(abs(runs[0] - runs[1]) / 2**0.5)
    assert table["g1"]["seeds"] == 2


def test_compare_in_processes_gives_the_sequential_runs(tmp_path, monkeypatch):
    """``jobs=2`` runs the same searches in spawned processes: same figures, planned order.
    The workers get the CLI's heap policy (as if this process ran under the CLI); it changes
    no figure."""
    monkeypatch.setattr(api, "malloc_policy", lambda: "keep")
    variants = [
        ("none", {"growth": {"mode": "none"}}),
        ("g1", {"growth": {"mode": "grow-then-prune"}}),
    ]
    results = {}
    for jobs in (1, 2):
        cfg = config.resolve(base=tiny(tmp_path / f"j{jobs}"), overrides={"threads": 1})
        results[jobs] = api.compare(cfg, variants, [0], jobs=jobs).extra["runs"]
    for sequential, parallel in zip(results[1], results[2], strict=True):
        assert (parallel["variant"], parallel["seed"]) == (
            sequential["variant"],
            sequential["seed"],
        )
        for key in ("search_valid_loss", "params", "valid_rse", "test_rse", "test_corr", "nodes"):
            assert parallel[key] == sequential[key], key
    assert all(r["search_cpu_seconds"] > 0 for r in results[2])


def test_compare_reuse_keeps_finished_runs_and_refuses_another_config(tmp_path):
    """``reuse`` extends a compare by a seed without rerunning the first; a run of another
    config in the way is an error, never overwritten."""
    variants = [("none", {"growth": {"mode": "none"}})]
    cfg = tiny(tmp_path)
    first = api.compare(cfg, variants, [0]).extra["runs"][0]
    genotype = (tmp_path / "run" / "none-seed0" / "genotype.json").read_text()
    stamp = (tmp_path / "run" / "none-seed0" / "summary.json").stat().st_mtime_ns
    result = api.compare(cfg, variants, [0, 1], reuse=True)
    kept, added = result.extra["runs"]
    assert (tmp_path / "run" / "none-seed0" / "summary.json").stat().st_mtime_ns == stamp
    assert kept["test_rse"] == first["test_rse"] and kept["params"] == first["params"]
    assert added["seed"] == 1 and (tmp_path / "run" / "none-seed1" / "summary.json").is_file()
    assert (tmp_path / "run" / "none-seed0" / "genotype.json").read_text() == genotype
    longer = config.resolve(base=cfg, overrides={"search": {"epochs": 5}})
    with pytest.raises(UserError, match="another config"):
        api.compare(longer, variants, [0], reuse=True)
    assert (tmp_path / "run" / "none-seed0" / "genotype.json").read_text() == genotype


def test_plot_growth_marks_events(tmp_path):
    rows = [
        {"phase": "search", "epoch": e, "train_loss": 1 / e, "valid_loss": 1.1 / e, "nodes": n}
        for e, n in [(1, 1), (2, 2), (3, 2)]
    ]
    events = [{"epoch": 1, "kind": "prune"}, {"epoch": 1, "kind": "grow"}]
    out = plot_growth(rows, events, tmp_path / "g.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


WIDEN_CASES = [
    ("darts_rnn", {}),
    ("darts_rnn", {"batchnorm": False}),
    ("two_input", {}),
    ("two_input", {"wiring": "input", "output": "mean", "batchnorm": True}),
    ("two_input", {"weight_sharing": "per_node", "output_activation": "identity"}),
]


@pytest.mark.parametrize(("name", "options"), WIDEN_CASES)
@pytest.mark.parametrize("training", [False, True])
def test_widening_preserves_the_forecasts(name, options, training):
    """Net2WiderNet on a grown, partly pruned supernet and its head: same forecasts, wider state."""
    torch.manual_seed(0)
    space = spaces.build(name, 3, 6, 2, **options).double()
    space.grow()
    space.prune()
    space.grow()
    for gamma in space.gammas.values():
        torch.nn.init.normal_(gamma)  # earlier growths have trained: non-zero scales
    model = ForecastModel(space, 6, 3, ar_window=4).double().train(training)
    windows = torch.randn(5, 7, 3, dtype=torch.float64)
    before = model(windows)
    cfg = GrowthConfig(width_step=4, width_noise=0.2)
    diff = widen_checked(model, windows, cfg, torch.Generator().manual_seed(1))
    assert space.hidden_size == 10 and model.head.weight.shape == (3, 10)
    assert diff < 1e-10
    torch.testing.assert_close(model(windows), before, rtol=0, atol=1e-10)
    # The copies' readers differ (noise), so the copies can drift apart when trained.
    grads = torch.autograd.grad(model(windows).sum(), model.head.weight)[0]
    assert grads.shape == (3, 10)


def test_widening_shares_sum_to_one_per_unit():
    w = Widening.random(5, 7, noise=0.3, generator=torch.Generator().manual_seed(0))
    totals = torch.zeros(5, dtype=torch.float64).index_add_(0, w.index, w.share)
    torch.testing.assert_close(totals, torch.ones(5, dtype=torch.float64))
    assert torch.equal(w.index[:5], torch.arange(5))


def test_width_growth_in_search_retrains_at_the_found_width(tmp_path):
    cfg = tiny(tmp_path, mode="grow-then-prune", nodes_start=1, every=1, width_step=2, width_max=9)
    result = api.search(cfg)
    history = json.loads((result.run_dir / "history.json").read_text())
    widths = [(e["width_before"], e["width_after"]) for e in history if e["kind"] == "widen"]
    assert widths == [(6, 8), (8, 9)]
    assert all(e["max_abs_diff"] <= 1e-5 for e in history)
    assert result.extra["hidden"] == 9 and result.genotype.metadata["hidden_size"] == 9
    rescored = api.evaluate(result.run_dir)  # the saved models are rebuilt at the found width
    assert rescored.results[0]["test_rse"] == pytest.approx(result.results[0]["test_rse"])
