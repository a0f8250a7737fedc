"""What every search space offers a strategy (``SearchSpace``) and growth (``GrowableSpace``), and
the small pieces the recurrent supernets share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from morphnas.genotype import Genotype, Node
from morphnas.kernels.fused_ops import kernels_allowed, supports_batchnorm

Transform = Callable[[Tensor], Tensor]


@runtime_checkable
class SearchSpace(Protocol):
    """A supernet seen through architecture parameters, mixing weights and derivation.

    A strategy never looks inside a space: it reads ``arch_parameters()``, turns them into mixing
    weights (one tensor per node, the last axis over the space's ``op_names``), and passes those to
    ``forward``. ``derive()`` discretises the current architecture parameters: each searched node
    ``i`` becomes the first of ``node_options(i, p)``, its discrete choices under mixing weights
    ``p`` with their scores (likelihoods: probabilities or gates), best first; the rest are the
    alternatives a selection of the derived cell tries (``morphnas.selection``). ``read_out`` is the
    map from ``α`` to the probabilities that ``derive``, ``prune`` and the logs read (a softmax per
    row unless the strategy sets another, e.g. one categorical over a whole node). ``op_cost``
    gives the parameters and FLOPs (per sample and time step) one op adds to a derived node, for
    resource penalties. A ``SampledMixing`` passed as ``weights`` runs only the sampled op of every
    node (GDAS, random search).
    """

    op_names: tuple[str, ...]
    read_out: Callable[[Tensor], Tensor]
    arch: nn.ParameterList  # every node's α, searched or fixed (mixing weights follow this order)
    fixed: dict[int, Node]  # nodes no longer searched (1-based), see ArchitectureMixin

    def arch_parameters(self) -> list[nn.Parameter]: ...

    def weight_parameters(self) -> list[nn.Parameter]: ...

    def mixing_weights(self, transform: Transform | None = ...) -> list[Tensor]: ...

    def forward(
        self, x: Tensor, h0: Tensor | None = None, weights: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]: ...

    def derive(self) -> Genotype: ...

    def node_options(self, i: int, p: Tensor) -> list[tuple[float, Node]]: ...

    def op_cost(self, op: str) -> tuple[int, int]: ...


@runtime_checkable
class GrowableSpace(SearchSpace, Protocol):
    """A search space whose backbone transforms during search: what ``morphnas.growth`` (the
    growth modes and their checks) and ``engine.resume`` (rebuilding a grown, pruned supernet
    from a checkpoint) call on it, so that a new space states the capability by these members
    instead of being found out by an ``AttributeError`` mid-search.

    ``grow`` appends one residual node with ``γ = 0`` (function-preserving) and returns the new
    parameters, which need fresh optimizer state; ``widen`` widens the hidden state in place by a
    ``Widening`` (function-preserving; every widened weight is a new parameter); ``prune`` fixes
    every searched node to its best choice and returns their 1-based indices; ``fix`` fixes one
    node to a given ``Node`` (pruning, or a resume replaying ``fixed``). ``nodes`` and
    ``hidden_size`` are the current shape, ``mixed_nodes`` the nodes still searched. The
    implementers are ``nn.Module``s: growth runs them on a probe batch in eval mode.
    """

    hidden_size: int

    @property
    def nodes(self) -> int: ...

    @property
    def mixed_nodes(self) -> list[int]: ...

    def grow(self, alpha_init: str = ...) -> list[nn.Parameter]: ...

    def prune(self) -> list[int]: ...

    def widen(self, widening: Widening) -> None: ...

    def fix(self, i: int, node: Node) -> None: ...


def softmax_last(alpha: Tensor) -> Tensor:
    return torch.softmax(alpha, dim=-1)


class ArchitectureMixin:
    """Architecture parameters live in ``self.arch`` (an ``nn.ParameterList``, one entry per node).

    Keeping them in their own container puts them in ``state_dict`` under ``arch.*`` and lets the
    weights be separated from them by identity, never by matching names. A node that has been
    *fixed* (pruned to one op during grow-and-prune search) keeps its entry, frozen, but is no
    longer searched: it leaves ``arch_parameters()`` and its mixing weight is one-hot.
    """

    arch: nn.ParameterList
    fixed: dict[int, Node]  # 1-based node index -> the op (and inputs) it was fixed to
    op_names: tuple[str, ...]
    gammas: nn.ParameterDict  # grown (residual) nodes' scales, keyed by their 1-based index
    # The node carried to the next step as c (state -2), as an LSTM's memory cell; two_input's
    # ``cell_state`` option, None in every other space.
    cell_state: int | None = None
    # What the space's networks read: sequences ``(T, B, features)`` (the recurrent cells), or
    # images ``(N, C, H, W)``; config matches it against the task kind's ``modality``.
    modality: str = "sequences"

    def arch_parameters(self) -> list[nn.Parameter]:
        return [alpha for i, alpha in enumerate(self.arch, start=1) if i not in self.fixed]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch_ids = {id(p) for p in self.arch}
        return [p for p in self.parameters() if id(p) not in arch_ids]  # type: ignore[attr-defined]

    # How derive/prune/logs read α (a strategy may replace it on its space; see SearchSpace).
    read_out: Transform = staticmethod(softmax_last)

    def mixing_weights(self, transform: Transform | None = None) -> list[Tensor]:
        """One tensor per node: ``transform(α)`` (default ``read_out``; DARTS: a softmax over the
        ops of every node or edge row) for searched nodes, the one-hot of the chosen op for fixed
        nodes."""
        transform = transform or self.read_out
        return [
            self._one_hot(i) if i in self.fixed else transform(alpha)
            for i, alpha in enumerate(self.arch, start=1)
        ]

    def _entry(self, i: int, node: Node) -> tuple[int, ...]:
        """The index of node ``i``'s ``α`` that stands for the discrete ``node``: what a fixed
        node's one-hot sets and a warm start (``prefer``) raises. ``ValueError`` when ``node``
        is not one of node ``i``'s choices in this supernet."""
        raise NotImplementedError

    def _op_column(self, op: str) -> int:
        """The last axis of ``α`` is the op; ``ValueError`` for an op the supernet lacks (its
        ``ops``/``primitives`` option may leave some out)."""
        if op not in self.op_names:
            raise ValueError(f"op {op!r} is not among the supernet's ops {list(self.op_names)}")
        return self.op_names.index(op)

    def _one_hot(self, i: int) -> Tensor:
        hot = torch.zeros_like(self.arch[i - 1])
        hot[self._entry(i, self.fixed[i])] = 1.0
        return hot

    @torch.no_grad()
    def prefer(self, genotype: Genotype, logit: float) -> None:
        """Warm start (``search.start_from``): add ``logit`` to the ``α`` entry of each of
        ``genotype``'s nodes, so that ``derive`` gives ``genotype`` from the first step.

        A prior, not a constraint: every other entry keeps its value, so its read-out mass stays
        positive and its gradient flows, and the search leaves the known cell wherever
        validation pulls harder than ``logit``. Nodes past the genotype's stay as they are.
        ``genotype`` must be a cell of this space with the supernet's cell state and at most
        ``len(self.arch)`` nodes (``morphnas.warmstart`` checks those against the config); what
        only the supernet knows is checked here, every node before any ``α`` moves.
        """
        rule = (genotype.output, genotype.output_activation)
        own = (self.output, self.output_activation)  # type: ignore[attr-defined]
        if rule != own:
            raise ValueError(
                "its output rule (output={}, output_activation={}) is not the supernet's "
                "(output={}, output_activation={})".format(*rule, *own)
            )
        if genotype.cell_state != self.cell_state:
            raise ValueError(
                f"it carries {_carried(genotype.cell_state)} and the supernet carries "
                f"{_carried(self.cell_state)} (space.options.cell_state)"
            )
        entries = []
        for i, node in enumerate(genotype.nodes, start=1):
            grown = str(i) in self.gammas
            if node.residual != grown:
                raise ValueError(
                    f"node {i} is {'' if node.residual else 'not '}residual (a grown node) and "
                    f"the supernet's node {i} is {'' if grown else 'not '}residual"
                )
            entries.append(self._entry(i, node))
        for alpha, entry in zip(self.arch, entries, strict=False):  # extra nodes: untouched
            alpha[entry] += logit

    def _choose(self, i: int, p: Tensor) -> Node:
        """The discrete node a searched node ``i`` derives to from its mixing weights ``p`` (a
        space that ranks its choices overrides ``node_options`` instead)."""
        raise NotImplementedError

    def node_options(self, i: int, p: Tensor) -> list[tuple[float, Node]]:
        """The discrete choices for searched node ``i`` under mixing weights ``p``, with scores,
        best first. This default knows only ``_choose``'s one choice (score 1), so a space that
        does not rank its options still derives; it then offers no alternatives."""
        return [(1.0, self._choose(i, p))]

    @torch.no_grad()
    def derive(self) -> Genotype:
        """The discrete cell: fixed nodes as they were fixed, searched nodes their best option."""
        nodes = [
            self.fixed[i] if i in self.fixed else self.node_options(i, p)[0][1]
            for i, p in enumerate(self.mixing_weights(), start=1)
        ]
        return Genotype(
            space=self.space,  # type: ignore[attr-defined]
            nodes=tuple(nodes),
            output=self.output,  # type: ignore[attr-defined]
            output_activation=self.output_activation,  # type: ignore[attr-defined]
            cell_state=self.cell_state,
        )

    @torch.no_grad()
    def prune(self) -> list[int]:
        """Fix every searched node to its best option, weights kept (``fix``); return their
        1-based indices. ``α`` of a fixed node is frozen and no longer searched."""
        pruned = []
        for i, p in enumerate(self.mixing_weights(), start=1):
            if i not in self.fixed:
                self.fix(i, self.node_options(i, p)[0][1])
                pruned.append(i)
        return pruned

    def fix(self, i: int, node: Node) -> None:
        """Fix searched node ``i`` to ``node`` (pruning, or a resume replaying ``fixed``)."""
        raise NotImplementedError

    @property
    def mixed_nodes(self) -> list[int]:
        """1-based indices of the nodes still being searched."""
        return [i for i in range(1, len(self.arch) + 1) if i not in self.fixed]


def _carried(cell_state: int | None) -> str:
    return "no cell state" if cell_state is None else f"node {cell_state} as its cell state"


def joint_softmax(alpha: Tensor) -> Tensor:
    """One categorical over *all* entries of a node's ``α``, shaped like ``α``.

    For ``darts_rnn`` that is a distribution over every (predecessor, op) pair: the one edge a
    node keeps, which is what a sampling strategy draws."""
    return torch.softmax(alpha.reshape(-1), dim=0).reshape(alpha.shape)


class SampledMixing(list):
    """Mixing weights of one hard sample: a space that receives it runs only the sampled op.

    The list holds, per node, a tensor shaped like that node's ``α`` whose value is one-hot
    (a straight-through sample: value 1 at the choice, gradient to ``α`` through all entries);
    ``choices[i]`` is the flat index of node ``i+1``'s hot entry (``None`` for fixed nodes, which
    run their own op anyway). The node computes ``w[c] · op_c(inputs) + Σ_{k≠c} w[k]``: the value
    of the chosen op alone, while every ``w[k]`` still gets a gradient (GDAS's trick of adding the
    unsampled weights as constants, D-X-Y/AutoDL-Projects#36). Choices are host integers, read
    once per sample, so the time loop has no host synchronisation.
    """

    def __init__(self, weights: Iterable[Tensor], choices: Iterable[int | None]) -> None:
        super().__init__(weights)
        self.choices: list[int | None] = list(choices)
        if len(self.choices) != len(self):
            raise ValueError("SampledMixing needs one choice per node")

    def detach(self) -> SampledMixing:
        """The same sample as constants (the weight step must not move ``α``)."""
        return SampledMixing([w.detach() for w in self], self.choices)


def sampled_scales(weights: SampledMixing) -> list[tuple[Tensor, Tensor] | None]:
    """Per node, ``(w[c], Σ_{k≠c} w[k])`` of a ``SampledMixing`` (hoisted out of the time loop).

    The rest is a sum of exact zeros in value, so the node's value is the chosen op's alone.
    """
    scales: list[tuple[Tensor, Tensor] | None] = []
    for w, c in zip(weights, weights.choices, strict=True):
        if c is None:
            scales.append(None)
            continue
        flat = w.reshape(-1)
        keep = torch.ones_like(flat)
        keep[c] = 0.0
        scales.append((flat[c], (flat * keep).sum()))
    return scales


def kernel_applies(
    fused: bool,
    bn: nn.BatchNorm1d | None,
    batch: int,
    mixing: object,
    takes_sampled: bool = False,
) -> bool:
    """Whether a space's sequence kernel runs this forward.

    Not when the user chose the eager path (``fused=False``), not for a sampled mixing unless
    the space's kernel takes it (``takes_sampled``; otherwise one op per node runs eagerly), not
    where the graph will be differentiated twice (``kernels_allowed``: the exact Hessian products
    of ``hypergrad``; a kernel's backward is hand-written and once-only), and not for BatchNorm
    settings the kernels do not reproduce.
    """
    return (
        fused
        and (takes_sampled or not isinstance(mixing, SampledMixing))
        and kernels_allowed()
        and supports_batchnorm(bn, batch)
    )


def new_alpha(*shape: int) -> nn.Parameter:
    """Architecture parameters start near uniform, as in DARTS: ``1e-3 * N(0, 1)``."""
    return nn.Parameter(1e-3 * torch.randn(*shape))


def parameter_like(ref: Tensor, values: Tensor) -> nn.Parameter:
    """A new parameter holding ``values`` on ``ref``'s device and dtype (for grown nodes)."""
    return nn.Parameter(values.detach().to(device=ref.device, dtype=ref.dtype))


@dataclass(frozen=True)
class Widening:
    """A function-preserving widening of the hidden state (Net2WiderNet, Chen et al. 2016).

    New unit ``j`` copies old unit ``index[j]`` (the first ``old`` units map to themselves).
    Every weight that *produces* hidden units copies their columns; every weight that *reads*
    them takes unit ``index[j]``'s row times ``share[j]``, where the shares of one old unit's
    copies sum to 1. Copies then carry equal values, their readers add up to the old reader, and
    the network computes the same function. Unequal shares (Net2Net's noise, here centred so each
    group still sums to 1) break the symmetry that would otherwise keep the copies identical.
    """

    old: int
    index: Tensor  # (new,) the old unit each new unit copies
    share: Tensor  # (new,) float64: the reader weight of each new unit

    @classmethod
    def random(
        cls, old: int, extra: int, noise: float = 0.0, generator: torch.Generator | None = None
    ) -> Widening:
        index = torch.cat([torch.arange(old), torch.randint(old, (extra,), generator=generator)])
        counts = torch.bincount(index, minlength=old).double()
        jitter = noise * (torch.rand(old + extra, generator=generator, dtype=torch.float64) - 0.5)
        group_mean = torch.zeros(old, dtype=torch.float64).index_add_(0, index, jitter) / counts
        share = 1.0 / counts[index] + jitter - group_mean[index]
        return cls(old, index, share)

    @property
    def new(self) -> int:
        return len(self.index)

    def producer(self, w: Tensor, blocks: int = 1, dim: int = -1) -> nn.Parameter:
        """``w`` with each of its ``blocks`` unit blocks along ``dim`` widened by copying."""
        idx = torch.cat([b * self.old + self.index for b in range(blocks)]).to(w.device)
        return nn.Parameter(w.detach().index_select(dim, idx).clone())

    def reader(self, w: Tensor, start: int = 0, dim: int = 0) -> nn.Parameter:
        """``w`` with its unit block ``start .. start+old`` along ``dim`` widened by sharing."""
        rest = w.shape[dim] - start - self.old
        before, units, after = w.detach().split([start, self.old, rest], dim)
        shape = [1] * w.dim()
        shape[dim] = -1
        widened = units.index_select(dim, self.index.to(w.device)) * self.share.to(w).view(shape)
        return nn.Parameter(torch.cat([before, widened, after], dim))

    def batchnorm(self, bn: nn.BatchNorm1d) -> nn.BatchNorm1d:
        """A BatchNorm over the new units whose running statistics copy the old ones."""
        wider = nn.BatchNorm1d(self.new, affine=False, momentum=bn.momentum, eps=bn.eps)
        wider = wider.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        wider.train(bn.training)
        with torch.no_grad():
            idx = self.index.to(bn.running_mean.device)
            wider.running_mean.copy_(bn.running_mean[idx])
            wider.running_var.copy_(bn.running_var[idx])
            wider.num_batches_tracked.copy_(bn.num_batches_tracked)
        return wider
