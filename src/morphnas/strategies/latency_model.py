"""LA-DNAS's learned latency predictor (methods.md §8): ``penalty: latency_mlp``.

The least-squares table of ``penalties`` prices each op alone; this predictor learns the latency
of a whole cell, interactions included, as LA-DNAS does, on a small scale:

1. **Timings.** ``samples`` distinct random discrete cells of the run's space (each searched node
   one (input, op) entry, the way ``measure_op_latency`` runs them: the space's sampled-op path,
   eval mode, no gradients) are timed at the run's input and hidden size, on ``steps`` steps of a
   batch of ``batch_size`` (64, the search's default batch, as for the table), on the space's
   device and the process's thread count. Timing noise is the enemy on a shared machine, so the
   cells are timed in ``repeats`` *rounds* (every cell once per round, after one warm-up round:
   a load that comes and goes hits all cells alike instead of a few) and each cell keeps its
   *fastest* round. Noise from other processes only ever adds time, so the minimum estimates
   the cell's own cost (as ``timeit`` advises); the median does not once the machine is
   oversubscribed long enough that most rounds of a cell are preempted. Measured on 2 shared
   cores at load 3: test relative error 2.3 % with the minimum, 10 % with the median.
2. **Encoding.** Per node (fixed nodes included, as their fixed op), the op one-hot, marginalised
   over the node's inputs (latency does not depend on which state a node reads); concatenated,
   followed by the op counts over the cell (a cell-level feature).
3. **Predictor.** An MLP (``depth`` linear layers, SiLU: smooth, so its gradient in the encoding
   is too) predicting ``log(latency / ref)``, trained by Adam on the squared log error (a
   relative error, symmetric in over- and under-estimates) with a validation split choosing the
   epoch; the mean relative error ``|ŷ − y| / y`` on a held-out test split is reported.
4. **Penalty.** Fed the strategy's ``cost_weights`` (softmax(α) for DARTS, the sampling
   probabilities for SNAS/GDAS, the gates for DNAL, each normalised per node), marginalised to
   the same per-node op distributions, and normalised as ``(ŷ − lo) / (hi − lo)`` with ``lo``,
   ``hi`` the fastest and slowest timed cell, so ``penalty_weight`` is dimensionless and means
   what it means for the table (the whole range of cells is worth about ``penalty_weight``).

The soft encoding is outside the one-hot training distribution (the spec's pitfall, §8 e). Our
choice: train on *mixup* points as well, convex combinations ``λ·e_a + (1 − λ)·e_b`` of two
timed cells with target ``λ·y_a + (1 − λ)·y_b``. When latency adds up over nodes (nearly so
for a sequential cell) that target is the expected latency of the per-node mixture the point
stands for, which is what the penalty means on soft weights; the MLP learns the interior of the
simplex instead of extrapolating into it. ``mixup = 0`` trains on one-hot cells only.

One predictor per (space structure, cell size, hidden size, device, threads, torch version,
settings), trained once and cached in ``$MORPHNAS_CACHE/latency`` (else
``~/.cache/morphnas/latency``), written atomically like E2NAS's VAE (``latent.cache``); a file
that does not load or does not match is retrained with a one-line warning. A growing search
fits (or loads) one more predictor per size it reaches; a checkpoint holds the predictors, so a
resumed search reuses them instead of timing again.
"""

from __future__ import annotations

import hashlib
import itertools
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from morphnas import caches
from morphnas.spaces.base import SampledMixing
from morphnas.strategies.penalties import _random_cell

FORMAT = "morphnas.latency-model"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Settings:
    """How a predictor is measured and trained (all part of its cache key)."""

    samples: int = 300  # distinct random cells timed (fewer when the space has fewer)
    repeats: int = 7  # timing rounds; each cell keeps its fastest
    steps: int = 16  # sequence length of the timed input
    batch_size: int = 64  # the search's default batch (the table's too)
    width: int = 64
    depth: int = 3  # linear layers
    epochs: int = 500  # full-batch Adam steps (the validation split picks the best)
    lr: float = 3e-3
    mixup: float = 1.0  # weight of the mixup term (0: one-hot cells only)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 8:
            raise ValueError(
                f"latency_samples must be >= 8 (train, validation and test cells), "
                f"got {self.samples!r}"
            )
        if self.repeats < 1:
            raise ValueError(f"latency_repeats must be >= 1, got {self.repeats!r}")


