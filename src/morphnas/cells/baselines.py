"""LSTM and GRU baselines with the cells' interface."""

from __future__ import annotations

from torch import Tensor, nn

RNNState = Tensor | tuple[Tensor, ...]

BASELINES: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


class RecurrentBaseline(nn.Module):
    """An ``nn.LSTM`` or ``nn.GRU``; ``h_last`` is the hidden state, not the LSTM cell state."""

    def __init__(self, kind: str, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.kind = kind
        self.rnn = BASELINES[kind](input_size, hidden_size)

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        state = None
        if h0 is not None:
            h = h0.unsqueeze(0)
            state = (h, h.new_zeros(h.shape)) if self.kind == "lstm" else h
        outputs, _ = self.rnn(x, state)
        return outputs, outputs[-1]

    def forward_with_state(
        self, x: Tensor, state: RNNState | None = None
    ) -> tuple[Tensor, RNNState]:
        """The outputs and PyTorch's own final state, ``(h, c)`` for an LSTM: a language model
        carries it across BPTT windows, and dropping the LSTM's memory cell there would handicap
        the baseline (``forward`` keeps the cells' one-tensor interface for forecasting)."""
        outputs, final = self.rnn(x, state)
        return outputs, final
