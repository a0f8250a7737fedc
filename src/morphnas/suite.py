"""The benchmark suite (``morphnas benchmark``): does the searched cell beat the baselines?

One command runs the public forecasting datasets and the Shakespeare language model, each for
several seeds, with the search and every baseline under one budget, and writes one table:
per dataset and model the mean ± std over seeds of the test scores, the parameters and the
retraining seconds; per dataset the search seconds, the derived cells, and the *paired*
difference between the searched cell and the best baseline of the same seed. That baseline is
chosen by its valid score, never its test score, so the difference is what a person who picked
a model on valid would have gained or lost on test.

The runs go through ``api.compare`` (one "variant" per dataset), so they are resumable,
``reuse`` keeps finished ones, and ``jobs`` runs several at once; the mean ± std is compare's
``_aggregate``. Every run is its own run directory, ``<out>/<dataset>-seed<k>``.

Where the ``peers`` extra (neuralforecast) is installed, its NHITS and LSTM run on every
forecasting dataset and seed on the same windows and split (``morphnas.peers``), as the rows
``nf_nhits`` and ``nf_lstm``, stored in each run directory's ``peers.json`` so that ``reuse``
keeps them. They are peers, not baselines: the paired difference never picks them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from morphnas import api, bench, report, run_files, tasks
from morphnas import config as config_mod
from morphnas import genotype as genotype_mod
from morphnas import peers as peers_mod
from morphnas.config import RunConfig, TrainConfig
from morphnas.engine.progress import Progress
from morphnas.engine.runtime import resolve_device
from morphnas.errors import UserError
from morphnas.tasks.forecasting import Forecasting

# The language model's entry: ``shakespeare`` means ``--task lm --dataset shakespeare``.
LM_DATASET = "shakespeare"
DATASETS = ("births", "exchange", "elecdemand", "synthetic", LM_DATASET)
# Every baseline, in table order; those the installed config does not accept are left out (the
# *_genotype cells came later than the others), and ``ar``/``naive`` are not language models.
BASELINES = ("lstm", "gru", "gru_genotype", "lstm_genotype", "ar", "naive", "snaive", "var")
# The smoke budget of ``quick``: a few minutes on two cores for all five datasets, what CI runs.
# It only shows that every part runs; its numbers mean nothing.
QUICK: dict[str, Any] = {
    "space": {"hidden": 8},
    "search": {"epochs": 2},
    "train": {"epochs": 2, "ar_window": 8},
    "data": {"window": 8},
    "lm": {"train_tokens": 5000, "vocab_size": 1000, "bptt": 12},
}
# Per-model figures averaged over seeds (the search's only on the searched cell's row).
MODEL_METRICS = (
    "params", "valid_rse", "test_rse", "test_corr", "valid_ppl", "test_ppl", "train_seconds",
    "search_seconds", "search_cpu_seconds",
)  # fmt: skip
DELTA_METRICS = ("delta_test_rse", "delta_test_corr", "delta_test_ppl")
# The table's last line where neuralforecast is not installed (``peers.describe`` otherwise).
PEERS = peers_mod.describe(peers_mod.DEFAULT_BUDGET, installed=False)


def benchmark(
    datasets: Sequence[str] = DATASETS,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    quick: bool = False,
    out: Path | None = None,
    jobs: int = 1,
    reuse: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
    peers: bool = True,
    peer_budget: peers_mod.PeerBudget | None = None,
) -> api.RunResult:
    """Search and every baseline on each dataset and seed; write ``benchmark.json`` and
    ``benchmark.md`` to ``out`` (default ``runs/<time>-benchmark``) and return the table.

    ``file`` and ``overrides`` (a YAML config and ``--set`` values) apply to every run; on top
    of the defaults, or of ``QUICK`` with ``quick``. The language model starts from its own
    defaults (``tasks.language.LanguageModelling.defaults``), as ``search --task lm`` does.
    ``command`` is recorded in the table (the CLI passes the line that was typed).

    ``peers`` (where neuralforecast is installed) adds NeuralForecast's NHITS and LSTM on each
    forecasting dataset and seed, under ``peer_budget`` (default ``peers.DEFAULT_BUDGET``,
    ``peers.QUICK_BUDGET`` with ``quick``; on the runs' ``threads``, or one thread).
    """
    names = _datasets(datasets)
    if not seeds or len(set(seeds)) < len(seeds):
        raise UserError(f"seeds must be distinct and at least one, got {list(seeds)}")
    base_dir = Path(out) if out is not None else default_out()
    if base_dir.is_dir() and any(base_dir.iterdir()) and not (reuse or force):
        raise UserError(
            f"output directory {base_dir} already holds files; choose another --out, pass "
            "--reuse to continue that benchmark, or --force to replace it"
        )
    configs = {name: dataset_config(name, file, overrides or {}, quick) for name in names}
    # compare resolves each variant on its base config; every variant carries its whole config
    # (the language model's defaults differ), and the base is a forecasting one where there is
    # one, whose free-form options are a subset of the LM's, so nothing leaks between them.
    base = next((c for n, c in configs.items() if n != LM_DATASET), configs[names[0]])
    base = config_mod.resolve(base=base, overrides={"out": str(base_dir)})
    variants = [(name, _as_overrides(cfg)) for name, cfg in configs.items()]
    api.compare(base, variants, list(seeds), progress=progress, force=force, jobs=jobs, reuse=reuse)
    budget = None
    if peers:
        budget = peer_budget or (peers_mod.QUICK_BUDGET if quick else peers_mod.DEFAULT_BUDGET)
    peer_rows, peer_line = {}, peers_mod.describe(budget)
    if budget is not None and all(name == LM_DATASET for name in names):
        peer_line = "peers: none (they forecast series; the language model has no peer)"
    elif budget is not None and peers_mod.available():
        peer_rows = run_peers(base_dir, configs, seeds, budget, reuse=reuse, progress=progress)
    runs = collect(base_dir, names, seeds, peer_rows)
    result = {
        "command": command or "morphnas.suite.benchmark (Python API)",
        "commit": _commit(),
        "machine": bench.machine_info(resolve_device(base.device), quick),
        "quick": quick,
        "datasets": [
            {"dataset": name, "budget": describe_budget(cfg)} for name, cfg in configs.items()
        ],
        "seeds": list(seeds),
        "peers": peer_line,
        "runs": runs,
        **aggregate(runs),
    }
    run_files.write_json(base_dir / "benchmark.json", result)
    (base_dir / "benchmark.md").write_text(markdown(result), encoding="utf-8")
    table = result.pop("table")
    return api.RunResult(base_dir, None, table, result)


def default_out() -> Path:
    """``runs/<time>-benchmark``: where a benchmark goes without ``out``."""
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-benchmark"


def _datasets(datasets: Sequence[str]) -> list[str]:
    """The requested datasets, checked: known, none twice, at least one."""
    names = list(datasets)
    for name in names:
        if name not in DATASETS:
            close = difflib.get_close_matches(name, DATASETS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(
                f"unknown benchmark dataset {name!r}; {hint}the suite runs {', '.join(DATASETS)} "
                f"({LM_DATASET}: the language model)"
            )
    if not names or len(set(names)) < len(names):
        raise UserError(f"--datasets needs distinct names from {', '.join(DATASETS)}, got {names}")
    return names


def accepted_baselines(lm: bool) -> list[str]:
    """``BASELINES`` that this version's ``TrainConfig`` accepts (checked at run time, so the
    suite picks up a baseline the moment the config knows it), minus the tabular ones for LM."""
    names = []
    for name in BASELINES:
        try:
            TrainConfig(baselines=[name])
        except ValidationError:
            continue
        if not (lm and name in Forecasting.baselines):
            names.append(name)
    return names


def dataset_config(
    name: str, file: Path | None, overrides: Mapping[str, Any], quick: bool
) -> RunConfig:
    """One dataset's config: defaults (``QUICK`` with ``quick``) and every baseline, then the
    user's file and overrides, then the dataset itself (and ``task: lm`` for the corpus)."""
    lm = name == LM_DATASET
    task = {"task": "lm" if lm else "forecast", "data": {"dataset": name}}
    base = config_mod.merge(
        QUICK if quick else {}, {"train": {"baselines": accepted_baselines(lm)}}
    )
    config = config_mod.resolve(file, config_mod.merge(dict(overrides), task), base=base)
    if config.data.csv is not None or config.lm.corpus is not None:
        raise UserError(
            "the benchmark runs the public datasets: drop data.csv / lm.corpus from the config"
        )
    return config


