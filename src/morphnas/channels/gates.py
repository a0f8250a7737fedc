"""DNAL's channel gate (Guo et al. 2022; spec methods.md §4): ``y_c = x_c · σ(β·α_c) · m_c``.

One scalar ``α_c`` per channel (a CNN's feature map after its BatchNorm, a recurrent cell's hidden
unit). As β grows the gate tends to the step ``1[α_c > 0]``, so a sequence of smooth problems
approaches the binary keep/drop problem. A gate has the three modes of the authors'
``ScaleLayer2d``: ``soft`` (``σ(β·α)·mask``, the architecture stage), ``mask`` (the 0/1 mask
alone, fine-tuning a masked network) and ``identity`` (the weight stage, and a network before any
gate has learned anything).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

GateMode = Literal["soft", "mask", "identity"]
GATE_MODES: tuple[GateMode, ...] = ("soft", "mask", "identity")


class ChannelGate(nn.Module):
    """Gates ``channels`` entries of dimension ``dim`` of its input (1 for ``(N, C, H, W)`` maps,
    -1 for ``(…, hidden)`` states). ``α`` starts at 0 (every soft gate at 0.5, as DNAL resets it);
    β and the mask are buffers, so a checkpoint of the model holds the whole gate."""

    def __init__(self, channels: int, dim: int = 1, mode: GateMode = "identity") -> None:
        super().__init__()
        self.dim = dim
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.register_buffer("beta", torch.ones(()))
        self.register_buffer("mask", torch.ones(channels))
        self.mode: GateMode = mode

    @property
    def channels(self) -> int:
        return self.alpha.numel()

    def value(self) -> Tensor:
        """The per-channel factor the gate multiplies by in its current mode."""
        if self.mode == "soft":
            return torch.sigmoid(self.beta * self.alpha) * self.mask
        if self.mode == "mask":
            return self.mask
        return torch.ones_like(self.mask)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "identity":
            return x
        shape = [1] * x.dim()
        shape[self.dim] = self.channels
        return x * self.value().to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"{self.channels}, dim={self.dim}, mode={self.mode}"


def set_mode(gates: Iterable[ChannelGate], mode: GateMode) -> None:
    if mode not in GATE_MODES:
        raise ValueError(f"unknown gate mode {mode!r}; expected one of {GATE_MODES}")
    for gate in gates:
        gate.mode = mode


def set_beta(gates: Iterable[ChannelGate], beta: float) -> None:
    for gate in gates:
        gate.beta.fill_(beta)


def reset(gates: Iterable[ChannelGate]) -> None:
    """α = 0 and every mask open: where DNAL's architecture stage starts."""
    with torch.no_grad():
        for gate in gates:
            gate.alpha.zero_()
            gate.mask.fill_(1.0)


def beta_at(epoch: int, epochs: int, start: float = 1.0, end: float = 1e4) -> float:
    """β for architecture epoch ``epoch`` (1-based) of ``epochs``: the authors' schedule multiplies
    β by ``(end/start)^{1/epochs}`` at the start of every epoch, so epoch 1 already runs at
    ``start·(end/start)^{1/epochs}`` and the last one at ``end`` exactly."""
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch must be in 1..{epochs}, got {epoch}")
    if not 0 < start <= end:
        raise ValueError(f"need 0 < start <= end, got {start!r} and {end!r}")
    if epoch == epochs:
        return float(end)
    return float(start * math.exp(math.log(end / start) * epoch / epochs))


def penalty(gates: Iterable[ChannelGate], scaled: bool = False) -> Tensor:
    """The sparsity term ``Σ_c σ(α_c)`` of the authors' code, or ``Σ_c σ(β·α_c)`` (``scaled``)."""
    terms = [
        torch.sigmoid((gate.beta * gate.alpha) if scaled else gate.alpha).sum() for gate in gates
    ]
    if not terms:
        raise ValueError("no gates to penalise")
    return torch.stack(terms).sum()


def read_out(gates: Mapping[str, ChannelGate], threshold: float = 0.9) -> dict[str, Tensor]:
    """DNAL's read-out: channel ``c`` survives where ``σ(β·α_c) > threshold``. Each gate's mask is
    set (so ``mask`` mode now runs the masked network) and returned by name, as booleans."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    masks = {}
    with torch.no_grad():
        for name, gate in gates.items():
            keep = torch.sigmoid(gate.beta * gate.alpha) > threshold
            gate.mask.copy_(keep.to(gate.mask.dtype))
            masks[name] = keep.clone()
    return masks


def load_masks(gates: Mapping[str, ChannelGate], masks: Mapping[str, Tensor]) -> None:
    """Set each gate's mask from a saved read-out (``read_out``'s result, or a file of it)."""
    if set(masks) != set(gates):
        raise ValueError(
            f"masks name {sorted(set(masks) ^ set(gates))} that the model's gates do not match"
        )
    with torch.no_grad():
        for name, gate in gates.items():
            mask = torch.as_tensor(masks[name])
            if mask.numel() != gate.channels:
                raise ValueError(
                    f"mask {name!r} has {mask.numel()} channels, its gate {gate.channels}"
                )
            gate.mask.copy_(mask.to(gate.mask.dtype).flatten())
