"""A failed command never changes a file of the run it failed on (issue 27).

One real run is killed (SIGKILL, by the fault-injection hook) while it retrains its searched
cell, so its directory holds everything a stopped run can: search checkpoints, a train
checkpoint, a saved model, metrics and ``run.json``. Each test damages one thing in a copy, the
way a person or a crash would, and resumes it: one ``error:`` line naming what is wrong, exit
code 2, no traceback, and every file byte-identical. The undamaged copy resumes to the end.
Then hypothesis edits its config and checkpoints at random, and points a fresh ``--force``
command at it with malformed CSVs, configs and genotypes: never a traceback, and a refusal
always leaves the run as it was.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import morphnas, run_cli, tree
from morphnas import config, runs
from morphnas.engine.checkpoint import load
from morphnas.errors import UserError


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A search killed in the middle of retraining its searched cell."""
    import pandas as pd

    from morphnas.data import synthetic_series

    base = tmp_path_factory.mktemp("stopped")
    series = synthetic_series(n_steps=300, n_series=3, seed=1)
    csv = base / "series.csv"
    pd.DataFrame(series.values, columns=series.columns).to_csv(csv, index=False)
    run = base / "run"
    killed = morphnas(
        "search", "--csv", str(csv), "--window", "6", "--hidden", "6", "--epochs", "2",
        "--retrain-epochs", "3", "--threads", "1", "--set", "search.batch_size=32",
        "--set", "train.baselines=[lstm]", "--out", str(run), crash="train-step:12",
    )  # fmt: skip
    assert killed.returncode != 0 and not (run / "summary.json").exists(), killed.stderr
    for name in ("checkpoints/search_last.pt", "checkpoints/train_searched.pt", "run.json"):
        assert (run / name).is_file(), name
    return run


@pytest.fixture
def run(stopped: Path, tmp_path: Path) -> Path:
    """This test's copy of the stopped run and its CSV (a copy's config names the original)."""
    return Path(shutil.copytree(stopped, tmp_path / "run"))


def refused(run: Path, *fragments: str, command: str = "search") -> str:
    """``morphnas COMMAND --resume RUN`` refused: one line holding ``fragments``, run unchanged."""
    before = tree(run)
    code, lines = run_cli(command, "--resume", str(run))
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert tree(run) == before, "a failed resume changed the run's files"
    return lines[0]


def edit_config(run: Path, change: Callable[[dict], None]) -> None:
    path = run / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    change(saved)
    path.write_text(yaml.safe_dump(saved, sort_keys=False))


def edit_checkpoint(path: Path, change: Callable[[dict], None]) -> None:
    state = load(path)
    change(state)
    torch.save(state, path)


def test_the_undamaged_copy_resumes_to_the_end(run: Path) -> None:
    code, lines = run_cli("search", "--resume", str(run))
    assert code == 0, lines
    assert (run / "summary.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r["epoch"] for r in rows if r.get("phase") == "train" and r["model"] == "searched"]
    assert trained == sorted(set(trained)), "rows after the checkpoint were not dropped"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: c["search"].update(strategy="gdas"), "search.strategy: 'darts' then, 'gdas'"),
        (lambda c: c["data"].update(window=9), "data.window: 6 then, 9 now"),
        (lambda c: c["space"].update(hidden=8), "space.hidden: 6 then, 8 now"),
        (lambda c: c.clear(), "was edited after the run started"),
    ],
    ids=["strategy", "window", "hidden", "emptied"],
)
def test_a_config_edited_after_the_start_is_refused(run: Path, change, fragment: str) -> None:
    edit_config(run, change)
    refused(run, "config.yaml was edited after the run started", fragment, "--force")


def test_an_empty_config_says_so_and_where_a_copy_is(run: Path) -> None:
    (run / "config.yaml").write_text("\n")
    refused(run, "config.yaml is empty", "run.json holds a copy")


@pytest.mark.parametrize("text", ["{bad", "[]", '{"kind": 3}'])
def test_a_damaged_run_record_is_refused_not_ignored(run: Path, text: str) -> None:
    """Without run.json nothing a resume must check could be checked: refused, not skipped."""
    (run / "run.json").write_text(text)
    refused(run, "run.json is damaged", "--force")


