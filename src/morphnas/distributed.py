"""Fan-out of many runs over Ray Tune: ``compare --jobs N`` and ``morphnas sweep``.

One mechanism for every "several runs at once": each run is a Tune trial (a Ray worker
process with its own CPU/GPU share, on this machine or a cluster), so a compare on a laptop and
a sweep on a cluster schedule, report and fail the same way. The runs themselves are plain
callables (``api._compare_run`` bound to one config): this module knows nothing of configs or
run directories beyond the ``metrics.jsonl`` it reads the epochs from, which keeps it free of
``api`` (which imports it).

Ray is optional (the ``ray`` extra) and imported only here, inside the functions: the CLI
starts in a fraction of a second without it.

What crosses from a worker to the driver is JSON in the trial's reports: the finished run's
row, the warnings the run raised (the driver shows them with its own ``warnings.showwarning``,
the CLI's one line, as they arrive), and a ``UserError``/``StopRequested`` as data, re-raised
in the driver as the sequential run would have raised it. A worker's own stdout/stderr is not
forwarded (``log_to_driver=False``): Ray would prefix every line with the actor's name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morphnas import run_files
from morphnas.engine.progress import Progress
from morphnas.engine.resume import StopRequested
from morphnas.engine.runtime import cpu_cores, keep_freed_memory
from morphnas.errors import UserError

INSTALL = "pip install 'morphnas[ray]'"
EPOCH_METRIC = "search_valid_loss"  # what every search epoch reports to Tune (ASHA's metric)
_PROBE_TIMEOUT_S = 3.0  # --address: the TCP probe, then the trial join below: under 30 s in all
CONNECT_TIMEOUT_S = 25.0
_QUIET = {  # Tune's per-trial CSV/JSON/TensorBoard loggers: the run directory has it all
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


@dataclass(frozen=True)
class Trial:
    """One run as a trial: ``run(progress)`` does it and returns its row (picklable: a
    module-level function bound with ``functools.partial``); ``metrics`` is the
    ``metrics.jsonl`` whose search epochs are reported to Tune as they are written."""

    name: str
    run: Callable[[Progress | None], dict[str, Any]]
    metrics: Path | None = None


@dataclass(frozen=True)
class Outcome:
    """A trial's end: its row, or None when the scheduler (ASHA) stopped it early."""

    row: dict[str, Any] | None

    @property
    def stopped(self) -> bool:
        return self.row is None


@dataclass(frozen=True)
class Plan:
    """How the trials run: each one's share of a node (``cpus`` may be fractional: ``compare
    --jobs`` over more jobs than cores), at most ``concurrent`` at once (None: as many as the
    resources allow), and ASHA early stopping on ``EPOCH_METRIC`` (lower is better) when
    ``asha_epochs`` (the search epochs, ASHA's horizon) is set."""

    cpus: float = 1.0
    gpus: float = 0.0
    concurrent: int | None = None
    asha_epochs: int | None = None
    grace_period: int = 1
    reduction_factor: int = 4


def require(what: str) -> None:
    """Refuse, in one line, a command that needs Ray when Ray is not installed."""
    try:
        import ray  # noqa: F401 - loaded now: the command uses it next
    except ImportError:
        raise UserError(f"{what} runs its runs on Ray, which is not installed: {INSTALL}") from None


