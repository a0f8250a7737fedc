"""Everything a checkpoint needs beyond weights to continue a run exactly: random-number states,
the shape a growing supernet has reached, a clean stop on SIGINT/SIGTERM, and the checks a loaded
checkpoint passes before a run continues from it (its layout is ``engine.state``'s schema).

Checkpoints are loaded with ``torch.load(weights_only=True)``, so every value here is made of
tensors, numbers, strings, lists, tuples and dicts only.
"""

from __future__ import annotations

import random
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import numpy as np
import torch

from morphnas.engine.state import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, SCHEMAS
from morphnas.errors import UserError
from morphnas.genotype import MAX_NODES, Node
from morphnas.spaces.base import GrowableSpace


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


def space_shape(space: GrowableSpace) -> dict[str, Any]:
    """The shape a supernet has grown to: node count, hidden width, the nodes fixed by pruning."""
    return {
        "nodes": space.nodes,
        "hidden": space.hidden_size,
        "fixed": {
            str(i): [node.op, list(node.inputs), node.residual]
            for i, node in sorted(space.fixed.items())
        },
    }


def reshape_space(space: GrowableSpace, shape: dict[str, Any]) -> None:
    """Grow a freshly built supernet (built at the saved width) to a saved shape, so that the
    checkpoint's ``state_dict`` loads into it strictly. Values do not matter: they are loaded."""
    if space.hidden_size != shape["hidden"]:
        raise ValueError(f"supernet built at width {space.hidden_size}, saved at {shape['hidden']}")
    if not 0 < shape["nodes"] <= MAX_NODES:
        raise ValueError(f"{shape['nodes']} nodes saved; a cell has 1 to {MAX_NODES}")
    while space.nodes < shape["nodes"]:
        space.grow()
    for i, (op, inputs, residual) in shape["fixed"].items():
        space.fix(int(i), Node(op, tuple(inputs), residual))


def _problem(state: dict[str, Any], kind: str) -> str | None:
    """What is wrong with the top level of a checkpoint of ``kind`` (``engine.state.SCHEMAS``),
    or None: a key lacking, or holding another type or a count below its minimum, means the file
    was edited or damaged. The contents of the nested states are checked when they are loaded,
    before the resumed run writes anything."""
    rules = SCHEMAS[kind].rules()
    missing = [key for key, rule in rules.items() if not rule.optional and key not in state]
    if missing:
        return f"lacks {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}"
    for key, rule in rules.items():
        if key not in state:
            continue
        value = state[key]
        if not isinstance(value, rule.types) or (
            isinstance(value, bool) and rule.types is not bool
        ):
            return f"holds a {type(value).__name__} as {key}"
        if rule.minimum is not None and value is not None and value < rule.minimum:
            return f"holds {key} {value}, below {rule.minimum}"
    if "totals" in state and (
        len(state["totals"]) != 2 or not isinstance(state["totals"][0], torch.Tensor)
    ):
        return "holds running totals of the wrong form"
    return None


def checked(state: dict[str, Any], path: Any, kind: str, run_id: str | None) -> dict[str, Any]:
    """``state`` (a loaded checkpoint of ``kind``) if this version of morphnas can continue it
    and it belongs to the run ``run_id`` (every checkpoint carries its run's id under ``run``);
    else a one-line ``UserError`` naming the file. ``run_id`` None: a run from before run ids,
    whose checkpoints carry none."""
    again = "start the run again with --force"
    if SCHEMAS[kind].versioned:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a morphnas checkpoint; {again}")
        if state.get("version") != CHECKPOINT_VERSION or state.get("kind") != kind:
            raise UserError(
                f"{path} was written by another morphnas version (checkpoint version "
                f"{state.get('version')!r}, this one reads {CHECKPOINT_VERSION}); {again}"
            )
    problem = _problem(state, kind)
    if problem is not None:
        raise UserError(
            f"{path} {problem}: it is not a whole {kind} checkpoint (edited or damaged); "
            f"delete it to redo that part of the run, or {again}"
        )
    if run_id is not None:
        stamp = state.get("run")
        owner = stamp.get("id") if isinstance(stamp, dict) else None
        if owner != run_id:
            whose = f"run {owner}" if isinstance(owner, str) else "no run id"
            raise UserError(
                f"{path} belongs to another run ({whose}; this run is {run_id}): it was "
                f"copied in from elsewhere; put this run's own file back, or {again}"
            )
    return state


def reason(err: BaseException) -> str:
    """An exception from loading a checkpoint, shortened for a one-line message (torch's
    "Error(s) in loading state_dict for X:" preamble dropped)."""
    text = " ".join(str(err).split())
    text = re.sub(r"^Error\(s\) in loading state_dict for \w+: ", "", text)
    return text.rstrip(".")[:160] or type(err).__name__


def fits(module: torch.nn.Module, state_dict: Any, path: Any) -> None:
    """Load ``state_dict`` into ``module``; a checkpoint whose weights do not fit it (other
    names or shapes: edited, or saved by another configuration) is a one-line ``UserError``."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(
            f"the weights in {path} do not fit the model this run builds ({reason(err)}); the "
            "checkpoint was edited or comes from another configuration: start the run again "
            "with --force"
        ) from None