def test_a_missing_or_finished_run_says_what_to_do(run: Path, tmp_path: Path) -> None:
    code, lines = run_cli("search", "--resume", str(tmp_path / "nothere"))
    assert code == 2 and "not found" in lines[0], lines
    (run / "summary.json").write_text("{}")
    refused(run, "has finished", "morphnas evaluate", "--force")


def test_a_config_edit_of_the_thread_count_is_allowed(run: Path) -> None:
    edit_config(run, lambda c: c.update(threads=2))
    code, lines = run_cli("search", "--resume", str(run))
    assert code == 0, lines


def test_a_checkpoint_of_another_run(run: Path) -> None:
    edit_checkpoint(run / "checkpoints/search_last.pt", lambda s: s["run"].update(id="0" * 32))
    refused(run, "search_last.pt belongs to another run (run 000", "this run is")


def test_a_train_checkpoint_without_a_run_id(run: Path) -> None:
    edit_checkpoint(run / "checkpoints/train_searched.pt", lambda s: s.pop("run"))
    refused(run, "train_searched.pt belongs to another run (no run id")


def test_a_checkpoint_that_lacks_keys(run: Path) -> None:
    edit_checkpoint(run / "checkpoints/search_last.pt", lambda s: s.pop("optimizer"))
    refused(run, "search_last.pt lacks optimizer", "not a whole search checkpoint")


def test_a_checkpoint_whose_weights_do_not_fit(run: Path) -> None:
    def widen(state: dict) -> None:
        key = next(k for k, v in state["model"].items() if v.dim() == 2)
        state["model"][key] = torch.zeros(3, 3)

    edit_checkpoint(run / "checkpoints/search_last.pt", widen)
    refused(run, "search_last.pt does not fit the search this run builds")


def test_a_saved_model_whose_weights_do_not_fit(run: Path) -> None:
    def shrink(state: dict) -> None:
        key = next(iter(state["state_dict"]))
        state["state_dict"][key] = torch.zeros(1)

    edit_checkpoint(run / "models/searched.pt", shrink)
    refused(run, "models/searched.pt do not fit the model this run builds")


def test_a_truncated_train_checkpoint(run: Path) -> None:
    path = run / "checkpoints/train_searched.pt"
    path.write_bytes(path.read_bytes()[:300])
    refused(run, "train_searched.pt is truncated or corrupted")


def test_a_damaged_metrics_line(run: Path) -> None:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([*lines[:1], "garbage\n", *lines[1:]]))
    refused(run, "metrics.jsonl: line 2")


def test_an_input_csv_changed_since_the_start(run: Path) -> None:
    csv = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["csv"])
    original = csv.read_bytes()
    try:
        csv.write_bytes(original + original.splitlines(keepends=True)[-1])
        refused(run, "series.csv changed after", "bytes then", "restore that file")
        csv.write_bytes(original.replace(b"1", b"2", 1))
        refused(run, "same size, other content")
    finally:
        csv.write_bytes(original)


def test_a_search_is_not_resumed_as_a_train_run(run: Path) -> None:
    refused(run, "is a search run, not a train run", command="train")


# --- properties --------------------------------------------------------------------------------

SLOW = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2),
)


def leaves(tree_: dict, prefix: str = "") -> list[str]:
    """Dotted paths of a config's values (a list is one value)."""
    found = []
    for key, value in tree_.items():
        path = f"{prefix}{key}"
        found += leaves(value, path + ".") if isinstance(value, dict) and value else [path]
    return found


def contract(run: Path, *args: str, allowed: tuple[int, ...] = (2,)) -> int:
    """The command's exit code is one of ``allowed``; a refusal is one ``error:`` line and
    leaves every file of ``run`` as it was. No exception escapes (``run_cli`` re-raises)."""
    before = tree(run)
    code, lines = run_cli(*args)
    assert code in allowed, lines
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert tree(run) == before, "a failed command changed the run's files"
    return code


