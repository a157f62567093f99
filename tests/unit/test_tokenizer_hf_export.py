"""Hugging Face export of the unexpanded Llama-2 model, against sentencepiece."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from megatron_ext.tokenizer.hf_export import HFExportError, build_tokenizer, check_exportable
from megatron_ext.tokenizer.sp_proto import parse_model
from tests.helpers import read_texts

TRICKY = [
    "a  b",
    "   three leading",
    "trailing   ",
    "tab\tand\nnewline\n\n",
    "NUL\x00inside",
    "emoji 😀 and 🇸🇦 need bytes",
    "digits 1234567 and ١٢٣",
    "ـــ tatweel and ً tanween",
    "",
    " ",
]


@pytest.fixture(scope="module")
def pair(llama2_tokenizer):
    model = parse_model(llama2_tokenizer.read_bytes())
    return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer)), build_tokenizer(model)


def test_base_model_export_matches_sentencepiece(pair, corpora):
    sp, hf = pair
    texts = TRICKY + read_texts(corpora / "en" / "valid.jsonl")
    texts += read_texts(corpora / "ar" / "valid.jsonl") + read_texts(corpora / "zh" / "train.jsonl")
    texts += read_texts(corpora / "parallel" / "udhr_articles.jsonl")
    got = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert got == sp.encode(texts)
    assert hf.decode_batch(got[: len(TRICKY)], skip_special_tokens=False) == TRICKY


def test_bos_is_prepended_like_llama(pair):
    sp, hf = pair
    assert hf.encode("hello").ids == [sp.bos_id(), *sp.encode("hello")]


def test_unsupported_normalisation_is_refused(llama2_tokenizer):
    model = parse_model(llama2_tokenizer.read_bytes())
    # Rewrite the normalizer spec's name (field 1 of field 3) to nmt_nfkc, as sentencepiece's
    # default models have it.
    raw_norm = next(raw for num, _, raw in model.other_fields if num == 3)
    name = b"identity"
    patched = raw_norm.replace(bytes([0x0A, len(name)]) + name, bytes([0x0A, 8]) + b"nmt_nfkc")
    patched = patched[:1] + bytes([len(patched) - 2]) + patched[2:]
    model.other_fields = [
        (num, wire, patched if num == 3 else raw) for num, wire, raw in model.other_fields
    ]
    assert model.normalizer_spec()["name"] == "nmt_nfkc"
    with pytest.raises(HFExportError, match="nmt_nfkc"):
        check_exportable(model)


def test_user_defined_pieces_are_refused(llama2_tokenizer):
    """Hugging Face cuts the text at added tokens and prepends "▁" to each part: 'a<sep>b'
    would become ▁a <sep> ▁b where sentencepiece gives ▁a <sep> b."""
    from megatron_ext.tokenizer.sp_proto import USER_DEFINED

    model = parse_model(llama2_tokenizer.read_bytes())
    check_exportable(model)
    model.pieces[-1].type = USER_DEFINED
    with pytest.raises(HFExportError, match="user-defined pieces .* not reproduced"):
        check_exportable(model)


def test_pieces_tied_above_the_lowest_score_are_refused(llama2_tokenizer):
    """--method append gives its new pieces one score, and SentencePiece breaks the ties by
    position in the text: tokenizer.json then tokenized 301 of 368 texts otherwise. Export
    looked for expansion.json beside the model, which a copied tokenizer does not have."""
    from megatron_ext.tokenizer.sp_proto import Piece

    model = parse_model(llama2_tokenizer.read_bytes())
    check_exportable(model)  # its 16 whitespace runs share the lowest score, -1e9
    model.pieces += [Piece("▁كتاب", 0.0), Piece("▁قلم", 0.0)]
    with pytest.raises(HFExportError, match=r"2 pieces share scores \('▁كتاب' and '▁قلم' at 0.0\)"):
        check_exportable(model)


def _train(
    tmp_path, model_type: str, vocab_size: int = 40, **options
) -> tuple[spm.SentencePieceProcessor, object]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the cat {i} sat on the mat كتب الولد" for i in range(200)))
    prefix = tmp_path / model_type
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type=model_type, vocab_size=vocab_size,
        normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2, **options,
    )  # fmt: skip
    model_file = prefix.with_suffix(".model")
    return spm.SentencePieceProcessor(model_file=str(model_file)), parse_model(
        model_file.read_bytes()
    )


def test_unknown_characters_fuse_into_one_unk_as_in_sentencepiece(tmp_path):
    """Without byte fallback, a run of unknown characters is one <unk>, in both."""
    sp, model = _train(tmp_path, "bpe", byte_fallback=False)
    hf = build_tokenizer(model)
    for text in ("x😀😀y", "the 😀 cat 漢字漢字 sat"):
        assert hf.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    assert sp.unk_id() in sp.encode("x😀😀y")


def test_a_pair_starts_each_text_with_bos_as_llama_does(pair):
    """Llama-2's LlamaTokenizer: <s> A <s> B (no </s>), each text as sentencepiece splits it."""
    sp, hf = pair
    first, second = sp.encode("Hello world"), sp.encode("كتب الولد")
    expected = [sp.bos_id(), *first, sp.bos_id(), *second]
    assert hf.encode("Hello world", "كتب الولد").ids == expected


def test_only_bpe_models_are_exported(tmp_path):
    _, model = _train(tmp_path, "unigram", vocab_size=300, byte_fallback=True)
    with pytest.raises(HFExportError, match="only BPE models can be exported, not unigram"):
        check_exportable(model)
