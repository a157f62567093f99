"""``megatron-ext expand-tokenizer``: add target-language pieces to a SentencePiece BPE model.

Writes ``tokenizer.model`` (base ids unchanged, new pieces appended), Hugging Face files
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) and
``expansion.json`` into ``--output-dir``, all at once: the directory appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from megatron_ext.commands.options import (
    INPUT_REFUSED,
    RUN_FAILED,
    add_corpus_reading_options,
    add_normalize_option,
    fail,
    positive_int,
)
from megatron_ext.data.readers import InputError
from megatron_ext.hashing import sha256_file
from megatron_ext.outputs import OutputExistsError, atomic_directory, check_output_dir
from megatron_ext.tokenizer.encoders import TokenizerLoadError
from megatron_ext.tokenizer.normalize import build_normalizer


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = argparse.ArgumentParser(
        prog="megatron-ext expand-tokenizer",
        description="Learn target-language pieces and append them to a SentencePiece BPE model "
        "(every base id, piece and score kept); write the model, Hugging Face tokenizer files "
        "and expansion.json.",
    )
    parser.add_argument(
        "--base-model", required=True, help="SentencePiece BPE tokenizer.model (e.g. Llama-2's)"
    )
    parser.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        help="target-language files or globs: .jsonl/.json/.txt/.parquet, optionally .gz/.zst",
    )
    parser.add_argument(
        "--num-new-tokens",
        type=int,
        required=True,
        help="number of pieces to add (budget), e.g. 25000",
    )
    parser.add_argument("--output-dir", required=True, help="directory to create")
    add_normalize_option(
        parser,
        "normalise the corpus before learning pieces (give the same to preprocess and "
        "tokenizer-report)",
    )
    parser.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        help="do not add pieces BPE builds fewer times than this on the corpus (default 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="SentencePiece trainer seed")
    parser.add_argument(
        "--unmarked-weight",
        type=int,
        default=2,
        help="times a copy of the corpus without combining marks (harakat) is added to the "
        "training text, so pieces also serve undiacritised text; 0 disables (default 2)",
    )
    parser.add_argument(
        "--method",
        choices=["gain", "append"],
        default="gain",
        help="gain: best-compression pieces, ordered for BPE (default); append: Chinese-LLaMA "
        "baseline (train N pieces, append the new ones with score 0), for comparison only",
    )
    add_corpus_reading_options(parser)
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="trainer and encoder threads"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --output-dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="expand-tokenizer: %(message)s")
    try:
        summary = run(args)
    except (
        InputError,
        TokenizerLoadError,
        OutputExistsError,
        ValueError,
    ) as err:
        return fail("expand-tokenizer", err, INPUT_REFUSED)
    except OSError as err:
        return fail("expand-tokenizer", err, RUN_FAILED)
    print(
        f"expand-tokenizer: {summary['base_size']:,} -> {summary['new_size']:,} pieces "
        f"(+{summary['added']:,}) in {summary['training']['seconds']:.1f} s -> {args.output_dir}"
    )
    if args.method == "append":
        print(
            "expand-tokenizer: no Hugging Face files: --method append gives the new pieces one "
            "score, and SentencePiece breaks such ties by position in the text, which "
            "tokenizer.json's merge ranks cannot express"
        )
    return 0


def run(args: argparse.Namespace) -> dict:
    """Expand, export and write everything; returns ``expansion.json``'s content."""
    from megatron_ext.data.readers import expand_inputs
    from megatron_ext.tokenizer.corpus import iter_documents
    from megatron_ext.tokenizer.expand import ExpansionConfig, expand, load_base
    from megatron_ext.tokenizer.hf_export import check_exportable, save_hf_files

    config = ExpansionConfig(
        num_new_tokens=args.num_new_tokens,
        method=args.method,
        unmarked_weight=args.unmarked_weight,
        min_frequency=args.min_frequency,
        seed=args.seed,
        num_threads=args.threads,
    )
    config.validate()
    output = Path(args.output_dir)
    inputs = [("--base-model", args.base_model)] + [("--corpus", c) for c in args.corpus]
    check_output_dir(output, args.force, inputs)
    base = load_base(args.base_model)
    check_exportable(base)  # fail before the long part, not after it
    files = expand_inputs(args.corpus, flag="--corpus")
    documents = iter_documents(
        files,
        key=args.json_key,
        skip_bad_lines=args.on_bad_line == "skip",
        normalize=build_normalizer(args.normalize),
    )
    from tqdm import tqdm

    documents = tqdm(documents, desc="reading corpus", unit=" docs", disable=None)
    expansion = expand(base, documents, config)
    summary = expansion.summary()
    summary["settings"] = {
        "num_new_tokens": args.num_new_tokens,
        "method": args.method,
        "unmarked_weight": args.unmarked_weight,
        "min_frequency": args.min_frequency,
        "seed": args.seed,
        "normalize": args.normalize,
        "json_key": args.json_key,
        "on_bad_line": args.on_bad_line,
    }
    summary["inputs"] = {
        "base_model": {"path": str(args.base_model), "sha256": sha256_file(args.base_model)},
        "corpus": [{"path": f, "sha256": sha256_file(f)} for f in files],
    }
    # sentencepiece's version changes what the trainer learns.
    import sentencepiece

    summary["sentencepiece_version"] = sentencepiece.__version__
    with atomic_directory(output, force=args.force) as tmp:
        (tmp / "tokenizer.model").write_bytes(expansion.model.serialize())
        if args.method == "gain":
            save_hf_files(expansion.model, tmp)
        (tmp / "expansion.json").write_text(
            json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return summary
