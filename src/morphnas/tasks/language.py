"""Language modelling: the DARTS RNN language model around any cell, BPTT batching, perplexity.

The model follows the DARTS code (``rnn/model.py``, spec/morphism.md §2.1): an embedding (with
*embedding dropout*, which drops whole words), *locked* dropout on the embedded inputs and on the
cell's outputs (one mask per sequence, shared by every time step), the cell (a searched supernet,
a discrete cell or an LSTM/GRU baseline; the cells apply their own variational dropout on ``x``
and ``h``), and a decoder whose weight *is* the embedding matrix (weight tying; a linear
projection to the embedding size comes in when the cell is wider or narrower than the embedding,
as a parameter-matched baseline is). Training adds DARTS's temporal activation regularisation
(TAR, ``β · mean((h_t − h_{t−1})²)`` on the raw outputs) and activation regularisation (AR,
``α · mean(dropped outputs²)``).

Batching is DARTS's too: the token stream is cut into ``B`` contiguous columns, and consecutive
BPTT windows walk down them; each window's length is drawn as ``bptt`` with probability 0.95
(else ``bptt/2``) plus N(0, 5) noise, at least 5. The hidden state of one window is carried,
detached, into the next, so a column is read as one long text. ``LanguageTask`` keeps those
carries (one for the training walk, one for the validation walk the architecture steps read) so
the engine's loops stay task-agnostic, and saves them for an exact resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from morphnas import cells
from morphnas.data.corpus import Corpus, check_lengths, load_corpus
from morphnas.engine.runtime import resolve_device
from morphnas.errors import UserError
from morphnas.kernels.blocks import check_dropout, variational_mask
from morphnas.kernels.fused_ops import transforms_active
from morphnas.tasks.kinds import TaskKind

if TYPE_CHECKING:
    from morphnas.config import RunConfig
    from morphnas.genotype import Genotype
    from morphnas.tasks.base import Task

State = Tensor | tuple[Tensor, ...]


def batchify(tokens: Tensor, columns: int) -> Tensor:
    """``(n,)`` ids into ``(n // columns, columns)``: column ``j`` is the ``j``-th contiguous
    stretch of the text (the remainder is dropped, as in the DARTS code)."""
    steps = len(tokens) // columns
    return tokens[: steps * columns].view(columns, steps).t().contiguous()


def draw_length(bptt: int, generator: torch.Generator | None, variable: bool = True) -> int:
    """One window length. With ``variable`` (DARTS): ``bptt`` w.p. 0.95 else ``bptt/2``, plus
    N(0, 5), at least 5 and at most ``bptt + 20``; otherwise ``bptt``."""
    if not variable:
        return bptt
    base = bptt if float(torch.rand((), generator=generator)) < 0.95 else bptt / 2
    noise = float(torch.randn((), generator=generator)) * 5.0
    return min(max(5, int(base + noise)), bptt + 20)


def bptt_lengths(
    total: int, bptt: int, generator: torch.Generator | None, variable: bool = True
) -> list[int]:
    """Window lengths that walk ``total`` rows of a batchified stream (each window needs one more
    row for its targets); the last window is cut at the end."""
    lengths, position = [], 0
    while position < total - 1:
        length = min(draw_length(bptt, generator, variable), total - 1 - position)
        lengths.append(length)
        position += length
    return lengths


@dataclass(frozen=True)
class LMBatch:
    """One BPTT window: inputs ``x`` and next-token targets ``y``, both ``(T, B)``.

    ``stream`` names the walk it belongs to and ``index`` its place in that walk: window ``k``
    starts from the hidden state window ``k − 1`` ended with, window 0 from zeros.
    """

    x: Tensor
    y: Tensor
    stream: str
    index: int


def windows(data: Tensor, lengths: list[int], stream: str) -> list[LMBatch]:
    """The BPTT windows of a batchified stream for the given lengths, in order."""
    out, position = [], 0
    for k, length in enumerate(lengths):
        x = data[position : position + length]
        y = data[position + 1 : position + 1 + length]
        out.append(LMBatch(x, y, stream, k))
        position += length
    return out


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout on ``(T, B, D)`` with one mask per sequence shared by all ``T`` steps."""
    mask = variational_mask(x.shape[1], x.shape[2], p, x, training)
    return x if mask is None else x * mask


def embedding_dropout(embedding: nn.Embedding, tokens: Tensor, p: float, training: bool) -> Tensor:
    """Embeddings of ``tokens`` with whole words dropped (a word's row zeroed everywhere it
    occurs in the batch, the rest scaled by ``1/(1-p)``): DARTS/AWD ``dropoute``."""
    weight = embedding.weight
    if training and p > 0.0:
        keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1.0 - p) / (1.0 - p)
        weight = weight * keep
    return F.embedding(tokens, weight)


