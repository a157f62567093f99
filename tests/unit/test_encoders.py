"""Our encoders against megatron-core's tokenizer builder (what Megatron-LM's preprocess uses)."""

import argparse

import pytest
from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

from megatron_ext.tokenizer.encoders import TokenizerLoadError, build_encoder
from tests.helpers import read_texts


def megatron_tokenizer(tokenizer_type, model, include_special_tokens=False):
    args = argparse.Namespace(
        tokenizer_type=tokenizer_type,
        tokenizer_model=str(model),
        tokenizer_sentencepiece_legacy=False,
        tokenizer_special_tokens=None,
        tokenizer_metadata=None,
        vocab_file=None,
        merge_file=None,
        tokenizer_hf_use_fast=True,
        trust_remote_code=False,
        tokenizer_hf_include_special_tokens=include_special_tokens,
    )
    return build_tokenizer(args)


@pytest.mark.parametrize(
    "tokenizer_type", ["SentencePieceTokenizer", "Llama2Tokenizer", "GPTSentencePieceTokenizer"]
)
def test_sentencepiece_types_match_megatron_core(tokenizer_type, llama2_tokenizer, corpora):
    ours = build_encoder(tokenizer_type, llama2_tokenizer, num_threads=1)
    reference = megatron_tokenizer(tokenizer_type, llama2_tokenizer)
    texts = read_texts(corpora / "edge" / "mixed_script.jsonl") + ["<s> </s> <EOD> <unk>", ""]
    assert ours.encode_batch(texts) == [reference.tokenize(t) for t in texts]
    assert (ours.eod, ours.vocab_size) == (reference.eod, reference.vocab_size)


def test_huggingface_type_matches_megatron_core(hf_tokenizer_dir, corpora):
    texts = read_texts(corpora / "edge" / "mixed_script.jsonl")
    for include in (False, True):
        ours = build_encoder(
            "HuggingFaceTokenizer", hf_tokenizer_dir, hf_include_special_tokens=include
        )
        reference = megatron_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir, include)
        expected = [reference.tokenize(t) for t in texts]
        assert min(map(len, expected)) > 5
        assert all((e[0] == 1) == include for e in expected)  # <s> only with special tokens
        assert ours.encode_batch(texts) == expected
        assert (ours.eod, ours.vocab_size) == (reference.eod, reference.vocab_size) == (2, 3000)


def test_bad_tokenizer_files_are_named(tmp_path):
    not_a_model = tmp_path / "tokenizer.model"
    not_a_model.write_text("hello")
    with pytest.raises(TokenizerLoadError, match="tokenizer.model: not a SentencePiece model"):
        build_encoder("Llama2Tokenizer", not_a_model)
    with pytest.raises(TokenizerLoadError, match="not found"):
        build_encoder("Llama2Tokenizer", tmp_path / "missing.model")
    with pytest.raises(TokenizerLoadError, match="unknown --tokenizer-type"):
        build_encoder("GPT2BPETokenizer", not_a_model)
