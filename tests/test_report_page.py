"""``morphnas report``: one self-contained HTML page per run, checked by parsing it (fast) and
by rendering it in headless Chromium (the page must open in a browser with nothing to fetch)."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from morphnas import genotype
from morphnas.report_page import PNG_SIGNATURE, best_on_valid, write_report

SECTIONS = ("results", "genotype", "plots", "growth", "forecast", "prune", "config")


class Page(HTMLParser):
    """What a test needs of a page: its tags, section ids, images, and each table's rows as
    text (a row of cells; whether the row is marked best)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.sections: list[str] = []
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []  # every src / href: a self-contained page has data: only
        self.tables: list[list[tuple[list[str], bool]]] = []
        self.pre: list[str] = []
        self.text = ""
        self._cell: list[str] | None = None
        self._in_pre = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        self.links += [attr[k] for k in ("src", "href") if k in attr]
        if tag == "section":
            self.sections.append(attr.get("id", ""))
        elif tag == "img":
            self.images.append(attr)
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append(([], attr.get("class") == "best"))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1][0].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        self.text += data
        if self._cell is not None:
            self._cell.append(data)
        if self._in_pre:
            self.pre[-1] += data

    def table_with(self, header: str) -> list[tuple[list[str], bool]]:
        """The rows (header row first) of the table whose first header cell is ``header``."""
        return next(t for t in self.tables if t and t[0][0] and t[0][0][0] == header)


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _add_later_files(run: Path) -> list[list[str]]:
    """What later commands add to a run (growth history, morphnas forecast's CSV and plot,
    morphnas prune's summary), and a damaged plot; returns the forecast CSV's rows."""
    _write_json(
        run / "history.json",
        [
            {"epoch": 2, "step": 10, "kind": "grow", "nodes_before": 1, "nodes_after": 2,
             "max_abs_diff": 0.0, "time": 1.8e9},
            {"epoch": 4, "step": 20, "kind": "prune", "nodes_before": 2, "nodes_after": 2,
             "pruned_nodes": [1, 2]},
        ],
    )  # fmt: skip
    rows = [["date", "s1", "s2"]] + [[f"2021-01-{d:02d}", f"{d}.5", f"-{d}"] for d in range(1, 21)]
    with (run / "forecast.csv").open("w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)
    shutil.copy(run / "plots" / "forecast.png", run / "plots" / "future.png")
    (run / "plots" / "broken.png").write_text("not an image", encoding="utf-8")
    prune_row = {
        "model": "lstm", "lambda": 0.01, "channels_kept": 6, "channels": 8, "params_before": 452,
        "params_after": 300, "flops_before": 900, "flops_after": 600, "test_rse_before": 0.9,
        "test_rse_after": 0.95, "latency_ms_masked": 0.5, "latency_ms_after": 0.4,
    }  # fmt: skip
    _write_json(run / "prune" / "summary.json", {"results": [prune_row], "skipped": {"ar": "x"}})
    return rows


def test_the_page_has_every_section_and_embeds_every_plot(finished_run: Path, tmp_path: Path):
    """Each file the run has becomes its section: the results table as the CLI prints it with
    the best model on validation marked (checked against a plain minimum), the genotype, every
    PNG byte for byte as a data URI (future.png included), the growth events, the forecast
    CSV's first and last rows, the prune table and config.yaml verbatim; nothing to fetch."""
    run = _copy(finished_run, tmp_path)
    csv_rows = _add_later_files(run)
    code, errors = run_cli("report", str(run))
    assert (code, errors) == (0, [])
    html = (run / "report.html").read_text(encoding="utf-8")
    page = Page(html)
    assert page.sections == list(SECTIONS)
    assert "script" not in page.tags and "link" not in page.tags
    assert page.links and all(link.startswith("data:image/png;base64,") for link in page.links)

    summary = json.loads((run / "summary.json").read_text())
    results = page.table_with("model")
    assert [row[0][0].split("best on valid")[0] for row in results[1:]] == [
        r["model"] for r in summary["results"]
    ]
    best = min(summary["results"], key=lambda r: r["valid_rse"])["model"]
    assert [row[0][0] for row in results[1:] if row[1]] == [f"{best}best on valid"]

    embedded = {
        image["alt"]: base64.b64decode(image["src"].split(",", 1)[1]) for image in page.images
    }
    drawn = {f"plots/{p.name}": p.read_bytes() for p in (run / "plots").glob("*.png")}
    drawn.pop("plots/broken.png")
    assert embedded == drawn
    assert "plots/broken.png is not a PNG image" in page.text

    assert page.pre[0] == str(genotype.from_dict(summary["genotype"]))
    assert page.pre[-1] == (run / "config.yaml").read_text(encoding="utf-8")
    growth = page.table_with("epoch")
    assert [row[0][2] for row in growth[1:]] == ["grow", "prune"]
    assert growth[2][0][-1] == "[1, 2]"
    forecast = page.table_with("date")
    assert [row[0] for row in forecast] == [*csv_rows[:6], ["… 10 rows …"], *csv_rows[-5:]]
    pruned = page.tables[-1]  # the prune section's, the last with a table
    assert pruned[1][0][:4] == ["lstm", "0.01", "6/8", "300"]
    assert "not pruned: ar (x)" in page.text


def test_text_from_the_run_stays_text(finished_run: Path, tmp_path: Path) -> None:
    """A model, column or event named like markup is shown as those characters, never parsed:
    the page gets no element the run's files did not come from us."""
    run = _copy(finished_run, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["results"][0]["model"] = "<b>bold</b> & co"
    _write_json(run / "summary.json", summary)
    (run / "forecast.csv").write_text("date,<b>col</b>\n2021-01-01,1\n", encoding="utf-8")
    _write_json(run / "history.json", [{"epoch": 1, "kind": "<script>alert(1)</script>"}])
    page = Page(write_report(run).read_text(encoding="utf-8"))
    assert "b" not in page.tags and "script" not in page.tags
    assert page.table_with("model")[1][0][0] == "<b>bold</b> & co"
    assert page.table_with("date")[0][0] == ["date", "<b>col</b>"]
    assert page.table_with("epoch")[1][0] == ["1", "<script>alert(1)</script>"]


VALID_KEYS = {"forecast": "valid_rse", "lm": "valid_ppl", "classify": "valid_accuracy"}


def _results(kind: str) -> list[dict[str, Any]]:
    """Result rows of each task kind, with a degenerate row and a NaN score the marker skips."""
    key = VALID_KEYS[kind]
    test = key.replace("valid", "test")
    values = [0.3, 0.9, math.nan, 0.5, 0.1]
    rows = [{"model": f"m{i}", key: v, test: v, "params": 10 * i} for i, v in enumerate(values)]
    rows[4]["degenerate"], rows[4]["degenerate_reason"] = True, "ignores its input"
    return rows


@pytest.mark.parametrize(
    ("kind", "header", "best"),
    [("forecast", "valid RSE", "m0"), ("lm", "valid ppl", "m0"), ("classify", "valid acc", "m1")],
)
def test_every_task_kind_and_a_run_without_genotype_or_config(
    tmp_path: Path, kind: str, header: str, best: str
) -> None:
    """A run with nothing but summary.json (no genotype, config or plots) is a page of its
    results: the kind's columns, and the best finite, working validation score marked (the
    lowest error or perplexity, the highest accuracy)."""
    results = _results(kind)
    _write_json(tmp_path / "summary.json", {"models": [], "results": results, "genotype": None})
    page = Page(write_report(tmp_path, tmp_path / "out" / "page.html").read_text("utf-8"))
    assert page.sections == ["results"]
    table = page.table_with("model")
    assert header in table[0][0]
    assert [row[0][0] for row in table[1:] if row[1]] == [f"{best}best on valid"]
    assert "m4 (degenerate)" in page.text
    key = VALID_KEYS[kind]
    eligible = [r for r in results if not r.get("degenerate") and math.isfinite(r[key])]
    pick = (max if kind == "classify" else min)(eligible, key=lambda r: r[key])
    assert results[best_on_valid(results)] is pick


def test_errors_are_one_line_and_write_nothing(finished_run: Path, tmp_path: Path) -> None:
    """Not a directory, not a finished run, a damaged file, an --out that is a folder: one
    line each (exit 2), and no page."""
    run = _copy(finished_run, tmp_path)
    (run / "summary.json").rename(run / "summary.bak")
    (tmp_path / "folder").mkdir()
    cases = [
        (["report", str(tmp_path / "nope")], "not found"),
        (["report", str(run)], "not a finished morphnas run (no summary.json)"),
    ]
    for args, fragment in cases:
        code, errors = run_cli(*args)
        assert code == 2 and len(errors) == 1 and fragment in errors[0], errors
    (run / "summary.bak").rename(run / "summary.json")
    (run / "history.json").write_text("[{", encoding="utf-8")
    code, errors = run_cli("report", str(run))
    assert code == 2 and len(errors) == 1 and "history.json: line 1" in errors[0], errors
    (run / "history.json").unlink()
    code, errors = run_cli("report", str(run), "--out", str(tmp_path / "folder"))
    assert code == 2 and len(errors) == 1 and "is a directory" in errors[0], errors
    assert not (run / "report.html").exists()
    assert list((tmp_path / "folder").iterdir()) == []


# --------------------------------------------------------------------------- in a browser


def _apt_install_chromium(seconds: float = 300) -> str:
    """``apt-get install chromium``, after ``apt-get update`` when a fresh image has no package
    lists yet, all within ``seconds``: "" when it worked, else apt's last line of output."""
    deadline = time.monotonic() + seconds
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-get", *args, "-y", "-q"], capture_output=True, text=True, env=env,
            timeout=max(1.0, deadline - time.monotonic()),
        )  # fmt: skip

    done = apt("install", "chromium")
    if done.returncode != 0:
        apt("update")
        done = apt("install", "chromium")
    lines = (done.stdout + done.stderr).strip().splitlines()
    return "" if done.returncode == 0 else (lines[-1] if lines else f"exit {done.returncode}")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The ``chromium`` executable, installed with apt on a machine where we are root and apt
    exists (a one-time install of a few minutes); otherwise the test is skipped."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("needs chromium: apt-get install chromium (as root) to render the page")
    try:
        why = _apt_install_chromium()
    except subprocess.TimeoutExpired:
        why = "timed out"
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"apt-get install chromium failed: {why}")
    return found


