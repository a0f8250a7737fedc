"""The one-shot search loop: alternate an architecture step on valid and a weight step on train,
growing (and pruning) the backbone between epochs when a growth mode is on.

The loop can stop at any step boundary and continue exactly: its checkpoint holds the weights,
the backbone's shape, both optimizers, the strategy's and the growth policy's state, every random
state and the position inside the epoch (``engine.state.SEARCH``; resumed via ``engine.resume``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from morphnas.config import GrowthConfig, SearchConfig
from morphnas.engine.checkpoint import load, save_atomic
from morphnas.engine.faults import crash_point
from morphnas.engine.graphs import graphed_search
from morphnas.engine.loops import draw_epoch
from morphnas.engine.parallel import Group
from morphnas.engine.progress import Progress, Silent
from morphnas.engine.resume import (
    StopFlag,
    StopRequested,
    reason,
    reshape_space,
    restore_rng,
    rng_state,
    space_shape,
)
from morphnas.engine.state import SEARCH, SearchProgress
from morphnas.errors import UserError
from morphnas.genotype import Genotype
from morphnas.growth import Growth, GrowthEvent
from morphnas.optim import rebuild_optimizer
from morphnas.run_files import MetricsLog, write_json
from morphnas.strategies import Objective, Strategy
from morphnas.strategies.base import detach_mixing
from morphnas.tasks.base import Task

NAN_RETRIES = 3


@dataclass(frozen=True)
class SearchOutcome:
    genotype: Genotype
    seconds: float
    valid_loss: float
    cpu_seconds: float  # process CPU time: robust to other jobs sharing the machine
    epochs: int
    events: list[GrowthEvent] = field(default_factory=list)


def _weights(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable weight of the model: all but the space's architecture parameters (its
    parameters outside ``weight_parameters()``: ``α``, fixed or searched, and darts_cnn's
    edge-normalisation ``β``)."""
    own = {id(p) for p in model.cell.weight_parameters()}
    arch_ids = {id(p) for p in model.cell.parameters()} - own
    return [p for p in model.parameters() if id(p) not in arch_ids]


def streamed_fraction(stream: int, epoch: int, epochs: int) -> float:
    """Share of the training span available at ``epoch`` when it arrives in ``stream`` chunks.

    Chunk ``k`` arrives at the start of epoch ``⌈(k−1)·E/K⌉ + 1``, so the first epoch sees one
    chunk and the last epochs the whole span.
    """
    return min(stream, max(1, math.ceil(stream * epoch / epochs))) / stream


