"""The hand-designed CNN baselines (shapes, structure, size) and ``count_flops`` against counts
worked out by hand: counters checked against hand-counted small networks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from morphnas.cells.image_baselines import (
    IMAGE_BASELINES,
    LeNet,
    ResNet20,
    VGGSmall,
    count_flops,
    image_baseline,
)

# (channels, height, width): digits, Fashion-MNIST, CIFAR-sized.
IMAGES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", IMAGE_BASELINES)
@pytest.mark.parametrize("width", [8, 16])
@pytest.mark.parametrize("image", IMAGES)
def test_features_shape_and_gradients(name: str, width: int, image: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    channels, h, w = image
    model = image_baseline(name, channels, width, (h, w))
    features, extra = model(torch.randn(3, channels, h, w))
    assert extra is None
    assert features.shape == (3, model.features)
    expected = 8 * width if name == "lenet" else 4 * width
    assert model.features == expected
    # The task's head on top, so that the loss reaches every parameter of the body.
    head = nn.Linear(model.features, 10)
    head(features).logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_factory_classes_and_unknown_name() -> None:
    assert isinstance(image_baseline("lenet", 1, 8, (8, 8)), LeNet)
    assert isinstance(image_baseline("resnet20", 1, 8, (8, 8)), ResNet20)
    assert isinstance(image_baseline("vgg_small", 1, 8, (8, 8)), VGGSmall)
    with pytest.raises(ValueError, match=r"resnet20.*vgg_small"):
        image_baseline("vgg", 1, 8, (8, 8))


def test_lenet_structure_and_too_small_image() -> None:
    model = LeNet(1, 8, (28, 28))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 8, (5, 5)),
        (8, 16, (5, 5)),
    ]
    assert [(f.in_features, f.out_features) for f in linears] == [(16 * 7 * 7, 64)]
    with pytest.raises(ValueError):
        LeNet(1, 8, (3, 3))


def test_resnet20_structure() -> None:
    model = ResNet20(3, 16)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    three = [c for c in convs if c.kernel_size == (3, 3)]
    one = [c for c in convs if c.kernel_size == (1, 1)]
    # 1 stem + 9 blocks x 2 = 19 weighted 3x3 layers (20 with the task's fc), plus 2 projections.
    assert len(three) == 19 and len(one) == 2 and len(convs) == 21
    assert [(c.in_channels, c.out_channels, c.stride) for c in one] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21
    assert all(c.bias is None for c in convs)
    widths = sorted({c.out_channels for c in three})
    assert widths == [16, 32, 64]
    # Stride 2 only entering stages 2 and 3: a 32x32 input ends at 8x8 before pooling.
    assert model.blocks(model.stem(torch.randn(1, 3, 32, 32))).shape == (1, 64, 8, 8)


def test_resnet20_parameter_count_matches_paper() -> None:
    # He et al. report 0.27M for ResNet-20 (option A shortcuts, with the 64x10 fc head).
    body = n_params(ResNet20(3, 16))
    with_head = body + 64 * 10 + 10
    assert 0.26e6 < with_head < 0.28e6
    # Option B's projections: two 1x1 convs (16*32 + 32*64 weights) and their BNs (2*(32 + 64)).
    # Without them it is option A's well-known 269,722 (with the head); with them, 272,474.
    assert with_head == 272_474
    assert with_head - (16 * 32 + 32 * 64) - 2 * (32 + 64) == 269_722
    # And its commonly quoted ~41M multiply-adds on a 32x32 CIFAR image (head excluded).
    flops = count_flops(ResNet20(3, 16), torch.randn(1, 3, 32, 32))
    assert 40e6 < flops / 2 < 41.5e6


class _Tiny(nn.Module):
    """One conv and one fc, returning a tuple like the baselines."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 5)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.fc(self.bn(self.conv(x)).relu().flatten(1)), None


def test_count_flops_tiny_model_by_hand() -> None:
    model = _Tiny()
    # Conv: 2 out channels x 16 positions x 9 multiply-adds; fc: 32 x 5; 2 FLOPs per MAC. Biases,
    # BN and ReLU are not counted. Only the first sample of the batch is measured.
    expected = 2 * (2 * 16 * 1 * 9) + 2 * (32 * 5)
    assert count_flops(model, torch.randn(1, 1, 4, 4)) == expected == 896
    assert count_flops(model, torch.randn(7, 1, 4, 4)) == expected
    # A plain tensor-returning module works too.
    assert count_flops(nn.Linear(3, 4), torch.randn(2, 3)) == 2 * 3 * 4


