"""Forecasting the future (``morphnas forecast``, ``morphnas.forecast``): the rollout and the
conformal widths against brute force, the files, timestamps and errors of the command, and the
intervals' coverage on the synthetic series."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import run_cli
from morphnas import api, cli, run_files
from morphnas import forecast as forecast_mod
from morphnas.data import SeriesData, make_windows, synthetic_series
from morphnas.data.series import chronological_split


def _slow_rollout(predict, values, origin, steps, window, horizon, targets=None, ahead=None):
    """Row by row: the row ``origin + k`` from the rows ``origin+k-h-P+1 .. origin+k-h``, each
    taken from the data when it is at most ``origin`` and from an earlier forecast otherwise
    (only the targets are forecast; ``ahead``'s columns are known for every row)."""
    targets = list(range(values.shape[1])) if targets is None else targets
    known = {r: values[r].copy() for r in range(origin + 1)}
    out = []
    for k in range(1, steps + 1):
        target = origin + k
        rows = range(target - horizon - window + 1, target - horizon + 1)
        window_rows = [known[r] for r in rows]
        if ahead is not None:
            window_rows = [
                np.concatenate([known_row, ahead[r]])
                for known_row, r in zip(window_rows, rows, strict=True)
            ]
        batch = torch.tensor(np.stack(window_rows)[None], dtype=torch.float32)
        forecast = predict(batch)[0].numpy().astype(np.float64)
        known[target] = np.full(values.shape[1], np.nan)
        known[target][targets] = forecast
        out.append(forecast)
    return np.stack(out)


@pytest.mark.parametrize(
    ("window", "horizon", "steps", "targets", "calendar"),
    [(4, 1, 6, None, 0), (3, 3, 7, None, 0), (5, 2, 2, None, 0), (4, 3, 3, [2, 0], 0),
     (3, 2, 5, None, 2)],
)  # fmt: skip
def test_rollout_matches_a_row_by_row_forecast(window, horizon, steps, targets, calendar):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(30, 3))
    ahead = rng.normal(size=(30 + steps, calendar)) if calendar else None
    outputs = 3 if targets is None else len(targets)
    weights = torch.randn(window, 3 + calendar, outputs, generator=torch.Generator().manual_seed(1))
    predict = lambda windows: torch.einsum("npm,pmo->no", windows, weights)  # noqa: E731
    origins = np.array([window + horizon - 2, 12, 29])
    fast = forecast_mod.rollout(
        predict, values, origins, steps, window, horizon, targets=targets, ahead=ahead
    )
    for i, origin in enumerate(origins):
        slow = _slow_rollout(predict, values, int(origin), steps, window, horizon, targets, ahead)
        np.testing.assert_allclose(fast[i], slow, rtol=1e-5, atol=1e-6)


def test_conformal_widths_are_the_finite_sample_quantile():
    rng = np.random.default_rng(2)
    residuals = rng.normal(size=(40, 3, 2))
    residuals[30:, 2, :] = np.nan  # the third step has 30 residuals
    for level in (0.8, 0.95):
        widths = forecast_mod.conformal_widths(residuals, level)
        for step in range(3):
            for series in range(2):
                seen = np.sort(
                    np.abs(residuals[:, step, series][~np.isnan(residuals[:, step, series])])
                )
                rank = math.ceil((len(seen) + 1) * level)
                assert widths[step, series] == seen[rank - 1]
    too_few = forecast_mod.conformal_widths(residuals[:10], 0.95)  # ceil(11 * 0.95) = 11 > 10
    assert np.isnan(too_few).all()


def test_uncalibrated_steps_grow_from_the_last_calibrated_one():
    widths = np.array([[1.0], [2.0], [np.nan], [np.nan]])
    filled, calibrated = forecast_mod.fill_uncalibrated(widths)
    assert calibrated == 2
    np.testing.assert_allclose(filled[:, 0], [1.0, 2.0, 2.0 * math.sqrt(3 / 2), 2.0 * math.sqrt(2)])


@pytest.mark.parametrize(
    ("frequency", "start", "expected"),
    [
        ("D", "2021-02-26", ["2021-02-27", "2021-02-28", "2021-03-01"]),
        ("B", "2021-02-26", ["2021-03-01", "2021-03-02", "2021-03-03"]),  # a Friday
        ("h", "2021-02-28 22:00", ["2021-02-28 23:00", "2021-03-01 00:00", "2021-03-01 01:00"]),
        ("30min", "2021-12-31 23:00", ["2021-12-31 23:30", "2022-01-01 00:00", "2022-01-01 00:30"]),
        (None, "2021-01-01", ["2021-01-08", "2021-01-15", "2021-01-22"]),  # weekly, inferred
    ],
)
def test_future_timestamps_continue_the_series(frequency, start, expected):
    step = {"D": "D", "B": "B", "h": "h", "30min": "30min", None: "7D"}[frequency]
    index = pd.date_range(end=start, periods=10, freq=step)
    series = SeriesData("s", np.zeros((10, 1)), ("a",), index, frequency, "test", "none")
    assert list(forecast_mod.future_index(series, 3)) == list(pd.DatetimeIndex(expected))
    plain = SeriesData("s", np.zeros((10, 1)), ("a",), None, None, "test", "none")
    assert list(forecast_mod.future_index(plain, 2)) == [10, 11]


