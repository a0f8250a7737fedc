"""What is timed: workload sizes, random sequences, and one implementation's training step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SGD_LR = 1e-3  # small, so that repeated steps keep the weights (and the timings) ordinary


@dataclass(frozen=True)
class SupernetConfig:
    """One supernet workload; ``input_size = hidden`` as in DARTS language modelling."""

    batch: int
    hidden: int
    bptt: int
    nodes: int

    @property
    def input_size(self) -> int:
        """Equal to ``hidden``, as in DARTS language modelling (embedding size = state size)."""
        return self.hidden


def grid(
    batches: Sequence[int],
    hiddens: Sequence[int],
    bptt: int,
    nodes: int,
    skip: frozenset[tuple[int, int]] = frozenset(),
) -> tuple[SupernetConfig, ...]:
    """Every ``(batch, hidden)`` pair but those in ``skip``, smallest batch first."""
    pairs = [(b, h) for b in batches for h in hiddens if (b, h) not in skip]
    return tuple(SupernetConfig(b, h, bptt, nodes) for b, h in pairs)


@dataclass(frozen=True)
class CnnConfig:
    """One CNN supernet workload: a batch of ``channels × image × image`` images through
    ``cells`` cells of C = ``hidden``."""

    batch: int
    channels: int
    image: int
    cells: int
    hidden: int


@dataclass(frozen=True)
class CellConfig:
    """One discrete-cell workload; the ``cell`` part feeds it inputs of ``hidden`` features."""

    batch: int
    hidden: int
    bptt: int


@dataclass
class Workload:
    """One implementation's training step on a fixed batch: MSE on all outputs, backward, and
    (with an optimizer) a step on every parameter, architecture parameters included.

    ``threads`` pins the thread count instead of probing for it. Compiled modules need that:
    inductor bakes the thread count of compile time into its CPU kernels (so timing other
    counts would time a mix), and the unroll is specialised on the sequence length (so the
    probe's shorter prefix would compile the module all over again).
    """

    module: nn.Module
    x: Tensor
    target: Tensor
    optimizer: torch.optim.Optimizer | None = None
    threads: int | None = None

    def step(self, bptt: int | None = None) -> None:
        """One step on the whole sequence, or on its first ``bptt`` steps (the thread probe)."""
        x, target = (self.x, self.target) if bptt is None else (self.x[:bptt], self.target[:bptt])
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.module.zero_grad(set_to_none=True)
        outputs, _ = self.module(x)
        F.mse_loss(outputs, target).backward()
        if self.optimizer is not None:
            self.optimizer.step()


def sequence(
    cfg: SupernetConfig | CellConfig, input_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """A random input ``(bptt, batch, input_size)`` and regression target ``(bptt, batch,
    hidden)``, drawn from the caller's seeded RNG (inputs first, so seeds keep their draws)."""
    x = torch.randn(cfg.bptt, cfg.batch, input_size, device=device)
    return x, torch.randn(cfg.bptt, cfg.batch, cfg.hidden, device=device)


def sgd_workload(module: nn.Module, x: Tensor, target: Tensor) -> Workload:
    """A full training step: the supernet parts time the optimizer step as well."""
    return Workload(module, x, target, torch.optim.SGD(module.parameters(), lr=SGD_LR))
