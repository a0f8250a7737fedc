"""Channel gates on a CNN (conv → BN → gate → ReLU, as DNAL has them) and its physical pruning.

``attach_bn_gates`` puts a ``ChannelGate`` behind every affine ``BatchNorm2d`` of a model through
a forward hook, so any plain-PyTorch CNN (VGG-small, ResNet-20, the derived DARTS network) is
gated without a change to its code or its state-dict keys; the gates live in the model's
``channel_gates`` (a ``ModuleDict``), so a checkpoint of the model holds them.

``prune_channels`` builds the *physically* smaller network. A closed channel is a zero map after
its BN: the mask is folded into the BN's affine (``γ·m``, ``b·m``), which is exact in train and
eval mode alike, and the channel is then removed everywhere it flows, by Torch-Pruning's
dependency graph (the conv that makes it, the BN, every consumer's input, a depthwise conv's
group, a concatenation's slice, the head's input). Channels that are *added together* — a ResNet
stage's shortcut and its blocks' last BNs, a DARTS node's two edges, every state a cell's skip and
pool edges pass through — are one group in that graph; a channel of a group goes only when it is
closed at every BN of the group (kept channels closed at some of them stay zero there through
the folded affine), so the pruned network computes exactly what the masked one does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from morphnas.cells.image_baselines import eval_mode
from morphnas.channels.gates import ChannelGate

GATES_ATTR = "channel_gates"


class _GateHook:
    """The forward hook that runs a BN's output through its gate (an object, not a closure, so a
    ``copy.deepcopy`` of the model hooks the copied gate, not the original's)."""

    def __init__(self, gate: ChannelGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return self.gate(output)


def _key(name: str) -> str:
    return name.replace(".", ":")  # a ModuleDict key cannot hold a dot


def gated_norms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """The BNs DNAL gates: every affine ``BatchNorm2d`` (one without an affine cannot carry a
    folded mask), by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d) and module.affine
    }


def attach_bn_gates(model: nn.Module) -> dict[str, ChannelGate]:
    """In place: a gate behind every affine BN (``gated_norms``), in ``identity`` mode, returned by
    the BN's module name. ValueError for a model without one (LeNet has no BatchNorm)."""
    if hasattr(model, GATES_ATTR):
        raise ValueError("the model is gated already")
    norms = gated_norms(model)
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer to gate")
    gates = nn.ModuleDict(
        {_key(name): ChannelGate(bn.num_features, dim=1) for name, bn in norms.items()}
    )
    reference = next(iter(norms.values())).weight
    gates.to(device=reference.device, dtype=reference.dtype)
    model.add_module(GATES_ATTR, gates)
    for name, bn in norms.items():
        bn.register_forward_hook(_GateHook(gates[_key(name)]))
    return {name: gates[_key(name)] for name in norms}


def bn_gates(model: nn.Module) -> dict[str, ChannelGate]:
    """The gates ``attach_bn_gates`` put on ``model``, by BN name."""
    gates = getattr(model, GATES_ATTR)
    return {name.replace(":", "."): gate for name, gate in gates.items()}


def detach_bn_gates(model: nn.Module) -> None:
    """In place: the hooks and the gates gone, the model as it was before ``attach_bn_gates``."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, _GateHook):
                del module._forward_hooks[key]
    if hasattr(model, GATES_ATTR):
        delattr(model, GATES_ATTR)


def _closed(bn: _BatchNorm) -> set[int]:
    """The channels a folded mask zeroed (an affine of exactly 0 and 0: BN's init is 1 and 0)."""
    if not bn.affine:
        return set()
    return set(((bn.weight == 0) & (bn.bias == 0)).nonzero().flatten().tolist())


def prune_channels(model: nn.Module, masks: Mapping[str, Tensor], example: Tensor) -> nn.Module:
    """A new network (``model`` untouched) without the channels ``masks`` close (by BN name, True =
    kept), no gates, and outputs equal to the gated model's in ``mask`` mode. ``example``: an input
    batch the dependency graph is traced with."""
    pruned = copy.deepcopy(model)
    detach_bn_gates(pruned)
    norms = gated_norms(pruned)
    if set(masks) != set(norms):
        raise ValueError(f"masks for {sorted(set(masks) ^ set(norms))} do not match the BNs")
    with torch.no_grad():
        for name, bn in norms.items():
            keep = torch.as_tensor(masks[name]).to(bn.weight.device, bn.weight.dtype)
            bn.weight.mul_(keep)
            bn.bias.mul_(keep)
    with eval_mode(pruned):  # tracing must not move BatchNorm's statistics
        _prune_groups(pruned, norms, example)
    _refresh_features(pruned)
    return pruned


def _prune_groups(pruned: nn.Module, norms: Mapping[str, _BatchNorm], example: Tensor) -> None:
    """Remove, group by group, every channel closed at all the BNs of its group (in place)."""
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example[:2])
    for bn in norms.values():
        closed = sorted(_closed(bn))
        if not closed:
            continue
        group = graph.get_pruning_group(bn, tp.prune_batchnorm_out_channels, idxs=closed)
        removable = set(closed)
        for item in group.items:
            layer = item.dep.target.module
            if (
                isinstance(layer, _BatchNorm)
                and item.dep.handler == tp.prune_batchnorm_out_channels
            ):
                shut = _closed(layer)
                removable -= {
                    int(r)
                    for i, r in zip(item.idxs, item.root_idxs, strict=True)
                    if int(i) not in shut
                }
        removable = _leaving_every_layer_a_channel(graph, bn, removable)
        if removable:
            graph.get_pruning_group(
                bn, tp.prune_batchnorm_out_channels, idxs=sorted(removable)
            ).prune()


def _leaving_every_layer_a_channel(graph: Any, bn: _BatchNorm, removable: set[int]) -> set[int]:
    """``removable`` less what would empty a layer of the group: a DARTS ``FactorizedReduce``
    concatenates two convs under one BN, and a read-out that closes all of one half must leave that
    conv one (zero) channel, as a gate that closed everything keeps its strongest."""
    while removable:
        group = graph.get_pruning_group(bn, tp.prune_batchnorm_out_channels, idxs=sorted(removable))
        emptied = None
        for item in group.items:
            layer = item.dep.target.module
            width = getattr(layer, "out_channels", None) or getattr(layer, "num_features", None)
            if (
                item.dep.handler in _OUT_HANDLERS
                and width is not None
                and len({int(i) for i in item.idxs}) >= width
            ):
                emptied = int(item.root_idxs[0])
                break
        if emptied is None:
            return removable
        removable = removable - {emptied}
    return removable


_OUT_HANDLERS = (tp.prune_conv_out_channels, tp.prune_batchnorm_out_channels)


def _refresh_features(model: nn.Module) -> None:
    """A body's ``features`` (its output width, read when a head is built) after pruning."""
    for module in model.modules():
        head = getattr(module, "head", None)
        body = getattr(module, "cell", None)
        if isinstance(head, nn.Linear) and body is not None and hasattr(body, "features"):
            body.features = head.in_features
