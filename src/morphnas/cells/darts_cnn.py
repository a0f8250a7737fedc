"""The network a ``darts_cnn`` genotype describes, built from scratch for retraining: the search
network's shape (stem, a stack of normal and reduction cells, global average pooling) with each
node's two chosen edges in place of the mixtures, and affine BatchNorm (DARTS's evaluation
network, without its auxiliary head and drop-path).

``forward(x)`` returns ``(features, None)`` as the supernet does, so the task's head reads both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from morphnas.genotype import Genotype, Node
from morphnas.ops.cnn import CellShape, FactorizedReduce, ReLUConvBN, make_op, stack_shapes


class DerivedCell(nn.Module):
    """One cell of the derived network: its genotype cell's nodes, one op per edge."""

    def __init__(self, nodes: tuple[Node, ...], shape: CellShape, multiplier: int) -> None:
        super().__init__()
        self.nodes, self.multiplier = nodes, multiplier
        channels = shape.channels
        if shape.reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(shape.c_prev_prev, channels, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(shape.c_prev_prev, channels, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(shape.c_prev, channels, 1, 1, 0, affine=True)
        self.ops = nn.ModuleList(
            nn.ModuleList(
                make_op(op, channels, 2 if shape.reduction and j < 1 else 1, affine=True)
                for op, j in zip(node.op, node.inputs, strict=True)
            )
            for node in nodes
        )
        self.out_channels = multiplier * channels

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node, ops in zip(self.nodes, self.ops, strict=True):
            states.append(sum(op(states[j + 1]) for op, j in zip(ops, node.inputs, strict=True)))
        return torch.cat(states[-self.multiplier :], dim=1)


class DartsCNNNetwork(nn.Module):
    """``cells`` cells at ``hidden_size`` = C channels (doubled at each reduction) over
    ``input_size`` image channels; ``multiplier``: the nodes a cell concatenates (its last ones;
    default all); ``stem_multiplier``: the stem's channels in units of C."""

    modality = "images"

    def __init__(
        self,
        genotype: Genotype,
        input_size: int,
        hidden_size: int,
        cells: int = 5,
        multiplier: int | None = None,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        self.genotype = genotype
        (_, normal), (_, reduce) = genotype.cells()
        multiplier = len(normal) if multiplier is None else multiplier
        if not 1 <= multiplier <= len(normal):
            raise ValueError(f"multiplier ({multiplier}) must be in 1..{len(normal)} (the steps)")
        c_stem = stem_multiplier * hidden_size
        self.stem = nn.Sequential(
            nn.Conv2d(input_size, c_stem, 3, padding=1, bias=False), nn.BatchNorm2d(c_stem)
        )
        self.cells = nn.ModuleList()
        for shape in stack_shapes(cells, c_stem, hidden_size, multiplier):
            nodes = reduce if shape.reduction else normal
            self.cells.append(DerivedCell(nodes, shape, multiplier))
        self.features = self.cells[-1].out_channels

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, None]:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return s1.mean(dim=(2, 3)), None
