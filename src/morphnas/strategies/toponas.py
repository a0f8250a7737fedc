"""TopoNAS (Huang et al., ICLR 2021 submission, withdrawn; spec/methods.md §9): topology
variables beside DARTS's op variables, learned jointly with them and the weights, and a
passive-aggressive regulariser against topologies no derived cell has.

The paper's body is not public; this is our reading of its abstract [INFERRED], after DOTS
(Gu et al., CVPR 2021), which computes the same combinatorial topology in code
(spec/anchors-2.md §1.5):

* **Rows and subsets.** A searched node's ``α`` has one row per candidate input: a predecessor
  (``darts_rnn``), an earlier state (``darts_cnn``), an ordered pair of distinct states
  (``two_input`` under ``wiring: search``, whose rows already score (input pair, op) entries:
  its input choice is reused, not duplicated). A derived node keeps ``k`` rows, and ``k`` is
  read off the space (the rows the entry of a derived node occupies, ``space._entry``): 1 in
  ``darts_rnn`` and ``two_input`` (one pair), 2 in ``darts_cnn``. A space whose ``α`` has no
  rows (``two_input`` under a fixed wiring) chooses no inputs: refused, with the fix.
* **Topology variables** ``β_j``: logits over every ``k``-subset ``S`` of node ``j``'s rows,
  held here (not in the model), ``q_j = softmax(β_j)``; initialised as ``α`` (``1e-3·N(0,1)``).
* **Edge weight**: the marginal ``w_jr = Σ_{S∋r} q_j(S)`` (so ``Σ_r w_jr = k``).
* **Mixing weights**: ``p_j[r, o] = w_jr · softmax(α_jr)_o``: the node mixes its edges by
  ``w`` times each edge's op mixture (DARTS's per-row softmax), decoupled from ``β``. On
  ``two_input`` that is the pair's probability times its op distribution, which the space turns
  into its slot and op mixtures (``input_marginals``): the slots' weights are DOTS's marginals.
* **Step**: first order, one Adam (DARTS's lr 3e-3, weight decay 1e-3) on ``α`` and ``β``
  together, on the validation batch; resource penalties and proximity as every strategy.
* **Read-out**: ``S*_j = argmax_S q_j(S)``, then on each kept row the strongest op of ``α``
  other than ``none``; the space's ``node_options`` turns that into its ``Node``. The space's
  ``read_out`` is set to the mixing above, so the logged weights, ``selection``'s alternatives
  and grow-then-prune's ``prune`` read what the supernet computes (they rank by the space's own
  rule on those weights, which may differ from ``derive``'s topology-first rule).
* **Regulariser** (``topo_reg``; the paper names it only), averaged over the searched nodes,
  times ``topo_weight``, added to the architecture loss:

  - ``pa`` (default), passive-aggressive: ``max(0, leak_j − topo_margin)``, ``leak_j =
    (1/k) Σ_{r ∉ S*_j} w_jr``, the share of the node's edge mass on edges its derived cell
    drops. Passive (zero, no gradient) once the read-out subset holds ``1 − topo_margin`` of
    the mass; aggressive otherwise: a push of constant size from the edges the read-out cannot
    keep to those it keeps.
  - ``entropy``: the entropy of ``q_j`` over ``log |subsets|``: always on, pushes each node to
    *some* single subset.
  - ``none``.

Only first order: ``β`` is not a tensor of the model, so ``Objective.functional`` (the bilevel
hypergradients) cannot replace it. Not in the paper either way: DOTS's temperature on ``β``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from morphnas.errors import UserError
from morphnas.genotype import Genotype, Node
from morphnas.optim import rebuild_optimizer
from morphnas.spaces.base import SearchSpace
from morphnas.strategies.base import BatchLoss, Objective, Strategy, none_mask

REGULARISERS = ("pa", "entropy", "none")


def subsets(rows: int, k: int) -> tuple[tuple[int, ...], ...]:
    """The ``k``-subsets of ``rows`` rows, in the order of ``β``'s entries."""
    return tuple(itertools.combinations(range(rows), k))


def membership(chosen: Sequence[tuple[int, ...]], rows: int, like: Tensor) -> Tensor:
    """``(subsets, rows)``: 1 where the subset holds the row (``q @ M`` is the marginal)."""
    members = torch.zeros(len(chosen), rows, dtype=like.dtype, device=like.device)
    for s, subset in enumerate(chosen):
        members[s, list(subset)] = 1.0
    return members


