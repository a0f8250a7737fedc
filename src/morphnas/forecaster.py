"""``Forecaster``: fit / predict / cross_validation / save / load, for people who work in Python.

It is a face over the same functions as the command line, not a second implementation: ``fit``
writes the DataFrame as a CSV and runs ``api.search`` into a run directory, ``predict`` and
``cross_validation`` are ``morphnas.forecast``'s, and ``save`` copies that directory. A saved
forecaster is therefore also a run every command reads (``morphnas evaluate``, ``report``,
``export``, ``forecast``).

Two DataFrame shapes are accepted and given back: *wide* (one column per series, a
``DatetimeIndex`` or a plain row index) and NeuralForecast's *long* ``unique_id, ds, y``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from morphnas import api, run_files
from morphnas import config as config_mod
from morphnas import forecast as forecast_mod
from morphnas.errors import UserError

LONG = ("unique_id", "ds", "y")
_STATE = "forecaster.json"  # the DataFrame shape to give back, beside data.csv and run/


class Forecaster:
    """Search a recurrent cell for a multivariate series and forecast it.

    ``space``, ``strategy``, ``growth``, ``window``, ``horizon``, ``nodes``, ``hidden``,
    ``epochs`` (search), ``retrain_epochs``, ``baselines`` and ``seed`` are the CLI's flags of
    the same names; ``settings`` takes any other config key as a nested dict, e.g.
    ``{"search": {"warmup_epochs": 5}}``. ``workdir`` holds the data and the run (default: a
    new temporary folder; ``save`` copies it somewhere that stays).
    """

    def __init__(
        self,
        *,
        space: str = "two_input",
        strategy: str = "darts",
        growth: str = "none",
        window: int = 28,
        horizon: int = 1,
        nodes: int | None = None,
        hidden: int | None = None,
        epochs: int | None = None,
        retrain_epochs: int | None = None,
        baselines: Sequence[str] | None = None,
        seed: int = 0,
        threads: int | None = None,
        settings: Mapping[str, Any] | None = None,
        workdir: Path | None = None,
    ) -> None:
        overrides: dict[str, Any] = {
            "seed": seed,
            "space": {"name": space},
            "search": {"strategy": strategy},
            "growth": {"mode": growth},
            "data": {"window": window, "horizon": horizon},
        }
        optional = {
            ("space", "nodes"): nodes,
            ("space", "hidden"): hidden,
            ("search", "epochs"): epochs,
            ("train", "epochs"): retrain_epochs,
            ("train", "baselines"): None if baselines is None else list(baselines),
        }
        for (section, key), value in optional.items():
            if value is not None:
                overrides.setdefault(section, {})[key] = value
        if threads is not None:
            overrides["threads"] = threads
        self.overrides = config_mod.merge(overrides, dict(settings or {}))
        config_mod.resolve(overrides=self.overrides)  # a bad setting fails here, not in fit
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="morphnas-"))
        self.shape: dict[str, Any] | None = None
        self.result: api.RunResult | None = None

    @property
    def run_dir(self) -> Path:
        """The run directory underneath (``<workdir>/run``)."""
        return self.workdir / "run"

    # ------------------------------------------------------------------ fit and predict

    def fit(self, df: pd.DataFrame) -> Forecaster:
        """Search, retrain and score on ``df``'s chronological train/valid/test split; the
        results table is ``self.result.results`` (and ``run/summary.json``)."""
        wide, self.shape = _to_wide(df)
        self.workdir.mkdir(parents=True, exist_ok=True)
        csv = self.workdir / "data.csv"
        _write_wide(wide, csv, self.shape)
        data = {"csv": str(csv), "columns": list(self.shape["series"])}
        if self.shape["time"]:
            data["time_col"] = self.shape["time"]
        config = config_mod.resolve(
            overrides=config_mod.merge(self.overrides, {"data": data, "out": str(self.run_dir)})
        )
        self.result = api.search(config, force=self.run_dir.exists())
        run_files.write_json(self.workdir / _STATE, self.shape)
        return self

    def predict(
        self,
        h: int | None = None,
        level: Sequence[float] | None = None,
        *,
        df: pd.DataFrame | None = None,
        model: str | None = None,
    ) -> pd.DataFrame:
        """The next ``h`` rows (default: the horizon) after the fitted data, or after ``df``
        (newer data of the same series), with ``level`` % intervals; in ``fit``'s format."""
        shape = self._fitted()
        steps = h or self._config().data.horizon
        levels = tuple(level) if level else forecast_mod.DEFAULT_LEVELS
        csv = self._newer(df)
        result = forecast_mod.forecast(
            self.run_dir, steps, model=model, csv=csv, levels=levels,
            out=self.workdir / "forecast.csv",
        )  # fmt: skip
        frame = result.frame
        if level is None:  # only the values asked for: drop the default intervals
            frame = frame[[frame.columns[0], *shape["series"]]]
        return _from_wide(frame, shape, result.model)

    def cross_validation(
        self,
        df: pd.DataFrame | None = None,
        n_windows: int = 1,
        step_size: int = 1,
        h: int | None = None,
        level: Sequence[float] | None = None,
        *,
        model: str | None = None,
    ) -> pd.DataFrame:
        """Rolling-origin forecasts of the last rows of the fitted data (or ``df``) by the
        fitted model, ``unique_id, ds, cutoff, y, <model>`` as NeuralForecast returns them
        (wide input: one row per time and cutoff, ``<series>`` forecast and ``<series>-y``)."""
        shape = self._fitted()
        frame = forecast_mod.cross_validation(
            self.run_dir, n_windows, step_size, h, model=model, csv=self._newer(df),
            levels=tuple(level or ()),
        )  # fmt: skip
        time = frame.columns[1]
        if shape["format"] == "long":
            return frame.rename(columns={time: "ds"})
        values = list(frame.columns[3:])  # y, the model, its intervals
        wide = frame.pivot(index=["cutoff", time], columns="unique_id", values=values)
        names = {value: "-y" if value == "y" else value[len(values[1]) :] for value in values}
        order = [
            (value, series) for series in shape["series"] for value in [values[1], "y", *values[2:]]
        ]
        wide = wide[order]
        wide.columns = [f"{series}{names[value]}" for value, series in order]
        wide = wide.reset_index(level="cutoff")
        return wide.rename_axis(shape["time"])

    # ------------------------------------------------------------------ save and load

    def save(self, path: Path) -> Path:
        """Copy the data, the run and what ``load`` needs to ``path`` (a new directory); the
        copy's config points at its own copy of the data."""
        self._fitted()
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path} already holds files; save to a new or empty directory")
        shutil.copytree(self.workdir, path, dirs_exist_ok=True)
        _repoint(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Forecaster:
        """A forecaster saved by ``save`` (or any ``fit``'s ``workdir``), ready to predict."""
        path = Path(path)
        state_path = path / _STATE
        if not state_path.is_file():
            raise UserError(f"{path} holds no saved Forecaster ({_STATE} is missing)")
        shape = run_files.read_json(state_path)
        config = run_files.read_config(path / "run")
        if Path(config.data.csv or "").resolve() != (path / "data.csv").resolve():
            _repoint(path)  # a workdir moved by hand
        forecaster = cls.__new__(cls)
        forecaster.overrides = {}
        forecaster.workdir = path
        forecaster.shape = shape
        forecaster.result = None
        return forecaster

    # ------------------------------------------------------------------ internals

    def _fitted(self) -> dict[str, Any]:
        if self.shape is None or not (self.run_dir / "summary.json").is_file():
            raise UserError(
                "this Forecaster is not fitted: call fit(df) first (or load a saved one)"
            )
        return self.shape

    def _config(self) -> config_mod.RunConfig:
        return run_files.read_config(self.run_dir)

    def _newer(self, df: pd.DataFrame | None) -> Path | None:
        if df is None:
            return None
        wide, shape = _to_wide(df)
        if list(shape["series"]) != list(self.shape["series"]):
            raise UserError(
                f"the new data has series {', '.join(shape['series'])}; the forecaster was "
                f"fitted on {', '.join(self.shape['series'])}"
            )
        csv = self.workdir / "newer.csv"
        _write_wide(wide, csv, self.shape)
        return csv


def _to_wide(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``df`` as one column per series, and its shape: ``format`` (wide or long), ``time`` (the
    time column's name, None without timestamps) and ``series`` (names, in their order)."""
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise UserError("fit/predict take a non-empty pandas DataFrame")
    if set(LONG) <= set(df.columns):
        series = [str(s) for s in pd.unique(df["unique_id"])]
        if df.duplicated(["unique_id", "ds"]).any():
            raise UserError(
                "the long DataFrame has a (unique_id, ds) pair twice; keep one row each"
            )
        wide = df.assign(unique_id=df["unique_id"].astype(str)).pivot(
            index="ds", columns="unique_id", values="y"
        )[series]
        timed = pd.api.types.is_datetime64_any_dtype(wide.index)
        return wide, {"format": "long", "time": "ds" if timed else None, "series": series}
    if any(column in df.columns for column in LONG[:2]):
        raise UserError("a long DataFrame needs the columns unique_id, ds and y")
    timed = isinstance(df.index, pd.DatetimeIndex)
    wide = df.copy()
    wide.columns = [str(c) for c in wide.columns]
    time = (df.index.name or "ds") if timed else None
    return wide, {"format": "wide", "time": time, "series": list(wide.columns)}


def _write_wide(wide: pd.DataFrame, path: Path, shape: dict[str, Any]) -> None:
    """The CSV the run reads: the time column first (when there is one), then the series."""
    frame = wide.copy()
    if shape["time"]:
        frame.index = pd.DatetimeIndex(frame.index, name=shape["time"])
        text = frame.to_csv(float_format="%.17g")
    else:
        text = frame.to_csv(index=False, float_format="%.17g")
    run_files.write_text(path, text)


def _from_wide(frame: pd.DataFrame, shape: dict[str, Any], model: str) -> pd.DataFrame:
    """``forecast.csv``'s frame (time column, then ``<series>[-lo|-hi-<level>]``) in the
    caller's format: wide with the time as index, or long ``unique_id, ds, <model>, …``."""
    time = frame.columns[0]
    if shape["format"] == "wide":
        out = frame.set_index(time)
        return out.rename_axis(shape["time"]) if shape["time"] else out.rename_axis(None)
    parts = []
    for series in shape["series"]:
        columns = [c for c in frame.columns[1:] if c == series or c.startswith(f"{series}-")]
        part = frame[[time, *columns]].rename(
            columns={c: model + c[len(series) :] for c in columns} | {time: "ds"}
        )
        part.insert(0, "unique_id", series)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _repoint(path: Path) -> None:
    """Make the run in ``path`` read ``path/data.csv`` (its config names the data's file)."""
    config = run_files.read_config(path / "run")
    config = config.model_copy(
        update={
            "data": config.data.model_copy(update={"csv": (path / "data.csv").resolve()}),
            "out": (path / "run").resolve(),
        }
    )
    run_files.write_text(path / "run" / "config.yaml", config_mod.dump(config))
