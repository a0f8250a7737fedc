"""Shared fixtures: small generated data only, never a download."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from morphnas.data import synthetic_series


@pytest.fixture
def synthetic_csv(tmp_path: Path) -> Path:
    """A small synthetic multivariate series as a daily CSV with a ``date`` column."""
    series = synthetic_series(n_steps=240, n_series=3, seed=1)
    frame = pd.DataFrame(series.values, columns=series.columns)
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=len(frame), freq="D"))
    path = tmp_path / "series.csv"
    frame.to_csv(path, index=False, float_format="%.6f")
    return path
