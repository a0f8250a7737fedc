"""A newcomer's extension points: a task, a space and a strategy added through the registries
alone — one class each and one registry entry, no other file edited — run a whole search.

The toy task learns the mean of the first feature of a random sequence (a regression no
existing task does), with its own model, metric and budget; it reuses the engine's window task
(``ForecastTask``: windows in, targets out, under MSE), as any sequence-to-value task may. The
toy space is a two-input backbone restricted to gating ops (its derived cells are two-input
cells, so retraining needs nothing new); the toy strategy is single-level DARTS (α learns on
the training batch, as the weights do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from morphnas import api, config, spaces, strategies, tasks
from morphnas.errors import UserError
from morphnas.options import baseline_names
from morphnas.spaces import TwoInputSearchCell
from morphnas.strategies import Objective, Strategy
from morphnas.strategies.base import BatchLoss
from morphnas.tasks.forecasting import ForecastTask, predict
from morphnas.tasks.kinds import TaskKind


class _MeanModel(nn.Module):
    """A cell over the sequence, a linear read-out of its last state."""

    def __init__(self, cell: nn.Module, hidden: int) -> None:
        super().__init__()
        self.cell, self.head = cell, nn.Linear(hidden, 1)

    def forward(self, x: Tensor, **cell_kwargs: Any) -> Tensor:
        _, h_last = self.cell(x.transpose(0, 1), **cell_kwargs)
        return self.head(h_last)


class MeanOfSequence(TaskKind):
    """Regression of the mean of feature 0 over 8 steps of 2 random features."""

    name = "toy-mean"
    defaults: ClassVar[dict[str, Any]] = {"train": {"baselines": ["lstm"]}}

    @classmethod
    def check(cls, config: Any) -> None:
        if "ar" in config.train.baselines:
            raise ValueError("the toy task has no autoregressive part: drop the 'ar' baseline")

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.config.seed)
        x = torch.randn(240, 8, 2, generator=generator)
        y = x[:, :, :1].mean(dim=1)
        return {"train": (x[:160], y[:160]), "valid": (x[160:200], y[160:200]),
                "test": (x[200:], y[200:])}  # fmt: skip

    def budget(self) -> str:
        return "240 sequences of 8 steps"

    def input_size(self, data: Any) -> int:
        return 2

    def wrap(self, cell: nn.Module | None, data: Any, hidden: int) -> nn.Module:
        if cell is None:
            raise UserError("the toy task needs a recurrent cell")
        return _MeanModel(cell, hidden)

    def engine_task(self, data: Any, batch_size: int) -> ForecastTask:
        return ForecastTask(data["train"], data["valid"], batch_size)

    def score(self, model: nn.Module, data: Any) -> dict[str, float]:
        return {
            f"{part}_mse": float(((predict(model, data[part][0]) - data[part][1]) ** 2).mean())
            for part in ("valid", "test")
        }


GATES = ("add_sigmoid", "hadamard", "add_tanh")


class GateSpace(TwoInputSearchCell):
    """The two-input backbone with gating ops only."""

    def __init__(
        self, input_size: int, hidden_size: int, nodes: int = 4, fused: bool = True
    ) -> None:
        super().__init__(input_size, hidden_size, nodes=nodes, ops=GATES, fused=fused)


class SingleLevelDarts(Strategy):
    """First-order DARTS whose architecture step reads the training batch."""

    name = "toy-single-level"

    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> torch.Tensor:
        del valid_batch
        return self._first_order_step(objective, train_batch)


def test_a_toy_task_space_and_strategy_run_a_search_through_the_registries_alone(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setitem(tasks.KINDS, MeanOfSequence.name, MeanOfSequence)
    monkeypatch.setitem(spaces.SPACES, "toy-gates", GateSpace)
    monkeypatch.setitem(strategies.STRATEGIES, SingleLevelDarts.name, SingleLevelDarts)
    cfg = config.resolve(
        overrides={
            "task": "toy-mean", "out": str(tmp_path / "run"), "threads": 1,
            "space": {"name": "toy-gates", "nodes": 2, "hidden": 6},
            "search": {"epochs": 2, "batch_size": 32, "strategy": "toy-single-level"},
            "train": {"epochs": 2},
        }
    )  # fmt: skip
    assert cfg.train.baselines == ["lstm"]  # the kind's own defaults
    result = api.search(cfg)
    rows = {row["model"]: row for row in result.results}
    assert set(rows) == {"searched", "lstm"}
    for row in rows.values():
        assert 0 < row["test_mse"] < 1  # the mean of 8 unit normals has variance 1/8
    assert (result.run_dir / "summary.json").is_file()
    assert {node.op for node in result.genotype.nodes} <= set(GATES)
    assert result.genotype.metadata["strategy"] == "toy-single-level"
    with pytest.raises(UserError, match="drop the 'ar' baseline"):
        config.resolve(overrides={"task": "toy-mean", "train": {"baselines": ["ar"]}})


def test_an_unknown_task_names_the_registered_ones():
    with pytest.raises(UserError, match=r"unknown task 'lmm'; did you mean 'lm'\? \(tasks: "):
        config.resolve(overrides={"task": "lmm"})


@pytest.mark.parametrize("name", list(tasks.KINDS))
def test_every_task_kind_starts_from_a_space_of_its_modality_and_known_baselines(name):
    """A kind's defaults resolve to a valid config whose space reads what the kind's models
    read, and every baseline it names is one config accepts."""
    kind = tasks.KINDS[name]
    resolved = config.resolve(overrides={"task": name})
    assert spaces.SPACES[resolved.space.name].modality == kind.modality
    assert set(kind.baselines) | set(resolved.train.baselines) <= set(baseline_names())
    others = [s for s in spaces.SPACES if spaces.SPACES[s].modality != kind.modality]
    for space in others:  # a space of another modality is a config error, said as such
        with pytest.raises(UserError, match="--task"):
            config.resolve(overrides={"task": name, "space": {"name": space}})
