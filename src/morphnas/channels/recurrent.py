"""DNAL unit learning for the recurrent models of the forecasting task: a gate per hidden unit.

``attach_unit_gates`` puts one ``ChannelGate(hidden_size, dim=-1)`` on ``model.cell`` (a
``RecurrentBaseline`` LSTM or GRU, a ``DartsRNNCell`` or a ``TwoInputCell``); the architecture
stage learns its ``α``, ``gates.read_out`` turns it into a 0/1 mask, and ``prune_units`` builds a
new, smaller model holding the surviving units alone, which computes exactly what the gated model
computes in ``mask`` mode.

Where the gate acts, and why. Removing unit ``j`` is exact only if no *other* unit ever reads
anything unit ``j`` computed: a closed unit must be zero in every hidden-sized tensor that is
multiplied by a weight matrix (mixing units) or carried to the next step, at every step. Its own
elementwise work may produce anything, as long as it is zeroed before another unit can see it.
The gate therefore multiplies:

* ``DartsRNNCell``: the incoming ``h`` (a given ``h0``), the highway init state ``s_0`` and every
  node state ``s_i`` (after a residual node's ``base + γ ⊙ op``). A node's ``s_prev + σ(c) ⊙
  (f(g) − s_prev)`` is not zero at a closed unit even when ``s_prev`` is (``σ(c)·f(g)``), so each
  state needs its own gate. ``h`` is the mean or last of gated states, so it is zero at a closed
  unit whenever the output activation keeps zero (``identity``, ``tanh``); a squash that does not
  (``sigmoid``) is gated again after it.
* ``TwoInputCell``: the input projection ``u_t = x_t W_x + b_x`` (its bias alone makes a closed
  unit non-zero), the incoming ``h`` and carried ``c``, every node state (so also the carried
  ``c``, which is one), and ``h`` after the squash under the same rule as above.
* ``nn.LSTM`` / ``nn.GRU`` baselines: PyTorch runs them fused, with no place to act between steps,
  so a gated baseline is unrolled (``torch.lstm_cell`` / ``torch.gru_cell`` on the module's own
  weights) and ``h_t`` gated before it is fed back and output. The LSTM's ``c_t`` stays ungated:
  ``c_j`` enters only unit ``j``'s own elementwise update and its ``h_j``, which is gated.

A gate in ``identity`` mode leaves every cell's function as it was (the tests check it against
the fused paths); with no gate attached, nothing changes and the fused kernels run.

Physical removal then slices every hidden-sized axis: rows of matrices that read ``h`` or a node
state, columns (of each half / gate block) that produce one, biases, residual ``γ``, and the
head's input columns. The cells' plans (``CellPlan``, ``TwoInputCellPlan``) depend on the
genotype alone, so they carry over unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from morphnas.cells.baselines import RecurrentBaseline
from morphnas.cells.discrete import DartsRNNCell, TwoInputCell
from morphnas.cells.image_baselines import eval_mode
from morphnas.channels.gates import ChannelGate
from morphnas.kernels.fused_ops import eager_kernels
from morphnas.ops import ADD_OPS

GATE_NAME = "cell"
# The cells whose forward knows ``unit_gate`` (exact types: a subclass may not).
GATED_CELLS = (RecurrentBaseline, DartsRNNCell, TwoInputCell)


def attach_unit_gates(model: nn.Module) -> dict[str, ChannelGate]:
    """In place: one ``ChannelGate(hidden_size, dim=-1)`` (identity mode) on ``model.cell``, a
    registered submodule ``cell.unit_gate`` (in ``state_dict`` and ``parameters``), on the cell's
    device and dtype; returns ``{"cell": gate}``. ``ValueError`` for a cell of another class, no
    cell, or a cell that already has a gate."""
    cell = _cell(model)
    if cell.unit_gate is not None:
        raise ValueError(f"{type(cell).__name__} already has a unit gate; detach it first")
    reference = next(cell.parameters())
    gate = ChannelGate(_hidden_size(cell), dim=-1)
    gate.to(device=reference.device, dtype=reference.dtype)
    cell.unit_gate = gate
    return {GATE_NAME: gate}


def detach_unit_gates(model: nn.Module) -> None:
    """Remove the gate (if any): the cell is back on its ungated, fused path."""
    _cell(model).unit_gate = None


def prune_units(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """A new model (``copy.deepcopy``; ``model`` is left untouched) whose cell holds only the
    units ``masks["cell"]`` keeps (a bool, or 0/1, vector of length ``hidden_size``), every
    hidden-sized weight sliced, ``hidden_size`` updated, no gate attached. It computes what
    ``model`` computes with its gate in ``mask`` mode and that mask (with no dropout inside the
    cell: a variational dropout mask is drawn at the cell's width). ``model.head`` must be the
    ``nn.Linear`` that reads the hidden state (``ForecastModel``'s). ``ValueError`` if no unit
    survives, the masks do not fit, or the cell was compiled in place."""
    cell = _cell(model)
    hidden = _hidden_size(cell)
    unknown = set(masks) - {GATE_NAME}
    if GATE_NAME not in masks or unknown:
        raise ValueError(f"unit masks must name {GATE_NAME!r} alone, got {sorted(map(str, masks))}")
    keep = torch.as_tensor(masks[GATE_NAME]).flatten()
    if keep.numel() != hidden:
        raise ValueError(f"mask 'cell' has {keep.numel()} units, the cell {hidden}")
    keep = keep if keep.dtype == torch.bool else keep != 0
    if not bool(keep.any()):
        raise ValueError("no hidden unit survives the mask: nothing left to prune to")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.in_features != hidden:
        raise ValueError(
            f"{type(model).__name__}.head must be the nn.Linear reading the {hidden} hidden "
            f"units, got {type(head).__name__}"
        )
    if "forward" in vars(cell):  # engine.compiled put a compiled forward on the instance
        raise ValueError("prune a cell before compiling it (its compiled forward is the old one)")
    pruned = copy.deepcopy(model)
    pruned_cell = pruned.cell
    pruned_cell.unit_gate = None
    index = keep.nonzero().flatten().to(next(pruned_cell.parameters()).device)
    if isinstance(pruned_cell, RecurrentBaseline):
        pruned_cell.rnn = _pruned_rnn(pruned_cell.rnn, index)
    elif isinstance(pruned_cell, DartsRNNCell):
        _prune_darts(pruned_cell, index)
    else:
        _prune_two_input(pruned_cell, index)
    pruned.head = _pruned_head(pruned.head, index)
    return pruned


def recurrent_flops(model: nn.Module, example: Tensor) -> int:
    """FLOPs of one forward of ``example[:1]``: matrix multiplications only, 2 per multiply-add,
    as ``torch.utils.flop_counter.FlopCounterMode`` counts (``image_baselines.count_flops``'s
    rules: eval mode, no autograd, every training flag restored).

    That counter sees nothing of a fused ``nn.LSTM`` (its op has no formula), so an ``nn.LSTM``
    call that adds no counted FLOPs is counted analytically: ``steps · 2 · (I·4H + H·4H)`` per
    sequence and layer. ``nn.GRU`` (and a gated, unrolled LSTM) the counter counts itself. A gated
    model counts at its full width: closed units still cost until ``prune_units`` removes them.
    The derived cells run their eager loops for the count (``eager_kernels``): the counter does
    not see inside the hand-written sequence kernels, which compute the same function.
    """
    counter = FlopCounterMode(display=False)
    uncounted = [0]
    before: dict[int, int] = {}

    def enter(module: nn.Module, args: tuple) -> None:
        before[id(module)] = counter.get_total_flops()

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        if counter.get_total_flops() == before.pop(id(module)):
            uncounted[0] += _lstm_flops(module, args[0])

    lstms = [m for m in model.modules() if isinstance(m, nn.LSTM)]
    handles = [m.register_forward_pre_hook(enter) for m in lstms]
    handles += [m.register_forward_hook(leave) for m in lstms]
    try:
        # eager_kernels: the counter does not see a fused kernel's matmuls
        with eval_mode(model), torch.no_grad(), eager_kernels(), counter:
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return int(counter.get_total_flops()) + uncounted[0]


def _lstm_flops(lstm: nn.LSTM, x: Tensor) -> int:
    """Matmul FLOPs of one ``nn.LSTM`` call on ``x`` (``(T, B, I)``, batch-first, or unbatched)."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        raise ValueError("recurrent_flops cannot count an LSTM run on a PackedSequence")
    if x.dim() == 2:
        steps, batch = x.shape[0], 1
    else:
        steps, batch = (x.shape[1], x.shape[0]) if lstm.batch_first else x.shape[:2]
    hidden, out = lstm.hidden_size, lstm.proj_size or lstm.hidden_size
    directions = 2 if lstm.bidirectional else 1
    per_step = 0
    for layer in range(lstm.num_layers):
        inputs = lstm.input_size if layer == 0 else out * directions
        per_step += directions * (4 * hidden * (inputs + out) + hidden * lstm.proj_size)
    return 2 * steps * batch * per_step


def _cell(model: nn.Module) -> nn.Module:
    cell = getattr(model, "cell", None)
    if type(cell) not in GATED_CELLS:
        known = ", ".join(c.__name__ for c in GATED_CELLS)
        raise ValueError(
            f"unit gates know {known}; {type(model).__name__}.cell is {type(cell).__name__}"
        )
    if isinstance(cell, RecurrentBaseline):
        rnn = cell.rnn
        if (
            type(rnn) not in (nn.LSTM, nn.GRU)
            or rnn.num_layers != 1
            or rnn.bidirectional
            or rnn.batch_first
            or not rnn.bias
            or getattr(rnn, "proj_size", 0)
        ):
            raise ValueError(
                f"unit gates need a one-layer, one-direction, biased {type(rnn).__name__} "
                "without projection, sequence-first"
            )
    return cell


def _hidden_size(cell: nn.Module) -> int:
    return cell.rnn.hidden_size if isinstance(cell, RecurrentBaseline) else cell.hidden_size


def _parameter(old: nn.Parameter, value: Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)


def _blocks(index: Tensor, hidden: int, blocks: int) -> Tensor:
    """``index`` in each of ``blocks`` consecutive hidden-sized blocks: ``[c | g]`` halves,
    an LSTM's ``[i, f, g, o]``, a GRU's ``[r, z, n]``, an add op's ``[A; B]``."""
    return torch.cat([index + k * hidden for k in range(blocks)])


def _pruned_rnn(rnn: nn.RNNBase, index: Tensor) -> nn.RNNBase:
    hidden, blocks = rnn.hidden_size, 4 if isinstance(rnn, nn.LSTM) else 3
    rows = _blocks(index, hidden, blocks)
    weight = rnn.weight_ih_l0
    new = type(rnn)(rnn.input_size, index.numel(), device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight_ih_l0.copy_(rnn.weight_ih_l0[rows])
        new.weight_hh_l0.copy_(rnn.weight_hh_l0[rows][:, index])
        new.bias_ih_l0.copy_(rnn.bias_ih_l0[rows])
        new.bias_hh_l0.copy_(rnn.bias_hh_l0[rows])
    for name, p in new.named_parameters():
        p.requires_grad_(getattr(rnn, name).requires_grad)
    return new.train(rnn.training)


def _prune_darts(cell: DartsRNNCell, index: Tensor) -> None:
    """``init_weight`` ``(I + d, 2d)``: rows ``[x; h]``, columns ``[c | g]``; each node's
    ``(d, 2d)``: rows its input state, columns ``[c | g]``."""
    d, inputs = cell.hidden_size, cell.input_size
    columns = _blocks(index, d, 2)
    rows = torch.cat([torch.arange(inputs, device=index.device), inputs + index])
    cell.init_weight = _parameter(cell.init_weight, cell.init_weight[rows][:, columns])
    for i, weight in enumerate(cell.node_weights):
        cell.node_weights[i] = _parameter(weight, weight[index][:, columns])
    _prune_common(cell, index)


def _prune_two_input(cell: TwoInputCell, index: Tensor) -> None:
    """``input_weight`` ``(I, d)`` and ``input_bias`` by column; an add op's ``[A; B]``
    ``(2d, d)`` by both row halves and column; a highway's ``[C, H]`` ``(d, 2d)`` by row and both
    column halves (``ops.apply_two_input``)."""
    d = cell.hidden_size
    cell.input_weight = _parameter(cell.input_weight, cell.input_weight[:, index])
    cell.input_bias = _parameter(cell.input_bias, cell.input_bias[index])
    for node, slot in zip(cell.genotype.nodes, cell._weight_slot, strict=True):
        if slot is None:
            continue
        weight = cell.node_weights[slot]
        if node.op in ADD_OPS:
            value = weight[_blocks(index, d, 2)][:, index]
        elif node.op == "highway":
            value = weight[index][:, _blocks(index, d, 2)]
        else:
            raise ValueError(f"no unit slicing known for the weight of op {node.op!r}")
        cell.node_weights[slot] = _parameter(weight, value)
    _prune_common(cell, index)


def _prune_common(cell: DartsRNNCell | TwoInputCell, index: Tensor) -> None:
    for key, gamma in list(cell.gammas.items()):
        cell.gammas[key] = _parameter(gamma, gamma[index])
    cell.hidden_size = index.numel()


def _pruned_head(head: nn.Linear, index: Tensor) -> nn.Linear:
    new = nn.Linear(
        index.numel(),
        head.out_features,
        bias=head.bias is not None,
        device=head.weight.device,
        dtype=head.weight.dtype,
    )
    new.weight = _parameter(head.weight, head.weight[:, index])
    if head.bias is not None:
        new.bias = _parameter(head.bias, head.bias.clone())
    return new.train(head.training)