def search(
    model: nn.Module,
    strategy: Strategy,
    task: Task,
    config: SearchConfig,
    *,
    seed: int,
    log: MetricsLog,
    checkpoint_dir: Path,
    growth: GrowthConfig | None = None,
    nodes_max: int | None = None,
    history_path: Path | None = None,
    progress: Progress | None = None,
    resume: dict[str, Any] | None = None,
    stamp: dict[str, Any] | None = None,
    stop: StopFlag | None = None,
    group: Group | None = None,
) -> SearchOutcome:
    """Bilevel search: weights learn on the task's training batches, architecture parameters on
    its validation stream.

    Each iteration first lets the strategy update the architecture on a validation batch, then
    takes one weight step on a training batch under the strategy's (detached) mixing weights, as
    the DARTS code does; with ``config.weight_steps`` n > 1 the architecture steps on every n-th
    batch of an epoch only (the first, the (n+1)-th, …), so n weight steps follow each; a strategy
    may schedule its own (``Strategy.wants_arch_step``: DARTS-PRIME's, driven by the weights'
    gradient norms, which ``observe_weight_grad`` reports after every weight backward). The
    first ``config.warmup_epochs`` epochs take weight steps only: parametric ops learn before
    they compete with parameter-free ones, whose output is useful from the first step. After
    every epoch: the full validation loss, the mixing probabilities (and what the strategy
    measured, ``epoch_metrics``) in ``metrics.jsonl``, a checkpoint (``last``, and ``best`` by
    validation loss) and, with growth on, the growth trigger; every growth or prune event goes
    to ``history.json``.

    ``resume``: a checkpoint of this search (``search_last.pt``); the model must have been built
    at the checkpoint's width. ``stamp``: the run's id, saved in every checkpoint under ``run``
    (``runs.start_record``), so that a checkpoint of another run is refused on resume.
    ``stop``: when raised (SIGINT/SIGTERM), the loop saves a checkpoint after the current step
    and raises ``StopRequested``. A non-finite loss stops the run (``config.nan_policy =
    "stop"``) or restarts from the last checkpoint at half the learning rates (``"retry"``, at
    most three times).

    ``group``: this process's place in a data-parallel search (``engine.parallel``): batches
    are shared out, gradients and decisions agree on every rank, and only rank 0 writes.
    """
    session = _Session(
        seed=seed,
        log=log,
        checkpoint_dir=checkpoint_dir,
        growth=growth or GrowthConfig(),
        nodes_max=nodes_max,
        history_path=history_path,
        progress=progress or Silent(),
        stamp=stamp,
        stop=stop,
        group=group,
    )
    loop = _SearchLoop(model, strategy, task, config, session)
    if resume is not None:
        loop.resume(resume)
    with graphed_search(
        model.cell, config.cuda_graphs, hypergradient=strategy.hypergradient
    ) as graphed:
        outcome = loop.run()
    if graphed is not None:
        log.append(
            {
                "phase": "search",
                "event": "cuda-graphs",
                "epoch": config.epochs,
                "captures": graphed.captures,
                "replays": graphed.replays,
                "failed": graphed.failed,
            }
        )
    return outcome


@dataclass(frozen=True)
class _Session:
    """What ``search`` hands its loop besides the model, strategy, task and config, with its
    defaults filled in: the seed, where the session writes, the growth settings, and how it
    reports progress and is asked to stop. One object, so the public signature is the only
    place that lists these."""

    seed: int
    log: MetricsLog
    checkpoint_dir: Path
    growth: GrowthConfig
    nodes_max: int | None
    history_path: Path | None
    progress: Progress
    stamp: dict[str, Any] | None
    stop: StopFlag | None
    group: Group | None


