"""The ``peers`` extra: NeuralForecast's NHITS and LSTM on our exact windows, split and metrics.

The tests that fit a model need neuralforecast (``make setup`` installs it; elsewhere they are
skipped); they train for a handful of steps on small generated series.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from morphnas import api, peers, suite
from morphnas import config as config_mod
from morphnas import data as data_mod
from morphnas.errors import UserError

FRACTIONS = (0.6, 0.2, 0.2)
TINY = peers.PeerBudget(max_steps=6, val_check_steps=2, patience=5)


def _needs_neuralforecast() -> None:
    if not peers.available():
        pytest.importorskip("neuralforecast")


def _series(values: np.ndarray) -> data_mod.SeriesData:
    columns = [f"s{i}" for i in range(values.shape[1])]
    return data_mod.SeriesData("test", values, columns, None, None, "generated", "none")


def _waves(n_steps: int = 240, n_series: int = 2) -> data_mod.SeriesData:
    """Sines of period 8 (phase per series) and a little noise: a shift of one row is visible."""
    rows = np.arange(n_steps)[:, None]
    noise = np.random.default_rng(0).normal(0.0, 0.05, (n_steps, n_series))
    return _series(np.sin(2 * np.pi * rows / 8 + np.arange(n_series)) + noise)


def _fit(series, window=16, horizon=1, name="nf_nhits", budget=TINY, seed=0, tmp=None):
    windows = data_mod.make_windows(series, window, horizon, fractions=FRACTIONS)
    fitted, (valid, test), _ = peers.fit_predict(
        name, series, windows, FRACTIONS, seed, budget, tmp or Path(".")
    )
    return windows, fitted, valid, test


def test_long_frame_is_series_after_series_with_row_numbers():
    frame = peers.long_frame(np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]))
    assert list(frame.columns) == ["unique_id", "ds", "y"]
    assert frame["unique_id"].tolist() == [0, 0, 0, 1, 1, 1]
    assert frame["ds"].tolist() == [0, 1, 2, 0, 1, 2]
    assert frame["y"].tolist() == [1.0, 2.0, 3.0, 10.0, 20.0, 30.0]


def test_the_hth_step_of_each_path_is_kept_in_target_order():
    # Two series, horizon 2: cutoffs 3 and 4 forecast rows 4..5 and 5..6.
    rows = []
    for uid in (1, 0):  # out of order on purpose
        for cutoff in (4, 3):
            for step in (1, 2):
                ds = cutoff + step
                rows.append({"unique_id": uid, "ds": ds, "cutoff": cutoff, "m": 100 * uid + ds})
    paths = pd.DataFrame(rows).assign(y=lambda f: f["m"] + 0.5)
    rows, prediction, truth = peers._hth_step(paths, "m", horizon=2, n_series=2)
    assert rows.tolist() == [5, 6]
    assert prediction.tolist() == [[5, 105], [6, 106]]
    assert truth.tolist() == [[5.5, 105.5], [6.5, 106.5]]


def test_budget_and_requests_are_checked():
    with pytest.raises(UserError, match="max_steps must be at least 1"):
        peers.PeerBudget(max_steps=0)
    lm = config_mod.resolve(None, {"task": "lm"})
    with pytest.raises(UserError, match="no language model"):
        peers.run(lm)
    forecast = config_mod.resolve(None, {"data": {"dataset": "synthetic"}})
    with pytest.raises(UserError, match="unknown peer 'nf_tft'"):
        peers.run(forecast, models=["nf_tft"])


def test_describe_names_the_install_hint_where_neuralforecast_is_missing():
    line = peers.describe(peers.DEFAULT_BUDGET, installed=False)
    assert "pip install 'morphnas[peers]'" in line and line == suite.PEERS
    assert peers.describe(None) == "peers: none (turned off)"


@pytest.mark.parametrize("name", peers.MODELS)
def test_forecasts_are_the_windows_valid_and_test_targets(name, tmp_path):
    """Horizon 3: the adapter keeps the 3rd step of each rolling path; its own check (the ``y``
    neuralforecast returns there equals ``WindowedSplits``' targets) would raise otherwise."""
    _needs_neuralforecast()
    windows, _, valid, test = _fit(_waves(), window=12, horizon=3, name=name, tmp=tmp_path)
    assert valid.shape == windows.valid[1].shape and test.shape == windows.test[1].shape
    assert valid.dtype == test.dtype == torch.float32
    assert torch.isfinite(valid).all() and torch.isfinite(test).all()


@pytest.mark.parametrize("shift", ["rows", "values"])
def test_a_shifted_target_is_refused_not_scored(shift, monkeypatch, tmp_path):
    _needs_neuralforecast()
    kept = peers._hth_step

    def shifted(paths, name, horizon, n_series):
        rows, prediction, truth = kept(paths, name, horizon, n_series)
        if shift == "rows":  # the forecasts labelled one target row late
            return rows[1:], prediction[:-1], truth[:-1]
        return rows, np.roll(prediction, 1, axis=0), np.roll(truth, 1, axis=0)

    monkeypatch.setattr(peers, "_hth_step", shifted)
    with pytest.raises(RuntimeError, match="do not line up"):
        _fit(_waves(), tmp=tmp_path)


def test_forecasts_score_far_better_aligned_than_shifted(tmp_path):
    """On sines of period 8 the fitted forecast is close to its own target row and far from
    the next one: an off-by-one between forecasts and targets would show here."""
    _needs_neuralforecast()
    budget = peers.PeerBudget(max_steps=10, val_check_steps=5, patience=5)
    windows, _, _, test = _fit(_waves(), window=16, horizon=2, budget=budget, tmp=tmp_path)
    target = windows.test[1]
    aligned = float(((test - target) ** 2).mean())
    for forecast, other_row in ((test[1:], target[:-1]), (test[:-1], target[1:])):
        shifted = float(((forecast - other_row) ** 2).mean())
        assert aligned < 0.2 * shifted, (aligned, shifted)


def test_the_test_rows_choose_nothing(tmp_path):
    """Other test rows, same fit: same weights kept, same valid forecasts; the kept weights
    are those of the lowest valid loss, whose value our own valid MSE reproduces."""
    _needs_neuralforecast()
    series = _waves()
    split = data_mod.chronological_split(series.n_steps, FRACTIONS)
    other = series.values.copy()
    other[split.test] = 50.0 + np.random.default_rng(1).normal(size=other[split.test].shape)
    windows, fitted, valid, test = _fit(series, tmp=tmp_path)
    _, fitted_other, valid_other, test_other = _fit(_series(other), tmp=tmp_path)
    keeper, keeper_other = peers._keeper(fitted), peers._keeper(fitted_other)
    assert keeper.curve == keeper_other.curve and keeper.best_step == keeper_other.best_step
    assert torch.equal(valid, valid_other) and not torch.equal(test, test_other)
    best_step, best_loss = min(keeper.curve, key=lambda point: point[1])
    assert keeper.best_step == best_step and len(keeper.curve) == TINY.max_steps // 2
    assert float(((valid - windows.valid[1]) ** 2).mean()) == pytest.approx(best_loss, rel=1e-4)


def test_the_same_seed_gives_the_same_numbers(synthetic_csv, tmp_path):
    _needs_neuralforecast()
    scratch = tmp_path / "out"
    scratch.mkdir()
    data = {"csv": str(synthetic_csv), "window": 8}
    config = config_mod.resolve(None, {"data": data, "seed": 3, "out": str(scratch)})
    first = peers.run(config, TINY, ["nf_nhits"])
    again = peers.run(config, TINY, ["nf_nhits"])
    other = peers.run(config.model_copy(update={"seed": 4}), TINY, ["nf_nhits"])
    keys = ("valid_rse", "test_rse", "test_corr", "params", "best_step", "valid_curve")
    assert [first[0][k] for k in keys] == [again[0][k] for k in keys]
    assert first[0]["test_rse"] != other[0]["test_rse"]
    assert first[0]["model"] == "nf_nhits" and first[0]["peer"] is True
    # scored like our models: api._score_predictions' figures
    assert {"valid_rse", "test_rse", "test_corr", "test_rse_scaled"} <= set(first[0])
    assert list(scratch.iterdir()) == []  # nothing written without a run directory


def test_stored_peers_are_reused_only_for_the_same_record(monkeypatch, tmp_path):
    config = config_mod.resolve(None, {"data": {"dataset": "synthetic"}, "seed": 1})
    calls = []

    def fake_run(config, budget, models, root_dir=None):
        calls.append(budget.max_steps)
        return [{"model": m, "peer": True, "steps": budget.max_steps} for m in models]

    monkeypatch.setattr(peers, "run", fake_run)
    stored = peers.run_stored(tmp_path, config, TINY)
    saved = json.loads((tmp_path / peers.FILE).read_text())
    assert saved["results"] == stored and saved["record"]["seed"] == 1
    assert saved["record"]["data"]["dataset"] == "synthetic"
    assert peers.run_stored(tmp_path, config, TINY, reuse=True) == stored and calls == [6]
    longer = peers.PeerBudget(max_steps=7, val_check_steps=2)
    peers.run_stored(tmp_path, config, longer, reuse=True)  # another budget: run again
    peers.run_stored(tmp_path, config, longer)  # no reuse: run again
    assert calls == [6, 7, 7]
    assert [p.name for p in tmp_path.iterdir()] == [peers.FILE]  # no temporary left


def test_peers_are_rows_of_the_table_but_never_the_best_baseline():
    rows = [
        {"dataset": "d", "seed": 0, "model": api.SEARCHED, "valid_rse": 0.5, "test_rse": 0.5,
         "test_corr": 0.9, "baseline": False, "genotype": "g"},
        {"dataset": "d", "seed": 0, "model": "lstm", "valid_rse": 0.6, "test_rse": 0.6,
         "test_corr": 0.8, "baseline": True},
        {"dataset": "d", "seed": 0, "model": "nf_nhits", "valid_rse": 0.1, "test_rse": 0.1,
         "test_corr": 0.99, "baseline": False, "peer": True},
    ]  # fmt: skip
    (paired,) = suite.paired_differences(rows)
    assert paired["best_baseline"] == "lstm"
    table = suite.aggregate(rows)["table"]
    assert [r["model"] for r in table] == [api.SEARCHED, "lstm", "nf_nhits"]
    assert table[2]["peer"] is True and "peer" not in table[1]


def test_benchmark_adds_the_peer_rows_and_reuses_them(tmp_path):
    _needs_neuralforecast()
    out = tmp_path / "bench"
    tiny = {"search": {"epochs": 1}, "train": {"epochs": 1}, "space": {"nodes": 2, "hidden": 4}}
    budget = peers.PeerBudget(max_steps=2, val_check_steps=2, patience=1)
    kwargs = {"quick": True, "overrides": tiny, "out": out, "peer_budget": budget}
    result = suite.benchmark(["synthetic"], [0], **kwargs)
    written = json.loads((out / "benchmark.json").read_text())
    models = [row["model"] for row in written["table"]]
    assert models[-2:] == ["nf_nhits", "nf_lstm"] and models[0] == api.SEARCHED
    assert all(row.get("peer") for row in written["table"][-2:])
    assert written["paired"][0]["best_baseline"] not in peers.MODELS
    assert result.results[-1]["model"] == "nf_lstm"
    assert "neuralforecast" in written["peers"] and "≤ 2 steps" in written["peers"]
    markdown = (out / "benchmark.md").read_text()
    assert "| synthetic | nf_nhits (*peer*) | 1 |" in markdown
    assert "not baselines" in markdown
    stored = out / "synthetic-seed0" / peers.FILE
    before = stored.stat().st_mtime_ns
    suite.benchmark(["synthetic"], [0], reuse=True, **kwargs)
    assert stored.stat().st_mtime_ns == before  # kept, not run again
    assert not (out / "synthetic-seed0" / "lightning_logs").exists()
