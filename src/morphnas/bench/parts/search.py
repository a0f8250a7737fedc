"""The ``search`` part: seconds per epoch of the real search engine, per strategy and space."""

from __future__ import annotations

import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from morphnas import spaces, strategies
from morphnas.config import SearchConfig
from morphnas.data import make_windows, synthetic_series
from morphnas.engine.runtime import apply_threads, choose_threads
from morphnas.engine.search import search as run_search
from morphnas.run_files import MetricsLog
from morphnas.tasks.forecasting import ForecastModel, ForecastTask

SEARCH_SETUP = {"hidden": 32, "nodes": 4, "window": 24, "n_series": 8, "batch_size": 64}
# ``search.<variant>``: a strategy with options other than its defaults, timed beside them.
SEARCH_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "idarts_finite_all": ("idarts", {"hvp": "finite_all"}),
    # E2NAS without complementation: its cost beside GDAS's without the two extra sub-networks.
    "e2nas_no_complement": ("e2nas", {"complementation": "off"}),
}


def _search_epoch_seconds(
    strategy_name: str,
    space_name: str,
    data: Any,
    device: torch.device,
    options: dict[str, Any] | None = None,
) -> tuple[float, int]:
    """One epoch of the real search loop (arch step + weight step per batch, the epoch's
    validation pass and checkpoint included) with the strategy's ``options``; returns seconds
    and batches."""
    setup = SEARCH_SETUP
    torch.manual_seed(0)
    n_series = setup["n_series"]
    # A strategy that needs a space option to apply (toponas: two_input's input choice) names it.
    wants = getattr(strategies.STRATEGIES[strategy_name], "space_options", {}).get(space_name, {})
    space = spaces.build(space_name, n_series, setup["hidden"], setup["nodes"], **wants)
    model = ForecastModel(space, setup["hidden"], n_series).to(device)
    strategy = strategies.build(strategy_name, space, **(options or {}))
    strategy.prepare()  # once per search, not per epoch (E2NAS's VAE): not timed
    train = tuple(t.to(device) for t in data.train)
    valid = tuple(t.to(device) for t in data.valid)
    config = SearchConfig(strategy=strategy_name, epochs=1, batch_size=setup["batch_size"])
    with tempfile.TemporaryDirectory(prefix="morphnas-bench-") as tmp, warnings.catch_warnings():
        # iDARTS's curvature check runs (and is timed) as in a search, but its verdict on γ is
        # about a search's quality, not this timing: the search command reports it.
        warnings.filterwarnings("ignore", message="iDARTS: ", category=RuntimeWarning)
        outcome = run_search(
            model,
            strategy,
            ForecastTask(train, valid, setup["batch_size"]),  # type: ignore[arg-type]
            config,
            seed=0,
            log=MetricsLog(Path(tmp) / "metrics.jsonl"),
            checkpoint_dir=Path(tmp) / "checkpoints",
        )
    batches = -(-len(data.train[0]) // setup["batch_size"])
    return outcome.seconds, batches


def bench_search(device: torch.device, repeats: int, quick: bool) -> dict[str, Any]:
    """Seconds per search epoch for every strategy and space, on synthetic data, with the
    thread count the project's own policy picks for this size."""
    setup = SEARCH_SETUP
    series = synthetic_series(n_steps=400 if quick else 2000, n_series=setup["n_series"], seed=0)
    data = make_windows(series, setup["window"], 1)
    apply_threads(choose_threads(setup["hidden"], setup["batch_size"], device=device))
    result: dict[str, Any] = {}
    runs_of = {name: (name, {}) for name in strategies.STRATEGIES} | SEARCH_VARIANTS
    for key, (strategy_name, options) in runs_of.items():
        result[key] = {}
        # The median of ``repeats`` for first-order DARTS, the reference; one epoch for the
        # others, so that the whole bench stays within minutes (an iDARTS epoch is ~20× DARTS').
        count = repeats if key == "darts" else 1
        for space_name in spaces.of_modality("sequences"):  # forecasting searches
            runs = [
                _search_epoch_seconds(strategy_name, space_name, data, device, options)
                for _ in range(count)
            ]
            result[key][space_name] = {
                "seconds_per_epoch": statistics.median(seconds for seconds, _ in runs),
                "batches_per_epoch": runs[0][1],
                "threads": torch.get_num_threads(),
                "config": {**setup, "train_windows": len(data.train[0])},
            }
    return result