@pytest.mark.parametrize("steps", [1, 8])
def test_split_conformal_coverage_on_the_synthetic_series(steps):
    """Calibrated on valid, checked on test, on the synthetic series (2000 rows, 8 series): the
    80 % and 95 % intervals cover within 5 points of nominal, at one step and eight (recursive).
    The forecaster is a fixed AR(1) fitted by least squares on train: coverage is the intervals'
    property, whatever the model."""
    series = synthetic_series()
    windows = make_windows(series, 1, 1)
    split = chronological_split(series.n_steps, (0.6, 0.2, 0.2))
    scaled = windows.scaler.transform(series.values)
    x, y = scaled[split.train][:-1], scaled[split.train][1:]
    coef = torch.tensor(np.linalg.lstsq(x, y, rcond=None)[0], dtype=torch.float32)
    config = SimpleNamespace(data=SimpleNamespace(window=1, horizon=1, split=(0.6, 0.2, 0.2)))
    source = forecast_mod._Source(
        run=SimpleNamespace(data=windows, config=config), model="ar1",
        predict=lambda w: w[:, -1, :] @ coef, series=series, history=series,
        layout=windows.layout,
    )  # fmt: skip
    _, coverage = source.widths(steps, (80, 95))
    for level, entry in coverage.items():
        assert abs(entry["test_coverage"] - float(level) / 100) <= 0.05, (level, entry)
        assert entry["calibrated_steps"] == steps


