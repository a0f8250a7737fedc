"""The classical baselines (``tasks.classical``): the batched VAR forecasts against statsmodels'
own ``forecast``, origin by origin; the VAR order against a brute-force search on valid; the
seasonal naive forecast against a loop over the raw series; the rows a search writes and
``evaluate`` rebuilds."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from statsmodels.tsa.api import VAR

from morphnas import api
from morphnas.data import SeriesData, make_windows, synthetic_series
from morphnas.tasks import classical
from morphnas.tasks.forecasting import rse

FRACTIONS = (0.6, 0.2, 0.2)


def _series(n_steps: int = 260, n_series: int = 3, freq: str | None = "D") -> SeriesData:
    base = synthetic_series(n_steps=n_steps, n_series=n_series, seed=1)
    index = None if freq is None else pd.date_range("2020-01-06", periods=n_steps, freq=freq)
    return SeriesData("s", base.values, base.columns, index, freq, "test", "MIT")


@pytest.mark.parametrize("steps", [1, 4])
def test_batched_var_forecasts_are_statsmodels_forecasts_origin_by_origin(steps):
    values = _series().values
    fitted = VAR(values[:150]).fit(3, trend="c")
    origins = np.array([2, 57, 149, 150, 255])
    batched = classical.var_forecasts(fitted.coefs, fitted.intercept, values, origins, steps)
    for got, origin in zip(batched, origins, strict=True):
        expected = fitted.forecast(values[origin - 2 : origin + 1], steps=steps)[-1]
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_the_var_order_is_the_lowest_valid_rse_of_a_brute_force_search():
    series, window, horizon = _series(), 8, 3
    data = make_windows(series, window, horizon, fractions=FRACTIONS)
    row, test_pred = classical.reference("var", series, FRACTIONS, data)
    scaled, inverse = data.scaler.transform(series.values), data.scaler.inverse
    train_end, valid_end = 156, 208  # 0.6 and 0.8 of 260 rows

    def forecasts(fitted, rows):
        p = fitted.k_ar
        return np.stack(
            [
                fitted.forecast(scaled[r - horizon - p + 1 : r - horizon + 1], horizon)[-1]
                for r in rows
            ]
        )

    valid_rows, test_rows = range(train_end, valid_end), range(valid_end, 260)
    fits = {p: VAR(scaled[:train_end]).fit(p, trend="c") for p in range(1, window + 1)}
    scores = {
        p: rse(inverse(forecasts(f, valid_rows)), series.values[train_end:valid_end])
        for p, f in fits.items()
    }
    best = min(scores, key=scores.get)
    assert 1 < best < window  # neither end of the range: the choice is tested
    assert row["var_order"] == best
    assert row["valid_rse"] == pytest.approx(scores[best], rel=1e-6)
    assert row["params"] == best * 3 * 3 + 3
    expected = forecasts(fits[best], test_rows)
    np.testing.assert_allclose(test_pred.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("horizon", "lag"), [(1, 7), (7, 7), (9, 14)])
def test_seasonal_naive_is_the_same_weekday_at_least_a_horizon_back(horizon, lag):
    """A window of 3 days is shorter than a week: the value comes from the series."""
    series = _series()
    data = make_windows(series, 3, horizon, fractions=FRACTIONS)
    row, test_pred = classical.reference("snaive", series, FRACTIONS, data)
    assert row["season"] == 7 and row["params"] == 0
    expected = [series.values[r - lag] for r in range(208, 260)]
    np.testing.assert_allclose(data.scaler.inverse(test_pred.numpy()), expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("frequency", "season"),
    [
        ("D", 7), ("B", 5), ("h", 24), ("30min", 48), ("15min", 96), ("min", 1440),
        ("W-SUN", 52), ("MS", 12), ("ME", 12), ("QS-JAN", 4), ("3MS", 4),
        ("YS-JAN", None), ("2D", None), ("7min", None), (None, None), ("not a frequency", None),
    ],
)  # fmt: skip
def test_season_lengths(frequency, season):
    assert classical.season_length(frequency) == season


@pytest.mark.parametrize(
    ("name", "series", "reason"),
    [
        ("var", _series(n_steps=60, n_series=40), "no VAR order of 1..2 fits 36 train rows"),
        ("snaive", _series(freq=None), "no timestamps, so no season"),
        ("snaive", _series(freq="2D"), "frequency '2D' has no season"),
        ("snaive", _series(n_steps=20, freq="h"), "reaches before the series' first row"),
    ],
)
def test_a_baseline_that_cannot_be_formed_is_a_warned_row_with_a_note(name, series, reason):
    data = make_windows(series, 2, 1, fractions=FRACTIONS)
    with pytest.warns(UserWarning, match=re.escape(reason)) as caught:
        row, test_pred = classical.reference(name, series, FRACTIONS, data)
    assert str(caught[0].message).startswith(f"baseline {name}: ")
    assert test_pred is None and reason in row["note"]
    assert "valid_rse" not in row and "test_rse" not in row


def test_targets_other_than_the_series_rows_are_refused():
    series = _series()
    data = make_windows(series, 3, 1, fractions=FRACTIONS)
    with pytest.raises(RuntimeError, match="valid targets"):
        classical.reference("snaive", series, (0.6, 0.3, 0.1), data)


def test_a_search_reports_both_rows_and_evaluate_rebuilds_them(finished_run, tmp_path):
    summary = json.loads((finished_run / "summary.json").read_text())
    rows = {row["model"]: row for row in summary["results"]}
    assert rows["snaive"]["season"] == 7 and 1 <= rows["var"]["var_order"] <= 8  # window 8
    run = shutil.copytree(finished_run, tmp_path / "run")
    again = {row["model"]: row for row in api.evaluate(run).results}
    for name in ("snaive", "var"):
        assert all(math.isfinite(rows[name][k]) for k in ("valid_rse", "test_rse", "test_corr"))
        timing = ("train_seconds",)
        assert {k: v for k, v in again[name].items() if k not in timing} == {
            k: v for k, v in rows[name].items() if k not in timing
        }


def test_a_subset_of_targets_is_forecast_from_every_series():
    """``--targets``: the VAR still models every series (the networks read them all) and both
    rows forecast the target columns alone."""
    series, horizon = _series(), 3
    data = make_windows(series, 8, horizon, fractions=FRACTIONS, targets=[series.columns[1]])
    row, test_pred = classical.reference("var", series, FRACTIONS, data)
    scaled = data.scaler.transform(series.values)
    order = row["var_order"]
    fitted = VAR(scaled[:156]).fit(order, trend="c")
    expected = [
        fitted.forecast(scaled[r - horizon - order + 1 : r - horizon + 1], horizon)[-1, 1]
        for r in range(208, 260)
    ]
    assert row["params"] == order * 3 * 3 + 3 and test_pred.shape == (52, 1)
    np.testing.assert_allclose(test_pred[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    _, seasonal = classical.reference("snaive", series, FRACTIONS, data)
    original = data.inverse_targets(seasonal.numpy())[:, 0]
    np.testing.assert_allclose(original, series.values[208 - 7 : 260 - 7, 1], rtol=1e-5)
