"""Process-level policy: seeds and the number of threads."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from morphnas.errors import UserError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run with the same seed repeats on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_cores() -> int:
    """The machine's logical cores (1 when Python cannot tell)."""
    return os.cpu_count() or 1


MULTITHREAD_FROM = 8192
"""``batch × hidden`` from which a workload gets every core; below it, one intra-op thread.

The ``crossover_product`` of the ``threads`` bench part (``morphnas bench --parts threads``,
docs/benchmarks.md), measured on the 2-core CPU with the other jobs paused (2026-11-23): the
fused supernet's step at batch × hidden ≤ 4096 ran up to 17 % slower on two threads, from 8192
up it ran 1.0–1.6× faster. Re-measure on other machines; ``--threads`` overrides it.
"""


def choose_threads(
    hidden_size: int,
    batch_size: int,
    requested: int | None = None,
    *,
    device: torch.device | None = None,
) -> int:
    """Intra-op threads for a recurrent workload, unless the user asked for a number.

    Recurrent cells run many small kernels; on few cores, splitting a ``batch × hidden`` matmul
    across threads costs more in synchronisation than it gains until the tensors are large (on
    the 2-core CI machines, the supernet step at batch 64, hidden 64 took 0.28 s on one thread
    and 0.31 s on two). Problems below ``MULTITHREAD_FROM`` get one thread, larger
    ones every core. On a CUDA ``device`` the host threads only launch kernels, so the current
    count is kept rather than changed for nothing.
    """
    if requested is not None:
        return requested
    if device is not None and device.type == "cuda":
        return torch.get_num_threads()
    return cpu_cores() if batch_size * hidden_size >= MULTITHREAD_FROM else 1


def apply_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda") from None
