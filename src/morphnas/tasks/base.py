"""What the search and training loops need from a task, and nothing more.

The loops own the schedule (epochs, steps, growth, checkpoints); a task owns its data, its loss
and how batches are drawn. Forecasting and language modelling both implement ``Task``, so the same
engine, strategies and growth run on either.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class BatchStream(Protocol):
    """An endless stream of batches (the architecture step's validation batches) whose position
    can be saved and restored, so that a resumed search draws exactly the batches it would have."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(Protocol):
    """Data, batching and loss of one learning problem, seen by the engine.

    ``model_kwargs`` of ``loss`` and ``valid_loss`` go to the model's forward (a supernet takes
    the strategy's mixing weights as ``weights=``; discrete models take none).
    """

    def epoch_batches(self, generator: torch.Generator, fraction: float = 1.0) -> list[Any]:
        """One epoch of training batches, drawn with ``generator``, over the first ``fraction``
        of the training span (streamed search feeds the span in chronological chunks)."""
        ...

    def valid_stream(self, generator: torch.Generator) -> BatchStream: ...

    def loss(self, model: nn.Module, batch: Any, **model_kwargs: Any) -> Tensor:
        """Mean loss of one batch in the model's current mode."""
        ...

    def batch_weight(self, batch: Any) -> int:
        """How many samples the batch's mean loss averages over (for epoch means)."""
        ...

    def valid_loss(self, model: nn.Module, **model_kwargs: Any) -> float:
        """Mean loss over the whole validation split, in eval mode."""
        ...

    def probe(self) -> tuple[Tensor, Tensor]:
        """A fixed batch for growth checks: ``(model input, the cell's input sequence)``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """State carried between batches (e.g. a language model's hidden state); may be empty."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class IndexStream:
    """Shuffled index batches over ``n`` samples, forever, restartable from any position."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order: Tensor | None = None
        self.position = 0

    def __next__(self) -> Tensor:
        if self.order is None or self.position >= self.n:
            self.order, self.position = torch.randperm(self.n, generator=self.generator), 0
        idx = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.position = state["order"], state["position"]


class PairStream:
    """Endless shuffled ``(x, y)`` batches of one split (the architecture step's validation
    batches for forecasting windows and images), restartable through ``IndexStream``."""

    def __init__(
        self, data: tuple[Tensor, Tensor], batch_size: int, generator: torch.Generator
    ) -> None:
        self.data = data
        self.indices = IndexStream(len(data[0]), batch_size, generator)

    def __next__(self) -> tuple[Tensor, Tensor]:
        idx = next(self.indices)
        return self.data[0][idx], self.data[1][idx]

    def state_dict(self) -> dict[str, Any]:
        return self.indices.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices.load_state_dict(state)


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Index batches over ``n`` samples: shuffled with ``generator``, in order without one."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 512, **cell_kwargs: Any) -> Tensor:
    """The model's outputs for every sample in ``x`` (forecasts of windows, logits of images),
    ``batch_size`` at a time, in eval mode (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i], **cell_kwargs) for i in batches(len(x), batch_size)])
    finally:
        model.train(was_training)