@pytest.fixture(scope="module")
def forecast_run(finished_run: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("forecast") / "run"
    shutil.copytree(finished_run, run)
    return run


def _data_file(run: Path) -> Path:
    return run_files.read_config(run).data.csv


def _forecast(*args: str) -> dict:
    done = CliRunner().invoke(cli.app, ["forecast", *args, "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def test_forecast_writes_the_future_with_intervals(forecast_run):
    first = _forecast(str(forecast_run), "--steps", "5", "--model", "searched")
    frame = pd.read_csv(forecast_run / "forecast.csv", parse_dates=["date"])
    assert len(frame) == 5  # K = 5, beyond the trained horizon of 1: recursive
    history = pd.read_csv(_data_file(forecast_run), parse_dates=["date"])
    assert list(frame["date"]) == list(pd.date_range(history["date"].iloc[-1], periods=6)[1:])
    assert list(frame.columns[:6]) == ["date", "s0", "s0-lo-95", "s0-lo-80", "s0-hi-80", "s0-hi-95"]
    values = frame.drop(columns="date").to_numpy()
    assert np.isfinite(values).all()
    assert (frame["s0-lo-95"] <= frame["s0-lo-80"]).all()
    assert (frame["s0-lo-80"] <= frame["s0"]).all() and (frame["s0"] <= frame["s0-hi-80"]).all()
    assert (forecast_run / "plots/future.png").stat().st_size > 0
    summary = json.loads((forecast_run / "summary.json").read_text())
    assert summary["forecast"]["model"] == "searched"
    assert set(summary["forecast"]["levels"]) == {"80", "95"}
    again = _forecast(str(forecast_run), "--steps", "5", "--model", "searched")
    assert again["forecast"] == first["forecast"]  # the same forecast twice


def test_forecast_matches_the_model_within_its_horizon(forecast_run):
    """The first step is the model's own forecast of the window that ends at the last row."""
    run = api.load_trained(forecast_run)
    model = dict((name, m) for name, _, m in run.models)["lstm"]
    series = run.kind.series()
    window = run.data.scaler.transform(series.values[-run.config.data.window :])
    with torch.no_grad():
        expected = model.eval()(torch.tensor(window[None], dtype=torch.float32))
    expected = run.data.scaler.inverse(expected.numpy())[0]
    got = _forecast(str(forecast_run), "--steps", "1", "--model", "lstm", "--out",
                    str(forecast_run / "lstm.csv"))  # fmt: skip
    row = got["forecast"][0]
    np.testing.assert_allclose([row[c] for c in run.data.columns], expected, rtol=1e-5)


def test_forecast_after_newer_data(forecast_run, tmp_path):
    history = pd.read_csv(_data_file(forecast_run))
    newer = history.iloc[:-10]  # "newer" data that stops 10 rows earlier: a different origin
    newer.to_csv(tmp_path / "newer.csv", index=False)
    got = _forecast(str(forecast_run), "--csv", str(tmp_path / "newer.csv"), "--steps", "2",
                    "--out", str(tmp_path / "f.csv"))  # fmt: skip
    assert got["forecast"][0]["date"].startswith(history["date"].iloc[-10])
    other = history.rename(columns={"s1": "t1"})
    other.to_csv(tmp_path / "other.csv", index=False)
    code, lines = run_cli("forecast", str(forecast_run), "--csv", str(tmp_path / "other.csv"))
    assert code == 2 and len(lines) == 1 and "s1" in lines[0], lines


def test_forecast_refusals(forecast_run, tmp_path):
    for args, fragment in [
        (["--steps", "0"], "--steps"),
        (["--level", "80,120"], "--level"),
        (["--model", "nope"], "choose one of"),
    ]:
        code, lines = run_cli("forecast", str(forecast_run), *args)
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (args, lines)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(forecast_run, unfinished)
    (unfinished / "summary.json").unlink()
    code, lines = run_cli("forecast", str(unfinished))
    assert code == 2 and "not finished" in lines[0], lines
    other = tmp_path / "other-task"
    shutil.copytree(forecast_run, other)
    text = (other / "config.yaml").read_text().replace("task: forecast", "task: classify")
    (other / "config.yaml").write_text(text)
    code, lines = run_cli("forecast", str(other))
    assert code == 2 and "'classify' run" in lines[0], lines


def test_backtest_matches_evaluate_on_the_test_span(forecast_run, tmp_path):
    """Cutoffs covering every test target one step ahead: the backtest's forecasts are the
    model's test predictions, so its metrics are evaluate's."""
    from morphnas.tasks.forecasting import forecast_metrics

    run = api.load_trained(forecast_run)
    n_test = len(run.data.test[1])
    frame = forecast_mod.cross_validation(forecast_run, n_test, 1, 1, model="gru")
    pred = frame.pivot(index="date", columns="unique_id", values="gru")[list(run.data.columns)]
    truth = frame.pivot(index="date", columns="unique_id", values="y")[list(run.data.columns)]
    metrics = forecast_metrics(pred.to_numpy(), truth.to_numpy())
    row = next(r for r in api.evaluate(forecast_run).results if r["model"] == "gru")
    for key in ("rse", "corr", "mae", "rmse"):
        assert metrics[key] == pytest.approx(row[f"test_{key}"], rel=1e-5)
    code, _ = run_cli("forecast", str(forecast_run), "--windows", "3", "--steps", "2",
                      "--out", str(tmp_path / "cv.csv"))  # fmt: skip
    assert code == 0 and len(pd.read_csv(tmp_path / "cv.csv")) == 3 * 2 * 3


def test_forecast_with_targets_and_calendar_inputs(tmp_path):
    """Targets s1,s0 of three series, the day of week as an input: the first step is the
    model's forecast of the last window with the calendar of the day it forecasts; beyond the
    horizon, s2's unknown future is refused."""
    from conftest import _finished_run
    from morphnas.data.calendar import calendar_features

    run_dir = _finished_run(
        tmp_path, "--targets", "s1,s0", "--calendar", "dayofweek",
        "--set", "train.baselines=[lstm,naive]", "--no-tensorboard",
    )  # fmt: skip
    got = _forecast(str(run_dir), "--steps", "1", "--model", "lstm", "--level", "90")
    run = api.load_trained(run_dir)
    series = run.kind.series()
    window = run.config.data.window
    days = series.index[-window + 1 :].append(
        pd.DatetimeIndex([series.index[-1] + pd.Timedelta("1D")])
    )
    inputs = np.concatenate(
        [
            run.data.scaler.transform(series.values[-window:]),
            calendar_features(days, ["dayofweek"]),
        ],
        axis=1,
    )
    model = dict((name, m) for name, _, m in run.models)["lstm"].eval()
    with torch.no_grad():
        expected = model(torch.tensor(inputs[None], dtype=torch.float32)).numpy()
    expected = run.data.inverse_targets(expected)[0]
    row = got["forecast"][0]
    assert list(row) == ["date", "s1", "s1-lo-90", "s1-hi-90", "s0", "s0-lo-90", "s0-hi-90"]
    np.testing.assert_allclose([row["s1"], row["s0"]], expected, rtol=1e-5)
    code, lines = run_cli("forecast", str(run_dir), "--steps", "2")
    assert code == 2 and "s2 is an input but not forecast" in lines[0], lines
    naive = _forecast(str(run_dir), "--steps", "1", "--model", "naive", "--level", "90")
    last = series.values[-1, [series.columns.index("s1"), series.columns.index("s0")]]
    np.testing.assert_allclose([naive["forecast"][0][c] for c in ("s1", "s0")], last, rtol=1e-6)
