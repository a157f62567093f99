"""Corpus -> Megatron indexed dataset, fast and safe.

The main process reads inputs in blocks of whole lines and hands them to worker processes, at most
a few blocks ahead (memory stays bounded). A worker parses a block, normalises and optionally
splits the documents into sentences, encodes them all with one batched tokenizer call, and returns
NumPy arrays (tokens, sequence lengths, sequences per document) with the block's statistics. The
main process writes results in input order, so the bytes do not depend on the number of workers.

Outputs per JSON key: ``{prefix}_{key}_{document|sentence}.bin/.idx`` and ``.stats.json``, written
under temporary names and renamed only when the whole run succeeded.
"""

from __future__ import annotations

import functools
import itertools
import json
import multiprocessing
import os
import select
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_ext.data.indexed import (
    IndexedDatasetWriter,
    token_dtype,
)
from megatron_ext.data.provenance import outputs_made_from
from megatron_ext.data.readers import (
    BAD_LINE_REASONS,
    DEFAULT_BLOCK_BYTES,
    EMPTY_DOCUMENT,
    BadField,
    InputError,
    RawBlock,
    expand_inputs,
    input_format,
    iter_blocks,
    parse_block,
)
from megatron_ext.data.sentences import (
    PUNKT_TRAIN,
    PUNKT_UNTRAINED,
    SentenceSplitter,
    check_language,
    language_code,
    load_punkt_params,
    save_punkt_params,
    train_punkt,
)
from megatron_ext.outputs import AtomicOutputs, pid_alive, refuse_output_over_input
from megatron_ext.tokenizer.encoders import TextEncoder, build_encoder
from megatron_ext.tokenizer.normalize import build_normalizer

ON_BAD_LINE = ("error", "skip")


@dataclass
class PreprocessConfig:
    """Everything one preprocessing run needs (Megatron-LM's flag names, snake_cased).

    Attributes:
        inputs: Files or globs.
        output_prefix: Outputs are ``{output_prefix}_{key}_{level}.{bin,idx,stats.json}``.
        tokenizer_type: A Megatron ``--tokenizer-type`` (see ``tokenizer.encoders``).
        tokenizer_model: SentencePiece model file or Hugging Face tokenizer directory.
        tokenizer_hf_include_special_tokens: Hugging Face tokenizers: add their special tokens.
        json_keys: Keys to extract; one dataset per key. Plain-text inputs allow one key.
        append_eod: Append the tokenizer's end-of-document id to each document.
        split_sentences: One sequence per sentence (level ``sentence``) instead of per document.
        lang: Language for sentence splitting (``en``, ``ar``, ``zh``, NLTK names).
        keep_newlines: Keep the whitespace after each sentence when splitting.
        punkt_params: ``train`` (learn from the first ``punkt_train_bytes`` of input),
            ``untrained``, or a JSON file written by ``sentences.save_punkt_params``.
        punkt_train_bytes: Characters of input text to train Punkt on.
        normalize: Normalisers to apply before tokenizing (``nfkc``, ``arabic``).
        on_bad_line: ``error`` stops at the first bad line; ``skip`` counts and skips it.
        workers: Worker processes (1 encodes in this process).
        force: Overwrite existing outputs.
        block_bytes: Bytes of input per block of work.
    """

    inputs: list[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    tokenizer_hf_include_special_tokens: bool = False
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    split_sentences: bool = False
    lang: str = "english"
    keep_newlines: bool = False
    punkt_params: str = PUNKT_TRAIN
    punkt_train_bytes: int = 2_000_000
    normalize: list[str] = field(default_factory=list)
    on_bad_line: str = "error"
    workers: int = 1
    force: bool = False
    block_bytes: int = DEFAULT_BLOCK_BYTES

    @property
    def level(self) -> str:
        """``sentence`` when splitting sentences, else ``document`` (Megatron's naming)."""
        return "sentence" if self.split_sentences else "document"

    def output_stem(self, key: str) -> str:
        """``{prefix}_{key}_{level}``: the path Megatron's ``--data-path`` takes."""
        return f"{self.output_prefix}_{key}_{self.level}"


@dataclass
class DatasetStats:
    """What one output dataset holds and what was dropped on the way."""

    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    characters: int = 0
    bytes: int = 0
    lines: int = 0
    skipped: Counter = field(default_factory=Counter)

    def merge(self, other: DatasetStats) -> None:
        """Add another block's counts to these."""
        for name in ("documents", "sequences", "tokens", "characters", "bytes", "lines"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)


class BadLineError(InputError):
    """A malformed input line while ``on_bad_line`` is ``error``."""


class WorkerDiedError(RuntimeError):
    """A worker process ended without a result (killed, most often for lack of memory)."""


@dataclass
class _EncodedBlock:
    path: str
    consumed: int
    error: tuple[int, str] | None
    tokens: dict[str, np.ndarray] = field(default_factory=dict)
    sequence_lengths: dict[str, np.ndarray] = field(default_factory=dict)
    sequences_per_document: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, DatasetStats] = field(default_factory=dict)


