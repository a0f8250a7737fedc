"""LSTM and GRU baselines with the cells' interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from morphnas.channels.gates import ChannelGate

RNNState = Tensor | tuple[Tensor, ...]

BASELINES: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


class RecurrentBaseline(nn.Module):
    """An ``nn.LSTM`` or ``nn.GRU``; ``h_last`` is the hidden state, not the LSTM cell state.

    ``unit_gate``: None (the fused ``nn`` module runs), or a per-hidden-unit ``ChannelGate`` that
    ``channels.recurrent`` attaches (DNAL unit learning): the sequence is then unrolled step by
    step on the module's own weights, ``h_t`` gated before it is fed back and output.
    """

    def __init__(self, kind: str, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.kind = kind
        self.rnn = BASELINES[kind](input_size, hidden_size)
        self.unit_gate: ChannelGate | None = None

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        state = None
        if h0 is not None:
            h = h0.unsqueeze(0)
            state = (h, h.new_zeros(h.shape)) if self.kind == "lstm" else h
        if self.unit_gate is not None:
            outputs, _ = self._unrolled(x, state, self.unit_gate)
        else:
            outputs, _ = self.rnn(x, state)
        return outputs, outputs[-1]

    def forward_with_state(
        self, x: Tensor, state: RNNState | None = None
    ) -> tuple[Tensor, RNNState]:
        """The outputs and PyTorch's own final state, ``(h, c)`` for an LSTM: a language model
        carries it across BPTT windows, and dropping the LSTM's memory cell there would handicap
        the baseline (``forward`` keeps the cells' one-tensor interface for forecasting)."""
        if self.unit_gate is not None:
            return self._unrolled(x, state, self.unit_gate)
        outputs, final = self.rnn(x, state)
        return outputs, final

    def _unrolled(
        self, x: Tensor, state: RNNState | None, gate: ChannelGate
    ) -> tuple[Tensor, RNNState]:
        """``self.rnn`` (one layer, one direction, ``(T, B, I)`` input) one step at a time, with
        ``h`` gated at entry and after every step; states in ``nn.LSTM``'s / ``nn.GRU``'s shapes.
        An LSTM's ``c`` stays ungated: unit ``j``'s ``c_j`` feeds unit ``j`` alone."""
        rnn = self.rnn
        weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        zeros = x.new_zeros(x.shape[1], rnn.hidden_size)
        outputs = []
        if self.kind == "lstm":
            h, c = (zeros, zeros) if state is None else (state[0][0], state[1][0])
            h = gate(h)
            for x_t in x:
                h, c = torch.lstm_cell(x_t, (h, c), *weights)
                h = gate(h)
                outputs.append(h)
            return torch.stack(outputs), (h.unsqueeze(0), c.unsqueeze(0))
        h = gate(zeros if state is None else state[0])
        for x_t in x:
            h = gate(torch.gru_cell(x_t, h, *weights))
            outputs.append(h)
        return torch.stack(outputs), h.unsqueeze(0)
