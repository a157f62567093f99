"""Tokenizer metrics: fertility, characters and bytes per token, byte fallback, parallel parity.

Words are counted with one Unicode-aware rule for every language (:data:`WORD_RULE`): a word is a
maximal run of letters, digits and combining marks (so Arabic harakat and Devanagari vowel signs
stay inside their word; punctuation and symbols are not words), except that each Han, Hiragana or
Katakana character counts as one word, because those scripts do not separate words with spaces.
Thai has no word separator either and is counted per space-separated phrase, which overstates its
fertility; compare Thai by characters per token.

Every count uses SentencePiece (the reference implementation) without bos/eos.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np

WORD_RULE = (
    "a word is a maximal run of Unicode letters (L*), digits (Nd) and combining marks (M*); "
    "each Han/Hiragana/Katakana character is a word of its own; everything else (spaces, "
    "punctuation, symbols) separates words"
)
_CJK_RANGES = (
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3134F),  # CJK extensions B-G
)


def _ranges(codepoints: list[int]) -> str:
    parts, start, prev = [], None, None
    for cp in codepoints:
        if start is None:
            start = prev = cp
        elif cp == prev + 1:
            prev = cp
        else:
            parts.append((start, prev))
            start = prev = cp
    if start is not None:
        parts.append((start, prev))
    return "".join(
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
        for a, b in parts
    )


@cache
def _word_pattern() -> re.Pattern:
    def cjk(cp: int) -> bool:
        return any(a <= cp <= b for a, b in _CJK_RANGES)

    word_chars = [
        cp
        for cp in range(sys.maxunicode + 1)
        if unicodedata.category(chr(cp))[0] in "LM" or unicodedata.category(chr(cp)) == "Nd"
    ]
    plain = [cp for cp in word_chars if not cjk(cp)]
    marks = [cp for cp in word_chars if unicodedata.category(chr(cp))[0] == "M"]
    cjk_chars = [cp for cp in word_chars if cjk(cp)]
    # A CJK character (with any marks after it) is a word; otherwise runs of word characters.
    return re.compile(f"[{_ranges(cjk_chars)}][{_ranges(marks)}]*|[{_ranges(plain)}]+")


def count_words(text: str) -> int:
    """Words in ``text`` under :data:`WORD_RULE`."""
    return sum(1 for _ in _word_pattern().finditer(text))


@dataclass
class TextMetrics:
    """Totals of one tokenizer on one corpus, and the ratios derived from them."""

    documents: int
    words: int
    whitespace_words: int
    characters: int
    bytes: int
    tokens: int
    byte_tokens: int

    @property
    def fertility(self) -> float:
        """Tokens per word."""
        return self.tokens / max(self.words, 1)

    @property
    def tokens_per_whitespace_word(self) -> float:
        """Tokens per whitespace-separated word (``str.split``), as most papers count."""
        return self.tokens / max(self.whitespace_words, 1)

    @property
    def chars_per_token(self) -> float:
        """Unicode code points per token."""
        return self.characters / max(self.tokens, 1)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token."""
        return self.bytes / max(self.tokens, 1)

    @property
    def byte_fallback_share(self) -> float:
        """Share of tokens that are byte-fallback pieces (``<0xNN>``)."""
        return self.byte_tokens / max(self.tokens, 1)

    def as_dict(self) -> dict:
        """Totals and ratios, JSON-ready."""
        return {
            **asdict(self),
            "fertility": round(self.fertility, 4),
            "tokens_per_whitespace_word": round(self.tokens_per_whitespace_word, 4),
            "chars_per_token": round(self.chars_per_token, 4),
            "bytes_per_token": round(self.bytes_per_token, 4),
            "byte_fallback_share": round(self.byte_fallback_share, 6),
        }


def measure(processor, texts: Sequence[str]) -> TextMetrics:
    """Metrics of a SentencePiece ``processor`` on ``texts``."""
    is_byte = np.array(
        [processor.is_byte(i) for i in range(processor.get_piece_size())], dtype=bool
    )
    tokens = byte_tokens = 0
    for ids in processor.encode(list(texts)):
        tokens += len(ids)
        byte_tokens += int(is_byte[ids].sum()) if ids else 0
    return TextMetrics(
        documents=len(texts),
        words=sum(map(count_words, texts)),
        whitespace_words=sum(len(t.split()) for t in texts),
        characters=sum(map(len, texts)),
        bytes=sum(len(t.encode("utf-8")) for t in texts),
        tokens=tokens,
        byte_tokens=byte_tokens,
    )


def parity(processor, texts_by_lang: dict[str, str], reference: str = "eng") -> dict[str, float]:
    """Tokens of each language's text over tokens of the ``reference`` language's text.

    Raises:
        KeyError: If the reference language is missing.
    """
    counts = {lang: len(processor.encode(text)) for lang, text in texts_by_lang.items()}
    ref = counts[reference]
    return {lang: count / ref for lang, count in counts.items()}


def characters_per_piece(processor) -> np.ndarray:
    """Characters of text each token id stands for, so that ``sum(table[ids])`` counts the text.

    This makes bits per character computable from token ids alone: ``▁`` is the space it
    encodes; a byte-fallback piece counts 1 if it starts a UTF-8 character (not ``0b10xxxxxx``),
    so the pieces of one multi-byte character count 1 together; control and unknown pieces
    (bos, eos) count 0. The only difference from the text is the dummy-prefix space
    SentencePiece adds at the start of each encoded text (one per document).
    """
    table = np.zeros(processor.get_piece_size(), dtype=np.int64)
    for i in range(len(table)):
        if processor.is_control(i) or processor.is_unknown(i):
            continue
        piece = processor.id_to_piece(i)
        if processor.is_byte(i):
            table[i] = int((int(piece[3:5], 16) & 0xC0) != 0x80)
        else:
            table[i] = len(piece)
    return table
