"""Expansion of the real Llama-2 tokenizer, checked with sentencepiece as the reference encoder.

Expansions here are small (1,000 pieces from 1,500 Arabic documents, about 2 s) to keep the suite
fast; the 25,000-piece numbers are in docs/benchmarks.md.
"""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import sentencepiece as spm

from megatron_ext.tokenizer.corpus import iter_documents
from megatron_ext.tokenizer.expand import (
    ExpansionConfig,
    ExpansionError,
    expand,
    has_new_script,
    load_base,
    strip_marks,
)
from megatron_ext.tokenizer.hf_export import bpe_merges
from tests.helpers import read_texts

BUDGET = 1000
SPACE = "▁"
ARABIC_SCRIPT = ("arb", "pes", "urd")


def _is_arabic(piece: str) -> bool:
    return any("\u0600" <= c <= "\u06ff" for c in piece)


@pytest.fixture(scope="module")
def base(llama2_tokenizer):
    return load_base(llama2_tokenizer)


@pytest.fixture(scope="module")
def base_sp(llama2_tokenizer):
    return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))


@pytest.fixture(scope="module")
def train_docs(corpora) -> list[str]:
    return list(islice(iter_documents([str(corpora / "ar" / "train.jsonl")]), 1500))


@pytest.fixture(scope="module")
def ours(base, train_docs):
    return expand(base, train_docs, ExpansionConfig(num_new_tokens=BUDGET))


@pytest.fixture(scope="module")
def naive(base, train_docs):
    return expand(base, train_docs, ExpansionConfig(num_new_tokens=BUDGET, method="append"))


@pytest.fixture(scope="module")
def ours_sp(ours):
    return spm.SentencePieceProcessor(model_proto=ours.model.serialize())


def test_budget_is_met_and_sizes_add_up(ours, base):
    assert len(ours.new_pieces) == BUDGET
    assert len(ours.model.pieces) == len(base.pieces) + BUDGET
    assert [p.id for p in ours.new_pieces] == list(range(32000, 32000 + BUDGET))


def test_every_base_piece_is_unchanged(ours_sp, base_sp):
    assert ours_sp.get_piece_size() == 32000 + BUDGET
    for i in range(base_sp.get_piece_size()):
        assert ours_sp.id_to_piece(i) == base_sp.id_to_piece(i)
        assert ours_sp.get_score(i) == base_sp.get_score(i)
        assert ours_sp.is_byte(i) == base_sp.is_byte(i)
        assert ours_sp.is_control(i) == base_sp.is_control(i)
        assert ours_sp.is_unknown(i) == base_sp.is_unknown(i)


def test_english_and_other_scripts_keep_their_ids(ours_sp, base_sp, corpora):
    texts = read_texts(corpora / "en" / "train.jsonl") + read_texts(corpora / "en" / "valid.jsonl")
    texts += read_texts(corpora / "zh" / "train.jsonl")
    udhr = corpora / "parallel" / "udhr.jsonl"
    # Languages in scripts other than Arabic's: no new piece can touch them.
    langs = read_texts(udhr, "lang")
    texts += [
        t for t, lang in zip(read_texts(udhr), langs, strict=True) if lang not in ARABIC_SCRIPT
    ]
    assert ours_sp.encode(texts) == base_sp.encode(texts)


def test_new_pieces_all_carry_a_new_script_character(ours):
    assert all(has_new_script(p.piece) for p in ours.new_pieces)


def test_arabic_gets_much_shorter(ours_sp, base_sp, corpora):
    valid = read_texts(corpora / "ar" / "valid.jsonl")
    base_tokens = sum(map(len, base_sp.encode(valid)))
    ours_tokens = sum(map(len, ours_sp.encode(valid)))
    assert ours_tokens < 0.45 * base_tokens


def test_new_pieces_are_used_by_bpe(ours, ours_sp, train_docs):
    # Scores must make sentencepiece's BPE actually reach the pieces (on the text they were
    # learned from: the documents and their unmarked copies).
    texts = train_docs + [strip_marks(t) for t in train_docs]
    ids = np.concatenate([np.asarray(x) for x in ours_sp.encode(texts)])
    used = np.unique(ids[ids >= 32000]).size
    assert used >= 0.97 * len(ours.new_pieces)


def test_no_stray_space_piece_before_arabic(ours_sp, naive, corpora):
    valid = read_texts(corpora / "ar" / "valid.jsonl")
    space = ours_sp.piece_to_id(SPACE)

    def strays(sp) -> int:
        return sum(
            1
            for ids in sp.encode(valid)
            for a, b in zip(ids, ids[1:], strict=False)
            if a == space and _is_arabic(sp.id_to_piece(b))
        )

    naive_sp = spm.SentencePieceProcessor(model_proto=naive.model.serialize())
    assert strays(naive_sp) > 50  # the failure this guards against is real
    assert strays(ours_sp) == 0


