"""Expand a SentencePiece BPE tokenizer with target-language pieces, keeping every base id.

Method (decisions and measurements in ``docs/tokenizer.md``):

1. Learn target pieces with SentencePiece BPE using the base model's own settings (byte fallback,
   digit splitting, dummy prefix, script and whitespace splitting), on the corpus *and* on a copy
   of it with combining marks removed, counted ``unmarked_weight`` times: diacritised classical
   Arabic then still teaches the plain-letter pieces that undiacritised modern text needs.
2. Take new pieces in BPE merge order, which is greedy by compression (each merge is the pair
   whose fusion removes the most tokens from the corpus at that point), skipping pieces the base
   has, pieces without a non-ASCII letter, mark or digit (so text the base covered, such as
   English, never meets a new piece and keeps its ids), rare pieces (``min_frequency``) and pieces
   BPE could not build from the vocabulary chosen so far; stop at the budget.
3. Append them after the base pieces with scores below every base score, in merge order, so BPE
   applies them in the order they were learned and after every base merge.

``method="append"`` is the Chinese-LLaMA baseline kept for comparison: train ``budget`` pieces on
the corpus as is, append every piece the base lacks with score 0.
"""

from __future__ import annotations

import io
import logging
import sys
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from megatron_ext.tokenizer.encoders import load_sentencepiece
from megatron_ext.tokenizer.sp_proto import (
    BYTE,
    NORMAL,
    ModelProto,
    Piece,
    parse_model,
)

logger = logging.getLogger(__name__)

METHODS = ("gain", "append")
# Lines are cut at spaces into chunks below SentencePiece's max_sentence_length (4192 bytes):
# pieces never cross whitespace, so cutting there loses nothing, while longer lines are dropped.
_CHUNK_BYTES = 2048
# Scores at or below this are sentinels (Llama-2 gives "▁" and "▁▁" -1e9), not merge ranks.
_SENTINEL_SCORE = -1e8
# First aux vocabulary: the budget, plus room for pieces the base already has or that are filtered.
_AUX_SLACK = 1.15
_AUX_RETRIES = 3


class ExpansionError(ValueError):
    """The expansion cannot be done with these inputs (the message says why)."""


@dataclass
class ExpansionConfig:
    """Settings of one expansion.

    Attributes:
        num_new_tokens: Number of pieces to add (the budget).
        method: ``gain`` (ours) or ``append`` (the Chinese-LLaMA baseline).
        unmarked_weight: How many times a copy of the text without combining marks joins the
            training text (0: learn from the text as it is).
        min_frequency: Pieces built fewer times than this on the training text are not added.
        seed: Seed of SentencePiece's trainer.
        num_threads: Trainer and encoder threads.
    """

    num_new_tokens: int
    method: str = "gain"
    unmarked_weight: int = 2
    min_frequency: int = 2
    seed: int = 0
    num_threads: int = 2

    def validate(self) -> None:
        """Raise ``ExpansionError`` for settings out of range."""
        if self.num_new_tokens < 1:
            raise ExpansionError("--num-new-tokens must be at least 1")
        if self.method not in METHODS:
            raise ExpansionError(f"--method must be one of {', '.join(METHODS)}")
        if self.unmarked_weight < 0:
            raise ExpansionError("--unmarked-weight must be 0 or more")
        if self.min_frequency < 1:
            raise ExpansionError("--min-frequency must be at least 1")
        if self.num_threads < 1:
            raise ExpansionError("--threads must be at least 1")


@dataclass
class NewPiece:
    """A piece added to the base model, with how often BPE built it on the training text."""

    id: int
    piece: str
    score: float
    frequency: int