def edge_marginals(beta: Tensor, members: Tensor) -> Tensor:
    """``w_r = Σ_{S∋r} softmax(β)_S``: the probability that the node keeps row ``r``."""
    return torch.softmax(beta, 0) @ members


def topology_mixing(alpha: Tensor, beta: Tensor, members: Tensor) -> Tensor:
    """``p[r, o] = w_r · softmax(α_r)_o``: each edge's op mixture scaled by its marginal."""
    return edge_marginals(beta, members)[:, None] * torch.softmax(alpha, -1)


def leak(beta: Tensor, members: Tensor) -> Tensor:
    """The share of the edge mass on rows outside the likeliest subset (0: a valid topology)."""
    k = members[0].sum()
    kept = members[beta.detach().argmax()]  # a tensor index: no host synchronisation
    return (k - (edge_marginals(beta, members) * kept).sum()) / k


def topology_penalty(kind: str, beta: Tensor, members: Tensor, margin: float) -> Tensor:
    """One node's regulariser (see the module doc): ``pa`` or ``entropy``."""
    if kind == "pa":
        return torch.relu(leak(beta, members) - margin)
    if len(beta) < 2:  # one subset: nothing to decide
        return beta.new_zeros(())
    log_q = torch.log_softmax(beta, 0)
    return -(log_q.exp() * log_q).sum() / math.log(len(beta))


def kept_rows(space: SearchSpace, i: int) -> int:
    """How many rows of node ``i``'s ``α`` a derived node occupies (the ``k`` of its subsets),
    asked of the space: the rows its entry for the node it derives to sets; a ``UserError``
    when the ``α`` has no rows, i.e. the node's inputs are fixed."""
    alpha = space.arch[i - 1].detach()
    if alpha.dim() < 2:
        wiring = getattr(space, "wiring", None)
        raise UserError(
            f"toponas learns which inputs each node reads, and this {space.space} supernet "  # type: ignore[attr-defined]
            f"has fixed inputs (wiring {wiring!r}): add --set space.options.wiring=search"
        )
    node = space.node_options(i, torch.full_like(alpha, 1.0 / alpha.numel()))[0][1]
    hot = torch.zeros(alpha.shape, dtype=torch.bool)
    hot[space._entry(i, node)] = True  # type: ignore[attr-defined]
    return int(hot.any(-1).sum())


