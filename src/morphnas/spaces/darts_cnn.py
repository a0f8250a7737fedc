"""The DARTS CNN cell space (Liu et al. 2019): a stack of normal and reduction cells whose edges
mix the eight DARTS operations, sized for a CPU by default.

Shape, as DARTS's search network: a 3×3 conv stem to ``stem_multiplier · C`` channels, then
``nodes`` cells (the unit that grows here: a cell, as a recurrent space grows by a node); the
cells at a third and two thirds of the stack are reduction cells (stride 2 on their input edges,
channels doubled). A cell reads the outputs of the two cells before it (``c_{k-2}, c_{k-1}``,
states -1 and 0), preprocesses them to its ``C`` channels, and computes ``steps`` nodes, each the
sum of one mixed edge from every earlier state; its output is the concatenation of its last
``multiplier`` nodes. Global average pooling gives the features the task's head reads
(``forward`` returns ``(features, None)``, the pair the recurrent spaces return).

Architecture parameters are shared by all cells of a type: ``arch`` holds the normal cell's
nodes 1..steps then the reduction cell's, node ``i``'s ``α`` of shape ``(states, ops)`` (one row
per earlier state, as ``darts_rnn``'s), read per row by a softmax (DARTS's per-edge mixture). A
node derives to its two strongest edges (the largest non-``none`` weight of a row), each with
its strongest op: DARTS's top-2 rule; ``node_options`` ranks the pairs for ``selection``.

Speed without changing the function (each checked against ``reference_forward``, a per-edge,
per-op loop in the DARTS code's shape): the ReLU every conv op starts with is applied once per
state; the parameter-free ops of a state (the two pools with their BN, the identity) are
computed once and shared by every edge that leaves it; ``none`` is never computed; a
``SampledMixing`` (GDAS, random search) runs the sampled edge's op alone.

Growth (``grow``) appends a normal cell at the end as a residual: ``out = c_L + γ ⊙ cell(c_{L-1},
c_L)`` with ``γ = 0`` per channel, so the network's output is unchanged in train and eval mode
(the new cell's own BatchNorm statistics move, its output is multiplied by zero). ``widen``
widens C by Net2WiderNet, also function-preserving in both modes.

Memory-lean search (docs/method.md, "Memory-lean search"): ``partial_channels = K`` sends the
first ``C/K`` channels of every state through an edge's mixed op and lets the rest bypass it
(a 2×2 max pool on a strided edge), then concatenates the two and shuffles the channels in ``K``
groups, as PC-DARTS (Xu et al. 2020) does; its ops are built ``C/K`` wide, so the mixed ops'
activations shrink ``K``-fold. ``edge_normalisation`` (on by default where ``K > 1``, as PC-DARTS)
gives every node a ``β`` over its incoming edges: the node is ``Σ_j softmax(β)_j · edge_j``, and a
derived edge is scored by ``softmax(β)_j · softmax(α_j)_k``. ``recompute`` checkpoints every
cell (``torch.utils.checkpoint``): only the cells' inputs are kept for backward, the inside is
recomputed, with the BatchNorm running statistics restored so that they move once per step.
``K = 1`` without edge normalisation and recompute is exactly the DARTS supernet above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from morphnas.genotype import CNN_OPS, Node
from morphnas.ops.cnn import (
    POOLS,
    CellShape,
    FactorizedReduce,
    ReLUConvBN,
    make_op,
    op_cost,
    stack_shapes,
)
from morphnas.spaces.base import ArchitectureMixin, SampledMixing, Widening, new_alpha

# Alternatives a node offers ``selection`` besides its best pair (the likeliest pairs).
NODE_OPTIONS = 6


class SearchCell(nn.Module):
    """One cell of the supernet: preprocessing, and per edge the ops with weights (the shared
    parameter-free ops live per state, ``shared``)."""

    def __init__(self, shape: CellShape, steps: int, multiplier: int, partial: int = 1) -> None:
        super().__init__()
        self.reduction, self.steps, self.multiplier = shape.reduction, steps, multiplier
        channels = self.channels = shape.channels
        self.partial = partial
        if channels % partial:
            raise ValueError(
                f"partial_channels ({partial}) must divide every cell's channel count "
                f"({channels} here): pick a hidden size divisible by it"
            )
        width = channels // partial  # what an edge's ops see (PC-DARTS: C/K)
        if shape.reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(
                shape.c_prev_prev, channels, affine=False
            )
        else:
            self.preprocess0 = ReLUConvBN(shape.c_prev_prev, channels, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(shape.c_prev, channels, 1, 1, 0, affine=False)
        # edges[i][j]: node i+1's edge from state j-1 (row j of its α); ops with weights only.
        self.edges = nn.ModuleList()
        for i in range(steps):
            node = nn.ModuleList()
            for j in range(i + 2):
                stride = self.stride(j)
                node.append(
                    nn.ModuleDict(
                        {
                            name: make_op(name, width, stride, False, relu_first=False)
                            for name in CNN_OPS
                            if _has_weights(name, stride)
                        }
                    )
                )
            self.edges.append(node)
        # shared[j]: state j-1's parameter-free ops, at the stride of the edges leaving it.
        self.shared = nn.ModuleList(
            nn.ModuleDict(
                {name: make_op(name, width, self.stride(j), False, pool_bn=True) for name in POOLS}
            )
            for j in range(steps + 1)
        )

    def stride(self, j: int) -> int:
        """The stride of the edges leaving state row ``j`` (the cell's two inputs in a
        reduction cell: 2)."""
        return 2 if self.reduction and j < 2 else 1

    @property
    def out_channels(self) -> int:
        return self.multiplier * self.channels

    def inputs(self, s0: Tensor, s1: Tensor) -> list[Tensor]:
        return [self.preprocess0(s0), self.preprocess1(s1)]

    def selected(self, state: Tensor) -> Tensor:
        """The channels of ``state`` an edge's mixed op sees: the first ``C/K`` (all at K=1)."""
        return state if self.partial == 1 else state[:, : state.shape[1] // self.partial]

    def bypass(self, j: int, state: Tensor) -> Tensor:
        """The channels that skip the mixed op of an edge from state row ``j``, downsampled as
        PC-DARTS does on a strided edge (a 2×2 max pool; ``ceil_mode`` for odd sizes, where the
        ops' padded stride-2 output is rounded up)."""
        rest = state[:, state.shape[1] // self.partial :]
        return F.max_pool2d(rest, 2, 2, ceil_mode=True) if self.stride(j) == 2 else rest

    def join(self, mixed: Tensor, rest: Tensor) -> Tensor:
        """PC-DARTS's edge output: the mixed op's channels, then the bypass, shuffled in ``K``
        groups (so that the next edge's first ``C/K`` channels take some of each)."""
        return channel_shuffle(torch.cat([mixed, rest], dim=1), self.partial)

    def op(self, name: str, i: int, j: int, state: Tensor, relu: Tensor | None) -> Tensor:
        """Op ``name`` on node ``i``'s edge from state row ``j`` (``relu``: the state after the
        ReLU, for ops with weights)."""
        if name in POOLS:
            return self.shared[j][name](state)
        if name == "skip_connect" and self.stride(j) == 1:
            return state
        if name == "none":
            return _zero(state, self.stride(j))
        return self.edges[i][j][name](relu if relu is not None else torch.relu(state))

    def output(self, states: list[Tensor]) -> Tensor:
        return torch.cat(states[-self.multiplier :], dim=1)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Channel ``g · C/groups + c`` moves to ``c · groups + g`` (ShuffleNet's shuffle)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


@contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics as they were on entry, when the block exits (a cell's
    recomputation in backward must not move them a second time)."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
    ]
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in norms
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _recomputable(fn: Callable[..., Tensor], module: nn.Module) -> Callable[..., Tensor]:
    """``fn`` for ``checkpoint``: its first call is the forward; a later one is the
    recomputation in backward, which leaves ``module``'s BatchNorm running statistics as it
    found them (they were updated once, by the forward)."""
    calls = 0

    def run(*args: object) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(*args)
        with _running_stats_kept(module):
            return fn(*args)

    return run


def _has_weights(name: str, stride: int) -> bool:
    return name not in ("none", *POOLS) and not (name == "skip_connect" and stride == 1)


def _zero(state: Tensor, stride: int) -> Tensor:
    return state[:, :, ::stride, ::stride] * 0.0


class DartsCNNSearchNetwork(ArchitectureMixin, nn.Module):
    """The DARTS CNN supernet over ``input_size`` image channels, ``hidden_size`` = C (the first
    cells' channels), ``nodes`` cells of ``steps`` nodes each; a cell's output concatenates its
    last ``multiplier`` nodes (default: all), the stem has ``stem_multiplier · C`` channels.
    ``partial_channels``, ``edge_normalisation`` and ``recompute``: the memory-lean search (module
    docstring); ``edge_normalisation=None`` follows PC-DARTS: on exactly when ``K > 1``."""

    space = "darts_cnn"
    modality = "images"
    output = "concat"
    output_activation = "identity"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        nodes: int = 5,
        steps: int = 4,
        multiplier: int | None = None,
        stem_multiplier: int = 3,
        partial_channels: int = 1,
        edge_normalisation: bool | None = None,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        if partial_channels < 1:
            raise ValueError(
                f"partial_channels must be at least 1 (1: every channel through the mixed ops), "
                f"got {partial_channels}"
            )
        if not 1 <= steps <= 8:
            raise ValueError(f"steps must be in 1..8, got {steps}")
        multiplier = steps if multiplier is None else multiplier
        if not 1 <= multiplier <= steps:
            raise ValueError(f"multiplier ({multiplier}) must be in 1..steps ({steps})")
        if stem_multiplier < 1:
            raise ValueError(f"stem_multiplier must be at least 1, got {stem_multiplier}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.steps, self.multiplier, self.stem_multiplier = steps, multiplier, stem_multiplier
        self.partial_channels, self.recompute = partial_channels, recompute
        if edge_normalisation is None:
            edge_normalisation = partial_channels > 1
        self.op_names = CNN_OPS
        c_stem = stem_multiplier * hidden_size
        self.stem = nn.Sequential(
            nn.Conv2d(input_size, c_stem, 3, padding=1, bias=False), nn.BatchNorm2d(c_stem)
        )
        self.cells = nn.ModuleList()
        # γ of each grown (residual) cell, keyed by its 0-based position.
        self.cell_gammas = nn.ParameterDict()
        for shape in stack_shapes(nodes, c_stem, hidden_size, multiplier):
            self.cells.append(SearchCell(shape, steps, multiplier, partial_channels))
        self.features = self.cells[-1].out_channels
        self.arch = nn.ParameterList(
            [new_alpha(i + 2, len(CNN_OPS)) for _ in range(2) for i in range(steps)]
        )
        # Edge normalisation's β, one per node of ``arch`` (over its incoming edges); empty
        # without it, so that the state dict is the plain supernet's.
        self.betas = nn.ParameterList(
            [new_alpha(i + 2) for _ in range(2) for i in range(steps)] if edge_normalisation else []
        )
        self.fixed: dict[int, Node] = {}
        self.gammas = nn.ParameterDict()  # no residual nodes: this space grows by cells

    # --- shape -------------------------------------------------------------------------------

    @property
    def nodes(self) -> int:
        """Cells in the stack: the unit growth adds and ``space.nodes`` counts here."""
        return len(self.cells)

    def cell_alpha_index(self, cell: SearchCell) -> int:
        """The 0-based ``arch`` index of node 1 of ``cell``'s type."""
        return self.steps if cell.reduction else 0

    # --- architecture parameters -------------------------------------------------------------

    @property
    def edge_normalisation(self) -> bool:
        return len(self.betas) > 0

    def arch_parameters(self) -> list[nn.Parameter]:
        """The searched nodes' ``α``, then (with edge normalisation) their ``β``: both are
        stepped by the strategy on validation batches, saved and resumed with the space."""
        searched = super().arch_parameters()
        return searched + [b for i, b in enumerate(self.betas, start=1) if i not in self.fixed]

    def weight_parameters(self) -> list[nn.Parameter]:
        betas = {id(b) for b in self.betas}
        return [p for p in super().weight_parameters() if id(p) not in betas]

    def edge_weights(self, i: int) -> Tensor | None:
        """``softmax(β_i)`` over node ``i``'s incoming edges (1-based ``i``), or ``None``: no
        edge normalisation, or a fixed node (a derived node sums its two edges)."""
        if not self.edge_normalisation or i in self.fixed:
            return None
        return torch.softmax(self.betas[i - 1], dim=-1)

    # --- forward -----------------------------------------------------------------------------

    def forward(
        self, x: Tensor, h0: Tensor | None = None, weights: list[Tensor] | None = None
    ) -> tuple[Tensor, None]:
        """Pooled features ``(N, features)`` of images ``x`` ``(N, C, H, W)`` under mixing
        ``weights`` (default: the read-out of ``α``); ``h0`` is not used (no recurrence)."""
        weights = self.mixing_weights() if weights is None else weights
        sampled = weights.choices if isinstance(weights, SampledMixing) else None
        s0 = s1 = self.stem(x)
        for k, cell in enumerate(self.cells):
            if self.recompute and torch.is_grad_enabled():
                out = checkpoint(
                    _recomputable(self._cell_forward, cell),
                    cell,
                    s0,
                    s1,
                    weights,
                    sampled,
                    use_reentrant=False,
                )
            else:
                out = self._cell_forward(cell, s0, s1, weights, sampled)
            gamma = self.cell_gammas.get(str(k))
            if gamma is not None:
                out = s1 + gamma.view(1, -1, 1, 1) * out
            s0, s1 = s1, out
        return s1.mean(dim=(2, 3)), None

    def _cell_forward(
        self,
        cell: SearchCell,
        s0: Tensor,
        s1: Tensor,
        weights: list[Tensor],
        sampled: list[int | None] | None,
    ) -> Tensor:
        base = self.cell_alpha_index(cell)
        states = cell.inputs(s0, s1)
        parts = [cell.selected(s) for s in states]  # what the mixed ops read (all at K=1)
        relus: list[Tensor | None] = [None, None]
        shared: list[dict[str, Tensor]] = [{}, {}]
        n_ops = len(self.op_names)
        for i in range(self.steps):
            number = base + i + 1
            w = weights[base + i]
            b = self.edge_weights(number)
            if b is not None:  # edge normalisation: every entry of edge j scaled by β's b_j
                w = w * b[:, None]
            terms: list[Tensor] = []
            if number in self.fixed:
                entries = self._node_entries(self.fixed[number])
                constant = None
            elif sampled is not None and sampled[base + i] is not None:
                c = sampled[base + i]
                entries = [divmod(c, n_ops)]
                flat = w.reshape(-1)
                constant = flat.sum() - flat[c]  # exact zeros in value, α's gradient path
            else:
                entries = [
                    (j, k) for j in range(i + 2) for k in range(1, n_ops)
                ]  # none (k = 0) adds w · 0: nothing in value, nothing to α's gradient
                constant = None
            for j, k in entries:
                name = self.op_names[k]
                if name == "none":
                    terms.append(w[j, k] * _zero(parts[j], cell.stride(j)))
                    continue
                terms.append(w[j, k] * self._op_value(cell, i, j, name, parts, relus, shared))
            node = torch.stack(terms).sum(0) if len(terms) > 1 else terms[0]
            if constant is not None:
                node = node + constant
            if cell.partial > 1:
                node = cell.join(
                    node, self._bypass(cell, states, sorted({j for j, _ in entries}), b)
                )
            states.append(node)
            parts.append(cell.selected(node))
            relus.append(None)
            shared.append({})
        return cell.output(states)

    @staticmethod
    def _bypass(
        cell: SearchCell, states: list[Tensor], edges: list[int], b: Tensor | None
    ) -> Tensor:
        """The bypassed channels of a node's ``edges`` summed as the node sums its edges (by
        ``b_j`` under edge normalisation): the shuffle and the concatenation are linear, so
        ``Σ_j b_j join(m_j, r_j) = join(Σ_j b_j m_j, Σ_j b_j r_j)``."""
        rests = [cell.bypass(j, states[j]) for j in edges]
        if b is not None:
            rests = [b[j] * r for j, r in zip(edges, rests, strict=True)]
        return torch.stack(rests).sum(0) if len(rests) > 1 else rests[0]

    def _op_value(
        self,
        cell: SearchCell,
        i: int,
        j: int,
        name: str,
        states: list[Tensor],
        relus: list[Tensor | None],
        shared: list[dict[str, Tensor]],
    ) -> Tensor:
        """Op ``name`` of node ``i``'s edge from state row ``j``; a parameter-free op's value
        and a state's ReLU are computed once and reused by the other edges."""
        if name in POOLS:
            if name not in shared[j]:
                shared[j][name] = cell.op(name, i, j, states[j], None)
            return shared[j][name]
        if name == "skip_connect" and cell.stride(j) == 1:
            return states[j]
        if relus[j] is None:
            relus[j] = torch.relu(states[j])
        return cell.op(name, i, j, states[j], relus[j])

    def reference_forward(self, x: Tensor, weights: list[Tensor] | None = None) -> Tensor:
        """The specification of ``forward`` (dense mixing): every edge computes every op,
        ``none`` included, from its own state, and the node sums ``w · op(s)`` over edges and
        ops — DARTS's ``MixedOp`` loop; with partial channels and edge normalisation, PC-DARTS's
        (each edge's mixed op on its state's first ``C/K`` channels, the rest bypassing it,
        concatenated and shuffled; the node sums its edges by ``softmax(β)``; a fixed node, its
        two edges). Slow; for tests."""
        weights = self.mixing_weights() if weights is None else weights
        s0 = s1 = self.stem(x)
        for k, cell in enumerate(self.cells):
            base = self.cell_alpha_index(cell)
            states = cell.inputs(s0, s1)
            for i in range(self.steps):
                w, b = weights[base + i], self.edge_weights(base + i + 1)
                fixed = self.fixed.get(base + i + 1)
                node = 0.0
                for j in range(i + 2) if fixed is None else [j + 1 for j in fixed.inputs]:
                    edge = 0.0
                    for k_op, name in enumerate(self.op_names):
                        edge = edge + w[j, k_op] * cell.op(
                            name, i, j, cell.selected(states[j]), None
                        )
                    if cell.partial > 1:
                        edge = cell.join(edge, cell.bypass(j, states[j]))
                    node = node + (1.0 if b is None else b[j]) * edge
                states.append(node)
            out = cell.output(states)
            if str(k) in self.cell_gammas:
                out = s1 + self.cell_gammas[str(k)].view(1, -1, 1, 1) * out
            s0, s1 = s1, out
        return s1.mean(dim=(2, 3))

    # --- derivation --------------------------------------------------------------------------

    def _cell_of(self, i: int) -> int:
        """Node ``i``'s (1-based) index within its own cell."""
        return (i - 1) % self.steps + 1

    def node_options(self, i: int, p: Tensor) -> list[tuple[float, Node]]:
        """Node ``i``'s likeliest pairs of edges, best first: each edge (a state row of ``p``)
        with its strongest op other than ``none``, a pair scored by the product of its two
        weights (DARTS keeps the two strongest edges: the first option). Under edge
        normalisation an entry's weight is ``softmax(β)_j · p[j, k]`` (PC-DARTS's edge score)."""
        edges = self.edge_weights(i)
        p = p.detach() if edges is None else p.detach() * edges.detach()[:, None]
        best, ops = p[:, 1:].max(dim=1)
        rows = p.shape[0]
        pairs = [(float(best[a] * best[b]), a, b) for a in range(rows) for b in range(a + 1, rows)]
        pairs.sort(key=lambda t: -t[0])
        return [
            (score, Node((CNN_OPS[int(ops[a]) + 1], CNN_OPS[int(ops[b]) + 1]), (a - 1, b - 1)))
            for score, a, b in pairs[: NODE_OPTIONS + 1]
        ]

    def _entry(self, i: int, node: Node) -> tuple[list[int], list[int]]:
        rows = self.arch[i - 1].shape[0]
        if not isinstance(node.op, tuple) or len(node.inputs) != 2:
            raise ValueError(f"node {i} of a darts_cnn cell takes two inputs and two ops")
        if any(not -1 <= j < rows - 1 for j in node.inputs) or node.inputs[0] == node.inputs[1]:
            raise ValueError(
                f"node {self._cell_of(i)} of its cell reads two different states of "
                f"-1..{rows - 2}, got {list(node.inputs)}"
            )
        return [j + 1 for j in node.inputs], [self._op_column(op) for op in node.op]

    def _node_entries(self, node: Node) -> list[tuple[int, int]]:
        return [
            (j + 1, self.op_names.index(op)) for op, j in zip(node.op, node.inputs, strict=True)
        ]

    # --- resources ---------------------------------------------------------------------------

    def op_cost(self, op: str) -> tuple[int, int]:
        """Parameters and FLOPs per output pixel of ``op`` on an edge at C channels."""
        return op_cost(op, self.hidden_size)

    # --- growth ------------------------------------------------------------------------------

    def grow(self, alpha_init: str = "random") -> list[nn.Parameter]:
        """Append a normal cell as a residual whose scale ``γ`` starts at zero (the output is
        unchanged); return its parameters, which need fresh optimizer state. ``alpha_init`` is
        not used: the new cell shares the normal cell's ``α``."""
        last = self.cells[-1]
        c_pp = self.cells[-2].out_channels if len(self.cells) > 1 else self.stem[0].out_channels
        ref = self.arch[0]
        shape = CellShape(c_pp, last.out_channels, last.channels, False, last.reduction)
        cell = SearchCell(shape, self.steps, self.multiplier, self.partial_channels)
        cell = cell.to(device=ref.device, dtype=ref.dtype)
        cell.train(self.training)
        gamma = nn.Parameter(torch.zeros(cell.out_channels, device=ref.device, dtype=ref.dtype))
        self.cell_gammas[str(len(self.cells))] = gamma
        self.cells.append(cell)
        return [*cell.parameters(), gamma]

    @torch.no_grad()
    def fix(self, i: int, node: Node) -> None:
        """Fix searched node ``i`` to ``node`` (pruning, or rebuilding a pruned net on resume)."""
        self._entry(i, node)  # refuses a node this supernet cannot hold
        self.fixed[i] = node
        self.arch[i - 1].requires_grad_(False).grad = None
        if self.edge_normalisation:
            self.betas[i - 1].requires_grad_(False).grad = None

    @torch.no_grad()
    def widen(self, widening: Widening) -> None:
        """Widen C by ``widening`` (Net2WiderNet), function-preserving in train and eval mode.

        A tensor's channels are blocks of C units: the stem's ``stem_multiplier``, a cell's
        ``2^r`` after ``r`` reductions, its output ``multiplier · 2^r``. Every weight that
        produces channels copies the rows of their originals (block by block), every weight
        that reads them takes the original's column times its copy's share, and a depthwise
        conv copies its filters; BatchNorm copies its statistics (a copy has its original's
        batch statistics too, so train mode is preserved as well). A factorized reduction
        produces its two halves from two convs; in blocks of C they are whole blocks (it only
        follows a reduction, where ``2^r`` is even), so each conv widens its own blocks.
        With partial channels the mixed ops read a prefix of the channels that widening would
        not preserve: refused (``ValueError``).
        """
        if self.partial_channels > 1:
            raise ValueError("darts_cnn with partial_channels > 1 cannot widen C")
        stem_blocks = self.stem_multiplier
        _conv(self.stem[0], out=_layout(widening, stem_blocks))
        self.stem[1] = _batchnorm(self.stem[1], _layout(widening, stem_blocks)[0])
        prev_prev = prev = stem_blocks
        for k, cell in enumerate(self.cells):
            blocks = cell.channels // self.hidden_size
            inner = _layout(widening, blocks)
            _widen_cell(cell, widening, prev_prev, prev, inner)
            cell.channels = widening.new * blocks
            out_blocks = self.multiplier * blocks
            gamma = self.cell_gammas.get(str(k))
            if gamma is not None:
                index = _layout(widening, out_blocks)[0].to(gamma.device)
                self.cell_gammas[str(k)] = nn.Parameter(gamma.detach()[index].clone())
            prev_prev, prev = prev, out_blocks
        self.hidden_size = widening.new
        self.features = self.cells[-1].out_channels

    def widen_reader(self, weight: Tensor, widening: Widening) -> nn.Parameter:
        """The head's weight, which reads the last cell's ``multiplier · 2^r`` blocks, widened
        (``growth.widen_checked`` calls it after ``widen``, on a space that has it)."""
        blocks = self.cells[-1].channels // self.hidden_size
        index, share = _layout(widening, self.multiplier * blocks)
        return nn.Parameter(_read(weight.detach(), index, share, dim=1))


def _layout(widening: Widening, blocks: int) -> tuple[Tensor, Tensor]:
    """The index (into the old channels) and reader share of every new channel of a tensor of
    ``blocks`` blocks of C."""
    old = widening.old
    index = torch.cat([b * old + widening.index for b in range(blocks)])
    return index, widening.share.repeat(blocks)


def _read(w: Tensor, index: Tensor, share: Tensor, dim: int) -> Tensor:
    shape = [1] * w.dim()
    shape[dim] = -1
    return w.index_select(dim, index.to(w.device)) * share.to(w).view(shape)


def _conv(
    conv: nn.Conv2d,
    out: tuple[Tensor, Tensor] | None = None,
    reads: tuple[Tensor, Tensor] | None = None,
) -> None:
    """``conv`` producing the ``out`` layout's channels (copies) and reading the ``reads``
    layout's (shares); a depthwise conv (one input channel per group) only copies."""
    w = conv.weight.detach()
    if reads is not None and conv.groups == 1:
        w = _read(w, *reads, dim=1)
    if out is not None:
        w = w.index_select(0, out[0].to(w.device))
    conv.weight = nn.Parameter(w.clone())
    conv.out_channels = w.shape[0]
    if conv.groups > 1:  # depthwise: one filter per channel, as many groups
        conv.groups = conv.in_channels = w.shape[0]
    else:
        conv.in_channels = w.shape[1]


def _batchnorm(bn: nn.BatchNorm2d, index: Tensor) -> nn.BatchNorm2d:
    """A BatchNorm over the new channels, each with its original's statistics (and scale)."""
    wider = nn.BatchNorm2d(len(index), eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    wider = wider.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    wider.train(bn.training)
    index = index.to(bn.running_mean.device)
    wider.running_mean.copy_(bn.running_mean[index])
    wider.running_var.copy_(bn.running_var[index])
    wider.num_batches_tracked.copy_(bn.num_batches_tracked)
    if bn.affine:
        wider.weight.copy_(bn.weight[index])
        wider.bias.copy_(bn.bias[index])
    return wider


def _widen_sequence(seq: nn.Sequential, inner: tuple[Tensor, Tensor]) -> None:
    """An op or a pool (channels in = channels out, one layout): its convs and BatchNorms."""
    for position, layer in enumerate(seq):
        if isinstance(layer, nn.Conv2d):
            _conv(layer, out=inner, reads=inner)
        elif isinstance(layer, nn.BatchNorm2d):
            seq[position] = _batchnorm(layer, inner[0])


def _widen_preprocess(
    module: nn.Module, widening: Widening, reads: int, inner: tuple[Tensor, Tensor]
) -> None:
    """A cell's preprocessing of one input (``reads`` blocks) to the cell's layout."""
    source = _layout(widening, reads)
    if isinstance(module, FactorizedReduce):
        half = _layout(widening, len(inner[0]) // widening.new // 2)
        _conv(module.conv_1, out=half, reads=source)
        _conv(module.conv_2, out=half, reads=source)
        module.bn = _batchnorm(module.bn, inner[0])
        return
    _conv(module[1], out=inner, reads=source)  # ReLU → conv → BN  # type: ignore[index]
    module[2] = _batchnorm(module[2], inner[0])  # type: ignore[index]


def _widen_cell(
    cell: SearchCell, widening: Widening, prev_prev: int, prev: int, inner: tuple[Tensor, Tensor]
) -> None:
    _widen_preprocess(cell.preprocess0, widening, prev_prev, inner)
    _widen_preprocess(cell.preprocess1, widening, prev, inner)
    for node in cell.edges:
        for edge in node:
            for op in edge.values():
                if isinstance(op, FactorizedReduce):
                    _widen_preprocess(op, widening, len(inner[0]) // widening.new, inner)
                else:
                    _widen_sequence(op, inner)
    for pools in cell.shared:
        for pool in pools.values():
            _widen_sequence(pool, inner)


__all__ = ["DartsCNNSearchNetwork", "SearchCell"]
