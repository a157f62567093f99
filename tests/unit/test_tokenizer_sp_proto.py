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


def _trained_model(tmp_path, model_type: str) -> bytes:
    """A tiny model of another type, with non-default options, by the reference trainer."""
    corpus = tmp_path / f"{model_type}.txt"
    corpus.write_text("\n".join(f"word{i} يكتب كتابا {i * 7} times" for i in range(300)))
    prefix = tmp_path / model_type
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type=model_type, vocab_size=60,
        character_coverage=0.98, max_sentence_length=2048, split_by_number=False,
        hard_vocab_limit=False,
        add_dummy_prefix=False, remove_extra_whitespaces=False, pad_id=3, unk_piece="<?>",
        split_digits=True, minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model").read_bytes()


@pytest.mark.parametrize("source", ["llama2", "no-specs", "unigram", "word", "char"])
def test_every_spec_field_equals_protobufs_reading(base_bytes, tmp_path, source):
    """Each option read back equals the official protobuf's, defaults included."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    from megatron_ext.tokenizer.sp_proto import _NORMALIZER_FIELDS, _TRAINER_FIELDS

    if source == "llama2":
        data = base_bytes
    elif source == "no-specs":  # a model that leaves every option to the proto's defaults
        reference = pb.ModelProto.FromString(base_bytes)
        reference.trainer_spec.Clear()
        reference.trainer_spec.byte_fallback = True  # else its byte pieces do not load
        reference.normalizer_spec.Clear()
        data = reference.SerializeToString()
    else:
        data = _trained_model(tmp_path, source)
    reference = pb.ModelProto.FromString(data)
    model = parse_model(data)
    for spec, ours, fields in (
        (reference.trainer_spec, model.trainer_spec(), _TRAINER_FIELDS),
        (reference.normalizer_spec, model.normalizer_spec(), _NORMALIZER_FIELDS),
    ):
        for name, kind in fields.values():
            expected = getattr(spec, name)
            if name == "name" and not expected:  # what sentencepiece does without one:
                processor = spm.SentencePieceProcessor()
                processor.LoadFromSerializedProto(data)
                assert "<0xEF>" in processor.encode("Ａ", out_type=str)  # no NFKC: identity
                expected = "identity"
            if kind == "enum":
                expected = pb.TrainerSpec.ModelType.Name(expected).lower()
            elif kind == "float":
                expected = pytest.approx(expected)
            assert ours[name] == expected, name
