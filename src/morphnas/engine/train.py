"""Training a discrete model from scratch with early stopping on the validation loss."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from morphnas.config import TrainConfig
from morphnas.engine.loops import Batch, check_finite
from morphnas.engine.progress import Progress, Silent
from morphnas.report import MetricsLog
from morphnas.tasks.forecasting import batches, predict


@dataclass(frozen=True)
class TrainOutcome:
    seconds: float
    epochs: int
    best_epoch: int
    valid_loss: float


def train(
    model: nn.Module,
    train: Batch,
    valid: Batch,
    config: TrainConfig,
    *,
    name: str,
    seed: int,
    log: MetricsLog,
    progress: Progress | None = None,
) -> TrainOutcome:
    """Adam on all parameters; stop after ``patience`` epochs without a better valid loss.

    The model is left holding the weights of its best validation epoch.
    """
    progress = progress or Silent()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.MSELoss()
    x_train, y_train = train
    best, best_epoch, best_state = float("inf"), 0, copy.deepcopy(model.state_dict())
    started = time.perf_counter()
    epoch = 0
    progress.start(f"train {name}", config.epochs)
    for epoch in range(1, config.epochs + 1):
        model.train()
        total = torch.zeros((), device=x_train.device)
        for idx in batches(len(x_train), config.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            total += loss.detach() * len(idx)
        train_loss = float(total) / len(x_train)
        check_finite(train_loss, f"{name}'s training loss", epoch)
        valid_loss = float(loss_fn(predict(model, valid[0]), valid[1]))
        log.append(
            {
                "phase": "train",
                "model": name,
                "epoch": epoch,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "seconds": time.perf_counter() - started,
            }
        )
        progress.advance(valid_loss=valid_loss)
        if valid_loss < best:
            best, best_epoch, best_state = valid_loss, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= config.patience:
            break
    progress.stop()
    model.load_state_dict(best_state)
    return TrainOutcome(time.perf_counter() - started, epoch, best_epoch, best)