class LatencyMlp(nn.Module):
    """Seconds per step of a cell from its encoding; ``normalised`` is the penalty's scale."""

    def __init__(self, inputs: int, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        sizes = [inputs] + [width] * (depth - 1)
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(sizes[-1], 1))
        self.net = nn.Sequential(*layers)
        # ref: the median timed latency (the log target's unit); lo, hi: the timed range.
        for name in ("ref", "lo", "hi"):
            self.register_buffer(name, torch.tensor(1.0))

    def shape(self) -> dict[str, int]:
        """What rebuilds it: ``LatencyMlp(**shape())``."""
        linear = [m for m in self.net if isinstance(m, nn.Linear)]
        return {
            "inputs": linear[0].in_features,
            "width": linear[0].out_features,
            "depth": len(linear),
        }

    def forward(self, encoding: Tensor) -> Tensor:
        return self.ref * torch.exp(self.net(encoding).squeeze(-1))

    def normalised(self, encoding: Tensor) -> Tensor:
        """``(ŷ − lo) / (hi − lo)``: about 0 for the fastest timed cell, 1 for the slowest."""
        return (self(encoding) - self.lo) / (self.hi - self.lo).clamp(min=1e-12)


# --------------------------------------------------------------------------- encoding


def encode(per_node: Sequence[Tensor]) -> Tensor:
    """Per-node op distributions (each ``(n_ops,)``) → the predictor's input: concatenated, then
    the op counts over the cell. Linear, so a soft encoding is the expected one-hot encoding."""
    nodes = torch.stack(list(per_node))
    return torch.cat([nodes.reshape(-1), nodes.sum(0)])


def node_ops(weights: Tensor, n_ops: int) -> Tensor:
    """A node's weights over its ``α`` entries (last axis: ops) → its distribution over ops."""
    return weights.reshape(-1, n_ops).sum(0)


def encode_mixing(mixing: Sequence[Tensor], n_ops: int) -> Tensor:
    """The encoding of mixing weights over every node (a sample's one-hots, or soft weights)."""
    return encode([node_ops(w, n_ops) for w in mixing])


# --------------------------------------------------------------------------- timings


def _distinct_cells(space: Any, count: int, seed: int) -> list[SampledMixing]:
    """Up to ``count`` distinct random discrete cells (fewer when the space has fewer); the first
    ``n_ops`` cycle the ops so every op appears (``penalties._random_cell``)."""
    generator = torch.Generator().manual_seed(seed)
    n_ops = len(space.op_names)
    cells, seen = [], set()
    for s in range(20 * count):
        mixing, _ = _random_cell(space, generator, s if s < n_ops else -1)
        key = tuple(mixing.choices)
        if key not in seen:
            seen.add(key)
            cells.append(mixing)
            if len(cells) == count:
                break
    return cells


@torch.no_grad()
def time_cells(
    space: Any, cells: Sequence[SampledMixing], settings: Settings, progress: Any = None
) -> Tensor:
    """Seconds per step of each cell: its fastest of ``repeats`` rounds (module doc, 1)."""
    ref = next(space.parameters())
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(settings.steps, settings.batch_size, space.input_size, generator=generator)
    x = x.to(ref)
    sync = torch.cuda.synchronize if ref.device.type == "cuda" else (lambda: None)
    was_training = space.training
    space.eval()
    seconds = torch.zeros(settings.repeats, len(cells), dtype=torch.float64)
    if progress is not None:
        progress.start("timing random cells", settings.repeats + 1)
    try:
        for r in range(-1, settings.repeats):  # round -1 warms up
            for c, mixing in enumerate(cells):
                sync()
                start = time.perf_counter()
                space(x, weights=mixing)
                sync()
                if r >= 0:
                    seconds[r, c] = time.perf_counter() - start
            if progress is not None:
                progress.advance()
    finally:
        space.train(was_training)
        if progress is not None:
            progress.stop()
    return seconds.min(0).values / settings.steps


# --------------------------------------------------------------------------- training


