"""Datasets for morphnas: the offline registry, CSV loading with validation, splits, scalers
and forecasting windows. Everything other modules need is importable from here."""

from morphnas.data.csv import load_csv
from morphnas.data.registry import DatasetInfo, list_datasets, load_dataset
from morphnas.data.series import (
    IdentityScaler,
    MaxScaler,
    Scaler,
    SeriesData,
    Split,
    StandardScaler,
    WindowedSplits,
    chronological_split,
    make_scaler,
    make_windows,
    scaler_from_state,
)
from morphnas.data.synthetic import synthetic_series

__all__ = [
    "DatasetInfo",
    "IdentityScaler",
    "MaxScaler",
    "Scaler",
    "SeriesData",
    "Split",
    "StandardScaler",
    "WindowedSplits",
    "chronological_split",
    "list_datasets",
    "load_csv",
    "load_dataset",
    "make_scaler",
    "make_windows",
    "scaler_from_state",
    "synthetic_series",
]
