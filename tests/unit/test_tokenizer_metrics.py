"""Word counting and tokenizer metrics, against hand counts and sentencepiece."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from megatron_ext.tokenizer.metrics import count_words, measure, parity
from tests.helpers import read_texts


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Hello, world!", 2),
        ("قَالَ رَسُولُ اللَّهِ ﷺ: «إِنَّمَا الأَعْمَالُ»", 6),  # harakat stay inside words
        ("قال رسول الله", 3),
        ("床前明月光，疑是地上霜。", 10),  # one word per Han character
        ("こんにちは、カタカナ", 9),  # and per kana
        ("㐀㐁𠀀", 3),  # rare Han: extensions A and B
        ("नमस्ते दुनिया", 2),  # Devanagari vowel signs and virama are marks
        ("2024 — 3.5 kg", 4),
        ("", 0),
        ("  ...  ", 0),
    ],
)
def test_count_words(text, words):
    assert count_words(text) == words


@pytest.fixture(scope="module")
def sp(llama2_tokenizer):
    return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))


def test_measure_matches_sentencepiece(sp, corpora):
    texts = read_texts(corpora / "edge" / "mixed_script.jsonl") + ["😀 emoji", "plain"]
    m = measure(sp, texts)
    ids = sp.encode(texts)
    assert m.tokens == sum(map(len, ids))
    pieces = [sp.id_to_piece(i) for row in ids for i in row]
    assert m.byte_tokens == sum(p.startswith("<0x") and p.endswith(">") for p in pieces) > 0
    assert m.characters == sum(map(len, texts))
    assert m.bytes == sum(len(t.encode()) for t in texts)
    assert m.fertility == m.tokens / m.words
    words = sum(len(t.split()) for t in texts)  # what papers count: "a\tb\nc" is three
    row = m.as_dict()
    assert row["fertility"] == round(m.tokens / sum(map(count_words, texts)), 4)
    assert row["tokens_per_whitespace_word"] == round(m.tokens / words, 4)
    assert row["chars_per_token"] == round(m.characters / m.tokens, 4)
    assert row["bytes_per_token"] == round(m.bytes / m.tokens, 4)
    assert row["byte_fallback_share"] == round(m.byte_tokens / m.tokens, 6)


def test_parity_is_relative_to_the_reference(sp):
    texts = {"eng": "The cat sat on the mat.", "arb": "جلس القط على الحصيرة."}
    ratios = parity(sp, texts)
    assert ratios["eng"] == 1.0
    assert ratios["arb"] == len(sp.encode(texts["arb"])) / len(sp.encode(texts["eng"]))
    with pytest.raises(KeyError):
        parity(sp, {"arb": "x"})


@pytest.mark.parametrize("lang", ["en", "ar", "zh"])
def test_characters_per_piece_counts_the_text(sp, corpora, lang):
    """Summed over a text's ids, the table gives the text's length (+1: the dummy prefix).

    This is what makes validation bits per character computable from token ids alone; the
    Chinese corpus exercises byte-fallback pieces (one character per UTF-8 lead byte).
    """
    from megatron_ext.tokenizer.metrics import characters_per_piece

    table = characters_per_piece(sp)
    texts = read_texts(corpora / lang / "train.jsonl")[:300]
    ids = sp.encode(texts)
    assert any(sp.is_byte(i) for doc in ids for i in doc) or lang != "zh"
    for text, doc in zip(texts, ids, strict=True):
        assert int(table[doc].sum()) == len(text) + (not text[:1].isspace()), text[:80]
