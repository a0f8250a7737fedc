"""Forecasting metrics against hand-computed values, the model head, the first-order strategy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import SEQUENCE_SPACES
from morphnas import spaces, strategies
from morphnas.tasks.forecasting import ForecastModel, batches, corr, forecast_metrics, predict, rse


def test_rse_by_hand():
    truth = np.array([[1.0, 2.0], [3.0, 4.0]])
    pred = np.array([[1.0, 3.0], [2.0, 4.0]])
    # errors: 0, 1, -1, 0 -> sum sq 2; truth mean 2.5 -> deviations 2.25+0.25+0.25+2.25 = 5
    assert rse(pred, truth) == pytest.approx(math.sqrt(2) / math.sqrt(5))


def test_corr_by_hand_skips_constant_series_and_handles_constant_predictions():
    truth = np.array([[1.0, 5.0, 1.0], [2.0, 5.0, 2.0], [3.0, 5.0, 3.0]])
    pred = np.array([[3.0, 1.0, 7.0], [2.0, 2.0, 7.0], [1.0, 3.0, 7.0]])
    # series 0: perfectly anti-correlated (-1); series 1: constant truth, skipped;
    # series 2: constant prediction, counted as 0.
    assert corr(pred, truth) == pytest.approx((-1.0 + 0.0) / 2)


def test_forecast_metrics_by_hand():
    truth = np.array([[0.0], [2.0]])
    pred = np.array([[1.0], [1.0]])
    m = forecast_metrics(pred, truth)
    assert m["mae"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(1.0)
    assert m["rse"] == pytest.approx(1.0)  # sqrt(2) / sqrt(2)
    assert m["corr"] == 0.0  # constant prediction


def test_batches_cover_every_index_once():
    gen = torch.Generator().manual_seed(0)
    seen = torch.cat(list(batches(10, 3, gen)))
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(b) for b in batches(10, 3)] == [3, 3, 3, 1]


def test_forecast_model_shapes_and_predict_restores_mode():
    cell = spaces.build("two_input", 3, 6, 2)
    model = ForecastModel(cell, 6, 3, dropout=0.5)
    x = torch.randn(5, 7, 3)
    assert model(x).shape == (5, 3)
    model.train()
    out = predict(model, x, batch_size=2)
    assert out.shape == (5, 3) and model.training
    torch.testing.assert_close(out, predict(model, x))  # eval mode: dropout off, deterministic


@pytest.mark.parametrize("name", SEQUENCE_SPACES)
def test_darts_first_order_step_is_plain_gradient_of_valid_loss(name):
    torch.manual_seed(0)
    cell = spaces.build(name, 3, 5, 2, batchnorm=False)
    model = ForecastModel(cell, 5, 3)
    x, y = torch.randn(4, 6, 3), torch.randn(4, 3)
    loss_fn = torch.nn.MSELoss()

    def batch_loss(batch, mixing):
        return loss_fn(model(batch[0], weights=mixing), batch[1])

    # Expected: autograd of the validation loss with respect to alpha.
    expected = torch.autograd.grad(
        batch_loss((x, y), cell.mixing_weights()), cell.arch_parameters()
    )
    strategy = strategies.build("darts", cell, lr=0.1, weight_decay=0.0)
    before = [p.detach().clone() for p in cell.arch_parameters()]
    weights_before = [p.detach().clone() for p in cell.weight_parameters()]
    strategy.arch_step(batch_loss, None, (x, y))
    for p, g in zip(cell.arch_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g)
    # Adam's first step moves every coordinate with a non-zero gradient by lr * sign(g).
    for p, b, g in zip(cell.arch_parameters(), before, expected, strict=True):
        moved = (b - p.detach())[g.abs() > 1e-12]
        torch.testing.assert_close(
            moved, 0.1 * torch.sign(g[g.abs() > 1e-12]), rtol=1e-3, atol=1e-5
        )
    for p, b in zip(cell.weight_parameters(), weights_before, strict=True):
        assert p.grad is None and torch.equal(p, b)


@pytest.mark.parametrize(
    ("norm", "level"), [("last", lambda w: w[:, -1]), ("mean", lambda w: w.mean(1))]
)
def test_window_norm_forecasts_relative_to_the_window(norm, level):
    """With the learned parts silenced, the forecast is exactly the window's reference level."""
    model = ForecastModel(None, 4, 3, ar_window=5, window_norm=norm)
    torch.nn.init.zeros_(model.autoregressive.weight)
    torch.nn.init.zeros_(model.autoregressive.bias)
    window = torch.randn(6, 5, 3) + 10.0
    torch.testing.assert_close(model(window), level(window))
    # The autoregressive part sees the window minus its level: a shift of the window shifts the
    # forecast by exactly the same amount whatever the weights.
    torch.nn.init.normal_(model.autoregressive.weight)
    torch.testing.assert_close(model(window + 3.0), model(window) + 3.0)


def test_ar_only_model_needs_a_window():
    with pytest.raises(ValueError, match="autoregressive"):
        ForecastModel(None, 4, 3, ar_window=0)
