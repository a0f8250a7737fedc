"""``morphnas.Forecaster``: fit / predict / cross_validation / save / load over a run directory,
in the wide and the long (``unique_id, ds, y``) formats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import morphnas
from morphnas.errors import UserError

TINY = dict(window=6, nodes=2, hidden=6, epochs=1, retrain_epochs=1, baselines=[], threads=1)


@pytest.fixture(scope="module")
def wide_frame(tmp_path_factory) -> pd.DataFrame:
    from conftest import _daily_csv

    path = _daily_csv(tmp_path_factory.mktemp("forecaster") / "series.csv")
    return pd.read_csv(path, parse_dates=["date"], index_col="date")


@pytest.fixture(scope="module")
def fitted(wide_frame, tmp_path_factory) -> morphnas.Forecaster:
    work = tmp_path_factory.mktemp("wide")
    return morphnas.Forecaster(**TINY, workdir=work).fit(wide_frame)


def _long(wide: pd.DataFrame) -> pd.DataFrame:
    frame = wide.reset_index().melt(id_vars="date", var_name="unique_id", value_name="y")
    return frame.rename(columns={"date": "ds"})


def test_wide_and_long_give_the_same_forecast(fitted, wide_frame, tmp_path):
    wide = fitted.predict(4, level=[80])
    assert list(wide.columns) == [f"{s}{x}" for s in ("s0", "s1", "s2")
                                  for x in ("", "-lo-80", "-hi-80")]  # fmt: skip
    assert wide.index.name == "date" and len(wide) == 4
    assert wide.index[0] == wide_frame.index[-1] + pd.Timedelta(days=1)
    long = morphnas.Forecaster(**TINY, workdir=tmp_path).fit(_long(wide_frame)).predict(4, [80])
    assert list(long.columns) == ["unique_id", "ds", "searched", "searched-lo-80", "searched-hi-80"]
    for series in ("s0", "s1", "s2"):
        part = long[long["unique_id"] == series]
        assert (part["ds"].to_numpy() == wide.index.to_numpy()).all()
        np.testing.assert_array_equal(part["searched"].to_numpy(), wide[series].to_numpy())
        np.testing.assert_array_equal(part["searched-hi-80"], wide[f"{series}-hi-80"])


def test_saved_forecaster_predicts_the_same_in_a_fresh_process(fitted, tmp_path):
    expected = fitted.predict(3)
    saved = fitted.save(tmp_path / "saved")
    code = (
        "import sys, morphnas; "
        "f = morphnas.Forecaster.load(sys.argv[1]); "
        "f.predict(3).to_csv(sys.argv[2])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(saved), str(tmp_path / "p.csv")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = pd.read_csv(tmp_path / "p.csv", index_col="date", parse_dates=["date"])
    pd.testing.assert_frame_equal(got, expected, check_exact=True, check_freq=False)
    with pytest.raises(UserError, match="already holds"):
        fitted.save(saved)


def test_cross_validation_in_both_formats(fitted, wide_frame):
    wide = fitted.cross_validation(n_windows=3, step_size=2, h=2)
    assert len(wide) == 3 * 2
    assert list(wide.columns[:3]) == ["cutoff", "s0", "s0-y"]
    truth = wide_frame.loc[wide.index, "s0"].to_numpy()
    np.testing.assert_allclose(wide["s0-y"].to_numpy(), truth)
    assert (wide.index > wide["cutoff"]).all()
    assert wide.index[-1] == wide_frame.index[-1]


def test_misuse_is_refused(wide_frame, tmp_path):
    forecaster = morphnas.Forecaster(**TINY, workdir=tmp_path)
    with pytest.raises(UserError, match="not fitted"):
        forecaster.predict(2)
    with pytest.raises(UserError, match="unique_id, ds and y"):
        forecaster.fit(wide_frame.reset_index().rename(columns={"date": "ds"}))
    with pytest.raises(UserError):
        morphnas.Forecaster(window=0)
    with pytest.raises(UserError, match="no saved Forecaster"):
        morphnas.Forecaster.load(Path(tmp_path))
