"""DNAL unit gates on the forecasting cells: gating inside the recurrence, physical pruning
(``channels.recurrent``) checked by brute force against the gated model in ``mask`` mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from morphnas import genotype
from morphnas.cells.baselines import RecurrentBaseline
from morphnas.cells.discrete import DartsRNNCell, TwoInputCell
from morphnas.channels import gates
from morphnas.channels.recurrent import (
    attach_unit_gates,
    detach_unit_gates,
    prune_units,
    recurrent_flops,
)
from morphnas.genotype import CELL_STATE, Genotype, Node
from morphnas.tasks.forecasting import ForecastModel

N_SERIES, HIDDEN, STEPS, BATCH = 3, 7, 5, 4

DARTS_RESIDUAL = Genotype(
    "darts_rnn",
    (
        Node("sigmoid", (0,)),
        Node("tanh", (1,)),
        Node("relu", (1,), residual=True),
        Node("sigmoid", (2,), residual=True),
    ),
    output="last",
    output_activation="tanh",
)
TWO_INPUT_MIXED = Genotype(
    "two_input",
    (
        Node("highway", (-1, 0)),
        Node("hadamard", (1, -1)),
        Node("add_relu", (2, 0)),
        Node("add", (1, 3)),
        Node("add_sigmoid", (-1, 4), residual=True),
        Node("highway", (5, 3), residual=True),
    ),
    output="mean",
    output_activation="tanh",
)
TWO_INPUT_CARRY = Genotype(  # carries a highway node as c; h = σ(A u + B h) ⊙ c
    "two_input",
    (
        Node("highway", (CELL_STATE, -1)),
        Node("add_sigmoid", (-1, 0)),
        Node("hadamard", (2, 1)),
    ),
    output="last",
    cell_state=1,
)

CELLS = {
    "lstm": lambda i, d: RecurrentBaseline("lstm", i, d),
    "gru": lambda i, d: RecurrentBaseline("gru", i, d),
    "darts_v2": lambda i, d: DartsRNNCell(genotype.KNOWN["darts_v2"], i, d),
    "darts_residual": lambda i, d: DartsRNNCell(DARTS_RESIDUAL, i, d),
    "two_input_gru": lambda i, d: TwoInputCell(genotype.KNOWN["gru"], i, d),
    "two_input_lstm": lambda i, d: TwoInputCell(genotype.KNOWN["lstm"], i, d),
    "two_input_mixed": lambda i, d: TwoInputCell(TWO_INPUT_MIXED, i, d),
    "two_input_carry": lambda i, d: TwoInputCell(TWO_INPUT_CARRY, i, d),
}


def forecaster(kind: str, layout: str = "multivariate", seed: int = 0) -> ForecastModel:
    """A float64 forecaster around cell ``kind`` with every parameter random (biases and the
    residual γ too, which start at zero)."""
    torch.manual_seed(seed)
    embedding = 2 if layout == "global" else 0
    inputs = 1 + embedding if layout == "global" else N_SERIES
    model = ForecastModel(
        CELLS[kind](inputs, HIDDEN),
        HIDDEN,
        N_SERIES,
        dropout=0.0,
        ar_window=2,
        layout=layout,
        series_embedding=embedding,
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.6, 0.6)
    return model


def windows(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, STEPS, N_SERIES, generator=generator, dtype=torch.float64)


def random_mask(seed: int) -> torch.Tensor:
    """Some units closed, at least one open, at least one closed."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(HIDDEN, generator=generator) > 0.5
    keep[seed % HIDDEN] = True
    keep[(seed + 1) % HIDDEN] = False
    return keep


def width(cell: nn.Module) -> int:
    return cell.rnn.hidden_size if isinstance(cell, RecurrentBaseline) else cell.hidden_size


def params(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "unit_gate" not in name)