def test_merge_list_grows_with_the_pieces_only(ours, base):
    added = len(bpe_merges(ours.model)) - len(bpe_merges(base))
    multi_char = sum(len(p.piece) > 1 for p in ours.new_pieces)
    assert multi_char <= added <= 1.5 * multi_char


def test_beats_naive_merge_on_undiacritised_text(ours_sp, naive, corpora):
    udhr = corpora / "parallel" / "udhr.jsonl"
    arabic = read_texts(udhr)[read_texts(udhr, "lang").index("arb")]
    naive_sp = spm.SentencePieceProcessor(model_proto=naive.model.serialize())
    assert len(ours_sp.encode(arabic)) < 0.8 * len(naive_sp.encode(arabic))


def test_round_trip_on_all_corpora(ours_sp, corpora):
    files = sorted(corpora.glob("*/*.jsonl"))
    assert len(files) >= 7
    for path in files:
        texts = list(iter_documents([str(path)], skip_bad_lines=True))
        assert texts, path
        assert ours_sp.decode(ours_sp.encode(texts)) == texts, path


def test_bad_lines_file_round_trips_its_usable_lines(ours_sp, corpora):
    texts = list(iter_documents([str(corpora / "edge" / "bad_lines.jsonl")], skip_bad_lines=True))
    assert len(texts) == 7  # edge/README.md: lines 1, 2, 3, 10, 13, 14, 15
    assert ours_sp.decode(ours_sp.encode(texts)) == texts


def test_same_seed_same_model(base, train_docs, ours):
    again = expand(base, train_docs, ExpansionConfig(num_new_tokens=BUDGET))
    assert again.model.serialize() == ours.model.serialize()


def test_budget_above_what_the_corpus_holds(base):
    with pytest.raises(ExpansionError, match="only .* new pieces can be learned"):
        expand(base, ["كتب الولد الدرس"] * 3, ExpansionConfig(num_new_tokens=500))


def test_empty_corpus(base):
    with pytest.raises(ExpansionError, match="no text"):
        expand(base, [], ExpansionConfig(num_new_tokens=10))


def test_strip_marks_removes_harakat_only():
    assert strip_marks("قَالَ رَسُولُ اللَّهِ") == "قال رسول الله"
    assert strip_marks("English stays") == "English stays"


def test_corpus_reader_accepts_compressed_text_files(corpora, tmp_path):
    import gzip

    texts = read_texts(corpora / "edge" / "mixed_script.jsonl")
    with gzip.open(tmp_path / "mixed.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(texts) + "\n")  # blank lines are dropped, not documents
    assert list(iter_documents([str(tmp_path / "*.txt.gz")])) == texts


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_new_tokens": 0}, "--num-new-tokens must be at least 1"),
        ({"method": "merge"}, "--method must be one of gain, append"),
        ({"unmarked_weight": -1}, "--unmarked-weight must be 0 or more"),
        ({"min_frequency": 0}, "--min-frequency must be at least 1"),
        # SentencePiece would fail only after the corpus is read, on an internal check.
        ({"num_threads": 0}, "--threads must be at least 1"),
    ],
)
def test_settings_out_of_range_name_the_flag(settings, message):
    with pytest.raises(ExpansionError, match=message):
        ExpansionConfig(**{"num_new_tokens": 10, **settings}).validate()


def test_a_piece_whose_new_characters_overrun_the_budget_is_passed_over():
    """The budget is filled exactly: a piece that needs a new character too many is skipped, and
    a later one that fits is taken (the selection used to stop there, one piece short, and the
    expansion failed after retraining larger three times)."""
    from megatron_ext.tokenizer.expand import select_pieces
    from megatron_ext.tokenizer.sp_proto import ModelProto, Piece

    base = ModelProto([Piece("▁", 0.0), Piece("ب", -1.0), Piece("ل", -2.0), Piece("ا", -3.0)])
    merges = {"بل": -1.0, "لٍ": -2.0, "با": -3.0}  # "لٍ" needs the new character "ٍ"
    aux = ModelProto([*base.pieces, Piece("ٍ", -4.0), *(Piece(p, s) for p, s in merges.items())])
    built = dict.fromkeys([*merges, "ٍ"], 100)
    chosen = select_pieces(base, aux, built, ExpansionConfig(num_new_tokens=2))
    assert [piece for piece, _ in chosen] == ["بل", "با"]
    chosen = select_pieces(base, aux, built, ExpansionConfig(num_new_tokens=3))
    assert [piece for piece, _ in chosen] == ["بل", "ٍ", "لٍ"]
