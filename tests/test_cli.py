"""End-to-end runs of the command line on generated data, and its handling of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import assert_user_error, run_cli
from morphnas import cli, strategies
from morphnas import config as config_mod

SMALL = ["--epochs", "2", "--retrain-epochs", "3", "--nodes", "2", "--hidden", "8", "--window", "6"]
RESULT_KEYS = {
    "model", "params", "valid_rse", "test_rse", "test_corr", "test_mae", "test_rmse",
    "train_seconds",
}  # fmt: skip


def morphnas(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console entry point as a user would."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "morphnas.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=600,
    )  # fmt: skip


def test_search_train_evaluate_end_to_end(tmp_path, synthetic_csv):
    run = tmp_path / "run"
    done = morphnas("search", "--csv", str(synthetic_csv), *SMALL, "--out", str(run), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["run_dir"] == str(run)
    assert out["genotype"]["format"] == "morphnas.genotype"
    assert [r["model"] for r in out["results"]] == [
        "searched", "lstm", "gru", "ar", "naive", "snaive", "var"
    ]  # fmt: skip
    for row in out["results"]:
        assert row.keys() >= RESULT_KEYS
        assert row["test_rse"] > 0 and row["test_rmse"] > 0
    params = {r["model"]: r["params"] for r in out["results"]}
    # nn.LSTM + linear head + the autoregressive component over the (6-step) window
    assert params["lstm"] == 4 * (8 * 3 + 8 * 8 + 2 * 8) + (8 * 3 + 3) + (6 + 1)
    assert params["ar"] == 6 + 1
    for name in ("config.yaml", "genotype.json", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    for name in ("search_last.pt", "search_best.pt"):
        assert (run / "checkpoints" / name).is_file()
    for name in ("arch", "genotype", "forecast", "learning_curves"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["search"]["epochs"] == 2 and config["space"]["nodes"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["phase"] == "search"] == [1, 2]

    # Evaluating the saved models reproduces the reported test metrics exactly.
    again = morphnas("evaluate", str(run), "--json")
    assert again.returncode == 0, again.stderr
    for before, after in zip(out["results"], json.loads(again.stdout)["results"], strict=True):
        assert after["model"] == before["model"]
        assert after["test_rse"] == pytest.approx(before["test_rse"], rel=1e-6)

    # Plots can be redrawn from the run's files alone.
    for png in (run / "plots").glob("*.png"):
        png.unlink()
    redrawn = morphnas("plot", str(run))
    assert redrawn.returncode == 0, redrawn.stderr
    for name in ("arch", "genotype", "learning_curves"):
        assert (run / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name

    # The derived genotype retrains on its own, and the table is printed for people.
    trained = morphnas(
        "train", "--genotype", str(run / "genotype.json"), "--csv", str(synthetic_csv),
        "--hidden", "8", "--window", "6", "--retrain-epochs", "2", "--out", str(tmp_path / "t"),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "genotype" in trained.stdout and "test RSE" in trained.stdout


def test_config_file_with_flags_overriding(tmp_path, synthetic_csv):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {"csv": str(synthetic_csv), "window": 5},
                "space": {"name": "darts_rnn", "nodes": 3, "hidden": 6},
                "search": {"epochs": 1},
                "train": {"epochs": 1, "baselines": ["naive"]},
            }
        )
    )
    run = tmp_path / "run"
    done = morphnas("search", "--config", str(cfg), "--nodes", "2", "--out", str(run), "--json")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["space"]["nodes"] == 2  # the flag wins
    assert resolved["space"]["name"] == "darts_rnn" and resolved["data"]["window"] == 5
    genotype = json.loads(done.stdout)["genotype"]
    assert genotype["space"] == "darts_rnn" and len(genotype["nodes"]) == 2


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("a,b\n1,2\n3,x\n4,5\n", ("'b'", "row 2")),
        ("a,b\n1,2\n3,nan\n4,5\n", ("'b'", "row 2")),
        ("a,b\n1,2\n3,inf\n4,5\n", ("'b'", "row 2")),
        ("a,b\n1,\n3,\n4,\n", ("'b'",)),
        ("a,b\n1,7\n3,7\n4,7\n", ("'b'", "constant")),
    ],
)
def test_bad_csv_is_one_line_with_exit_code_2(tmp_path, content, fragments):
    path = _write(tmp_path / "bad.csv", content)
    assert_user_error(morphnas("search", "--csv", str(path), *SMALL), *fragments)


def test_too_few_rows_for_the_window(tmp_path):
    rows = "\n".join(f"{i},{i * i % 7}" for i in range(30))
    path = _write(tmp_path / "short.csv", "a,b\n" + rows + "\n")
    assert_user_error(morphnas("search", "--csv", str(path), "--window", "20"), "window")


def test_missing_file_and_bad_flags(tmp_path):
    assert_user_error(morphnas("search", "--csv", str(tmp_path / "nope.csv")), "nope.csv")
    assert_user_error(morphnas("search", "--dataset", "birth"), "births")
    assert_user_error(morphnas("search", "--set", "search.epochs=0"), "search.epochs")
    assert_user_error(morphnas("train", "--genotype", str(tmp_path / "g.json")), "g.json")
    bad = _write(tmp_path / "g.json", '{"format": "morphnas.genotype", "version": 9}')
    assert_user_error(morphnas("train", "--genotype", str(bad)), "version")
    assert_user_error(morphnas("evaluate", str(tmp_path)), "summary.json")


def test_existing_run_directory_is_not_overwritten(tmp_path, synthetic_csv):
    run = tmp_path / "run"
    run.mkdir()
    keep = _write(run / "precious.txt", "do not lose me")
    assert_user_error(morphnas("search", "--csv", str(synthetic_csv), "--out", str(run)), "--force")
    assert keep.read_text() == "do not lose me"


def test_datasets_lists_the_registry():
    done = morphnas("datasets", "--json")
    assert done.returncode == 0, done.stderr
    names = {d["name"] for d in json.loads(done.stdout)}
    assert {"births", "exchange", "elecdemand", "synthetic"} <= names


@pytest.mark.parametrize("name", list(cli.FLAGS))
def test_every_flag_sets_a_config_key(name):
    """``FLAGS`` is the one table of flags: each path is a key of the config, and a value
    typed for it (as the command line gives it) lands there."""
    flag, typed = cli.FLAGS[name], {int: 2, float: 0.5, Path: "x.csv"}
    lists = ("columns", "calendar", "targets")
    value = {"horizon": "3"}.get(name, typed.get(flag.kind, "a,b" if name in lists else "text"))
    [(label, section)] = cli._labelled_flags({**dict.fromkeys(cli.FLAGS), name: value})
    assert label == f"--{name.replace('_', '-')} {value}"
    model: Any = config_mod.RunConfig
    for part in flag.path[:-1]:
        model = model.model_fields[part].annotation
    assert flag.path[-1] in model.model_fields
    expected = {"horizon": 3}.get(name, ["a", "b"] if flag.parse else value)
    assert config_mod.leaves(section) == [(flag.path, expected)]


@pytest.mark.parametrize(
    ("command", "names"),
    [("search", list(cli.FLAGS)), ("compare", ["space", "nodes", "epochs", "device"])],
)
def test_commands_take_their_options_from_the_flag_table(command, names):
    done = morphnas(command, "--help")
    assert done.returncode == 0, done.stderr
    assert all(f"--{name.replace('_', '-')} " in done.stdout for name in names)


def test_strategy_help_lists_the_registry():
    assert cli.FLAGS["strategy"].help.startswith(" | ".join(strategies.STRATEGIES))


def test_search_keeps_the_derived_output_rule(tmp_path, synthetic_csv):
    """The genotype saved by a search carries the space's output squashing to retraining."""
    run = tmp_path / "run"
    done = morphnas(
        "search", "--csv", str(synthetic_csv), *SMALL, "--out", str(run), "--json",
        "--set", "train.baselines=[]", "--set", "space.options.output_activation=tanh",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["genotype"]["output_activation"] == "tanh"
    assert json.loads((run / "genotype.json").read_text())["output_activation"] == "tanh"


def test_a_failed_start_leaves_no_run_directory_behind(tmp_path, synthetic_csv):
    """Fixing a typo and running again must not be refused because of the failed attempt."""
    run = tmp_path / "run"
    assert_user_error(morphnas("search", "--csv", str(tmp_path / "typo.csv"), "--out", str(run)))
    assert not run.exists()
    bad_option = morphnas(
        "search", "--csv", str(synthetic_csv), "--set", "space.options.wirng=input",
        "--out", str(run),
    )  # fmt: skip
    assert_user_error(bad_option, "wirng")
    assert not run.exists()


def test_published_darts_cell_as_a_baseline_and_by_name(tmp_path, synthetic_csv):
    done = morphnas(
        "search", "--csv", str(synthetic_csv), *SMALL, "--out", str(tmp_path / "s"), "--json",
        "--set", "train.baselines=[darts_v2]",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["model"] for r in json.loads(done.stdout)["results"]] == ["searched", "darts_v2"]
    again = morphnas("evaluate", str(tmp_path / "s"), "--json")
    assert again.returncode == 0, again.stderr
    trained = morphnas(
        "train", "--genotype", "darts_v2", "--csv", str(synthetic_csv), "--hidden", "8",
        "--window", "6", "--retrain-epochs", "1", "--out", str(tmp_path / "t"), "--json",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    genotype = json.loads(trained.stdout)["genotype"]
    assert genotype["space"] == "darts_rnn" and len(genotype["nodes"]) == 8


@pytest.mark.parametrize(
    "command",
    [
        ["search", "--strategy", "idarts", "--set", "search.strategy_options.gamma=1e6"],
        ["compare", "--strategy", "idarts:gamma=1e6", "--seeds", "2", "--jobs", "2"],
    ],
    ids=["search", "compare-in-processes"],
)
def test_our_warnings_are_one_line_without_source(tmp_path, synthetic_csv, command):
    """A morphnas warning (here iDARTS's curvature check, made to fire by a huge γ) reads
    ``warning: <message>`` on one line, as errors do, with no file path or source line; in
    compare's spawned workers too."""
    run = tmp_path / "run"
    tiny = ["--epochs", "1", "--retrain-epochs", "1", "--nodes", "2", "--hidden", "4"]
    done = morphnas(
        *command, "--csv", str(synthetic_csv), *tiny, "--set", "train.baselines=[]",
        "--out", str(run), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "λ_max" in line]
    assert len(lines) == (2 if command[0] == "compare" else 1), done.stderr
    for line in lines:
        assert line.startswith("warning: iDARTS: γ·λ_max(H) = ")
        assert "search.strategy_options.gamma to" in line
    assert "implicit.py" not in done.stderr and "RuntimeWarning" not in done.stderr


def test_divergence_advice_names_options_the_cli_accepts(tmp_path):
    """Issue 27: the advice after a non-finite loss named a --lr flag that does not exist. Every
    option it names now must be a real flag of the command, or a --set KEY the config takes,
    in the section of the phase that diverged."""
    import re

    import typer

    from morphnas.engine.loops import check_finite
    from morphnas.engine.search import _check_retry
    from morphnas.errors import UserError

    commands = typer.main.get_command(cli.app).commands
    messages = []
    search_cfg = config_mod.resolve().search
    for policy in ("stop", "retry"):
        cfg = search_cfg.model_copy(update={"nan_policy": policy})
        with pytest.raises(UserError) as err:
            _check_retry(cfg, 3, 2, float("nan"), float("inf"), tmp_path / "last.pt")
        messages.append(("search", "search", str(err.value)))
    with pytest.raises(UserError) as err:
        check_finite(float("nan"), "gru's training loss", 3)
    messages.append(("train", "train", str(err.value)))
    for command, section, message in messages:
        assert "--lr" not in message and "\n" not in message, message
        sets = re.findall(r"--set ([\w.]+)=VALUE", message)
        assert sets and all(key.startswith(f"{section}.") for key in sets), message
        assert f"{section}.lr" in sets, message
        for key in sets:  # each resolves through the CLI's own --set parsing
            resolved = config_mod.resolve(overrides=cli._parse_set([f"{key}=0.0001"]))
            part, name = key.split(".")
            assert getattr(getattr(resolved, part), name) == 0.0001
        flags = {o for p in commands[command].params for o in p.opts}
        named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", message)) - {"--set"}
        assert named <= flags, (named - flags, message)


def test_interrupted_compare_advises_the_command_that_continues_it(tmp_path, synthetic_csv):
    """Issue 27: Ctrl-C (SIGTERM here) in a compare advised `morphnas compare --resume`, which
    does not exist; the advice is now this command with --reuse (and the default --out it
    wrote to, without --force), and running it finishes the compare."""
    import shlex

    args = ["compare", "--csv", str(synthetic_csv), "--growth", "none", "--seeds", "1",
            "--epochs", "2", "--retrain-epochs", "1", "--hidden", "6", "--window", "6",
            "--threads", "1", "--force"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200", "MORPHNAS_CRASH_AT": "step:3:TERM"}
    stopped = subprocess.run(
        [sys.executable, "-m", "morphnas.cli", *args],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert stopped.returncode == 130, stopped.stderr
    line = stopped.stderr.strip().splitlines()[-1]
    assert "Traceback" not in stopped.stderr and "--resume" not in line, line
    advised = shlex.split(line.split("`")[1])
    assert advised[0] == "morphnas" and "--reuse" in advised and "--force" not in advised
    out = Path(advised[advised.index("--out") + 1])
    assert (tmp_path / out).is_dir() and out.parts[0] == "runs"
    done = morphnas(*advised[1:], "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["run_dir"] == str(out)


def test_train_the_naive_baseline_alone(tmp_path):
    """A run that trains nothing (the naive forecast) still finishes: there are no learning
    curves to draw, which is no error."""
    out = tmp_path / "r"
    args = ["--baseline", "naive", "--dataset", "synthetic", "--out", str(out)]
    code, lines = run_cli("train", *args)
    assert code == 0, lines
    summary = json.loads((out / "summary.json").read_text())
    assert [row["model"] for row in summary["results"]] == ["naive"]
    assert (out / "plots/forecast.png").is_file()