@dataclass
class LMOutput:
    """Logits ``(T, B, V)``, the final state, and the cell's outputs before and after dropout
    (TAR and AR read those)."""

    logits: Tensor
    state: State
    raw: Tensor
    dropped: Tensor


class LanguageModel(nn.Module):
    """Embedding → locked dropout → cell → locked dropout → (projection) → tied decoder.

    ``forward(tokens (T, B), state=None, **cell_kwargs)``: keyword arguments go to the cell, so a
    supernet receives a strategy's mixing weights as ``weights=``. ``state`` is whatever the
    cell carries: the hidden state ``(B, d)``, or ``(h, c)`` for an LSTM baseline or a two-input
    cell with a ``cell_state`` node, whose memory cell must be carried too for the comparison
    to be fair.
    """

    def __init__(
        self,
        cell: nn.Module,
        vocab_size: int,
        emb_size: int,
        hidden_size: int,
        *,
        dropout: float = 0.0,
        dropout_i: float = 0.0,
        dropout_e: float = 0.0,
        tie: bool = True,
    ) -> None:
        super().__init__()
        check_dropout(dropout=dropout, dropout_i=dropout_i, dropout_e=dropout_e)
        self.cell = cell
        self.vocab_size, self.emb_size, self.hidden_size = vocab_size, emb_size, hidden_size
        self.dropout, self.dropout_i, self.dropout_e = dropout, dropout_i, dropout_e
        self.embedding = nn.Embedding(vocab_size, emb_size)
        out_size = emb_size if tie else hidden_size
        self.projection = (
            nn.Linear(hidden_size, out_size, bias=False) if out_size != hidden_size else None
        )
        self.decoder = nn.Linear(out_size, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # DARTS init_weights
        nn.init.zeros_(self.decoder.bias)
        if tie:
            self.decoder.weight = self.embedding.weight

    def forward(self, tokens: Tensor, state: State | None = None, **cell_kwargs: Any) -> LMOutput:
        emb = embedding_dropout(self.embedding, tokens, self.dropout_e, self.training)
        emb = locked_dropout(emb, self.dropout_i, self.training)
        # A cell that carries more than h (an LSTM's memory cell, a two-input cell's cell_state)
        # says so with ``forward_with_state``, whose state comes back whole.
        with_state = getattr(self.cell, "forward_with_state", None)
        if with_state is not None:
            raw, state = with_state(emb, state, **cell_kwargs)
        else:
            raw, state = self.cell(emb, state, **cell_kwargs)
        dropped = locked_dropout(raw, self.dropout, self.training)
        features = dropped if self.projection is None else self.projection(dropped)
        return LMOutput(self.decoder(features), state, raw, dropped)


def detach_state(state: State) -> State:
    """The carried state cut from the graph: the next window backpropagates into its own only."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def _state_to(state: State, device: torch.device) -> State:
    return tuple(s.to(device) for s in state) if isinstance(state, tuple) else state.to(device)


class _WindowStream:
    """An endless walk of BPTT windows over the validation columns (the architecture steps'
    batches): when the walk reaches the end it starts again at the top, from a zero state."""

    def __init__(
        self, data: Tensor, bptt: int, variable: bool, generator: torch.Generator, name: str
    ) -> None:
        self.data, self.bptt, self.variable, self.generator = data, bptt, variable, generator
        self.name = name
        self.position, self.index = 0, 0

    def __next__(self) -> LMBatch:
        if self.position >= len(self.data) - 1:
            self.position, self.index = 0, 0
        length = draw_length(self.bptt, self.generator, self.variable)
        length = min(length, len(self.data) - 1 - self.position)
        x = self.data[self.position : self.position + length]
        y = self.data[self.position + 1 : self.position + 1 + length]
        batch = LMBatch(x, y, self.name, self.index)
        self.position += length
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.index = state["position"], state["index"]


class LanguageTask:
    """Next-token prediction under cross-entropy: the ``Task`` the engine runs for LM.

    The carried hidden states live here, keyed by walk (``train``, ``valid``): the state a
    window starts from is the one its predecessor in the same walk ended with. A window may be
    evaluated more than once (a second-order architecture step evaluates the training window at
    perturbed weights before the weight step does), so each carry remembers both the state its
    window started from and the one it ended with: a repeated evaluation starts where the first
    did, and the last evaluation's end state is what the next window starts from.
    """

    probe_columns = 8

    def __init__(
        self,
        train: Tensor,
        valid: Tensor,
        *,
        batch_size: int,
        bptt: int,
        emb_size: int,
        eval_batch_size: int = 16,
        variable_bptt: bool = True,
        tar: float = 0.0,
        ar: float = 0.0,
    ) -> None:
        """``train``/``valid``: 1-D token ids. The validation split is cut twice: into
        ``batch_size`` columns for the architecture steps' walk, and into ``eval_batch_size``
        columns for the full validation loss."""
        self.train_data = batchify(train, batch_size)
        self.valid_tokens = valid
        self.valid_data = batchify(valid, batch_size)
        self.eval_data = batchify(valid, eval_batch_size)
        self.bptt, self.variable_bptt = bptt, variable_bptt
        self.emb_size, self.tar, self.ar = emb_size, tar, ar
        self.carry: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ batches

    def epoch_batches(self, generator: torch.Generator, fraction: float = 1.0) -> list[LMBatch]:
        """One walk down the training columns (their first ``fraction`` when streamed)."""
        rows = max(2, round(len(self.train_data) * fraction))
        data = self.train_data[:rows]
        lengths = bptt_lengths(len(data), self.bptt, generator, self.variable_bptt)
        return windows(data, lengths, "train")

    @property
    def tokens_per_epoch(self) -> int:
        return (len(self.train_data) - 1) * self.train_data.shape[1]

    def valid_stream(self, generator: torch.Generator) -> _WindowStream:
        return _WindowStream(self.valid_data, self.bptt, self.variable_bptt, generator, "valid")

    def batch_weight(self, batch: LMBatch) -> int:
        return batch.y.numel()

    # ------------------------------------------------------------------ losses

    def _start(self, batch: LMBatch) -> State | None:
        """The state window ``batch`` starts from (None: zeros), see the class docstring."""
        carry = self.carry.get(batch.stream)
        if batch.index == 0 or carry is None:
            return None
        if carry["index"] == batch.index:
            start = carry["start"]
        elif carry["index"] == batch.index - 1:
            start = carry["end"]
        else:  # the walk was not followed (e.g. its windows were only seen inside transforms)
            return None
        return None if start is None else _state_to(start, batch.x.device)

    def loss(self, model: nn.Module, batch: LMBatch, **model_kwargs: Any) -> Tensor:
        """Mean token NLL of the window (plus TAR/AR in training mode), from the carried state."""
        start = self._start(batch)
        out = model(batch.x, start, **model_kwargs)
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), batch.y.reshape(-1))
        if model.training:
            if self.ar > 0:
                loss = loss + self.ar * out.dropped.pow(2).mean()
            if self.tar > 0 and len(out.raw) > 1:
                loss = loss + self.tar * (out.raw[1:] - out.raw[:-1]).pow(2).mean()
        # Inside a torch.func transform (exact Hessian products) a state must not be kept: it
        # would be a wrapped tensor that outlives its transform.
        if not transforms_active():
            self.carry[batch.stream] = {
                "index": batch.index,
                "start": start,
                "end": detach_state(out.state),
            }
        return loss

    def valid_loss(self, model: nn.Module, **model_kwargs: Any) -> float:
        """Mean token NLL over the whole validation split, in eval mode (``log`` perplexity)."""
        total, count = stream_nll(model, self.eval_data, self.bptt, **model_kwargs)
        return total / count

    # ------------------------------------------------------------------ growth and resume

    def probe(self) -> tuple[Tensor, Tensor]:
        """Fixed validation tokens, and as the cell's input a fixed pseudo-embedding of them.

        The task does not own the embedding, and a growth check only needs *some* fixed input
        in the embedding's range (uniform ±0.1 at init) to prove the cell's function unchanged.
        """
        tokens = batchify(self.valid_tokens, self.probe_columns)[: self.bptt]
        generator = torch.Generator().manual_seed(0)
        cell_input = (torch.rand(*tokens.shape, self.emb_size, generator=generator) - 0.5) * 0.2
        return tokens, cell_input.to(tokens.device)

    def state_dict(self) -> dict[str, Any]:
        return {"carry": self.carry}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carry = dict(state.get("carry", {}))


@torch.no_grad()
def stream_nll(model: nn.Module, data: Tensor, bptt: int, **model_kwargs: Any) -> tuple[float, int]:
    """Summed token NLL and token count over a batchified stream, fixed ``bptt`` windows, the
    state carried through, in eval mode (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        state, total, count = None, torch.zeros((), dtype=torch.float64), 0
        for batch in windows(data, bptt_lengths(len(data), bptt, None, False), "eval"):
            out = model(batch.x, state, **model_kwargs)
            nll = F.cross_entropy(
                out.logits.reshape(-1, out.logits.shape[-1]), batch.y.reshape(-1), reduction="sum"
            )
            total += nll.double().cpu()
            count += batch.y.numel()
            state = out.state
        return float(total), count
    finally:
        model.train(was_training)


def perplexity(mean_nll: float) -> float:
    """``exp`` of the mean token NLL (inf rather than an overflow error)."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def lm_metrics(
    model: nn.Module, valid: Tensor, test: Tensor, *, batch_size: int, bptt: int
) -> dict[str, float]:
    """Valid and test perplexity (and mean NLL) of a model, plus its inference tokens/s on test."""
    valid_nll, valid_n = stream_nll(model, batchify(valid, batch_size), bptt)
    started = time.perf_counter()
    test_nll, test_n = stream_nll(model, batchify(test, batch_size), bptt)
    seconds = time.perf_counter() - started
    return {
        "valid_loss": valid_nll / valid_n,
        "valid_ppl": perplexity(valid_nll / valid_n),
        "test_loss": test_nll / test_n,
        "test_ppl": perplexity(test_nll / test_n),
        "eval_tokens_per_s": test_n / seconds if seconds > 0 else math.inf,
    }


def embedding_params(model: LanguageModel) -> int:
    """Weights that belong to the vocabulary (the tied embedding/decoder matrix and the decoder
    bias): equal for every model of one run, so the matching is done on everything else."""
    count = model.embedding.weight.numel() + model.decoder.bias.numel()
    if model.decoder.weight is not model.embedding.weight:
        count += model.decoder.weight.numel()
    return count


def recurrent_params(model: LanguageModel, exclude: set[int] | None = None) -> int:
    """Every trainable weight but the vocabulary's: the cell and the projection."""
    exclude = exclude or set()
    total = sum(p.numel() for p in model.parameters() if id(p) not in exclude)
    return total - embedding_params(model)


# --------------------------------------------------------------------------- a run's pieces
# What the API needs to run language modelling from a ``RunConfig``: the corpus, the model
# around a cell, the task, the scores, and the hidden size of a parameter-matched baseline.

GATES = {"lstm": 4, "gru": 3}  # weight blocks of nn.LSTM / nn.GRU


def load_lm_corpus(config: RunConfig, device: torch.device) -> Corpus:
    """The run's corpus with its splits on ``device``, checked long enough for its batching."""
    lm = config.lm
    corpus = load_corpus(
        config.data.dataset,
        lm.corpus,
        level=lm.level,
        vocab_size=lm.vocab_size,
        fractions=lm.split,
        train_tokens=lm.train_tokens,
    )
    batch = max(config.search.batch_size, config.train.batch_size)
    check_lengths(
        corpus,
        {
            "train": batch * (lm.bptt + 1),
            "valid": max(batch, lm.eval_batch_size) * 2,
            "test": lm.eval_batch_size * 2,
        },
        f"batch size {batch} × (bptt {lm.bptt} + 1) training tokens, two rows of each "
        "validation and test column",
    )
    for split in ("train", "valid", "test"):
        setattr(corpus, split, getattr(corpus, split).to(device))
    return corpus


def emb_size(config: RunConfig) -> int:
    """The embedding size: ``lm.emb_size``, else the hidden size (DARTS: emb = nhid)."""
    return config.lm.emb_size or config.space.hidden


def build_lm(cell: nn.Module, config: RunConfig, corpus: Corpus, hidden: int) -> LanguageModel:
    """The DARTS language model around ``cell`` (whose state is ``hidden`` wide)."""
    lm = config.lm
    return LanguageModel(
        cell, len(corpus.vocab), emb_size(config), hidden, dropout=lm.dropout,
        dropout_i=lm.dropout_i, dropout_e=lm.dropout_e, tie=lm.tie_weights,
    )  # fmt: skip


def lm_task(config: RunConfig, corpus: Corpus, batch_size: int) -> LanguageTask:
    """The engine's task over the corpus: ``batch_size`` columns (search and retraining differ)."""
    lm = config.lm
    return LanguageTask(
        corpus.train, corpus.valid, batch_size=batch_size, bptt=lm.bptt,
        emb_size=emb_size(config), eval_batch_size=lm.eval_batch_size,
        variable_bptt=lm.variable_bptt, tar=lm.tar, ar=lm.ar,
    )  # fmt: skip


def score_lm(model: nn.Module, config: RunConfig, corpus: Corpus) -> dict[str, float]:
    """Perplexities on the full valid and test splits (fixed ``bptt`` windows, state carried),
    the recurrent parameter count the baselines are matched on, and inference tokens/s."""
    row = lm_metrics(
        model, corpus.valid, corpus.test, batch_size=config.lm.eval_batch_size, bptt=config.lm.bptt
    )
    arch = getattr(model.cell, "arch", None)
    exclude = {id(p) for p in arch} if arch is not None else set()
    return {**row, "recurrent_params": recurrent_params(model, exclude)}


def baseline_recurrent_params(kind: str, emb: int, hidden: int, tie: bool) -> int:
    """Weights of an ``nn.LSTM``/``nn.GRU`` (two bias vectors per gate block) plus the
    projection back to the embedding size that weight tying needs when ``hidden != emb``."""
    rnn = GATES[kind] * (emb * hidden + hidden * hidden + 2 * hidden)
    return rnn + (hidden * emb if tie and hidden != emb else 0)


def matched_hidden(kind: str, target: int, emb: int, tie: bool, limit: int = 8192) -> int:
    """The hidden size whose baseline has the recurrent parameter count closest to ``target``."""
    return min(
        range(1, limit + 1),
        key=lambda h: (abs(baseline_recurrent_params(kind, emb, h, tie) - target), h),
    )


class LanguageModelling(TaskKind):
    """Word- or character-level language modelling of a corpus (``LanguageModel`` around the
    cell), scored by perplexity; LSTM and GRU baselines are sized to the searched cell's
    recurrent parameter count (``lm.match_params``)."""

    name = "lm"
    # The language-modelling budget (docs/lm.md): every value a person did not give. Sized so
    # that `morphnas search --task lm` (search and three retrainings) ends within 15 minutes on
    # two CPU cores.
    defaults: ClassVar[Mapping[str, Any]] = {
        "data": {"dataset": "shakespeare"},
        "space": {"hidden": 64, "options": {"dropout_x": 0.1, "dropout_h": 0.1}},
        "search": {"epochs": 2, "batch_size": 32, "lr": 2e-3, "clip": 0.25},
        "train": {
            "epochs": 3, "batch_size": 32, "lr": 2e-3, "clip": 0.25, "patience": 2,
            "baselines": ["lstm", "gru"],
        },
    }  # fmt: skip

    @classmethod
    def check(cls, config: RunConfig) -> None:
        if config.data.csv is not None:
            raise ValueError("--task lm reads text: give it with --corpus FILE, not --csv")
        if config.data.layout != "multivariate":
            raise ValueError(
                f"data.layout {config.data.layout!r} is for forecasting: --task lm has one "
                "token stream, no series to share a model between"
            )
        if config.growth.width_step > 0:
            raise ValueError(
                "width growth (growth.width_step) is not supported for --task lm; grow nodes only"
            )

    def load(self) -> Corpus:
        return load_lm_corpus(self.config, resolve_device(self.config.device))

    def data_file(self) -> Path | None:
        return self.config.lm.corpus

    def budget(self) -> str:
        lm = self.config.lm
        return f"{lm.train_tokens} train tokens, vocab {lm.vocab_size}"

    def input_size(self, data: Corpus) -> int:
        """The token embedding size."""
        return emb_size(self.config)

    def wrap(self, cell: nn.Module | None, data: Corpus, hidden: int) -> nn.Module:
        if cell is None:
            raise UserError("--task lm needs a recurrent cell (no 'ar' baseline)")
        return build_lm(cell, self.config, data, hidden).to(resolve_device(self.config.device))

    def baseline_hidden(self, name: str, data: Corpus, reference: Genotype | None) -> int:
        """The baseline's hidden size whose recurrent weights match the ``reference`` cell's
        (its language model's weights but the vocabulary's, which every model of the run
        shares); the run's hidden size without a reference or with ``lm.match_params`` off."""
        config = self.config
        if reference is None or not config.lm.match_params:
            return config.space.hidden
        cell = cells.build(reference, self.input_size(data), config.space.hidden)
        target = recurrent_params(self.wrap(cell, data, config.space.hidden))
        return matched_hidden(name, target, emb_size(config), config.lm.tie_weights)

    def engine_task(self, data: Corpus, batch_size: int) -> LanguageTask:
        return lm_task(self.config, data, batch_size)

    def score(self, model: nn.Module, data: Corpus) -> dict[str, float]:
        return score_lm(model, self.config, data)

    def row_extras(self, model: nn.Module, task: Task, seconds: float, epochs: int) -> dict:
        """The model's width (a matched baseline's differs) and its training throughput, the
        per-epoch validation included (what a user waits for)."""
        tokens = epochs * task.tokens_per_epoch  # type: ignore[attr-defined]
        return {"hidden": model.hidden_size, "train_tokens_per_s": tokens / seconds}
