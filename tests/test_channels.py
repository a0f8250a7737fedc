"""DNAL's channel gate, its β schedule and read-out, and CNNs pruned for real against masking."""

from __future__ import annotations

import copy
import itertools
import math
import zlib

import pytest
import torch
from torch import nn

from morphnas.cells.darts_cnn import DartsCNNNetwork
from morphnas.cells.image_baselines import IMAGE_BASELINES, image_baseline
from morphnas.channels.cnn import attach_bn_gates, bn_gates, detach_bn_gates, prune_channels
from morphnas.channels.dnal import ChannelOptions, keep_strongest
from morphnas.channels.gates import (
    ChannelGate,
    beta_at,
    load_masks,
    penalty,
    read_out,
    set_beta,
    set_mode,
)
from morphnas.tasks.classification import ImageModel
from test_darts_cnn import GENOTYPE as CNN_GENOTYPE

# --- the gate -----------------------------------------------------------------------------------


def test_scaled_sigmoid_tends_to_the_step_as_beta_grows():
    gate = ChannelGate(5, dim=-1, mode="soft")
    with torch.no_grad():
        gate.alpha.copy_(torch.tensor([-0.3, -1e-3, 0.0, 1e-3, 0.3]))
    gaps = []
    for beta in (1.0, 1e2, 1e4, 1e6):
        set_beta([gate], beta)
        step = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0])  # σ(0) stays ½ at any β
        gaps.append(float((gate.value().detach() - step).abs().max()))
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.4 and gaps[-1] < 1e-6


def test_gate_gradient_is_beta_times_the_sigmoid_slope():
    """d(Σ y)/dα_c = Σ x_c · β σ'(βα_c), checked against the formula and finite differences."""
    torch.manual_seed(0)
    gate = ChannelGate(3, dim=1, mode="soft").double()
    with torch.no_grad():
        gate.alpha.copy_(torch.tensor([-0.02, 0.01, 0.05]))
    set_beta([gate], 40.0)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    gate(x).sum().backward()
    s = torch.sigmoid(40.0 * gate.alpha.detach())
    expected = x.sum(dim=(0, 2, 3)) * 40.0 * s * (1 - s)
    torch.testing.assert_close(gate.alpha.grad, expected)
    assert torch.autograd.gradcheck(
        lambda a: (x * torch.sigmoid(40.0 * a).view(1, 3, 1, 1)).sum(),
        gate.alpha.detach().clone().requires_grad_(),
    )


def test_gate_modes():
    gate = ChannelGate(3, dim=-1)
    x = torch.ones(2, 3)
    assert torch.equal(gate(x), x)  # identity: the weight stage
    gate.mask.copy_(torch.tensor([1.0, 0.0, 1.0]))
    set_mode([gate], "mask")
    assert torch.equal(gate(x), torch.tensor([[1.0, 0.0, 1.0]] * 2))
    set_mode([gate], "soft")
    assert torch.allclose(gate(x), torch.tensor([[0.5, 0.0, 0.5]] * 2))  # α = 0: σ = ½
    with pytest.raises(ValueError, match="unknown gate mode"):
        set_mode([gate], "off")


def test_beta_schedule_is_geometric_and_reaches_its_end():
    betas = [beta_at(e, 10) for e in range(1, 11)]
    assert betas[-1] == 1e4
    assert betas[0] == pytest.approx(10**0.4)  # the authors' first epoch already runs at ≈2.51
    ratios = [b / a for a, b in itertools.pairwise(betas)]
    assert ratios == pytest.approx([10**0.4] * 9)
    assert beta_at(3, 3, start=2.0, end=2.0) == 2.0
    with pytest.raises(ValueError):
        beta_at(0, 10)


def test_penalty_forms():
    gates = [ChannelGate(2), ChannelGate(3)]
    with torch.no_grad():
        gates[0].alpha.copy_(torch.tensor([1.0, -1.0]))
    set_beta(gates, 100.0)
    with torch.no_grad():
        unscaled, scaled = float(penalty(gates)), float(penalty(gates, scaled=True))
    assert unscaled == pytest.approx(1.0 + 3 * 0.5)  # σ(1) + σ(−1) = 1
    assert scaled == pytest.approx(torch.sigmoid(torch.tensor(100.0)).item() + 0.0 + 1.5, abs=1e-6)


def test_read_out_thresholds_and_keeps_one_channel_per_gate():
    gates = {"a": ChannelGate(3), "b": ChannelGate(2)}
    with torch.no_grad():
        gates["a"].alpha.copy_(torch.tensor([0.01, -0.01, 0.0]))
        gates["b"].alpha.copy_(torch.tensor([-0.2, -0.1]))
    set_beta(gates.values(), 1e4)
    masks = read_out(gates, threshold=0.9)
    assert masks["a"].tolist() == [True, False, False] and masks["b"].tolist() == [False, False]
    assert keep_strongest(gates, masks) == 1 and masks["b"].tolist() == [False, True]
    assert gates["b"].mask.tolist() == [0.0, 1.0]
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            read_out(gates, threshold=bad)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lambdas", (-1e-4,), "λ must be >= 0"),
        ("threshold", 1.0, "less than 1"),
        ("threshold", 0.0, "greater than 0"),
        ("arch_epochs", 0, "greater than or equal to 1"),
    ],
)
def test_channel_options_refuse_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        ChannelOptions(**{field: value})


