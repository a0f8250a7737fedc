"""The global (channel-independent) layout: one model shared by all series, each its own sample.

Checked against slow per-(window, series) loops; its scores go through the multivariate metric
code unchanged (a hand-made global forecaster scores exactly as the naive row); a tiny search on
``synthetic`` reports every baseline, and a run stopped mid-search resumes exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from morphnas import api, cells, config, spaces
from morphnas.data import make_windows, synthetic_series
from morphnas.engine import faults
from morphnas.engine.checkpoint import load
from morphnas.engine.resume import StopRequested
from morphnas.errors import UserError
from morphnas.tasks.forecasting import (
    Forecasting,
    ForecastModel,
    ForecastTask,
    predict,
    series_sequences,
)

B, P, M, E, H = 3, 5, 4, 2, 6


def test_series_sequences_put_series_j_of_window_b_at_b_times_m_plus_j():
    torch.manual_seed(0)
    window, table = torch.randn(B, P, M), torch.randn(M, E)
    sequences = series_sequences(window, table)
    assert sequences.shape == (P, B * M, 1 + E)
    for b in range(B):
        for j in range(M):
            assert torch.equal(sequences[:, b * M + j, 0], window[b, :, j])
            assert torch.equal(sequences[:, b * M + j, 1:], table[j].expand(P, E))
    assert series_sequences(window).shape == (P, B * M, 1)


def _slow_global_forecast(model: ForecastModel, window: torch.Tensor) -> torch.Tensor:
    """One series of one window at a time, each with its id, 'last' window_norm and AR by hand."""
    out = torch.empty(window.shape[0], window.shape[2])
    for b in range(window.shape[0]):
        for j in range(window.shape[2]):
            series = window[b, :, j]
            level = series[-1]
            steps = (series - level).unsqueeze(1)  # (P, 1)
            ids = model.series_embedding.weight[j].expand(len(series), E)
            _, h_last = model.cell(torch.cat([steps, ids], dim=1).unsqueeze(1))
            ar = model.autoregressive(steps[-model.ar_window :, 0])
            out[b, j] = model.head(h_last)[0, 0] + ar[0] + level
    return out


@pytest.mark.parametrize("kind", ["gru", "two_input"])
def test_a_global_model_is_one_shared_model_run_per_series(kind):
    torch.manual_seed(0)
    cell = (
        cells.baseline("gru", 1 + E, H) if kind == "gru" else spaces.build("two_input", 1 + E, H, 2)
    )
    model = ForecastModel(
        cell, H, M, dropout=0.3, ar_window=3, window_norm="last", layout="global",
        series_embedding=E,
    ).eval()  # fmt: skip
    assert model.head.out_features == 1 and model.autoregressive.in_features == 3
    window = torch.randn(B, P, M)
    with torch.no_grad():
        fast = model(window)
        assert fast.shape == (B, M)
        torch.testing.assert_close(fast, _slow_global_forecast(model, window))


def test_without_ids_a_series_forecast_depends_on_that_series_alone():
    torch.manual_seed(0)
    model = ForecastModel(cells.baseline("lstm", 1, H), H, M, ar_window=2, layout="global").eval()
    window = torch.randn(B, P, M)
    with torch.no_grad():
        together = model(window)
        for j in range(M):
            torch.testing.assert_close(together[:, j], model(window[:, :, j : j + 1])[:, 0])


class _LastInput(nn.Module):
    """A 'cell' whose last state is its last input step: with a unit head, a last-value model."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x[-1]


@pytest.mark.parametrize("embedding", [0, 2])
def test_a_hand_made_global_forecaster_scores_exactly_as_the_naive_row(embedding):
    data = make_windows(synthetic_series(n_steps=300, n_series=5, seed=3), window=6, horizon=2)
    model = ForecastModel(
        _LastInput(), 1 + embedding, 5, layout="global", series_embedding=embedding
    )
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, 0] = 1.0  # reads the value, not the id
        model.head.bias.zero_()
    pred = predict(model, data.test[0], batch_size=7)  # several batches: their order is kept too
    assert torch.equal(pred, data.test[0][:, -1, :])
    kind = Forecasting(config.resolve(overrides={"data": {"window": 6, "horizon": 2}}))
    naive, _ = kind.reference("naive", data)
    scored = kind.score(model, data)
    assert scored == {
        k: v for k, v in naive.items() if k not in ("model", "params", "train_seconds")
    }


