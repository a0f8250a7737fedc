"""Data-parallel search under ``torchrun``: one search, its batches split over N processes.

Why an explicit all-reduce of gradients and not ``DistributedDataParallel``: the strategies
take ``α``'s gradient with ``torch.autograd.grad`` (which never fires DDP's accumulate hooks) on
a loss the task computes by calling the model directly (not DDP's ``forward``), and the bilevel
methods replace the tensors through ``torch.func.functional_call``. So the loop itself averages
every ``.grad`` before each optimizer step, weights (``average_grads`` after the weight step's
backward) and ``α`` (``Strategy.reduce_grads``, called by ``Strategy._apply``) alike.

How a global batch becomes one exact step: every rank draws the same global batch (same
generator, same seed) of N × ``search.batch_size`` samples and keeps its contiguous share
(``shard``). ``Group.loss`` returns the *global* mean loss (the shards' means weighted by their
sizes, one scalar all-reduce), identical on every rank, so every decision made from a loss value
(MS-DARTS's mean shift, NaN policy, epoch totals) is the same everywhere; its backward sends
``N · n_r / n`` times the incoming gradient into rank r's shard, so averaging the ranks' gradients
gives the gradient of the global mean exactly, while a term computed identically on every rank
(a penalty on ``α``) keeps its own gradient. Sampling strategies draw their architectures from
the global torch generator, seeded identically; each shard's forward runs under a forked
generator (its own dropout masks, one draw of the global generator per forward on every rank),
so the global stream stays in step whatever the shard sizes.

The bilevel hypergradients (DARTS second order, iDARTS) are refused (``check``): they are not
linear in the batch, so averaging per-shard hypergradients would not give the global batch's;
making them exact needs an all-reduce inside every gradient ``morphnas.hypergrad`` takes. Language
modelling is refused too: it carries hidden states across batches, which shards would break.
E2NAS's step on its latent ``z`` averages ``z``'s gradient the same way; every rank trains (or
loads) the same seeded graph VAE, whose cache file is written atomically.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from morphnas.engine.runtime import resolve_device
from morphnas.errors import UserError

if TYPE_CHECKING:
    from morphnas.config import RunConfig

T = TypeVar("T")

REFUSED_TASKS = ("lm",)
REFUSED_STRATEGIES = ("darts order 2", "idarts")


@dataclass(frozen=True)
class Group:
    """This process's place in the data-parallel search: ``rank`` of ``size`` processes."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run directory."""
        return self.rank == 0

    def loss(self, task: Any, model: nn.Module, batch: Any, mixing: list[Tensor]) -> Tensor:
        """The global batch's mean loss from this rank's share of it (see the module doc)."""
        part, empty = shard(batch, self.rank, self.size)
        share = 0.0 if empty else task.batch_weight(part) / task.batch_weight(batch)
        devices = [self.device] if self.device.type == "cuda" else []
        seed = int(torch.randint(0, 2**62, (1,)))  # one draw on every rank, whatever the shard
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + self.rank)
            local = task.loss(model, part, weights=mixing)
        return _GlobalMean.apply(local, share, self.size)

    def average_grads(self, params: Sequence[Tensor]) -> None:
        """Replace every ``.grad`` by its mean over the ranks, in one all-reduce. Which
        parameters have no gradient (ops a sampled architecture did not run) is the same on
        every rank: the samples are."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.size
        for grad, mean in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(mean)

    def mean(self, value: float) -> float:
        """``value`` averaged over the ranks: a decision taken from it is the same on each."""
        return float(self._reduced([value], dist.ReduceOp.SUM)[0]) / self.size

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (a stop request reaches one process first)."""
        return bool(self._reduced([float(flag)], dist.ReduceOp.MAX)[0])

    def checksums(self, model: nn.Module) -> list[float]:
        """Every rank's checksum of the model's parameters (weights and ``α``); they must agree."""
        with torch.no_grad():
            local = sum(float(p.double().abs().sum()) for p in model.parameters())
        gathered = torch.zeros(self.size, dtype=torch.float64, device=self.device)
        gathered[self.rank] = local
        dist.all_reduce(gathered)
        return gathered.tolist()

    def _reduced(self, values: list[float], op: Any) -> Tensor:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.cpu()


class _GlobalMean(torch.autograd.Function):
    """Forward: the size-weighted mean of the ranks' losses. Backward: ``size · share`` times the
    incoming gradient, so that the ranks' averaged gradients are the global mean's."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, share: float, size: int) -> Tensor:
        ctx.scale = share * size
        value = local.detach() * share
        dist.all_reduce(value)
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad * ctx.scale, None, None


def shard(batch: Any, rank: int, size: int) -> tuple[Any, bool]:
    """Rank ``rank``'s contiguous share of a batch of tensors (split along the first axis, sizes
    differing by at most one), and whether it is empty (a last batch smaller than ``size``: the
    rank then computes on one sample and weighs it 0, so that its gradients have the same shape
    as the others')."""
    if not isinstance(batch, tuple | list) or not all(isinstance(t, Tensor) for t in batch):
        raise TypeError(f"cannot shard a batch of type {type(batch).__name__}")
    n = len(batch[0])
    start, stop = rank * n // size, (rank + 1) * n // size
    if start == stop:
        return type(batch)(t[:1] for t in batch), True
    return type(batch)(t[start:stop] for t in batch), False


def join(config: RunConfig) -> Group | None:
    """The data-parallel group torchrun described in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), joined once per process: gloo on CPU,
    nccl on CUDA with this process on ``cuda:LOCAL_RANK``. None outside torchrun (or with one
    process): the search runs as it always did. What cannot run data-parallel is refused first
    (``check``), before any process waits for another."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    check(config)
    device = resolve_device(config.device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_teardown)
    return Group(dist.get_rank(), dist.get_world_size(), device)


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check(config: RunConfig) -> None:
    """Refuse, with one line, what cannot run data-parallel (see the module doc)."""
    if config.task in REFUSED_TASKS:
        raise UserError(
            f"task {config.task} cannot search data-parallel (hidden states carry across "
            "batches); run it without torchrun"
        )
    name = config.search.strategy
    if name == "darts" and config.search.strategy_options.get("order", config.search.order) == 2:
        name = "darts order 2"
    if name in REFUSED_STRATEGIES:
        raise UserError(
            f"strategy {name} cannot search data-parallel; run it without torchrun, or use "
            "darts (order 1), snas, gdas, dnal, msdarts, e2nas or random"
        )


def is_main(group: Group | None) -> bool:
    """Whether this process writes the run's files (always, outside torchrun)."""
    return group is None or group.main


def on_main(group: Group | None, work: Callable[[], T], *, share: bool = False) -> T | None:
    """``work()`` on rank 0 only. Its ``UserError`` is raised on every rank (each exits 2 with
    the same line rather than waiting for rank 0); with ``share`` its value (picklable) is
    every rank's, else the other ranks get None."""
    if group is None:
        return work()
    message: str | None = None
    value: T | None = None
    if group.main:
        try:
            value = work()
        except UserError as err:
            message = str(err)
    box = [message, value if share else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0])
    return value if group.main else box[1]


def global_batch(group: Group | None, batch_size: int) -> int:
    """The batch every rank draws: ``search.batch_size`` is the per-rank share."""
    return batch_size if group is None else batch_size * group.size


class NullLog:
    """The metrics log of a rank that writes nothing."""

    path = None
    on_append = None

    def append(self, row: dict[str, Any]) -> None:
        del row
