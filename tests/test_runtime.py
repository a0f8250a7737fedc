"""Process-level settings: the heap policy (``runtime.keep_freed_memory``, ``MORPHNAS_MALLOC``),
the CLI's checks of the environment's choices (``MORPHNAS_MALLOC``, ``MORPHNAS_NATIVE``), and
the thread count chosen from the problem's size and the cores other processes leave free."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from morphnas import api, cli, runs
from morphnas import config as config_mod
from morphnas.engine import runtime
from morphnas.errors import UserError
from morphnas.tasks.forecasting import Forecasting

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


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core machine, whatever this one has; the caller's thread count restored after."""
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("batch", "busy", "expected"),
    [(64, 0.0, 2), (64, 0.4, 2), (64, 0.6, 1), (64, 1.0, 1), (64, 2.0, 1), (16, 0.0, 1)],
)
def test_threads_leave_out_the_cores_other_processes_keep_busy(two_cores, batch, busy, expected):
    # batch 64 × hidden 64 is above the size threshold, 16 × 64 below it: one thread regardless.
    assert runtime.choose_threads(64, batch, busy=busy) == expected
    assert runtime.choose_threads(64, batch, 2, busy=busy) == 2  # asked for: kept


def test_busy_cores_is_the_machines_busy_time_less_this_process(monkeypatch):
    # Two cores over one second (100 ticks each): 150 busy ticks, of which 0.5 s were ours.
    ticks = iter([(1000, 5000, 2), (1150, 5200, 2)])
    own = iter([3.0, 3.5])
    monkeypatch.setattr(runtime, "_cpu_ticks", lambda: next(ticks))
    monkeypatch.setattr(runtime.time, "process_time", lambda: next(own))
    monkeypatch.setattr(runtime.os, "sysconf", lambda name: 100)
    assert runtime.busy_cores(window=0.0) == pytest.approx(1.0)


def test_busy_cores_is_none_where_the_machine_cannot_tell(monkeypatch):
    def unreadable() -> tuple[int, int, int]:
        raise FileNotFoundError("/proc/stat")

    monkeypatch.setattr(runtime, "_cpu_ticks", unreadable)
    assert runtime.busy_cores(window=0.0) is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads /proc/stat (Linux)")
def test_busy_cores_sees_another_process_spinning():
    spin = "import time\nprint(flush=True)\nend = time.time() + 30\nwhile time.time() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()  # spinning from here
        busy = runtime.busy_cores(window=0.5)
    finally:
        child.kill()
        child.wait()
    assert busy is not None and busy >= 0.5  # one core's worth, less what the scheduler took


def _config(tmp_path: Path, **overrides) -> config_mod.RunConfig:
    base = {"out": str(tmp_path / "run"), "device": "cpu"}
    base["space"] = {"hidden": 64}
    base["search"] = {"batch_size": 64}  # 4,096 ≥ MULTITHREAD_FROM: every free core
    return config_mod.resolve(overrides=config_mod.merge(base, overrides))


def test_a_run_on_a_busy_machine_says_so_takes_the_free_cores_and_saves_the_count(
    two_cores, monkeypatch, tmp_path
):
    monkeypatch.setattr(api, "busy_cores", lambda: 1.0)
    config = _config(tmp_path)
    with pytest.warns(UserWarning, match=r"keep 1\.0 of this machine's 2 cores busy.*--threads"):
        api._start_run(config.out, config, "search")
    assert torch.get_num_threads() == 1
    saved = config_mod.resolve(config.out / "config.yaml")
    assert saved.threads == 1  # the resolved config pins it, so a resume runs as the run began

    def not_again() -> float:
        raise AssertionError("a saved thread count is not chosen again")

    monkeypatch.setattr(api, "busy_cores", not_again)
    assert api._apply_thread_policy(saved) == 1


@pytest.mark.parametrize("threads", [None, 2])
def test_a_quiet_machine_or_a_chosen_count_runs_as_the_size_says(
    two_cores, monkeypatch, tmp_path, threads
):
    monkeypatch.setattr(api, "busy_cores", lambda: 0.2 if threads is None else 1.0)
    config = _config(tmp_path, threads=threads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api._start_run(config.out, config, "search")
    assert torch.get_num_threads() == 2
    assert config_mod.resolve(config.out / "config.yaml").threads == 2


def test_evaluate_scores_at_the_runs_own_thread_count(two_cores, monkeypatch, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = _config(tmp_path, threads=1)
    (run / "config.yaml").write_text(config_mod.dump(config), encoding="utf-8")
    (run / "summary.json").write_text('{"models": [], "results": []}', encoding="utf-8")
    monkeypatch.setattr(Forecasting, "load", lambda self: None)  # no model to score
    torch.set_num_threads(2)
    api.evaluate(run)
    assert torch.get_num_threads() == 1


def test_a_resume_may_change_the_thread_count_and_the_saved_config_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = _config(tmp_path, threads=2)
    (run / "config.yaml").write_text(config_mod.dump(config), encoding="utf-8")
    assert api.resume_config(run).threads == 2
    resumed = cli._resumed("search", run, threads=1)
    assert resumed.threads == 1
    assert config_mod.resolve(run / "config.yaml").threads == 2  # not before the run writes
    runs.continue_run(run, resumed, None)()  # the repairs its first metrics row runs
    saved = config_mod.resolve(run / "config.yaml")
    assert saved.threads == 1  # the next resume goes on with it
    assert saved.model_copy(update={"threads": 2}) == config  # and nothing else changed
    with pytest.raises(UserError, match="drop --epochs"):
        cli._resumed("search", run, threads=1, epochs=3)