def test_a_global_task_probes_the_cell_with_its_own_input_width():
    x, y = torch.randn(10, P, M), torch.randn(10, M)
    windows, cell_input = ForecastTask(
        (x, y), (x, y), 4, layout="global", series_embedding=E
    ).probe()
    assert windows.shape == (10, P, M) and cell_input.shape == (P, 10 * M, 1 + E)
    assert torch.equal(cell_input[..., 0], series_sequences(windows)[..., 0])


def test_ids_need_the_global_layout():
    with pytest.raises(ValueError, match="series_embedding"):
        ForecastModel(cells.baseline("gru", 3, H), H, 3, series_embedding=2)


TINY = {
    "data": {"dataset": "synthetic", "window": 6, "layout": "global"},
    "space": {"nodes": 2, "hidden": 8},
    "search": {"epochs": 1, "batch_size": 64},
    "train": {
        "epochs": 1, "batch_size": 64, "ar_window": 4, "series_embedding": 2,
        "baselines": ["lstm", "gru", "darts_v2", "ar", "naive"],
    },
    "threads": 1,
}  # fmt: skip


def test_a_global_search_retrains_and_scores_every_model(tmp_path):
    run = tmp_path / "run"
    cfg = config.resolve(overrides=config.merge(TINY, {"out": str(run)}))
    result = api.search(cfg)
    names = [row["model"] for row in result.results]
    assert names == ["searched", "lstm", "gru", "darts_v2", "ar", "naive"]
    assert all(
        np.isfinite(row["test_rse"]) and np.isfinite(row["test_corr"]) for row in result.results
    )
    saved = config.resolve(run / "config.yaml")
    assert saved.data.layout == "global" and saved.train.series_embedding == 2
    weights = load(run / "models" / "searched.pt")["state_dict"]
    assert weights["head.weight"].shape == (1, 8)
    assert weights["series_embedding.weight"].shape == (8, 2)  # synthetic: 8 series
    # Re-scoring rebuilds every model in the layout its config.yaml records.
    for row, again in zip(result.results, api.evaluate(run).results, strict=True):
        assert again["test_rse"] == pytest.approx(row["test_rse"], rel=1e-6), row["model"]
    # The linear AR part is one map shared by the series in either layout: the same model.
    multivariate = config.merge(TINY, {"data": {"layout": "multivariate"}, "train": {}})
    multivariate["train"] = {**TINY["train"], "series_embedding": 0}
    alone = api.train(
        config.resolve(overrides={**multivariate, "out": str(tmp_path / "ar")}), baseline="ar"
    )
    ar = next(row for row in result.results if row["model"] == "ar")
    assert alone.results[0]["test_rse"] == ar["test_rse"]


def test_a_global_search_stopped_mid_epoch_resumes_exactly(tmp_path, monkeypatch):
    small = config.merge(TINY, {"search": {"epochs": 2}, "train": {"baselines": ["gru"]}})
    whole = api.search(config.resolve(overrides={**small, "out": str(tmp_path / "whole")}))
    monkeypatch.setattr(faults, "_passed", type(faults._passed)())
    monkeypatch.setenv("MORPHNAS_CRASH_AT", "step:30:TERM")  # epoch 2 of 19-step epochs
    cut = tmp_path / "cut"
    with pytest.raises(StopRequested):
        api.search(config.resolve(overrides={**small, "out": str(cut)}))
    monkeypatch.delenv("MORPHNAS_CRASH_AT")
    assert load(cut / "checkpoints" / "search_last.pt")["position"] is not None
    resumed = api.search(api.resume_config(cut), resume=True)
    assert resumed.genotype == whole.genotype
    drop = ("train_seconds", "compile_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.results] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole.results
    ]
    assert json.loads((cut / "genotype.json").read_text()) == whole.genotype.to_dict()


def test_language_modelling_refuses_the_global_layout():
    with pytest.raises(UserError) as err:
        config.resolve(overrides={"task": "lm", "data": {"layout": "global"}})
    assert "data.layout" in str(err.value) and "\n" not in str(err.value)


def test_a_series_embedding_needs_the_global_layout():
    with pytest.raises(UserError, match=r"needs data\.layout global") as err:
        config.resolve(overrides={"train": {"series_embedding": 4}})
    assert "\n" not in str(err.value)
