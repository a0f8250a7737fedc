"""The yardstick: the DARTS reference search cell, and the matmul FLOPs of every timed model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from morphnas.genotype import DARTS_PRIMITIVES, Genotype
from morphnas.ops import ACTIVATIONS
from morphnas.spaces import DartsRNNSearchCell


class ReferenceDartsCell(nn.Module):
    """The DARTS search cell written as the reference code runs it (``rnn/model_search.py``).

    Kept deliberately straightforward, because it is the yardstick our fused cell is measured
    against: per time step the softmax of ``α`` is recomputed, ``x_t`` and ``h_{t-1}`` are
    concatenated for one init GEMM; per node the dropout mask is re-applied to the whole stack of
    predecessor states (one GEMM over the stack, as the reference does), then per primitive a
    full highway blend over every predecessor edge and a probability-weighted sum over the edges;
    BatchNorm; ``torch.cat`` grows the state stack. Masks are drawn like ours (same RNG calls), so
    with the same seed both cells compute the same function.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        nodes: int = 8,
        dropout_x: float = 0.0,
        dropout_h: float = 0.0,
    ) -> None:
        super().__init__()
        d = hidden_size
        self.input_size, self.hidden_size, self.steps = input_size, hidden_size, nodes
        self.dropout_x, self.dropout_h = dropout_x, dropout_h
        self._W0 = nn.Parameter(torch.zeros(input_size + d, 2 * d))
        self._Ws = nn.ParameterList(nn.Parameter(torch.zeros(d, 2 * d)) for _ in range(nodes))
        self.weights = nn.Parameter(torch.zeros(nodes * (nodes + 1) // 2, len(DARTS_PRIMITIVES)))
        self.bn = nn.BatchNorm1d(d, affine=False)

    @classmethod
    def copy_of(cls, cell: DartsRNNSearchCell) -> ReferenceDartsCell:
        """A reference cell holding copies of ``cell``'s parameters (its ``α`` rows stacked)."""
        if cell.op_names != DARTS_PRIMITIVES or cell.fixed or len(cell.gammas) or cell.bn is None:
            raise ValueError("the reference covers the plain DARTS supernet only")
        ref = cls(cell.input_size, cell.hidden_size, cell.nodes, cell.dropout_x, cell.dropout_h)
        ref = ref.to(device=cell.init_weight.device, dtype=cell.init_weight.dtype)
        with torch.no_grad():
            ref._W0.copy_(cell.init_weight)
            for mine, theirs in zip(ref._Ws, cell.node_weights, strict=True):
                mine.copy_(theirs)
            ref.weights.copy_(torch.cat(list(cell.arch)))
        return ref

    def _mask(self, batch: int, size: int, p: float, like: Tensor) -> Tensor | None:
        if not self.training or p <= 0.0:
            return None
        return like.new_empty(batch, size).bernoulli_(1.0 - p) / (1.0 - p)

    def _init_state(
        self, x: Tensor, h_prev: Tensor, x_mask: Tensor | None, h_mask: Tensor | None
    ) -> Tensor:
        xm = x if x_mask is None else x * x_mask
        hm = h_prev if h_mask is None else h_prev * h_mask
        c0, h0 = torch.split(torch.cat([xm, hm], dim=-1).mm(self._W0), self.hidden_size, dim=-1)
        return h_prev + c0.sigmoid() * (h0.tanh() - h_prev)

    def cell(
        self, x: Tensor, h_prev: Tensor, x_mask: Tensor | None, h_mask: Tensor | None
    ) -> Tensor:
        d = self.hidden_size
        s0 = self.bn(self._init_state(x, h_prev, x_mask, h_mask))
        probs = torch.softmax(self.weights, dim=-1)
        offset, states = 0, s0.unsqueeze(0)
        for i in range(self.steps):
            masked = states if h_mask is None else states * h_mask.unsqueeze(0)
            ch = masked.view(-1, d).mm(self._Ws[i]).view(i + 1, -1, 2 * d)
            c, h = torch.split(ch, d, dim=-1)
            c = c.sigmoid()
            s = torch.zeros_like(s0)
            for k, name in enumerate(DARTS_PRIMITIVES):
                if name == "none":
                    continue
                unweighted = states + c * (ACTIVATIONS[name](h) - states)
                s += torch.sum(probs[offset : offset + i + 1, k, None, None] * unweighted, dim=0)
            s = self.bn(s)
            states = torch.cat([states, s.unsqueeze(0)], 0)
            offset += i + 1
        return torch.mean(states[-self.steps :], dim=0)

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        steps, batch, _ = x.shape
        x_mask = self._mask(batch, self.input_size, self.dropout_x, x)
        h_mask = self._mask(batch, self.hidden_size, self.dropout_h, x)
        hidden = x.new_zeros(batch, self.hidden_size) if h0 is None else h0
        hiddens = []
        for t in range(steps):
            hidden = self.cell(x[t], hidden, x_mask, h_mask)
            hiddens.append(hidden)
        return torch.stack(hiddens), hidden


def supernet_flops(batch: int, input_size: int, hidden: int, bptt: int, nodes: int) -> int:
    """Matmul FLOPs of one training step of the DARTS supernet (forward ×3 for the backward).

    Per time step: the init GEMM ``(B, in+d) @ (in+d, 2d)``, and for node ``i`` one
    ``(B, d) @ (d, 2d)`` per predecessor (``i`` of them). A multiply-add is 2 FLOPs. Elementwise
    work (activations, blends, BatchNorm) is not counted.
    """
    d = hidden
    init = 2 * batch * (input_size + d) * 2 * d
    node_edges = nodes * (nodes + 1) // 2
    edges = node_edges * 2 * batch * d * 2 * d
    return 3 * bptt * (init + edges)


def _darts_step_flops(genotype: Genotype, batch: int, input_size: int, hidden: int) -> int:
    """The init GEMM ``(B, in+d) @ (in+d, 2d)`` plus one ``(B, d) @ (d, 2d)`` per node."""
    d = hidden
    return 2 * batch * (input_size + d) * 2 * d + len(genotype.nodes) * 2 * batch * d * 2 * d


def _two_input_step_flops(genotype: Genotype, batch: int, input_size: int, hidden: int) -> int:
    """The input projection ``(B, in) @ (in, d)``, ``[a, b] @ (2d, d)`` per ``add_*`` node and
    ``b @ (d, 2d)`` per ``highway`` node; ``hadamard``/``add`` have no matmul."""
    d = hidden
    weighted = sum(node.op.startswith("add_") or node.op == "highway" for node in genotype.nodes)
    return 2 * batch * input_size * d + weighted * 2 * batch * 2 * d * d


# Per search space, the matmul FLOPs of one forward time step of its derived cell. Explicit per
# space: a new space without its count here is an error, not another space's count.
STEP_FLOPS: dict[str, Callable[[Genotype, int, int, int], int]] = {
    "darts_rnn": _darts_step_flops,
    "two_input": _two_input_step_flops,
}
BASELINE_GATES = {"lstm": 4, "gru": 3}


def cell_flops(model: Genotype | str, batch: int, input_size: int, hidden: int, bptt: int) -> int:
    """Matmul FLOPs of one forward+backward of a discrete cell or ``lstm``/``gru`` (×3 forward).

    LSTM: ``(B, in) @ (in, 4d)`` and ``(B, d) @ (d, 4d)`` per step; GRU the same with 3 gates.
    A derived cell: its space's count in ``STEP_FLOPS``. The DARTS kernel's mean of the nodes,
    a ``(1, N) @ (N, B·d)`` per step (``1/(2d)`` of one node's FLOPs), is not counted.
    """
    if isinstance(model, str):
        per_step = 2 * batch * (input_size + hidden) * BASELINE_GATES[model] * hidden
    elif model.space in STEP_FLOPS:
        per_step = STEP_FLOPS[model.space](model, batch, input_size, hidden)
    else:
        raise ValueError(
            f"no FLOP count for search space {model.space!r}; known: {sorted(STEP_FLOPS)}"
        )
    return 3 * bptt * per_step