@contextmanager
def session(address: str | None = None, *, checked: bool = False) -> Iterator[None]:
    """Ray for the duration: joined at ``address`` (``auto``: the cluster started on this
    machine with ``ray start``; ``HOST:PORT`` or ``ray://HOST:PORT``), else started here on
    every core, quietly, its files in a temporary folder deleted afterwards. A session already
    open in this process (a library user's, a test module's) is used as it is and left open.
    ``checked``: the caller ran ``check_address`` already (before writing its first file)."""
    require("this command")
    import ray

    os.environ.update({k: v for k, v in _QUIET.items() if k not in os.environ})
    if address is not None and not checked:
        check_address(address)
    if ray.is_initialized():
        yield
        return
    temp = None
    if address is None:  # a short path: Ray's socket paths have a length limit
        temp = tempfile.mkdtemp(prefix="morphnas-ray-")
        start = dict(num_cpus=cpu_cores(), _temp_dir=temp)
    else:
        start = dict(address=address)
    try:
        _init(**start)
        yield
    finally:
        ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def check_address(address: str) -> None:
    """Refuse, in under 30 s, an address where no Ray cluster answers (``ray.init`` would
    retry for ever): nothing listening is found by a TCP probe in seconds, a head that does
    not answer by a trial join (``_reaches``). ``auto`` is left to Ray, which fails fast when
    no cluster runs on this machine."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--address takes auto or HOST:PORT (e.g. 10.0.0.5:6379), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise UserError(
            f"--address {address}: no Ray cluster answers there ({err.strerror or err}); start "
            "one with `ray start --head`, or leave --address out to run on this machine"
        ) from None
    _reaches(address)


def _reaches(address: str) -> None:
    """Refuse, within ``CONNECT_TIMEOUT_S``, a head that accepts the connection but never
    answers: ``ray.init`` retries in C++ for ever, out of reach of a Python timeout, so the
    join is first tried by a child process that can be killed."""
    probe = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); ray.shutdown()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe, address],
            capture_output=True,
            text=True,
            timeout=CONNECT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise UserError(
            f"--address {address}: no Ray cluster answered within {CONNECT_TIMEOUT_S:.0f} s; "
            "check the head's address and port (`ray status` on the head)"
        ) from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise UserError(f"--address {address}: cannot join the Ray cluster ({lines[-1][:200]})")


def _init(**start: Any) -> None:
    """``ray.init``, quiet: no dashboard, only errors logged, workers' output not forwarded."""
    import ray

    ray.init(
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
        configure_logging=True,
        **start,
    )


def run(
    trials: Sequence[Trial],
    plan: Plan,
    *,
    keep_memory: bool = False,
    progress: Progress | None = None,
    description: str = "runs",
    finished: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """Every trial, in the given order as far as resources allow; their outcomes in that order.

    ``keep_memory``: the workers keep freed memory (``runtime.keep_freed_memory``), as the
    driver does under the CLI. ``finished(index, outcome)`` is called in the driver as each
    one ends (a sweep records it at once, so that a driver killed later keeps it). The first
    trial that raised a ``UserError`` or ``StopRequested`` has it raised here, after the others
    ended; any other failure is raised as Tune gives it."""
    from ray import tune

    trainable = tune.with_parameters(_trainable, trials=list(trials), keep_memory=keep_memory)
    resources = {"cpu": plan.cpus, "gpu": plan.gpus}
    if progress is not None:
        progress.start(f"{description}: {len(trials)} runs", len(trials))
    relay = _relay(progress, finished)
    # Tune's bookkeeping, not the runs; named by the driver, whose kill would leave it.
    storage = tempfile.mkdtemp(prefix=f"morphnas-tune-{os.getpid()}-")
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space={"index": tune.grid_search(list(range(len(trials))))},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=plan.concurrent, scheduler=_scheduler(plan)
            ),
            run_config=tune.RunConfig(
                storage_path=storage, name="morphnas", verbose=0, callbacks=[relay]
            ),
        )
        grid = tuner.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if progress is not None:
            progress.stop()
    by_index = {result.config["index"]: result for result in grid}
    outcomes = []
    for index in range(len(trials)):
        result = by_index[index]
        if result.error is not None:
            raise result.error
        outcomes.append(_outcome(result.metrics))
    return outcomes


def _scheduler(plan: Plan) -> Any:
    """ASHA on the per-epoch metric, or Tune's FIFO. Its horizon is one past the last epoch:
    a trial at its last epoch must go on to retrain its cell, not be cut at ``max_t``."""
    if plan.asha_epochs is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        metric=EPOCH_METRIC,
        mode="min",
        max_t=plan.asha_epochs + 1,
        grace_period=plan.grace_period,
        reduction_factor=plan.reduction_factor,
    )


def _outcome(metrics: dict[str, Any] | None) -> Outcome:
    """A trial's last report as its outcome; re-raise what the run raised."""
    report = json.loads((metrics or {}).get("outcome", "null") or "null")
    if report is None:
        return Outcome(None)  # stopped by the scheduler before its end
    error = report.get("error")
    if error is not None:
        kind, message = error
        raise StopRequested(message) if kind == "StopRequested" else UserError(message)
    return Outcome(report["row"])