class TopoNas(Strategy):
    """TopoNAS: topology variables over input subsets, DARTS's op variables, a PA regulariser."""

    name = "toponas"
    # Space options under which a space offers input choice (the bench builds spaces with them).
    space_options: ClassVar[dict[str, dict[str, Any]]] = {"two_input": {"wiring": "search"}}

    def __init__(
        self,
        space: SearchSpace,
        *,
        topo_reg: str = "pa",
        topo_weight: float = 0.1,
        topo_margin: float = 0.1,
        **common: Any,
    ) -> None:
        super().__init__(space, **common)
        if topo_reg not in REGULARISERS:
            raise ValueError(f"topo_reg must be one of {REGULARISERS}, got {topo_reg!r}")
        if not topo_weight >= 0:
            raise ValueError(f"topo_weight must be >= 0, got {topo_weight!r}")
        if not 0 <= topo_margin < 1:
            raise ValueError(f"topo_margin must be in [0, 1), got {topo_margin!r}")
        self.topo_reg, self.topo_weight, self.topo_margin = topo_reg, topo_weight, topo_margin
        self.beta: list[nn.Parameter] = []  # β_j per node of ``space.arch`` (fixed ones too)
        self.subsets: list[tuple[tuple[int, ...], ...]] = []
        self.members: list[Tensor] = []
        self._sync()
        self.optimizer = rebuild_optimizer(self.optimizer, self.searched_parameters())
        space.read_out = self.transform  # logs, selection and prune read the same mixing

    # ------------------------------------------------------------------ β beside α

    def _sync(self) -> None:
        """New ``β`` for nodes the space grew; ``β`` follows ``α``'s device and dtype (the
        model moves after the strategy is built)."""
        for i in range(len(self.beta) + 1, len(self.space.arch) + 1):
            alpha, k = self.space.arch[i - 1], kept_rows(self.space, i)
            chosen = subsets(alpha.shape[0], k)
            self.subsets.append(chosen)
            self.members.append(membership(chosen, alpha.shape[0], alpha))
            self.beta.append(nn.Parameter(1e-3 * torch.randn(len(chosen)).to(alpha)))
        like = self.space.arch[0]
        if (self.beta[0].device, self.beta[0].dtype) != (like.device, like.dtype):
            for b in self.beta:
                b.data = b.data.to(like)
            self.members = [m.to(like) for m in self.members]

    def searched_parameters(self) -> list[nn.Parameter]:
        """What the architecture step moves: the searched nodes' ``α``, then their ``β``."""
        searched = [self.beta[i - 1] for i in self.space.mixed_nodes]  # type: ignore[attr-defined]
        return [*self.space.arch_parameters(), *searched]

    def node_of(self, alpha: Tensor) -> int:
        """The 0-based node whose ``α`` this is (or a detached view of)."""
        for j, own in enumerate(self.space.arch):
            if own is alpha or (own.data_ptr() == alpha.data_ptr() and own.shape == alpha.shape):
                return j
        raise ValueError("toponas reads out only its own space's α")

    # ------------------------------------------------------------------ mixing and step

    def transform(self, alpha: Tensor) -> Tensor:
        """Node ``j``'s ``α`` → ``topology_mixing`` with its ``β_j`` (also the space's
        ``read_out``)."""
        j = self.node_of(alpha)
        if j >= len(self.beta):  # the space grew since (growth reads it before the hook)
            self._sync()
        return topology_mixing(alpha, self.beta[j], self.members[j])

    def mixing_weights(self) -> list[Tensor]:
        self._sync()
        return self.space.mixing_weights(self.transform)

    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> Tensor:
        value = objective(valid_batch, self.mixing_weights())
        params = self.searched_parameters()
        grads = torch.autograd.grad(self._with_regulariser(value), params, allow_unused=True)
        self._apply(
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        )
        return value.detach()

    def regulariser(self) -> Tensor | None:
        total = super().regulariser()
        nodes = self.space.mixed_nodes  # type: ignore[attr-defined]
        if self.topo_reg == "none" or self.topo_weight == 0 or not nodes:
            return total
        terms = [
            topology_penalty(self.topo_reg, self.beta[i - 1], self.members[i - 1], self.topo_margin)
            for i in nodes
        ]
        term = self.topo_weight * torch.stack(terms).mean()
        return term if total is None else total + term

    # ------------------------------------------------------------------ read-out

    @torch.no_grad()
    def derived_node(self, i: int) -> Node:
        """Node ``i``'s read-out: the likeliest subset, the strongest op of each kept row."""
        alpha = self.space.arch[i - 1].detach()
        scores = alpha.masked_fill(none_mask(self.space, alpha), -math.inf)
        hot = torch.zeros_like(alpha)
        for r in self.subsets[i - 1][int(self.beta[i - 1].argmax())]:
            hot[r, int(scores[r].argmax())] = 1.0
        return self.space.node_options(i, hot)[0][1]

    def derive(self) -> Genotype:
        self._sync()
        space = self.space
        nodes = [
            space.fixed[i] if i in space.fixed else self.derived_node(i)
            for i in range(1, len(space.arch) + 1)
        ]
        return Genotype(
            space=space.space,  # type: ignore[attr-defined]
            nodes=tuple(nodes),
            output=space.output,  # type: ignore[attr-defined]
            output_activation=space.output_activation,  # type: ignore[attr-defined]
            cell_state=getattr(space, "cell_state", None),
        )

    @torch.no_grad()
    def epoch_metrics(self) -> dict[str, float]:
        """The mean probability of the read-out subset and the mean ``leak`` over the nodes."""
        nodes = self.space.mixed_nodes  # type: ignore[attr-defined]
        if not nodes:
            return {}
        top = [float(torch.softmax(self.beta[i - 1], 0).max()) for i in nodes]
        leaks = [float(leak(self.beta[i - 1], self.members[i - 1])) for i in nodes]
        return {"toponas_top": sum(top) / len(top), "toponas_leak": sum(leaks) / len(leaks)}

    # ------------------------------------------------------------------ hooks and state

    def on_space_change(self) -> None:
        """New nodes get their ``β``; new parameters fresh Adam state, survivors keep theirs."""
        self._sync()
        self.optimizer = rebuild_optimizer(self.optimizer, self.searched_parameters())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "beta": [b.detach().clone() for b in self.beta]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sync()
        if "beta" in state:
            saved = state["beta"]
            if [tuple(s.shape) for s in saved] != [tuple(b.shape) for b in self.beta]:
                raise ValueError("toponas: the saved topology variables do not fit this supernet")
            with torch.no_grad():
                for b, s in zip(self.beta, saved, strict=True):
                    b.copy_(s)
        super().load_state_dict(state)
