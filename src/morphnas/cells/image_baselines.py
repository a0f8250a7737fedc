"""Hand-designed CNN baselines for image classification, and the FLOPs of one forward.

Every body here shares one interface, ``forward(x) -> (features, None)`` with ``x`` of shape
``(N, C, H, W)`` and ``features`` of shape ``(N, model.features)``: the task owns the classifier
head (``nn.Linear(model.features, n_classes)``), so a searched network and a baseline are judged
behind the same head, and the ``None`` keeps the tuple shape of the recurrent cells'
``(outputs, h_last)`` so that a task unpacks every model alike. Plain PyTorch: torchvision is not
a dependency.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

IMAGE_BASELINES: tuple[str, ...] = ("lenet", "resnet20", "vgg_small")


class LeNet(nn.Module):
    """LeNet-5 (LeCun et al. 1998) without its classifier: conv5x5 → ReLU → maxpool2 → conv5x5 →
    ReLU → maxpool2 → flatten → fc → ReLU.

    Widths scale with ``width``: the convolutions have ``width`` and ``2 * width`` channels and
    the fc ``8 * width`` units, so ``width=8`` gives 8/16/64 against the original 6/16/120 and
    ``width=16`` 16/32/128. Both convolutions pad by 2 (the original pads neither, and takes 32x32
    inputs to 5x5): only the pools shrink the map, so an 8x8 digit still ends at 2x2 instead of
    vanishing, and 28x28 ends at 7x7. The fc's input size therefore depends on ``image_size``,
    which the constructor needs; the original's ReLU stands in for its scaled tanh, as in
    every modern re-implementation.
    """

    def __init__(self, channels: int, width: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        height, breadth = image_size
        # Two floor-halving pools: anything under 4 pixels a side would end with an empty map.
        if min(height, breadth) < 4:
            raise ValueError(f"LeNet needs images of at least 4x4, got {height}x{breadth}")
        c1, c2 = width, 2 * width
        self.features = 8 * width
        self.body = nn.Sequential(
            nn.Conv2d(channels, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (height // 4) * (breadth // 4), self.features),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.body(x), None


class BasicBlock(nn.Module):
    """He et al.'s basic block: conv3x3 → BN → ReLU → conv3x3 → BN, plus the shortcut, → ReLU.

    Where the block changes the shape (stride 2, more channels) the shortcut is a 1x1 conv + BN
    projection (the paper's option B) rather than option A's zero-padded identity: it is the
    common re-implementation, needs no hand-written padding op, and costs only ~2.8k parameters
    over option A at ``width=16``. Elsewhere the shortcut is the identity.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. (2016, §4.2) without its classifier: a 3x3 conv stem of
    ``width`` channels (+ BN + ReLU), three stages of three basic blocks at ``width``,
    ``2 * width`` and ``4 * width`` channels (stride 2 entering stages 2 and 3), and global
    average pooling, so ``features = 4 * width``.

    That is 19 weighted convolutions (1 + 3·3·2) plus the two projection shortcuts (see
    ``BasicBlock``); with the task's fc head it is the paper's 20 layers. Global pooling makes it
    indifferent to the image size (an 8x8 digit ends at 2x2). Convolutions carry no bias (the BN
    after each has one) and start from He (Kaiming) normal initialisation, as in the paper.
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.features = 4 * width
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.pool(self.blocks(self.stem(x))).flatten(1), None


class VGGSmall(nn.Module):
    """The "VGG-small" of the quantisation and pruning literature (the CIFAR network of
    BinaryConnect, Courbariaux et al. 2015, as LQ-Nets, Zhang et al. 2018, named it), scaled down
    and without its classifier: three stages of two 3x3 convolutions at ``width``, ``2 * width`` and
    ``4 * width`` channels, each convolution followed by BN and ReLU, a 2x2 max pool after
    stages 1 and 2, and global average pooling, so ``features = 4 * width``. ``width=128`` gives
    the literature's six convolutions of 128-128-256-256-512-512 channels.

    Every convolution is exactly conv3x3 (padding 1, no bias: the BN after it has one) → BN
    (``nn.BatchNorm2d``, affine) → ReLU, with nothing between a convolution and its BN: a channel
    gate per BN (DNAL-style pruning) goes in right after each BN, where it scales whole output
    channels. Convolutions start from He (Kaiming) normal initialisation, as in ``ResNet20``.

    Global average pooling after stage 3 stands in for the original's third pool and its fully
    connected layers: it makes the network indifferent to the image size (an 8x8 digit ends at
    2x2, a 28x28 one at 7x7, a 32x32 CIFAR image at 8x8) and its parameters independent of it.
    The two pools round up (``ceil_mode``): on even sizes that is the usual floor pooling, an odd
    side keeps its last row or column instead of dropping it, and no image is too small (a 1x1
    map stays 1x1), so unlike ``LeNet`` there is no size to check.
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.features = 4 * width
        stages: list[nn.Module] = []
        c_in = channels
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            if stage > 0:
                stages.append(nn.MaxPool2d(2, ceil_mode=True))
            layers: list[nn.Module] = []
            for _ in range(2):
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(),
                ]
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        # body: stage 1, pool, stage 2, pool, stage 3 (each stage conv → BN → ReLU twice).
        self.body = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.pool(self.body(x)).flatten(1), None


def image_baseline(name: str, channels: int, width: int, image_size: tuple[int, int]) -> nn.Module:
    """The baseline body ``name`` (one of ``IMAGE_BASELINES``) for ``channels``-channel images of
    ``image_size`` (height, width); the task adds the classifier head on ``model.features``."""
    if name == "lenet":
        return LeNet(channels, width, image_size)
    if name == "resnet20":
        return ResNet20(channels, width)
    if name == "vgg_small":
        return VGGSmall(channels, width)
    raise ValueError(f"unknown image baseline {name!r}; expected one of {list(IMAGE_BASELINES)}")


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """``models`` in eval mode inside, every submodule's own training flag put back after (a
    measurement must not update BatchNorm's running statistics, nor leave a model mid-training
    in eval mode; a submodule may differ from its parent, so each flag is kept)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def count_flops(model: nn.Module, example: Tensor) -> int:
    """FLOPs of one forward of one sample (``example[:1]``), by PyTorch's ``FlopCounterMode``.

    Like that counter, this counts matrix multiplications and convolutions only, at 2 FLOPs per
    multiply-add; biases, BatchNorm, activations, pooling and other elementwise ops count
    nothing. The forward runs without autograd in eval mode (BatchNorm must not update its running
    statistics for a measurement, and must accept a batch of one), and every submodule's own
    training flag is restored afterwards, so a model mid-training is left as it was. ``model``'s
    forward takes the batch as its only positional argument; what it returns is ignored (a tensor
    or a tuple alike).
    """
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(example[:1])
    return int(counter.get_total_flops())
