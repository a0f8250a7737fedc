"""The strategy interface: how architecture parameters are parameterised and get their step.

Two pieces live here. ``Objective`` is the task's loss as strategies need it: callable on a batch
and mixing weights (first-order methods take ``autograd.grad`` of it), and — for the bilevel
methods — as a *pure function* ``f(weights, arch)`` of tuples of tensors, which is what
``morphnas.hypergrad`` transforms. ``Strategy`` is the method: the parameterisation of ``α``
(``transform``, ``mixing_weights``), its step (``arch_step``), its schedules (``start_epoch``) and
its read-out (``derive``); resource penalties and the DARTS-PRIME proximity term (``regulariser``)
are shared by every strategy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from morphnas.genotype import Genotype
from morphnas.optim import rebuild_optimizer
from morphnas.spaces.base import SampledMixing, SearchSpace
from morphnas.strategies.penalties import PENALTIES, build_penalty, proximity

if TYPE_CHECKING:
    from morphnas.engine.progress import Progress

# A loss on one batch under given mixing weights: the strategy picks the weights, the task the loss.
BatchLoss = Callable[[Any, list[Tensor]], Tensor]
Tensors = tuple[Tensor, ...]
FunctionalLoss = Callable[[Tensors, Tensors], Tensor]


class _Bound(nn.Module):
    """Holds the model as a submodule so ``functional_call`` can swap its tensors while the task's
    own loss closure (which calls the model) runs unchanged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, run: Callable[[], Tensor]) -> Tensor:
        return run()


class Objective:
    """The task's loss seen by a strategy: ``objective(batch, mixing) -> scalar``.

    ``weights`` is the list of trainable weights (or a zero-argument callable returning it, so
    an objective built once follows a supernet that grows). ``full_valid_loss``, when the engine
    sets it, scores mixing weights on the *whole* validation split (random search's final pick
    uses it; without it, the pick falls back to the validation batches it has seen).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: BatchLoss,
        weights: Sequence[nn.Parameter] | Callable[[], Sequence[nn.Parameter]],
    ) -> None:
        self.model, self.loss = model, loss
        self._weights = weights
        self._bound = _Bound(model)
        self.full_valid_loss: Callable[[list[Tensor]], float] | None = None

    @property
    def weights(self) -> list[nn.Parameter]:
        return list(self._weights() if callable(self._weights) else self._weights)

    def __call__(self, batch: Any, mixing: list[Tensor]) -> Tensor:
        return self.loss(batch, mixing)

    def functional(
        self,
        batch: Any,
        mixing: Callable[[], list[Tensor]],
        arch: Sequence[Tensor],
        seed: int | None = None,
    ) -> FunctionalLoss:
        """The loss on ``batch`` as a pure function ``f(weights, arch)`` for ``hypergrad``.

        ``weights`` and ``arch`` (tuples in the order of ``self.weights`` and ``arch``) replace the
        model's tensors through ``torch.func.functional_call``; ``mixing()`` is called inside, so
        it reads the replaced ``α`` (the strategy's own transform, e.g. a softmax). Two things
        would make the function impure, and are removed:

        * random numbers (dropout, variational masks): every evaluation reseeds with ``seed``,
          so the perturbed and unperturbed losses of one step see the same masks (a finite
          difference of two different dropout draws would be noise);
        * BatchNorm's running statistics: replaced by ``None`` in training mode (batch statistics
          are used anyway), so no evaluation writes to the model's buffers.
        """
        names = {id(p): n for n, p in self._bound.named_parameters(remove_duplicate=False)}
        w_names = [names[id(p)] for p in self.weights]
        a_names = [names[id(p)] for p in arch]
        frozen: dict[str, Any] = {
            f"{module_name}.{buffer}": None
            for module_name, module in self._bound.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.training
            and module.track_running_stats
            for buffer in ("running_mean", "running_var", "num_batches_tracked")
        }
        device = next(self.model.parameters()).device
        devices = [device] if device.type == "cuda" else []

        def run() -> Tensor:
            return self.loss(batch, mixing())

        def loss(weights: Tensors, arch_values: Tensors) -> Tensor:
            tensors = {**dict(zip(w_names, weights, strict=True)), **frozen}
            tensors.update(zip(a_names, arch_values, strict=True))
            if seed is None:
                return functional_call(self._bound, tensors, (run,))
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                return functional_call(self._bound, tensors, (run,))

        return loss


def draw_seed() -> int:
    """A seed from the global generator: deterministic under the run's seed, saved on resume."""
    return int(torch.randint(0, 2**62, (1,)))


