"""Training a discrete model from scratch with early stopping on the validation loss.

Like the search, training checkpoints every epoch (and at a stop request, mid-epoch) everything
needed to continue exactly: weights, optimizer, the best epoch's weights, random states and the
position inside the epoch.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morphnas.config import TrainConfig
from morphnas.engine.checkpoint import save_atomic
from morphnas.engine.faults import crash_point
from morphnas.engine.loops import check_finite, draw_epoch
from morphnas.engine.progress import Progress, Silent
from morphnas.engine.resume import (
    StopFlag,
    StopRequested,
    fits,
    reason,
    restore_rng,
    rng_state,
)
from morphnas.engine.state import TRAIN, TrainProgress
from morphnas.errors import UserError
from morphnas.run_files import MetricsLog
from morphnas.tasks.base import Task


@dataclass(frozen=True)
class TrainOutcome:
    seconds: float
    epochs: int
    best_epoch: int
    valid_loss: float


def train(
    model: nn.Module,
    task: Task,
    config: TrainConfig,
    *,
    name: str,
    seed: int,
    log: MetricsLog,
    progress: Progress | None = None,
    checkpoint_path: Path | None = None,
    resume: dict[str, Any] | None = None,
    stamp: dict[str, Any] | None = None,
    stop: StopFlag | None = None,
    phase: str = "train",
) -> TrainOutcome:
    """Adam on all parameters; stop after ``patience`` epochs without a better valid loss.

    The model is left holding the weights of its best validation epoch. With ``checkpoint_path``
    the state is saved after every epoch, with ``stamp`` (the run's id, ``runs.start_record``)
    under ``run``; ``resume`` continues from such a checkpoint. ``phase`` labels the epoch rows
    in ``metrics.jsonl`` (``select``: a candidate cell's brief retraining, which the
    learning-curve plots leave out).
    """
    progress = progress or Silent()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    counters, best_state = TrainProgress(), copy.deepcopy(model.state_dict())
    epoch_start = generator.get_state()
    saved_epoch: dict[str, Any] | None = None  # a checkpoint from inside the epoch to continue
    if resume is not None:
        fits(model, resume["best_state"], checkpoint_path)
        fits(model, resume["model"], checkpoint_path)
        try:
            optimizer.load_state_dict(resume["optimizer"])
            restore_rng(resume["rng"])
            generator.set_state(resume["generator"])
            task.load_state_dict(resume.get("task", {}))  # e.g. a language model's carried state
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            raise UserError(
                f"{checkpoint_path} cannot be continued ({reason(err)}): it was edited or damaged; "
                "delete it to train that model again, or start the run again with --force"
            ) from None
        best_state = resume["best_state"]
        saved_epoch = resume if counters.resume(resume) else None

    def seconds() -> float:
        """Wall seconds of the whole training, earlier sessions included."""
        return counters.elapsed + time.perf_counter() - started

    def checkpoint(position: int | None, total: torch.Tensor, count: int) -> dict[str, Any]:
        """Everything needed to continue; ``position`` None: the epoch is complete."""
        return TRAIN.build(
            stamp,
            replace(counters, position=position, elapsed=seconds()),
            name=name,
            totals=[total.detach().cpu(), count],
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            best_state=best_state,
            rng=rng_state(),
            generator=generator.get_state(),
            epoch_generator=epoch_start,
            task=task.state_dict(),
        )

    device = next(model.parameters()).device
    started = time.perf_counter()
    epoch = counters.epoch - 1
    progress.start(f"train {name}", config.epochs)
    progress.advance(epoch)
    best_epoch = counters.best_epoch
    stopped_early = counters.epoch - best_epoch > config.patience and best_epoch > 0
    while not stopped_early and counters.epoch <= config.epochs:
        epoch = counters.epoch
        model.train()
        epoch_batches, epoch_start, total, count = draw_epoch(
            task, generator, device, saved=saved_epoch
        )
        saved_epoch = None
        for k in range(counters.position, len(epoch_batches)):
            batch = epoch_batches[k]
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            size = task.batch_weight(batch)
            total, count = total + loss.detach() * size, count + size
            crash_point("train-step")
            if stop is not None and stop.requested and k + 1 < len(epoch_batches):
                progress.stop()
                if checkpoint_path is not None:
                    save_atomic(checkpoint(k + 1, total, count), checkpoint_path)
                raise StopRequested(str(checkpoint_path))
        counters.position = 0
        train_loss = float(total) / count
        check_finite(train_loss, f"{name}'s training loss", epoch)
        valid_loss = task.valid_loss(model)
        check_finite(valid_loss, f"{name}'s validation loss", epoch)
        log.append(
            {
                "phase": phase,
                "model": name,
                "epoch": epoch,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "seconds": seconds(),
            }
        )
        progress.advance(valid_loss=valid_loss)
        if valid_loss < counters.best:
            counters.best, counters.best_epoch = valid_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        stopped_early = epoch - counters.best_epoch >= config.patience
        if checkpoint_path is not None:
            save_atomic(checkpoint(None, total, count), checkpoint_path)
        if stop is not None and stop.requested and not stopped_early and epoch < config.epochs:
            progress.stop()
            raise StopRequested(str(checkpoint_path))
        counters.epoch += 1
    progress.stop()
    model.load_state_dict(best_state)
    return TrainOutcome(seconds(), epoch, counters.best_epoch, counters.best)
