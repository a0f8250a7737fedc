"""Everything a checkpoint needs beyond weights to continue a run exactly: random-number states,
the shape a growing supernet has reached, and a clean stop on SIGINT/SIGTERM.

Checkpoints are loaded with ``torch.load(weights_only=True)``, so every value here is made of
tensors, numbers, strings, lists, tuples and dicts only.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import numpy as np
import torch

from morphnas.genotype import Node

CHECKPOINT_FORMAT = "morphnas.checkpoint"
CHECKPOINT_VERSION = 1


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived; the loop saved a checkpoint at the end of its current step."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__(f"interrupted; the run was saved to {checkpoint}")
        self.checkpoint = checkpoint


class StopFlag:
    """Set by SIGINT/SIGTERM; the loops poll it between steps (a step is never cut in half)."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The first signal asks for a clean stop; a second one (an impatient Ctrl-C) stops now."""
        del signum, frame
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Route SIGINT and SIGTERM to a ``StopFlag`` for the duration (main thread only: elsewhere
    signals cannot be caught and the flag simply stays down)."""
    flag = StopFlag()
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, flag._handle)
    except ValueError:  # not the main thread
        pass
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and every CUDA device) random states."""
    version, key, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(key), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, key, gauss = state["python"]
    random.setstate((version, tuple(key), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def space_shape(space: Any) -> dict[str, Any]:
    """The shape a supernet has grown to: node count, hidden width, the nodes fixed by pruning."""
    return {
        "nodes": space.nodes,
        "hidden": space.hidden_size,
        "fixed": {
            str(i): [node.op, list(node.inputs), node.residual]
            for i, node in sorted(space.fixed.items())
        },
    }


def reshape_space(space: Any, shape: dict[str, Any]) -> None:
    """Grow a freshly built supernet (built at the saved width) to a saved shape, so that the
    checkpoint's ``state_dict`` loads into it strictly. Values do not matter: they are loaded."""
    if space.hidden_size != shape["hidden"]:
        raise ValueError(f"supernet built at width {space.hidden_size}, saved at {shape['hidden']}")
    while space.nodes < shape["nodes"]:
        space.grow()
    for i, (op, inputs, residual) in shape["fixed"].items():
        space.fix(int(i), Node(op, tuple(inputs), residual))
