"""Multivariate forecasting: a recurrent cell over a window, a linear head, LSTNet metrics.

Metrics follow the LSTNet code (spec/morphism.md §6): ``RSE = sqrt(Σ(ŷ−y)²) / sqrt(Σ(y−ȳ)²)``
with both sums over every sample and series and ``ȳ`` the mean of the whole target matrix;
``CORR`` the mean over series with non-zero spread of the Pearson correlation along time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from morphnas.data import SeriesData, WindowedSplits, load_csv, load_dataset, make_windows
from morphnas.data.corpus import CORPORA
from morphnas.engine.runtime import resolve_device
from morphnas.report import plot_forecasts
from morphnas.tasks.base import PairStream, batches, predict
from morphnas.tasks.kinds import TaskKind

if TYPE_CHECKING:
    from morphnas.config import RunConfig


class ForecastModel(nn.Module):
    """``window (B, P, m) -> forecast (B, m)``: the cell's last hidden state through dropout and a
    linear head, plus (``ar_window > 0``) LSTNet's linear autoregressive "highway" component.

    The autoregressive part is one linear map over the last ``ar_window`` values, shared by all
    series: it carries the level and the seasonality a bounded recurrent state extrapolates badly
    when the test span drifts away from the training span, and leaves the cell the nonlinear rest.
    Every model of a comparison gets the same head; ``cell=None`` is the linear baseline ``ar``
    that shows what the recurrent part adds. Keyword arguments of ``forward`` go to the
    cell, so a supernet receives a strategy's mixing weights while discrete cells take none.

    ``layout="global"`` makes the cell channel-independent, as PatchTST does: every series of
    every window is its own sequence of one value per step (``series_sequences``), so one cell
    and a one-output head are shared by all series, and the ``(B·m, 1)`` forecasts are laid back
    out as ``(B, m)``, so loss and metrics are those of the multivariate layout. The ``cell``
    must then read ``1 + series_embedding`` features: ``series_embedding > 0`` appends a learned
    row per series to each step, so the shared cell can still tell the series apart. The
    autoregressive part and ``window_norm`` act per series in either layout.

    ``targets`` (multivariate layout only): the input columns forecast, when the window holds
    more (other series, calendar features); ``n_series`` is then their number. The
    autoregressive part and the ``window_norm`` reference act on each target's own column;
    the other inputs are left as they are (our choice: a calendar feature has no level).
    """

    def __init__(
        self,
        cell: nn.Module | None,
        hidden_size: int,
        n_series: int,
        dropout: float = 0.0,
        ar_window: int = 0,
        window_norm: str = "none",
        *,
        layout: str = "multivariate",
        series_embedding: int = 0,
        targets: Sequence[int] | None = None,
    ):
        super().__init__()
        if targets is not None and (layout != "multivariate" or len(targets) != n_series):
            raise ValueError("targets need layout 'multivariate' and n_series == len(targets)")
        # Not persistent: saved models keep their keys, and the positions come from the data.
        index = None if targets is None else torch.tensor(list(targets), dtype=torch.long)
        self.register_buffer("targets", index, persistent=False)
        if cell is None and ar_window <= 0:
            raise ValueError("a forecaster needs a cell, an autoregressive window, or both")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if series_embedding < 0 or (series_embedding > 0 and layout != "global"):
            raise ValueError("series_embedding must be >= 0, and > 0 only with layout 'global'")
        self.cell = cell
        self.layout = layout
        self.dropout = nn.Dropout(dropout)
        outputs = 1 if layout == "global" else n_series
        self.head = nn.Linear(hidden_size, outputs) if cell is not None else None
        self.ar_window = ar_window
        if window_norm not in WINDOW_NORMS:
            raise ValueError(f"window_norm must be one of {WINDOW_NORMS}, got {window_norm!r}")
        self.window_norm = window_norm
        self.autoregressive = nn.Linear(ar_window, 1) if ar_window > 0 else None
        self.series_embedding = (
            nn.Embedding(n_series, series_embedding)
            if cell is not None and series_embedding > 0
            else None
        )

    def forward(self, window: Tensor, **cell_kwargs: Any) -> Tensor:
        own = window if self.targets is None else window.index_select(2, self.targets)
        reference = _window_reference(own, self.window_norm)
        if reference is not None:
            own = own - reference.unsqueeze(1)
            if self.targets is None:
                window = own
            else:  # each target's column minus its reference, the other inputs as they are
                shift = window.new_zeros(window.shape[0], window.shape[2])
                window = window - shift.index_copy(1, self.targets, reference).unsqueeze(1)
        forecast = own.new_zeros(own.shape[0], own.shape[2])
        if self.cell is not None:
            forecast = self._cell_forecast(window, **cell_kwargs)
        if self.autoregressive is not None:
            recent = own[:, -self.ar_window :, :].transpose(1, 2)  # (B, k, ar_window)
            forecast = forecast + self.autoregressive(recent).squeeze(-1)
        return forecast if reference is None else forecast + reference

    def _cell_forecast(self, window: Tensor, **cell_kwargs: Any) -> Tensor:
        """The head's reading of the cell's last state, ``(B, m)`` in either layout."""
        if self.layout == "multivariate":
            _, h_last = self.cell(window.transpose(0, 1), **cell_kwargs)
            return self.head(self.dropout(h_last))
        table = None if self.series_embedding is None else self.series_embedding.weight
        _, h_last = self.cell(series_sequences(window, table), **cell_kwargs)
        return self.head(self.dropout(h_last)).view(window.shape[0], window.shape[2])


WINDOW_NORMS = ("none", "last", "mean")
LAYOUTS = ("multivariate", "global")


def series_sequences(window: Tensor, embedding: Tensor | None = None) -> Tensor:
    """Windows ``(B, P, m)`` as ``B·m`` single-series sequences ``(P, B·m, 1 + e)``, the cell's
    input in the global layout: sequence ``b·m + j`` is series ``j`` of window ``b``, so the
    ``B·m`` outputs reshape back to ``(B, m)`` as they are. ``embedding``: an ``(m, e)`` table
    whose row ``j`` is appended to every step of series ``j`` (None: no id features).
    """
    n, steps, m = window.shape
    sequences = window.permute(1, 0, 2).reshape(steps, n * m, 1)
    if embedding is None:
        return sequences
    ids = embedding.expand(steps, n, m, embedding.shape[1]).reshape(steps, n * m, -1)
    return torch.cat([sequences, ids], dim=-1)


Batch = tuple[Tensor, Tensor]


class ForecastTask:
    """Windows → next values under MSE: the ``Task`` the engine runs for forecasting."""

    probe_size = 64

    def __init__(
        self,
        train: Batch,
        valid: Batch,
        batch_size: int,
        *,
        layout: str = "multivariate",
        series_embedding: int = 0,
    ) -> None:
        self.train, self.valid, self.batch_size = train, valid, batch_size
        self.layout, self.series_embedding = layout, series_embedding
        self._mse = nn.MSELoss()

    def epoch_batches(self, generator: torch.Generator, fraction: float = 1.0) -> list[Batch]:
        x, y = self.train
        n = max(1, round(len(x) * fraction))
        return [(x[idx], y[idx]) for idx in batches(n, self.batch_size, generator)]

    def valid_stream(self, generator: torch.Generator) -> PairStream:
        return PairStream(self.valid, self.batch_size, generator)

    def loss(self, model: nn.Module, batch: Batch, **model_kwargs: Any) -> Tensor:
        return self._mse(model(batch[0], **model_kwargs), batch[1])

    def batch_weight(self, batch: Batch) -> int:
        return len(batch[0])

    def valid_loss(self, model: nn.Module, **model_kwargs: Any) -> float:
        return float(self._mse(predict(model, self.valid[0], **model_kwargs), self.valid[1]))

    def probe(self) -> tuple[Tensor, Tensor]:
        """Fixed validation windows, and the cell's input sequence for them in the run's layout.

        The task does not own a global model's series embedding; a growth check only needs
        *some* fixed input of the cell's width, so a fixed pseudo-embedding stands in for it.
        """
        windows = self.valid[0][: self.probe_size]
        if self.layout == "multivariate":
            return windows, windows.transpose(0, 1)
        table = None
        if self.series_embedding > 0:
            generator = torch.Generator().manual_seed(0)
            table = torch.randn(windows.shape[2], self.series_embedding, generator=generator)
            table = table.to(windows)
        return windows, series_sequences(windows, table)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def _window_reference(window: Tensor, kind: str) -> Tensor | None:
    """The per-window, per-series level removed before the model and added back after.

    ``last`` (NLinear) and ``mean`` (RevIN without scale) make every model forecast a change
    relative to its own window, which survives a drift of levels between the spans.
    """
    if kind == "last":
        return window[:, -1, :]
    if kind == "mean":
        return window.mean(dim=1)
    return None


def rse(pred: np.ndarray, truth: np.ndarray) -> float:
    """LSTNet RSE: the error's energy over the target's energy about its mean."""
    return float(
        np.sqrt(((pred - truth) ** 2).sum()) / np.sqrt(((truth - truth.mean()) ** 2).sum())
    )


def corr(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean Pearson correlation along time over series whose target varies (LSTNet).

    A constant prediction for a varying series counts as correlation 0 rather than NaN.
    """
    sigma_p, sigma_t = pred.std(axis=0), truth.std(axis=0)
    cov = ((pred - pred.mean(axis=0)) * (truth - truth.mean(axis=0))).mean(axis=0)
    valid = sigma_t != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(sigma_p > 0, cov / (sigma_p * sigma_t), 0.0)
    return float(r[valid].mean()) if valid.any() else float("nan")


