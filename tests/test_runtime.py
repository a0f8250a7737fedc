"""Process-level settings: the heap policy (``runtime.keep_freed_memory``, ``MORPHNAS_MALLOC``)
and the CLI's checks of the environment's choices (``MORPHNAS_MALLOC``, ``MORPHNAS_NATIVE``)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
BLOCKS_MB = (64, 40, 100)  # each above glibc's largest dynamic mmap threshold, 32 MB
ROUNDS = 8

# A training step's pattern: each round allocates and touches a few large buffers, then frees
# them. Prints the policy and the minor page faults of the last round. glibc's heap settles
# after a few rounds (``posix_memalign`` splits blocks), so only the last one is counted. Its own
# process, because the policy cannot be undone in the process that set it.
PROBE = f"""
import resource, sys, torch
from morphnas.engine import runtime
policy = runtime.keep_freed_memory() if sys.argv[1] == "keep" else runtime.malloc_policy()
for _ in range({ROUNDS}):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.ones(mb * 2**18) for mb in {BLOCKS_MB}]
    del buffers
print(policy, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(policy: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, policy], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    name, faults = done.stdout.split()
    return name, int(faults)


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt; a no-op elsewhere")
def test_kept_heap_serves_a_freed_block_again_without_page_faults():
    pages = sum(BLOCKS_MB) * 2**20 // resource.getpagesize()
    kept, kept_faults = _probe("keep")
    system, system_faults = _probe("system")
    assert (kept, system) == ("keep", "system")
    assert kept_faults < pages // 10, (kept_faults, pages)
    # The control: under glibc's own policy every round page-faults its buffers in afresh.
    assert system_faults > pages // 2, (system_faults, pages)


@pytest.mark.parametrize(
    ("variable", "value", "choices"),
    [
        ("MORPHNAS_MALLOC", "bogus", "keep or system"),
        ("MORPHNAS_MALLOC", "kept", "keep or system"),
        ("MORPHNAS_NATIVE", "fast", "auto or off"),
    ],
)
def test_an_unknown_environment_choice_is_a_one_line_user_error(variable, value, choices):
    env = {**os.environ, variable: value}
    done = subprocess.run(
        [sys.executable, "-m", "morphnas.cli", "datasets"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and variable in lines[0] and choices in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt; a no-op elsewhere")
@pytest.mark.parametrize(("value", "expected"), [(None, "keep"), ("system", "system")])
def test_the_cli_applies_the_policy_the_environment_asks_for(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "MORPHNAS_MALLOC"}
    if value is not None:
        env["MORPHNAS_MALLOC"] = value
    done = subprocess.run(
        [sys.executable, "-m", "morphnas.cli", "bench", "--quick", "--parts", "cell", "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"malloc": "' + expected + '"' in done.stdout