def _relay(progress: Progress | None, finished: Callable[[int, Outcome], None] | None) -> Any:
    """A Tune callback in the driver: the workers' warnings shown as they arrive, the bar
    advanced and ``finished`` told as each trial ends."""
    from ray import tune

    class Relay(tune.Callback):
        # Tune pickles its run config, callbacks included, for a restore this module never
        # asks for: the driver's bar and hook (a rich console, locks) are attributes, left out
        # of the pickle, not names the class closes over (pickled with it).
        def __getstate__(self) -> dict[str, Any]:
            return {}

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **_):
            for item in json.loads(result.get("warnings", "[]")):
                _show(item)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
            self.ended(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **_: Any) -> None:
            self.ended(trial)

        def ended(self, trial: Any) -> None:
            if self.progress is not None:
                self.progress.advance()
            if self.finished is None or trial.status == "ERROR":
                return
            try:
                outcome = _outcome(trial.last_result)
            except (UserError, StopRequested):
                return  # raised by ``run`` once every trial ended
            self.finished(trial.config["index"], outcome)

    relay = Relay()
    relay.progress, relay.finished = progress, finished
    return relay


def _show(item: dict[str, Any]) -> None:
    """A worker's warning through this process's ``showwarning`` (the CLI's: one line)."""
    category = {
        c.__name__: c for c in (UserWarning, RuntimeWarning, DeprecationWarning, FutureWarning)
    }.get(item["category"], UserWarning)
    warnings.showwarning(item["message"], category, item["filename"], item["lineno"])


# --- in the worker ---


def _trainable(config: dict[str, Any], trials: list[Trial], keep_memory: bool) -> None:
    """A Tune function trainable: run trial ``config["index"]``, reporting each search epoch
    and its warnings, then the outcome (its row, or the error a person can act on)."""
    from ray import tune

    if keep_memory:
        keep_freed_memory()
    trial = trials[config["index"]]
    with warnings.catch_warnings(record=True) as caught:
        reporter = _Reporter(trial.metrics, caught)
        try:
            outcome: dict[str, Any] = {"row": trial.run(reporter)}
        except (UserError, StopRequested) as err:
            outcome = {"error": [type(err).__name__, str(err)]}
        last = {"epoch": reporter.epoch, EPOCH_METRIC: reporter.loss}  # Tune wants the metric
        tune.report({**reporter.drain(), **last, "outcome": json.dumps(outcome)})


class _Reporter:
    """The run's ``Progress``: whenever a phase starts (a search epoch, a retraining), the
    search epochs newly in ``metrics.jsonl`` go to Tune (``search_valid_loss`` at ``epoch``),
    for ASHA to judge; warnings raised meanwhile go with them. Reading the file, not hooking
    the log, keeps the run exactly the run a sequential compare makes."""

    def __init__(self, metrics: Path | None, caught: list[warnings.WarningMessage]) -> None:
        self.metrics, self.caught = metrics, caught
        self.epoch, self.loss, self.seen = 0, float("nan"), 0

    def start(self, description: str, total: int) -> None:
        del description, total
        from ray import tune

        for row in self._new_epochs():
            self.epoch, self.loss = int(row["epoch"]), float(row["valid_loss"])
            tune.report({**self.drain(), "epoch": self.epoch, EPOCH_METRIC: self.loss})

    def advance(self, steps: int = 1, **status: float) -> None:
        del steps, status

    def stop(self) -> None:
        pass

    def drain(self) -> dict[str, str]:
        """The warnings caught since the last report, as JSON for the driver."""
        items = [
            {
                "message": str(w.message),
                "category": w.category.__name__,
                "filename": w.filename,
                "lineno": w.lineno,
            }
            for w in self.caught[self.seen :]
        ]
        self.seen = len(self.caught)
        return {"warnings": json.dumps(items)}

    def _new_epochs(self) -> list[dict[str, Any]]:
        """Search-epoch rows past the last one reported (a resumed run's earlier epochs too)."""
        if self.metrics is None or not self.metrics.is_file():
            return []
        rows = run_files.read_metrics(self.metrics)
        return [
            row
            for row in rows
            if row.get("phase") == "search"
            and "event" not in row
            and row.get("valid_loss") is not None
            and int(row.get("epoch", 0)) > self.epoch
        ]
