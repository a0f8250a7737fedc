"""The one-shot search loop: alternate an architecture step on valid and a weight step on train,
growing (and pruning) the backbone between epochs when a growth mode is on.

The loop can stop at any step boundary and continue exactly: its checkpoint holds the weights,
the backbone's shape, both optimizers, the strategy's and the growth policy's state, every random
state and the position inside the epoch (see ``engine.resume``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from morphnas.config import GrowthConfig, SearchConfig
from morphnas.engine.checkpoint import load, save_atomic
from morphnas.engine.faults import crash_point
from morphnas.engine.loops import draw_epoch
from morphnas.engine.progress import Progress, Silent
from morphnas.engine.resume import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    StopFlag,
    StopRequested,
    reason,
    reshape_space,
    restore_rng,
    rng_state,
    space_shape,
)
from morphnas.errors import UserError
from morphnas.genotype import Genotype
from morphnas.growth import Growth, GrowthEvent
from morphnas.optim import rebuild_optimizer
from morphnas.report import MetricsLog, write_json
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
    """Every trainable weight of the model: all but the space's architecture parameters."""
    arch_ids = {id(p) for p in model.cell.arch}
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
) -> SearchOutcome:
    """Bilevel search: weights learn on the task's training batches, architecture parameters on
    its validation stream.

    Each iteration first lets the strategy update the architecture on a validation batch, then
    takes one weight step on a training batch under the strategy's (detached) mixing weights, as
    the DARTS code does; with ``config.weight_steps`` n > 1 the architecture steps on every n-th
    batch of an epoch only (the first, the (n+1)-th, …), so n weight steps follow each. The
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
    """
    progress = progress or Silent()
    growth = growth or GrowthConfig()
    space = model.cell
    last_path = checkpoint_dir / "search_last.pt"
    generator = torch.Generator().manual_seed(seed)
    valid_stream = task.valid_stream(generator)
    model_input, cell_input = task.probe()
    grower = Growth(
        model,
        growth,
        config.epochs,
        nodes_max or space.nodes,
        probe=model_input,
        cell_probe=cell_input,
        valid_loss=lambda: task.valid_loss(model, weights=_mixing(strategy)),
        seed=seed,
    )

    def batch_loss(batch: Any, mixing: list[Tensor]) -> Tensor:
        return task.loss(model, batch, weights=mixing)

    # The strategies' view of the loss: batch_loss, plus a pure function of (weights, α) for the
    # bilevel methods; the weights are read at each step (growth replaces the list).
    objective = Objective(model, batch_loss, lambda: weights)
    objective.full_valid_loss = lambda mixing: task.valid_loss(model, weights=mixing)

    weights = _weights(model)
    optimizer = torch.optim.Adam(weights, lr=config.lr, weight_decay=config.weight_decay)
    run: dict[str, Any] = {
        "epoch": 1, "position": 0, "step": 0, "best": math.inf, "elapsed": 0.0, "cpu": 0.0,
        "valid_loss": math.nan, "retries": 0,
    }  # fmt: skip
    epoch_start = generator.get_state()
    saved_epoch: dict[str, Any] | None = None  # a checkpoint from inside the epoch to continue

    def checkpoint(position: int | None, totals: tuple[Tensor, int], started: float) -> dict:
        """Everything needed to continue; ``position`` None: the epoch is complete."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": "search",
            "run": stamp,
            **{k: run[k] for k in ("epoch", "step", "best", "valid_loss", "retries")},
            "position": position,
            "elapsed": run["elapsed"] + time.perf_counter() - started,
            "cpu": run["cpu"] + time.process_time() - started_cpu,
            "totals": [totals[0].detach().cpu(), totals[1]],
            "model": model.state_dict(),
            "shape": space_shape(space),
            "optimizer": optimizer.state_dict(),
            "strategy": strategy.state_dict(),
            "growth": grower.state_dict(),
            "task": task.state_dict(),
            "rng": rng_state(),
            "generator": generator.get_state(),
            "epoch_generator": epoch_start,
            "valid_stream": valid_stream.state_dict(),
        }

    def restore(state: dict[str, Any], lr_scale: float = 1.0) -> None:
        nonlocal weights, optimizer, saved_epoch
        reshape_space(space, state["shape"])
        model.load_state_dict(state["model"])
        weights = _weights(model)
        optimizer = torch.optim.Adam(weights, lr=config.lr, weight_decay=config.weight_decay)
        optimizer.load_state_dict(state["optimizer"])
        strategy.on_space_change()
        strategy.load_state_dict(state["strategy"])
        for group in optimizer.param_groups:
            group["lr"] *= lr_scale
        if lr_scale != 1.0:
            strategy.scale_lr(lr_scale)
        grower.load_state_dict(state["growth"])
        task.load_state_dict(state["task"])
        restore_rng(state["rng"])
        generator.set_state(state["generator"])
        valid_stream.load_state_dict(state["valid_stream"])
        complete = state["position"] is None
        run.update(
            {k: state[k] for k in ("step", "best", "valid_loss", "elapsed", "retries")},
            cpu=state.get("cpu", 0.0),
            epoch=state["epoch"] + 1 if complete else state["epoch"],
            position=0 if complete else state["position"],
        )
        saved_epoch = None if complete else state

    if resume is not None:
        try:
            restore(resume)
        except UserError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            raise UserError(
                f"{last_path} does not fit the search this run builds ({reason(err)}): it was "
                "edited, or comes from another configuration; start the run again with --force"
            ) from None
    started, started_cpu = time.perf_counter(), time.process_time()
    while run["epoch"] <= config.epochs:
        epoch = run["epoch"]
        model.train()
        strategy.start_epoch(epoch, config.epochs)
        fraction = streamed_fraction(config.stream, epoch, config.epochs)
        device = next(model.parameters()).device
        epoch_batches, epoch_start, total, count = draw_epoch(
            task, generator, device, fraction, saved_epoch
        )
        saved_epoch = None
        first = run["position"]
        # Warm-up: the weights learn under the initial mixture before α moves (a function of
        # the epoch alone, so a resumed run warms up exactly as long).
        warming = epoch <= config.warmup_epochs
        searching = bool(space.arch_parameters()) and not warming
        progress.start(
            f"search epoch {epoch}/{config.epochs} ({space.nodes} nodes"
            f"{', warm-up' if warming else ''})",
            len(epoch_batches),
        )
        progress.advance(first)
        for k in range(first, len(epoch_batches)):
            batch = epoch_batches[k]
            if searching and k % config.weight_steps == 0:
                strategy.arch_step(objective, batch, next(valid_stream))
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(batch, strategy.weight_mixing())
            loss.backward()
            nn.utils.clip_grad_norm_(weights, config.clip)
            optimizer.step()
            size = task.batch_weight(batch)
            total, count = total + loss.detach() * size, count + size
            run["step"] += 1
            progress.advance()
            crash_point("step")
            if stop is not None and stop.requested and k + 1 < len(epoch_batches):
                progress.stop()
                save_atomic(checkpoint(k + 1, (total, count), started), last_path)
                raise StopRequested(str(last_path))
        progress.stop()
        run["position"] = 0
        train_loss = float(total) / count
        valid_loss = task.valid_loss(model, weights=_mixing(strategy))
        if not (math.isfinite(train_loss) and math.isfinite(valid_loss)):
            _check_retry(config, run["retries"], epoch, train_loss, valid_loss, last_path)
            retries, state = run["retries"], load(last_path)
            # Halve the rates for every retry since the checkpoint we go back to.
            scale = 0.5 ** (retries - state["retries"] + 1)
            restore(state, lr_scale=scale)
            run["retries"] = retries + 1
            log.append({"phase": "search", "event": "nan-retry", "epoch": epoch, "lr_scale": scale})
            continue
        run["valid_loss"] = valid_loss
        log.append(
            {
                "phase": "search",
                "epoch": epoch,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "seconds": run["elapsed"] + time.perf_counter() - started,
                "nodes": space.nodes,
                "train_windows": count,
                **({"warmup": True} if warming else {}),
                "arch": [
                    w.detach().reshape(-1, w.shape[-1]).tolist() for w in space.mixing_weights()
                ],
                **strategy.epoch_metrics(),
            }
        )
        changed = grower.after_epoch(epoch, run["step"], valid_loss)
        if epoch == config.epochs:
            changed = grower.finish(epoch, run["step"], valid_loss) or changed
        if changed:
            crash_point("growth")
            weights = _weights(model)
            optimizer = rebuild_optimizer(optimizer, weights)
            if space.arch_parameters():
                strategy.on_space_change()
            if history_path is not None:
                write_json(history_path, [event.to_dict() for event in grower.events])
        improved = valid_loss < run["best"]
        run["best"] = min(run["best"], valid_loss)
        state = checkpoint(None, (total, count), started)
        save_atomic(state, last_path)
        if improved:
            save_atomic(state, checkpoint_dir / "search_best.pt")
        if stop is not None and stop.requested and epoch < config.epochs:
            raise StopRequested(str(last_path))
        run["epoch"] += 1
    return SearchOutcome(
        genotype=strategy.derive(),
        seconds=run["elapsed"] + time.perf_counter() - started,
        cpu_seconds=run["cpu"] + time.process_time() - started_cpu,
        valid_loss=run["valid_loss"],
        epochs=config.epochs,
        events=list(grower.events),
    )


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
