"""The ModelProto codec against sentencepiece itself (the reference reader of these files)."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from megatron_ext.tokenizer.sp_proto import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    ModelProto,
    ModelProtoError,
    Piece,
    parse_model,
)


@pytest.fixture(scope="module")
def base_bytes(llama2_tokenizer) -> bytes:
    return llama2_tokenizer.read_bytes()


def test_round_trip_is_byte_identical(base_bytes):
    assert parse_model(base_bytes).serialize() == base_bytes


def test_pieces_match_sentencepiece(base_bytes, llama2_tokenizer):
    model = parse_model(base_bytes)
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    assert len(model.pieces) == sp.get_piece_size()
    for i, p in enumerate(model.pieces):
        assert p.piece == sp.id_to_piece(i)
        assert p.score == sp.get_score(i)
        assert (p.type == UNKNOWN) == sp.is_unknown(i)
        assert (p.type == CONTROL) == sp.is_control(i)
        assert (p.type == BYTE) == sp.is_byte(i)


def test_specs_match_sentencepiece(base_bytes, llama2_tokenizer):
    model = parse_model(base_bytes)
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    spec = model.trainer_spec()
    assert spec["model_type"] == "bpe"
    assert (spec["unk_id"], spec["bos_id"], spec["eos_id"], spec["pad_id"]) == (
        sp.unk_id(),
        sp.bos_id(),
        sp.eos_id(),
        sp.pad_id(),
    )
    assert spec["vocab_size"] == sp.get_piece_size()
    # Byte fallback and digit splitting, observed through the reference encoder.
    assert spec["byte_fallback"] == any(sp.is_byte(i) for i in sp.encode("\U0001f600"))
    assert spec["split_digits"] == (len(sp.encode("12345", out_type=str)) >= 5)
    norm = model.normalizer_spec()
    assert norm["add_dummy_prefix"] == sp.encode("a", out_type=str)[0].startswith("▁")


def test_appended_piece_is_loaded_by_sentencepiece(base_bytes):
    model = parse_model(base_bytes)
    merged = ModelProto([*model.pieces, Piece("▁zzqx", -40000.0, NORMAL)], model.other_fields)
    sp = spm.SentencePieceProcessor(model_proto=merged.serialize())
    assert sp.get_piece_size() == len(model.pieces) + 1
    assert sp.piece_to_id("▁zzqx") == len(model.pieces)
    assert sp.get_score(len(model.pieces)) == -40000.0


@pytest.mark.parametrize("data", [b"", b"\x00\x01\x02", b"not a model at all", b"\x0a\xff\xff"])
def test_garbage_is_rejected(data):
    with pytest.raises(ModelProtoError):
        parse_model(data)