class _SearchLoop:
    """The search's state between steps, held as attributes so that ``restore`` (a resume or a
    NaN retry) can replace the optimizer and the weight list that the steps and the objective
    read; ``counters`` are the numbers a checkpoint carries (``engine.state.SEARCH``)."""

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        task: Task,
        config: SearchConfig,
        session: _Session,
    ) -> None:
        self.model, self.strategy, self.task, self.config = model, strategy, task, config
        self.space = model.cell
        self.log, self.progress = session.log, session.progress
        self.stamp, self.stop, self.group = session.stamp, session.stop, session.group
        if self.group is not None:
            strategy.reduce_grads = self.group.average_grads
        checkpoint_dir, seed = session.checkpoint_dir, session.seed
        self.checkpoint_dir, self.history_path = checkpoint_dir, session.history_path
        self.last_path = checkpoint_dir / "search_last.pt"
        self.generator = torch.Generator().manual_seed(seed)
        self.valid_stream = task.valid_stream(self.generator)
        model_input, cell_input = task.probe()
        self.grower = Growth(
            model,
            session.growth,
            config.epochs,
            session.nodes_max or self.space.nodes,
            probe=model_input,
            cell_probe=cell_input,
            valid_loss=lambda: self.agreed(task.valid_loss(model, weights=_mixing(strategy))),
            seed=seed,
        )
        # The strategies' view of the loss: batch_loss, plus a pure function of (weights, α) for
        # the bilevel methods; the weights are read at each step (growth replaces the list).
        self.objective = Objective(model, self.batch_loss, lambda: self.weights)
        self.objective.full_valid_loss = lambda mix: self.agreed(
            task.valid_loss(model, weights=mix)
        )
        self.weights = _weights(model)
        self.optimizer = torch.optim.Adam(
            self.weights, lr=config.lr, weight_decay=config.weight_decay
        )
        self.counters = SearchProgress()
        self.epoch_start = self.generator.get_state()
        self.saved_epoch: dict[str, Any] | None = None  # a checkpoint inside the epoch to continue
        self.started = self.started_cpu = 0.0  # this session's clocks, set by ``run``

    def batch_loss(self, batch: Any, mixing: list[Tensor]) -> Tensor:
        """The task's loss on one batch under ``mixing``: the weight step's and the strategies'."""
        if self.group is not None:
            return self.group.loss(self.task, self.model, batch, mixing)
        return self.task.loss(self.model, batch, weights=mixing)

    def agreed(self, value: float) -> float:
        """A loss every rank decides from: its mean over the ranks (itself in one process)."""
        return value if self.group is None else self.group.mean(value)

    def stopping(self) -> bool:
        """Whether a stop was asked for (on any rank: all stop after the same step)."""
        requested = self.stop is not None and self.stop.requested
        return requested if self.group is None else self.group.any(requested)

    def save(self, state: dict[str, Any], path: Path) -> None:
        """Write a checkpoint: rank 0's job in a data-parallel search."""
        if self.group is None or self.group.main:
            save_atomic(state, path)

    def seconds(self) -> float:
        """Wall seconds of the whole search, earlier sessions included."""
        return self.counters.elapsed + time.perf_counter() - self.started

    def checkpoint(self, position: int | None, totals: tuple[Tensor, int]) -> dict[str, Any]:
        """Everything needed to continue; ``position`` None: the epoch is complete."""
        counters = replace(
            self.counters,
            position=position,
            elapsed=self.seconds(),
            cpu=self.counters.cpu + time.process_time() - self.started_cpu,
        )
        return SEARCH.build(
            self.stamp,
            counters,
            totals=[totals[0].detach().cpu(), totals[1]],
            model=self.model.state_dict(),
            shape=space_shape(self.space),
            optimizer=self.optimizer.state_dict(),
            strategy=self.strategy.state_dict(),
            growth=self.grower.state_dict(),
            task=self.task.state_dict(),
            rng=rng_state(),
            generator=self.generator.get_state(),
            epoch_generator=self.epoch_start,
            valid_stream=self.valid_stream.state_dict(),
            processes=self.processes,
        )

    def restore(self, state: dict[str, Any], lr_scale: float = 1.0) -> None:
        """Load a checkpoint; ``lr_scale`` scales both learning rates (a NaN retry)."""
        config = self.config
        reshape_space(self.space, state["shape"])
        self.model.load_state_dict(state["model"])
        self.weights = _weights(self.model)
        self.optimizer = torch.optim.Adam(
            self.weights, lr=config.lr, weight_decay=config.weight_decay
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.on_space_change()
        self.strategy.load_state_dict(state["strategy"])
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_scale
        if lr_scale != 1.0:
            self.strategy.scale_lr(lr_scale)
        self.grower.load_state_dict(state["growth"])
        self.task.load_state_dict(state["task"])
        restore_rng(state["rng"])
        self.generator.set_state(state["generator"])
        self.valid_stream.load_state_dict(state["valid_stream"])
        self.saved_epoch = state if self.counters.resume(state) else None

    @property
    def processes(self) -> int:
        """How many processes share each batch (a data-parallel search's ranks)."""
        return 1 if self.group is None else self.group.size

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; one that does not fit this search is a ``UserError``, as is
        another process count (each rank's batch is a share of the global batch, so the global
        batch, and with it the search, would change)."""
        saved = state.get("processes", 1)
        if saved != self.processes:
            launch = "without torchrun" if saved == 1 else f"with torchrun --nproc_per_node {saved}"
            raise UserError(
                f"{self.last_path} was written by a search on {saved} process(es), not "
                f"{self.processes}: another count changes the global batch; resume it {launch}"
            )
        try:
            self.restore(state)
        except UserError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            raise UserError(
                f"{self.last_path} does not fit the search this run builds ({reason(err)}): it "
                "was edited, or comes from another configuration; start the run again with --force"
            ) from None

    def run(self) -> SearchOutcome:
        """The epochs from ``counters.epoch`` on, each closed by validation, logging, growth and
        a checkpoint; a non-finite loss goes to ``retry`` and redoes the epoch."""
        config, counters = self.config, self.counters
        self.started, self.started_cpu = time.perf_counter(), time.process_time()
        while counters.epoch <= config.epochs:
            epoch = counters.epoch
            warming = epoch <= config.warmup_epochs
            total, count = self.train_epoch(epoch, warming)
            counters.position = 0
            train_loss = float(total) / count
            valid_loss = self.agreed(
                self.task.valid_loss(self.model, weights=_mixing(self.strategy))
            )
            if not (math.isfinite(train_loss) and math.isfinite(valid_loss)):
                self.retry(epoch, train_loss, valid_loss)
                continue
            counters.valid_loss = valid_loss
            self.log_epoch(epoch, train_loss, valid_loss, count, warming)
            self.check_replicas(epoch)
            self.grow(epoch, valid_loss)
            improved = valid_loss < counters.best
            counters.best = min(counters.best, valid_loss)
            state = self.checkpoint(None, (total, count))
            self.save(state, self.last_path)
            if improved:
                self.save(state, self.checkpoint_dir / "search_best.pt")
            if self.stopping() and epoch < config.epochs:
                raise StopRequested(str(self.last_path))
            counters.epoch += 1
        return SearchOutcome(
            genotype=self.strategy.derive(),
            seconds=self.seconds(),
            cpu_seconds=counters.cpu + time.process_time() - self.started_cpu,
            valid_loss=counters.valid_loss,
            epochs=config.epochs,
            events=list(self.grower.events),
        )

    def train_epoch(self, epoch: int, warming: bool) -> tuple[Tensor, int]:
        """The epoch's steps from ``counters.position`` on; its running loss sum and count. A
        stop request saves a checkpoint after the current step and raises ``StopRequested``."""
        config, space, progress = self.config, self.space, self.progress
        self.model.train()
        self.strategy.start_epoch(epoch, config.epochs)
        fraction = streamed_fraction(config.stream, epoch, config.epochs)
        device = next(self.model.parameters()).device
        epoch_batches, self.epoch_start, total, count = draw_epoch(
            self.task, self.generator, device, fraction, self.saved_epoch
        )
        self.saved_epoch = None
        first = self.counters.position
        # Warm-up: the weights learn under the initial mixture before α moves (a function of
        # the epoch alone, so a resumed run warms up exactly as long).
        searching = bool(space.arch_parameters()) and not warming
        progress.start(
            f"search epoch {epoch}/{config.epochs} ({space.nodes} nodes"
            f"{', warm-up' if warming else ''})",
            len(epoch_batches),
        )
        progress.advance(first)
        for k in range(first, len(epoch_batches)):
            batch = epoch_batches[k]
            if searching and self.strategy.wants_arch_step(k, config.weight_steps):
                self.strategy.arch_step(self.objective, batch, next(self.valid_stream))
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.strategy.weight_loss(self.batch_loss, batch)
            loss.backward()
            if self.group is not None:
                self.group.average_grads(self.weights)
            # The norm before clipping, of the averaged gradients: every rank sees the same.
            norm = nn.utils.clip_grad_norm_(self.weights, config.clip)
            if torch.isfinite(norm):
                self.strategy.observe_weight_grad(float(norm) ** 2)
                self.optimizer.step()
            elif torch.isfinite(loss):
                # One sampled cell's gradient overflowed (a hard sample of an unbounded cell,
                # GDAS/E2NAS/random): clipping an infinite norm would make every weight NaN.
                # The step is skipped, as a loss scaler skips one; a NaN loss is left to
                # nan_policy at the epoch's end.
                self.log.append(
                    {"phase": "search", "event": "skipped-step", "epoch": epoch, "batch": k}
                )
            size = self.task.batch_weight(batch)
            total, count = total + loss.detach() * size, count + size
            self.counters.step += 1
            progress.advance()
            crash_point("step")
            if self.stopping() and k + 1 < len(epoch_batches):
                progress.stop()
                self.save(self.checkpoint(k + 1, (total, count)), self.last_path)
                raise StopRequested(str(self.last_path))
        progress.stop()
        return total, count

    def retry(self, epoch: int, train_loss: float, valid_loss: float) -> None:
        """A non-finite loss: go back to the last checkpoint at lower learning rates, or stop."""
        _check_retry(
            self.config, self.counters.retries, epoch, train_loss, valid_loss, self.last_path
        )
        retries, state = self.counters.retries, load(self.last_path)
        # Halve the rates for every retry since the checkpoint we go back to.
        scale = 0.5 ** (retries - state["retries"] + 1)
        self.restore(state, lr_scale=scale)
        self.counters.retries = retries + 1
        self.log.append(
            {"phase": "search", "event": "nan-retry", "epoch": epoch, "lr_scale": scale}
        )

    def log_epoch(
        self, epoch: int, train_loss: float, valid_loss: float, count: int, warming: bool
    ) -> None:
        """The epoch's row of ``metrics.jsonl``: losses, size, mixing weights, strategy metrics."""
        self.log.append(
            {
                "phase": "search",
                "epoch": epoch,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "seconds": self.seconds(),
                "nodes": self.space.nodes,
                "train_windows": count,
                **({"warmup": True} if warming else {}),
                "arch": [
                    w.detach().reshape(-1, w.shape[-1]).tolist()
                    for w in self.space.mixing_weights()
                ],
                **self.strategy.epoch_metrics(),
            }
        )

    def check_replicas(self, epoch: int) -> None:
        """Data-parallel: every rank's checksum of weights and ``α`` into the log; ranks that
        disagree are a bug (a rank-dependent decision or random draw), stopped here."""
        if self.group is None:
            return
        sums = self.group.checksums(self.model)
        self.log.append({"phase": "search", "event": "replicas", "epoch": epoch, "checksums": sums})
        if len(set(sums)) > 1:
            raise RuntimeError(f"data-parallel ranks diverged at epoch {epoch}: {sums}")

    def grow(self, epoch: int, valid_loss: float) -> None:
        """The growth policy's turn after an epoch (and its last word after the last one); a
        changed supernet gets a rebuilt optimizer and its events go to ``history.json``."""
        step = self.counters.step
        changed = self.grower.after_epoch(epoch, step, valid_loss)
        if epoch == self.config.epochs:
            changed = self.grower.finish(epoch, step, valid_loss) or changed
        if changed:
            crash_point("growth")
            self.weights = _weights(self.model)
            self.optimizer = rebuild_optimizer(self.optimizer, self.weights)
            if self.space.arch_parameters():
                self.strategy.on_space_change()
            if self.history_path is not None:
                write_json(self.history_path, [event.to_dict() for event in self.grower.events])


def _mixing(strategy: Strategy) -> list[Tensor]:
    """The deterministic mixing weights the supernet is scored with, as constants."""
    return detach_mixing(strategy.eval_mixing())


def _check_retry(
    config: SearchConfig,
    retries: int,
    epoch: int,
    train_loss: float,
    valid_loss: float,
    last_path: Path,
) -> None:
    """A non-finite loss: return if the policy allows a retry from the last checkpoint, else
    stop the run with a message that says where the last good state is."""
    if config.nan_policy == "retry" and retries < NAN_RETRIES and last_path.exists():
        return
    what = f"training loss {train_loss:.4g}, validation loss {valid_loss:.4g}"
    usable = f"the last good checkpoint is {last_path}" if last_path.exists() else "no checkpoint"
    rates = (
        f"--set search.lr=VALUE (now {config.lr:g}) and --set search.arch_lr=VALUE (now "
        f"{config.arch_lr:g})"
    )
    advice = (
        f"lower the learning rates ({rates}) or use --nan-policy retry"
        if config.nan_policy == "stop"
        else f"{retries} retries at lower learning rates did not help; lower them ({rates})"
    )
    raise UserError(
        f"the search diverged at epoch {epoch} ({what}); {usable}; {advice}, or change the seed"
    )
