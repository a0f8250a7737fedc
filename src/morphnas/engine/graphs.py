"""CUDA-graph replay of the supernet's unroll inside the search (``search.cuda_graphs``).

A recurrent supernet's step is hundreds of small kernels, so on a GPU the launch overhead, not
the arithmetic, is the search's cost; ``torch.cuda.make_graphed_callables`` records the unroll's
forward and backward once for a fixed set of input shapes and replays them as two graphs
(``bench`` measured the supernet 13.8× faster than the reference on an H100 that way,
docs/benchmarks.md). ``GraphedUnroll`` brings that path to the search engine: it is installed as
the cell's ``forward`` for the length of a search and decides per call whether a recorded graph
can stand in for the eager unroll:

* **Shapes are fixed per graph.** A graph is recorded per *key*: the input's shape, the mixing
  weights' shapes and whether they carry a gradient (the α step's do, the weight step's do not),
  and the cell's structure. The last, partial batch of an epoch has its own key, so it gets its
  own graph (up to ``max_graphs`` per structure); nothing is padded, so the loss is the eager one.
* **Recaptured after growth and after a prune.** The structure is the identity of every
  parameter (growth and widening make new ones), the node count, the hidden size and the fixed
  nodes (a prune fixes nodes without new parameters); when it changes, the old graphs are
  dropped and the next call records new ones.
* **Eager where a graph would be wrong.** Evaluation (no gradient, or eval mode), a carried
  state (language modelling's ``h0``), a hard sample (``SampledMixing``: the op run depends on
  the sample), tensors swapped in by ``torch.func.functional_call`` (the bilevel
  hypergradients, refused with ``on``), and a second forward while a graphed one still awaits
  its backward (E2NAS's complementation runs three sub-networks before one backward): a graph
  has one set of static buffers, so the second call runs eagerly and both results stay right.
* **As eager as possible.** Recording runs a few warm-up passes on copies of the inputs; the
  random state and the cell's buffers (BatchNorm statistics) are put back afterwards, so the
  run draws the same dropout masks as an eager one. A capture that fails (an op that cannot be
  captured) warns once and leaves the search eager for good, as ``engine.compiled`` does.

``auto`` replays on CUDA only; ``on`` asks for it and is refused on a CPU or with a strategy that
differentiates through swapped weights (DARTS second order, iDARTS).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from morphnas.errors import UserError
from morphnas.spaces.base import SampledMixing

GRAPH_MODES = ("auto", "on", "off")

# Records forward and backward graphs of a module for one tuple of sample inputs.
Capture = Callable[[nn.Module, tuple[Tensor, ...]], Callable[..., Any]]


def wants_graphs(setting: str, device: torch.device, *, hypergradient: bool) -> bool:
    """Whether a search replays CUDA graphs: ``on`` (refused where it cannot), ``auto`` on CUDA
    with a first-order strategy, never with ``off``."""
    if setting not in GRAPH_MODES:
        raise ValueError(f"cuda_graphs must be one of {GRAPH_MODES}, got {setting!r}")
    if setting == "on" and device.type != "cuda":
        raise UserError(
            f"search.cuda_graphs=on needs a CUDA device (this search runs on {device.type}); "
            "use --set search.cuda_graphs=auto or off"
        )
    if setting == "on" and hypergradient:
        raise UserError(
            "search.cuda_graphs=on cannot replay a hypergradient (DARTS second order, iDARTS "
            "differentiate through swapped weights); use --set search.cuda_graphs=auto or off"
        )
    return setting == "on" or (setting == "auto" and device.type == "cuda" and not hypergradient)


class _Unroll(nn.Module):
    """The cell's unroll with the mixing weights as positional tensors, the form
    ``make_graphed_callables`` records (its parameters are the cell's own)."""

    def __init__(self, cell: nn.Module, eager: Callable[..., Any]) -> None:
        super().__init__()
        self.cell = cell
        self._eager = eager

    def forward(self, x: Tensor, *mixing: Tensor) -> Any:
        return self._eager(x, None, list(mixing))


class GraphedUnroll:
    """A cell's ``forward`` that replays recorded CUDA graphs where they are exact (module doc).

    ``capture`` records one graph pair (``torch.cuda.make_graphed_callables`` on CUDA); tests
    pass a stand-in to check on a CPU when graphs are recorded, replayed and dropped.
    ``captures`` counts the recordings, ``replays`` the calls a graph served.
    """

    def __init__(
        self, cell: nn.Module, capture: Capture | None = None, *, max_graphs: int = 8
    ) -> None:
        self.cell, self.eager = cell, cell.forward
        self.capture = capture or _cuda_capture
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self.structure: tuple[Any, ...] | None = None
        self.failed = False
        self.captures = self.replays = 0
        self._pending: weakref.ref[Any] | None = None  # the last replay's backward node

    def __call__(
        self, x: Tensor, h0: Tensor | None = None, weights: list[Tensor] | None = None
    ) -> Any:
        if not self._replayable(x, h0, weights):
            return self.eager(x, h0, weights)
        assert weights is not None  # _replayable checked it
        structure = self._structure()
        if structure != self.structure:  # grown, widened or pruned: the old graphs are stale
            self.graphs, self.structure = {}, structure
        key = (
            tuple(x.shape),
            tuple((tuple(w.shape), w.requires_grad) for w in weights),
        )
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                return self.eager(x, h0, weights)
            graphed = self._record(key, x, weights)
            if graphed is None:
                return self.eager(x, h0, weights)
        outputs = graphed(x, *weights)
        self.replays += 1
        self._await_backward(outputs)
        return outputs

    def _replayable(self, x: Tensor, h0: Tensor | None, weights: list[Tensor] | None) -> bool:
        """Whether a graph computes exactly what the eager unroll would for this call."""
        if self.failed or h0 is not None or weights is None or isinstance(weights, SampledMixing):
            return False
        if not (self.cell.training and torch.is_grad_enabled()):
            return False
        if self._pending is not None and self._pending() is not None:
            return False  # a graphed forward awaits its backward: its buffers are in use
        if not all(isinstance(w, Tensor) for w in weights):
            return False
        return all(isinstance(p, nn.Parameter) for p in self.cell.parameters())

    def _structure(self) -> tuple[Any, ...]:
        """What a recorded graph depends on besides the input shapes (module doc)."""
        cell = self.cell
        return (
            tuple(id(p) for p in cell.parameters()),
            getattr(cell, "nodes", None),
            getattr(cell, "hidden_size", None),
            repr(sorted(getattr(cell, "fixed", {}).items())),
            getattr(cell, "fused", None),
        )

    def _record(
        self, key: tuple[Any, ...], x: Tensor, weights: list[Tensor]
    ) -> Callable[..., Any] | None:
        samples = (
            x.detach().clone(),
            *(w.detach().clone().requires_grad_(w.requires_grad) for w in weights),
        )
        buffers = [b.detach().clone() for b in self.cell.buffers()]
        with _random_state_kept(x.device):
            try:
                graphed = self.capture(_Unroll(self.cell, self.eager), samples)
            except Exception as err:  # an op that cannot be captured must not end the search
                first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
                warnings.warn(
                    f"CUDA-graph capture of the search failed ({type(err).__name__}: "
                    f"{first_line}); the search runs eagerly",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.failed = True
                return None
            finally:
                with torch.no_grad():
                    for live, saved in zip(self.cell.buffers(), buffers, strict=True):
                        live.copy_(saved)
        self.graphs[key] = graphed
        self.captures += 1
        return graphed

    def _await_backward(self, outputs: Any) -> None:
        """Hold further replays until this one's backward ran (or its graph was dropped)."""
        node = next((t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None), None)
        if node is None:
            self._pending = None
            return
        pending = weakref.ref(node)  # the hook must not keep its own node alive
        self._pending = pending
        node.register_hook(lambda *_: self._release(pending))

    def _release(self, pending: weakref.ref[Any]) -> None:
        if self._pending is pending:
            self._pending = None


def _tensors(outputs: Any) -> Iterator[Tensor]:
    items = outputs if isinstance(outputs, tuple | list) else (outputs,)
    return (t for t in items if isinstance(t, Tensor))


def _cuda_capture(module: nn.Module, samples: tuple[Tensor, ...]) -> Callable[..., Any]:
    graphed = torch.cuda.make_graphed_callables(module, samples, allow_unused_input=True)
    return graphed  # type: ignore[return-value]


@contextmanager
def _random_state_kept(device: torch.device) -> Iterator[None]:
    """The warm-up passes of a capture draw dropout masks; the run's random streams go on as if
    they had not (an eager run and a graphed one draw the same masks)."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


@contextmanager
def graphed_search(
    cell: nn.Module, setting: str, *, hypergradient: bool, capture: Capture | None = None
) -> Iterator[GraphedUnroll | None]:
    """For the length of a search, the cell's unroll replays CUDA graphs where it may
    (``wants_graphs``); yields the installed ``GraphedUnroll``, or None when eager."""
    device = next(cell.parameters()).device
    if not wants_graphs(setting, device, hypergradient=hypergradient):
        yield None
        return
    graphed = GraphedUnroll(cell, capture)
    cell.forward = graphed  # type: ignore[method-assign]
    try:
        yield graphed
    finally:
        del cell.forward  # the class's forward again