def _brute_force_flops(model: nn.Module, example: Tensor) -> int:
    """2 x multiply-adds of every conv and fc, from their output shapes seen by hooks."""
    total = 0

    def hook(module: nn.Module, _: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            per_output = module.in_channels // module.groups * k
            total += 2 * out.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += 2 * out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        model(example[:1])
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("name", IMAGE_BASELINES)
@pytest.mark.parametrize("image", IMAGES)
def test_count_flops_matches_brute_force(name: str, image: tuple[int, int, int]) -> None:
    channels, h, w = image
    model = image_baseline(name, channels, 8, (h, w))
    x = torch.randn(2, channels, h, w)
    assert count_flops(model, x) == _brute_force_flops(model, x) > 0


def test_lenet_flops_by_hand() -> None:
    # 8x8 digits, width 8: conv1 8x8 map x 8 ch x 25; conv2 4x4 x 16 ch x 8*25; fc 64 x 64.
    macs = 64 * 8 * 25 + 16 * 16 * 8 * 25 + 64 * 64
    assert count_flops(LeNet(1, 8, (8, 8)), torch.randn(1, 1, 8, 8)) == 2 * macs


# --------------------------------------------------------------------------- VGG-small


def test_vgg_small_structure_is_conv_bn_relu_six_times() -> None:
    model = VGGSmall(3, 16)
    layers = [m for m in model.body.modules() if not isinstance(m, nn.Sequential)]
    kinds = [type(m) for m in layers]
    block = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    # Stage 1, pool, stage 2, pool, stage 3: a BN right after every conv (the place of a gate).
    assert kinds == 2 * block + [nn.MaxPool2d] + 2 * block + [nn.MaxPool2d] + 2 * block
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    bns = [m for m in layers if isinstance(m, nn.BatchNorm2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64),
    ]  # fmt: skip
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    assert all(c.stride == (1, 1) for c in convs)
    assert all(type(b) is nn.BatchNorm2d and b.affine for b in bns)
    assert [b.num_features for b in bns] == [c.out_channels for c in convs]
    assert model.features == 64


@pytest.mark.parametrize(
    ("size", "body_out"),
    # Two 2x2 pools rounding up: 8 → 4 → 2, 28 → 14 → 7, 32 → 16 → 8, odd 7 → 4 → 2, and a
    # single pixel stays one (no image is too small).
    [(8, 2), (28, 7), (32, 8), (7, 2), (1, 1)],
)
def test_vgg_small_shapes(size: int, body_out: int) -> None:
    model = VGGSmall(1, 4)
    x = torch.randn(2, 1, size, size)
    assert model.body(x).shape == (2, 16, body_out, body_out)
    features, extra = model(x)
    assert features.shape == (2, 16) and extra is None


def test_vgg_small_parameters_by_hand() -> None:
    # Width 4, one input channel: six 3x3 convs without bias (9 · C_in · C_out each) and six
    # affine BNs (2 · C_out each: weight and bias); pools and global pooling hold nothing.
    convs = 9 * 1 * 4 + 9 * 4 * 4 + 9 * 4 * 8 + 9 * 8 * 8 + 9 * 8 * 16 + 9 * 16 * 16
    bns = 2 * 4 + 2 * 4 + 2 * 8 + 2 * 8 + 2 * 16 + 2 * 16
    assert n_params(VGGSmall(1, 4)) == convs + bns == 4_500 + 112
    # The literature's width (128-128-256-256-512-512 on RGB): its ~4.6M conv weights.
    convs = 9 * (3 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512)
    bns = 2 * (128 + 128 + 256 + 256 + 512 + 512)
    assert n_params(VGGSmall(3, 128)) == convs + bns == 4_578_176
    # Parameters do not depend on the image size (global pooling).
    assert n_params(image_baseline("vgg_small", 1, 4, (28, 28))) == 4_612


# ------------------------------------------------------------- count_flops against hand counts


class _TwoConvs(nn.Module):
    """A conv without padding, a strided conv with padding, and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3)  # 6x6 → 4x4
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 4x4 → 2x2
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv2(self.conv1(x).relu()).relu().flatten(1))


def test_count_flops_small_convs_and_linear_by_hand() -> None:
    # A conv: 2 · k² · C_in · C_out · H_out · W_out; a linear: 2 · in · out. Biases are free.
    conv1 = 2 * 3**2 * 2 * 3 * 4 * 4
    conv2 = 2 * 3**2 * 3 * 4 * 2 * 2
    fc = 2 * 16 * 5
    assert count_flops(_TwoConvs(), torch.randn(3, 2, 6, 6)) == conv1 + conv2 + fc == 2_752


def test_vgg_small_flops_by_hand() -> None:
    # Width 2 on an 8x8 digit: stage 1 at 8x8 (2, 2 channels), stage 2 at 4x4 (4, 4), stage 3
    # at 2x2 (8, 8); every conv 3x3, so 2 · 9 · C_in · C_out · H · W each. BN, ReLU and the
    # pools count nothing.
    stage1 = 2 * 9 * 1 * 2 * 8 * 8 + 2 * 9 * 2 * 2 * 8 * 8
    stage2 = 2 * 9 * 2 * 4 * 4 * 4 + 2 * 9 * 4 * 4 * 4 * 4
    stage3 = 2 * 9 * 4 * 8 * 2 * 2 + 2 * 9 * 8 * 8 * 2 * 2
    expected = stage1 + stage2 + stage3
    assert count_flops(VGGSmall(1, 2), torch.randn(1, 1, 8, 8)) == expected == 20_736


def test_lenet_width_2_flops_by_hand() -> None:
    # Width 2 on 8x8: conv1 5x5, 1 → 2 channels at 8x8; conv2 5x5, 2 → 4 at 4x4 (after a pool);
    # fc from 4 channels x 2x2 (after the second pool) = 16 to 8 · 2 = 16 units.
    conv1 = 2 * 5**2 * 1 * 2 * 8 * 8
    conv2 = 2 * 5**2 * 2 * 4 * 4 * 4
    fc = 2 * 16 * 16
    assert count_flops(LeNet(1, 2, (8, 8)), torch.randn(1, 1, 8, 8)) == conv1 + conv2 + fc == 13_312


def test_count_flops_restores_training_mode() -> None:
    model = ResNet20(1, 8)
    model.train()
    model.blocks[0].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    stats = model.stem[1].running_mean.clone()
    count_flops(model, torch.randn(4, 1, 8, 8))
    assert [m.training for m in model.modules()] == before
    assert torch.equal(model.stem[1].running_mean, stats)  # eval mode: BN statistics untouched
    model.eval()
    count_flops(model, torch.randn(4, 1, 8, 8))
    assert not any(m.training for m in model.modules())
