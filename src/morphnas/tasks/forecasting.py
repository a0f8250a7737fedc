"""Multivariate forecasting: a recurrent cell over a window, a linear head, LSTNet metrics.

Metrics follow the LSTNet code (spec/morphism.md §6): ``RSE = sqrt(Σ(ŷ−y)²) / sqrt(Σ(y−ȳ)²)``
with both sums over every sample and series and ``ȳ`` the mean of the whole target matrix;
``CORR`` the mean over series with non-zero spread of the Pearson correlation along time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


class ForecastModel(nn.Module):
    """``window (B, P, m) -> forecast (B, m)``: the cell's last hidden state through dropout and a linear head.

    Keyword arguments of ``forward`` go to the cell, so a supernet receives a strategy's mixing
    weights while discrete cells and baselines take none.
    """

    def __init__(self, cell: nn.Module, hidden_size: int, n_series: int, dropout: float = 0.0):
        super().__init__()
        self.cell = cell
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, n_series)

    def forward(self, window: Tensor, **cell_kwargs: Any) -> Tensor:
        _, h_last = self.cell(window.transpose(0, 1), **cell_kwargs)
        return self.head(self.dropout(h_last))


def batches(
    n: int, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[Tensor]:
    """Index batches over ``n`` samples: shuffled with ``generator``, in order without one."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 512, **cell_kwargs: Any) -> Tensor:
    """Forecasts for every window in ``x`` in eval mode (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i], **cell_kwargs) for i in batches(len(x), batch_size)])
    finally:
        model.train(was_training)


def rse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root relative squared error (LSTNet): error energy over the target's energy about its mean."""
    return float(np.sqrt(((pred - truth) ** 2).sum()) / np.sqrt(((truth - truth.mean()) ** 2).sum()))


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
