"""``--force`` starts fresh: the old run in ``--out`` is moved aside before the new one writes
anything and deleted once it has started (``morphnas.runs``), so a forced run is bit for bit a
run in an empty directory, and a directory never holds two runs."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from conftest import morphnas, without_times
from morphnas import api, config, runs, suite
from morphnas.errors import UserError
from morphnas.genotype import KNOWN
from morphnas.tasks.forecasting import Forecasting

TINY = {
    "data": {"dataset": "synthetic", "window": 6},
    "space": {"nodes": 2, "hidden": 6},
    "search": {"epochs": 2, "batch_size": 128},
    "train": {"epochs": 2, "baselines": []},
    "threads": 1,
}


def tiny(out: Path, **overrides) -> config.RunConfig:
    return config.resolve(overrides=config.merge(config.merge(TINY, overrides), {"out": str(out)}))


def record(run: Path) -> dict:
    """What a run left: its file names and, wall-clock fields aside, its records."""
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    out = {"files": [f for f in files if not f.startswith("plots/")]}
    out["metrics"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for name in ("summary.json", "genotype.json", "selection.json"):
        if (run / name).is_file():
            out[name] = json.loads((run / name).read_text())
    return without_times(out)


def config_of(run: Path) -> str:
    """A run's config.yaml without its ``out`` line (the one field two equal runs differ in)."""
    lines = (run / "config.yaml").read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith("out:"))


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".old-" in p.name]


def test_forced_search_equals_a_fresh_one_and_reads_nothing_old(tmp_path):
    """Same shapes (the GRU baseline, the candidates of ``select: valid``): the old run's
    models, train checkpoints and selection.json would be reused silently; none is."""
    same_shapes = {
        "search": {"select": "valid", "candidates": 2, "select_epochs": 1},
        "train": {"baselines": ["gru"]},
    }
    api.search(tiny(tmp_path / "d", seed=0, **same_shapes))
    assert (tmp_path / "d" / "selection.json").is_file()
    new = config.merge(same_shapes, {"seed": 1, "search": {"epochs": 3}, "train": {"epochs": 1}})
    forced = api.search(tiny(tmp_path / "d", **new), force=True)
    fresh = api.search(tiny(tmp_path / "e", **new))
    assert record(tmp_path / "d") == record(tmp_path / "e")
    assert without_times(forced.results) == without_times(fresh.results)
    assert config_of(tmp_path / "d") == config_of(tmp_path / "e")
    no_leftovers(tmp_path)


def test_forced_train_over_another_cell_does_not_crash(tmp_path):
    """Another genotype and width: the old models/genotype.pt once crashed the load."""
    api.train(tiny(tmp_path / "d", space={"hidden": 8}), genotype=KNOWN["gru"])
    forced = api.train(tiny(tmp_path / "d"), genotype=KNOWN["lstm"], force=True)
    fresh = api.train(tiny(tmp_path / "e"), genotype=KNOWN["lstm"])
    assert without_times(forced.results) == without_times(fresh.results)
    assert record(tmp_path / "d") == record(tmp_path / "e")
    no_leftovers(tmp_path)


TRAIN_GRU = [
    "train", "--baseline", "gru", "--dataset", "synthetic", "--window", "6", "--hidden", "4",
    "--threads", "1", "--json",
]  # fmt: skip


