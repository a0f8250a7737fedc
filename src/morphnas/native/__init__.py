"""Native (C++) kernels, compiled on first use by ``torch.utils.cpp_extension`` and cached.

Why: the Python sequence kernels spend about as long calling ATen as computing at search and
retraining sizes on a CPU (docs/benchmarks.md). Their C++ twins keep the same formulas with one
loop per node and step, built for this machine (``-O3 -march=native``), the DARTS supernet's
with the batch split into parts, one thread each, for a whole sequence: whole twins of
``spaces.fused_darts`` (the DARTS supernet) and ``cells.fused_darts_cell`` (a derived DARTS
cell), and the time loops of ``spaces.fused_two_input`` and ``cells.fused_two_input_cell``,
whose per-sequence work stays in Python, shared by both kernels.

All kernels are one library (``kernels.cpp``, one translation unit: torch's headers are parsed
once). The first use compiles it, 40–55 s on two cores, into torch's extension
cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``); later processes load
it in milliseconds, and an edit of a source rebuilds it. Without a C++ compiler, or when the
build fails, the Python kernels run instead, after one warning. ``MORPHNAS_NATIVE=off`` asks
for the Python kernels outright.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sysconfig
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from morphnas.errors import UserError

NATIVE_ENV = "MORPHNAS_NATIVE"
"""``auto`` (default): build and use the native kernels where they apply; ``off``: never."""
NATIVE_CHOICES = ("auto", "off")
_SOURCE_DIR = Path(__file__).parent
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]
ACTIVATION_CODES = {"tanh": 0, "sigmoid": 1, "relu": 2, "identity": 3}  # common.h's Activation
build_seconds: float | None = None
"""Seconds the library took to build or load in this process, once asked for (``bench``)."""
_suspended = False  # inside ``python_kernels``


def native_requested() -> str:
    """``MORPHNAS_NATIVE``, checked: ``auto`` when unset."""
    value = os.environ.get(NATIVE_ENV, "auto").strip().lower()
    if value not in NATIVE_CHOICES:
        raise UserError(f"{NATIVE_ENV}={value!r} is not a choice; use auto or off")
    return value


def darts_supernet() -> ModuleType | None:
    """The native DARTS supernet kernel (``darts_supernet.h``), or ``None`` when it is off,
    suspended (``python_kernels``) or cannot be built here (then warned once)."""
    return _kernel("darts_supernet")


def darts_cell() -> ModuleType | None:
    """The native derived DARTS cell kernel (``darts_cell.h``), or ``None`` as above."""
    return _kernel("darts_cell")


def handles(tensor: torch.Tensor) -> bool:
    """Whether the native kernels take ``tensor``'s device and dtype: CPU, float32 or float64
    (elsewhere, on CUDA say, the Python kernels run)."""
    return tensor.is_cpu and tensor.dtype in (torch.float32, torch.float64)


def two_input_cell() -> ModuleType | None:
    """The native loops of a derived two-input cell (``two_input_cell.h``), or ``None`` as above."""
    return _kernel("two_input_cell")


def two_input_supernet() -> ModuleType | None:
    """The native loops of the two-input search cell (``two_input_supernet.h``), or ``None``."""
    return _kernel("two_input_supernet")


def _kernel(name: str) -> ModuleType | None:
    if _suspended or native_requested() == "off":
        return None
    library = _build()
    return None if library is None else getattr(library, name)


@contextlib.contextmanager
def python_kernels() -> Iterator[None]:
    """Inside, the Python kernels run where the native ones would: ``bench`` times both."""
    global _suspended
    saved, _suspended = _suspended, True
    try:
        yield
    finally:
        _suspended = saved


@functools.cache
def _build() -> ModuleType | None:
    global build_seconds
    try:
        from torch.utils import cpp_extension

        started = time.perf_counter()
        with _packaged_ninja():
            module = cpp_extension.load(
                name=f"morphnas_kernels_{_build_tag()}",
                sources=[str(_SOURCE_DIR.absolute() / "kernels.cpp")],  # as _install_identity
                extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as error:  # no compiler or ninja, a failed build: the Python kernel runs
        reason = _first_error_line(str(error)) or type(error).__name__
        warnings.warn(
            f"the native kernels could not be built ({reason}); the Python kernels run "
            f"instead (set {NATIVE_ENV}=off to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    build_seconds = time.perf_counter() - started
    return module


def _build_tag() -> str:
    """A short hash of the CPU's model and flags, of the kernels' sources, of the compiler's
    flags (a version that changes only ``_FLAGS`` must not load a library built without them)
    and of the install (``_install_identity``).

    The CPU: the build is for this CPU (``-march=native``), so a cache shared between machines
    (a network home) keeps one build per kind of CPU. The sources: two versions of morphnas
    sharing a cache each keep their own build, and a process never loads a library that another
    built meanwhile from different sources. The install: two installs of the same version at
    different paths (two checkouts, each with its virtual environment) would otherwise share one
    entry and rebuild it in turn, 20–28 s each time, since torch's ``build.ninja`` names the
    sources' and torch's paths, and ninja rebuilds whenever a build command changes.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
        identity = "\n".join(sorted(set(lines)))
    except OSError:
        identity = platform.processor() or platform.machine()
    digest = hashlib.sha1(identity.encode())
    digest.update(" ".join(_FLAGS).encode())
    for source in sorted(_SOURCE_DIR.glob("*.[ch]*")):  # kernels.cpp and the headers
        digest.update(source.name.encode() + source.read_bytes())
    for part in _install_identity():
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:8]


def _install_identity() -> list[str]:
    """What torch writes into the build's ``build.ninja`` besides the flags: the sources'
    directory, torch's include and library directories (its virtual environment), Python's
    headers and the compiler (``CXX``); and torch's version.

    Why not the sources' contents alone (one entry for identical sources wherever installed):
    the build commands would still differ by these paths, and ninja rebuilds a target whose
    command changed, so two such installs would rebuild one entry in turn, as before. Each install
    builds once (``make setup``), into its own entry; another install, or an install moved or
    with its torch upgraded, gets a new one and never rebuilds another's.
    """
    from torch.utils import cpp_extension

    return [
        str(_SOURCE_DIR.absolute()),
        *cpp_extension.include_paths(),
        *cpp_extension.library_paths(),
        sysconfig.get_path("include"),
        os.environ.get("CXX", "c++"),
        torch.__version__,
    ]


@contextlib.contextmanager
def _packaged_ninja() -> Iterator[None]:
    """During the build, the ``ninja`` package's binary (a dependency) first on ``PATH``, whatever
    else is there, and the caller's ``PATH`` back after it.

    Why: ninja versions record their build commands differently, so a library one version built
    is built again by another. With Debian's ninja 1.11 in ``/usr/bin`` and the package's 1.13 in
    the virtual environment, ``make setup`` (not activated: 1.11) and ``morphnas`` in the activated
    environment (1.13) each rebuilt the kernels, 40–48 s, whenever one followed the other. Without
    the package (another install), whichever ninja is on ``PATH`` builds.
    """
    try:
        import ninja
    except ImportError:
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _first_error_line(message: str) -> str:
    """The compiler's first ``error:`` line of a failed build (the whole log is pages long)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [""])[0][:300]
