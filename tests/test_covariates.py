"""Gap filling (`--fill`), calendar features (`--calendar`) and forecasting a subset of the
series (`--targets`): each checked against a slow, obviously correct version."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import run_cli
from morphnas.data import synthetic_series
from morphnas.data.calendar import calendar_features, feature_columns, future_index, resolve
from morphnas.data.csv import load_csv
from morphnas.data.series import SeriesData, make_windows
from morphnas.errors import UserError
from morphnas.tasks.forecasting import ForecastModel


def _gappy_csv(path: Path, freq: str, drop: list[int], empty: tuple[int, str] | None) -> Path:
    """A 40-row, two-column series on `freq` with rows `drop` removed and one cell emptied."""
    rng = np.random.default_rng(3)
    index = pd.date_range("2021-03-01", periods=40, freq=freq)
    frame = pd.DataFrame({"date": index, "a": rng.normal(size=40).cumsum(), "b": rng.random(40)})
    if empty is not None:
        frame.loc[empty[0], empty[1]] = np.nan
    frame.drop(index=drop).to_csv(path, index=False, float_format="%.10g")
    return path


def _interpolated_by_hand(times: np.ndarray, known: dict[int, float]) -> np.ndarray:
    """Linear interpolation in time, one cell at a time; before the first known cell, its value."""
    out = np.empty(len(times))
    rows = sorted(known)
    for i, t in enumerate(times):
        before = [r for r in rows if r <= i]
        after = [r for r in rows if r >= i]
        if not before:
            out[i] = known[after[0]]
        elif not after:
            out[i] = known[before[-1]]
        elif before[-1] == after[0]:
            out[i] = known[i]
        else:
            r0, r1 = before[-1], after[0]
            share = (t - times[r0]) / (times[r1] - times[r0])
            out[i] = known[r0] + share * (known[r1] - known[r0])
    return out


@pytest.mark.parametrize("freq", ["D", "h", "B"])
def test_fill_matches_pandas_resample_and_a_hand_interpolation(tmp_path: Path, freq: str) -> None:
    path = _gappy_csv(tmp_path / "gaps.csv", freq, drop=[4, 5, 17, 30], empty=(0, "b"))
    raw = pd.read_csv(path, parse_dates=["date"]).set_index("date")
    grid = raw.resample(freq).asfreq()
    with pytest.warns(UserWarning, match="filled 5 of 40 rows"):
        interpolated = load_csv(path, fill="interpolate")
    with pytest.warns(UserWarning, match="by forward fill"):
        carried = load_csv(path, fill="ffill")
    report = interpolated.fill_report
    assert (report.rows_added, report.cells_filled, report.rows_filled, report.rows) == (
        4,
        1,
        5,
        40,
    )
    assert interpolated.n_steps == 40 and interpolated.index.equals(grid.index)
    assert interpolated.frequency == freq
    expected = grid.interpolate("time", limit_direction="both").to_numpy()
    np.testing.assert_allclose(interpolated.values, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(carried.values, grid.ffill().bfill().to_numpy(), rtol=0, atol=0)
    seconds = (grid.index - grid.index[0]).total_seconds().to_numpy()
    for j, name in enumerate(("a", "b")):
        column = grid[name].to_numpy()
        known = {i: v for i, v in enumerate(column) if not math.isnan(v)}
        by_hand = _interpolated_by_hand(seconds, known)
        np.testing.assert_allclose(interpolated.values[:, j], by_hand, rtol=0, atol=1e-9)


def test_fill_refuses_more_than_max_fill_and_without_fill_names_the_flag(tmp_path: Path) -> None:
    path = _gappy_csv(tmp_path / "gaps.csv", "D", drop=list(range(5, 15)), empty=None)
    with pytest.raises(UserError, match=r"10 of 40 rows \(25\.0%\).*--max-fill 0\.2"):
        load_csv(path, fill="interpolate")
    assert load_csv(path, fill="ffill", max_fill=0.3).fill_report.rows_added == 10
    with pytest.raises(UserError, match="--fill interpolate"):
        load_csv(path)
    empty = _gappy_csv(tmp_path / "empty.csv", "D", drop=[], empty=(7, "a"))
    with pytest.raises(UserError, match=r"data row 8 is missing.*--fill"):
        load_csv(empty)
    with pytest.warns(UserWarning, match="0 missing timestamps, 1 empty cells"):
        filled = load_csv(empty, fill="interpolate")
    raw = pd.read_csv(empty)["a"].to_numpy()
    assert filled.values[7, 0] == pytest.approx((raw[6] + raw[8]) / 2)


def test_fill_keeps_duplicate_timestamps_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("date,a\n2021-01-01,1\n2021-01-02,2\n2021-01-02,3\n2021-01-04,5\n")
    with pytest.raises(UserError, match="appears in data rows 2 and 3"):
        load_csv(path, fill="interpolate")


def test_calendar_features_are_the_hand_computed_sines_and_cosines() -> None:
    index = pd.DatetimeIndex(["2021-03-01 06:00", "2020-12-31 18:00"])  # a Monday; a leap day 366
    got = calendar_features(index, ["hour", "dayofweek", "month", "dayofyear"])

    def pair(position: float, length: float) -> list[float]:
        angle = 2 * math.pi * position / length
        return [math.sin(angle), math.cos(angle)]

    expected = [
        [1.0, 0.0, 0.0, 1.0, *pair(2, 12), *pair(59, 365)],  # 6h, Monday, March, 1 March
        [-1.0, 0.0, *pair(3, 7), *pair(11, 12), *pair(365, 366)],  # 18h, Thursday, December
    ]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert feature_columns(["hour"]) == ("cal_hour_sin", "cal_hour_cos")
    hourly = pd.date_range("2021-01-01", periods=50, freq="h")
    assert resolve(["auto"], hourly, "x") == ("hour", "dayofweek")
    assert resolve(["auto"], pd.date_range("2021-01-01", periods=30, freq="MS"), "x") == ("month",)
    assert future_index(hourly, "h", 2).equals(
        pd.date_range("2021-01-03 02:00", periods=2, freq="h")
    )


def test_windows_with_targets_and_calendar_match_a_loop() -> None:
    base = synthetic_series(n_steps=60, n_series=3, seed=2)
    index = pd.date_range("2021-01-01", periods=60, freq="h")
    data = SeriesData("s", base.values, ("a", "b", "c"), index, "h", "test", "none")
    window, horizon = 4, 3
    splits = make_windows(data, window, horizon, targets=["c", "a"], calendar=["hour"])
    layout = splits.layout
    assert splits.columns == ("c", "a") and layout.target_positions == (2, 0)
    assert layout.inputs == ("a", "b", "c", "cal_hour_sin", "cal_hour_cos")
    scaled = splits.scaler.transform(data.values)
    x, y = splits.test
    first = 60 - len(y)
    for i in range(len(y)):
        r = first + i
        for j in range(window):
            row = r - horizon - window + 1 + j
            hour = index[row + horizon].hour  # the calendar of the step `horizon` rows later
            expect = [
                *scaled[row],
                math.sin(2 * math.pi * hour / 24),
                math.cos(2 * math.pi * hour / 24),
            ]
            np.testing.assert_allclose(x[i, j].numpy(), expect, atol=1e-6)
        np.testing.assert_allclose(y[i].numpy(), scaled[r, [2, 0]], atol=1e-6)
    np.testing.assert_allclose(
        splits.inverse_targets(y.numpy()), data.values[first:, [2, 0]], atol=1e-4
    )
    np.testing.assert_allclose(
        splits.scale_targets(data.values[first:, [2, 0]]), y.numpy(), atol=1e-6
    )
    plain = make_windows(data, window, horizon)
    assert plain.input_columns == plain.columns == ("a", "b", "c")
    assert plain.target_positions == (0, 1, 2)


class _Recorder(nn.Module):
    """A stand-in cell: remembers the sequence it was given and returns a zero state."""

    def forward(self, sequence: torch.Tensor) -> tuple[None, torch.Tensor]:
        self.seen = sequence
        return None, sequence.new_zeros(sequence.shape[1], 2)


def test_model_ar_and_window_norm_act_on_each_targets_own_column() -> None:
    torch.manual_seed(0)
    window = torch.randn(5, 6, 4)
    targets = [3, 1]
    model = ForecastModel(_Recorder(), 2, 2, ar_window=3, window_norm="last", targets=targets)
    out = model(window)
    weight, bias = model.autoregressive.weight[0], model.autoregressive.bias[0]
    head_bias = model.head.bias
    for b in range(5):
        for k, t in enumerate(targets):
            last = window[b, -1, t]
            ar = sum(weight[i] * (window[b, 3 + i, t] - last) for i in range(3)) + bias
            assert out[b, k].item() == pytest.approx((ar + head_bias[k] + last).item(), abs=1e-5)
    seen = model.cell.seen.transpose(0, 1)  # (B, P, inputs)
    torch.testing.assert_close(seen[..., [0, 2]], window[..., [0, 2]])
    torch.testing.assert_close(seen[..., 3], window[..., 3] - window[:, -1:, 3])


def test_search_with_targets_calendar_and_fill_scores_the_targets_only(tmp_path: Path) -> None:
    path = _gappy_csv(tmp_path / "gaps.csv", "D", drop=[3, 22], empty=None)
    out = tmp_path / "run"
    code, lines = run_cli(
        "search", "--csv", str(path), "--targets", "b", "--calendar", "auto", "--fill",
        "interpolate", "--epochs", "1", "--retrain-epochs", "1", "--nodes", "1", "--hidden",
        "4", "--window", "4", "--threads", "1", "--set", "train.baselines=[naive]",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, lines
    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"] == ["b"]
    assert summary["calendar"] == ["dayofweek", "dayofyear"]
    assert summary["inputs"][:2] == ["a", "b"] and len(summary["inputs"]) == 6
    assert summary["filled"]["rows_added"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = load_csv(path, fill="interpolate").values[:, 1]
    naive = next(row for row in summary["results"] if row["model"] == "naive")
    test_rows = np.arange(32, 40)  # the last 20% of 40 rows; the naive forecast is the row before
    assert naive["test_mae"] == pytest.approx(
        np.abs(values[test_rows - 1] - values[test_rows]).mean()
    )
    assert (out / "plots/forecast.png").is_file()


def test_bad_targets_and_calendar_are_one_line_errors(tmp_path: Path) -> None:
    path = _gappy_csv(tmp_path / "s.csv", "D", drop=[], empty=None)
    plain = tmp_path / "plain.csv"
    pd.read_csv(path).drop(columns="date").to_csv(plain, index=False)
    tiny = ("--epochs", "1", "--out", str(tmp_path / "run"))
    cases = [
        (("--csv", str(path), "--targets", "bb"), "did you mean 'b'"),
        (("--csv", str(plain), "--calendar", "auto"), "has no timestamps"),
        (("--csv", str(path), "--calendar", "hours"), "did you mean 'hour'"),
        (("--csv", str(path), "--targets", "a", "--set", "data.layout=global"), "multivariate"),
    ]
    for args, fragment in cases:
        code, lines = run_cli("search", *args, *tiny)
        assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
