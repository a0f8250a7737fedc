"""DARTS-PRIME (Maile, Lecarpentier, Luga, Wilson; arXiv 2106.11655; spec/methods.md §10).

First-order DARTS (``∇_α L_val`` at the current weights) with three pieces, each an option,
following k8lion/DARTS-PRIME (``train_scheduled_hard_statebn.py``, ``model_admm_hard_statebn.py``):

* **When α steps** (``schedule``). ``dynamic`` (the paper's): after every weight backward pass
  the engine reports ``FI = Σ‖∇_w L_train‖²`` (the squared total gradient norm before clipping, a
  Fisher-information proxy), kept as an EWMA, ``e ← c·FI + (1 − c)·e`` (``ewma`` c = 0.2; the
  first FI starts it). Before each weight step α steps iff ``0 < e < τ``; ``τ`` starts at
  ``threshold`` and is multiplied by ``multiplier^(−schedfreq)`` after an α step and by
  ``multiplier`` (1.05) after a step without one, so α steps about once per ``schedfreq`` weight
  steps while the weights' gradients stay small, and more rarely while they are large.
  ``static``: one α step every ``schedfreq`` weight steps of the search (counted across epochs).
  ``every``: the engine's own rule, every ``search.weight_steps``-th batch of an epoch. The
  dynamic and static schedules ignore ``search.weight_steps``. Warm-up epochs take no α step and
  do not move τ or the static count; their gradients do feed the EWMA.
* **Regularisation** (``reg`` with weight ``rho``, 0.1). ``prox`` (default): the proximity term
  every strategy has (``Strategy.regulariser``, ``penalties.proximity``) with ρ = ``rho``:
  ``(t/T)(ρ/2)‖act(α) − D(act(α))‖₂``. ``admm``: ``(ρ/2)‖(act(α) − Z + U)·m‖₂`` (one norm over
  all searched nodes, as ``proximity``'s; the code sums one norm per α tensor); every
  ``admm_every`` (10) α steps ``Z ← D(act(α + U))`` then ``U ← 0.2·U + (α − Z)``, where ``U`` is
  updated with the *raw* ``α``, not ``act(α)``, exactly as in their code, and, as there, ``Z``
  starts at the initial raw ``α`` and ``U`` at 0 (m: the crb mask, else 1). Our ``D`` is the
  space's own derivation (``node_options``' first choice: DARTS's top-2 edges in ``darts_cnn``,
  the strongest edge in ``darts_rnn``) as a one-hot; their code checks ``(count + 1) % 10`` on
  every weight step and resets the count, an update every 9 α steps, which we do not copy.
  ``none``: no term. The shared ``proximity`` option adds to ``admm``/``none`` as to any strategy;
  with ``prox`` its weight is ``rho``, so a second weight is refused.
* **Competition** (``crb``). ``act = softmax`` by default (the README's recommended command);
  with ``crb`` the weights do not compete: ``act = clamp(α, 0, 1)``, α initialised to
  ``1/|O| + 1e-4·N(0, 1)`` (|O| the space's op count, ``none`` included; the noise from the
  run's seeded generator), and an entry that ever reaches α ≤ 0 is masked to 0 for good (after
  every α step). Their CNN adds a BatchNorm after every node's sum to keep the unnormalised sum
  in scale; we add none: ``darts_rnn`` already normalises every node during search, and in
  ``two_input`` and ``darts_cnn`` each weight is at most 1, so a node's sum is at most the sum of
  its ops. Growth gives a grown node an all-ones mask and the space's own near-zero α, so about
  half its entries are masked at its first α step: crb is meant for a fixed-size search.

The α optimiser is the run's (``search.arch_lr``, Adam); the paper's CNN uses Adam 3e-4 with
betas (0.5, 0.999). The schedule's state (EWMA, τ, counts, Z, U, masks) is in ``state_dict``, so
a resumed search takes the same steps. In a data-parallel search the norm is taken after the
gradients are averaged, so every rank makes the same decision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from morphnas.spaces.base import SearchSpace
from morphnas.strategies.base import BatchLoss, Objective, Strategy

SCHEDULES = ("dynamic", "static", "every")
REGULARISERS = ("prox", "admm", "none")
U_DECAY = 0.2  # U ← 0.2·U + (α − Z) (spec §10; DARTS-PRIME's zuewma)


def clamp_unit(alpha: Tensor) -> Tensor:
    """crb's non-competing weights: ``clamp(α, 0, 1)`` (a module-level function: picklable)."""
    return alpha.clamp(0.0, 1.0)


