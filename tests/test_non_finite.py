"""No run reports NaN or inf as a result and exits 0 (issue: hostile input).

Two guards: data whose squares overflow float64 are refused before a run starts (the scaler's
variance and every RSE square the values), and a figure that is still not finite when the
summary is written is recorded as null, listed, and refused with a one-line error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from morphnas import api
from morphnas.data.series import SeriesData, make_windows
from morphnas.errors import UserError


def _series(scale: float) -> SeriesData:
    rng = np.random.default_rng(0)
    values = np.stack([rng.normal(size=60), scale * rng.normal(size=60)], axis=1)
    return SeriesData("toy", values, ("a", "b"), None, None, "test", "none")


@pytest.mark.parametrize("scale", [1e160, 1e300])
def test_values_whose_squares_overflow_are_refused_naming_the_column(scale):
    with pytest.raises(UserError, match=r"'toy': column 'b' has values up to .*rescale") as err:
        _series(scale)
    assert "\n" not in str(err.value)


def test_large_values_that_do_not_overflow_still_run():
    """1e150 squared is 1e300, finite: scaled to z-scores, the windows are ordinary."""
    windows = make_windows(_series(1e150), window=4, horizon=1)
    assert np.isfinite(windows.train[0].numpy()).all()
    assert abs(float(windows.train[0][..., 1].std()) - 1.0) < 0.3


def test_cli_refuses_overflowing_csv_before_the_run_directory(tmp_path: Path):
    csv = tmp_path / "huge.csv"
    rng = np.random.default_rng(1)
    rows = ["a,b", *(f"{rng.normal():.6f},{rng.normal() * 1e300:.6e}" for _ in range(80))]
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "morphnas.cli", "search", "--csv", str(csv), "--window", "6",
         "--epochs", "1", "--retrain-epochs", "1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "column 'b'" in lines[0] and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_non_finite_figure_is_null_listed_and_refused(tmp_path: Path):
    results = [
        {"model": "searched", "valid_rse": 0.5, "test_rse": float("nan"), "test_corr": 0.7},
        {"model": "lstm", "valid_rse": float("inf"), "test_rse": 0.4, "test_corr": 0.8},
    ]
    with pytest.raises(UserError, match=r"searched's test_rse is nan \(and 1 more\)") as err:
        api._write_summary(tmp_path, None, [], results, {})
    assert "\n" not in str(err.value)
    summary = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: no NaN
    assert summary["results"][0]["test_rse"] is None and summary["results"][0]["valid_rse"] == 0.5
    assert summary["results"][1]["valid_rse"] is None
    assert summary["non_finite"] == ["searched.test_rse", "lstm.valid_rse"]


def test_finite_figures_are_written_as_they_are(tmp_path: Path):
    results = [{"model": "lstm", "valid_rse": 0.5, "test_rse": 0.4, "params": 12}]
    api._write_summary(tmp_path, None, [], results, {"note": "x"})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["results"] == results and "non_finite" not in summary
