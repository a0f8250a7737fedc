"""DNAL's architecture stage on a trained network, its read-out, and the measurements around it.

The three stages (spec methods.md §4a): (1) weights trained with the gates off — a run's
retrained model is that network; (2) the gates learned with the weights frozen: ``α = 0``, β
geometric from ``beta_start`` to ``beta_end`` over ``arch_epochs`` epochs (``gates.beta_at``), SGD
on ``CE + λ Σ σ(α)`` over the training batches (``learn_gates``); (3) the read-out
``σ(β·α) > threshold``, the physically pruned network, and fine-tuning (``morphnas.prune``).

Where we differ from the authors' code, on purpose: one SGD optimizer for the whole stage (theirs
is rebuilt every epoch, which resets the momentum), the classifier head frozen too unless
``train_head`` (theirs keeps the VGG classifier training, so the stage is not fully decoupled), the
penalty's form an option (``unscaled``, the code's ``σ(α)``; ``scaled``, ``σ(β·α)``), and every
gate keeps at least its strongest channel (a layer read out empty would cut the network).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from morphnas.cells.image_baselines import eval_mode
from morphnas.channels.gates import ChannelGate, beta_at, penalty, read_out, reset, set_beta
from morphnas.channels.gates import set_mode as set_gate_mode
from morphnas.channels.options import ChannelOptions
from morphnas.engine.checkpoint import save_atomic
from morphnas.engine.faults import crash_point
from morphnas.engine.progress import Progress, Silent
from morphnas.engine.resume import StopFlag, StopRequested, fits, restore_rng, rng_state
from morphnas.engine.state import GATES, GateProgress
from morphnas.run_files import MetricsLog
from morphnas.tasks.base import Task


@dataclass(frozen=True)
class Gating:
    """How one modality's networks are gated, pruned for real and measured."""

    attach: Callable[[nn.Module], dict[str, ChannelGate]]
    prune: Callable[[nn.Module, Mapping[str, Tensor], Tensor], nn.Module]
    flops: Callable[[nn.Module, Tensor], int]


def gating(modality: str) -> Gating:
    """CNNs: a gate behind every BN; recurrent models: one per hidden unit of the cell."""
    if modality == "images":
        from morphnas.cells.image_baselines import count_flops
        from morphnas.channels.cnn import attach_bn_gates, prune_channels

        return Gating(attach_bn_gates, prune_channels, count_flops)
    from morphnas.channels.recurrent import attach_unit_gates, prune_units, recurrent_flops

    return Gating(
        attach_unit_gates, lambda model, masks, _: prune_units(model, masks), recurrent_flops
    )


def keep_strongest(gates: Mapping[str, ChannelGate], masks: dict[str, Tensor]) -> int:
    """A gate read out with no channel keeps its largest ``α`` (in place); how many needed it."""
    emptied = 0
    with torch.no_grad():
        for name, gate in gates.items():
            if not bool(masks[name].any()):
                masks[name][int(gate.alpha.argmax())] = True
                gate.mask.copy_(masks[name].to(gate.mask.dtype))
                emptied += 1
    return emptied


def learn_gates(
    model: nn.Module,
    gates: Mapping[str, ChannelGate],
    task: Task,
    options: ChannelOptions,
    lam: float,
    *,
    name: str,
    seed: int,
    log: MetricsLog,
    checkpoint_path: Path,
    stamp: dict[str, Any] | None,
    resume: dict[str, Any] | None = None,
    progress: Progress | None = None,
    stop: StopFlag | None = None,
) -> dict[str, Tensor]:
    """The architecture stage on ``model`` (gated, its weights trained), then the read-out: the
    masks by gate name (True = kept), also set on the gates, which are left in ``mask`` mode.

    A checkpoint is written at the end of every epoch (``GATES``); ``resume`` continues from one
    exactly (the epoch after it, with its α, momentum, BN statistics and random states)."""
    progress = progress or Silent()
    alphas = [gate.alpha for gate in gates.values()]
    head = getattr(model, "head", None)
    trained = alphas + (list(head.parameters()) if options.train_head and head else [])
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    reset(gates.values())
    set_gate_mode(gates.values(), "soft")
    optimizer = torch.optim.SGD(trained, lr=options.arch_lr, momentum=options.momentum)
    generator = torch.Generator().manual_seed(seed)
    counters = GateProgress()
    if resume is not None:
        fits(model, resume["model"], checkpoint_path)
        optimizer.load_state_dict(resume["optimizer"])
        restore_rng(resume["rng"])
        generator.set_state(resume["generator"])
        counters.resume(resume)
    scaled = options.penalty == "scaled"
    started = time.perf_counter()
    progress.start(f"gates {name}", options.arch_epochs)
    progress.advance(counters.epoch - 1)
    try:
        while counters.epoch <= options.arch_epochs:
            epoch = counters.epoch
            beta = beta_at(epoch, options.arch_epochs, options.beta_start, options.beta_end)
            set_beta(gates.values(), beta)
            model.train()
            total, count = 0.0, 0
            for batch in task.epoch_batches(generator):
                optimizer.zero_grad(set_to_none=True)
                loss = task.loss(model, batch)
                (loss + lam * penalty(gates.values(), scaled)).backward()
                optimizer.step()
                size = task.batch_weight(batch)
                total, count = total + float(loss.detach()) * size, count + size
                crash_point("gates-step")
            elapsed = counters.elapsed + time.perf_counter() - started
            open_share = _open_share(gates, options.threshold)
            log.append(
                {"phase": "gates", "model": name, "lambda": lam, "epoch": epoch, "beta": beta,
                 "train_loss": total / max(count, 1), "open": open_share, "seconds": elapsed}
            )  # fmt: skip
            progress.advance(valid_loss=total / max(count, 1))
            counters.elapsed = elapsed
            counters.position = None
            state = GATES.build(
                stamp, counters, name=name, model=model.state_dict(),
                optimizer=optimizer.state_dict(), rng=rng_state(), generator=generator.get_state(),
            )  # fmt: skip
            save_atomic(state, checkpoint_path)
            counters.position, counters.epoch = 0, epoch + 1
            started = time.perf_counter()
            if stop is not None and stop.requested and epoch < options.arch_epochs:
                raise StopRequested(str(checkpoint_path))
    finally:
        progress.stop()
        for p, flag in flags:
            p.requires_grad_(flag)
    masks = read_out(gates, options.threshold)
    keep_strongest(gates, masks)
    set_gate_mode(gates.values(), "mask")
    return masks


def _open_share(gates: Mapping[str, ChannelGate], threshold: float) -> float:
    """The fraction of all channels whose gate is above the threshold now."""
    with torch.no_grad():
        kept = sum(int((torch.sigmoid(g.beta * g.alpha) > threshold).sum()) for g in gates.values())
    return kept / sum(g.channels for g in gates.values())


def latencies(
    models: Mapping[str, nn.Module], batch: Tensor, repeats: int = 15
) -> dict[str, float]:
    """Median milliseconds of one no-grad, eval-mode forward of ``batch`` per model, measured side
    by side (round-robin, after one warm-up each), so a busy host slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with eval_mode(*models.values()), torch.no_grad():
        for model in models.values():
            model(batch)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(batch)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}
