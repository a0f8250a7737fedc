"""The one-shot search loop: alternate an architecture step on valid and a weight step on train,
growing (and pruning) the backbone between epochs when a growth mode is on."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from morphnas.config import GrowthConfig, SearchConfig
from morphnas.engine.checkpoint import save_atomic
from morphnas.engine.loops import Batch, check_finite, endless_batches
from morphnas.engine.progress import Progress, Silent
from morphnas.genotype import Genotype
from morphnas.growth import Growth, GrowthEvent
from morphnas.optim import rebuild_optimizer
from morphnas.report import MetricsLog, write_json
from morphnas.strategies import Strategy
from morphnas.tasks.forecasting import ForecastModel, batches, predict

PROBE_SIZE = 64


@dataclass(frozen=True)
class SearchOutcome:
    genotype: Genotype
    seconds: float
    valid_loss: float
    epochs: int
    events: list[GrowthEvent] = field(default_factory=list)


def _weights(model: ForecastModel) -> list[nn.Parameter]:
    """Every trainable weight of the model: all but the space's architecture parameters."""
    arch_ids = {id(p) for p in model.cell.arch}
    return [p for p in model.parameters() if id(p) not in arch_ids]


def streamed_size(n: int, stream: int, epoch: int, epochs: int) -> int:
    """Training windows available at ``epoch`` when the span arrives in ``stream`` chunks.

    Chunk ``k`` arrives at the start of epoch ``⌈(k−1)·E/K⌉ + 1``, so the first epoch sees one
    chunk and the last epochs the whole span.
    """
    chunks = min(stream, max(1, math.ceil(stream * epoch / epochs)))
    return max(1, round(n * chunks / stream))


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
    growth: GrowthConfig | None = None,
    nodes_max: int | None = None,
    history_path: Path | None = None,
    progress: Progress | None = None,
) -> SearchOutcome:
    """Bilevel search: weights learn on ``train``, architecture parameters on ``valid``.

    Each iteration first lets the strategy update the architecture on a validation batch, then
    takes one weight step on a training batch under the strategy's (detached) mixing weights, as
    the DARTS code does. After every epoch: the full validation loss, the mixing probabilities in
    ``metrics.jsonl``, a checkpoint (``last``, and ``best`` by validation loss) and, with growth
    on, the growth trigger; every growth or prune event goes to ``history.json``.
    """
    progress = progress or Silent()
    growth = growth or GrowthConfig()
    space = model.cell
    weights = _weights(model)
    optimizer = torch.optim.Adam(weights, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    valid_stream = endless_batches(*valid, config.batch_size, generator)
    loss_fn = nn.MSELoss()

    def batch_loss(batch: Batch, mixing: list[Tensor]) -> Tensor:
        x, y = batch
        return loss_fn(model(x, weights=mixing), y)

    def valid_loss_now() -> float:
        mixing = [w.detach() for w in strategy.mixing_weights()]
        return float(loss_fn(predict(model, valid[0], weights=mixing), valid[1]))

    grower = Growth(
        model,
        growth,
        config.epochs,
        nodes_max or space.nodes,
        probe=valid[0][:PROBE_SIZE],
        valid_loss=valid_loss_now,
        seed=seed,
    )
    x_train, y_train = train
    best, started, valid_loss, step = float("inf"), time.perf_counter(), float("nan"), 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        n_train = streamed_size(len(x_train), config.stream, epoch, config.epochs)
        steps = -(-n_train // config.batch_size)
        progress.start(f"search epoch {epoch}/{config.epochs} ({space.nodes} nodes)", steps)
        total = torch.zeros((), device=x_train.device)
        for idx in batches(n_train, config.batch_size, generator):
            batch = (x_train[idx], y_train[idx])
            if space.arch_parameters():
                strategy.arch_step(batch_loss, batch, next(valid_stream))
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(batch, [w.detach() for w in strategy.mixing_weights()])
            loss.backward()
            nn.utils.clip_grad_norm_(weights, config.clip)
            optimizer.step()
            total += loss.detach() * len(idx)
            step += 1
            progress.advance()
        progress.stop()
        train_loss = float(total) / n_train
        check_finite(train_loss, "the search's training loss", epoch)
        valid_loss = valid_loss_now()
        log.append(
            {
                "phase": "search",
                "epoch": epoch,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "seconds": time.perf_counter() - started,
                "nodes": space.nodes,
                "train_windows": n_train,
                "arch": [
                    w.detach().reshape(-1, w.shape[-1]).tolist() for w in space.mixing_weights()
                ],
            }
        )
        changed = grower.after_epoch(epoch, step, valid_loss)
        if epoch == config.epochs:
            changed = grower.finish(epoch, step, valid_loss) or changed
        if changed:
            weights = _weights(model)
            optimizer = rebuild_optimizer(optimizer, weights)
            if space.arch_parameters():
                strategy.on_space_change()
            if history_path is not None:
                write_json(history_path, [event.to_dict() for event in grower.events])
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
        events=list(grower.events),
    )
