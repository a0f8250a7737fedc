"""``train.compile``: compiled discrete cells against their eager selves, and the fallback."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from morphnas import api, cells, config
from morphnas.engine.compiled import compile_cell, wants_compile
from morphnas.genotype import Genotype, Node

DARTS = Genotype(
    space="darts_rnn",
    nodes=(Node("tanh", (0,)), Node("relu", (1,)), Node("sigmoid", (1,))),
    output="mean",
    output_activation="identity",
)
TWO_INPUT = Genotype(
    space="two_input",
    nodes=(Node("add_sigmoid", (0, -1)), Node("add_tanh", (0, -1)), Node("hadamard", (1, 2))),
    output="last",
    output_activation="tanh",
)


def _run(cell: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(3)  # the dropout masks
    outputs, last = cell(x)
    (outputs.square().sum() + last.sum()).backward()
    return outputs.detach(), [p.grad.clone() for p in cell.parameters()]


@pytest.mark.parametrize("genotype", [DARTS, TWO_INPUT], ids=["darts_rnn", "two_input"])
def test_compiled_cell_matches_eager_with_dropout(genotype):
    """Inductor on CPU: same outputs, gradients and dropout masks as eager (1e-5)."""
    torch.manual_seed(0)
    eager = cells.build(genotype, 3, 4, dropout_x=0.3, dropout_h=0.3).train()
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    probe = torch.randn(5, 2, 3)
    state = torch.random.get_rng_state()
    seconds = compile_cell(compiled, probe)
    assert seconds is not None and seconds > 0
    assert torch.equal(torch.random.get_rng_state(), state)  # the warm-up drew nothing
    assert list(compiled.state_dict()) == keys  # checkpoints as the eager cell's
    assert all(p.grad is None for p in compiled.parameters())
    x = torch.randn(6, 3, 3)  # another batch size and length than the probe
    out_eager, grads_eager = _run(eager, x)
    out_compiled, grads_compiled = _run(compiled, x)
    assert not compiled.forward.failed
    assert not getattr(compiled, "fused", False)  # the compiler fuses the eager loop
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_compiled, grads_eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_failing_backend_falls_back_to_eager():
    def broken(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    torch.manual_seed(0)
    eager = cells.build(DARTS, 3, 4).train()
    cell = copy.deepcopy(eager)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*running eagerly"):
        assert compile_cell(cell, torch.randn(5, 2, 3), backend=broken) is None
    assert "forward" not in vars(cell)  # the class's eager forward again
    assert cell.fused  # and its sequence kernel
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(cell(x)[0], eager(x)[0], rtol=0, atol=0)


def test_auto_compiles_on_cuda_only():
    assert wants_compile("auto", torch.device("cuda")) and not wants_compile(
        "auto", torch.device("cpu")
    )
    assert wants_compile("on", torch.device("cpu")) and not wants_compile(
        "off", torch.device("cuda")
    )
    with pytest.raises(ValueError, match="compile must be"):
        wants_compile("yes", torch.device("cpu"))


FORECAST = {
    "data": {"dataset": "synthetic", "window": 6},
    "space": {"nodes": 2, "hidden": 6},
    "search": {"epochs": 1, "batch_size": 128},
    "train": {"epochs": 2, "baselines": ["gru"]},
}
LM = {
    "task": "lm", "data": {"dataset": "tiny"}, "space": {"nodes": 2, "hidden": 8},
    "search": {"epochs": 1, "batch_size": 8},
    "train": {"epochs": 1, "batch_size": 8, "baselines": ["gru"]},
    "lm": {"bptt": 8, "train_tokens": 1600},
}  # fmt: skip


@pytest.mark.parametrize("task", [FORECAST, LM], ids=["forecast", "lm"])
def test_search_with_compile_on_retrains_the_same_cell(tmp_path, monkeypatch, task):
    """``train.compile: on`` end to end: the searched cell is compiled before retraining (the
    compile seconds reported) and scores as the eager run does, the LM's carried hidden state
    included. The cheap ``aot_eager`` backend stands in for inductor (checked above)."""
    monkeypatch.setattr(api, "compile_cell", functools.partial(compile_cell, backend="aot_eager"))
    metric = "test_ppl" if task is LM else "test_rse"
    rows = {}
    for setting in ("off", "on"):
        overrides = config.merge(
            task,
            {"train": {"compile": setting}, "threads": 1, "out": str(tmp_path / setting)},
        )
        rows[setting] = {
            r["model"]: r for r in api.search(config.resolve(overrides=overrides)).results
        }
    assert "compile_seconds" not in rows["off"]["searched"]
    assert rows["on"]["searched"]["compile_seconds"] > 0
    assert "compile_seconds" not in rows["on"]["gru"]  # baselines are fused kernels already
    for model in ("searched", "gru"):
        assert rows["on"][model][metric] == pytest.approx(rows["off"][model][metric], rel=1e-5)
