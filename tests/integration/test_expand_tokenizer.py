"""``megatron-ext expand-tokenizer`` and ``tokenizer-report`` end to end, as a user runs them.

The Hugging Face files are checked against sentencepiece on every shared corpus, through the
loaders a transformers user calls (``AutoTokenizer``, ``PreTrainedTokenizerFast``).
"""

from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path

import pytest
import sentencepiece as spm

from megatron_ext.commands import expand_tokenizer, tokenizer_report
from megatron_ext.commands.options import INPUT_REFUSED
from megatron_ext.hashing import sha256_file
from megatron_ext.tokenizer.corpus import iter_documents
from tests.helpers import read_texts

BUDGET = 600


@pytest.fixture(scope="module")
def small_corpus(corpora, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "ar.jsonl"
    with open(corpora / "ar" / "train.jsonl", encoding="utf-8") as src:
        path.write_text("".join(islice(src, 1200)), encoding="utf-8")
    return path


def _expand(base: Path, corpus: Path, out: Path, *extra: str) -> int:
    return expand_tokenizer.main(
        [
            "--base-model", str(base),
            "--corpus", str(corpus),
            "--num-new-tokens", str(BUDGET),
            "--output-dir", str(out),
            *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def expanded(llama2_tokenizer, small_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("expanded") / "tok"
    assert _expand(llama2_tokenizer, small_corpus, out) == 0
    return out


def _all_texts(corpora: Path) -> list[str]:
    texts: list[str] = []
    for path in sorted(corpora.glob("*/*.jsonl")):
        if path.name != "train.jsonl" or path.parent.name != "ar":
            texts += iter_documents([str(path)], skip_bad_lines=True)
    # A slice of the 16 MB Arabic training file keeps the test short.
    texts += islice(iter_documents([str(corpora / "ar" / "train.jsonl")]), 3000)
    return texts


def test_outputs_and_metadata(expanded, llama2_tokenizer, small_corpus):
    names = sorted(p.name for p in expanded.iterdir())
    assert names == [
        "expansion.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    meta = json.loads((expanded / "expansion.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(expanded / "tokenizer.model"))
    assert (meta["base_size"], meta["new_size"], meta["added"]) == (
        32000,
        sp.get_piece_size(),
        BUDGET,
    )
    assert meta["inputs"]["base_model"]["sha256"] == sha256_file(llama2_tokenizer)
    assert meta["inputs"]["corpus"][0]["sha256"] == sha256_file(small_corpus)
    assert meta["settings"]["num_new_tokens"] == BUDGET
    for entry in meta["new_pieces"][:50]:
        assert sp.id_to_piece(entry["id"]) == entry["piece"]
        assert entry["frequency"] >= 2
    assert not list(expanded.parent.glob("*.tmp.*"))


@pytest.mark.parametrize("loader", ["auto", "fast"])
def test_hugging_face_files_agree_with_sentencepiece(expanded, corpora, loader):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if loader == "auto":
        hf = AutoTokenizer.from_pretrained(expanded)
    else:
        hf = PreTrainedTokenizerFast(tokenizer_file=str(expanded / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(expanded / "tokenizer.model"))
    texts = _all_texts(corpora) + ["a  b", "  two leading", "trailing  ", "x\n\n y", "ـــ ً"]
    expected = sp.encode(texts)
    got = hf(texts, add_special_tokens=False)["input_ids"]
    mismatched = [t[:80] for t, a, b in zip(texts, expected, got, strict=True) if a != b]
    assert not mismatched
    assert hf.decode(got[0]) == texts[0]
    assert hf.batch_decode(got[-200:]) == texts[-200:]


def test_hugging_face_special_tokens(expanded):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(expanded)
    sp = spm.SentencePieceProcessor(model_file=str(expanded / "tokenizer.model"))
    text = "قال النبي hello"
    assert hf(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)]
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (
        sp.bos_id(),
        sp.eos_id(),
        sp.unk_id(),
    )
    assert len(hf) == sp.get_piece_size()


def test_same_seed_same_files(expanded, llama2_tokenizer, small_corpus, tmp_path):
    assert _expand(llama2_tokenizer, small_corpus, tmp_path / "again") == 0
    for name in ("tokenizer.model", "tokenizer.json"):
        assert (tmp_path / "again" / name).read_bytes() == (expanded / name).read_bytes()


def test_not_a_sentencepiece_model(small_corpus, tmp_path, capsys):
    fake = tmp_path / "tokenizer.model"
    fake.write_text("this is not a model")
    assert _expand(fake, small_corpus, tmp_path / "out") == INPUT_REFUSED
    assert "not a SentencePiece model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["", '{"text": "   "}\n', '{"text": "قال"}\n' * 5])
def test_empty_or_too_small_corpus(llama2_tokenizer, tmp_path, capsys, content):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text(content, encoding="utf-8")
    assert _expand(llama2_tokenizer, corpus, tmp_path / "out") == INPUT_REFUSED
    err = capsys.readouterr().err
    assert "no text" in err or "new pieces can be learned" in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp.*"))


def test_malformed_line_is_named(llama2_tokenizer, corpora, tmp_path, capsys):
    bad = corpora / "edge" / "bad_lines.jsonl"
    assert _expand(llama2_tokenizer, bad, tmp_path / "out") == INPUT_REFUSED
    assert f"{bad}:4:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(expanded, llama2_tokenizer, small_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(expanded, out)
    (out / "tokenizer.model").write_bytes(b"old")
    assert _expand(llama2_tokenizer, small_corpus, out) == INPUT_REFUSED
    assert "--force" in capsys.readouterr().err
    assert (out / "tokenizer.model").read_bytes() == b"old"
    assert _expand(llama2_tokenizer, small_corpus, out, "--force") == 0
    assert (out / "tokenizer.model").read_bytes() == (expanded / "tokenizer.model").read_bytes()
    # Expanding a tokenizer into its own directory: --force would delete the base first.
    assert _expand(out / "tokenizer.model", small_corpus, out, "--force") == INPUT_REFUSED
    assert f"--output-dir {out} holds the input --base-model" in capsys.readouterr().err
    assert (out / "tokenizer.model").read_bytes() == (expanded / "tokenizer.model").read_bytes()


def test_report(expanded, llama2_tokenizer, corpora, tmp_path):
    out = tmp_path / "report"
    code = tokenizer_report.main(
        [
            "--tokenizer", f"base={llama2_tokenizer}",
            "--tokenizer", f"ours={expanded / 'tokenizer.model'}",
            "--corpus", f"ar={corpora / 'ar' / 'valid.jsonl'}",
            "--corpus", f"en={corpora / 'en' / 'valid.jsonl'}",
            "--parallel", str(corpora / "parallel" / "udhr.jsonl"),
            "--output-dir", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ar | ours |" in (out / "report.md").read_text()
    # Token counts straight from sentencepiece.
    texts = read_texts(corpora / "ar" / "valid.jsonl")
    udhr_path = corpora / "parallel" / "udhr.jsonl"
    udhr = dict(zip(read_texts(udhr_path, "lang"), read_texts(udhr_path), strict=True))
    for name, model in (("base", llama2_tokenizer), ("ours", expanded / "tokenizer.model")):
        sp = spm.SentencePieceProcessor(model_file=str(model))
        tokens = sum(map(len, sp.encode(texts)))
        assert report["corpora"]["ar"][name]["tokens"] == tokens
        assert report["corpora"]["ar"][name]["chars_per_token"] == round(
            sum(map(len, texts)) / tokens, 4
        )
        expected = len(sp.encode(udhr["arb"])) / len(sp.encode(udhr["eng"]))
        assert report["parallel"]["arb"][name]["parity"] == pytest.approx(expected, abs=1e-4)
    assert (
        report["parallel"]["eng"]["ours"]["tokens"] == report["parallel"]["eng"]["base"]["tokens"]
    )
    assert (
        report["corpora"]["ar"]["ours"]["fertility"]
        < report["corpora"]["ar"]["base"]["fertility"] / 2
    )


def test_report_normalizes_as_preprocess_does(expanded, corpora, tmp_path, capsys):
    """--normalize counts the tokens preprocess --normalize writes, and a tokenizer expanded
    with another normalisation than the report's is named."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.commands import preprocess

    model, valid = expanded / "tokenizer.model", corpora / "ar" / "valid.jsonl"
    preprocess_argv = ["--input", str(valid), "--tokenizer-type", "Llama2Tokenizer"]
    preprocess_argv += ["--tokenizer-model", str(model), "--no-progress", "--normalize", "arabic"]
    assert preprocess.main([*preprocess_argv, "--output-prefix", str(tmp_path / "ar")]) == 0
    dataset = IndexedDataset(str(tmp_path / "ar_text_document"))  # its arrays view its mmap
    written = int(dataset.sequence_lengths.sum())

    def report(out: str, *normalize: str) -> dict:
        argv = ["--tokenizer", f"ours={model}", "--corpus", f"ar={valid}", *normalize]
        argv += ["--parallel", str(corpora / "parallel" / "udhr.jsonl")]
        assert tokenizer_report.main([*argv, "--output-dir", str(tmp_path / out)]) == 0
        return json.loads((tmp_path / out / "report.json").read_text())

    normalized = report("normalized", "--normalize", "arabic")
    assert normalized["normalize"] == ["arabic"]
    assert normalized["corpora"]["ar"]["ours"]["tokens"] == written  # preprocess adds no EOD here
    assert (
        "--tokenizer ours was expanded with --normalize (none) but this report measures text "
        "normalised with arabic" in capsys.readouterr().err
    )
    raw = report("raw")
    assert "warning" not in capsys.readouterr().err  # as expanded
    # The sample's Arabic has alef variants and harakat that the normalisation removes.
    assert raw["corpora"]["ar"]["ours"]["tokens"] != written
    assert raw["parallel"]["eng"] == normalized["parallel"]["eng"]

    learnt_normalized = tmp_path / "learnt_normalized"
    shutil.copytree(expanded, learnt_normalized)
    summary = json.loads((learnt_normalized / "expansion.json").read_text())
    summary["settings"]["normalize"] = ["nfkc", "arabic"]
    (learnt_normalized / "expansion.json").write_text(json.dumps(summary))
    model = learnt_normalized / "tokenizer.model"
    report("raw2")
    assert (
        "--tokenizer ours was expanded with --normalize nfkc arabic but this report measures text "
        "normalised with (none)" in capsys.readouterr().err
    )


def test_report_names_the_flag_of_a_bad_input(llama2_tokenizer, corpora, tmp_path, capsys):
    corpus = f"ar={corpora / 'ar' / 'valid.jsonl'}"

    def report(*args):
        argv = [*args, "--output-dir", str(tmp_path / "report")]
        return tokenizer_report.main(argv)

    # Two tokenizers under one name: the report would hold one of them without a word.
    twice = [f"base={llama2_tokenizer}"] * 2
    refused = report("--tokenizer", twice[0], "--tokenizer", twice[1], "--corpus", corpus)
    assert refused == INPUT_REFUSED
    assert "--tokenizer: the name 'base' is given twice" in capsys.readouterr().err
    refused = report("--tokenizer", twice[0], "--corpus", f"ar={tmp_path / 'nope.jsonl'}")
    assert refused == INPUT_REFUSED
    assert f"--corpus {tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_report_refuses_bad_parallel_lines_and_empty_text(llama2_tokenizer, tmp_path, capsys):
    """Read as --corpus is: file:line for a malformed line, not a traceback; and no fertility
    or parity from no text (they would read 0, or divide by it)."""

    def report(*args):
        argv = ["--tokenizer", f"base={llama2_tokenizer}", *args, "--force"]
        return tokenizer_report.main([*argv, "--output-dir", str(tmp_path / "report")])

    parallel = tmp_path / "parallel.jsonl"
    good = ['{"lang": "eng", "text": "All human beings"}', '{"lang": "arb", "text": "يولد"}']
    for bad_line, message in (
        ('{"lang": "arb", "text": 123}', '"text" is a int, not a string'),
        ('["arb", "text"]', "a JSON list, not an object"),
        ('{"text": "x"}', 'no "lang" key'),
    ):
        parallel.write_text("\n".join([*good, bad_line]) + "\n", encoding="utf-8")
        assert report("--parallel", str(parallel)) == INPUT_REFUSED
        assert f"{parallel}:3: {message} (pass --on-bad-line skip" in capsys.readouterr().err
        assert report("--parallel", str(parallel), "--on-bad-line", "skip") == 0
        capsys.readouterr()
    parallel.write_bytes(b'{"lang": "eng", "text": "a"}\n{"lang": "arb", "text": "\xff"}\n')
    assert report("--parallel", str(parallel)) == INPUT_REFUSED
    assert f"{parallel}:2: invalid UTF-8" in capsys.readouterr().err
    parallel.write_text('{"lang": "eng", "text": " "}\n{"lang": "arb", "text": "x"}\n')
    assert report("--parallel", str(parallel)) == INPUT_REFUSED
    assert "no text in the reference language 'eng'" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert report("--corpus", f"ar={empty}") == INPUT_REFUSED
    assert f"--corpus ar={empty}: no text" in capsys.readouterr().err


def test_append_method_writes_no_hugging_face_files(llama2_tokenizer, small_corpus, tmp_path):
    """Its new pieces share one score: tokenizer.json's merges would break the ties otherwise
    than sentencepiece does (a reviewer counted 301 of 368 texts tokenized differently)."""
    out = tmp_path / "append"
    assert _expand(llama2_tokenizer, small_corpus, out, "--method", "append") == 0
    assert (out / "tokenizer.model").exists() and (out / "expansion.json").exists()
    assert not (out / "tokenizer.json").exists()