def _as_overrides(config: RunConfig) -> dict[str, Any]:
    """A config as compare's variant overrides: all of it, but the seed and run directory that
    compare sets per run."""
    return {k: v for k, v in config.model_dump().items() if k not in ("seed", "out")}


def describe_budget(config: RunConfig) -> str:
    """The budget in one line, for the table (each run's ``config.yaml`` holds all of it)."""
    text = (
        f"{config.space.name} {config.space.nodes} nodes, hidden {config.space.hidden}, "
        f"{config.search.strategy} {config.search.epochs} search epochs, retrain ≤ "
        f"{config.train.epochs} epochs"
    )
    return f"{text}, {tasks.kind_for(config).budget()}"


def compact_genotype(genotype: genotype_mod.Genotype) -> str:
    """A cell on one line, from its readable text: ``add_tanh(u,h); hadamard(s1,u) → h_t = ...``
    (node i is the i-th op, so its name ``s<i>`` need not be repeated)."""
    header, *nodes = str(genotype).splitlines()
    ops = "; ".join(line.split(" = ", 1)[1].replace(", ", ",") for line in nodes)
    return f"{ops} → {header.split(', ', 1)[1]}"


def run_peers(
    base_dir: Path,
    configs: Mapping[str, RunConfig],
    seeds: Sequence[int],
    budget: peers_mod.PeerBudget,
    *,
    reuse: bool = False,
    progress: Progress | None = None,
) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """The peers of every forecasting run (the language model has none), by (dataset, seed):
    run in each run directory, or kept from its ``peers.json`` with ``reuse``. The config is
    the run's own ``config.yaml``, so the peers see its very data, split and seed."""
    runs = [(name, seed) for seed in seeds for name in configs if name != LM_DATASET]
    if progress is not None and runs:
        progress.start("peers (neuralforecast)", len(runs))
    results = {}
    try:
        for name, seed in runs:
            run_dir = base_dir / f"{name}-seed{seed}"
            config = config_mod.resolve(run_dir / "config.yaml", overrides={"out": str(run_dir)})
            own = dataclasses.replace(budget, threads=config.threads or budget.threads)
            results[name, seed] = peers_mod.run_stored(run_dir, config, own, reuse=reuse)
            if progress is not None:
                progress.advance()
    finally:
        if progress is not None and runs:
            progress.stop()
    return results