def forecast_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """RSE, CORR, MAE and RMSE over all samples and series."""
    err = pred - truth
    return {
        "rse": rse(pred, truth),
        "corr": corr(pred, truth),
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
    }


class Forecasting(TaskKind):
    """Multivariate forecasting of a CSV's or a bundled dataset's series: windows in, the next
    values out (``ForecastModel``), scored by RSE, CORR, MAE and RMSE in original units, beside
    the naive last-value forecast, with the test span's forecasts plotted."""

    name = "forecast"
    # The linear part alone; the last observed value; classical statistics without trained
    # weights (``tasks.classical``: the seasonal naive forecast, a VAR).
    baselines = ("ar", "naive", "snaive", "var")

    @classmethod
    def check(cls, config: RunConfig) -> None:
        if config.data.dataset in CORPORA and config.data.csv is None:
            raise ValueError(f"{config.data.dataset!r} is a text corpus: add --task lm to model it")
        if config.data.layout == "global" and (config.data.targets or config.data.calendar):
            raise ValueError(
                "--targets and --calendar need data.layout multivariate (a global model reads "
                "one series at a time); drop data.layout=global or those flags"
            )

    def load(self) -> WindowedSplits:
        cfg = self.config.data
        series = self.series()
        windows = make_windows(
            series,
            cfg.window,
            cfg.horizon,
            fractions=cfg.split,
            scaler=cfg.scaler,
            targets=cfg.targets,
            calendar=cfg.calendar,
        )
        windows.column_notes = tuple(note.line() for note in getattr(series, "columns_report", ()))
        filled = getattr(series, "fill_report", None)
        windows.filled = None if filled is None else filled.summary()
        device = resolve_device(self.config.device)
        for part in ("train", "valid", "test"):
            x, y = getattr(windows, part)
            setattr(windows, part, (x.to(device), y.to(device)))
        return windows

    def series(self) -> SeriesData:
        """The run's series: its CSV, or the named dataset, read once per run (``load`` and the
        classical baselines use it). A CSV column that was dropped or converted is said once, as
        a warning (``column_notes`` keeps every column's fate)."""
        if getattr(self, "_series", None) is None:
            self._series = self._read_series()
        return self._series

    def _read_series(self) -> SeriesData:
        cfg = self.config.data
        if cfg.csv is None:
            return load_dataset(cfg.dataset)
        series = load_csv(cfg.csv, cfg.time_col, cfg.columns, fill=cfg.fill, max_fill=cfg.max_fill)
        for note in getattr(series, "columns_report", ()):
            if note.role == "dropped" or note.converted:
                warnings.warn(f"{cfg.csv.name}: {note.line()}", stacklevel=3)
        return series

    def data_file(self) -> Path | None:
        return self.config.data.csv

    def budget(self) -> str:
        return f"window {self.config.data.window}, horizon {self.config.data.horizon}"

    def summary(self, data: WindowedSplits) -> dict[str, Any]:
        notes = getattr(data, "column_notes", ())
        summary: dict[str, Any] = {"columns": list(notes)} if notes else {}
        if data.layout is not None and data.layout.inputs != data.columns:
            summary.update(inputs=list(data.input_columns), targets=list(data.columns))
            summary["calendar"] = list(data.layout.calendar)
        if data.filled is not None:
            summary["filled"] = data.filled
        return summary

    def input_size(self, data: WindowedSplits) -> int:
        """The series (global layout: one, plus its id embedding)."""
        if self.config.data.layout == "global":
            return 1 + self.config.train.series_embedding
        return len(data.input_columns)

    def wrap(self, cell: nn.Module | None, data: WindowedSplits, hidden: int) -> nn.Module:
        """The same head (and ``data.layout``) for every model of a run, searched or baseline;
        without a cell, the autoregressive part alone (the ``ar`` baseline)."""
        config = self.config
        model = ForecastModel(
            cell,
            hidden,
            len(data.columns),
            config.train.dropout,
            min(config.train.ar_window, config.data.window),
            config.train.window_norm,
            layout=config.data.layout,
            series_embedding=config.train.series_embedding,
            targets=None if data.input_columns == data.columns else data.target_positions,
        )
        return model.to(resolve_device(config.device))

    def engine_task(self, data: WindowedSplits, batch_size: int) -> ForecastTask:
        return ForecastTask(
            data.train,
            data.valid,
            batch_size,
            layout=self.config.data.layout,
            series_embedding=self.config.train.series_embedding,
        )

    def score(self, model: nn.Module, data: WindowedSplits) -> dict[str, float]:
        return score_predictions(predict(model, data.valid[0]), predict(model, data.test[0]), data)

    def reference(
        self, name: str, data: WindowedSplits
    ) -> tuple[dict[str, Any], Tensor | None] | None:
        """``naive``: the last observed value of each series, the floor every forecaster must
        beat; ``snaive`` and ``var``: the classical forecasts of ``tasks.classical``."""
        if name in ("snaive", "var"):
            from morphnas.tasks import classical  # on demand: it imports this module

            return classical.reference(name, self.series(), self.config.data.split, data)
        if name != "naive":
            return None
        last = list(data.target_positions)  # each target's own last value
        valid, test = data.valid[0][:, -1, last], data.test[0][:, -1, last]
        row = {"model": "naive", "params": 0, **score_predictions(valid, test, data)}
        return {**row, "train_seconds": 0.0}, test

    def test_predictions(self, model: nn.Module, data: WindowedSplits) -> Tensor:
        return predict(model, data.test[0])

    def plots(self, run_dir: Path, data: WindowedSplits, predictions: dict[str, Tensor]) -> None:
        inverse = data.inverse_targets
        plot_forecasts(
            inverse(_numpy(data.test[1])),
            {name: inverse(_numpy(p)) for name, p in predictions.items()},
            data.columns,
            run_dir / "plots/forecast.png",
            index=data.test_index,
        )


def score_predictions(
    valid_pred: Tensor, test_pred: Tensor, data: WindowedSplits
) -> dict[str, float]:
    """Valid RSE and the test metrics, in original units and (suffix ``_scaled``) scaled units."""
    inverse = data.inverse_targets
    valid = forecast_metrics(inverse(_numpy(valid_pred)), inverse(_numpy(data.valid[1])))
    test = forecast_metrics(inverse(_numpy(test_pred)), inverse(_numpy(data.test[1])))
    scaled = forecast_metrics(_numpy(test_pred), _numpy(data.test[1]))
    row = {"valid_rse": valid["rse"]}
    row.update({f"test_{k}": v for k, v in test.items()})
    row.update({f"test_{k}_scaled": v for k, v in scaled.items()})
    return row


def _numpy(values: Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()
