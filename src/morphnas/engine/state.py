"""Loop state and the one schema of the checkpoints built from it.

A loop's counters are a dataclass (after Lightning's ``loops/progress.py``): ``state_dict()`` is
``asdict`` and ``load_state_dict()`` its inverse, so a checkpoint's counters are written and read
by field name and never spelled out by hand. A ``Schema`` names, per kind of checkpoint, the
entries around those counters; the loops build their checkpoints with ``Schema.build`` and
``engine.resume.checked`` validates a loaded one against ``Schema.rules``, which is derived from
the same fields. A new counter is one field; a new entry is one line here.

The layout is flat and must stay so (``CHECKPOINT_VERSION`` 1): format, version, kind, the run's
stamp under ``run``, then the entries and counters in the order below. Checkpoints are loaded
with ``torch.load(weights_only=True)``, so every value is made of tensors, numbers, strings,
lists, tuples and dicts only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, get_args, get_type_hints

import torch

CHECKPOINT_FORMAT = "morphnas.checkpoint"
CHECKPOINT_VERSION = 1

Types = type | tuple[type, ...]  # what ``isinstance`` accepts for one entry


def _count(default: int, minimum: int) -> Any:
    """A counter field whose value in a checkpoint must be at least ``minimum``."""
    return field(default=default, metadata={"min": minimum})


def _added_later(default: float) -> Any:
    """A field that checkpoints written before it existed lack: read as ``default`` then."""
    return field(default=default, metadata={"optional": True})


@dataclass(frozen=True)
class Rule:
    """What ``engine.resume.checked`` accepts under one key: ``types`` (for ``isinstance``; a
    bool passes only where ``bool`` itself is named), a ``minimum`` for counts, and whether
    checkpoints written before the key existed may lack it (``optional``)."""

    types: Types
    minimum: int | None = None
    optional: bool = False


class LoopProgress:
    """Base of a loop's counters (each subclass a dataclass): ``epoch``, and ``position``, the
    batch the current epoch continues from — None in a checkpoint written at its epoch's end."""

    epoch: int
    position: int | None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for spec in fields(self):
            optional = spec.metadata.get("optional", False)
            value = state.get(spec.name, spec.default) if optional else state[spec.name]
            setattr(self, spec.name, value)

    def resume(self, state: Mapping[str, Any]) -> bool:
        """Take a checkpoint's counters and move to where the loop goes on: the saved batch of
        the saved epoch, or the next epoch's start after a complete one. True: mid-epoch."""
        self.load_state_dict(state)
        if self.position is None:
            self.epoch += 1
            self.position = 0
            return False
        return True

    @classmethod
    def rules(cls) -> dict[str, Rule]:
        """Each field's rule: the types of its annotation (a float may be saved as an int), the
        minimum and optionality from its metadata (``_count``, ``_added_later``)."""
        hints = get_type_hints(cls)
        table = {}
        for spec in fields(cls):
            accepted = get_args(hints[spec.name]) or (hints[spec.name],)
            if float in accepted:
                accepted = (int, *accepted)
            table[spec.name] = Rule(
                accepted, spec.metadata.get("min"), spec.metadata.get("optional", False)
            )
        return table


@dataclass
class SearchProgress(LoopProgress):
    """Where a search stands: ``step`` counts weight steps over all epochs, ``best`` is the best
    validation loss so far, ``valid_loss`` the last epoch's, ``retries`` the NaN retries taken;
    ``elapsed`` and ``cpu`` are the wall and process seconds of the sessions before this one."""

    epoch: int = _count(1, 1)
    step: int = _count(0, 0)
    best: float = math.inf
    valid_loss: float = math.nan
    retries: int = _count(0, 0)
    position: int | None = _count(0, 0)
    elapsed: float = 0.0
    cpu: float = _added_later(0.0)