def _chromium(executable: str, profile: Path, *args: str) -> str:
    """Run headless Chromium (its own profile, so runs beside each other do not collide)."""
    done = subprocess.run(
        [executable, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _colourful_pixels(path: Path) -> int:
    """Pixels whose channels differ by more than 60: plot lines and boxes, not text or grey."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def test_the_page_renders_in_headless_chromium(
    chromium: str, finished_run: Path, tmp_path: Path
) -> None:
    """Chromium opens the file with no server and no network: its DOM has the results table
    with every model and images that are PNGs; its screenshot shows the embedded plots (far
    more colour than the same page with the images taken out, which has only the badge)."""
    run = _copy(finished_run, tmp_path)
    page_path = write_report(run)
    blank = tmp_path / "no-images.html"
    blank.write_text(re.sub(r"<img [^>]*>", "", page_path.read_text("utf-8")), encoding="utf-8")
    doms = {}
    for source in (page_path, blank):  # one launch each: the DOM and the screenshot together
        doms[source] = _chromium(
            chromium, tmp_path / "profile", "--dump-dom", f"--screenshot={source}.png",
            "--window-size=1000,3000", source.as_uri(),
        )  # fmt: skip
    dom = Page(doms[page_path])
    models = [row[0][0].split("best on valid")[0] for row in dom.table_with("model")[1:]]
    summary = json.loads((run / "summary.json").read_text())
    assert models == [r["model"] for r in summary["results"]]
    assert len(dom.images) == len(list((run / "plots").glob("*.png")))
    for image in dom.images:
        assert base64.b64decode(image["src"].split(",", 1)[1]).startswith(PNG_SIGNATURE)
    colour = {source: _colourful_pixels(Path(f"{source}.png")) for source in doms}
    assert colour[page_path] > 20 * max(1, colour[blank]), colour