@dataclass
class _BlockEncoder:
    """The per-worker state: tokenizer, normaliser, splitter, settings."""

    keys: list[str]
    encoder: TextEncoder
    dtype: type[np.number]
    append_eod: bool
    strict: bool
    normalize: Callable[[str], str] | None
    splitter: SentenceSplitter | None

    def __call__(self, block: RawBlock) -> _EncodedBlock:
        records = list(parse_block(block, self.keys))
        out = _EncodedBlock(block.path, block.consumed, None)
        if self.strict:
            for line, fields in records:
                bad = next(
                    (f for f in fields if isinstance(f, BadField) and f.reason in BAD_LINE_REASONS),
                    None,
                )
                if bad is not None:
                    out.error = (line, bad.message)
                    return out
        for i, key in enumerate(self.keys):
            self._encode_key(out, key, [(line, fields[i]) for line, fields in records])
        return out

    def _encode_key(
        self, out: _EncodedBlock, key: str, fields: list[tuple[int, str | BadField]]
    ) -> None:
        stats = DatasetStats(lines=len(fields))
        texts: list[str] = []
        for _, value in fields:
            if isinstance(value, BadField):
                stats.skipped[value.reason] += 1
                continue
            if self.normalize is not None:
                value = self.normalize(value)
            if value.strip():
                texts.append(value)
            else:
                stats.skipped[EMPTY_DOCUMENT] += 1
        if self.splitter is not None:
            sentences = [self.splitter.split(t) for t in texts]
            sentences_per_doc = np.fromiter(map(len, sentences), np.int64, len(sentences))
            pieces = list(itertools.chain.from_iterable(sentences))
        else:
            sentences_per_doc = np.ones(len(texts), np.int64)
            pieces = texts
        ids = self.encoder.encode_batch(pieces)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, int(lengths.sum()))

        # Megatron drops empty sentences and documents that end up with no token at all.
        doc_of_piece = np.repeat(np.arange(len(texts)), sentences_per_doc)
        kept = lengths > 0
        doc_tokens = np.bincount(doc_of_piece, weights=lengths, minlength=len(texts)).astype(
            np.int64
        )
        sequences = np.bincount(doc_of_piece[kept], minlength=len(texts)).astype(np.int64)
        has_tokens = doc_tokens > 0
        if not has_tokens.all():
            stats.skipped[EMPTY_DOCUMENT] += int((~has_tokens).sum())
        lengths, sequences, doc_tokens = (
            lengths[kept],
            sequences[has_tokens],
            doc_tokens[has_tokens],
        )
        kept_texts = [t for t, keep in zip(texts, has_tokens, strict=True) if keep]

        if self.append_eod and sequences.size:
            tokens = np.insert(tokens, np.cumsum(doc_tokens), self.dtype(self.encoder.eod))
            lengths[np.cumsum(sequences) - 1] += 1
        stats.documents = int(sequences.size)
        stats.sequences = int(lengths.size)
        stats.tokens = int(tokens.size)
        stats.characters = sum(map(len, kept_texts))
        stats.bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in kept_texts)
        out.tokens[key] = tokens
        out.sequence_lengths[key] = lengths
        out.sequences_per_document[key] = sequences
        out.stats[key] = stats

    @classmethod
    def build(
        cls, config: PreprocessConfig, dtype: type[np.number], splitter: SentenceSplitter | None
    ) -> _BlockEncoder:
        """The state of one worker (each process loads its own tokenizer, one thread)."""
        return cls(
            keys=list(config.json_keys),
            encoder=_build_encoder(config, num_threads=1),
            dtype=dtype,
            append_eod=config.append_eod,
            strict=config.on_bad_line == "error",
            normalize=build_normalizer(config.normalize),
            splitter=splitter,
        )


