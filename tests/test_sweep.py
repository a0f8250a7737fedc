"""``morphnas sweep``: a grid × seeds as Ray Tune trials, each exactly ``api.search`` of its
config; its table, its reuse after a killed driver, and its one-line errors.

One local Ray session (2 CPUs) serves the module's in-process sweeps (``distributed.session``
uses a session already open and leaves it open); it is shut down at the module's end."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import run_cli
from morphnas import api, cli, distributed, run_files
from morphnas import config as config_mod

ray = pytest.importorskip("ray")

COMPARED = ("search_valid_loss", "params", "nodes", "valid_rse", "test_rse", "test_corr")


@pytest.fixture(scope="module")
def ray_session():
    """Local Ray on 2 CPUs for the module, its files in a short temporary folder."""
    temp = tempfile.mkdtemp(prefix="mn-ray-test-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def tiny_base(csv: Path) -> dict:
    """`TINY_RUN` as a config mapping, without baselines (a sweep scores the searched cell)."""
    return {
        "data": {"csv": str(csv), "window": 8},
        "space": {"nodes": 2, "hidden": 8},
        "search": {"epochs": 1},
        "train": {"epochs": 2, "baselines": []},
        "threads": 1,
    }


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def grid_spec(csv: Path) -> dict:
    return {"base": tiny_base(csv), "grid": {"search.strategy": ["darts", "random"]}, "seeds": 2}


def sweep_json(*args: str) -> dict:
    done = CliRunner().invoke(cli.app, ["sweep", *args, "--cpus-per-trial", "1", "--json"])
    assert done.exit_code == 0, (done.output, done.exception)
    return json.loads(done.stdout)


def test_a_sweep_runs_every_variant_and_seed_as_search_does(ray_session, tmp_path, synthetic_csv):
    """2 variants × 2 seeds: four finished run dirs, the table their mean ± std, sweep.json
    the same, and a trial's figures those of ``api.search`` of its config run here."""
    spec = write_spec(tmp_path / "spec.yaml", grid_spec(synthetic_csv))
    out = tmp_path / "sweep"
    result = sweep_json(str(spec), "--out", str(out))
    names = ["strategy=darts", "strategy=random"]
    trials = result["trials"]
    assert [(t["variant"], t["seed"]) for t in trials] == [(n, s) for s in (0, 1) for n in names]
    assert all(t["state"] == "finished" for t in trials)
    for t in trials:
        assert (out / f"{t['variant']}-seed{t['seed']}" / "summary.json").is_file()
    table = {row["variant"]: row for row in result["results"]}
    for name in names:
        values = [t["test_rse"] for t in trials if t["variant"] == name]
        mean = sum(values) / 2
        assert table[name]["test_rse"] == pytest.approx(mean)
        std = (sum((v - mean) ** 2 for v in values)) ** 0.5  # n - 1 = 1
        assert table[name]["test_rse_std"] == pytest.approx(std)
        assert table[name]["seeds"] == 2 and table[name]["stopped"] == 0
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["table"] == result["results"] and saved["trials"] == trials
    assert result["best"] == min(names, key=lambda n: table[n]["valid_rse"])
    # The same search, sequential, in this process, at the same thread count.
    cfg = config_mod.resolve(out / "strategy=random-seed1" / "config.yaml")
    alone = api.search(cfg.model_copy(update={"out": tmp_path / "alone"}))
    row = {**alone.extra, **next(r for r in alone.results if r["model"] == "searched")}
    trial = next(t for t in trials if (t["variant"], t["seed"]) == ("strategy=random", 1))
    for key in COMPARED:
        assert trial[key] == row[key], key


def fake_search(loss: float, metrics: Path, progress) -> dict:
    """A run's shape without its cost: three search epochs at ``loss`` in ``metrics.jsonl``,
    each phase announced to ``progress`` as the engine does, and a warning."""
    log = run_files.MetricsLog(metrics)
    for epoch in (1, 2, 3):
        progress.start(f"search epoch {epoch}/3", 1)
        log.append({"phase": "search", "epoch": epoch, "valid_loss": loss})
        time.sleep(0.5)  # time for the driver to act on the report
    progress.start("train searched", 1)
    warnings.warn(f"run at loss {loss} ends", stacklevel=1)
    return {"loss": loss}


