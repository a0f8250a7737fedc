"""An RL-DARTS run, from search to comparison (``morphnas search --task rl``).

1. **Search**: a PPO agent whose encoder is the ``darts_cnn`` supernet (α initialised to zeros,
   mixing by softmax(α)) plays the game and learns from the RL loss alone; α and the weights
   share one Adam (single-level, end to end, the supernet acting: the paper's defaults).
2. **Read-out**: DARTS's rule (``derive``): per node the two strongest inputs, each with its
   strongest op, ``none`` excluded.
3. **Retrain and compare**: the derived network and the hand-designed encoder
   (``train.baselines``: ``minatar_cnn``) are each trained from scratch with the same PPO, the
   same seed and the same games, then scored on ``rl.eval_episodes`` fresh episodes.

Each phase checkpoints every ``rl.checkpoint_every`` updates and when it ends; ``--resume``
continues the phase that was running from its last checkpoint (the metrics rows written after
it are dropped and written again), so a run stopped at any point — SIGKILL included — ends as
the uninterrupted run would (CPU, same machine and thread count).

The run directory has the files of any search (``config.yaml``, ``run.json``, ``metrics.jsonl``
with one row per PPO update and its ``phase``, ``genotype.json``, ``checkpoints/``,
``models/<name>.pt``, ``summary.json``) and ``plots/returns.png``, the learning curves.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from morphnas import cells, run_files, runs, spaces
from morphnas.engine.checkpoint import load as load_checkpoint
from morphnas.engine.checkpoint import save_atomic
from morphnas.engine.faults import crash_point
from morphnas.engine.progress import Progress, Silent
from morphnas.engine.resume import StopFlag, StopRequested, fits, stop_on_signals
from morphnas.engine.runtime import (
    apply_threads,
    choose_threads,
    resolve_device,
    seed_everything,
)
from morphnas.errors import UserError
from morphnas.genotype import Genotype
from morphnas.rl.agent import Agent, calibrate_batchnorm
from morphnas.rl.envs import MinAtarVec
from morphnas.rl.loop import Curve, PPOLoop, PPOSettings, evaluate
from morphnas.rl.plots import plot_returns

if TYPE_CHECKING:
    from morphnas.api import RunResult
    from morphnas.config import RunConfig
    from morphnas.rl.kind import ReinforcementLearning

SUPERNET, SEARCHED = "supernet", "searched"
# Streams of the run's seed (NumPy SeedSequence entropy [seed, stream]).
TRAIN_GAMES, EVAL_GAMES, SAMPLER, CALIBRATION = 0, 1, 2, 3
# Screens that calibrate the BatchNorms (``agent.calibrate_batchnorm``): random play of
# ``CALIBRATION_GAMES`` games, a screen of each after each of ``CALIBRATION_STEPS`` steps.
CALIBRATION_GAMES, CALIBRATION_STEPS = 32, 8
# The share of a phase's last updates whose episodes make its ``final_return``.
FINAL_SHARE = 0.1


@dataclass
class _Context:
    """What every phase of one run shares."""

    run_dir: Path
    config: RunConfig
    kind: ReinforcementLearning
    game: MinAtarVec
    device: torch.device
    log: run_files.MetricsLog
    saved: dict[str, dict[str, Any]]
    stamp: dict[str, Any] | None
    stop: StopFlag
    progress: Progress


def search(
    config: RunConfig,
    run_dir: Path,
    *,
    progress: Progress | None = None,
    force: bool = False,
    resume: bool = False,
) -> RunResult:
    """Search an encoder cell with PPO, read it out, retrain it and the hand-designed encoder,
    compare them; ``resume`` continues a stopped run in ``run_dir``."""
    from morphnas.api import RunResult  # on demand: the API imports the task kinds
    from morphnas.tasks import kind_for

    kind: ReinforcementLearning = kind_for(config)  # type: ignore[assignment]
    game = kind.load()  # a missing rl extra is refused before the run directory exists
    device = resolve_device(config.device)
    existed = run_dir.exists()
    if resume:
        apply_threads(config.threads or 1)
        saved = _saved_phases(run_dir)
    else:
        threads = choose_threads(
            config.space.hidden, _minibatch(config), config.threads, device=device
        )
        apply_threads(threads)
        runs.start(run_dir, config.model_copy(update={"threads": threads}), "search", replace=force)
        saved = {}
    log_path = run_dir / "metrics.jsonl"
    repair = (lambda: _trim_metrics(log_path, saved)) if resume else None
    log = run_files.MetricsLog(log_path, before_first=repair)
    cleared = nullcontext() if resume else runs.dropped_if_nothing_saved(run_dir, existed)
    with stop_on_signals() as stop, cleared:
        ctx = _Context(
            run_dir, config, kind, game, device, log, saved, runs.stamp(run_dir), stop,
            progress or Silent(),
        )  # fmt: skip
        rows, curves, genotype = _all_phases(ctx)
    frames = config.rl.envs * config.rl.steps
    plot_returns(curves, frames, run_dir / "plots" / "returns.png")
    extra = {
        "task": "rl",
        **kind.summary(game),
        "frames_per_update": frames,
        "search_seconds": rows[0]["train_seconds"],
    }
    models = [{"name": SEARCHED, "kind": "genotype"}]
    models += [{"name": name, "kind": name} for name in config.train.baselines]
    run_files.write_json(
        run_dir / "summary.json",
        {"genotype": genotype.to_dict(), "models": models, "results": rows, **extra},
    )
    return RunResult(run_dir, genotype, rows, extra)


def _all_phases(ctx: _Context) -> tuple[list[dict[str, Any]], dict[str, Curve], Genotype]:
    """The search, the read-out and each retraining: result rows (the supernet's first) and
    learning curves by model."""
    config = ctx.config
    seed_everything(config.seed)
    space = spaces.build(
        config.space.name,
        ctx.kind.input_size(ctx.game),
        config.space.hidden,
        config.nodes_initial,
        **config.space.options,
    )
    with torch.no_grad():  # RL-DARTS: α starts at zeros (uniform mixing)
        for alpha in space.arch_parameters():
            alpha.zero_()
    row, curve = _phase(ctx, SUPERNET, ctx.kind.wrap(space, ctx.game, 0), config.rl.updates)
    rows, curves = [row], {SUPERNET: curve}
    genotype = _read_out(space, config)
    genotype.save(ctx.run_dir / "genotype.json")
    builders: list[tuple[str, Callable[[], nn.Module]]] = [
        (SEARCHED, lambda: _derived_network(genotype, ctx)),
        *((name, _baseline_builder(name, ctx)) for name in config.train.baselines),
    ]
    for name, build in builders:
        seed_everything(config.seed)  # every encoder starts from the same seed
        agent = ctx.kind.wrap(build(), ctx.game, 0)
        row, curves[name] = _phase(ctx, name, agent, config.rl.retrain_updates)
        rows.append(row)
    return rows, curves, genotype


def _derived_network(genotype: Genotype, ctx: _Context) -> nn.Module:
    options = cells.options_for(genotype, ctx.config)
    return cells.build(genotype, ctx.kind.input_size(ctx.game), ctx.config.space.hidden, **options)


def _baseline_builder(name: str, ctx: _Context) -> Callable[[], nn.Module]:
    return lambda: ctx.kind.baseline(name, ctx.game, ctx.config.space.hidden)


def _read_out(space: Any, config: RunConfig) -> Genotype:
    """DARTS's read-out of the searched α, with the mixing probabilities it came from."""
    genotype = space.derive()
    metadata = {
        "strategy": "rl-darts",
        "task": "rl",
        "env": config.rl.env,
        "search_updates": config.rl.updates,
        "hidden_size": config.space.hidden,
        "space_options": config.space.options,
        "op_names": list(space.op_names),
        # A stack of one or two cells holds reduction cells only: then the normal cell's α got
        # no gradient and its read-out means nothing (docs/rl.md).
        "cells_used": sorted({"reduce" if cell.reduction else "normal" for cell in space.cells}),
        "probabilities": [p.detach().tolist() for p in space.mixing_weights()],
    }
    return dataclasses.replace(genotype, metadata=metadata)


def _phase(ctx: _Context, name: str, agent: Agent, updates: int) -> tuple[dict[str, Any], Curve]:
    """Train ``agent`` with PPO for ``updates`` updates (continuing its checkpoint), then score
    it on fresh games; its result row and learning curve."""
    config, rl = ctx.config, ctx.config.rl
    agent.to(ctx.device)
    calibrate_batchnorm(agent, _calibration_screens(ctx))  # then eval mode: see docs/rl.md
    games = MinAtarVec(rl.env, rl.envs, [config.seed, TRAIN_GAMES], rl.max_steps, ctx.device)
    loop = PPOLoop(agent, games, _settings(config), seed=_stream(config.seed, SAMPLER))
    path = ctx.run_dir / "checkpoints" / f"rl_{name}.pt"
    saved = ctx.saved.get(name)
    seconds = 0.0
    if saved is not None:
        _restore(loop, saved, path)
        seconds = saved["seconds"]
        if saved["row"] is not None:  # the phase had finished
            return json.loads(saved["row"]), loop.curve
    started = time.perf_counter()

    def save(row: dict[str, Any] | None = None) -> None:
        state = {
            "run": ctx.stamp,
            "phase": name,
            "loop": loop.state_dict(),
            "seconds": seconds + time.perf_counter() - started,
            "row": None if row is None else json.dumps(row),
        }
        save_atomic(state, path)

    def after_update(row: dict[str, Any]) -> None:
        ctx.log.append({"phase": name, **row})
        ctx.progress.advance(1, **({"return": row["mean_return"]} if row["episodes"] else {}))
        crash_point("rl-update")
        if loop.update % rl.checkpoint_every == 0 or loop.update == updates or ctx.stop.requested:
            save()
        if ctx.stop.requested:
            raise StopRequested(str(path))

    ctx.progress.start(f"PPO {name}", updates)
    try:
        loop.run(updates, after_update)
    finally:
        ctx.progress.stop()
    returns = evaluate(
        agent,
        MinAtarVec(rl.env, rl.eval_episodes, [config.seed, EVAL_GAMES], rl.max_steps, ctx.device),
        seed=_stream(config.seed, EVAL_GAMES),
    )
    row = {
        "model": name,
        "eval_return": float(np.mean(returns)),
        "eval_return_std": float(np.std(returns)),
        "final_return": loop.curve.mean_since(updates - max(1, round(updates * FINAL_SHARE))),
        "episodes": len(loop.curve.returns),
        "params": sum(p.numel() for p in agent.parameters()),
        "updates": updates,
        "train_seconds": seconds + time.perf_counter() - started,
    }
    if name != SUPERNET:
        save_atomic(
            {"run": ctx.stamp, "state_dict": agent.state_dict()},
            ctx.run_dir / "models" / f"{name}.pt",
        )
    ctx.log.append({"phase": name, "event": "scored", **row})  # before the checkpoint that
    save(row)  # ends the phase: a resume after it logs the row no more
    return row, loop.curve


def _calibration_screens(ctx: _Context) -> torch.Tensor:
    """Screens of random play in games of their own seed stream (the same for every phase)."""
    rl = ctx.config.rl
    games = MinAtarVec(
        rl.env, CALIBRATION_GAMES, [ctx.config.seed, CALIBRATION], rl.max_steps, ctx.device
    )
    generator = torch.Generator().manual_seed(_stream(ctx.config.seed, CALIBRATION))
    screens = []
    for _ in range(CALIBRATION_STEPS):
        actions = torch.randint(0, games.n_actions, (CALIBRATION_GAMES,), generator=generator)
        screens.append(games.step(actions)[0])
    return torch.cat(screens)


def _restore(loop: PPOLoop, saved: dict[str, Any], path: Path) -> None:
    """``loop`` as its checkpoint left it; one that does not fit is a one-line error."""
    state = saved["loop"]
    fits(loop.agent, state["agent"], path)
    try:
        loop.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise UserError(
            f"{path} does not fit this run ({err}); delete it to redo that phase, or start "
            "afresh with --force"
        ) from None


def _saved_phases(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The phase checkpoints of a stopped run, each checked to be whole and of this run."""
    run_id = runs.read_record(run_dir).get("id")
    saved = {}
    for path in sorted((run_dir / "checkpoints").glob("rl_*.pt")):
        state = load_checkpoint(path)
        keys = ("run", "phase", "loop", "seconds", "row")
        owner = state.get("run") or {}
        if any(key not in state for key in keys) or owner.get("id") != run_id:
            raise UserError(
                f"{path} is not a whole checkpoint of this run (edited, damaged or copied in); "
                "delete it to redo that phase, or start afresh with --force"
            )
        saved[state["phase"]] = state
    return saved


def _trim_metrics(path: Path, saved: dict[str, dict[str, Any]]) -> None:
    """Drop the metrics rows written after the checkpoints (the resumed run writes them again):
    those of a phase past its checkpoint's update, and those of a phase without one."""
    kept = []
    for row in run_files.read_metrics(path):
        state = saved.get(row.get("phase", ""))
        if state is None:
            continue
        if row.get("event") == "scored" and state["row"] is None:
            continue
        if row.get("update", 0) <= state["loop"]["update"]:
            kept.append(row)
    run_files.write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


def _settings(config: RunConfig) -> PPOSettings:
    names = {f.name for f in dataclasses.fields(PPOSettings)}
    return PPOSettings(**{k: v for k, v in config.rl.model_dump().items() if k in names})


def _minibatch(config: RunConfig) -> int:
    return max(2, config.rl.envs * config.rl.steps // config.rl.minibatches)


def _stream(seed: int, stream: int) -> int:
    """A 64-bit seed of the run's ``stream`` (its sampler, its evaluation)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0])