@SLOW
@given(data=st.data())
def test_property_any_edit_of_a_stopped_runs_config_is_refused(stopped: Path, data) -> None:
    saved = yaml.safe_load((stopped / "config.yaml").read_text())
    key = data.draw(st.sampled_from([k for k in leaves(saved) if k not in ("threads", "out")]))
    value = data.draw(JUNK)
    *sections, last = key.split(".")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(shutil.copytree(stopped, Path(tmp) / "run"))
        edit_config(run, lambda c: _at(c, sections).__setitem__(last, value))
        try:  # an edit that resolves to the same config is no edit (6.0 for 6, "6" for 6)
            same = runs.config_record(config.resolve(run / "config.yaml")) == runs.config_record(
                config.resolve(stopped / "config.yaml")
            )
        except UserError:
            same = False
        assume(not same)
        contract(run, "search", "--resume", str(run))


def _at(tree_: dict, sections: list[str]) -> dict:
    for section in sections:
        tree_ = tree_[section]
    return tree_


@SLOW
@given(data=st.data())
def test_property_any_damage_to_a_checkpoint_is_refused_or_harmless(stopped: Path, data) -> None:
    """A key dropped, or replaced by a value of any type: the resume is refused in one line with
    the run unchanged, or (a value a checkpoint can hold) it runs to the end."""
    name = data.draw(
        st.sampled_from(
            ["checkpoints/search_last.pt", "checkpoints/train_searched.pt", "models/searched.pt"]
        )
    )
    state = load(stopped / name)
    key = data.draw(st.sampled_from(sorted(state)))
    value = data.draw(st.one_of(st.just(KeyError), JUNK, st.builds(torch.zeros, st.integers(0, 3))))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(shutil.copytree(stopped, Path(tmp) / "run"))
        if value is KeyError:
            edit_checkpoint(run / name, lambda s: s.pop(key))
        else:
            edit_checkpoint(run / name, lambda s: s.__setitem__(key, value))
        contract(run, "search", "--resume", str(run), allowed=(0, 2))


@SLOW
@given(
    csv=st.binary(max_size=300) | st.text(max_size=200).map(str.encode),
    genotype=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
    setting=st.tuples(st.sampled_from(["search.epochs", "data.window", "space.options.fused",
                                       "seed", "search", "train.lr", "search.strategy"]),
                      st.text(max_size=8)),
)  # fmt: skip
def test_property_a_forced_command_with_bad_input_leaves_the_old_run(
    stopped: Path, csv: bytes, genotype: bytes, setting: tuple[str, str]
) -> None:
    """``--force`` over a run, with a malformed CSV, genotype or ``--set``: refused before the
    old run is moved aside, so it stays whole."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(shutil.copytree(stopped, Path(tmp) / "run"))
        bad_csv, bad_genotype = Path(tmp) / "bad.csv", Path(tmp) / "bad.json"
        bad_csv.write_bytes(csv)
        bad_genotype.write_bytes(genotype)
        key, text = setting
        force = ("--force", "--out", str(run), "--retrain-epochs", "1")
        contract(run, "search", "--csv", str(bad_csv), *force, "--epochs", "1", allowed=(0, 2))
        contract(run, "train", "--genotype", str(bad_genotype), *force, allowed=(0, 2))
        contract(run, "search", "--set", f"{key}={text}", "--set", "data.window=1000000", *force)


@pytest.fixture(scope="module")
def stopped_between_candidates(stopped: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A search killed between its candidates' retrainings (``search.select: valid``): the
    first candidate's score is in selection.json."""
    csv = Path(yaml.safe_load((stopped / "config.yaml").read_text())["data"]["csv"])
    run = tmp_path_factory.mktemp("select") / "run"
    killed = morphnas(
        "search", "--csv", str(csv), "--window", "6", "--hidden", "6", "--epochs", "2",
        "--threads", "1", "--set", "search.batch_size=32", "--set", "search.select=valid",
        "--set", "search.candidates=2", "--set", "search.select_epochs=2",
        "--set", "train.baselines=[]", "--out", str(run), crash="train-step:8",
    )  # fmt: skip
    assert killed.returncode != 0 and (run / "selection.json").is_file(), killed.stderr
    return run


@pytest.mark.parametrize("text", ["[1]", '[{"rank": 1}]', "{", ""])
def test_a_damaged_selection_record_is_refused(
    tmp_path: Path, stopped_between_candidates: Path, text: str
) -> None:
    """The candidates' scores a resumed search reads are checked before anything is
    retrained."""
    run = Path(shutil.copytree(stopped_between_candidates, tmp_path / "run"))
    (run / "selection.json").write_text(text)
    refused(run, "selection.json")
