"""Preprocessing throughput against the pipeline users run today, measured in the same run.

Baseline (what Megatron-LM's tools/preprocess_data.py does, and writes byte-identical output to):
``multiprocessing.Pool.imap`` over lines with chunks of 32, one ``sentencepiece.encode`` per
document, megatron-core's ``IndexedDatasetBuilder.add_document`` per document. "tokenizer" is
sentencepiece alone encoding the already-parsed texts on one core: the floor.
"""

import json
import multiprocessing
import os

import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_ext.data.preprocess import PreprocessConfig, run_preprocess
from tests.benchmarks.conftest import record
from tests.helpers import read_texts

_SP = None


def _init_baseline(model):
    global _SP
    _SP = spm.SentencePieceProcessor(model_file=model)


def _encode_baseline(line):
    ids = _SP.encode(json.loads(line)["text"])
    return ids + [_SP.eos_id()], len(line)


def baseline(source, model, prefix, workers):
    sp = spm.SentencePieceProcessor(model_file=model)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(sp.vocab_size()))
    context = multiprocessing.get_context("forkserver")
    with (
        open(source, encoding="utf-8") as fin,
        context.Pool(workers, initializer=_init_baseline, initargs=(model,)) as pool,
    ):
        for ids, _ in pool.imap(_encode_baseline, fin, 32):
            builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")


def ours(source, model, prefix, workers):
    run_preprocess(
        PreprocessConfig(
            inputs=[str(source)],
            output_prefix=str(prefix),
            tokenizer_type="Llama2Tokenizer",
            tokenizer_model=str(model),
            append_eod=True,
            workers=workers,
            force=True,
        ),
        progress=False,
    )


@pytest.fixture(scope="module", params=["ar", "en"])
def corpus(request, corpora, llama2_tokenizer):
    source = corpora / request.param / "train.jsonl"
    texts = read_texts(source)
    tokens = sum(
        map(len, spm.SentencePieceProcessor(model_file=str(llama2_tokenizer)).encode(texts))
    )
    return {
        "lang": request.param,
        "source": source,
        "texts": texts,
        "docs": len(texts),
        "tokens": tokens + len(texts),
        "mb": source.stat().st_size / 1e6,
    }


def _throughput(benchmark, corpus, name, workers):
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        docs_per_s=corpus["docs"] / seconds,
        tokens_per_s=corpus["tokens"] / seconds,
        mb_per_s=corpus["mb"] / seconds,
    )
    record(corpus["lang"], name, workers, seconds)


def test_tokenizer_alone(benchmark, corpus, llama2_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    benchmark.pedantic(lambda: [sp.encode(t) for t in corpus["texts"]], rounds=3, iterations=1)
    _throughput(benchmark, corpus, "tokenizer", 1)


@pytest.mark.parametrize("workers", [1, 2])
def test_baseline(benchmark, corpus, llama2_tokenizer, tmp_path, workers):
    benchmark.pedantic(
        baseline,
        args=(corpus["source"], str(llama2_tokenizer), tmp_path / "base", workers),
        rounds=3,
        iterations=1,
    )
    _throughput(benchmark, corpus, "baseline", workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_ours(benchmark, corpus, llama2_tokenizer, tmp_path, workers):
    benchmark.pedantic(
        ours,
        args=(corpus["source"], llama2_tokenizer, tmp_path / "ours", workers),
        rounds=3,
        iterations=1,
    )
    _throughput(benchmark, corpus, "ours", workers)
    base = tmp_path / "base_check"
    baseline(corpus["source"], str(llama2_tokenizer), base, 2)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours_text_document{ext}").read_bytes() == base.with_suffix(
            ext
        ).read_bytes(), "ours and the baseline must write identical bytes"


@pytest.fixture(scope="module")
def large_input(tmp_path_factory, corpora):
    """Eight copies of the Arabic corpus (128 MB): start-up costs no longer hide the scaling."""
    path = tmp_path_factory.mktemp("large") / "ar8.jsonl"
    data = (corpora / "ar" / "train.jsonl").read_bytes()
    with open(path, "wb") as out:
        for _ in range(8):
            out.write(data)
    return path


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_scaling_with_workers(benchmark, large_input, llama2_tokenizer, tmp_path, workers):
    if workers > (os.cpu_count() or 1):
        pytest.skip(f"{workers} workers need {workers} cores; this machine has {os.cpu_count()}")
    benchmark.pedantic(
        ours,
        args=(large_input, llama2_tokenizer, tmp_path / "big", workers),
        rounds=1,
        iterations=1,
    )
    record("ar x8", "ours", workers, benchmark.stats.stats.median)
