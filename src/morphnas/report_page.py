"""``morphnas report RUN``: a finished run as one self-contained HTML page.

The page is one file that a person can mail, attach to an issue or open from a laptop years
later: every image is embedded as a base64 ``data:`` URI, the style sheet is inline, and there
is no script, font or link to fetch. A Content-Security-Policy in the page itself forbids
anything else (``default-src 'none'``), so a browser never reaches the network for it, even if
someone edits the file later.

The tables are those the CLI prints: the rich tables of ``morphnas.report`` converted cell for
cell, so the page and the terminal agree to the digit. Each section appears only when the run
has its file; every file is read through ``morphnas.run_files`` (a damaged one is a one-line
error naming it), and every piece of text from a file is escaped, since a column, model or
file name is the user's text, not markup.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from numbers import Real
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from morphnas import genotype as genotype_mod
from morphnas import report, run_files, runs
from morphnas.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISSING = report.MISSING
# A long forecast.csv shows its first and last rows only: the page is a summary, the file is there.
CSV_EDGE_ROWS = 5

# What each plot the commands write shows; a PNG with another name gets its file name.
PLOT_CAPTIONS = {
    "learning_curves.png": "Learning curves: train and validation loss per epoch, for the "
    "search and for each retrained model.",
    "arch.png": "Architecture weights: how each node's op probabilities moved during the search.",
    "growth.png": "Growth: nodes and validation loss over the search epochs, each growth and "
    "prune event marked.",
    "forecast.png": "Forecasts on the test span: truth against each model.",
    "future.png": "Forecast beyond the data, with its prediction intervals (morphnas forecast).",
}
GENOTYPE_PLOT = "genotype.png"

# The validation score that picks the best model, per kind of result (told by the metric only it
# has), and whether higher is better: the model one would choose without looking at the test split.
_VALID_SCORES = (("valid_ppl", False), ("valid_accuracy", True), ("valid_rse", False))

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em;
       color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .3em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: .5em 0; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding-bottom: .3em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; } td:first-child, th:first-child { text-align: left; }
tr.best td { background: #eaf6ea; } tr.gap td { text-align: center; color: #777; }
.badge { font-size: .8em; background: #2e7d32; color: #fff; border-radius: .3em;
         padding: 0 .35em; margin-left: .4em; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .9em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee;
             box-sizing: border-box; }
.scroll { overflow-x: auto; }
figcaption, p.note { color: #555; font-size: .92em; }
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the page of the finished run ``run_dir`` to ``out`` (default ``RUN/report.html``)
    and return its path.

    Every file is read and the whole page built before anything is written, so a damaged file
    leaves no half page behind; the page itself is replaced atomically.
    """
    run_dir = run_files.check_run_dir(run_dir)
    summary = run_files.read_summary(run_dir)  # also: no summary.json = not a finished run
    out = Path(out) if out is not None else run_dir / "report.html"
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the path of the HTML file to write")
    page = _page(run_dir, summary)
    _write_text(out, page)
    return out


def _page(run_dir: Path, summary: Mapping[str, Any]) -> str:
    """The whole HTML document of ``run_dir`` (whose ``summary.json`` is ``summary``)."""
    config_path = run_dir / "config.yaml"
    config = run_files.read_config(run_dir) if config_path.exists() else None
    sections = [
        _results_section(summary["results"]),
        _genotype_section(run_dir, summary.get("genotype")),
        _plots_section(run_dir, with_genotype=bool(summary.get("genotype"))),
        _growth_section(run_dir),
        _forecast_section(run_dir),
        _prune_section(run_dir),
        _config_section(run_files.read_text(config_path)) if config is not None else "",
    ]
    title = f"morphnas report: {run_dir.resolve().name}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
            _header(run_dir, title, summary, config),
            *(section for section in sections if section),
            "</body></html>",
            "",
        ]
    )


# --------------------------------------------------------------------------- sections


def _header(run_dir: Path, title: str, summary: Mapping[str, Any], config: Any) -> str:
    """Title and what the run was: command, task, data, space, when it finished."""
    command = runs.read_record(run_dir).get("kind")
    facts: list[tuple[str, Any]] = [("command", f"morphnas {command}" if command else None)]
    if config is not None:
        facts += [("task", config.task), ("data", _data_source(config))]
        if summary.get("genotype"):  # a baseline-only run never used the space
            space = config.space
            facts.append(("space", f"{space.name}, {space.nodes} nodes, {space.hidden} hidden"))
            facts.append(("strategy", config.search.strategy))
    # run.json keeps no date; summary.json is written last, when the run finished.
    finished = datetime.fromtimestamp((run_dir / "summary.json").stat().st_mtime, UTC)
    facts += [
        ("finished", finished.strftime("%Y-%m-%d %H:%M UTC")),
        ("run directory", str(run_dir.resolve())),
    ]
    rows = "".join(
        f"<dt>{escape(name)}</dt><dd>{escape(str(value))}</dd>"
        for name, value in facts
        if value is not None
    )
    return f'<header><h1>{escape(title)}</h1><dl class="meta">{rows}</dl></header>'