def split(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Shuffled train / validation / test indices (70 / 15 / 15, each at least one)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = n_val = max(1, round(0.15 * n))
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def relative_error(model: LatencyMlp, x: Tensor, y: Tensor) -> float:
    """Mean ``|ŷ − y| / y``."""
    with torch.no_grad():
        return float(((model(x) - y).abs() / y).mean())


def train_predictor(x: Tensor, y: Tensor, settings: Settings) -> tuple[LatencyMlp, dict]:
    """Fit an MLP to encodings ``x`` and latencies ``y`` (module doc, 3); ``info`` holds the
    test and train relative errors, the error of always predicting the median (what the MLP
    must beat), the sizes of the splits and the seconds spent."""
    start = time.perf_counter()
    x, y = x.float(), y.float()
    train, val, test = split(len(y), settings.seed)
    torch.manual_seed(settings.seed)
    model = LatencyMlp(x.shape[1], settings.width, settings.depth)
    model.ref.fill_(float(y[train].median()))
    model.lo.fill_(float(y.min()))
    model.hi.fill_(float(y.max()))
    optimizer = torch.optim.Adam(model.net.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    target = torch.log(y / model.ref)
    best, best_state = float("inf"), None
    for epoch in range(settings.epochs):
        loss = ((model.net(x[train]).squeeze(-1) - target[train]) ** 2).mean()
        if settings.mixup > 0:
            loss = loss + settings.mixup * _mixup_loss(model, x[train], y[train], generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if epoch % 25 == 0 or epoch == settings.epochs - 1:
            score = relative_error(model, x[val], y[val])
            if score < best:
                best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None  # the last epoch is always scored
    model.load_state_dict(best_state)
    baseline = float(((y[train].median() - y[test]).abs() / y[test]).mean())
    info = {
        "test_error": relative_error(model, x[test], y[test]),
        "train_error": relative_error(model, x[train], y[train]),
        "median_error": baseline,
        "samples": len(y),
        "test_samples": len(test),
        "train_seconds": time.perf_counter() - start,
    }
    return freeze(model), info


def _mixup_loss(model: LatencyMlp, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
    """Squared log error on convex combinations of random pairs (module doc, the pitfall)."""
    n = len(y)
    a, b = torch.randint(n, (2, n), generator=generator)
    lam = torch.rand(n, generator=generator)
    mixed_x = lam[:, None] * x[a] + (1 - lam[:, None]) * x[b]
    mixed_y = lam * y[a] + (1 - lam) * y[b]
    return ((model.net(mixed_x).squeeze(-1) - torch.log(mixed_y / model.ref)) ** 2).mean()


def freeze(model: LatencyMlp) -> LatencyMlp:
    """Eval mode and no weight gradients: the penalty differentiates through it, never trains it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fit(space: Any, settings: Settings, progress: Any = None) -> tuple[LatencyMlp, dict]:
    """Time random cells of ``space`` as it is now, train the predictor on them."""
    start = time.perf_counter()
    cells = _distinct_cells(space, settings.samples, settings.seed)
    y = time_cells(space, cells, settings, progress)
    n_ops = len(space.op_names)
    x = torch.stack([encode_mixing(c, n_ops) for c in cells]).cpu()
    timing = time.perf_counter() - start
    model, info = train_predictor(x, y, settings)
    ref = next(space.parameters())
    return model.to(ref.device), {**info, "timing_seconds": timing}


# --------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    """``$MORPHNAS_CACHE/latency`` if ``MORPHNAS_CACHE`` is set, else
    ``~/.cache/morphnas/latency``."""
    return caches.cache_dir("latency")


def device_label(device: torch.device) -> str:
    """The hardware a timing belongs to: the GPU's name, else the CPU model."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        model = names[0] if names else model
    except OSError:
        pass
    return f"cpu:{model}"


def cache_key(space: Any, settings: Settings) -> str:
    """Everything latency depends on: the supernet's structure (its module tree, which names
    every layer and size), the searched entries, the fixed nodes, the device, the thread count,
    torch's version, and the settings."""
    ref = next(space.parameters())
    parts = [
        repr(space),
        str([tuple(a.shape) for a in space.arch]),
        str(sorted((i, str(node)) for i, node in space.fixed.items())),
        str(tuple(space.op_names)),
        device_label(ref.device),
        f"threads={torch.get_num_threads()}",
        f"torch={torch.__version__}",
        str(sorted(asdict(settings).items())),
        f"v{FORMAT_VERSION}",
    ]
    return "|".join(parts)


def cache_path(space: Any, settings: Settings) -> Path:
    digest = hashlib.sha256(cache_key(space, settings).encode()).hexdigest()[:16]
    name = type(space).__name__.lower()
    return cache_dir() / f"{name}-{len(space.arch)}n-{space.hidden_size}h-{digest}.pt"


def load_or_fit(
    space: Any,
    settings: Settings,
    *,
    progress: Any = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[LatencyMlp, dict]:
    """The predictor of ``space`` at its current size: from the cache when a matching file is
    there, else timed, trained and saved (``info["cached"]`` says which)."""
    warn = warn or _default_warn
    path = cache_path(space, settings)
    key = cache_key(space, settings)
    if path.exists():
        loaded = _load(path, key, settings, warn)
        if loaded is not None:
            return loaded[0].to(next(space.parameters()).device), loaded[1]
    model, info = fit(space, settings, progress)
    info = {**info, "path": str(path), "cached": False}
    try:
        _save(path, key, model, info)
    except OSError as err:
        warn(f"latency_mlp: could not cache the predictor at {path} ({err}); using it unsaved")
    return model, info


def _default_warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _save(path: Path, key: str, model: LatencyMlp, info: dict[str, Any]) -> None:
    """Write the predictor, its key and its figures atomically (``caches.save_atomic``)."""
    blob = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": key,
        "inputs": model.net[0].in_features,
        "info": {k: v for k, v in info.items() if isinstance(v, int | float)},
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
    }
    caches.save_atomic(blob, path)


def _load(
    path: Path, key: str, settings: Settings, warn: Callable[[str], None]
) -> tuple[LatencyMlp, dict] | None:
    """The cached predictor, or ``None`` after one warning (unreadable, or not this key's)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: truncated, garbage, another pickle
        warn(
            f"latency_mlp: cached predictor {path.name} is unreadable ({type(err).__name__}); "
            "retraining"
        )
        return None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        warn(f"latency_mlp: {path.name} is not a latency predictor; retraining")
        return None
    if blob.get("version") != FORMAT_VERSION or blob.get("key") != key:
        warn(f"latency_mlp: cached predictor {path.name} is for another space/size; retraining")
        return None
    try:
        model = LatencyMlp(int(blob["inputs"]), settings.width, settings.depth)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        warn(
            f"latency_mlp: cached predictor {path.name} has unusable weights "
            f"({type(err).__name__}); retraining"
        )
        return None
    info = {**blob.get("info", {}), "path": str(path), "cached": True}
    return freeze(model), info


# --------------------------------------------------------------------------- the penalty


class LatencyModelPenalty:
    """``penalty: latency_mlp``: the predicted, normalised latency of the soft cell (module doc,
    4), one predictor per cell size, fitted or loaded when the search first reaches the size."""

    def __init__(self, space: Any, settings: Settings | None = None) -> None:
        if getattr(space, "modality", "sequences") != "sequences":
            raise ValueError(
                "penalty latency_mlp times recurrent cells on sequences; use params or flops "
                f"with the {getattr(space, 'modality', '?')} space "
                f"{getattr(space, 'space', type(space).__name__)}"
            )
        self.space = space
        self.settings = settings or Settings()
        self._models: dict[str, LatencyMlp] = {}
        self.info: dict[str, dict[str, Any]] = {}  # size -> what fitting or loading it gave

    def size(self) -> str:
        """The key of the space's current size (nodes × hidden): one predictor per size."""
        return f"{len(self.space.arch)}x{self.space.hidden_size}"

    def predictor(self, progress: Any = None) -> LatencyMlp:
        """The predictor of the space's current size (nodes × hidden)."""
        size = self.size()
        if size not in self._models:
            self._models[size], self.info[size] = load_or_fit(
                self.space, self.settings, progress=progress
            )
        device = next(self.space.parameters()).device
        self._models[size] = self._models[size].to(device)
        return self._models[size]

    def encoding(self, weights: Sequence[Tensor]) -> Tensor:
        """The encoding of the searched nodes' ``weights`` (in ``arch_parameters`` order) with
        the fixed nodes as their fixed op."""
        n_ops = len(self.space.op_names)
        searched = iter(weights)
        current: list[Tensor] | None = None
        per_node = []
        for i in range(1, len(self.space.arch) + 1):
            if i in self.space.fixed:
                current = current or self.space.mixing_weights()
                per_node.append(node_ops(current[i - 1].detach(), n_ops))
            else:
                per_node.append(node_ops(next(searched), n_ops))
        return encode(per_node)

    def expected(self, weights: Sequence[Tensor], alphas: Sequence[Tensor]) -> Tensor:
        """The normalised predicted latency, differentiable in ``weights`` (shaped like
        ``alphas``, as for ``CostPenalty.expected``)."""
        if not alphas:
            return torch.zeros(())
        model = self.predictor()
        encoding = self.encoding(weights).to(model.ref.dtype)
        return model.normalised(encoding).to(alphas[0].dtype)

    def state_dict(self) -> dict[str, Any]:
        """The predictors: a resumed search must reuse them, not time again."""
        return {
            "latency_mlp": {
                size: {
                    **model.shape(),
                    "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                }
                for size, model in self._models.items()
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for size, saved in state.get("latency_mlp", {}).items():
            model = LatencyMlp(int(saved["inputs"]), int(saved["width"]), int(saved["depth"]))
            model.load_state_dict(saved["state_dict"])
            self._models[size] = freeze(model)
            self.info[size] = {"cached": True}
