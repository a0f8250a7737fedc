"""``morphnas prune RUN``: DNAL's channel learning on a finished run's trained models.

For every model the run trained (its searched network and baselines) and every sparsity λ:
the gates learned with the weights frozen (``channels.dnal.learn_gates``), the read-out, a
physically smaller network (``channels.cnn`` for images, ``channels.recurrent`` for recurrent
cells), fine-tuning by the run's own training loop, and one row: parameters, FLOPs, the task's
metrics and CPU latency before and after. Everything goes to ``RUN/prune/``; ``--resume``
continues it exactly after a crash at any stage (each stage checkpoints, and what a finished stage
produced is kept), ``--force`` starts it again.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morphnas import api, run_files, runs, tensorboard
from morphnas.channels.dnal import ChannelOptions, gating, latencies, learn_gates
from morphnas.channels.gates import load_masks, set_mode
from morphnas.engine import TrainOutcome
from morphnas.engine import train as train_model
from morphnas.engine.checkpoint import load as load_checkpoint
from morphnas.engine.checkpoint import save_atomic
from morphnas.engine.progress import Progress
from morphnas.engine.resume import fits, stop_on_signals
from morphnas.engine.runtime import seed_everything
from morphnas.errors import UserError

PRUNABLE_TASKS = {"classify": "images", "forecast": "sequences"}
OPTIONS_FILE = "options.json"


@dataclass
class PruneResult:
    dir: Path
    results: list[dict[str, Any]]
    skipped: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"prune_dir": str(self.dir), "results": self.results, "skipped": self.skipped}


def lambda_tag(lam: float) -> str:
    """``λ`` in file names: ``1e-04`` style, the same for the same float."""
    return f"{lam:.6g}"


def prune(
    run_dir: Path,
    options: ChannelOptions,
    *,
    models: Sequence[str] | None = None,
    progress: Progress | None = None,
    resume: bool = False,
    force: bool = False,
) -> PruneResult:
    """Learn, prune and fine-tune the channels of ``run_dir``'s models (``models``: their names;
    None: every model with gates to learn) at each of ``options.lambdas``."""
    run_dir = run_files.check_run_dir(run_dir)
    task = run_files.read_config(run_dir).task
    if task not in PRUNABLE_TASKS:
        raise UserError(
            f"{run_dir} is a --task {task} run; morphnas prune learns the channels of the models "
            "of --task classify and --task forecast runs"
        )
    out = run_dir / "prune"
    _check_claim(out, options, models, resume=resume, force=force)
    trained = api.load_trained(run_dir)
    gate = gating(PRUNABLE_TASKS[task])
    chosen, skipped = _prunable(trained, gate, models)
    if force and out.exists():  # everything is checked: only now is the old one replaced
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run_files.write_json(out / OPTIONS_FILE, _record(options, models))
    log = run_files.MetricsLog(out / "metrics.jsonl")
    if log.path.exists():  # a resumed one: the rows after its checkpoints will be written again
        log.keep(_checkpointed(out, run_dir))
    tensorboard.attach(log, out, trained.config)  # RUN/prune/tensorboard: the gates' rows
    config, data, kind = trained.config, trained.data, trained.kind
    engine_task = kind.engine_task(data, config.train.batch_size)
    example, timing_batch = engine_task.probe()[0], data.test[0][:256]
    stamp = runs.stamp(run_dir)
    rows = []
    with stop_on_signals() as stop:
        for name, model in chosen:
            before = _measure(model, kind, data, gate, example)
            for lam in options.lambdas:
                tag = f"{name}_{lambda_tag(lam)}"
                seed_everything(config.seed)  # the stage starts alike, resumed or not
                gated = copy.deepcopy(model)
                gates = gate.attach(gated)
                masks_path = out / "masks" / f"{tag}.pt"
                if masks_path.is_file():
                    masks = _saved_masks(masks_path, gated, gates)
                else:
                    checkpoint = out / "checkpoints" / f"gates_{tag}.pt"
                    masks = learn_gates(
                        gated, gates, engine_task, options, lam, name=tag, seed=config.seed,
                        log=log, checkpoint_path=checkpoint, stamp=stamp, progress=progress,
                        stop=stop,
                        resume=(
                            runs.checked_checkpoint(checkpoint, "gates", run_dir)
                            if checkpoint.is_file() else None
                        ),
                    )  # fmt: skip
                    save_atomic({"masks": masks, "model": gated.state_dict()}, masks_path)
                masked = kind.score(gated, data)
                pruned = gate.prune(gated, masks, example)
                outcome = _finetune(
                    pruned, tag, out, trained, engine_task, options, log, progress, stop
                )
                after = _measure(pruned, kind, data, gate, example)
                speed = latencies({"before": model, "masked": gated, "after": pruned}, timing_batch)
                rows.append(_row(name, lam, before, after, masked, speed, masks, outcome))
    summary = {"run": str(run_dir), "options": _record(options, models), "results": rows,
               "skipped": skipped}  # fmt: skip
    run_files.write_json(out / "summary.json", summary)
    return PruneResult(out, rows, skipped)


def _saved_masks(path: Path, gated: nn.Module, gates: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A finished gate stage's read-out and the gated model's state after it, put back."""
    saved = load_checkpoint(path)
    try:
        fits(gated, saved["model"], path)
        load_masks(gates, saved["masks"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(
            f"{path} is damaged ({err}): delete it to learn those gates again, or use --force"
        ) from None
    set_mode(gates.values(), "mask")
    return {name: gate.mask.bool() for name, gate in gates.items()}


def _checkpointed(out: Path, run_dir: Path) -> Any:
    """Which metrics rows of a stopped ``RUN/prune`` its checkpoints account for: every row of a
    stage that finished, and of one that stopped, the epochs up to its checkpoint."""

    @functools.cache
    def done(stage: str, tag: str) -> float:
        finished = out / ("masks" if stage == "gates" else "models") / f"{tag}.pt"
        if finished.is_file():
            return float("inf")
        path = out / "checkpoints" / f"{'gates' if stage == 'gates' else 'finetune'}_{tag}.pt"
        if not path.is_file():
            return 0
        state = runs.checked_checkpoint(path, "gates" if stage == "gates" else "train", run_dir)
        return state["epoch"] if state["position"] is None else state["epoch"] - 1

    def keep(row: dict[str, Any]) -> bool:
        return row.get("epoch", 0) <= done(str(row.get("phase")), str(row.get("model")))

    return keep


def _check_claim(
    out: Path, options: ChannelOptions, models: Sequence[str] | None, *, resume: bool, force: bool
) -> None:
    """``RUN/prune`` may be written by this command: new, continued with the same options
    (``resume``) or to be replaced (``force``); refused before anything is written."""
    if force or not out.exists():
        return
    if not resume:
        raise UserError(f"{out} exists: continue it with --resume, or start it again with --force")
    if (out / OPTIONS_FILE).is_file():
        then = run_files.read_json(out / OPTIONS_FILE, dict)
        now = _record(options, models)
        if then != now:
            changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
            raise UserError(
                f"{out} was started with other options ({', '.join(changed)}): give the same "
                "ones to --resume it, or --force to start again"
            )


def _record(options: ChannelOptions, models: Sequence[str] | None) -> dict[str, Any]:
    return {**options.model_dump(mode="json"), "models": None if models is None else list(models)}


def _prunable(
    trained: api.TrainedRun, gate: Any, names: Sequence[str] | None
) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The models to prune, and why the others are left (no weights, nothing to gate)."""
    chosen, skipped = [], {}
    known = [name for name, _, _ in trained.models]
    for name in names or ():
        if name not in known:
            raise UserError(f"{trained.dir} has no model {name!r}; its models: {', '.join(known)}")
    for name, _, model in trained.models:
        if names is not None and name not in names:
            continue
        reason = None
        if not isinstance(model, nn.Module):
            reason = "no trained weights"
        else:
            try:
                gate.attach(copy.deepcopy(model))
            except ValueError as err:
                reason = str(err)
        if reason is None:
            chosen.append((name, model))
        elif names is not None:
            raise UserError(f"cannot prune {name}: {reason}")
        else:
            skipped[name] = reason
    if not chosen:
        raise UserError(f"{trained.dir} has no model to prune ({skipped})")
    return chosen, skipped


def _measure(model: nn.Module, kind: Any, data: Any, gate: Any, example: torch.Tensor) -> dict:
    scores = {k: v for k, v in kind.score(model, data).items() if k != "flops"}
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "flops": gate.flops(model, example), **scores}


def _finetune(
    pruned: nn.Module, tag: str, out: Path, trained: api.TrainedRun, task: Any,
    options: ChannelOptions, log: run_files.MetricsLog, progress: Progress | None, stop: Any,
) -> TrainOutcome:  # fmt: skip
    """``pruned`` fine-tuned by the run's training loop (Adam at the run's learning rate, early
    stopping on valid), or its saved result when that is done already."""
    final = out / "models" / f"{tag}.pt"
    if final.is_file():
        saved = runs.checked_checkpoint(final, "model", trained.dir)
        fits(pruned, saved["state_dict"], final)
        return TrainOutcome(**saved["outcome"])
    config = trained.config.train
    epochs = config.epochs if options.finetune_epochs is None else options.finetune_epochs
    lr = config.lr / 10 if options.finetune_lr is None else options.finetune_lr
    checkpoint = out / "checkpoints" / f"finetune_{tag}.pt"
    seed_everything(trained.config.seed)  # as a fresh one, whether the gates ran just now or not
    outcome = train_model(
        pruned, task, config.model_copy(update={"epochs": epochs, "lr": lr}), name=tag,
        seed=trained.config.seed, log=log, progress=progress, checkpoint_path=checkpoint,
        resume=(
            runs.checked_checkpoint(checkpoint, "train", trained.dir)
            if checkpoint.is_file() else None
        ),
        stamp=runs.stamp(trained.dir), stop=stop, phase="finetune",
    )  # fmt: skip
    state = {
        "state_dict": pruned.state_dict(),
        "outcome": dataclasses.asdict(outcome),
        "run": runs.stamp(trained.dir),
    }
    save_atomic(state, final)
    return outcome


def _row(
    name: str, lam: float, before: dict, after: dict, masked: dict, speed: dict,
    masks: dict, outcome: TrainOutcome,
) -> dict[str, Any]:  # fmt: skip
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    row: dict[str, Any] = {"model": name, "lambda": lam, "channels_kept": kept,
                           "channels": total}  # fmt: skip
    for key in before:
        row[f"{key}_before"] = before[key]
        row[f"{key}_after"] = after[key]
    for key, value in masked.items():
        if key != "flops":
            row[f"{key}_masked"] = value
    row.update({f"latency_ms_{k}": v for k, v in speed.items()})
    row.update(finetune_epochs=outcome.epochs, finetune_seconds=outcome.seconds)
    return row
