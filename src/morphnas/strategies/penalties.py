"""Penalties any strategy can add to its architecture loss.

* **Resource cost** (``params``, ``flops``, ``latency``): the *expected* cost of the derived
  cell under the strategy's current architecture distribution, ``Σ_i Σ_e q_ie · c_ie``, where
  ``q_i`` is how much each entry of node ``i``'s ``α`` counts (a probability for softmax and
  Gumbel methods, a gate for DNAL) and ``c_ie`` the cost of that entry's op. It is divided by the
  cost of the most expensive cell, so ``penalty_weight`` is dimensionless and one value works at
  any hidden size (spec/methods.md §8 e: normalise the latency term). Parameters and FLOPs come
  analytically from the space (``op_cost``); latency is *measured* on this machine.
* **Proximity** (DARTS-PRIME, methods.md §10): ``‖p − D(p)‖₂`` between the read-out
  probabilities and the one-hot discrete architecture derived from them (plain, not squared).

Latency follows LA-DNAS (methods.md §8) on a small scale: time a few random discrete cells of
the space (each node one op, run through the space's sampled-op path, the batch and hidden size
of the run), fit ``latency ≈ b + Σ_op n_op · c_op`` by least squares, and use the per-op slopes
``c_op`` (clamped at 0) as the cost table. A linear predictor over op counts is differentiable in
the architecture encoding (expected counts are the probabilities), needs a dozen timings instead
of LA-DNAS's 100k, and cannot extrapolate wildly; on 2 CPU cores the whole fit takes about a
second. The table is measured once per hidden size. ``latency_mlp`` is LA-DNAS's learned
predictor proper, an MLP over the whole cell's encoding (``latency_model``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from morphnas.spaces.base import SampledMixing

PENALTIES = ("none", "params", "flops", "latency", "latency_mlp")
TABLE_PENALTIES = ("params", "flops", "latency")  # priced per op by ``CostPenalty``


class CostPenalty:
    """Expected resource cost of a space's searched nodes, normalised to [0, 1]."""

    def __init__(
        self, space: Any, kind: str, batch_size: int = 64, samples: int = 12, repeats: int = 3
    ) -> None:
        if kind not in TABLE_PENALTIES:
            raise ValueError(f"penalty must be one of {TABLE_PENALTIES}, got {kind!r}")
        self.space, self.kind = space, kind
        self.batch_size, self.samples, self.repeats = batch_size, samples, repeats
        self._latency: dict[int, list[float]] = {}  # hidden size -> per-op seconds

    def state_dict(self) -> dict[str, Any]:
        return {"latency": {str(d): costs for d, costs in self._latency.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._latency = {int(d): list(costs) for d, costs in state["latency"].items()}

    def op_costs(self) -> list[float]:
        """Cost of each op of ``space.op_names`` at the space's current hidden size."""
        if self.kind == "latency":
            d = self.space.hidden_size
            if d not in self._latency:
                self._latency[d] = measure_op_latency(
                    self.space, self.batch_size, self.samples, self.repeats
                )
            return self._latency[d]
        column = 0 if self.kind == "params" else 1
        return [float(self.space.op_cost(op)[column]) for op in self.space.op_names]

    def expected(self, weights: Sequence[Tensor], alphas: Sequence[Tensor]) -> Tensor:
        """``Σ_i ⟨weights_i, c_i⟩ / Σ_i max c_i``, differentiable in ``weights``.

        ``weights[i]`` is shaped like ``alphas[i]`` (its last axis over the ops).
        """
        if not alphas:
            return torch.zeros(())
        costs = torch.tensor(self.op_costs(), dtype=alphas[0].dtype, device=alphas[0].device)
        top = float(costs.max())
        if top <= 0:
            return alphas[0].new_zeros(())
        total = sum((w * costs).sum() for w in weights)
        return total / (top * len(alphas))


def build_penalty(space: Any, kind: str, **latency: Any) -> Any:
    """The resource penalty ``kind`` on ``space`` (None for ``none``): the per-op table, or
    LA-DNAS's learned latency predictor for ``latency_mlp``, whose ``latency_model.Settings``
    ``latency`` overrides (the table ignores them)."""
    if kind == "none":
        return None
    if kind == "latency_mlp":
        from morphnas.strategies import latency_model  # it builds on this module

        settings = latency_model.Settings(**latency)
        return latency_model.LatencyModelPenalty(space, settings)
    return CostPenalty(space, kind)


def proximity(probabilities: Sequence[Tensor], none: Tensor) -> Tensor:
    """DARTS-PRIME's ``‖p − D(p)‖₂`` over all searched nodes (one flat vector).

    ``D(p)`` is 1 at each node's best non-``none`` entry (the derived edge and op) and 0
    elsewhere; the norm is plain, not squared, as in k8lion/DARTS-PRIME.
    """
    squares = []
    for p in probabilities:
        scores = p.detach().masked_fill(none, float("-inf")).reshape(-1)
        target = torch.zeros_like(scores)
        target[int(scores.argmax())] = 1.0
        squares.append(((p.reshape(-1) - target) ** 2).sum())
    return torch.sqrt(torch.stack(squares).sum())


def _random_cell(space: Any, generator: torch.Generator, offset: int) -> tuple[SampledMixing, list]:
    """One discrete cell as a hard sample: every searched node one (edge, op); ``offset`` cycles
    the ops so every op appears across the first samples."""
    n_ops = len(space.op_names)
    current = space.mixing_weights()
    weights, choices, ops = [], [], []
    for i, alpha in enumerate(space.arch, start=1):
        if i in space.fixed:
            weights.append(current[i - 1].detach())
            choices.append(None)
            continue
        rows = alpha.numel() // n_ops
        op = (
            (offset + i) % n_ops
            if offset >= 0
            else int(torch.randint(n_ops, (1,), generator=generator))
        )
        row = int(torch.randint(rows, (1,), generator=generator))
        choice = row * n_ops + op
        hot = torch.zeros_like(alpha).reshape(-1)
        hot[choice] = 1.0
        weights.append(hot.reshape(alpha.shape))
        choices.append(choice)
        ops.append(op)
    return SampledMixing(weights, choices), ops


@torch.no_grad()
def measure_op_latency(space: Any, batch_size: int, samples: int, repeats: int) -> list[float]:
    """Per-op seconds per forward step, fitted on timed random discrete cells (see module doc)."""
    n_ops = len(space.op_names)
    generator = torch.Generator().manual_seed(0)
    ref = next(space.parameters())
    x = torch.randn(4, batch_size, space.input_size, generator=generator).to(ref)
    was_training = space.training
    space.eval()
    rows, times = [], []
    try:
        for s in range(max(samples, n_ops)):
            mixing, ops = _random_cell(space, generator, s if s < n_ops else -1)
            space(x, weights=mixing)  # warm-up
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                space(x, weights=mixing)
                seconds.append(time.perf_counter() - start)
            counts = [0.0] * n_ops
            for op in ops:
                counts[op] += 1.0
            rows.append([1.0, *counts])
            times.append(sorted(seconds)[len(seconds) // 2] / x.shape[0])
    finally:
        space.train(was_training)
    design = torch.tensor(rows, dtype=torch.float64)
    target = torch.tensor(times, dtype=torch.float64).unsqueeze(1)
    fit = torch.linalg.lstsq(design, target).solution.squeeze(1)
    slopes = fit[1:].clamp(min=0.0)
    none = [k for k, name in enumerate(space.op_names) if name == "none"]
    slopes[none] = 0.0  # 'none' computes nothing: the regression's noise must not price it
    return slopes.tolist()
