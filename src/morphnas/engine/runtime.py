"""Process-level policy: seeds, the number of threads and how freed memory is kept."""

from __future__ import annotations

import ctypes
import os
import random
import sys
import time
from pathlib import Path

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


MULTITHREAD_FROM = 2048
"""``batch × hidden`` from which a workload gets every core; below it, one intra-op thread.

From the ``threads`` bench part (``morphnas bench --parts threads``, docs/benchmarks.md) on the
2-core CPU. Until the native kernels of the DARTS supernet and of the derived DARTS cell split
the batch into parts, one thread each (2026-11-24), it was 4096: at 2048 a second thread won
1.34× and 1.40× for the supernet but lost 0.85× once, and the derived DARTS cell lost 1.76× at
batch 64 × hidden 32. With the parts, at batch 64 × hidden 32 (the search default) two threads
made the search epoch 1.43× (``darts_rnn``) and 1.33× (``two_input``) faster, the derived DARTS
cell's step 1.2–1.3×, ``nn.LSTM``'s 1.2× and the derived two-input cell's 1.1× (GDAS on
``two_input``, 3 % slower, was the one loss), and the supernet sweep won at every size from
1,024 (1.15×). One count serves a whole run (search, retraining, baselines), so it is lowered
only as far as everything measured agrees. Re-measure on other machines; ``--threads``
overrides it.
"""


def choose_threads(
    hidden_size: int,
    batch_size: int,
    requested: int | None = None,
    *,
    device: torch.device | None = None,
    busy: float = 0.0,
) -> int:
    """Intra-op threads for a recurrent workload, unless the user asked for a number.

    Recurrent cells run many small kernels; on few cores, splitting a ``batch × hidden`` matmul
    across threads costs more in synchronisation than it gains until the tensors are large
    enough (on the 2-core CI machines, the supernet step on its Python kernel at batch 32,
    hidden 64 took 0.186 s on one thread and 0.213 s on two). Problems below
    ``MULTITHREAD_FROM`` get one thread, larger ones every core that other processes leave free
    (``busy``: how many cores they keep busy, ``busy_cores``). The native kernels' threads meet
    hundreds of times a time step, so a thread that has to share its core with another process
    holds up the others: beside one CPU-bound process on 2 cores, a search epoch took 5.0 s on
    two threads and 0.60 s on one (docs/bench/journal-benchmarks.md). On a CUDA ``device`` the
    host threads only launch kernels, so the current count is kept rather than changed for nothing.
    """
    if requested is not None:
        return requested
    if device is not None and device.type == "cuda":
        return torch.get_num_threads()
    if batch_size * hidden_size < MULTITHREAD_FROM:
        return 1
    return max(1, min(cpu_cores(), int(cpu_cores() - busy + 0.5)))


BUSY_WINDOW = 0.25
"""Seconds ``busy_cores`` watches the machine: at 100 ticks a second, 1/25 of a core."""


def _cpu_ticks() -> tuple[int, int, int]:
    """All cores' busy and total clock ticks since boot, and the number of cores counted."""
    lines = Path("/proc/stat").read_text(encoding="ascii").splitlines()
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, lines[0].split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    cores = sum(1 for line in lines[1:] if line.startswith("cpu"))
    return busy, busy + idle + iowait, cores


def busy_cores(window: float = BUSY_WINDOW) -> float | None:
    """How many cores other processes keep busy: the machine's busy time over ``window``
    seconds less this process's own, per second. ``None`` where ``/proc/stat`` cannot tell
    (not Linux). A snapshot at the start of a run, not a forecast: the run keeps what it chose.
    """
    try:
        busy_before, total_before, cores = _cpu_ticks()
        own_before = time.process_time()
        time.sleep(window)
        busy_after, total_after, _ = _cpu_ticks()
        own = time.process_time() - own_before
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    elapsed = (total_after - total_before) / hz / max(1, cores)
    if elapsed <= 0:
        return None
    others = (busy_after - busy_before) / hz - own
    return min(float(cores), max(0.0, others / elapsed))


def apply_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


MALLOC_ENV = "MORPHNAS_MALLOC"
"""``keep`` (the CLI's default): glibc's malloc keeps freed memory for reuse; ``system``: its own
policy. See ``keep_freed_memory``."""
MALLOC_POLICIES = ("keep", "system")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEEP_BELOW = 1 << 30  # allocations up to 1 GiB come from the heap, and stay there once freed
_heap = "system"


def malloc_policy_requested() -> str:
    """``MORPHNAS_MALLOC``, checked: ``keep`` when unset."""
    value = os.environ.get(MALLOC_ENV, "keep").strip().lower()
    if value not in MALLOC_POLICIES:
        raise UserError(f"{MALLOC_ENV}={value!r} is not a policy; use keep or system")
    return value


def keep_freed_memory() -> str:
    """Have glibc's malloc keep freed memory in the heap for the next allocation to reuse.

    Why: the fused kernels allocate whole-sequence buffers, hundreds of MB at the DARTS size.
    glibc serves any block above 32 MB with a fresh ``mmap`` and unmaps it on ``free``, so every
    training step page-faults all its buffers in again. At the DARTS size that is about 900,000
    minor faults a step, and the step took 5.5–9.2 s instead of 3.6–4.8 s on the 2-core CI
    machine; an end-to-end search there ran 1.3–1.5× faster kept (docs/bench/journal-benchmarks.md).
    Raising the mmap threshold to 1 GiB and never trimming keeps the memory for the next step;
    the process's resident memory then stays at its peak, as with PyTorch's CUDA caching
    allocator, and the peak can be a few % higher (the heap fragments; 7 % in a retraining).

    The CLI applies it at start unless ``MORPHNAS_MALLOC=system``; library users call it
    themselves. A no-op off glibc (Linux only). Returns the policy now in effect.
    """
    global _heap
    if _heap == "keep" or not sys.platform.startswith("linux"):
        return _heap
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return _heap
    if mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW) and mallopt(_M_TRIM_THRESHOLD, -1):
        _heap = "keep"
    return _heap


def malloc_policy() -> str:
    """``keep`` once ``keep_freed_memory`` took effect in this process, else ``system``."""
    return _heap


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