def collect(
    base_dir: Path,
    datasets: Sequence[str],
    seeds: Sequence[int],
    peer_rows: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Every model's row of every run, from the runs' ``summary.json``: with its dataset, seed
    and run directory, whether it is a baseline (the ``one-shot`` row of grow-and-prune is not),
    and, on the searched cell's row, the search's figures and the derived cell; after each
    run's rows, its peers' rows from ``peer_rows`` (``peer: True``, never a baseline)."""
    rows = []
    for seed in seeds:
        for name in datasets:
            run_dir = base_dir / f"{name}-seed{seed}"  # compare's naming of its runs
            summary = run_files.read_summary(run_dir)
            baselines = {m["name"] for m in summary["models"]} - {api.SEARCHED}
            extra = {k: v for k, v in summary.items() if k not in ("genotype", "models", "results")}
            for result in summary["results"]:
                row = {"dataset": name, "seed": seed, "run_dir": str(run_dir), **result}
                row["baseline"] = result["model"] in baselines
                if result["model"] == api.SEARCHED:
                    row.update(extra)
                    cell = genotype_mod.from_dict(summary["genotype"])
                    row["genotype"] = compact_genotype(cell)
                rows.append(row)
            for result in (peer_rows or {}).get((name, seed), []):
                row = {"dataset": name, "seed": seed, "run_dir": str(run_dir), **result}
                rows.append({**row, "baseline": False, "peer": True})
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _is_lm(row: Mapping[str, Any]) -> bool:
    return "test_ppl" in row


def paired_differences(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset and seed: searched − the best baseline of that run, on each test metric.

    The best baseline is the one with the lowest *valid* RSE (perplexity for a language model);
    test scores never choose it. A run without a searched row or a baseline with a finite valid
    score has no difference.
    """
    paired = []
    for (dataset, seed), run in _groups(rows, ("dataset", "seed")).items():
        searched = next((r for r in run if r["model"] == api.SEARCHED), None)
        if searched is None:
            continue
        select, tests = ("valid_ppl", ("test_ppl",)) if _is_lm(searched) else (
            "valid_rse", ("test_rse", "test_corr")
        )  # fmt: skip
        candidates = [r for r in run if r.get("baseline") and _finite(r.get(select))]
        if not candidates:
            continue
        best = min(candidates, key=lambda r: r[select])
        row = {
            "dataset": dataset,
            "seed": seed,
            "best_baseline": best["model"],
            "chosen_by": select,
        }
        row.update({f"delta_{k}": searched[k] - best[k] for k in tests})
        paired.append(row)
    return paired


def _groups(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> dict[tuple[Any, ...], list[Mapping[str, Any]]]:
    """Rows grouped by ``keys``, groups in order of first appearance."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The suite's tables from every run's rows, mean ± std over seeds by compare's aggregation:
    ``table`` per dataset and model; ``paired`` per dataset and seed; ``summary`` per dataset
    (the paired differences' mean ± std, the baselines that were best, the derived cells)."""
    table = []
    for (dataset, model), group in _groups(rows, ("dataset", "model")).items():
        mean = api._aggregate(model, list(group), metrics=MODEL_METRICS)
        del mean["variant"]
        peer = {"peer": True} if any(r.get("peer") for r in group) else {}
        table.append({"dataset": dataset, "model": model, **mean, **peer})
    paired = paired_differences(rows)
    by_dataset = _groups(paired, ("dataset",))
    summary = []
    for (dataset,), group in _groups(rows, ("dataset",)).items():
        chosen = by_dataset.get((dataset,), [])
        mean = api._aggregate(dataset, list(chosen), metrics=DELTA_METRICS)
        del mean["variant"]
        summary.append(
            {
                "dataset": dataset,
                **mean,
                "chosen_by": chosen[0]["chosen_by"] if chosen else None,
                "best_baselines": [r["best_baseline"] for r in chosen],
                "genotypes": [
                    {"seed": r["seed"], "genotype": r["genotype"]}
                    for r in group
                    if r["model"] == api.SEARCHED
                ],
            }
        )
    return {"table": table, "paired": paired, "summary": summary}


def _commit() -> str | None:
    """The source's commit (``git rev-parse --short HEAD``), marked when the tree differs from
    it; None outside a git checkout."""
    where = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=where, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "--short", "HEAD")
    if head is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{head} (with uncommitted changes)" if dirty else head


def _mean_std(row: Mapping[str, Any], key: str) -> str:
    """``mean ± std`` (just the mean for one seed); ``–`` where the row lacks the metric."""
    mean = row.get(key)
    if mean is None:
        return report.MISSING
    std = row[f"{key}_std"]
    if key == "params":
        text, spread = f"{round(mean):,}", f"{round(std):,}"
    elif key.endswith("seconds"):
        text, spread = f"{mean:.1f}", f"{std:.1f}"
    else:
        sign = "+" if key.startswith("delta") else ""
        text, spread = f"{mean:{sign}.4g}", f"{std:.2g}"
    return f"{text} ± {spread}" if row.get("seeds", 1) > 1 else text


def markdown(result: Mapping[str, Any]) -> str:
    """The benchmark as a markdown document: provenance, the paired differences and search
    costs per dataset, every model's scores, the derived cells."""
    machine = result["machine"]
    device = machine["device"]
    if device != "cpu":
        device += f" ({machine['device_name']})"
    load = machine["load_average_1min"]
    load = "unknown" if load is None else f"{load:.1f}"
    seeds = ", ".join(str(s) for s in result["seeds"])
    title = "# morphnas benchmark"
    if result["quick"]:
        title += " (--quick: a smoke run, its numbers mean nothing)"
    lines = [
        title,
        "",
        f"- command: `{result['command']}`",
        f"- commit: {result['commit'] or 'unknown (not a git checkout)'}",
        f"- machine: {machine['cpu_count']} cores, {machine['cpu_name']}, {device}, torch "
        f"{machine['torch']}; load average {load} when the table was written",
        f"- finished: {machine['date']}; seeds {seeds}; runs in `<dataset>-seed<k>/`",
        *(f"- budget, {d['dataset']}: {d['budget']}" for d in result["datasets"]),
        "",
        "## Searched cell against the best baseline",
        "",
        "Δ = searched − best baseline, per seed, then mean ± std over seeds. The best baseline "
        "of each seed is the one with the lowest **valid** RSE (valid perplexity for the "
        "language model), never chosen on test. Negative Δ test RSE / ppl and positive Δ test "
        "CORR favour the searched cell. Only our own baselines are candidates: the peers "
        "(neuralforecast's models, marked *peer* below) are not.",
        "",
        "| dataset | search s | Δ test RSE / ppl | Δ test CORR | best baseline per seed |",
        "|---|---:|---:|---:|---|",
    ]
    searched = {r["dataset"]: r for r in result["table"] if r["model"] == api.SEARCHED}
    for row in result["summary"]:
        dataset = row["dataset"]
        delta = "delta_test_ppl" if row.get("delta_test_ppl") is not None else "delta_test_rse"
        best = ", ".join(row["best_baselines"]) or "–"
        lines.append(
            f"| {dataset} | {_mean_std(searched.get(dataset, {}), 'search_seconds')} | "
            f"{_mean_std(row, delta)} | {_mean_std(row, 'delta_test_corr')} | {best} |"
        )
    lines += [
        "",
        "## Every model",
        "",
        "Mean ± std over seeds; test scores on the held-out test span (original units); "
        "train s: retraining seconds (a peer's: fitting and forecasting). Rows marked *peer* "
        "are external models on the same windows and split, for reference, not baselines.",
        "",
        "| dataset | model | seeds | params | valid RSE / ppl | test RSE / ppl | test CORR "
        "| train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["table"]:
        valid, test = ("valid_ppl", "test_ppl") if _is_lm(row) else ("valid_rse", "test_rse")
        model = f"{row['model']} (*peer*)" if row.get("peer") else row["model"]
        lines.append(
            f"| {row['dataset']} | {model} | {row['seeds']} | {_mean_std(row, 'params')} "
            f"| {_mean_std(row, valid)} | {_mean_std(row, test)} | "
            f"{_mean_std(row, 'test_corr')} | {_mean_std(row, 'train_seconds')} |"
        )
    lines += ["", "## Derived cells", ""]
    for row in result["summary"]:
        for cell in row["genotypes"]:
            lines.append(f"- {row['dataset']}, seed {cell['seed']}: `{cell['genotype']}`")
    lines += ["", result["peers"], ""]
    return "\n".join(lines)