# --- CNNs: physical pruning equals masking ------------------------------------------------------


def _randomised(model: nn.Module) -> nn.Module:
    """BN statistics and affines away from their init, so every channel's mask matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _gated_bodies() -> dict[str, nn.Module]:
    bodies = {
        name: image_baseline(name, 1, 4, (8, 8))
        for name in IMAGE_BASELINES
        if any(isinstance(m, nn.BatchNorm2d) for m in image_baseline(name, 1, 4, (8, 8)).modules())
    }
    bodies["darts_cnn"] = DartsCNNNetwork(CNN_GENOTYPE, 1, 4, cells=5)
    return bodies


@pytest.mark.parametrize("share", [0.5, 0.1, 0.9])
@pytest.mark.parametrize("name", sorted(_gated_bodies()))
def test_pruned_cnn_equals_the_masked_one_in_train_and_eval_mode(name, share):
    """Eval mode uses the running statistics; train mode the batch's (and updates the running
    ones): a closed channel is a zero map after its BN either way, so both must agree to 1e-5."""
    torch.manual_seed(zlib.crc32(f"{name} {share}".encode()))  # hash() differs per process
    model = _randomised(ImageModel(_gated_bodies()[name], 10).double())
    gates = attach_bn_gates(model)
    masks = {n: torch.rand(g.channels) > share for n, g in gates.items()}
    for mask in masks.values():
        mask[0] = True  # the read-out keeps at least one channel per gate
    load_masks(gates, masks)
    set_mode(gates.values(), "mask")
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    reference = copy.deepcopy(model)
    pruned = prune_channels(model, masks, x)
    assert not hasattr(pruned, "channel_gates")
    for _, p in model.named_parameters():
        assert p.requires_grad
    params = lambda m: sum(p.numel() for n, p in m.named_parameters() if "channel_gates" not in n)  # noqa: E731
    assert params(pruned) < params(model)
    model.eval(), pruned.eval()
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)
    model.train(), pruned.train()
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)
    # the original is untouched by pruning (its structure and weights)
    for (n, a), (_, b) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        if (
            "running" not in n and "num_batches" not in n
        ):  # train-mode forwards moved the statistics
            assert torch.equal(a, b), n


def test_residual_groups_prune_a_channel_only_where_every_added_tensor_closes_it():
    """ResNet-20's first stage: the stem's BN and the three blocks' second BNs are added together.
    A channel closed at some of them but open at one survives; closed at all, it goes."""
    torch.manual_seed(0)
    model = _randomised(ImageModel(image_baseline("resnet20", 1, 4, (8, 8)), 10).double())
    gates = attach_bn_gates(model)
    group = ["cell.stem.1", "cell.blocks.0.bn2", "cell.blocks.1.bn2", "cell.blocks.2.bn2"]
    masks = {n: torch.ones(g.channels, dtype=torch.bool) for n, g in gates.items()}
    for name in group:
        masks[name][1] = False  # channel 1 closed everywhere in the group
        masks[name][2] = name != "cell.blocks.1.bn2"  # channel 2 open at one block only
    load_masks(gates, masks)
    set_mode(gates.values(), "mask")
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    pruned = prune_channels(model, masks, x)
    assert pruned.cell.stem[0].out_channels == 3 and pruned.cell.blocks[0].bn2.num_features == 3
    assert pruned.cell.blocks[3].conv1.in_channels == 3
    model.eval(), pruned.eval()
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)


def test_gates_attach_after_every_affine_bn_and_detach_cleanly():
    model = ImageModel(image_baseline("resnet20", 1, 4, (8, 8)), 10)
    before = set(model.state_dict())
    gates = attach_bn_gates(model)
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(gates) == sorted(norms) and bn_gates(model).keys() == gates.keys()
    assert {k for k in model.state_dict() if not k.startswith("channel_gates")} == before
    detach_bn_gates(model)
    assert set(model.state_dict()) == before
    x = torch.randn(2, 1, 8, 8)
    assert all(not m._forward_hooks for m in model.modules())
    model(x)
    with pytest.raises(ValueError, match="no BatchNorm"):
        attach_bn_gates(ImageModel(image_baseline("lenet", 1, 4, (8, 8)), 10))


def test_a_closed_gate_zeroes_its_channel_through_the_hook():
    model = ImageModel(image_baseline("resnet20", 1, 4, (8, 8)), 10).eval()
    gates = attach_bn_gates(model)
    seen = {}
    model.cell.stem[2].register_forward_hook(lambda m, i, o: seen.setdefault("relu", o))
    gates["cell.stem.1"].mask[0] = 0.0
    set_mode(gates.values(), "mask")
    model(torch.randn(2, 1, 8, 8))
    assert torch.all(seen["relu"][:, 0] == 0) and torch.any(seen["relu"][:, 1] != 0)
    assert math.isclose(float(gates["cell.stem.1"].value()[1]), 1.0)
