"""CUDA-graph replay in the search (engine.graphs): when graphs are recorded, replayed and dropped.

On a CPU the recording is a stand-in that runs the unroll eagerly after the same warm-up passes
as ``make_graphed_callables`` and checks every replay has the recorded shapes; what a real graph
computes is compared with eager on a GPU (the last test, which needs one).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from morphnas import api, config, spaces
from morphnas.engine import graphs
from morphnas.engine.graphs import GraphedUnroll, wants_graphs
from morphnas.errors import UserError
from morphnas.run_files import read_metrics
from morphnas.spaces.base import SampledMixing


class StandIn:
    """Records like ``make_graphed_callables`` (warm-up passes drawing dropout masks and moving
    buffers), replays eagerly, and refuses a replay whose shapes differ from the recording's."""

    def __init__(self) -> None:
        self.recorded: list[list[tuple[int, ...]]] = []

    def __call__(self, module, samples):
        shapes = [tuple(s.shape) for s in samples]
        for _ in range(3):
            outputs = module(*samples)
            grads = [p for p in module.parameters() if p.requires_grad]
            out = next(o for o in outputs if o is not None)
            torch.autograd.grad(out.sum(), grads, allow_unused=True)
        self.recorded.append(shapes)

        def replay(*args):
            assert [tuple(a.shape) for a in args] == shapes
            return module(*args)

        return replay


def _cell():
    torch.manual_seed(0)
    return spaces.build("two_input", 3, 6, 2).train()


def _mixing(cell, grad: bool = False):
    weights = [w.detach() for w in cell.mixing_weights()]
    return [w.clone().requires_grad_(grad) for w in weights]


def test_the_setting_is_refused_where_it_cannot_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not wants_graphs("auto", cpu, hypergradient=False)
    assert not wants_graphs("off", cuda, hypergradient=False)
    assert wants_graphs("auto", cuda, hypergradient=False)
    assert not wants_graphs("auto", cuda, hypergradient=True)
    with pytest.raises(UserError, match="needs a CUDA device"):
        wants_graphs("on", cpu, hypergradient=False)
    with pytest.raises(UserError, match="hypergradient"):
        wants_graphs("on", cuda, hypergradient=True)


def test_one_recording_per_shape_and_gradient_and_eager_where_a_graph_would_be_wrong():
    cell, stand_in = _cell(), StandIn()
    graphed = GraphedUnroll(cell, stand_in)
    x, tail = torch.randn(5, 4, 3), torch.randn(5, 1, 3)
    for _ in range(2):  # the second batch of the same shape replays the first recording
        graphed(x, weights=_mixing(cell))[1].sum().backward()
    graphed(tail, weights=_mixing(cell))[1].sum().backward()  # the partial batch: its own
    graphed(x, weights=_mixing(cell, grad=True))[1].sum().backward()  # an α step: its own
    assert graphed.captures == 3 and graphed.replays == 4
    with torch.no_grad():
        graphed(x, weights=_mixing(cell))
    graphed(x, torch.zeros(4, 6), _mixing(cell))  # a carried state
    choices = SampledMixing(_mixing(cell), [0] * len(_mixing(cell)))
    graphed(x, weights=choices)
    cell.eval()
    graphed(x, weights=_mixing(cell))
    assert graphed.captures == 3 and graphed.replays == 4


def test_a_second_forward_before_the_first_backward_runs_eagerly():
    cell = _cell()
    graphed = GraphedUnroll(cell, StandIn())
    x = torch.randn(5, 4, 3)
    first = graphed(x, weights=_mixing(cell))[1].sum()
    second = graphed(x, weights=_mixing(cell))[1].sum()  # the first's buffers are in use
    assert graphed.replays == 1
    (first + second).backward()
    graphed(x, weights=_mixing(cell))[1].sum().backward()
    assert graphed.replays == 2
    graphed(x, weights=_mixing(cell))  # dropped without a backward: no longer in use
    graphed(x, weights=_mixing(cell))
    assert graphed.replays == 4


def test_growth_and_a_prune_drop_the_recordings():
    cell = _cell()
    graphed = GraphedUnroll(cell, StandIn())
    x = torch.randn(5, 4, 3)

    def step():
        graphed(x, weights=_mixing(cell))[1].sum().backward()

    step()
    step()
    assert graphed.captures == 1
    cell.grow()
    step()
    assert graphed.captures == 2 and len(graphed.graphs) == 1
    cell.prune()  # fixes nodes: no new parameter, another computation
    step()
    assert graphed.captures == 3