_WORKER: _BlockEncoder | None = None


def _init_worker(factory: Callable[[], _BlockEncoder], parent: int) -> None:
    global _WORKER
    threading.Thread(target=_exit_after, args=(parent,), daemon=True).start()
    _WORKER = factory()


def _exit_after(pid: int) -> None:
    """End this worker once process ``pid`` has ended.

    A pool's process killed with -9 cannot stop its workers: they would wait for work forever,
    and keep the forkserver (which lives while any of its children do) alive with them.
    """
    try:  # Linux 5.3 on: woken when it exits, whatever its pid becomes
        select.select([os.pidfd_open(pid)], [], [])
    except ProcessLookupError:
        pass  # gone already
    except (AttributeError, OSError):  # no pidfd here (older kernels, macOS, some sandboxes)
        while pid_alive(pid):
            time.sleep(1.0)
    os._exit(1)


def _run_worker(block: RawBlock) -> _EncodedBlock:
    assert _WORKER is not None
    return _WORKER(block)


def ordered_map(
    factory: Callable[[], Callable], items: Iterable, workers: int, ahead: int = 2
) -> Iterator:
    """``map`` over ``items`` in ``workers`` processes, results in input order.

    At most ``ahead * workers`` items are in flight, so a huge input never queues up in memory
    (``Pool.imap`` would read it all). ``factory`` builds the per-process function once.
    """
    if workers <= 1:
        fn = factory()
        yield from map(fn, items)
        return
    # Never fork this process: it may hold threads (torch, tqdm) whose locks a child would
    # inherit mid-use and deadlock on. forkserver forks workers from a clean, single-threaded
    # server that has the pipeline's modules imported once. ProcessPoolExecutor, not
    # multiprocessing.Pool: under forkserver, Pool's worker-handler thread polls the workers'
    # sentinels in a busy loop and takes the GIL from this process (profiled: 2 million polls
    # in one run, 1.4x instead of 2x from the second worker).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(factory, os.getpid())
    ) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(_run_worker, item))
                if len(pending) >= ahead * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as err:
            raise WorkerDiedError(
                f"a worker process died ({err}); when the kernel ends processes for lack of "
                f"memory (see dmesg), run with fewer than --workers {workers}"
            ) from err


def _build_encoder(config: PreprocessConfig, num_threads: int = -1) -> TextEncoder:
    return build_encoder(
        config.tokenizer_type,
        config.tokenizer_model,
        num_threads=num_threads,
        hf_include_special_tokens=config.tokenizer_hf_include_special_tokens,
    )


def _punkt_params(config: PreprocessConfig, files: list[str]):
    """Punkt parameters for ``config.punkt_params`` (None for untrained)."""
    if config.punkt_params == PUNKT_UNTRAINED or language_code(config.lang) in ("zh", "ja"):
        return None
    if config.punkt_params != PUNKT_TRAIN:
        return load_punkt_params(config.punkt_params)
    normalize = build_normalizer(config.normalize)

    def sample() -> Iterator[str]:
        budget = config.punkt_train_bytes
        for path in files:
            for block in iter_blocks(path, config.block_bytes):
                for _, fields in parse_block(block, config.json_keys[:1]):
                    text = fields[0]
                    if isinstance(text, BadField):
                        continue
                    text = normalize(text) if normalize else text
                    yield text[:budget]
                    budget -= len(text)
                    if budget <= 0:
                        return

    return train_punkt(sample(), config.lang)


