"""``torch.compile`` for the retrained discrete cells, with an eager fallback.

A derived cell unrolled over a window is hundreds of small kernels per step; compiling the whole
unroll fuses the elementwise work (and on CUDA, ``reduce-overhead`` replays it as one CUDA
graph, the fixed-length path the launch overhead asks for). Compiling costs time up front: on
the 2-core CPU, minutes for a 35-step unroll against a ≈1.45× faster step
(docs/bench/journal-benchmarks.md), so ``auto`` compiles on CUDA only. Search supernets are not
compiled: their fused kernel is already a hand-written sequence autograd function, and growth
changes their shapes.

A cell is compiled in place (its ``forward`` attribute), so its ``state_dict`` and checkpoints are
those of the eager cell. It is warmed up at once on a probe batch, forward and backward, so the
compile time is measured and a backend that fails falls back to eager there, not mid-training;
the random state is left as it was, so compiled and eager runs draw the same dropout masks.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

COMPILE_MODES = ("auto", "on", "off")


def wants_compile(setting: str, device: torch.device) -> bool:
    """``on``/``off`` as asked; ``auto`` compiles on CUDA, where it pays from the first epochs."""
    if setting not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {setting!r}")
    return setting == "on" or (setting == "auto" and device.type == "cuda")


class _CompiledForward:
    """The compiled forward, falling back to the eager one (for good) if compiling fails."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any]) -> None:
        self.compiled, self.eager, self.failed = compiled, eager, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:  # a backend failure must not end the run
            self.fall_back(err)
            return self.eager(*args, **kwargs)

    def fall_back(self, err: BaseException) -> None:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        warnings.warn(
            f"torch.compile failed ({type(err).__name__}: {first_line}); running eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        self.failed = True


def compile_cell(cell: nn.Module, probe: Tensor, *, backend: str = "inductor") -> float | None:
    """Compile ``cell`` in place and warm it up on ``probe`` (time, batch, features).

    Returns the warm-up's wall seconds (the compile time, the probe's own compute being
    negligible), or None when compiling failed and the cell stays eager.
    """
    # The compiler fuses the eager loop itself; a cell's hand-written sequence kernel (a once-only
    # autograd.Function with a Python loop inside) is for uncompiled runs, and comes back if
    # compiling fails.
    kernel = getattr(cell, "fused", None)
    if kernel:
        cell.fused = False
    eager = cell.forward
    mode = "reduce-overhead" if probe.device.type == "cuda" else None
    # Compiled random ops draw from torch's generator as eager ones do: same dropout masks.
    torch._inductor.config.fallback_random = True
    compiled = _CompiledForward(
        torch.compile(eager, backend=backend, mode=mode, dynamic=True), eager
    )
    cell.forward = compiled  # type: ignore[method-assign]
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[probe.device] if probe.device.type == "cuda" else []):
        try:
            outputs, last = compiled.compiled(probe)
            (outputs.sum() + last.sum()).backward()
        except Exception as err:  # fall back to eager, said once
            compiled.fall_back(err)
        finally:
            for parameter in cell.parameters():
                parameter.grad = None
    if compiled.failed:
        del cell.forward  # the class's eager forward again
        if kernel:
            cell.fused = True
        return None
    return time.perf_counter() - started