@dataclass
class Expansion:
    """An expanded model and what went into it."""

    model: ModelProto
    base_size: int
    new_pieces: list[NewPiece]
    training: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready description (``expansion.json`` adds inputs and settings)."""
        return {
            "base_size": self.base_size,
            "new_size": len(self.model.pieces),
            "added": len(self.new_pieces),
            "training": self.training,
            "new_pieces": [asdict(p) for p in self.new_pieces],
        }


@cache
def _marks_table() -> dict[int, None]:
    return {cp: None for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Mn"}


def strip_marks(text: str) -> str:
    """``text`` without combining (non-spacing) marks: harakat, niqqud, accents in NFD."""
    return text.translate(_marks_table())


def has_new_script(piece: str) -> bool:
    """Whether ``piece`` has a non-ASCII letter, mark or digit.

    Only such pieces are added: a text made of ASCII, punctuation, symbols and spaces can then
    never meet a new piece, so its ids are those of the base model.
    """
    return any(ord(c) > 127 and unicodedata.category(c)[0] in "LMN" for c in piece)


def training_texts(documents: Iterable[str], unmarked_weight: int) -> list[str]:
    """Lines of ``documents`` in trainer-sized chunks, plus ``unmarked_weight`` unmarked copies.

    Raises:
        ExpansionError: If there is no text at all.
    """
    chunks: list[str] = []
    for doc in documents:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            chunks.extend(_chunk(line))
    if not chunks:
        raise ExpansionError("the corpus has no text")
    if unmarked_weight:
        unmarked = [s for s in map(strip_marks, chunks) if s.strip()]
        chunks += unmarked * unmarked_weight
    return chunks


def _chunk(line: str) -> list[str]:
    if len(line.encode("utf-8")) <= _CHUNK_BYTES:
        return [line]
    chunks, current, size = [], [], 0
    for word in line.split(" "):
        # Byte length bounds: 4 bytes per character at most.
        cost = len(word) * 4 + 1
        if current and size + cost > _CHUNK_BYTES:
            chunks.append(" ".join(current))
            current, size = [], 0
        if cost > _CHUNK_BYTES:
            # One "word" longer than a chunk: split it by characters (no space to cut at).
            step = _CHUNK_BYTES // 4
            chunks.extend(word[i : i + step] for i in range(0, len(word), step))
            continue
        current.append(word)
        size += cost
    if current:
        chunks.append(" ".join(current))
    return chunks


def train_bpe(
    texts: Sequence[str], base: ModelProto, vocab_size: int, seed: int, num_threads: int
) -> bytes:
    """Train a SentencePiece BPE on ``texts`` with the base model's settings.

    Returns:
        The trained model's ``ModelProto`` bytes.

    Raises:
        ExpansionError: If the trainer rejects the corpus (too little text for the vocabulary).
    """
    import sentencepiece as spm

    spec, norm = base.trainer_spec(), base.normalizer_spec()
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=writer,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=spec["character_coverage"],
            byte_fallback=spec["byte_fallback"],
            split_digits=spec["split_digits"],
            split_by_unicode_script=spec["split_by_unicode_script"],
            split_by_whitespace=spec["split_by_whitespace"],
            split_by_number=spec["split_by_number"],
            treat_whitespace_as_suffix=spec["treat_whitespace_as_suffix"],
            allow_whitespace_only_pieces=spec["allow_whitespace_only_pieces"],
            max_sentencepiece_length=spec["max_sentencepiece_length"],
            add_dummy_prefix=norm["add_dummy_prefix"],
            remove_extra_whitespaces=norm["remove_extra_whitespaces"],
            normalization_rule_name=norm["name"],
            unk_id=spec["unk_id"],
            bos_id=spec["bos_id"],
            eos_id=spec["eos_id"],
            pad_id=spec["pad_id"],
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ExpansionError(f"SentencePiece could not learn {vocab_size} pieces: {err}") from err
    return writer.getvalue()


def build_frequencies(aux: ModelProto, aux_bytes: bytes, texts: Sequence[str], threads: int):
    """How many times BPE builds each aux piece while encoding ``texts``.

    A piece is built once for each time it appears in the output and once for each time a longer
    piece is built from it, so the count never grows along a merge path and a ``min_frequency``
    cut keeps every kept piece buildable.
    """
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=aux_bytes)
    counts = np.zeros(len(aux.pieces), dtype=np.int64)
    for start in range(0, len(texts), 4096):
        ids = processor.encode(list(texts[start : start + 4096]), num_threads=threads)
        flat = np.fromiter((i for row in ids for i in row), dtype=np.int64)
        counts += np.bincount(flat, minlength=len(aux.pieces))
    built = {p.piece: int(counts[i]) for i, p in enumerate(aux.pieces)}
    rank = {p.piece: _merge_rank(p) for p in aux.pieces}
    # Latest merges first, so a piece's count is final before it is passed to its parts.
    for p in sorted(aux.pieces, key=lambda p: rank[p.piece]):
        parts = _best_split(p.piece, rank) if p.type == NORMAL and len(p.piece) > 1 else None
        if parts:
            for part in parts:
                built[part] += built[p.piece]
    return built


def _merge_rank(piece: Piece) -> float:
    # Characters exist before any merge: rank them first whatever their score.
    if piece.type != NORMAL or len(piece.piece) == 1:
        return float("inf")
    return piece.score


def _best_split(piece: str, rank: dict[str, float]) -> tuple[str, str] | None:
    """The split of ``piece`` into two earlier pieces that BPE most plausibly merged last."""
    best, best_rank = None, float("-inf")
    own = rank[piece]
    for i in range(1, len(piece)):
        left, right = piece[:i], piece[i:]
        if left in rank and right in rank and min(rank[left], rank[right]) > own:
            r = min(rank[left], rank[right])
            if r > best_rank:
                best, best_rank = (left, right), r
    return best


def select_pieces(
    base: ModelProto, aux: ModelProto, built: dict[str, int], config: ExpansionConfig
) -> list[tuple[str, int]]:
    """New pieces in merge order, with their frequency (see the module docstring)."""
    vocab = {p.piece for p in base.pieces}
    chosen: list[tuple[str, int]] = []
    merges = sorted(
        (p for p in aux.pieces if p.type == NORMAL and len(p.piece) > 1), key=lambda p: -p.score
    )
    for p in merges:
        piece = p.piece
        if piece in vocab or not has_new_script(piece) or built[piece] < config.min_frequency:
            continue
        chars = list(dict.fromkeys(c for c in piece if c not in vocab))
        if not _buildable(piece, vocab | set(chars)):
            continue
        if len(chosen) + len(chars) + 1 > config.num_new_tokens:
            continue  # its new characters overrun the budget: a later piece may still fit
        for c in chars:
            chosen.append((c, built.get(c, 0)))
            vocab.add(c)
        chosen.append((piece, built[piece]))
        vocab.add(piece)
        if len(chosen) == config.num_new_tokens:
            break
    return chosen


def _buildable(piece: str, vocab: set[str]) -> bool:
    return any(piece[:i] in vocab and piece[i:] in vocab for i in range(1, len(piece)))


def _score_floor(base: ModelProto) -> float:
    return min(p.score for p in base.pieces if p.score > _SENTINEL_SCORE)


def merge_pieces(base: ModelProto, chosen: list[tuple[str, int]], method: str) -> Expansion:
    """The base model with ``chosen`` appended (scores per ``method``)."""
    floor = _score_floor(base)
    pieces = list(base.pieces)
    new = []
    for i, (piece, frequency) in enumerate(chosen):
        # float32 holds these integers exactly (|score| stays far below 2**24).
        score = 0.0 if method == "append" else floor - 1.0 - i
        pieces.append(Piece(piece, score, NORMAL))
        new.append(NewPiece(len(pieces) - 1, piece, score, frequency))
    return Expansion(ModelProto(pieces, base.other_fields), len(base.pieces), new)


def load_base(path: str | Path) -> ModelProto:
    """Load and check a base model: a SentencePiece BPE with byte fallback.

    Raises:
        TokenizerLoadError: If the file is not a SentencePiece model.
        ExpansionError: If it is not a BPE model.
    """
    load_sentencepiece(path)  # the reference loader gives the clearest error for a wrong file
    model = parse_model(Path(path).read_bytes())
    if model.trainer_spec()["model_type"] != "bpe":
        raise ExpansionError(
            f"{path}: a {model.trainer_spec()['model_type']} model; expansion merges BPE pieces "
            "and needs a BPE base model (Llama, Mistral)"
        )
    return model


def expand(base: ModelProto, documents: Iterable[str], config: ExpansionConfig) -> Expansion:
    """Expand ``base`` with pieces learned from ``documents``.

    Raises:
        ExpansionError: Empty corpus, or fewer learnable pieces than the budget.
    """
    config.validate()
    started = time.perf_counter()
    weight = 0 if config.method == "append" else config.unmarked_weight
    texts = training_texts(documents, weight)
    if config.method == "append":
        aux_bytes = _train_fitting(texts, base, config.num_new_tokens, config)
        aux = parse_model(aux_bytes)
        built = build_frequencies(aux, aux_bytes, texts, config.num_threads)
        vocab = {p.piece for p in base.pieces}
        chosen = [
            (p.piece, built[p.piece])
            for p in aux.pieces
            if p.type in (NORMAL, BYTE) and p.piece not in vocab
        ]
        vocab_size = config.num_new_tokens
    else:
        chosen, vocab_size = _learn_gain(texts, base, config)
    expansion = merge_pieces(base, chosen, config.method)
    expansion.training = {
        "training_texts": len(texts),
        "training_characters": sum(map(len, texts)),
        "aux_vocab_size": vocab_size,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return expansion


def _learn_gain(
    texts: list[str], base: ModelProto, config: ExpansionConfig
) -> tuple[list[tuple[str, int]], int]:
    budget = config.num_new_tokens
    vocab_size = int(budget * _AUX_SLACK) + _fixed_pieces(base, texts)
    for _ in range(_AUX_RETRIES):
        aux_bytes = _train_fitting(texts, base, vocab_size, config)
        aux = parse_model(aux_bytes)
        built = build_frequencies(aux, aux_bytes, texts, config.num_threads)
        chosen = select_pieces(base, aux, built, config)
        logger.info("selected %d new pieces of %d learned", len(chosen), len(aux.pieces))
        if len(chosen) >= budget:
            return chosen, vocab_size
        if len(aux.pieces) < vocab_size:
            break  # the trainer ran out of merges: a bigger vocabulary cannot help
        vocab_size += int((budget - len(chosen)) * 1.5) + 256
    raise ExpansionError(
        f"only {len(chosen)} new pieces can be learned from this corpus "
        f"(--num-new-tokens {budget}, --min-frequency {config.min_frequency}); "
        "lower the budget or give more text"
    )


def _fixed_pieces(base: ModelProto, texts: Sequence[str]) -> int:
    """Pieces of a trained model that are not merges: specials, bytes and characters."""
    chars = set().union(*map(set, texts[:20000]))
    specials = sum(p.type not in (NORMAL, BYTE) for p in base.pieces)
    return specials + 256 + len(chars)


def _train_fitting(
    texts: Sequence[str], base: ModelProto, vocab_size: int, config: ExpansionConfig
) -> bytes:
    """Train ``vocab_size`` pieces, or as many as the corpus allows."""
    logger.info(
        "training BPE: %d pieces on %d texts (%s characters)",
        vocab_size,
        len(texts),
        f"{sum(map(len, texts)):,}",
    )
    try:
        return train_bpe(texts, base, vocab_size, config.seed, config.num_threads)
    except ExpansionError as err:
        limit = _vocab_limit(str(err))
        if limit is None:
            raise
        return train_bpe(texts, base, limit, config.seed, config.num_threads)


def _vocab_limit(message: str) -> int | None:
    """The largest vocabulary SentencePiece says it can learn, from its error message."""
    marker = "Please set it to a value <= "
    if marker not in message:
        return None
    digits = message.split(marker, 1)[1].split(".", 1)[0].strip()
    return int(digits) if digits.isdigit() else None