def _validate(config: PreprocessConfig, files: list[str], encoder: TextEncoder) -> None:
    if config.on_bad_line not in ON_BAD_LINE:
        raise ValueError(f"--on-bad-line must be one of {', '.join(ON_BAD_LINE)}")
    if config.workers < 1:
        raise ValueError("--workers must be at least 1")
    if not config.json_keys:
        raise ValueError("--json-keys needs at least one key")
    text_files = [f for f in files if input_format(f)[0] == "txt"]
    if text_files and len(config.json_keys) > 1:
        raise InputError(f"{text_files[0]}: plain-text input has one field; give one --json-keys")
    if config.split_sentences:
        try:
            check_language(config.lang)
        except ValueError as err:
            raise ValueError(f"--lang: {err}") from err
    if config.append_eod and encoder.eod < 0:
        raise ValueError(f"{config.tokenizer_model}: the tokenizer has no end-of-document token")
    build_normalizer(config.normalize)
    # --force replaces outputs: never one that is an input too.
    inputs = [
        *(("--input", f) for f in files),
        ("--tokenizer-model", config.tokenizer_model),
        ("--punkt-params", config.punkt_params),
    ]
    outputs = [p for group in output_paths(config).values() for p in group]
    for output in filter(None, [*outputs, punkt_output_path(config)]):
        named = f"--output-prefix {config.output_prefix}: {output}"
        refuse_output_over_input(output, named, inputs)


def punkt_output_path(config: PreprocessConfig) -> Path | None:
    """``{prefix}_punkt.json``, where a run saves the Punkt parameters it learns.

    Another shard's run given them (``--punkt-params``) splits as this one did. None when the run
    learns none.
    """
    learns = config.split_sentences and config.punkt_params == PUNKT_TRAIN
    if not learns or language_code(config.lang) in ("zh", "ja"):
        return None
    return Path(f"{config.output_prefix}_punkt.json")


def output_paths(config: PreprocessConfig) -> dict[str, tuple[Path, Path, Path]]:
    """``{key: (.bin, .idx, .stats.json)}`` for a run."""
    return {
        key: tuple(Path(config.output_stem(key) + ext) for ext in (".bin", ".idx", ".stats.json"))
        for key in config.json_keys
    }


class ProgressLines:
    """Progress as whole lines on stderr, for a log file (a Slurm job's) that a bar would garble.

    A line every ``every_documents`` documents (Megatron-LM's ``--log-interval``), or else every
    5% of the input bytes; none at the end, where the summary says it all.
    """

    def __init__(self, total_bytes: int, every_documents: int | None = None) -> None:
        self.total_bytes = total_bytes
        self.every_documents = every_documents
        self.bytes = 0
        self.documents = 0
        self.started = time.perf_counter()
        self._next = every_documents or total_bytes / 20

    def update(self, consumed_bytes: int, documents: int) -> None:
        """Count a block's bytes and documents; print a line when one is due."""
        self.bytes += consumed_bytes
        self.documents += documents
        done = self.documents if self.every_documents else self.bytes
        if done < self._next or self.bytes >= self.total_bytes:
            return
        while self._next <= done:
            self._next += self.every_documents or self.total_bytes / 20
        seconds = max(time.perf_counter() - self.started, 1e-9)
        speed = self.bytes / seconds
        left = (self.total_bytes - self.bytes) / speed if speed else 0.0
        print(
            f"preprocess: {self.bytes / max(self.total_bytes, 1):.0%} of "
            f"{self.total_bytes / 1e6:,.1f} MB, {self.documents:,} documents "
            f"({self.documents / seconds:,.0f} docs/s, {speed / 1e6:,.1f} MB/s), "
            f"{seconds:,.0f} s, about {left:,.0f} s left",
            file=sys.stderr,
            flush=True,
        )


def _progress_report(total_bytes: int, progress: bool | None, log_interval: int | None):
    """``update(bytes, documents)`` for the chosen display, and the bar to close (or None)."""
    from tqdm import tqdm

    on_terminal = sys.stderr.isatty()
    if progress is not False and (log_interval or (progress is None and not on_terminal)):
        return ProgressLines(total_bytes, log_interval).update, None
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess",
               disable=not (progress or on_terminal))  # fmt: skip
    return (lambda consumed, _documents: bar.update(consumed)), bar


