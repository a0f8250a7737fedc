"""The DARTS CNN operations (Liu et al. 2019), in plain PyTorch.

Every op that has weights starts with a ReLU (``ReLU → conv → BN``, as in DARTS). The search
supernet applies that ReLU once per state and hands the ops its result (``relu_first=False``),
because every conv edge leaving a state would otherwise compute the same ReLU again; a derived
network keeps the ReLU inside each op. BatchNorm is non-affine during search (DARTS: the
architecture weights would otherwise be rescaled freely by the BN's own scale) and affine in a
derived network.

``make_op(name, channels, stride, affine)`` builds one; ``OP_COST`` gives an op's parameters
and FLOPs per output pixel at ``channels`` (resource penalties need only their ratios).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from morphnas.genotype import CNN_OPS

POOLS = ("max_pool_3x3", "avg_pool_3x3")
# Conv ops: (kernel, dilation, separable). A separable conv is two dilation-1 stages.
CONVS = {
    "sep_conv_3x3": (3, 1, True),
    "sep_conv_5x5": (5, 1, True),
    "dil_conv_3x3": (3, 2, False),
    "dil_conv_5x5": (5, 2, False),
}


def _relu(relu_first: bool) -> list[nn.Module]:
    return [nn.ReLU(inplace=False)] if relu_first else []


class ReLUConvBN(nn.Sequential):
    """``ReLU → k×k conv → BN``: the cells' preprocessing of their inputs (k = 1)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool
    ) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


def _dil_stage(
    c_in: int, c_out: int, kernel: int, stride: int, dilation: int, affine: bool, relu: bool
) -> list[nn.Module]:
    """``[ReLU →] depthwise k×k (dilated) → pointwise 1×1 → BN``."""
    padding = dilation * (kernel - 1) // 2
    return [
        *_relu(relu),
        nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out, affine=affine),
    ]


class ConvOp(nn.Sequential):
    """A dilated conv (one stage) or a separable conv (two dilation-1 stages, the first with
    the stride), as DARTS's ``DilConv`` and ``SepConv``."""

    def __init__(
        self, name: str, channels: int, stride: int, affine: bool, relu_first: bool = True
    ) -> None:
        kernel, dilation, separable = CONVS[name]
        layers = _dil_stage(channels, channels, kernel, stride, dilation, affine, relu_first)
        if separable:
            layers += _dil_stage(channels, channels, kernel, 1, 1, affine, True)
        super().__init__(*layers)


class FactorizedReduce(nn.Module):
    """Halves the resolution without losing a pixel row: two stride-2 1×1 convs, the second on
    the input shifted by one pixel, concatenated (DARTS's skip connection of a reduction edge).
    An odd size is padded on the right and bottom first, so both halves agree in size."""

    def __init__(self, c_in: int, c_out: int, affine: bool, relu_first: bool = True) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even channel count, got {c_out}")
        self.relu = nn.ReLU(inplace=False) if relu_first else nn.Identity()
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class Pool(nn.Sequential):
    """3×3 max or average pooling (the average ignores the padding, as DARTS's), followed in
    the search by a non-affine BN (DARTS's ``MixedOp`` adds it so that a pool's scale matches
    the convs' and the mixture does not favour it for its size)."""

    def __init__(self, name: str, channels: int, stride: int, bn: bool) -> None:
        pool: nn.Module
        if name == "max_pool_3x3":
            pool = nn.MaxPool2d(3, stride, padding=1)
        else:
            pool = nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)
        super().__init__(pool, *([nn.BatchNorm2d(channels, affine=False)] if bn else []))


class Zero(nn.Module):
    """The ``none`` op: zeros of the output's shape (a strided edge halves the size)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :: self.stride, :: self.stride] * 0.0


def make_op(
    name: str,
    channels: int,
    stride: int,
    affine: bool,
    *,
    relu_first: bool = True,
    pool_bn: bool = False,
) -> nn.Module:
    """The op ``name`` on ``channels`` channels with ``stride`` (1, or 2 on a reduction cell's
    input edges). ``pool_bn``: a pool gets the search's BN after it."""
    if name == "none":
        return Zero(stride)
    if name in POOLS:
        return Pool(name, channels, stride, pool_bn)
    if name == "skip_connect":
        if stride == 1:
            return nn.Identity()
        return FactorizedReduce(channels, channels, affine, relu_first)
    if name in CONVS:
        return ConvOp(name, channels, stride, affine, relu_first)
    raise ValueError(f"unknown CNN op {name!r}; expected one of {list(CNN_OPS)}")


def reduction_cells(cells: int) -> tuple[int, ...]:
    """The 0-based positions of the reduction cells in a stack of ``cells`` (DARTS: at a third
    and two thirds; a stack of one or two has one reduction, its first cell)."""
    return tuple(sorted({cells // 3, 2 * cells // 3}))


@dataclass(frozen=True)
class CellShape:
    """One cell's place in a stack: the channels of its two inputs (``c_{k-2}``, ``c_{k-1}``),
    its own C, whether it reduces, and whether the cell before it did (then ``c_{k-2}`` is
    twice ``c_{k-1}``'s size and is reduced by its preprocessing)."""

    c_prev_prev: int
    c_prev: int
    channels: int
    reduction: bool
    reduction_prev: bool


def stack_shapes(cells: int, c_stem: int, hidden: int, multiplier: int) -> list[CellShape]:
    """The shapes of a stack of ``cells`` after a stem of ``c_stem`` channels, C = ``hidden``
    doubled at each reduction, each cell's output ``multiplier · C`` channels; the search
    network and the derived network are built from the same list."""
    reductions = reduction_cells(cells)
    shapes = []
    c_pp, c_p, channels, reduction_prev = c_stem, c_stem, hidden, False
    for k in range(cells):
        reduction = k in reductions
        channels *= 2 if reduction else 1
        shapes.append(CellShape(c_pp, c_p, channels, reduction, reduction_prev))
        c_pp, c_p, reduction_prev = c_p, multiplier * channels, reduction
    return shapes


def op_cost(name: str, channels: int) -> tuple[int, int]:
    """``(parameters, FLOPs per output pixel)`` of op ``name`` on a stride-1 edge of
    ``channels`` channels: a conv's multiply-adds count 2 FLOPs each, a pool 9 comparisons or
    additions per channel, skip and none nothing (BN is not counted)."""
    if name in CONVS:
        kernel, _, separable = CONVS[name]
        stage = channels * kernel * kernel + channels * channels
        params = stage * (2 if separable else 1)
        return params, 2 * params
    if name in POOLS:
        return 0, 9 * channels
    return 0, 0