def test_recording_leaves_the_random_state_and_the_buffers_as_they_were():
    cell = spaces.build("darts_cnn", 3, 8, 2).train()
    graphed = GraphedUnroll(cell, StandIn())
    buffers = [b.clone() for b in cell.buffers()]
    x = torch.randn(2, 3, 8, 8)
    state = torch.random.get_rng_state()
    assert graphed._record(("key",), x, _mixing(cell)) is not None
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(buffers, cell.buffers(), strict=True))


def test_a_capture_that_fails_warns_once_and_leaves_the_search_eager():
    def broken(module, samples):
        raise RuntimeError("operation not permitted when stream is capturing")

    cell = _cell()
    graphed = GraphedUnroll(cell, broken)
    x = torch.randn(5, 4, 3)
    with pytest.warns(RuntimeWarning, match="capture of the search failed"):
        graphed(x, weights=_mixing(cell))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = graphed(x, weights=_mixing(cell))
    assert graphed.failed and graphed.captures == 0
    assert out[1].shape == (4, 6)


def _grow_and_prune(tmp_path, name):
    cfg = config.resolve(
        overrides={
            "out": str(tmp_path / name),
            "data": {"dataset": "synthetic", "window": 6},
            "space": {"nodes": 3, "hidden": 6},
            "search": {"epochs": 3, "batch_size": 96},
            "train": {"epochs": 1, "baselines": []},
            "growth": {"mode": "grow-and-prune", "nodes_start": 1, "every": 1},
        }
    )
    result = api.search(cfg)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    searched = [r for r in rows if r["phase"] == "search" and "valid_loss" in r]
    return result, rows, [(r["train_loss"], r["valid_loss"], r["arch"]) for r in searched]


def test_a_graphed_search_is_the_eager_search_and_records_again_after_each_growth(
    tmp_path, monkeypatch
):
    eager, _, eager_losses = _grow_and_prune(tmp_path, "eager")
    stand_in = StandIn()
    monkeypatch.setattr(graphs, "wants_graphs", lambda *a, **k: True)
    monkeypatch.setattr(graphs, "_cuda_capture", stand_in)
    replayed, rows, losses = _grow_and_prune(tmp_path, "graphed")
    assert losses == eager_losses  # warm-up passes left the random streams untouched
    assert replayed.genotype.to_dict() == eager.genotype.to_dict()
    event = next(r for r in rows if r.get("event") == "cuda-graphs")
    history = json.loads((replayed.run_dir / "history.json").read_text())
    structures = 1 + len(history)  # every growth and prune changes the computation
    assert event["captures"] >= structures and event["replays"] > event["captures"]
    assert not event["failed"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replaying a CUDA graph needs a GPU")
@pytest.mark.parametrize("name", ["two_input", "darts_rnn"])
def test_on_a_gpu_the_replay_computes_what_the_eager_unroll_does(name):
    torch.manual_seed(0)
    device = torch.device("cuda")
    cell = spaces.build(name, 3, 16, 3).to(device).train()
    graphed = GraphedUnroll(cell)
    x = torch.randn(12, 8, 3, device=device)
    for grad in (False, True, False):
        mixing = _mixing(cell, grad)
        inputs = [*cell.parameters(), *(m for m in mixing if m.requires_grad)]
        torch.manual_seed(1)
        out_eager = cell.forward(x, weights=mixing)[1]
        eager_grads = torch.autograd.grad(out_eager.sum(), inputs, allow_unused=True)
        torch.manual_seed(1)
        out = graphed(x, weights=mixing)[1]
        grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
        torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-6)
        for g, e in zip(grads, eager_grads, strict=True):
            if e is None:
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert graphed.captures == 2 and graphed.replays == 3


def test_yaml_on_and_off_read_as_the_settings_not_as_booleans():
    """``--set search.cuda_graphs=on`` reaches the config as YAML's True: it means ``on``."""
    cfg = config.resolve(overrides={"search": {"cuda_graphs": True}, "train": {"compile": False}})
    assert (cfg.search.cuda_graphs, cfg.train.compile) == ("on", "off")