def run_preprocess(
    config: PreprocessConfig, progress: bool | None = None, log_interval: int | None = None
) -> dict[str, dict]:
    """Tokenize ``config.inputs`` into one indexed dataset per JSON key.

    Args:
        config: The run's settings.
        progress: True: a tqdm bar; False: nothing; None: a bar on a terminal, otherwise
            lines (``ProgressLines``).
        log_interval: Lines every this many documents instead (unless ``progress`` is False).

    Returns:
        ``{key: stats}``: the content of each ``.stats.json``.

    Raises:
        InputError: Missing or unreadable inputs, or a bad line while ``on_bad_line="error"``
            (the message starts with ``file:line:``).
        OutputExistsError: Outputs exist and ``force`` is false.
        TokenizerLoadError: The tokenizer cannot be loaded.
    """
    started = time.perf_counter()
    files = expand_inputs(config.inputs)
    encoder = _build_encoder(config)
    _validate(config, files, encoder)
    # Before reading: an input replaced during the run must not pass for what was read.
    made_from = outputs_made_from(config, files)
    dtype = token_dtype(encoder.vocab_size)
    paths = output_paths(config)
    ordered = [p for group in zip(*paths.values(), strict=True) for p in group]
    punkt_path = punkt_output_path(config)
    with AtomicOutputs([punkt_path, *ordered] if punkt_path else ordered, config.force) as outputs:
        splitter = None
        if config.split_sentences:
            params = _punkt_params(config, files)
            if punkt_path:
                save_punkt_params(params, outputs.temp(punkt_path))
            splitter = SentenceSplitter(config.lang, config.keep_newlines, params)
        writers = {k: IndexedDatasetWriter(outputs.temp(p[0]), dtype) for k, p in paths.items()}
        stats = {k: DatasetStats() for k in paths}
        blocks = itertools.chain.from_iterable(iter_blocks(f, config.block_bytes) for f in files)
        factory = functools.partial(_BlockEncoder.build, config, dtype, splitter)
        total = sum(os.path.getsize(f) for f in files)
        report_progress, bar = _progress_report(total, progress, log_interval)
        first_key = config.json_keys[0]
        try:
            for result in ordered_map(factory, blocks, config.workers):
                if result.error is not None:
                    line, message = result.error
                    raise BadLineError(
                        f"{result.path}:{line}: {message} "
                        "(pass --on-bad-line skip to skip and count such lines)"
                    )
                for key, writer in writers.items():
                    writer.add_documents(
                        result.tokens[key],
                        result.sequence_lengths[key],
                        result.sequences_per_document[key],
                    )
                    stats[key].merge(result.stats[key])
                report_progress(result.consumed, result.stats[first_key].documents)
        finally:
            if bar is not None:
                bar.close()
            for writer in writers.values():
                writer.close()
        for key, counts in stats.items():
            if not counts.documents:  # megatron-core cannot even open such a dataset
                skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.skipped.items()))
                named = files[0] if len(files) == 1 else f"{files[0]} and {len(files) - 1} more"
                raise InputError(
                    f"{named}: no document for --json-keys {key} in {counts.lines:,} lines "
                    f"(skipped: {skipped or 'none'}); nothing written"
                )
        seconds = time.perf_counter() - started
        report = {}
        for key, (_bin, idx_path, stats_path) in paths.items():
            writers[key].finalize(outputs.temp(idx_path))
            report[key] = _stats_record(config, key, made_from, encoder, dtype, stats[key], seconds)
            with open(outputs.temp(stats_path), "w", encoding="utf-8") as f:
                json.dump(report[key], f, indent=2, ensure_ascii=False)
                f.write("\n")
        outputs.commit()
    return report


def _stats_record(
    config: PreprocessConfig,
    key: str,
    made_from: dict,
    encoder: TextEncoder,
    dtype: type[np.number],
    stats: DatasetStats,
    seconds: float,
) -> dict:
    record = asdict(stats)
    record["skipped"] = dict(sorted(stats.skipped.items()))
    return {
        "dataset": config.output_stem(key),
        "json_key": key,
        "level": config.level,
        **record,
        "skipped_total": sum(stats.skipped.values()),
        "dtype": np.dtype(dtype).name,
        "tokenizer": {
            **made_from["tokenizer"],
            "model": str(config.tokenizer_model),
            "vocab_size": encoder.vocab_size,
            "eod": encoder.eod,
        },
        "inputs": made_from["inputs"],
        "settings": made_from["settings"],
        "punkt_params_saved": str(punkt) if (punkt := punkt_output_path(config)) else None,
        "workers": config.workers,
        "seconds": round(seconds, 3),
    }
