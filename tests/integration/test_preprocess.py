"""End-to-end preprocessing, checked against sentencepiece and megatron-core's readers."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.commands import preprocess as preprocess_cmd
from megatron_ext.commands.options import INPUT_REFUSED
from megatron_ext.data.preprocess import PreprocessConfig, run_preprocess
from megatron_ext.data.sentences import SentenceSplitter
from megatron_ext.outputs import OutputExistsError, OutputHoldsInputError
from tests.helpers import REPO, read_texts


def config(tokenizer, inputs, prefix, **kwargs):
    kwargs.setdefault("append_eod", True)
    return PreprocessConfig(
        inputs=[str(i) for i in inputs],
        output_prefix=str(prefix),
        tokenizer_type="Llama2Tokenizer",
        tokenizer_model=str(tokenizer),
        **kwargs,
    )


def cli_args(source_flag, source, prefix, tokenizer, *extra):
    """Command-line arguments for a Llama2Tokenizer run with EOD and two workers."""
    return [
        source_flag, str(source), "--output-prefix", str(prefix),
        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(tokenizer),
        "--append-eod", "--workers", "2", *extra,
    ]  # fmt: skip


def files_of(prefix, level="document"):
    stem = f"{prefix}_text_{level}"
    return [Path(stem + ext) for ext in (".bin", ".idx", ".stats.json")]


@pytest.mark.parametrize("lang", ["ar", "en", "zh"])
def test_documents_equal_sentencepiece_with_any_worker_count(
    tmp_path, corpora, llama2_tokenizer, lang
):
    source = corpora / lang / "train.jsonl"
    reference = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    # Small blocks so that two workers really interleave.
    for workers in (1, 2):
        run_preprocess(
            config(
                llama2_tokenizer,
                [source],
                tmp_path / f"w{workers}",
                workers=workers,
                block_bytes=1 << 18,
            ),
            progress=False,
        )
    for a, b in zip(files_of(tmp_path / "w1")[:2], files_of(tmp_path / "w2")[:2], strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between 1 and 2 workers"

    dataset = IndexedDataset(str(tmp_path / "w2_text_document"))
    texts = read_texts(source)
    assert len(dataset) == len(texts)
    eos = reference.eos_id()
    for i, expected in enumerate(reference.encode(texts)):
        assert dataset[i].tolist() == expected + [eos], f"document {i} differs"
    stats = json.loads(files_of(tmp_path / "w2")[2].read_text())
    assert stats["documents"] == len(texts)
    assert stats["tokens"] == sum(len(x) for x in reference.encode(texts)) + len(texts)
    assert stats["characters"] == sum(len(t) for t in texts)
    assert stats["dtype"] == "uint16"


def test_huggingface_tokenizer_in_worker_processes(
    tmp_path, corpora, llama2_tokenizer, hf_tokenizer_dir
):
    transformers = pytest.importorskip("transformers")
    hf_dir = hf_tokenizer_dir
    source = corpora / "edge" / "mixed_script.jsonl"
    cfg = config(llama2_tokenizer, [source], tmp_path / "hf_out", workers=2, block_bytes=512)
    cfg.tokenizer_type, cfg.tokenizer_model = "HuggingFaceTokenizer", str(hf_dir)
    cfg.tokenizer_hf_include_special_tokens = True
    run_preprocess(cfg, progress=False)
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    dataset = IndexedDataset(str(tmp_path / "hf_out_text_document"))
    texts = read_texts(source)
    expected = [reference(t)["input_ids"] + [reference.eos_token_id] for t in texts]
    assert min(map(len, expected)) > 5 and all(e[0] == reference.bos_token_id for e in expected)
    assert [d.tolist() for d in dataset] == expected


def test_sentence_level_output(tmp_path, corpora, llama2_tokenizer):
    source = corpora / "en" / "valid.jsonl"
    run_preprocess(
        config(
            llama2_tokenizer,
            [source],
            tmp_path / "s",
            split_sentences=True,
            lang="en",
            punkt_params="untrained",
            workers=2,
        ),
        progress=False,
    )
    dataset = IndexedDataset(str(tmp_path / "s_text_sentence"))
    reference = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    splitter = SentenceSplitter("en", keep_newlines=False, params=None)
    expected_sequences, doc_index = [], [0]
    for text in read_texts(source):
        ids = [x for x in reference.encode(splitter.split(text)) if x]
        ids[-1] = ids[-1] + [reference.eos_id()]
        expected_sequences += ids
        doc_index.append(len(expected_sequences))
    assert [s.tolist() for s in dataset] == expected_sequences
    np.testing.assert_array_equal(dataset.document_indices, doc_index)


def test_learnt_punkt_parameters_are_saved_for_other_shards(
    tmp_path, corpora, llama2_tokenizer, capsys
):
    """Each shard's run learnt its own Punkt parameters from its own first 2 M characters, so
    shards of one corpus split differently, and the learnt ones could not be passed on."""
    source = corpora / "en" / "valid.jsonl"
    argv = cli_args("--input", source, tmp_path / "learnt", llama2_tokenizer)
    assert preprocess_cmd.main([*argv, "--split-sentences", "--lang", "en"]) == 0
    saved = tmp_path / "learnt_punkt.json"
    assert f"Punkt parameters learnt: {saved} " in capsys.readouterr().out
    stats = json.loads(files_of(tmp_path / "learnt", "sentence")[2].read_text())
    assert stats["punkt_params_saved"] == str(saved)
    argv = cli_args("--input", source, tmp_path / "given", llama2_tokenizer, "--split-sentences")
    assert preprocess_cmd.main([*argv, "--lang", "en", "--punkt-params", str(saved)]) == 0
    assert not (tmp_path / "given_punkt.json").exists()
    learnt = files_of(tmp_path / "learnt", "sentence")
    given = files_of(tmp_path / "given", "sentence")
    for a, b in zip(learnt[:2], given[:2], strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{b.name} splits otherwise"
    untrained = cli_args("--input", source, tmp_path / "u", llama2_tokenizer, "--split-sentences")
    assert preprocess_cmd.main([*untrained, "--punkt-params", "untrained"]) == 0
    assert learnt[0].read_bytes() != files_of(tmp_path / "u", "sentence")[0].read_bytes()
    capsys.readouterr()
    for wrong in (tmp_path / "nothere.json", tmp_path):  # a user's to fix: exit 2, not 1
        assert preprocess_cmd.main([*untrained, "--force", "--punkt-params", str(wrong)]) == 2
        assert f"error: --punkt-params {wrong}: cannot read it" in capsys.readouterr().err


def _usable_edge_texts(path):
    """What edge/README.md calls usable, computed here with strict UTF-8 and strict JSON."""
    texts = []
    for raw in path.read_bytes().split(b"\n")[:-1]:
        raw = raw.removeprefix(b"\xef\xbb\xbf").removesuffix(b"\r")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip():
            texts.append(obj["text"])
    return texts


def test_edge_file_skip_mode_writes_exactly_the_usable_documents(
    tmp_path, corpora, llama2_tokenizer
):
    source = corpora / "edge" / "bad_lines.jsonl"
    report = run_preprocess(
        config(llama2_tokenizer, [source], tmp_path / "edge", on_bad_line="skip", workers=2),
        progress=False,
    )["text"]
    usable = _usable_edge_texts(source)
    assert len(usable) == 7  # edge/README.md: lines 1, 2, 3, 10, 13, 14, 15
    assert report["documents"] == 7
    assert report["lines"] == 15
    assert report["skipped"] == {
        "blank_line": 1,
        "empty_document": 2,
        "invalid_json": 2,
        "invalid_utf8": 1,
        "missing_key": 1,
        "not_a_string": 1,
    }
    reference = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    dataset = IndexedDataset(str(tmp_path / "edge_text_document"))
    assert [d.tolist() for d in dataset] == [ids + [2] for ids in reference.encode(usable)]
    assert any("\x00" in t for t in usable)  # the NUL document is kept and tokenized


def test_edge_file_default_mode_names_file_and_line(tmp_path, corpora, llama2_tokenizer, capsys):
    source = corpora / "edge" / "bad_lines.jsonl"
    argv = cli_args("--input", source, tmp_path / "edge", llama2_tokenizer)
    assert preprocess_cmd.main(argv) == INPUT_REFUSED
    err = capsys.readouterr().err
    assert f"{source}:4: invalid JSON" in err
    assert list(tmp_path.iterdir()) == []  # nothing final, nothing temporary


def test_a_lone_surrogate_escape_is_a_bad_line_not_a_crash(tmp_path, llama2_tokenizer, capsys):
    """json.loads accepts "\\ud800"; sentencepiece then failed with a TypeError that named no
    file or line, and --on-bad-line skip could not skip it."""
    source = tmp_path / "web.jsonl"
    source.write_text(
        '{"text": "first"}\n{"text": "bad \\ud800 half"}\n{"text": "emoji \\ud83d\\ude00"}\n'
    )
    argv = cli_args("--input", source, tmp_path / "out" / "web", llama2_tokenizer)
    assert preprocess_cmd.main(argv) == INPUT_REFUSED
    assert f'{source}:2: "text" has a lone surrogate \\ud800' in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # nothing final, nothing temporary
    assert preprocess_cmd.main([*argv, "--on-bad-line", "skip"]) == 0
    out = capsys.readouterr().out
    assert "skipped: lone_surrogate 1" in out
    # A plain run prints what to train on, as a manifest run does.
    assert f"--data-path {tmp_path / 'out' / 'web'}_text_document\n" in out
    reference = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    dataset = IndexedDataset(str(tmp_path / "out" / "web_text_document"))
    expected = reference.encode(["first", "emoji \U0001f600"])
    assert [d.tolist() for d in dataset] == [ids + [2] for ids in expected]


def test_a_run_that_writes_no_document_fails(tmp_path, corpora, llama2_tokenizer, capsys):
    """A typo in --json-keys under --on-bad-line skip wrote an empty dataset, which
    megatron-core cannot open, and exited 0."""
    source = corpora / "ar" / "valid.jsonl"
    argv = cli_args("--input", source, tmp_path / "ar", llama2_tokenizer, "--on-bad-line", "skip")
    assert preprocess_cmd.main([*argv, "--json-keys", "txt"]) == INPUT_REFUSED
    lines = len(source.read_bytes().splitlines())
    assert (
        f"{source}: no document for --json-keys txt in {lines:,} lines (skipped: missing_key "
        f"{lines:,}); nothing written"
    ) in capsys.readouterr().err
    assert list(tmp_path.glob("ar*")) == []


def test_splitting_refuses_an_unknown_language(tmp_path, corpora, llama2_tokenizer, capsys):
    """A typo, or a manifest language named after its corpus, split with the Latin rules only
    (missing Arabic's question mark) without a word."""
    source = corpora / "ar" / "valid.jsonl"
    argv = cli_args("--input", source, tmp_path / "ar", llama2_tokenizer, "--split-sentences")
    assert preprocess_cmd.main([*argv, "--lang", "arabc"]) == INPUT_REFUSED
    assert "--lang: 'arabc' is not a language: give an ISO 639 code" in capsys.readouterr().err
    assert list(tmp_path.glob("ar*")) == []
    manifest = tmp_path / "blend.yaml"
    manifest.write_text(
        f"languages:\n  ar_web: {{inputs: {source}, share: 1}}\n"
        f"  en: {{inputs: {corpora / 'en' / 'valid.jsonl'}, share: 1}}\n"
    )
    argv = cli_args("--manifest", manifest, tmp_path / "mix", llama2_tokenizer, "--split-sentences")
    assert preprocess_cmd.main(argv) == INPUT_REFUSED
    err = capsys.readouterr().err
    assert f"{manifest}: language ar_web: 'ar_web' is not a language" in err
    assert err.rstrip().endswith("; set its lang")
    assert list(tmp_path.glob("mix*")) == []


def test_existing_outputs_need_force(tmp_path, corpora, llama2_tokenizer):
    cfg = config(llama2_tokenizer, [corpora / "zh" / "train.jsonl"], tmp_path / "zh")
    run_preprocess(cfg, progress=False)
    before = {p: p.read_bytes() for p in files_of(tmp_path / "zh")}
    other = config(llama2_tokenizer, [corpora / "en" / "valid.jsonl"], tmp_path / "zh")
    with pytest.raises(OutputExistsError, match="--force"):
        run_preprocess(other, progress=False)
    assert {p: p.read_bytes() for p in before} == before
    other.force = True
    run_preprocess(other, progress=False)
    assert files_of(tmp_path / "zh")[0].read_bytes() != before[files_of(tmp_path / "zh")[0]]


def test_force_never_replaces_an_input(tmp_path, corpora, llama2_tokenizer):
    """An input named like an output was replaced by the run's `.stats.json`."""
    source = tmp_path / "y_text_document.stats.json"
    shutil.copy(corpora / "en" / "valid.jsonl", source)
    cfg = config(llama2_tokenizer, [source], tmp_path / "y")
    cfg.force = True
    with pytest.raises(OutputHoldsInputError, match=f"{source} is the input --input {source}: "):
        run_preprocess(cfg, progress=False)
    assert source.read_bytes() == (corpora / "en" / "valid.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


def _start_and_interrupt(tmp_path, cmd, sig, processes: int = 0):
    """Start ``cmd``, wait until it writes temporary outputs and has started ``processes``,
    then send ``sig``.

    Returns the process and the processes it had started (its workers, the forkserver).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "out").glob("*.tmp.*")):
        time.sleep(0.01)
    while time.time() < deadline and len(_descendants(proc.pid)) < processes:
        time.sleep(0.05)
    time.sleep(0.3)
    started = _descendants(proc.pid)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc, started


def _running(pid: int) -> bool:
    """Not ended (a zombie has ended: only its parent's wait is missing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (Linux's /proc; empty elsewhere)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


@pytest.fixture
def big_run(tmp_path, corpora, llama2_tokenizer):
    big = tmp_path / "big.jsonl"
    big.write_bytes((corpora / "ar" / "train.jsonl").read_bytes() * 3)
    return [
        sys.executable, "-m", "megatron_ext.cli", "preprocess", "--input", str(big),
        "--output-prefix", str(tmp_path / "out" / "ar"), "--tokenizer-type", "Llama2Tokenizer",
        "--tokenizer-model", str(llama2_tokenizer), "--append-eod", "--workers", "2",
    ]  # fmt: skip


def test_sigkill_leaves_no_final_file_and_rerun_succeeds(tmp_path, big_run):
    # The resource tracker, the forkserver and the two workers.
    _, started = _start_and_interrupt(tmp_path, big_run, signal.SIGKILL, processes=4)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left and all(".tmp." in name for name in left), left
    # Nor any of its processes: the workers waited for work forever, and kept the forkserver.
    if Path("/proc").is_dir():
        assert len(started) == 4, started
        deadline = time.time() + 30
        while time.time() < deadline and any(map(_running, started)):
            time.sleep(0.1)
        assert not [pid for pid in started if _running(pid)]

    result = subprocess.run(big_run, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["ar_text_document.bin", "ar_text_document.idx", "ar_text_document.stats.json"]
    assert len(IndexedDataset(str(tmp_path / "out" / "ar_text_document"))) == 3 * 14193


def test_sigterm_exits_cleanly_without_leftovers(tmp_path, big_run):
    proc, _ = _start_and_interrupt(tmp_path, big_run, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list((tmp_path / "out").iterdir()) == []


def test_compressed_and_parquet_inputs_give_identical_bytes(tmp_path, corpora, llama2_tokenizer):
    zstandard = pytest.importorskip("zstandard")
    pa = pytest.importorskip("pyarrow")
    import gzip

    import pyarrow.parquet as pq

    source = corpora / "ar" / "valid.jsonl"
    data = source.read_bytes()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"text": read_texts(source)}), tmp_path / "a.parquet")
    outputs = []
    for name, src in [
        ("plain", source),
        ("gz", tmp_path / "a.jsonl.gz"),
        ("zst", tmp_path / "a.jsonl.zst"),
        ("pq", tmp_path / "a.parquet"),
    ]:
        run_preprocess(config(llama2_tokenizer, [src], tmp_path / name, workers=2), progress=False)
        outputs.append([p.read_bytes() for p in files_of(tmp_path / name)[:2]])
    assert all(o == outputs[0] for o in outputs[1:])


def test_manifest_mistakes_are_named_before_any_work(
    tmp_path, corpora, llama2_tokenizer, capsys, monkeypatch
):
    """A missing input of the last language stopped the run only after the first language's
    dataset, naming a flag no one gave (--input) and leaving an unset $VARIABLE as it was."""
    monkeypatch.delenv("NOPE_DATA", raising=False)
    manifest = tmp_path / "blend.yaml"
    english = corpora / "en" / "valid.jsonl"
    for arabic, message in (
        ("$NOPE_DATA/ar.jsonl", "language ar: input $NOPE_DATA/ar.jsonl: $NOPE_DATA is not set"),
        ("no/ar.jsonl", f"{manifest}: language ar: input {tmp_path}/no/ar.jsonl: no such file"),
    ):
        manifest.write_text(
            f"languages:\n  en: {{inputs: {english}, share: 0.3}}\n"
            f"  ar: {{inputs: {arabic}, share: 0.3}}\n"
        )
        argv = cli_args("--manifest", manifest, tmp_path / "data" / "mix", llama2_tokenizer)
        assert preprocess_cmd.main(argv) == INPUT_REFUSED
        assert message in capsys.readouterr().err
        assert not (tmp_path / "data").exists()
    manifest.write_text(
        f"languages:\n  en: {{inputs: {english}, share: 0.3}}\n"
        f"  ar: {{inputs: {corpora / 'ar' / 'valid.jsonl'}, share: 0.3}}\n"
    )
    assert preprocess_cmd.main(argv) == 0
    out = capsys.readouterr().out
    assert "note: the shares add up to 0.6, read as parts of the whole: en 50.0%, ar 50.0%" in out


def test_manifest_blend_realises_token_shares(tmp_path, corpora, llama2_tokenizer, capsys):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    from tests.unit.test_encoders import megatron_tokenizer

    # English has ~3x the tokens of Arabic valid here, yet must get only a quarter of training.
    manifest = tmp_path / "blend.yaml"
    manifest.write_text(
        "train_tokens: 2000000\n"
        "languages:\n"
        f"  en: {{inputs: [{corpora / 'en' / 'train.jsonl'}], share: 1}}\n"
        f"  ar: {{inputs: [{corpora / 'ar' / 'valid.jsonl'}], share: 3}}\n"
    )
    argv = cli_args("--manifest", manifest, tmp_path / "data" / "mix", llama2_tokenizer)
    assert preprocess_cmd.main(argv) == 0
    out = capsys.readouterr().out
    data_path = re.search(r"^--data-path (.+)$", out, re.M).group(1)
    blend = json.loads((tmp_path / "data" / "mix_blend.json").read_text())
    assert blend["data_path"] == data_path
    assert [e["name"] for e in blend["languages"]] == ["en", "ar"]
    assert [e["weight"] for e in blend["languages"]] == [0.25, 0.75]  # shares 1:3, normalised
    for entry in blend["languages"]:  # the corpus read as often as its share of 2M tokens needs
        index = IndexedDataset(entry["dataset"])  # alive while its memory map is read
        tokens = int(index.sequence_lengths.sum())
        assert entry["epochs"] == pytest.approx(entry["weight"] * 2_000_000 / tokens)

    seq_length, samples = 512, 3000
    gpt_config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=seq_length,
        blend=get_blend_from_list(data_path.split()),
        split="100,0,0",
        tokenizer=megatron_tokenizer("Llama2Tokenizer", llama2_tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    import torch.distributed as dist

    # BlendedDataset asks for the rank, as it would inside a training job.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        train, _, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [samples, 0, 0], lambda: True, gpt_config
        ).build()
    finally:
        dist.destroy_process_group()
    reference = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    tokens = np.zeros(2)
    arabic_fraction = {0: [], 1: []}
    for i in range(samples):
        sample = train[i]
        dataset_id = int(sample["dataset_id"])
        tokens[dataset_id] += sample["tokens"].numel()
        if i % 50 == 0:
            text = reference.decode(sample["tokens"].tolist())
            letters = [c for c in text if c.isalpha()]
            arabic_fraction[dataset_id].append(
                sum("\u0600" <= c <= "\u06ff" for c in letters) / max(len(letters), 1)
            )
    shares = tokens / tokens.sum()
    assert abs(shares[0] - 0.25) < 0.02 and abs(shares[1] - 0.75) < 0.02, shares
    # The weights point at the right corpora: English samples are Latin, Arabic ones Arabic.
    assert max(arabic_fraction[0]) < 0.1 and min(arabic_fraction[1]) > 0.9

    # Re-running keeps complete, matching outputs instead of redoing (or clobbering) them.
    assert preprocess_cmd.main(argv) == 0
    assert capsys.readouterr().out.count("outputs are up to date") == 2


def test_manifest_rerun_rebuilds_nothing_stale_or_damaged(
    tmp_path, corpora, llama2_tokenizer, capsys
):
    """A re-run kept outputs made from an input changed in place (same size), with other
    settings, or cut short, and printed a --data-path to them."""
    english = tmp_path / "en.jsonl"
    english.write_bytes((corpora / "en" / "valid.jsonl").read_bytes())
    manifest = tmp_path / "blend.yaml"
    manifest.write_text(
        f"languages:\n  en: {{inputs: {english}, share: 1}}\n"
        f"  ar: {{inputs: {corpora / 'ar' / 'valid.jsonl'}, share: 3}}\n"
    )
    argv = cli_args("--manifest", manifest, tmp_path / "mix", llama2_tokenizer)
    assert preprocess_cmd.main(argv) == 0
    capsys.readouterr()
    stem = tmp_path / "mix_en_text_document"
    kept = {p: p.read_bytes() for p in files_of(tmp_path / "mix_en")}

    def refused(*extra: str) -> str:
        assert preprocess_cmd.main([*argv, *extra]) == INPUT_REFUSED
        assert {p: p.read_bytes() for p in kept} == kept  # nothing touched
        err = capsys.readouterr().err
        assert f"en: {stem} exists, but " in err
        assert err.rstrip().endswith(f"delete {stem}.bin, .idx and .stats.json to rebuild this "
                                     "language, or pass --force to rebuild them all")  # fmt: skip
        return err

    assert "records other settings: normalize [], now ['nfkc']" in refused("--normalize", "nfkc")
    # No line was bad, so stopping at one or skipping it gives these bytes: nothing refused.
    assert preprocess_cmd.main([*argv, "--on-bad-line", "skip"]) == 0
    assert capsys.readouterr().out.count("outputs are up to date") == 2
    # A .stats.json from before modification times were recorded.
    stats_path = Path(f"{stem}.stats.json")
    stats = json.loads(stats_path.read_text())
    older = {**stats, "inputs": [{k: v for k, v in i.items() if k != "mtime_ns"}
                                 for i in stats["inputs"]]}  # fmt: skip
    stats_path.write_text(json.dumps(older))
    kept[stats_path] = stats_path.read_bytes()
    assert "written by an earlier megatron-ext, which did not record" in refused()
    stats_path.write_text(json.dumps(stats))
    kept[stats_path] = stats_path.read_bytes()
    # The same bytes in another order: same size, newer modification time.
    lines = english.read_bytes().splitlines(keepends=True)
    english.write_bytes(b"".join(reversed(lines)))
    os.utime(english, ns=(os.stat(english).st_atime_ns, os.stat(english).st_mtime_ns + 10**9))
    assert f"records other inputs: {english} has changed since" in refused()
    assert preprocess_cmd.main([*argv, "--force"]) == 0
    assert files_of(tmp_path / "mix_en")[0].read_bytes() != kept[files_of(tmp_path / "mix_en")[0]]
    kept = {p: p.read_bytes() for p in kept}
    with open(f"{stem}.bin", "r+b") as damaged:
        damaged.truncate(1000)
    kept[Path(f"{stem}.bin")] = Path(f"{stem}.bin").read_bytes()
    assert "they are incomplete or damaged" in refused()
    assert preprocess_cmd.main([*argv, "--force"]) == 0
    assert preprocess_cmd.main(argv) == 0
    assert capsys.readouterr().out.count("outputs are up to date") == 2


def test_workers_default_to_the_cores_this_process_may_use():
    """os.cpu_count() is the machine's: hundreds of workers in a Slurm job given a few cores."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two usable cores to tell a one-core affinity from the default")
    probe = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from megatron_ext.commands.preprocess import build_parser\n"
        "print(build_parser().parse_args(['--input', 'x', '--tokenizer-type', "
        "'Llama2Tokenizer', '--tokenizer-model', 'm']).workers)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "1", result.stderr


def test_a_worker_that_dies_is_reported_as_such():
    """A worker killed (by the kernel, for memory) ended the run in a BrokenProcessPool
    traceback."""
    import functools

    from megatron_ext.data.preprocess import WorkerDiedError, ordered_map

    dies = functools.partial(os._exit, 9)  # in the worker, where it builds its function
    with pytest.raises(WorkerDiedError, match="run with fewer than --workers 2"):
        list(ordered_map(dies, [1, 2, 3], workers=2))


def test_clear_errors_for_missing_input_and_bad_tokenizer(tmp_path, corpora, capsys):
    bad_model = tmp_path / "tokenizer.model"
    bad_model.write_text("not a model")
    base = ["--output-prefix", str(tmp_path / "x"), "--tokenizer-type", "Llama2Tokenizer"]
    assert (
        preprocess_cmd.main(
            ["--input", str(tmp_path / "nope.jsonl"), *base, "--tokenizer-model", str(bad_model)]
        )
        == INPUT_REFUSED
    )
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    assert (
        preprocess_cmd.main(
            [
                "--input",
                str(corpora / "zh" / "train.jsonl"),
                *base,
                "--tokenizer-model",
                str(bad_model),
            ]
        )
        == INPUT_REFUSED
    )
    assert "not a SentencePiece model" in capsys.readouterr().err


def test_cli_help_lists_commands_and_flags():
    top = subprocess.run(
        [sys.executable, "-m", "megatron_ext.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "preprocess" in top and "fetch-sample-data" in top
    help_text = subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in (
        "--input",
        "--json-keys",
        "--tokenizer-type",
        "--tokenizer-model",
        "--output-prefix",
        "--append-eod",
        "--split-sentences",
        "--lang",
        "--keep-newlines",
        "--workers",
        "--manifest",
        "--normalize",
        "--on-bad-line",
        "--force",
    ):
        assert flag in help_text, flag
    script = Path(sys.executable).parent / "megatron-ext"
    console = subprocess.run([str(script), "preprocess", "--help"], capture_output=True, text=True)
    assert console.returncode == 0 and "--manifest" in console.stdout


@pytest.mark.slow
def test_memory_does_not_grow_with_input_size(tmp_path, corpora, llama2_tokenizer):
    """Peak RSS for 4x the input stays within a few MB of 1x: inputs are streamed, never held."""
    source = (corpora / "ar" / "train.jsonl").read_bytes()
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to read the peak RSS of one process")
    # VmHWM, not ru_maxrss: the latter keeps the pytest parent's peak across fork and exec.
    probe = (
        "import re, sys\n"
        "from megatron_ext.commands.preprocess import main\n"
        "code = main(sys.argv[1:])\n"
        "status = open('/proc/self/status').read()\n"
        "print('maxrss_kb', re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n"
        "sys.exit(code)\n"
    )
    peaks = {}
    for copies in (1, 4):
        path = tmp_path / f"x{copies}.jsonl"
        path.write_bytes(source * copies)
        result = subprocess.run(
            [sys.executable, "-c", probe, "--input", str(path), "--output-prefix",
             str(tmp_path / f"out{copies}"), "--tokenizer-type", "Llama2Tokenizer",
             "--tokenizer-model", str(llama2_tokenizer), "--append-eod", "--workers", "1"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        peaks[copies] = int(re.search(r"maxrss_kb (\d+)", result.stdout).group(1)) / 1024
    grown = peaks[4] - peaks[1]
    # 48 MB more input (and ~24 MB more token ids) must not show up in memory.
    assert grown < 16, f"peak RSS grew by {grown:.0f} MB ({peaks})"


@pytest.mark.parametrize("pidfd", ["refused", "available"])
def test_a_worker_follows_its_parent_out_without_pidfd(monkeypatch, pidfd):
    """Kernels before 5.3 and some sandboxes refuse pidfd_open: the watch polls instead (it
    used to end its thread with a traceback, leaving the worker to outlive a killed parent)."""
    import errno
    import threading

    from megatron_ext.data import preprocess

    if pidfd == "refused":

        def refused(pid):
            raise OSError(errno.ENOSYS, "Function not implemented")

        monkeypatch.setattr(preprocess.os, "pidfd_open", refused, raising=False)
    exits = []
    monkeypatch.setattr(preprocess.os, "_exit", exits.append)
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    watch = threading.Thread(target=preprocess._exit_after, args=(parent.pid,))
    watch.start()
    watch.join(0.5)
    assert watch.is_alive() and not exits  # the parent still runs: keep working
    parent.wait()
    watch.join(10)
    assert exits == [1]


def test_progress_lines_for_a_log_file(tmp_path, corpora, llama2_tokenizer, capsys):
    """Without a terminal (a Slurm log), progress comes as whole lines, counted right."""
    source = corpora / "en" / "train.jsonl"
    documents = len(read_texts(source))
    cfg = config(llama2_tokenizer, [source], tmp_path / "every", block_bytes=1 << 16)
    run_preprocess(cfg, progress=None, log_interval=documents // 4)
    lines = capsys.readouterr().err.splitlines()
    counts = [int(re.search(r" ([\d,]+) documents", line)[1].replace(",", "")) for line in lines]
    assert len(counts) == 3, lines  # at a quarter, a half and three quarters; the summary ends it
    assert all(k * (documents // 4) <= c < documents for k, c in enumerate(counts, 1)), counts

    cfg.output_prefix = str(tmp_path / "percent")
    run_preprocess(cfg, progress=None)  # pytest's stderr is no terminal: every 5% of the bytes
    lines = capsys.readouterr().err.splitlines()
    shares = [int(re.match(r"preprocess: (\d+)% of", line)[1]) for line in lines]
    assert 10 <= len(shares) < 20 and shares == sorted(shares) and shares[-1] < 100, lines
    cfg.force = True
    run_preprocess(cfg, progress=False)
    assert capsys.readouterr().err == ""


def test_megatron_lm_flags_with_nothing_to_do_are_accepted(
    tmp_path, corpora, llama2_tokenizer, capsys
):
    source = corpora / "en" / "valid.jsonl"
    argv = cli_args("--input", source, tmp_path / "p", llama2_tokenizer, "--no-progress")
    assert preprocess_cmd.main([*argv, "--partitions", "4", "--keep-sequential-samples"]) == 0
    assert "note: --partitions and --keep-sequential-samples are not needed" in (
        capsys.readouterr().out
    )
    with pytest.raises(SystemExit):
        preprocess_cmd.main([*argv, "--workers", "0", "--force"])
    assert "--workers: must be at least 1, got 0" in capsys.readouterr().err
