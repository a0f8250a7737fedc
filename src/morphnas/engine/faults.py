"""Fault injection for the crash tests: kill this process at a named point of a run.

``MORPHNAS_CRASH_AT="point:n[:SIGNAL]"`` sends ``SIGNAL`` (default ``KILL``) to the process the
``n``-th time it passes ``point``: ``step`` (after a search weight step), ``growth`` (just after
the backbone grew, before the epoch's checkpoint), ``checkpoint`` (a checkpoint's temp file is
written and synced, not yet renamed), ``train-step`` (after a retraining step), ``rl-update``
(after a PPO update of ``--task rl``). Unset, each call is one dictionary lookup. Tests use it
to prove that a resumed run ends exactly where an uninterrupted one does, whatever moment the
crash hits.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_passed: Counter[str] = Counter()


def crash_point(point: str) -> None:
    spec = os.environ.get("MORPHNAS_CRASH_AT")
    if not spec:
        return
    name, count, *sig = spec.split(":")
    if name != point:
        return
    _passed[point] += 1
    if _passed[point] == int(count):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig[0] if sig else 'KILL'}"))
