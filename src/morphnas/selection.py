"""Candidate cells from the supernet's architecture distribution, the most likely first.

``derive`` keeps each node's strongest option and trusts ``α`` blindly; near a tie, or when the
argmax is a degenerate cell (``morphnas.degenerate``), the next most likely cells are worth a look.
Every searched node offers its discrete choices with scores (``SearchSpace.node_options``, best
first); a genotype is one choice per node, and its likelihood the product of its choices' scores,
as if the nodes were independent. ``ranked_genotypes`` lists genotypes by that likelihood: the
argmax first, then the argmax with the node of the smallest margin (best-to-second score ratio)
changed, and so on, with changes of two nodes where they are the likelier — an exact k-best
enumeration of a product of sorted lists (a heap over choice indices), lazy, so a caller stops
when it has what it needs.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Iterator

import torch

from morphnas.genotype import Genotype, Node
from morphnas.spaces.base import SearchSpace

# Ranked genotypes examined at most when looking for non-degenerate ones (each check is a few
# small float64 forwards; a collapsed search can make many of the likeliest cells degenerate).
SCAN_LIMIT = 64


def _log(score: float) -> float:
    return math.log(score) if score > 0 else -math.inf


@torch.no_grad()
def ranked_genotypes(
    space: SearchSpace, derived: Genotype
) -> Iterator[tuple[float | None, Genotype]]:
    """``(log-likelihood, genotype)``, most likely first, each genotype once, ``derived`` (the
    strategy's cell) first; fixed nodes stay as they were fixed. Genotypes share ``derived``'s
    output rule and metadata. A ``derived`` that is not the space's argmax (a strategy with a
    read-out of its own) comes first with likelihood ``None``."""
    options: list[list[tuple[float, Node]]] = [
        [(0.0, space.fixed[i])]
        if i in space.fixed
        else [(_log(score), node) for score, node in space.node_options(i, p)]
        for i, p in enumerate(space.mixing_weights(), start=1)
    ]
    seen_nodes: set[tuple[Node, ...]] = set()
    first = tuple(choices[0][1] for choices in options)
    if first != derived.nodes:
        seen_nodes.add(derived.nodes)
        yield None, derived
    start = (0,) * len(options)
    heap = [(-sum(choices[0][0] for choices in options), start)]
    queued = {start}
    while heap:
        negative, index = heapq.heappop(heap)
        nodes = tuple(options[n][k][1] for n, k in enumerate(index))
        if nodes not in seen_nodes:  # a space may offer one node twice; the likelier counts
            seen_nodes.add(nodes)
            yield -negative, dataclasses.replace(derived, nodes=nodes)
        for n, k in enumerate(index):
            if k + 1 < len(options[n]):
                after = (*index[:n], k + 1, *index[n + 1 :])
                if after not in queued:
                    queued.add(after)
                    score = sum(options[m][j][0] for m, j in enumerate(after))  # no inf - inf
                    heapq.heappush(heap, (-score, after))
