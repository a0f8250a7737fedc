"""Strict types for every config key, from YAML, ``--set`` and flags (issue P2, hostile input):
a section given a value, a word for a boolean option, a non-finite number, a seed out of the
generators' range, and a flag and a ``--set`` that disagree are each one-line user errors
before any run, never a traceback and never silently dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from morphnas import cli, config, options
from morphnas.config import RunConfig
from morphnas.errors import UserError
from morphnas.options import INT64_MAX


def refused(overrides: dict[str, Any] | None = None, file: Path | None = None) -> str:
    """The one-line message ``resolve`` refuses ``overrides`` (and ``file``) with."""
    with pytest.raises(UserError) as caught:
        config.resolve(file, overrides)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --- a section given a value ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"search": 5}, "search is a section"),
        ({"search": 5, "data": {"window": 3}}, "search is a section"),
        ({"space": {"options": "fused"}}, "space.options is a section"),
        ({"search": {"strategy_options": [1, 2]}}, "search.strategy_options is a section"),
        ({"lm": None}, "lm is a section"),
    ],
)
def test_a_section_given_a_value_is_refused_naming_it(overrides, where):
    assert where in refused(overrides)


def test_a_section_given_a_value_in_a_file_is_not_dropped_by_overrides(tmp_path):
    """``search: 5`` in the file and ``search.epochs`` from a flag: the 5 used to vanish."""
    file = tmp_path / "c.yaml"
    file.write_text("search: 5\n")
    message = refused({"search": {"epochs": 3}}, file=file)
    assert message.startswith(f"{file}: search is a section") and "(got 5)" in message


def test_merge_refuses_keys_inside_a_value():
    with pytest.raises(UserError, match=r"space\.options\.ops holds a value"):
        config.merge(
            {"space": {"options": {"ops": "x"}}}, {"space": {"options": {"ops": {"a": 1}}}}
        )
    assert config.merge({"a": None}, {"a": {"b": 1}}) == {"a": {"b": 1}}


# --- free-form options typed by their constructor ---------------------------------------------


@pytest.mark.parametrize("word", ["maybe", "2", "", "truee"])
def test_a_boolean_option_given_another_word_is_refused(word):
    message = refused({"space": {"options": {"fused": word}}})
    assert "space.options: two_input option fused must be true or false" in message
    assert repr(word) in message


@pytest.mark.parametrize(
    ("given", "taken"),
    [(True, True), ("yes", True), ("TRUE", True), ("off", False), (0, False), ("1", True)],
)
def test_a_boolean_option_takes_the_unambiguous_spellings(given, taken):
    options = config.resolve(overrides={"space": {"options": {"fused": given}}}).space.options
    assert options["fused"] is taken


def test_strategy_options_are_converted_by_their_annotations():
    search = {
        "strategy": "idarts",
        "strategy_options": {"steps": "3", "gamma": "1e-3", "residual_noise": "on", "eps": None},
    }
    options = config.resolve(overrides={"search": search}).search.strategy_options
    assert options == {"steps": 3, "gamma": 1e-3, "residual_noise": True, "eps": None}
    assert isinstance(options["steps"], int) and options["residual_noise"] is True


@pytest.mark.parametrize(
    ("search", "fragment"),
    [
        ({"strategy": "idarts", "strategy_options": {"gamma": "abc"}}, "gamma must be a number"),
        ({"strategy": "idarts", "strategy_options": {"steps": 2.5}}, "steps must be an integer"),
        ({"strategy": "idarts", "strategy_options": {"steps": True}}, "steps must be an integer"),
        ({"strategy": "dnal", "strategy_options": {"beta_end": float("inf")}}, "finite number"),
        ({"strategy": "snas", "strategy_options": {"bilevel": "maybe"}}, "bilevel must be true"),
        ({"strategy": "darts", "strategy_options": {"hvp": 1}}, "hvp must be text"),
        ({"strategy": "gdas", "strategy_options": {"tau_strat": 1}}, "did you mean 'tau_start'"),
    ],
)
def test_a_bad_strategy_option_names_the_option(search, fragment):
    message = refused({"search": search})
    assert message.startswith("config: search.strategy_options: ") and fragment in message


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"dropout_x": 2}, "dropout_x must be in [0, 1)"),
        ({"init_range": -1}, "cannot be built"),
        ({"ops": "tanh"}, "ops must be a list of names"),
        ({"cell_bound": float("nan")}, "cell_bound must be a finite number"),
        ({"nodes": 3}, "space.nodes"),
        ({"wirng": "input"}, "did you mean 'wiring'"),
        ({"cell_state": 9, "wiring": "search"}, "cell_state 9 is not a node"),
    ],
)
def test_a_bad_space_option_is_refused_before_any_run(options, fragment):
    message = refused({"space": {"options": options}})
    assert message.startswith("config: space.options: ") and fragment in message


def test_trying_the_space_leaves_the_random_generator_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    config.resolve(overrides={"space": {"options": {"dropout_x": 0.1}}})
    assert torch.equal(torch.rand(4), expected)


# --- numbers: finite, in range, not booleans ---------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"seed": 2**64}, "seed: Input should fit in 64 bits"),
        ({"seed": INT64_MAX + 1}, "seed: Input should fit in 64 bits"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"seed": True}, "seed: Input should be a number, not true or false"),
        ({"search": {"penalty_weight": float("inf")}}, "search.penalty_weight: Input should be a "
         "finite number"),
        ({"search": {"penalty_weight": "inf"}}, "search.penalty_weight: Input should be a finite"),
        ({"search": {"lr": float("nan")}}, "search.lr: Input should be a finite number"),
        ({"train": {"clip": float("-inf")}}, "train.clip: Input should be a finite number"),
        ({"data": {"split": [0.5, 0.5, float("nan")]}}, "data.split.2: Input should be a finite"),
        ({"search": {"epochs": True}}, "search.epochs: Input should be a number"),
        ({"search": {"order": True}}, "search.order: Input should be a number"),
        ({"search": {"epochs": 10**30}}, "search.epochs: Input should fit in 64 bits"),
        ({"threads": 2**31}, "threads: Input should be less than or equal to 1024"),
    ],
)  # fmt: skip
def test_numbers_are_finite_in_range_and_not_booleans(overrides, fragment):
    assert fragment in refused(overrides)


def test_the_largest_seed_is_accepted_and_seeds_every_generator():
    from morphnas.engine.runtime import seed_everything

    assert config.resolve(overrides={"seed": INT64_MAX}).seed == INT64_MAX
    seed_everything(INT64_MAX)  # torch, NumPy (mod 2**32) and Python take it
    torch.Generator().manual_seed(INT64_MAX)


# --- flags and --set --------------------------------------------------------------------------


def test_combine_names_both_sides_of_a_conflict():
    with pytest.raises(UserError, match=r"--set search.epochs=5 and --epochs 3 both set"):
        config.combine([("--set search.epochs=5", {"search": {"epochs": 5}}),
                        ("--epochs 3", {"search": {"epochs": 3}})])  # fmt: skip
    with pytest.raises(
        UserError, match=r"one sets search to a value, the other sets search.epochs"
    ):
        config.combine(
            [("--set search=5", {"search": 5}), ("--epochs 3", {"search": {"epochs": 3}})]
        )
    same = config.combine([("--seed 1", {"seed": 1}), ("--set seed=1", {"seed": 1})])
    assert same == {"seed": 1}
    merged = config.combine([("a", {"search": {"epochs": 2}}), ("b", {"search": {"lr": 0.1}})])
    assert merged == {"search": {"epochs": 2, "lr": 0.1}}


def test_set_of_one_key_twice_with_different_values_is_refused():
    with pytest.raises(UserError, match=r"both set search\.epochs"):
        cli._parse_set(["search.epochs=3", "search.epochs=4"])
    assert cli._parse_set(["search.epochs=3", "search.epochs=3"]) == {"search": {"epochs": 3}}


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--epochs", "3", "--set", "search.epochs=5"], ["--epochs 3", "--set search.epochs=5"]),
        (["--set", "search=5", "--epochs", "3"], ["--set search=5", "--epochs 3"]),
        (["--set", "space.options.fused=maybe"], ["space.options", "fused", "'maybe'"]),
        (["--seed", str(2**64)], ["seed", "64 bits"]),
        (["--penalty-weight", "inf"], ["search.penalty_weight", "finite"]),
        (["--dataset", "births"], ["--dataset births and --csv", "give one of them"]),
        (["--set", "data.dataset=exchange"], ["--set data.dataset=exchange and --csv"]),
    ],
)
def test_cli_refuses_with_one_line_and_no_run_directory(tmp_path, synthetic_csv, args, fragments):
    out = tmp_path / "run"
    code, lines = run_cli("search", "--csv", str(synthetic_csv), *args, "--out", str(out))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()


def test_train_refuses_an_out_of_range_cell_option_before_the_run_directory(
    tmp_path, synthetic_csv
):
    """``train`` builds no supernet, so this used to be a traceback after the run directory."""
    out = tmp_path / "run"
    args = ["train", "--genotype", "gru", "--csv", str(synthetic_csv), "--out", str(out)]
    code, lines = run_cli(*args, "--set", "space.options.dropout_x=2")
    assert code == 2 and len(lines) == 1 and "dropout_x must be in [0, 1)" in lines[0], lines
    assert not out.exists()


def test_cli_subprocess_conflict(tmp_path):
    """The entry point as a user runs it: exit 2, one line, no traceback, nothing written."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "morphnas.cli", "search", "--epochs", "3",
         "--set", "search.epochs=5", "--out", "r"],
        capture_output=True, text=True, env=env, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "r").exists()
    assert "--set search.epochs=5 and --epochs 3 both set search.epochs" in lines[0]