@pytest.mark.parametrize("layout", ["multivariate", "global"])
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_pruned_model_equals_masked_model(kind, layout):
    model = forecaster(kind, layout)
    x = windows()
    unmasked = model(x)
    found = attach_unit_gates(model)
    assert set(found) == {"cell"} and found["cell"] is model.cell.unit_gate
    assert "cell.unit_gate.alpha" in model.state_dict()
    assert any(p is found["cell"].alpha for p in model.parameters())
    for seed in range(3):
        keep = random_mask(seed)
        gates.load_masks(found, {"cell": keep})
        gates.set_mode(found.values(), "mask")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        pruned = prune_units(model, {"cell": keep})
        # the argument is untouched: same weights, still gated, still full width
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert model.cell.unit_gate is found["cell"] and model.head.in_features == HIDDEN
        # the pruned model: no gate, the surviving width everywhere, fewer parameters
        kept = int(keep.sum())
        assert pruned.cell.unit_gate is None
        assert not any("unit_gate" in k for k in pruned.state_dict())
        assert width(pruned.cell) == kept and pruned.head.in_features == kept
        assert params(pruned) < params(model)
        for train in (False, True):
            model.train(train)
            pruned.train(train)
            masked = model(x)
            torch.testing.assert_close(pruned(x), masked, atol=1e-5, rtol=1e-5)
            assert (masked - unmasked).abs().max() > 1e-3  # the closed units did matter


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_all_units_open_prunes_to_the_same_function(kind):
    model = forecaster(kind)
    x = windows()
    reference = model(x)
    found = attach_unit_gates(model)
    gates.set_mode(found.values(), "mask")
    pruned = prune_units(model, {"cell": torch.ones(HIDDEN, dtype=torch.bool)})
    assert params(pruned) == params(model)
    torch.testing.assert_close(pruned(x), reference, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_identity_gate_keeps_the_ungated_function(kind):
    """The gated (eager, unrolled) path with an identity gate is the fused path, in float64."""
    model = forecaster(kind)
    x = windows()
    reference = model(x)
    found = attach_unit_gates(model)
    torch.testing.assert_close(model(x), reference, atol=1e-10, rtol=1e-10)
    gates.set_mode(found.values(), "mask")  # all-open mask: still the same function
    torch.testing.assert_close(model(x), reference, atol=1e-10, rtol=1e-10)
    detach_unit_gates(model)
    assert model.cell.unit_gate is None
    assert not any("unit_gate" in k for k in model.state_dict())
    torch.testing.assert_close(model(x), reference, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_unrolled_baseline_equals_fused_module(kind, dtype):
    torch.manual_seed(3)
    cell = RecurrentBaseline(kind, 3, 6).to(dtype)
    x = torch.randn(STEPS, BATCH, 3, dtype=dtype)
    h0 = torch.randn(BATCH, 6, dtype=dtype)
    c0 = torch.randn(1, BATCH, 6, dtype=dtype)
    state = (h0.unsqueeze(0), c0) if kind == "lstm" else h0.unsqueeze(0)
    fused_out, fused_h = cell(x, h0)
    fused_seq, fused_final = cell.forward_with_state(x, state)
    attach_unit_gates(_Holder(cell))
    assert cell.unit_gate is not None
    out, h = cell(x, h0)
    seq, final = cell.forward_with_state(x, state)
    tol = {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(out, fused_out, **tol)
    torch.testing.assert_close(h, fused_h, **tol)
    torch.testing.assert_close(seq, fused_seq, **tol)
    if kind == "lstm":
        torch.testing.assert_close(final[0], fused_final[0], **tol)
        torch.testing.assert_close(final[1], fused_final[1], **tol)
    else:
        torch.testing.assert_close(final, fused_final, **tol)


class _Holder(nn.Module):
    """A bare ``model.cell`` holder, for attaching a gate to a cell outside a forecaster."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_soft_gate_gradient_reaches_alpha(kind):
    model = forecaster(kind)
    found = attach_unit_gates(model)
    gate = found["cell"]
    gates.set_mode(found.values(), "soft")
    with torch.no_grad():
        gate.alpha.normal_()
    model(windows()).square().sum().backward()
    assert gate.alpha.grad is not None
    assert torch.isfinite(gate.alpha.grad).all() and gate.alpha.grad.abs().sum() > 0
    # a closed unit's mask stops its gradient: σ(βα)·0 does not depend on α
    model.zero_grad()
    gate.mask[0] = 0.0
    model(windows()).square().sum().backward()
    assert gate.alpha.grad[0] == 0 and gate.alpha.grad[1:].abs().sum() > 0


def test_flops_by_hand():
    i, d, m, t = N_SERIES, 4, N_SERIES, STEPS
    x = windows()
    head = 2 * d * m  # the linear head on one sample's last state
    ar = 2 * 2 * 1 * m  # the autoregressive Linear(2, 1) over m series
    expected = {
        "lstm": t * 2 * (i * 4 * d + d * 4 * d),
        "gru": t * 2 * (i * 3 * d + d * 3 * d),
        # x W_x (i, 2d); h W_h (d, 2d); one (d, 2d) matmul per node
        "darts_v2": t * 2 * (i * 2 * d + d * 2 * d + 8 * d * 2 * d),
    }
    for kind, count in expected.items():
        model = ForecastModel(CELLS[kind](i, d), d, m, ar_window=2).double()
        model.train()
        assert recurrent_flops(model, x) == count + head + ar
        assert model.training and model.cell.training  # flags restored
        found = attach_unit_gates(model)  # gated: eager / unrolled, counted at full width
        assert recurrent_flops(model, x) == count + head + ar
        keep = torch.tensor([True, False, True, True])
        gates.load_masks(found, {"cell": keep})
        gates.set_mode(found.values(), "mask")
        pruned = prune_units(model, {"cell": keep})
        smaller = ForecastModel(CELLS[kind](i, 3), 3, m, ar_window=2).double()
        assert recurrent_flops(pruned, x) == recurrent_flops(smaller, x) < count + head + ar


def test_lstm_flops_in_global_layout_count_every_series():
    d, e = 4, 2
    model = ForecastModel(
        CELLS["lstm"](1 + e, d), d, N_SERIES, layout="global", series_embedding=e
    ).double()
    # example[:1] is one window: N_SERIES sequences of STEPS steps
    expected = N_SERIES * STEPS * 2 * ((1 + e) * 4 * d + d * 4 * d) + N_SERIES * 2 * d
    assert recurrent_flops(model, windows()) == expected


@pytest.mark.parametrize("kind", ["lstm", "darts_v2", "two_input_gru"])
def test_prune_refuses_an_empty_mask_and_bad_masks(kind):
    model = forecaster(kind)
    attach_unit_gates(model)
    with pytest.raises(ValueError, match="no hidden unit survives"):
        prune_units(model, {"cell": torch.zeros(HIDDEN, dtype=torch.bool)})
    with pytest.raises(ValueError, match="units"):
        prune_units(model, {"cell": torch.ones(HIDDEN + 1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'cell'"):
        prune_units(model, {"other": torch.ones(HIDDEN, dtype=torch.bool)})


def test_attach_refuses_other_cells_and_a_second_gate():
    from morphnas import spaces

    with pytest.raises(ValueError, match="NoneType"):
        attach_unit_gates(ForecastModel(None, HIDDEN, N_SERIES, ar_window=2))
    supernet = ForecastModel(spaces.build("two_input", N_SERIES, HIDDEN, 2), HIDDEN, N_SERIES)
    with pytest.raises(ValueError, match=type(supernet.cell).__name__):
        attach_unit_gates(supernet)
    model = forecaster("gru")
    attach_unit_gates(model)
    with pytest.raises(ValueError, match="already has a unit gate"):
        attach_unit_gates(model)
    detach_unit_gates(model)
    attach_unit_gates(model)


def test_gate_follows_the_cell_dtype_and_detach_restores_the_fused_kernel(monkeypatch):
    model = forecaster("darts_v2")
    gate = attach_unit_gates(model)["cell"]
    assert gate.alpha.dtype == torch.float64 and gate.dim == -1 and gate.channels == HIDDEN
    calls = []
    original = DartsRNNCell._fused_forward

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(DartsRNNCell, "_fused_forward", spy)
    model(windows())
    assert not calls  # gated: the eager loop
    detach_unit_gates(model)
    model(windows())
    assert calls  # ungated: the fused kernel again


@pytest.mark.parametrize("kind", ["darts_v2", "two_input_gru"])
def test_flops_see_inside_the_sequence_kernels(kind):
    """In float32 the derived cells run their hand-written (native) kernels, whose matmuls the
    counter cannot see; the count is the eager loop's, which computes the same function."""
    model = ForecastModel(CELLS[kind](N_SERIES, 4), 4, N_SERIES)
    x = windows().float()
    fused = recurrent_flops(model, x)
    model.cell.fused = False
    assert fused == recurrent_flops(model, x) > 2 * STEPS * N_SERIES * 4 * 4