def detach_mixing(mixing: list[Tensor]) -> list[Tensor]:
    """Mixing weights as constants, keeping a ``SampledMixing`` a sample (only its ops run)."""
    if isinstance(mixing, SampledMixing):
        return mixing.detach()
    return [w.detach() for w in mixing]


class Strategy(ABC):
    """One architecture-search method over a space seen only through ``SearchSpace``.

    The search loop asks a strategy for the mixing weights of the weight step
    (``mixing_weights``; sampling methods draw a fresh sample per call), lets it update the
    architecture parameters from a train and a validation batch (``arch_step``), calls
    ``start_epoch`` before every epoch (temperature and β schedules) and ``derive`` at the end.
    ``eval_mixing`` is the deterministic mixing to score the supernet with. State that must
    survive a resume goes in ``state_dict``; schedules are functions of the epoch alone.

    Options every strategy takes: ``lr``/``weight_decay`` of the Adam on ``α``, ``weight_lr``
    (DARTS's ξ, iDARTS's γ), ``penalty`` (``none|params|flops|latency|latency_mlp``) with
    ``penalty_weight`` (expected cost of the architecture distribution, normalised to [0, 1]),
    ``proximity`` (ρ of DARTS-PRIME's pull towards the discrete architecture) and
    ``arch_clip`` (norm clip of the architecture gradient; SNAS uses 10).
    """

    name: str
    sampling: bool = False  # mixing_weights() draws a new sample at every call
    # The α step differentiates through swapped-in weights (``Objective.functional``): no CUDA
    # graph can replay it (``engine.graphs``).
    hypergradient: bool = False
    # Set by a data-parallel search (``engine.parallel``): averages α's gradients over the ranks.
    reduce_grads: Callable[[Sequence[Tensor]], None] | None = None

    def __init__(
        self,
        space: SearchSpace,
        *,
        lr: float = 3e-3,
        weight_decay: float = 1e-3,
        weight_lr: float = 3e-3,
        penalty: str = "none",
        penalty_weight: float = 0.1,
        proximity: float = 0.0,
        arch_clip: float | None = None,
        latency_samples: int = 300,
        latency_repeats: int = 7,
    ) -> None:
        for name, value in (("lr", lr), ("weight_lr", weight_lr)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name, value in (
            ("weight_decay", weight_decay),
            ("penalty_weight", penalty_weight),
            ("proximity", proximity),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        if arch_clip is not None and not arch_clip > 0:
            raise ValueError(f"arch_clip must be > 0 or None, got {arch_clip!r}")
        self.space = space
        self.weight_lr, self.arch_clip = weight_lr, arch_clip
        # latency_*: how many cells ``latency_mlp`` times, how often (the other kinds ignore them)
        self.penalty = build_penalty(
            space, penalty, samples=latency_samples, repeats=latency_repeats
        )
        self.penalty_weight, self.proximity = penalty_weight, proximity
        self.epoch, self.epochs = 1, 1
        self.optimizer = torch.optim.Adam(space.arch_parameters(), lr=lr, weight_decay=weight_decay)

    # ------------------------------------------------------------------ parameterisation

    def transform(self, alpha: Tensor) -> Tensor:
        """``α`` → deterministic mixing weights of one node: the space's read-out (DARTS: a
        softmax per row of ``darts_rnn``'s edges; one softmax over a two-input node's (input
        pair, op) entries under input choice, where a per-row softmax could not learn inputs)."""
        return self.space.read_out(alpha)

    def mixing_weights(self) -> list[Tensor]:
        """Mixing weights for the weight step (a fresh sample for sampling strategies)."""
        return self.space.mixing_weights(self.transform)

    def eval_mixing(self) -> list[Tensor]:
        """Deterministic mixing weights to score the supernet with (valid loss, growth checks)."""
        return self.mixing_weights()

    def weight_mixing(self) -> list[Tensor]:
        """``mixing_weights()`` as constants for the weight step (a sample stays a sample)."""
        return detach_mixing(self.mixing_weights())

    def prepare(self, progress: Progress | None = None) -> dict[str, float]:
        """Work done once before the search starts, shown on the run's ``progress`` (E2NAS
        trains or loads its graph VAE); returns figures for the run's summary. None by
        default."""
        del progress
        return {}

    def weight_loss(self, loss: BatchLoss, batch: Any) -> Tensor:
        """The loss the weight step descends on ``batch``: the task's loss under
        ``weight_mixing()`` (E2NAS adds its complementary architectures' losses)."""
        return loss(batch, self.weight_mixing())

    def cost_weights(self, alpha: Tensor) -> Tensor:
        """How much each entry of ``α`` counts in an expected cost: the probability that the
        node's one derived (edge, op) is that entry (the read-out normalised over the node)."""
        p = self.space.read_out(alpha)
        return p / p.sum()

    def mode(self) -> SampledMixing:
        """The most likely architecture (the derived one: best non-``none`` entry per node) as a
        hard sample, so scoring it runs only its ops."""

        def best(alpha: Tensor) -> int:
            none = none_mask(self.space, alpha)
            scores = self.space.read_out(alpha.detach()).masked_fill(none, -math.inf)
            return int(scores.reshape(-1).argmax())

        return self.discrete_sample(best)

    def discrete_sample(self, choose: Callable[[Tensor], int]) -> SampledMixing:
        """One discrete architecture as a ``SampledMixing``: ``choose(α)`` gives each searched
        node's flat entry; fixed nodes keep their own one-hot."""
        current = self.space.mixing_weights()
        weights, choices = [], []
        for i, alpha in enumerate(self.space.arch, start=1):
            if i in self.space.fixed:
                weights.append(current[i - 1].detach())
                choices.append(None)
                continue
            choice = choose(alpha)
            weights.append(one_hot_like(alpha, choice))
            choices.append(choice)
        return SampledMixing(weights, choices)

    # ------------------------------------------------------------------ the step

    @abstractmethod
    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> Tensor:
        """Update the architecture parameters; return the (detached) loss they stepped on."""

    def wants_arch_step(self, step: int, weight_steps: int) -> bool:
        """Whether ``α`` steps before the epoch's weight step ``step`` (0-based): every
        ``weight_steps``-th batch by default; DARTS-PRIME schedules its own. Asked once per
        searching weight step, in order, so a schedule may keep state (saved in ``state_dict``)."""
        return step % weight_steps == 0

    def observe_weight_grad(self, grad_sq_norm: float) -> None:
        """``Σ‖∇_w L_train‖²`` of the weight step just taken, before clipping (averaged over
        ranks first in a data-parallel search); DARTS-PRIME's schedule reads it, others don't."""
        del grad_sq_norm

    def regulariser(self) -> Tensor | None:
        """Penalty terms on the live ``α`` (resource cost, DARTS-PRIME proximity), or None."""
        total: Tensor | None = None
        # the searched nodes' α (not darts_cnn's edge-normalisation β, which prices no op)
        searched = [a for i, a in enumerate(self.space.arch, start=1) if i not in self.space.fixed]
        if self.penalty is not None and self.penalty_weight > 0:
            cost = self.penalty.expected([self.cost_weights(a) for a in searched], searched)
            total = self.penalty_weight * cost
        if self.proximity > 0:
            probs = [self.space.read_out(a) for a in searched]
            distance = proximity(probs, none_mask(self.space, probs[0]))
            term = (self.epoch / self.epochs) * (self.proximity / 2) * distance
            total = term if total is None else total + term
        return total

    def _with_regulariser(self, loss: Tensor) -> Tensor:
        extra = self.regulariser()
        return loss if extra is None else loss + extra

    def searched_parameters(self) -> list[nn.Parameter]:
        """What the architecture step moves: the space's architecture parameters (TopoNAS adds
        its topology variables)."""
        return self.space.arch_parameters()

    def _apply(self, grads: Sequence[Tensor]) -> None:
        """Set the gradients of ``searched_parameters`` (never the weights'), averaged over the
        ranks of a data-parallel search, clip if asked, take the optimizer step."""
        params = self.searched_parameters()
        for p, g in zip(params, grads, strict=True):
            p.grad = g.detach()
        if self.reduce_grads is not None:
            self.reduce_grads(params)
        if self.arch_clip is not None:
            nn.utils.clip_grad_norm_(params, self.arch_clip)
        self.optimizer.step()

    def _first_order_step(self, objective: Objective | BatchLoss, batch: Any) -> Tensor:
        """``∇_α`` of the loss under ``mixing_weights()`` (plus regulariser) on ``batch``."""
        value = objective(batch, self.mixing_weights())
        grads = torch.autograd.grad(
            self._with_regulariser(value), self.space.arch_parameters(), allow_unused=True
        )
        params = self.space.arch_parameters()
        self._apply(
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        )
        return value.detach()

    def _bilevel(
        self, objective: Objective, train_batch: Any, valid_batch: Any
    ) -> tuple[FunctionalLoss, FunctionalLoss, Tensors, Tensors]:
        """The train and validation losses as pure functions of ``(weights, arch)`` for
        ``hypergrad``, sharing one random seed (same dropout masks), and the current tensors."""
        arch = tuple(self.space.arch_parameters())
        seed = draw_seed()

        def mixing() -> list[Tensor]:
            return self.space.mixing_weights(self.transform)

        train_loss = objective.functional(train_batch, mixing, arch, seed)
        val_loss = objective.functional(valid_batch, mixing, arch, seed)
        return train_loss, val_loss, tuple(objective.weights), arch

    def _apply_hypergradient(self, grads: Sequence[Tensor]) -> None:
        """Step ``α`` by a bilevel hypergradient plus the regularisers' own gradients."""
        extra = self._regulariser_grads()
        if extra is not None:
            grads = tuple(g + e for g, e in zip(grads, extra, strict=True))
        self._apply(grads)

    @torch.no_grad()
    def _valid_value(self, objective: Objective, batch: Any) -> Tensor:
        """The validation loss after the step (bilevel methods never evaluate it on the way)."""
        return objective(batch, self.space.mixing_weights(self.transform)).detach()

    def _regulariser_grads(self) -> list[Tensor] | None:
        extra = self.regulariser()
        if extra is None:
            return None
        params = self.space.arch_parameters()
        grads = torch.autograd.grad(extra, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    # ------------------------------------------------------------------ hooks

    def on_space_change(self) -> None:
        """The space grew or was pruned: new ``α`` get fresh Adam state, survivors keep theirs."""
        self.optimizer = rebuild_optimizer(self.optimizer, self.space.arch_parameters())

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Set per-epoch schedules (temperature, β). A function of ``epoch`` only: a resumed
        search calls it again for the epoch it continues."""
        self.epoch, self.epochs = epoch, max(1, epochs)

    def epoch_metrics(self) -> dict[str, float]:
        """Figures the strategy measured this epoch, for the epoch's row of ``metrics.jsonl``
        (iDARTS: its curvature check); none by default."""
        return {}

    def derive(self) -> Genotype:
        """The discrete architecture the search ends with (DARTS: the space's argmax rule)."""
        return self.space.derive()

    def scale_lr(self, factor: float) -> None:
        """Scale the learning rate of every optimizer the strategy holds (a retry after the
        search diverged restarts from the last checkpoint at lower rates)."""
        for value in vars(self).values():
            if isinstance(value, torch.optim.Optimizer):
                for group in value.param_groups:
                    group["lr"] *= factor

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.penalty is not None:
            # Measured latencies are timings: a resumed run must reuse them, not re-measure.
            state["penalty"] = self.penalty.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.penalty is not None and "penalty" in state:
            self.penalty.load_state_dict(state["penalty"])

    # ------------------------------------------------------------------ helpers for subclasses

    def progress(self) -> float:
        """Share of the schedule done at the current epoch: 0 at the first, 1 at the last."""
        return 0.0 if self.epochs <= 1 else (self.epoch - 1) / (self.epochs - 1)


def one_hot_like(alpha: Tensor, choice: int) -> Tensor:
    """A tensor shaped like ``alpha``: 1 at flat index ``choice``, 0 elsewhere."""
    hot = torch.zeros_like(alpha).reshape(-1)
    hot[choice] = 1.0
    return hot.reshape(alpha.shape)


def none_mask(space: SearchSpace, like: Tensor) -> Tensor:
    """True on the last-axis positions of the ``none`` op (derivation never picks it)."""
    return torch.tensor([name == "none" for name in space.op_names], device=like.device)
