"""E2NAS (Zhang et al., NeurIPS 2020; spec/methods.md §3): search in a graph VAE's latent space,
with exploration enhancement and architecture complementation.

The architecture parameter is a latent code ``z ∈ R^{nz}`` of a frozen graph VAE trained on the
space's genotypes (``morphnas.latent``: a D-VAE-style GRU encoder and sequential decoder, cached on
disk by space and size). Each step decodes ``z`` into one discrete architecture and only its ops run
(the GDAS sampled-mixing path):

* **Forward.** The decoder gives each searched node ``i`` the probabilities ``q_i(z)`` of its
  entries (shaped like the node's ``α``, 0 on ``none``) and, during search, an ancestral sample of
  the entry (``H_i`` its one-hot). The mixing weights are ``W_i = H_i − stopgrad(q_i) + q_i``
  (straight-through), so ``∂L/∂z = Σ_i ⟨∂L/∂W_i, ∂q_i/∂z⟩`` flows *through the decoder*
  (``gradient="decoder"``, default). ``gradient="latent"`` is the authors' path: ``P`` = one
  softmax over all of ``z`` cut into the nodes' ``α`` shapes (so ``nz`` must equal the number of
  ``α`` entries), ``W = H − stopgrad(P) + P``; the decoder itself is then never differentiated.
  Fixed nodes (grow-and-prune) keep their one-hot, as in GDAS.
* **Architecture step** on the validation batch: ``L_α = (1 − η_t)·L_val + η_t·N(z)`` with
  ``η_t = 1 − σ(r(2e/E − 1))``, ``r = exploration_ratio`` (10), ``e``/``E`` the epoch and the
  number of epochs: ≈ 1 at the start (explore), ≈ 0 at the end (exploit). ``N(z) = log p(z)``,
  the mean over dimensions of the log-density of a diagonal Gaussian fitted (maximum likelihood,
  variance floored at ``1e-8``) to the archive of the last ``archive`` (50) codes; it is 0 until the
  archive is full. The authors' "novelty" is such a log-density (lower = more novel), so *adding*
  ``+log p(z)`` to the loss and minimising it moves ``z`` towards low-density (novel) regions of
  the archive: the exploration *bonus* is ``−log p(z)``. Its gradient is
  ``−(z − μ)/(nz·σ²)``, pointing away from the archive's mean. ``novelty="code"`` is the authors'
  form: the same value as a constant (it rescales the loss value, adds no gradient);
  ``novelty="off"`` drops it. The Adam on ``z`` uses the authors' lr 3e-4, betas (0.5, 0.999),
  weight decay 1e-3 (``lr``/``weight_decay`` options). Resource penalties and the proximity term
  (shared options) are taken on the decoder's probabilities ``q(z)``.
* **Weight step with complementation** (``weight_loss``): ``a_cur`` is a fresh sample, ``a_prev``
  the previous weight step's, ``a_comp`` is ``a_cur`` with every node where ``a_prev`` and ``a_cur``
  agree replaced by a uniformly random *different* allowed entry;
  ``L_w = (1 − λ)·L(a_cur) + (λ/2)·[L(a_prev) + L(a_comp)]``, ``λ = complement_weight`` (0.5).
  ``complementation="gradient"`` (default): all three sub-networks give the weights a gradient;
  ``"value_only"``: the authors' code, ``L(a_cur) + (L_w − stopgrad(L(a_cur)))`` — the value is
  the three-way loss, the gradient is ``a_cur``'s alone; ``"off"``: ``L(a_cur)``. The first step
  of a run (and the first after the space changes) has no ``a_prev`` and uses ``L(a_cur)``.
* **Read-out** (``derive``, ``eval_mixing``): *argmax* decoding of ``z``, never a sample, so it is
  deterministic. After every change of ``z`` the space's ``α`` are set to ``log q(z)`` under
  argmax decoding (with the joint per-node read-out), so the logged mixing weights, ``derive()``
  of the space and grow-and-prune's ``prune`` all read the decoder's argmax architecture.

Defects of the authors' code fixed here, and the options that restore their behaviour:
complementation without gradient (``complementation="value_only"``), novelty without gradient
(``novelty="code"``), the decoder not differentiated (``gradient="latent"``); the stochastic
read-out has no option (it makes the result one random sample). ``z_init="random"`` (default) is
the authors' ``1e-3·N(0, I)``; ``"encode"`` starts from the encoding (``μ``) of the space's current
derived genotype (a warm start, for instance).

Growth (our reading of the issue): when the space grows or is pruned, the VAE for the new shape is
loaded (or trained) and ``z`` is re-encoded from the current genotype (``μ`` of the encoder on the
choices of ``space.derive()``, which is the old ``z``'s argmax decoding on the old nodes), and the
Adam on ``z`` starts afresh. The growth check stays exact: a grown node's output scale is 0, so
whatever the decoder picks for it leaves the cell's output unchanged.

``complementation`` and ``novelty`` also take ``false`` for ``off`` (YAML reads a bare ``off`` as
false). Cost: ``complementation="gradient"`` runs three forward/backward passes per weight step
(``value_only``: one, plus two forward passes without a graph), and each step decodes ``z`` three
times (the architecture step's sample with its gradient, the weight step's sample, the argmax that
refreshes ``α``).

Randomness (ancestral samples, complements) is drawn from the global torch generator, which the
search checkpoints, so a resumed run continues exactly; ``z``, its Adam state, the archive and
``a_prev`` are in ``state_dict``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from morphnas.errors import check_count
from morphnas.genotype import OP_PER_INPUT, Genotype
from morphnas.spaces.base import SampledMixing, SearchSpace, joint_softmax
from morphnas.strategies.base import BatchLoss, Objective, Strategy, none_mask, one_hot_like
from morphnas.strategies.penalties import proximity

if TYPE_CHECKING:
    from morphnas.engine.progress import Progress

GRADIENTS = ("decoder", "latent")
COMPLEMENTATIONS = ("gradient", "value_only", "off")
NOVELTIES = ("density", "code", "off")
Z_INITS = ("random", "encode")
BETAS = (0.5, 0.999)  # the authors' Adam on z
VAR_FLOOR = 1e-8  # the archive density's variance floor (a constant dimension is not -inf)
LOG_FLOOR = 1e-12  # log q of an entry the decoder never picks (none): finite α


def exploration_weight(epoch: int, epochs: int, ratio: float) -> float:
    """``η_t = 1 − σ(r(2e/E − 1))``: ≈ 1 early (explore), ≈ 0 late (exploit)."""
    x = ratio * (2.0 * epoch / max(1, epochs) - 1.0)
    if x >= 0:  # 1 − σ(x) = σ(−x), without cancellation or overflow
        return math.exp(-x) / (1.0 + math.exp(-x))
    return 1.0 / (1.0 + math.exp(x))


def archive_log_density(z: Tensor, archive: Tensor) -> Tensor:
    """Mean over dimensions of ``log N(z; μ, diag σ²)``, ``μ``/``σ²`` fitted to ``archive`` (K, nz)
    by maximum likelihood (variance floored at ``VAR_FLOOR``); differentiable in ``z``."""
    mu = archive.mean(0)
    var = archive.var(0, unbiased=False) + VAR_FLOOR
    return (-0.5 * (torch.log(2 * math.pi * var) + (z - mu) ** 2 / var)).mean()


def complement(
    prev: list[int | None], cur: list[int | None], allowed: list[list[int] | None]
) -> list[int | None]:
    """``cur`` with every node where ``prev`` agrees replaced by a uniformly random *different*
    entry of ``allowed[i]`` (drawn from the global generator); a node with a single allowed entry,
    or none searched (``None``), stays."""
    out: list[int | None] = []
    for p, c, entries in zip(prev, cur, allowed, strict=True):
        if c is None or p != c or entries is None or len(entries) < 2:
            out.append(c)
            continue
        others = [e for e in entries if e != c]
        out.append(others[int(torch.randint(len(others), (1,)))])
    return out


def three_way(cur: Tensor, prev: Tensor, comp: Tensor, weight: float) -> Tensor:
    """``(1 − λ)·L(a_cur) + (λ/2)·[L(a_prev) + L(a_comp)]``."""
    return (1 - weight) * cur + (weight / 2) * (prev + comp)


class E2nas(Strategy):
    """E2NAS: a latent code decoded by a frozen graph VAE; exploration and complementation."""

    name = "e2nas"
    sampling = True

    def __init__(
        self,
        space: SearchSpace,
        *,
        nz: int | None = None,
        hs: int = 64,
        z_init: str = "random",
        gradient: str = "decoder",
        complementation: str | bool = "gradient",
        complement_weight: float = 0.5,
        novelty: str | bool = "density",
        archive: int = 50,
        exploration_ratio: float = 10.0,
        lr: float = 3e-4,
        weight_decay: float = 1e-3,
        **common: Any,
    ) -> None:
        super().__init__(space, lr=lr, weight_decay=weight_decay, **common)
        if space.space in OP_PER_INPUT:  # type: ignore[attr-defined]
            raise ValueError(
                f"e2nas encodes one choice (an input and an op) per node, and a "
                f"{space.space} node chooses two edges: search it with another strategy"  # type: ignore[attr-defined]
            )
        if nz is not None:
            check_count("nz", nz, 1)
        check_count("hs", hs, 1)
        check_count("archive", archive, 2)
        # YAML reads a bare ``off`` as false: ``complementation: off`` means "off".
        complementation = "off" if complementation is False else complementation
        novelty = "off" if novelty is False else novelty
        for option, value, choices in (
            ("z_init", z_init, Z_INITS),
            ("gradient", gradient, GRADIENTS),
            ("complementation", complementation, COMPLEMENTATIONS),
            ("novelty", novelty, NOVELTIES),
        ):
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{option} must be one of {choices}, got {value!r}")
        if not 0 <= complement_weight <= 1:
            raise ValueError(f"complement_weight must be in [0, 1], got {complement_weight!r}")
        if not exploration_ratio >= 0:
            raise ValueError(f"exploration_ratio must be >= 0, got {exploration_ratio!r}")
        self.nz_option, self.hs, self.z_init, self.gradient = nz, hs, z_init, gradient
        self._table_for: tuple[tuple, Any] | None = None  # (space signature, its ChoiceTable)
        self.nz = self._latent_size()
        self.complementation, self.complement_weight = complementation, complement_weight
        self.novelty, self.archive_size, self.exploration_ratio = (
            novelty,
            archive,
            exploration_ratio,
        )
        self.lr, self.weight_decay = lr, weight_decay
        if gradient == "latent":
            self._check_latent_size()
        like = _reference(space)
        self.z = nn.Parameter(1e-3 * torch.randn(self.nz, dtype=like.dtype).to(like.device))
        self.optimizer = self._adam()
        self.archive = torch.zeros(0, self.nz, dtype=like.dtype, device=like.device)
        self.prev: list[int | None] | None = None  # a_prev: the last weight step's choices
        self.vae: Any = None
        self.table: Any = None
        self.vae_info: dict[str, Any] = {}
        self._signature: tuple | None = None
        self._novelty_value = 0.0
        self._reported_vae = False
        # ``α`` mirrors the argmax decoding of ``z`` for the logs, growth and ``derive``; an
        # architecture step marks it stale and the next read-out refreshes it (one decode per
        # epoch instead of one per step: nothing in a step reads ``α``).
        self._alpha_stale = False
        self._progress: Progress | None = None  # set by ``prepare`` while it loads the VAE
        space.read_out = joint_softmax

    # ------------------------------------------------------------------ the VAE and z

    def _adam(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.z], lr=self.lr, betas=BETAS, weight_decay=self.weight_decay)

    def _current_table(self) -> Any:
        """The space's ``ChoiceTable`` as it is now, built once per shape of the space (the
        latent size and the VAE both need it, and an 8-node input-choice table takes ~0.3 s)."""
        from morphnas.latent.codes import ChoiceTable

        signature = self._space_signature()
        if self._table_for is None or self._table_for[0] != signature:
            self._table_for = (signature, ChoiceTable.from_space(self.space))
        return self._table_for[1]

    def _latent_size(self) -> int:
        """``nz``: the option when given; else every ``α`` entry for ``gradient="latent"`` (the
        authors' softmax over z needs one dimension per entry), and else ``suggested_nz`` of
        the space's table (about one dimension per bit of the number of cells: a fixed 16 left
        8-node ``wiring: search`` at 16 % held-out reconstruction)."""
        from morphnas.latent.vae import suggested_nz

        if self.nz_option is not None:
            return self.nz_option
        if self.gradient == "latent":
            return sum(a.numel() for a in self.space.arch)
        return suggested_nz(self._current_table())

    def _check_latent_size(self) -> None:
        entries = sum(a.numel() for a in self.space.arch)
        if entries != self.nz:
            raise ValueError(
                f"gradient='latent' (the authors' softmax over z) needs nz equal to the number of "
                f"α entries of the space's nodes ({entries}), got nz={self.nz}; set nz={entries} "
                "or use gradient='decoder'"
            )

    def _space_signature(self) -> tuple:
        """What the VAE depends on (α shapes, grown residual nodes) and whether any node is
        still searched; fixing a node alone keeps the VAE (the table treats it as searchable)."""
        grown = tuple(sorted(getattr(self.space, "gammas", {}).keys()))
        shapes = tuple(tuple(alpha.shape) for alpha in self.space.arch)
        return shapes, grown, bool(self.space.arch_parameters())

    def _ensure(self) -> bool:
        """Load (or train) the VAE for the space as it is now; when the space changed since the
        last VAE, re-encode ``z`` from the current genotype. Return whether anything changed."""
        like = _reference(self.space)
        if self.z.device != like.device:  # the model moved after the strategy was built
            self.z.data = self.z.data.to(like.device)
            self.archive = self.archive.to(like.device)
        signature = self._space_signature()
        if signature == self._signature:
            return False
        changed = self._signature is not None
        self._signature = signature
        if not self.space.arch_parameters():  # everything fixed: nothing left to decode
            self.table = self.vae = None
            return changed
        if self.gradient == "latent":
            self._check_latent_size()
        table = self._current_table()
        nz = self._latent_size()
        if nz != self.nz:  # a grown space's table is larger: so is its suggested code
            self.nz = nz
            self.z = nn.Parameter(self.z.new_zeros(nz))  # re-encoded below
            self.archive = self.archive.new_zeros(0, nz)
        with torch.random.fork_rng(devices=[]):  # training never moves the run's generator
            vae, info = load_vae(table, nz=self.nz, hs=self.hs, progress=self._progress)
        self.table, self.vae = table, vae.to(like.device)
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.vae_info = {
            k: float(v)
            for k, v in info.items()
            if isinstance(v, int | float | bool) and math.isfinite(float(v))
        }
        if changed or self.z_init == "encode":
            self._encode_current()
        if changed:
            self.prev = None  # a_prev's nodes no longer match
            self.archive = self.archive[:0]
            self.optimizer = self._adam()
        self._sync_alpha()
        return True

    @torch.no_grad()
    def _encode_current(self) -> None:
        """``z ← μ(encode(space.derive()))``: the code of the current architecture."""
        positions = self.table.positions(self.table.choices(self.space.derive()))
        mu, _ = self.vae.encode(torch.tensor([positions], device=self.z.device))
        self.z.data = mu.reshape(-1).to(self.z)

    def _searched(self) -> list[int]:
        return [i for i in range(1, len(self.space.arch) + 1) if i not in self.space.fixed]

    def _decode(self, stochastic: bool, grad: bool = True) -> tuple[list[Tensor], list[int]]:
        """Per table node: the relaxed probabilities the gradient flows through (``q(z)`` of
        the decoder, or the authors' ``softmax(z)`` cut into ``α`` shapes) and the chosen flat
        entries (an ancestral sample, or the argmax decoding)."""
        z = self.z if grad else self.z.detach()
        if self.gradient == "decoder":
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                probs, chosen = self.vae.node_probs(self._vae_input(z), sample=stochastic)
            return list(probs), [int(c) for c in chosen]
        with torch.no_grad():
            _, chosen = self.vae.node_probs(self._vae_input(z.detach()), sample=stochastic)
        return self.latent_probs(z), [int(c) for c in chosen]

    def _vae_input(self, z: Tensor) -> Tensor:
        """``z`` in the VAE's dtype (a float64 search still decodes with a float32 VAE)."""
        dtype = next(self.vae.parameters()).dtype
        return z if z.dtype == dtype else z.to(dtype)

    def latent_probs(self, z: Tensor) -> Tensor:
        """The authors' ``P``: one softmax over all of ``z``, cut into the table's ``α`` shapes."""
        flat = torch.softmax(z, 0)
        sizes = [math.prod(shape) for shape in self.table.shapes]
        return [
            part.reshape(shape)
            for part, shape in zip(flat.split(sizes), self.table.shapes, strict=True)
        ]

    def _mixing(
        self, probs: list[Tensor] | None, chosen: list[int | None], straight: bool = True
    ) -> SampledMixing:
        """``W_i = H_i − stopgrad(q_i) + q_i`` per searched node (``H_i`` alone if not
        ``straight``); fixed nodes keep their one-hot. ``probs``/``chosen`` are indexed like the
        table, i.e. like the space's nodes (an entry of a fixed node is ignored)."""
        current = self.space.mixing_weights()
        weights: list[Tensor] = []
        choices: list[int | None] = []
        for i, alpha in enumerate(self.space.arch, start=1):
            if i in self.space.fixed:
                weights.append(current[i - 1].detach())
                choices.append(None)
                continue
            k = i - 1
            hot = one_hot_like(alpha.detach(), chosen[k])
            if straight and probs is not None:
                q = probs[k].to(hot)
                hot = hot - q.detach() + q
            weights.append(hot)
            choices.append(chosen[k])
        return SampledMixing(weights, choices)

    @torch.no_grad()
    def _sync_alpha(self) -> None:
        """Set the searched nodes' ``α`` to ``log q(z)`` under argmax decoding, so the space's
        read-out (a joint softmax per node) is the decoder's distribution and ``derive``/``prune``
        of the space give the argmax decoding."""
        self._alpha_stale = False
        if self.vae is None:
            return
        probs, _ = self.vae.node_probs(self._vae_input(self.z.detach()), sample=False)
        for i in self._searched():
            alpha = self.space.arch[i - 1]
            alpha.copy_(probs[i - 1].to(alpha).clamp_min(LOG_FLOOR).log())

    # ------------------------------------------------------------------ mixing weights

    def sample(self) -> SampledMixing:
        """One ancestral sample of the decoder, straight-through to ``z``."""
        self._ensure()
        if self.vae is None:
            return self._mixing(None, [])
        probs, chosen = self._decode(stochastic=True)
        return self._mixing(probs, chosen)

    def mixing_weights(self) -> list[Tensor]:
        return self.sample()

    def weight_mixing(self) -> list[Tensor]:
        """A fresh ancestral sample as exact one-hot constants (the weight step needs no ``q``)."""
        self._ensure()
        return self._hard_decode(stochastic=True)

    def _hard_decode(self, stochastic: bool) -> SampledMixing:
        """A sample (or the argmax) of the decoder as one-hot constants, without a graph."""
        if self.vae is None:
            return self._mixing(None, [])
        with torch.no_grad():
            _, chosen = self._decode(stochastic=stochastic, grad=False)
        return self._mixing(None, chosen, straight=False)

    def argmax(self) -> SampledMixing:
        """The argmax decoding of ``z`` as a hard sample (deterministic, no gradient); the
        engine scores the supernet with it after every epoch, before it logs or grows, so ``α``
        is brought up to date here."""
        self._ensure()
        if self._alpha_stale:
            self._sync_alpha()
        return self._hard_decode(stochastic=False)

    def eval_mixing(self) -> list[Tensor]:
        return self.argmax()

    def mode(self) -> SampledMixing:
        return self.argmax()

    def derive(self) -> Genotype:
        """The argmax decoding of ``z`` (fixed nodes as they were fixed)."""
        self._ensure()
        self._sync_alpha()
        return self.space.derive()

    # ------------------------------------------------------------------ the steps

    def eta(self) -> float:
        return exploration_weight(self.epoch, self.epochs, self.exploration_ratio)

    def novelty_term(self) -> Tensor:
        """``N(z) = log p(z)`` under the archive's density (0 until the archive is full), with
        its gradient (``novelty="density"``), as a constant (``"code"``) or 0 (``"off"``)."""
        if self.novelty == "off" or len(self.archive) < self.archive_size:
            return self.z.new_zeros(())
        value = archive_log_density(self.z, self.archive)
        return value if self.novelty == "density" else value.detach()

    def regulariser(self) -> Tensor | None:
        return None  # taken on q(z) in arch_step (α is not what is optimised)

    def _penalties(self, probs: list[Tensor]) -> Tensor | None:
        total: Tensor | None = None
        searched = self.space.arch_parameters()
        probs = [probs[i - 1].to(a) for i, a in zip(self._searched(), searched, strict=True)]
        if self.penalty is not None and self.penalty_weight > 0:
            total = self.penalty_weight * self.penalty.expected(probs, searched)
        if self.proximity > 0:
            distance = proximity(probs, none_mask(self.space, probs[0]))
            term = (self.epoch / self.epochs) * (self.proximity / 2) * distance
            total = term if total is None else total + term
        return total

    def arch_step(
        self, objective: Objective | BatchLoss, train_batch: Any, valid_batch: Any
    ) -> Tensor:
        """One Adam step on ``z``: ``(1 − η)·L_val(sample) + η·N(z)`` (+ penalties on ``q``)."""
        self._ensure()
        if self.vae is None:
            return objective(valid_batch, self.argmax()).detach()
        probs, chosen = self._decode(stochastic=True)
        value = objective(valid_batch, self._mixing(probs, chosen))
        eta = self.eta()
        novelty = self.novelty_term()
        self._novelty_value = float(novelty.detach())
        loss = (1 - eta) * value + eta * novelty
        extra = self._penalties(probs)
        if extra is not None:
            loss = loss + extra
        (grad,) = torch.autograd.grad(loss, [self.z], allow_unused=True)
        if grad is not None and self.reduce_grads is not None:  # data-parallel: ranks' mean
            self.z.grad = grad
            self.reduce_grads([self.z])
        if grad is not None and not bool(torch.isfinite(grad).all()):
            # A diverged supernet (a NaN loss): a step would make z NaN and the next decode
            # fail. z stays; the engine's nan_policy acts on the epoch's losses.
            return value.detach()
        self.z.grad = torch.zeros_like(self.z) if grad is None else grad.detach()
        if self.arch_clip is not None:
            nn.utils.clip_grad_norm_([self.z], self.arch_clip)
        self.optimizer.step()
        self.z.grad = None
        self.archive = torch.cat([self.archive, self.z.detach().reshape(1, -1)])[
            -self.archive_size :
        ]
        self._alpha_stale = True
        return value.detach()

    def weight_loss(self, loss: BatchLoss, batch: Any) -> Tensor:
        """Complementation: the three-way loss of ``a_cur``, ``a_prev`` and ``a_comp``."""
        cur = self.weight_mixing()
        prev, self.prev = self.prev, list(cur.choices)
        value = loss(batch, cur)
        if self.complementation == "off" or prev is None or len(prev) != len(cur.choices):
            return value
        comp = complement(prev, cur.choices, self._allowed())
        if self.complementation == "gradient":
            return three_way(
                value,
                loss(batch, self._hard(prev)),
                loss(batch, self._hard(comp)),
                self.complement_weight,
            )
        with torch.no_grad():
            others = loss(batch, self._hard(prev)), loss(batch, self._hard(comp))
        total = three_way(value.detach(), *others, self.complement_weight)
        return value + (total - value.detach())

    def _hard(self, choices: list[int | None]) -> SampledMixing:
        """The architecture ``choices`` (space order, None for fixed nodes) as constants."""
        return self._mixing(None, choices, straight=False).detach()

    def _allowed(self) -> list[list[int] | None]:
        """Per space node, the allowed flat entries (None for fixed nodes)."""
        return [
            None if i in self.space.fixed else list(self.table.entries[i - 1])
            for i in range(1, len(self.space.arch) + 1)
        ]

    # ------------------------------------------------------------------ hooks and state

    def prepare(self, progress: Progress | None = None) -> dict[str, float]:
        """Load or train the VAE for the space now, its training shown on ``progress``; its
        figures (training seconds, cached or not, held-out reconstruction) for the summary."""
        self._progress = progress
        try:
            self._ensure()
        finally:
            self._progress = None
        return {f"e2nas_vae_{k}": v for k, v in self.vae_info.items()}

    def on_space_change(self) -> None:
        """The space grew or was pruned: load (or train) the VAE for its new shape, re-encode
        ``z`` from the current genotype, and start the Adam on ``z`` afresh."""
        self._ensure()
        self.optimizer = self._adam()

    def start_epoch(self, epoch: int, epochs: int) -> None:
        super().start_epoch(epoch, epochs)
        self._ensure()

    def epoch_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {
            "e2nas_eta": self.eta(),
            "e2nas_novelty": self._novelty_value,
            "e2nas_archive": float(len(self.archive)),
        }
        if not self._reported_vae and self.vae_info:
            self._reported_vae = True
            metrics.update({f"e2nas_vae_{k}": float(v) for k, v in self.vae_info.items()})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "z": self.z.detach().clone(),
            "archive": self.archive.clone(),
            "prev": None if self.prev is None else [-1 if c is None else c for c in self.prev],
            "novelty": self._novelty_value,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure()
        if "z" in state:
            with torch.no_grad():
                self.z.copy_(state["z"])
        if "archive" in state:
            self.archive = state["archive"].to(self.z)
        if "prev" in state:
            prev = state["prev"]
            self.prev = None if prev is None else [None if c < 0 else int(c) for c in prev]
        self._novelty_value = float(state.get("novelty", 0.0))
        super().load_state_dict(state)
        self._sync_alpha()


def load_vae(
    table: Any, nz: int, hs: int, progress: Progress | None = None
) -> tuple[Any, dict[str, Any]]:
    """The frozen graph VAE for ``table`` (from the on-disk cache, or trained and cached), its
    training checks shown on ``progress`` as steps with the held-out reconstruction rate."""
    from morphnas.latent.cache import load_or_train

    if progress is None:
        return load_or_train(table, nz=nz, hs=hs)
    done = [0]

    def report(step: int, steps: int, accuracy: float) -> None:
        if not done[0]:
            progress.start(f"e2nas: training the graph VAE ({table.nodes} nodes)", steps)
        progress.advance(step - done[0], reconstruction=accuracy)
        done[0] = step

    try:
        return load_or_train(table, nz=nz, hs=hs, progress=report)
    finally:
        if done[0]:
            progress.stop()


def _reference(space: SearchSpace) -> Tensor:
    """A tensor of the space (its device and dtype for ``z``)."""
    if len(space.arch):
        return space.arch[0]
    return next(iter(space.parameters()))  # type: ignore[attr-defined]