@dataclass
class TrainProgress(LoopProgress):
    """Where a training run stands: ``best`` is the best validation loss so far, reached at
    ``best_epoch`` (0: none yet); ``elapsed`` the seconds of the sessions before this one."""

    epoch: int = _count(1, 1)
    best: float = math.inf
    best_epoch: int = _count(0, 0)
    position: int | None = _count(0, 0)
    elapsed: float = 0.0


@dataclass
class GateProgress(LoopProgress):
    """Where DNAL's architecture stage stands (``channels.dnal.learn_gates``): it checkpoints at
    epoch ends only, so ``position`` is None in every checkpoint; ``elapsed`` as in training."""

    epoch: int = _count(1, 1)
    position: int | None = _count(0, 0)
    elapsed: float = 0.0


_STATE, _TENSOR = dict, torch.Tensor
_TOTALS = (list, tuple)  # [the epoch's running loss sum (a tensor), its sample count]


@dataclass(frozen=True)
class Schema:
    """One kind of checkpoint: ``before`` the counters (if any), the counters, then ``after``.
    ``versioned``: it carries format, version, kind and the run's stamp (a loop's checkpoint;
    a saved model does not)."""

    kind: str
    progress: type[LoopProgress] | None
    before: dict[str, Rule] = field(default_factory=dict)
    after: dict[str, Rule] = field(default_factory=dict)
    versioned: bool = True

    def build(
        self, stamp: dict[str, Any] | None, progress: LoopProgress, **entries: Any
    ) -> dict[str, Any]:
        """The checkpoint: header, then ``entries`` and ``progress``'s counters in schema order.
        An entry missing or unknown is a bug in the loop, not in the user's files."""
        expected = self.before.keys() | self.after.keys()
        if entries.keys() != expected:
            raise TypeError(
                f"{self.kind} checkpoint entries {sorted(entries)} != {sorted(expected)}"
            )
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": self.kind,
            "run": stamp,
            **{key: entries[key] for key in self.before},
            **progress.state_dict(),
            **{key: entries[key] for key in self.after},
        }

    def rules(self) -> dict[str, Rule]:
        """Every key ``checked`` validates, in checkpoint order."""
        counters = self.progress.rules() if self.progress is not None else {}
        return {**self.before, **counters, **self.after}


SEARCH = Schema(
    "search",
    SearchProgress,
    after={
        "totals": Rule(_TOTALS), "model": Rule(_STATE), "shape": Rule(_STATE),
        "optimizer": Rule(_STATE), "strategy": Rule(_STATE), "growth": Rule(_STATE),
        "task": Rule(_STATE), "rng": Rule(_STATE), "generator": Rule(_TENSOR),
        "epoch_generator": Rule(_TENSOR), "valid_stream": Rule(_STATE),
        "processes": Rule(int, minimum=1, optional=True),
    },
)  # fmt: skip
TRAIN = Schema(
    "train",
    TrainProgress,
    before={"name": Rule(str)},
    after={
        "totals": Rule(_TOTALS), "model": Rule(_STATE), "optimizer": Rule(_STATE),
        "best_state": Rule(_STATE), "rng": Rule(_STATE), "generator": Rule(_TENSOR),
        "epoch_generator": Rule(_TENSOR), "task": Rule(_STATE, optional=True),
    },
)  # fmt: skip
MODEL = Schema(  # the final model saved after training (written by ``api``)
    "model", None, after={"state_dict": Rule(_STATE), "outcome": Rule(_STATE)}, versioned=False
)
GATES = Schema(  # DNAL's architecture stage on one model at one λ
    "gates",
    GateProgress,
    before={"name": Rule(str)},
    after={
        "model": Rule(_STATE), "optimizer": Rule(_STATE), "rng": Rule(_STATE),
        "generator": Rule(_TENSOR),
    },
)  # fmt: skip
SCHEMAS = {schema.kind: schema for schema in (SEARCH, TRAIN, MODEL, GATES)}
