"""Where the figures come from: device, CPU, versions, load and native kernels of this run."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from morphnas import native
from morphnas.engine.runtime import malloc_policy


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def machine_info(device: torch.device, quick: bool) -> dict[str, Any]:
    """Where the figures come from; the load average says whether the CPU was shared."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": name,
        "cpu_name": _cpu_name(),
        "cpu_count": os.cpu_count() or 1,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "load_average_1min": load,
        "malloc": malloc_policy(),  # "keep": freed memory reused (runtime.keep_freed_memory)
        "native": native_kernels(device),
        "quick": quick,
    }


def native_kernels(device: torch.device) -> dict[str, float | None]:
    """Per native kernel, the seconds its library took to build (or load from the cache) in this
    run, or ``None`` where it does not run: off, not built here, or not on this device (CPU
    only). The kernels share one library, so those that run report the same seconds."""
    kernels = {
        "darts_supernet": native.darts_supernet,
        "darts_cell": native.darts_cell,
        "two_input_cell": native.two_input_cell,
        "two_input_supernet": native.two_input_supernet,
    }
    return {
        name: native.build_seconds if device.type == "cpu" and kernel() is not None else None
        for name, kernel in kernels.items()
    }