def _data_source(config: Any) -> str:
    """The file the run read (a corpus, image folder or CSV), else the bundled dataset's name."""
    corpus = config.lm.corpus if config.task == "lm" else None
    given = corpus or config.data.images or config.data.csv
    return str(given) if given else f"{config.data.dataset} (bundled)"


def _results_section(results: Sequence[Mapping[str, Any]]) -> str:
    """The CLI's results table, with the model the validation split picks marked."""
    if not results:
        return ""
    best = best_on_valid(results)
    table = _table_html(report.results_table(results, title=""), best_row=best)
    note = (
        '<p class="note"><span class="badge">best on valid</span> marks the model with the best '
        "validation score (the one to choose without looking at the test split); bold, as in "
        "the terminal, is the best test score.</p>"
        if best is not None
        else ""
    )
    return _section("results", "Results", table + note)


def best_on_valid(results: Sequence[Mapping[str, Any]]) -> int | None:
    """Index of the row with the best validation score among the rows whose cell works (not
    ``degenerate``) and whose score is a finite number; the first of equals. None if none has
    one."""
    key, higher = next(
        ((k, h) for k, h in _VALID_SCORES if any(k in row for row in results)), (None, False)
    )
    if key is None:
        return None
    best: int | None = None
    for i, row in enumerate(results):
        score = _finite(row.get(key))
        if score is None or row.get("degenerate"):
            continue
        if best is None or (score > results[best][key] if higher else score < results[best][key]):
            best = i
    return best


def _finite(value: Any) -> float | None:
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _genotype_section(run_dir: Path, data: Mapping[str, Any] | None) -> str:
    """The searched cell as text, and its drawing when ``plots/genotype.png`` exists."""
    if not data:
        return ""
    text = str(genotype_mod.from_dict(data))
    figure = _figure(run_dir / "plots" / GENOTYPE_PLOT, "The searched cell.")
    return _section("genotype", "Genotype", f"<pre>{escape(text)}</pre>{figure}")


def _plots_section(run_dir: Path, *, with_genotype: bool) -> str:
    """Every PNG in ``plots/`` with its caption: the known ones in reading order, then the rest
    by name (the genotype's drawing is in its own section when the run has a genotype)."""
    folder = run_dir / "plots"
    if not folder.is_dir():
        return ""
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if with_genotype and GENOTYPE_PLOT in names:
        names.remove(GENOTYPE_PLOT)
    order = list(PLOT_CAPTIONS)
    names.sort(key=lambda name: (order.index(name) if name in order else len(order), name))
    figures = [_figure(folder / name, PLOT_CAPTIONS.get(name, name)) for name in names]
    return _section("plots", "Plots", "".join(figures)) if figures else ""


def _figure(path: Path, caption: str) -> str:
    """``path`` embedded as a data URI with its caption; a file that is not a PNG is named
    instead of shown (a broken image would hide that the file is damaged)."""
    if not path.is_file():
        return ""
    data = path.read_bytes()
    label = f"plots/{path.name}"
    if not data.startswith(PNG_SIGNATURE):
        return (
            f'<p class="note">{escape(label)} is not a PNG image; redraw it with '
            "<code>morphnas plot RUN</code>.</p>"
        )
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img src="{uri}" alt="{escape(label)}">'
        f"<figcaption>{escape(caption)} <code>{escape(label)}</code></figcaption></figure>"
    )


def _growth_section(run_dir: Path) -> str:
    """``history.json``: one row per growth, widen and prune event, in the order they happened."""
    path = run_dir / "history.json"
    if not path.exists():
        return ""
    events = run_files.read_history(path)
    if not events:
        return _section("growth", "Growth timeline", '<p class="note">No growth events.</p>')
    columns = list(dict.fromkeys(key for event in events for key in event))
    rows = [[_value_text(key, event.get(key)) for key in columns] for event in events]
    return _section("growth", "Growth timeline", _plain_table(columns, rows))


