"""The same module run another way, timed beside itself: on the Python kernels, or CUDA graphs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from morphnas import native


class PythonKernels(nn.Module):
    """``module`` run on the Python kernels where the native ones would run
    (``native.python_kernels``): what the native kernel buys, timed side by side."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Any:
        with native.python_kernels():
            return self.module(x)


class CudaGraphed(nn.Module):
    """A module whose forward and backward over one input shape replay CUDA graphs.

    A recurrent step launches hundreds of tiny kernels; on a GPU their launch overhead, not the
    arithmetic, is the cost. ``make_graphed_callables`` records them once for the captured shape
    and replays them as one graph (the same results to the bit in our checks); any other shape,
    and eval mode, run eagerly. Capture takes seconds and must be redone after the module changes
    shape (a growth).
    """

    def __init__(self, module: nn.Module, x: Tensor) -> None:
        super().__init__()
        self.module = module.train()
        self._eager = module.forward
        torch.cuda.make_graphed_callables(module, (x,))
        self._graphed = module.forward
        self._shape = tuple(x.shape)

    def forward(self, x: Tensor) -> Any:
        replay = self.training and tuple(x.shape) == self._shape
        return self._graphed(x) if replay else self._eager(x)