def test_cli_train_gru_force_then_killed_then_resumed(tmp_path):
    """The issue's case: ``train --baseline gru --force`` with other epochs and seed reported
    the old model's test RSE. Then a forced run killed early leaves only itself behind, and
    resumes to what an uninterrupted run gives."""
    d, e, f = tmp_path / "d", tmp_path / "e", tmp_path / "f"
    old = morphnas(*TRAIN_GRU, "--retrain-epochs", "2", "--seed", "0", "--out", str(d))
    assert old.returncode == 0, old.stderr
    new = ["--retrain-epochs", "1", "--seed", "1"]
    forced = morphnas(*TRAIN_GRU, *new, "--out", str(d), "--force")
    fresh = morphnas(*TRAIN_GRU, *new, "--out", str(e))
    assert forced.returncode == fresh.returncode == 0, forced.stderr + fresh.stderr
    assert (
        json.loads(forced.stdout)["results"][0]["test_rse"]
        != json.loads(old.stdout)["results"][0]["test_rse"]
    )
    assert without_times(json.loads(forced.stdout)["results"]) == without_times(
        json.loads(fresh.stdout)["results"]
    )
    assert record(d) == record(e)
    assert [r["epoch"] for r in record(d)["metrics"]] == [1]

    again = ["--retrain-epochs", "3", "--seed", "2"]
    killed = morphnas(*TRAIN_GRU, *again, "--out", str(d), "--force", crash="train-step:3")
    assert killed.returncode != 0
    only_new = {
        "run.json",
        "config.yaml",
        "model.json",
        "metrics.jsonl",
        "checkpoints",
    }  # no summary
    assert {p.name for p in d.iterdir()} <= only_new
    assert "seed: 2" in (d / "config.yaml").read_text().splitlines()
    resumed = morphnas("train", "--resume", str(d), "--json")
    uninterrupted = morphnas(*TRAIN_GRU, *again, "--out", str(f))
    assert resumed.returncode == uninterrupted.returncode == 0, resumed.stderr
    assert without_times(json.loads(resumed.stdout)["results"]) == without_times(
        json.loads(uninterrupted.stdout)["results"]
    )
    assert record(d)["metrics"] == record(f)["metrics"]
    no_leftovers(tmp_path)


def fake_run(run: Path) -> dict[str, bytes]:
    """An old run's files (contents do not matter: ``--force`` reads none of them)."""
    (run / "models").mkdir(parents=True)
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "models/gru.pt"):
        (run / name).write_text(f"old {name}\n")
    return snapshot(run)


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_force_refuses_to_delete_what_is_not_an_old_run(tmp_path, monkeypatch, synthetic_csv):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("do not lose me")
    with pytest.raises(UserError, match="no morphnas run"):
        api.train(tiny(mine), baseline="gru", force=True)
    assert (mine / "precious.txt").read_text() == "do not lose me"

    old = tmp_path / "old"
    fake_run(old)
    inside = old / "series.csv"
    inside.write_bytes(synthetic_csv.read_bytes())
    kept = snapshot(old)
    with pytest.raises(UserError, match="an input of this run"):
        api.train(tiny(old, data={"csv": str(inside)}), baseline="gru", force=True)
    monkeypatch.chdir(old / "models")
    with pytest.raises(UserError, match="working directory"):
        api.train(tiny(old), baseline="gru", force=True)
    monkeypatch.chdir(tmp_path)
    assert snapshot(old) == kept

    done = morphnas(*TRAIN_GRU, "--out", str(mine), "--force")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "no morphnas run" in lines[0], done.stderr
    assert (mine / "precious.txt").read_text() == "do not lose me"


def test_a_forced_run_that_fails_to_start_keeps_the_old_run(tmp_path, monkeypatch):
    old = tmp_path / "d"
    kept = fake_run(old)
    # A mistake found before the start (in the data, read after the claim): nothing moved.
    with monkeypatch.context() as patch:
        patch.setattr(Forecasting, "load", lambda _: _raise(UserError("bad data")))
        for command in (api.search, lambda cfg, force: api.train(cfg, baseline="gru", force=force)):
            with pytest.raises(UserError, match="bad data"):
                command(tiny(old), force=True)
            assert snapshot(old) == kept
    # The start itself fails (disk full): the old run is put back as it was.
    monkeypatch.setattr(api.config_mod, "dump", lambda _: _raise(OSError(errno.ENOSPC, "full")))
    with pytest.raises(UserError, match="cannot write to output directory"):
        api.train(tiny(old), baseline="gru", force=True)
    assert snapshot(old) == kept
    no_leftovers(tmp_path)


def _raise(err: BaseException):
    raise err


