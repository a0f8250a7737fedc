"""The one-shot search loop: alternate an architecture step on valid and a weight step on train."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from morphnas.config import SearchConfig
from morphnas.engine.checkpoint import save_atomic
from morphnas.engine.loops import Batch, check_finite, endless_batches
from morphnas.engine.progress import Progress, Silent
from morphnas.genotype import Genotype
from morphnas.report import MetricsLog
from morphnas.strategies import Strategy
from morphnas.tasks.forecasting import ForecastModel, batches, predict


@dataclass(frozen=True)
class SearchOutcome:
    genotype: Genotype
    seconds: float
    valid_loss: float
    epochs: int


def search(
    model: ForecastModel,
    strategy: Strategy,
    train: Batch,
    valid: Batch,
    config: SearchConfig,
    *,
    seed: int,
    log: MetricsLog,
    checkpoint_dir: Path,
    progress: Progress | None = None,
) -> SearchOutcome:
    """Bilevel search: weights learn on ``train``, architecture parameters on ``valid``.

    Each iteration first lets the strategy update the architecture on a validation batch, then
    takes one weight step on a training batch under the strategy's (detached) mixing weights, as
    the DARTS code does. After every epoch: the full validation loss, the mixing probabilities in
    ``metrics.jsonl`` and a checkpoint (``last``, and ``best`` by validation loss).
    """
    progress = progress or Silent()
    space = model.cell
    arch_ids = {id(p) for p in space.arch_parameters()}
    weights = [p for p in model.parameters() if id(p) not in arch_ids]
    optimizer = torch.optim.Adam(weights, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    valid_stream = endless_batches(*valid, config.batch_size, generator)
    loss_fn = nn.MSELoss()

    def batch_loss(batch: Batch, mixing: list[Tensor]) -> Tensor:
        x, y = batch
        return loss_fn(model(x, weights=mixing), y)

    x_train, y_train = train
    steps = -(-len(x_train) // config.batch_size)
    best, started, valid_loss = float("inf"), time.perf_counter(), float("nan")
    for epoch in range(1, config.epochs + 1):
        model.train()
        progress.start(f"search epoch {epoch}/{config.epochs}", steps)
        total = torch.zeros(())
        for idx in batches(len(x_train), config.batch_size, generator):
            batch = (x_train[idx], y_train[idx])
            strategy.arch_step(batch_loss, batch, next(valid_stream))
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(batch, [w.detach() for w in strategy.mixing_weights()])
            loss.backward()
            nn.utils.clip_grad_norm_(weights, config.clip)
            optimizer.step()
            total += loss.detach() * len(idx)
            progress.advance()
        progress.stop()
        train_loss = float(total) / len(x_train)
        mixing = [w.detach() for w in strategy.mixing_weights()]
        valid_loss = float(loss_fn(predict(model, valid[0], weights=mixing), valid[1]))
        check_finite(train_loss, "the search's training loss", epoch)
        log.append(
            {
                "phase": "search",
                "epoch": epoch,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "seconds": time.perf_counter() - started,
                "arch": [w.reshape(-1, w.shape[-1]).tolist() for w in mixing],
            }
        )
        state = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "strategy": strategy.state_dict(),
            "valid_loss": valid_loss,
        }
        save_atomic(state, checkpoint_dir / "search_last.pt")
        if valid_loss < best:
            best = valid_loss
            save_atomic(state, checkpoint_dir / "search_best.pt")
    return SearchOutcome(
        genotype=space.derive(),
        seconds=time.perf_counter() - started,
        valid_loss=valid_loss,
        epochs=config.epochs,
    )