class DartsPrime(Strategy):
    """DARTS-PRIME: first-order α steps on a dynamic/static schedule, prox/ADMM, optional crb."""

    name = "darts_prime"

    def __init__(
        self,
        space: SearchSpace,
        *,
        schedule: str = "dynamic",
        schedfreq: int = 10,
        threshold: float = 1.0,
        multiplier: float = 1.05,
        ewma: float = 0.2,
        reg: str = "prox",
        rho: float = 0.1,
        admm_every: int = 10,
        crb: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(space, **common)
        _check(schedule, schedfreq, threshold, multiplier, ewma, reg, rho, admm_every)
        if reg == "prox":
            if self.proximity > 0:
                raise ValueError(
                    "reg=prox takes its weight from rho; leave proximity at 0 (or use reg=none "
                    "with proximity)"
                )
            self.proximity = rho
        self.schedule, self.schedfreq, self.reg, self.rho = schedule, schedfreq, reg, rho
        self.threshold, self.multiplier, self.ewma = threshold, multiplier, ewma
        self.admm_every, self.crb = admm_every, crb
        self.fi_ewma: float | None = None  # no weight step seen yet: no α step
        self.tau = threshold
        self.decisions = 0  # searching weight steps so far (the static schedule's clock)
        self.arch_steps = 0  # α steps so far (the ADMM update's clock)
        self.masks: dict[int, Tensor] = {}  # crb: 1 where α may still be non-zero
        self.z: dict[int, Tensor] = {}
        self.u: dict[int, Tensor] = {}
        if crb:
            space.read_out = clamp_unit
            self._crb_init()
        self._track_new_nodes()

    # ------------------------------------------------------------------ the schedule

    def wants_arch_step(self, step: int, weight_steps: int) -> bool:
        """Whether α steps before weight step ``step`` (see the module doc); moves τ."""
        if self.schedule == "every":
            return super().wants_arch_step(step, weight_steps)
        self.decisions += 1
        if self.schedule == "static":
            return (self.decisions - 1) % self.schedfreq == 0
        take = self.fi_ewma is not None and 0 < self.fi_ewma < self.tau
        self.tau *= self.multiplier ** (-self.schedfreq if take else 1)
        return take

    def observe_weight_grad(self, grad_sq_norm: float) -> None:
        """Fold one weight step's ``Σ‖∇_w‖²`` into the EWMA (the first one starts it)."""
        if self.fi_ewma is None:
            self.fi_ewma = grad_sq_norm
        else:
            self.fi_ewma = self.ewma * grad_sq_norm + (1 - self.ewma) * self.fi_ewma

    # ------------------------------------------------------------------ the step

    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> Tensor:
        value = self._first_order_step(objective, valid_batch)
        self.arch_steps += 1
        if self.crb:
            self._apply_masks()
        if self.reg == "admm" and self.arch_steps % self.admm_every == 0:
            self.admm_update()
        return value

    def regulariser(self) -> Tensor | None:
        """The shared terms (resource cost; proximity with ρ = ``rho`` under ``reg=prox``) plus
        ADMM's ``(ρ/2)‖(act(α) − Z + U)·m‖₂`` under ``reg=admm``."""
        total = super().regulariser()
        if self.reg != "admm" or self.rho == 0:
            return total
        residual = [
            ((self.transform(alpha) - self.z[i] + self.u[i]) * self._mask(i)).reshape(-1)
            for i, alpha in self._searched()
        ]
        term = (self.rho / 2) * torch.linalg.vector_norm(torch.cat(residual))
        return term if total is None else total + term

    @torch.no_grad()
    def admm_update(self) -> None:
        """``Z ← D(act(α + U))``, then ``U ← 0.2·U + (α − Z)`` with the raw α (their code)."""
        for i, alpha in self._searched():
            self.z[i] = self.discrete(i, self.transform(alpha + self.u[i]))
            self.u[i] = (U_DECAY * self.u[i] + (alpha - self.z[i])) * self._mask(i)

    def discrete(self, i: int, p: Tensor) -> Tensor:
        """``D(p)`` of searched node ``i``: 1 on the entries of its derived choice under mixing
        weights ``p`` (the space's own rule), 0 elsewhere."""
        node = self.space.node_options(i, p)[0][1]
        hot = torch.zeros_like(p)
        hot[self.space._entry(i, node)] = 1.0  # type: ignore[attr-defined]
        return hot

    def cost_weights(self, alpha: Tensor) -> Tensor:
        """As every strategy's, kept finite when crb has masked a whole node to 0."""
        p = self.space.read_out(alpha)
        return p / p.sum().clamp_min(torch.finfo(p.dtype).tiny)

    # ------------------------------------------------------------------ crb and bookkeeping

    def _searched(self) -> list[tuple[int, Tensor]]:
        """``(1-based node index, α)`` of every searched node."""
        return [(i, a) for i, a in enumerate(self.space.arch, start=1) if i not in self.space.fixed]

    def _mask(self, i: int) -> Tensor | float:
        return self.masks[i] if self.crb else 1.0

    @torch.no_grad()
    def _crb_init(self) -> None:
        n_ops = len(self.space.op_names)
        for _, alpha in self._searched():
            alpha.copy_(1 / n_ops + 1e-4 * torch.randn_like(alpha))

    @torch.no_grad()
    def _apply_masks(self) -> None:
        """Entries at α ≤ 0 are masked for good; masked entries are held at 0."""
        for i, alpha in self._searched():
            self.masks[i][alpha <= 0] = 0.0
            alpha.mul_(self.masks[i]).clamp_(min=0.0)

    def _track_new_nodes(self) -> None:
        """Masks, Z and U for nodes that have none yet (the first ones, or grown ones)."""
        for i, alpha in self._searched():
            if self.crb and i not in self.masks:
                self.masks[i] = torch.ones_like(alpha.detach())
            if self.reg == "admm" and i not in self.z:
                self.z[i] = alpha.detach().clone()
                self.u[i] = torch.zeros_like(alpha.detach())

    def on_space_change(self) -> None:
        super().on_space_change()
        self._track_new_nodes()

    def epoch_metrics(self) -> dict[str, float]:
        """α steps so far, τ and the FI EWMA, for the epoch's row of ``metrics.jsonl``."""
        found = {"arch_steps": float(self.arch_steps), "tau": self.tau}
        return found if self.fi_ewma is None else {**found, "fi_ewma": self.fi_ewma}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "schedule": {
                "fi_ewma": self.fi_ewma,
                "tau": self.tau,
                "decisions": self.decisions,
                "arch_steps": self.arch_steps,
            },
            "masks": {i: t.clone() for i, t in self.masks.items()},
            "z": {i: t.clone() for i, t in self.z.items()},
            "u": {i: t.clone() for i, t in self.u.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        schedule = state["schedule"]
        self.fi_ewma, self.tau = schedule["fi_ewma"], schedule["tau"]
        self.decisions, self.arch_steps = schedule["decisions"], schedule["arch_steps"]
        device = self.space.arch[0].device
        for name in ("masks", "z", "u"):
            setattr(self, name, {int(i): t.to(device) for i, t in state[name].items()})


def _check(
    schedule: str,
    schedfreq: int,
    threshold: float,
    multiplier: float,
    ewma: float,
    reg: str,
    rho: float,
    admm_every: int,
) -> None:
    """A ``ValueError`` naming the first bad option and what it takes."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if reg not in REGULARISERS:
        raise ValueError(f"reg must be one of {REGULARISERS}, got {reg!r}")
    for name, count in (("schedfreq", schedfreq), ("admm_every", admm_every)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {count!r}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    if not multiplier > 1:
        raise ValueError(f"multiplier must be > 1, got {multiplier!r}")
    if not 0 < ewma <= 1:
        raise ValueError(f"ewma must be in (0, 1], got {ewma!r}")
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0, got {rho!r}")