def test_a_directory_that_cannot_be_renamed_is_emptied_in_place(tmp_path, monkeypatch):
    """A mount point (or a parent one may not write) cannot be renamed: its entries go to a
    hidden folder inside, deleted after the start, or moved back if the start fails."""
    old = tmp_path / "d"
    kept = fake_run(old)
    rename = Path.rename

    def no_dir_rename(self, target):
        if Path(self) == old.resolve():
            raise OSError(errno.EBUSY, "busy")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", no_dir_rename)

    def fails():
        (old / "config.yaml").write_text("new, half written")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.replace_run(old, fails)
    assert snapshot(old) == kept
    runs.replace_run(old, lambda: (old / "config.yaml").write_text("new"))
    assert snapshot(old) == {"config.yaml": b"new"}
    assert [p.name for p in old.iterdir()] == ["config.yaml"]
    no_leftovers(tmp_path)


def test_a_symlinked_out_keeps_pointing_at_the_new_run(tmp_path):
    real = tmp_path / "real"
    fake_run(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    runs.replace_run(link, lambda: (link / "config.yaml").write_text("new"))
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert snapshot(real) == {"config.yaml": b"new"}
    no_leftovers(tmp_path)


COMPARE = [("none", {"growth": {"mode": "none"}})]


def test_compare_force_replaces_every_earlier_run(tmp_path):
    d = tmp_path / "d"
    api.compare(tiny(d, search={"epochs": 1}), COMPARE, [0])
    (d / "stray-seed7").mkdir()  # whatever the old compare held goes with it
    new = {"search": {"epochs": 1}, "train": {"epochs": 1}}
    forced = api.compare(tiny(d, **new), COMPARE, [1], force=True)
    fresh = api.compare(tiny(tmp_path / "e", **new), COMPARE, [1])
    assert sorted(p.name for p in d.iterdir()) == ["compare.json", "config.yaml", "none-seed1"]
    assert without_times(forced.extra["runs"]) == without_times(fresh.extra["runs"])
    assert record(d / "none-seed1") == record(tmp_path / "e" / "none-seed1")
    with pytest.raises(UserError, match="only one of the two"):
        api.compare(tiny(d), COMPARE, [1], force=True, reuse=True)
    assert (d / "none-seed1" / "summary.json").is_file()
    no_leftovers(tmp_path)


def test_benchmark_force_starts_over(tmp_path):
    out = tmp_path / "bench"
    budget = {"search": {"epochs": 1}, "train": {"epochs": 1, "baselines": ["gru"]},
              "space": {"nodes": 2, "hidden": 4}, "threads": 1}  # fmt: skip
    kwargs = {"quick": True, "overrides": budget, "out": out, "peers": False}
    suite.benchmark(["synthetic"], [0], **kwargs)
    suite.benchmark(["synthetic"], [1], force=True, **kwargs)
    assert not (out / "synthetic-seed0").exists() and (out / "synthetic-seed1").is_dir()
    written = json.loads((out / "benchmark.json").read_text())
    assert {row["seed"] for row in written["runs"]} == {1}
    no_leftovers(tmp_path)


def test_resume_refuses_a_run_of_the_other_command_before_touching_it(tmp_path: Path):
    """`train --resume` on a stopped search would finish it as a one-model run (its search lost),
    and `search --resume` on a train run would run a whole search inside it: both refused in one
    line, naming the command that continues the run, with every file as it was."""
    search_dir, train_dir = tmp_path / "s", tmp_path / "t"
    for run_dir, kind in ((search_dir, "search"), (train_dir, "train")):
        cfg = config.resolve(None, {"out": str(run_dir), "threads": 1})
        api._start_run(run_dir, cfg, kind)
    for run_dir, other, started in (
        (search_dir, "train", "search"),
        (train_dir, "search", "train"),
    ):
        before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
        with pytest.raises(UserError, match=rf"is a {started} run, not a {other} run") as err:
            api.resume_config(run_dir, threads=2, kind=other)
        assert f"morphnas {started} --resume" in str(err.value) and "\n" not in str(err.value)
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
        assert api.resume_config(run_dir, kind=started).out == run_dir