def test_asha_stops_the_trials_worse_than_the_first_at_its_rung(ray_session, tmp_path):
    """One trial at a time, the first the best: ASHA (rungs at epochs 1, 2) stops the others at
    epoch 1 on the losses read from their metrics files; their warnings reach the driver, and
    ``finished`` hears of every end, in the driver."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    trials = [
        distributed.Trial(
            f"t{loss}",
            functools.partial(fake_search, loss, tmp_path / f"{loss}.jsonl"),
            tmp_path / f"{loss}.jsonl",
        )
        for loss in (1.0, 2.0, 3.0)
    ]
    plan = distributed.Plan(cpus=1, concurrent=1, asha_epochs=3, reduction_factor=2)
    heard, shown = {}, []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warnings, "showwarning", lambda message, *_: shown.append(str(message)))
        outcomes = distributed.run(trials, plan, finished=heard.__setitem__)
    assert outcomes[0].row == {"loss": 1.0}
    assert [o.stopped for o in outcomes] == [False, True, True]
    assert heard == dict(enumerate(outcomes))
    assert "run at loss 1.0 ends" in shown


@pytest.mark.long
def test_a_killed_driver_continues_with_the_missing_trials(ray_session, tmp_path, synthetic_csv):
    """SIGKILL the driver once one trial finished: the same command again runs only the trials
    without a summary, leaving the finished ones as they were (bytes and mtime); and nothing the
    killed driver started outlives it for long (Ray's node agents wait about a minute on the
    dead head before they exit)."""
    spec = write_spec(tmp_path / "spec.yaml", grid_spec(synthetic_csv))
    out = tmp_path / "sweep"
    args = ["sweep", str(spec), "--out", str(out), "--cpus-per-trial", "1"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "morphnas.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: whatever it leaves can be found
    )
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*/summary.json")):
            assert driver.poll() is None and time.monotonic() < deadline, "no trial finished"
            time.sleep(0.2)
        started = _family(driver.pid)  # Ray's processes; its workers have groups of their own
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        # A killed driver's trials run on for a few seconds, its node agents about a minute:
        # restarted before they end, a trial would meet its own run finishing under it.
        assert _alive(started, wait_s=90) == []
    finally:
        _kill(started | {driver.pid})
        _remove_ray_folders(driver.pid)
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*/summary.json")}
    assert 1 <= len(kept) < 4
    result = sweep_json(*args[1:])
    assert all(t["state"] == "finished" for t in result["trials"])
    assert len(list(out.glob("*/summary.json"))) == 4
    for path, (data, mtime) in kept.items():
        assert (path.read_bytes(), path.stat().st_mtime_ns) == (data, mtime)


def _family(pgid: int) -> set[int]:
    """The processes of group ``pgid`` and all their descendants (from ``/proc``)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))  # ppid, pgrp
    family = {pid for pid, (_, group) in parents.items() if group == pgid}
    while grown := {pid for pid, (ppid, _) in parents.items() if ppid in family} - family:
        family |= grown
    return family


def _alive(pids: set[int], wait_s: float) -> list[int]:
    """Those of ``pids`` still running after up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _remove_ray_folders(pid: int) -> None:
    """The killed driver's Ray and Tune folders (deleted by the driver on a normal exit)."""
    temp = Path(tempfile.gettempdir())
    for folder in [*temp.glob("morphnas-ray-*"), *temp.glob(f"morphnas-tune-{pid}-*")]:
        if folder.name.startswith("morphnas-tune") or any(folder.glob(f"session_*_{pid}")):
            shutil.rmtree(folder, ignore_errors=True)


def _kill(pids: set[int]) -> None:
    """End what the test's driver left running, if anything (a failed test)."""
    for pid in _alive(pids, wait_s=0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"grids": {}}, ["unknown key 'grids'", "spec.yaml"]),
        ({"grid": {}}, ["grid is empty"]),
        ({"grid": {"search.epochz": [1, 2]}}, ["search.epochz", "unknown key", "epochs"]),
        ({"grid": {"search.strategy": []}}, ["search.strategy", "no values"]),
    ],
    ids=["unknown-spec-key", "empty-grid", "unknown-config-key", "no-values"],
)
def test_a_bad_spec_is_one_line_before_anything_runs(tmp_path, synthetic_csv, change, fragments):
    spec = write_spec(tmp_path / "spec.yaml", {**grid_spec(synthetic_csv), **change})
    code, lines = run_cli("sweep", str(spec), "--out", str(tmp_path / "sweep"))
    assert code == 2 and len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "sweep").exists()


def test_an_unreachable_address_is_one_line_within_30_s(tmp_path, synthetic_csv):
    spec = write_spec(tmp_path / "spec.yaml", grid_spec(synthetic_csv))
    started = time.monotonic()
    code, lines = run_cli(
        "sweep", str(spec), "--out", str(tmp_path / "sweep"), "--address", "127.0.0.1:1"
    )
    assert time.monotonic() - started < 30
    assert code == 2 and len(lines) == 1, lines
    assert "--address 127.0.0.1:1" in lines[0] and "ray start --head" in lines[0]
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_without_ray_several_runs_at_once_say_what_to_install(
    tmp_path, synthetic_csv, monkeypatch, command
):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: import fails
    spec = write_spec(tmp_path / "spec.yaml", grid_spec(synthetic_csv))
    args = {
        "compare": ["compare", "--csv", str(synthetic_csv), "--jobs", "2"],
        "sweep": ["sweep", str(spec)],
    }[command]
    code, lines = run_cli(*args, "--out", str(tmp_path / "out"))
    assert code == 2 and len(lines) == 1, lines
    assert "pip install 'morphnas[ray]'" in lines[0]
    assert not (tmp_path / "out").exists()
