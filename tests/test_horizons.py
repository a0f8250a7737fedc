"""``morphnas search --horizon 3,6,…``: one search per horizon, one table."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conftest import TINY_RUN, run_cli
from morphnas import cli


def test_one_search_per_horizon_and_one_table(synthetic_csv, tmp_path):
    out = tmp_path / "horizons"
    args = ["search", "--csv", str(synthetic_csv), *TINY_RUN, "--horizon", "1,3",
            "--set", "train.baselines=[naive]", "--out", str(out)]  # fmt: skip
    done = CliRunner().invoke(cli.app, args)
    assert done.exit_code == 0, done.output
    assert "RSE h=1" in done.stdout and "CORR h=3" in done.stdout
    saved = json.loads((out / "horizons.json").read_text())
    assert saved["horizons"] == [1, 3]
    rows = {(r["model"], r["horizon"]): r for r in saved["results"]}
    assert set(rows) == {("searched", 1), ("naive", 1), ("searched", 3), ("naive", 3)}
    for horizon in (1, 3):  # each row is its own run's, trained at that horizon
        run = json.loads((out / f"h{horizon}-seed0" / "summary.json").read_text())
        assert run["results"][0]["test_rse"] == rows["searched", horizon]["test_rse"]
        config = (out / f"h{horizon}-seed0" / "config.yaml").read_text()
        assert f"horizon: {horizon}\n" in config
    again = CliRunner().invoke(cli.app, [*args[:-2], "--resume", str(out), "--json"])
    assert again.exit_code == 0, again.output  # finished runs kept: the same figures
    assert json.loads(again.stdout)["results"] == saved["results"]


def test_other_commands_take_one_horizon(synthetic_csv):
    code, lines = run_cli("train", "--csv", str(synthetic_csv), "--horizon", "1,3")
    assert code == 2 and len(lines) == 1 and "one search each" in lines[0], lines
    code, lines = run_cli("search", "--csv", str(synthetic_csv), "--horizon", "3,x")
    assert code == 2 and "--horizon takes integers" in lines[0], lines
    code, lines = run_cli("search", "--csv", str(synthetic_csv), "--horizon", "3,3")
    assert code == 2 and "distinct" in lines[0], lines