def _value_text(key: str, value: Any) -> str:
    """A history value as a person reads it: times as UTC dates, numbers to 4 digits."""
    if value is None:
        return MISSING
    if key == "time" and _finite(value) is not None:
        with contextlib.suppress(OverflowError, OSError, ValueError):  # else shown as a number
            return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _forecast_section(run_dir: Path) -> str:
    """``forecast.csv`` (from ``morphnas forecast``): its first and last rows."""
    path = run_dir / "forecast.csv"
    if not path.exists():
        return ""
    text = run_files.read_text(path)
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as err:
        raise UserError(f"{path}: not a CSV file ({err}); {run_files.DAMAGED}") from None
    if not rows:
        raise UserError(f"{path} is empty; {run_files.DAMAGED}")
    header, body = rows[0], rows[1:]
    shown, hidden = _edges(body, CSV_EDGE_ROWS)
    table = _plain_table(header, shown, gap_after=CSV_EDGE_ROWS if hidden else None, gap=hidden)
    rows_word = "row" if len(body) == 1 else "rows"
    note = f'<p class="note">{len(body)} {rows_word} in <code>forecast.csv</code>.</p>'
    return _section("forecast", "Forecast", table + note)


def _edges(rows: list[list[str]], n: int) -> tuple[list[list[str]], int]:
    """The first and last ``n`` rows, and how many were left out between them."""
    if len(rows) <= 2 * n:
        return rows, 0
    return rows[:n] + rows[-n:], len(rows) - 2 * n


def _prune_section(run_dir: Path) -> str:
    """``prune/summary.json``: the table ``morphnas prune`` prints, and the models it skipped."""
    path = run_dir / "prune" / "summary.json"
    if not path.exists():
        return ""
    summary = run_files.read_json(path, dict)
    results, skipped = summary.get("results"), summary.get("skipped", {})
    if not isinstance(results, list) or not isinstance(skipped, dict):
        raise UserError(f"{path}: expected its results and skipped models; {run_files.DAMAGED}")
    try:
        table = _table_html(report.prune_table(results, title="")) if results else ""
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise UserError(f"{path}: a result row is damaged ({err!r}); {run_files.DAMAGED}") from None
    notes = "".join(
        f'<p class="note">not pruned: {escape(str(name))} ({escape(str(why))})</p>'
        for name, why in skipped.items()
    )
    return _section("prune", "Channel pruning", table + notes)


def _config_section(text: str) -> str:
    return _section("config", "Resolved config (config.yaml)", f"<pre>{escape(text)}</pre>")


# --------------------------------------------------------------------------- HTML helpers


def _section(ident: str, heading: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{escape(heading)}</h2>{body}</section>'


def _table_html(table: Table, best_row: int | None = None) -> str:
    """A rich table as an HTML table, cell for cell: its text as the terminal shows it, bold
    where the terminal's is; the row ``best_row`` marked."""
    headers = [str(column.header) for column in table.columns]
    columns = [[_cell_html(cell) for cell in column.cells] for column in table.columns]
    rows = [list(row) for row in zip(*columns, strict=True)]
    if best_row is not None:
        rows[best_row][0] += '<span class="badge">best on valid</span>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        ('<tr class="best">' if i == best_row else "<tr>")
        + "".join(f"<td>{cell}</td>" for cell in row)
        + "</tr>"
        for i, row in enumerate(rows)
    )
    title = f"<caption>{escape(str(table.title))}</caption>" if table.title else ""
    caption = f'<p class="note">{escape(str(table.caption))}</p>' if table.caption else ""
    table_html = f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table_html}</div>{caption}'


def _cell_html(cell: Any) -> str:
    """One rich cell as escaped HTML, in ``<strong>`` if any of it is bold."""
    if not isinstance(cell, Text):
        return escape(str(cell))
    styles = [str(cell.style), *(str(span.style) for span in cell.spans)]
    html = escape(cell.plain)
    return f"<strong>{html}</strong>" if any("bold" in s.split() for s in styles) else html


def _plain_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    gap_after: int | None = None,
    gap: int = 0,
) -> str:
    """A table of text; with ``gap_after``, a row saying ``gap`` rows were left out there."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    lines = []
    for i, row in enumerate(rows):
        if i == gap_after:
            lines.append(
                f'<tr class="gap"><td colspan="{max(1, len(headers))}">… {gap} rows …</td></tr>'
            )
        lines.append("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _write_text(out: Path, text: str) -> None:
    """Write ``out`` atomically; a path that cannot be written is a one-line error."""
    try:
        run_files.write_text(out, text)
    except OSError as err:
        raise UserError(
            f"cannot write {out}: {err.strerror or err}; choose another --out"
        ) from None