# --- property: anything resolves or is a user error -------------------------------------------


def _key_pool() -> list[str]:
    keys = set(RunConfig.model_fields)
    for field in RunConfig.model_fields.values():
        keys |= set(getattr(field.annotation, "model_fields", {}))
    keys |= set(options.space_option_types("two_input")) | set(
        options.space_option_types("darts_rnn")
    )
    keys |= set(options.strategy_option_types("idarts")) | set(
        options.strategy_option_types("snas")
    )
    return sorted(keys)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(
        [
            "maybe",
            "yes",
            "1e-3",
            "inf",
            "lm",
            "two_input",
            "darts_rnn",
            "idarts",
            "search",
            "grow-then-prune",
            "global",
            "tanh",
            "[1, 2]",
        ]
    )
)
KEYS = st.sampled_from(_key_pool()) | st.text(max_size=5)
TREES = st.recursive(
    SCALARS | st.lists(SCALARS, max_size=3),
    lambda children: st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.dictionaries(KEYS, TREES, max_size=5))
def test_any_overrides_resolve_or_are_a_one_line_user_error(overrides):
    try:
        resolved = config.resolve(overrides=overrides)
    except UserError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(resolved, RunConfig)
        assert config.resolve(base=resolved) == resolved  # what is saved resolves again
