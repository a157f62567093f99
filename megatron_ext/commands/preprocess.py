r"""``megatron-ext preprocess``: corpora -> Megatron indexed datasets (Megatron-LM's flag names).

Single corpus::

    megatron-ext preprocess --input 'ar/*.jsonl.zst' --output-prefix data/ar \
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod --workers 8

A blend of languages with target token shares (one dataset per language, then the
``--data-path`` that realises the shares)::

    megatron-ext preprocess --manifest blend.yaml --output-prefix data/blend \
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time

from megatron_ext.commands.options import (
    INPUT_REFUSED,
    RUN_FAILED,
    add_normalize_option,
    fail,
    positive_int,
    usable_cores,
)
from megatron_ext.data.blend import (
    ManifestError,
    blend_weights,
    data_path_argument,
    epochs,
    load_manifest,
)
from megatron_ext.data.preprocess import (
    ON_BAD_LINE,
    PUNKT_TRAIN,
    PUNKT_UNTRAINED,
    PreprocessConfig,
    WorkerDiedError,
    output_paths,
    run_preprocess,
)
from megatron_ext.data.provenance import reusable_outputs
from megatron_ext.data.readers import InputError, expand_inputs
from megatron_ext.data.sentences import check_language
from megatron_ext.outputs import AtomicOutputs, OutputExistsError
from megatron_ext.tokenizer.encoders import TOKENIZER_TYPES, TokenizerLoadError

PROG = "megatron-ext preprocess"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (flags follow Megatron-LM's ``tools/preprocess_data.py``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize corpora (jsonl/txt/parquet, optionally .gz/.zst) into Megatron "
        "indexed datasets ({prefix}_{key}_{document|sentence}.bin/.idx + .stats.json).",
    )
    data = parser.add_argument_group("input data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="input files or globs (quote globs)")
    source.add_argument(
        "--manifest",
        help="YAML blend manifest: languages with inputs and token shares; writes one dataset "
        "per language and prints the --data-path blend",
    )
    data.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSON keys to extract, one dataset each (default: text)",
    )
    data.add_argument(
        "--split-sentences", action="store_true", help="one sequence per sentence (NLTK Punkt)"
    )
    data.add_argument(
        "--keep-newlines",
        action="store_true",
        help="keep the whitespace (newlines) after each sentence with it",
    )
    data.add_argument(
        "--lang",
        default="english",
        help="language for sentence splitting (en, ar, zh, ... or NLTK names such as english); "
        "with --manifest, each language's own name unless it sets lang (default: english)",
    )
    data.add_argument(
        "--punkt-params",
        default=PUNKT_TRAIN,
        help=f"Punkt parameters: '{PUNKT_TRAIN}' (learn from the input, offline, and save them "
        f"as PREFIX_punkt.json for other shards), '{PUNKT_UNTRAINED}', or such a JSON file; "
        f"never downloaded (default: {PUNKT_TRAIN})",
    )
    add_normalize_option(data, "text normalisation before tokenizing")
    data.add_argument(
        "--on-bad-line",
        choices=ON_BAD_LINE,
        default="error",
        help="malformed JSON, invalid UTF-8, missing key, non-string value: stop with "
        "file:line, or skip and count (default: error)",
    )
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument(
        "--tokenizer-type",
        required=True,
        choices=TOKENIZER_TYPES,
        help="as in Megatron-LM: the SentencePiece types write the model's ids and use </s> as "
        "end of document; HuggingFaceTokenizer loads a tokenizer directory (no remote code)",
    )
    tok.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model file, or a Hugging Face tokenizer directory",
    )
    tok.add_argument(
        "--tokenizer-hf-include-special-tokens",
        action="store_true",
        help="HuggingFaceTokenizer: add the tokenizer's special tokens (e.g. bos) to each text",
    )
    tok.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document token to documents"
    )
    out = parser.add_argument_group("output data")
    out.add_argument(
        "--output-prefix", help="output path prefix (with --manifest: may come from the manifest)"
    )
    out.add_argument("--force", action="store_true", help="overwrite existing outputs")
    run = parser.add_argument_group("runtime")
    run.add_argument(
        "--workers",
        type=positive_int,
        default=usable_cores(),
        help="worker processes (default: the cores this process may use, e.g. those Slurm "
        "gave the job)",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on a terminal; otherwise a line every 5%% of the input)",
    )
    run.add_argument(
        "--log-interval",
        type=positive_int,
        metavar="DOCUMENTS",
        help="a progress line every this many documents instead (as Megatron-LM's)",
    )
    megatron_lm = parser.add_argument_group(
        "Megatron-LM flags with nothing left to do (accepted, so its commands run unchanged)"
    )
    megatron_lm.add_argument(
        "--partitions",
        type=positive_int,
        help="ignored: --workers share every file, and one dataset is written in input order",
    )
    megatron_lm.add_argument(
        "--keep-sequential-samples",
        action="store_true",
        help="ignored: documents are always written in input order",
    )
    return parser


def _config(args: argparse.Namespace, inputs: list[str], prefix: str) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=inputs,
        output_prefix=prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        tokenizer_hf_include_special_tokens=args.tokenizer_hf_include_special_tokens,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        split_sentences=args.split_sentences,
        lang=args.lang,
        keep_newlines=args.keep_newlines,
        punkt_params=args.punkt_params,
        normalize=args.normalize,
        on_bad_line=args.on_bad_line,
        workers=args.workers,
        force=args.force,
    )


def _summary_line(stats: dict) -> str:
    skipped = ", ".join(f"{k} {v:,}" for k, v in stats["skipped"].items()) or "none"
    return (
        f"{stats['dataset']}: {stats['documents']:,} documents, {stats['sequences']:,} "
        f"sequences, {stats['tokens']:,} tokens ({stats['dtype']}), {stats['characters']:,} "
        f"characters, {stats['characters'] / max(stats['tokens'], 1):.2f} chars/token; "
        f"skipped: {skipped}; {stats['seconds']:.1f} s"
    )


def _run_manifest(args: argparse.Namespace) -> list[dict]:
    manifest = load_manifest(args.manifest)
    prefix = args.output_prefix or manifest.output_prefix
    if not prefix:
        raise ManifestError(
            f"{args.manifest}: give --output-prefix or output_prefix in the manifest"
        )
    if len(args.json_keys) != 1:
        raise ManifestError("--manifest blends one dataset per language: give one --json-keys")
    for spec in manifest.languages:  # all, before the first language's hours of work
        expand_inputs(spec.inputs, flag=f"{args.manifest}: language {spec.name}: input")
        if args.split_sentences:
            try:
                check_language(spec.lang or spec.name)
            except ValueError as err:
                raise ManifestError(
                    f"{args.manifest}: language {spec.name}: {err}; set its lang"
                ) from err
    total = sum(s.share for s in manifest.languages)
    if not math.isclose(total, 1.0):
        shares = ", ".join(f"{s.name} {s.share / total:.1%}" for s in manifest.languages)
        print(f"note: the shares add up to {total:g}, read as parts of the whole: {shares}")
    results = []
    for spec in manifest.languages:
        config = dataclasses.replace(
            _config(args, spec.inputs, f"{prefix}_{spec.name}"),
            lang=spec.lang or spec.name,
            normalize=args.normalize if spec.normalize is None else spec.normalize,
        )
        if not args.force:
            reused, why_not = reusable_outputs(config, output_paths(config))
            if reused is not None:
                stats = reused[args.json_keys[0]]
                print(f"{spec.name}: outputs are up to date, kept ({stats['dataset']})")
                results.append(stats)
                continue
            if why_not:
                stem = config.output_stem(args.json_keys[0])
                raise OutputExistsError(
                    f"{spec.name}: {stem} exists, but {why_not}; delete {stem}.bin, .idx and "
                    ".stats.json to rebuild this language, or pass --force to rebuild them all"
                )
        print(f"{spec.name}: {len(expand_inputs(spec.inputs))} input file(s)")
        stats = run_preprocess(config, args.progress, args.log_interval)[args.json_keys[0]]
        print(_summary_line(stats))
        results.append(stats)

    weights = blend_weights([s.share for s in manifest.languages])
    stems = [s["dataset"] for s in results]
    blend = {
        "data_path": data_path_argument(weights, stems),
        "languages": [
            {
                "name": spec.name,
                "dataset": stats["dataset"],
                "requested_share": spec.share / sum(x.share for x in manifest.languages),
                "weight": weight,
                "tokens": stats["tokens"],
                "documents": stats["documents"],
            }
            for spec, stats, weight in zip(manifest.languages, results, weights, strict=True)
        ],
        "train_tokens": manifest.train_tokens,
    }
    if manifest.train_tokens:
        repeats = epochs(weights, [s["tokens"] for s in results], manifest.train_tokens)
        for entry, n in zip(blend["languages"], repeats, strict=True):
            entry["epochs"] = n
    blend_path = f"{prefix}_blend.json"
    with AtomicOutputs([blend_path], force=True) as out:
        with open(out.temp(blend_path), "w", encoding="utf-8") as f:
            json.dump(blend, f, indent=2)
            f.write("\n")
        out.commit()
    print("\nblend (token shares):")
    for entry in blend["languages"]:
        extra = f", {entry['epochs']:.2f} epochs" if "epochs" in entry else ""
        print(
            f"  {entry['name']}: share {entry['requested_share']:.3f}, "
            f"{entry['tokens']:,} tokens{extra}"
        )
    print(f"--data-path {blend['data_path']}")
    print(f"(written to {blend_path})")
    return results


def _terminate(signum, frame) -> None:
    # Turn SIGTERM (Slurm pre-emption, kill) into an exception so temporary outputs are removed.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.partitions not in (None, 1) or args.keep_sequential_samples:
        print(
            "note: --partitions and --keep-sequential-samples are not needed: --workers share "
            "every file, and documents are written in input order"
        )
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    try:
        if args.manifest:
            results = _run_manifest(args)
        else:
            if not args.output_prefix:
                raise ValueError("--output-prefix is required")
            config = _config(args, args.input, args.output_prefix)
            report = run_preprocess(config, args.progress, args.log_interval)
            results = list(report.values())
            for stats in results:
                print(_summary_line(stats))
            saved = results[0]["punkt_params_saved"]
            if saved:
                print(f"Punkt parameters learnt: {saved} (--punkt-params for other shards)")
            for stats in results:
                print(f"--data-path {stats['dataset']}")
    except (
        InputError,
        OutputExistsError,
        TokenizerLoadError,
        ManifestError,
        ValueError,
    ) as err:
        return fail("preprocess", err, INPUT_REFUSED)
    except (WorkerDiedError, OSError) as err:
        return fail("preprocess", err, RUN_FAILED)
    tokens = sum(s["tokens"] for s in results)
    skipped = sum(s["skipped_total"] for s in results)
    print(
        f"preprocess: done: {len(results)} dataset(s), {sum(s['documents'] for s in results):,} "
        f"documents, {tokens:,} tokens, {skipped:,} skipped, "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
