"""``megatron-ext tokenizer-report``: compare tokenizers on corpora and on parallel text.

For every SentencePiece tokenizer and corpus: tokens per word (fertility), characters and bytes
per token, share of byte-fallback tokens; on a parallel file (``{"lang", "text"}`` per line, such
as the UDHR sample) the same per language plus parity, the tokens a language needs over the tokens
of the reference language's version of the same text. Writes ``report.json``, ``report.md`` and
``report.png`` into ``--output-dir``. ``--normalize`` measures every tokenizer on the text as
``preprocess --normalize`` gives it to training.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from megatron_ext.commands.options import (
    INPUT_REFUSED,
    RUN_FAILED,
    add_corpus_reading_options,
    add_normalize_option,
    fail,
)
from megatron_ext.data.readers import InputError
from megatron_ext.outputs import OutputExistsError, atomic_directory, check_output_dir
from megatron_ext.tokenizer.encoders import TokenizerLoadError


def _named(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got '{value}'")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = argparse.ArgumentParser(
        prog="megatron-ext tokenizer-report",
        description="Fertility, characters/bytes per token, byte fallback and parallel-text "
        "parity of SentencePiece tokenizers; writes report.json, report.md and report.png.",
    )
    parser.add_argument(
        "--tokenizer",
        type=_named,
        action="append",
        required=True,
        metavar="NAME=MODEL",
        help="a SentencePiece .model to compare, with a short name (repeat; the first is the "
        "baseline)",
    )
    parser.add_argument(
        "--corpus",
        type=_named,
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a corpus (jsonl/txt/parquet, .gz/.zst, or a glob) with a short name (repeat)",
    )
    parser.add_argument(
        "--parallel",
        help='parallel text: JSON Lines with "lang" and "text" (e.g. parallel/udhr.jsonl)',
    )
    parser.add_argument(
        "--reference-lang",
        default="eng",
        help="language parity is measured against (default eng)",
    )
    add_corpus_reading_options(parser)
    add_normalize_option(
        parser, "normalise every corpus and parallel text before measuring (as preprocess does)"
    )
    parser.add_argument("--output-dir", required=True, help="directory to create")
    parser.add_argument("--force", action="store_true", help="replace an existing --output-dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not args.corpus and not args.parallel:
        build_parser().error("give --corpus and/or --parallel")
    try:
        report = run(args)
    except (InputError, TokenizerLoadError, OutputExistsError, ValueError, KeyError) as err:
        return fail("tokenizer-report", err, INPUT_REFUSED)
    except OSError as err:
        return fail("tokenizer-report", err, RUN_FAILED)
    print(
        f"tokenizer-report: {len(report['tokenizers'])} tokenizer(s), "
        f"{len(report['corpora'])} corpora, {len(report['parallel'])} parallel languages "
        f"-> {args.output_dir}/report.md"
    )
    return 0


def _parallel_texts(
    pattern: str,
    reference: str,
    skip_bad_lines: bool,
    normalize: Callable[[str], str] | None,
) -> dict[str, str]:
    """Each language's text in the ``{"lang", "text"}`` lines of ``pattern``'s files, joined.

    Read as ``--corpus`` is (globs, compression, malformed lines named by file and line).
    """
    from megatron_ext.tokenizer.corpus import iter_records

    texts: dict[str, list[str]] = {}
    for lang, text in iter_records([pattern], ["lang", "text"], skip_bad_lines, "--parallel"):
        texts.setdefault(lang, []).append(normalize(text) if normalize else text)
    joined = {lang: "\n".join(parts) for lang, parts in texts.items()}
    # Parity divides by the reference's tokens.
    if not joined.get(reference, "").strip():
        raise InputError(f"--parallel {pattern}: no text in the reference language '{reference}'")
    return joined


def _warn_on_other_normalization(tokenizers: list[tuple[str, str]], normalize: list[str]) -> None:
    """Warn for each expanded tokenizer whose ``expansion.json`` names another ``--normalize``.

    Its pieces were learnt from text normalised that way, so on other text its fertility reads
    worse than what training will see.
    """
    for name, path in tokenizers:
        try:
            expansion = Path(path).parent / "expansion.json"
            settings = json.loads(expansion.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours: nothing to compare with
        learnt_on = settings.get("normalize") or []
        if learnt_on != normalize:
            print(
                f"tokenizer-report: warning: --tokenizer {name} was expanded with --normalize "
                f"{' '.join(learnt_on) or '(none)'} but this report measures text normalised "
                f"with {' '.join(normalize) or '(none)'}; pass the --normalize preprocessing "
                "uses to measure the text training sees",
                file=sys.stderr,
            )


def run(args: argparse.Namespace) -> dict:
    """Measure and write the report; returns ``report.json``'s content."""
    from tqdm import tqdm

    from megatron_ext.hashing import sha256_file
    from megatron_ext.tokenizer.corpus import iter_documents
    from megatron_ext.tokenizer.encoders import load_sentencepiece
    from megatron_ext.tokenizer.metrics import WORD_RULE, measure, parity
    from megatron_ext.tokenizer.normalize import build_normalizer

    output = Path(args.output_dir)
    inputs = [("--tokenizer", path) for _, path in args.tokenizer]
    inputs += [("--corpus", path) for _, path in args.corpus] + [("--parallel", args.parallel)]
    check_output_dir(output, args.force, inputs)
    for flag, named in (("--tokenizer", args.tokenizer), ("--corpus", args.corpus)):
        names = [name for name, _ in named]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise InputError(f"{flag}: the name {repeated[0]!r} is given twice")
    processors = {name: load_sentencepiece(path) for name, path in args.tokenizer}
    _warn_on_other_normalization(args.tokenizer, args.normalize)
    skip_bad_lines = args.on_bad_line == "skip"
    normalize = build_normalizer(args.normalize)
    corpora = {
        name: list(iter_documents([path], args.json_key, skip_bad_lines, normalize))
        for name, path in args.corpus
    }
    for (name, path), documents in zip(args.corpus, corpora.values(), strict=True):
        if not documents:  # its fertility would read 0, as if perfectly compressed
            raise InputError(f"--corpus {name}={path}: no text")
    parallel = (
        _parallel_texts(args.parallel, args.reference_lang, skip_bad_lines, normalize)
        if args.parallel
        else {}
    )
    report: dict = {
        "word_rule": WORD_RULE,
        "normalize": args.normalize,
        "reference_lang": args.reference_lang,
        "tokenizers": {
            name: {"path": path, "sha256": sha256_file(path), "size": processors[name].vocab_size()}
            for name, path in args.tokenizer
        },
        "corpora": {},
        "parallel": {},
    }
    jobs = [(c, t) for c in corpora for t in processors]
    for corpus, tok in tqdm(jobs, desc="corpora", disable=None):
        metrics = measure(processors[tok], corpora[corpus]).as_dict()
        report["corpora"].setdefault(corpus, {})[tok] = metrics
    for tok, processor in tqdm(processors.items(), desc="parallel", disable=None):
        if not parallel:
            break
        ratios = parity(processor, parallel, args.reference_lang)
        for lang, text in parallel.items():
            metrics = measure(processor, [text]).as_dict()
            metrics["parity"] = round(ratios[lang], 4)
            report["parallel"].setdefault(lang, {})[tok] = metrics
    with atomic_directory(output, force=args.force) as tmp:
        (tmp / "report.json").write_text(
            json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / "report.md").write_text(markdown(report), encoding="utf-8")
        plot(report, tmp / "report.png")
    return report


def markdown(report: dict) -> str:
    """The report as markdown tables."""
    names = list(report["tokenizers"])
    lines = ["# Tokenizer report", "", "| tokenizer | pieces | sha256 |", "| --- | ---: | --- |"]
    lines += [
        f"| {n} | {t['size']:,} | `{t['sha256'][:12]}` |" for n, t in report["tokenizers"].items()
    ]
    lines += ["", f"Words: {report['word_rule']}.", ""]
    if report["normalize"]:
        lines += [f"Text normalised before measuring: {', '.join(report['normalize'])}.", ""]
    if report["corpora"]:
        lines += [
            "## Corpora",
            "",
            "| corpus | tokenizer | words | tokens | tokens/word | tokens/ws-word | chars/token "
            "| bytes/token | byte fallback |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for corpus, by_tok in report["corpora"].items():
            for n in names:
                m = by_tok[n]
                lines.append(
                    f"| {corpus} | {n} | {m['words']:,} | {m['tokens']:,} | {m['fertility']:.3f} "
                    f"| {m['tokens_per_whitespace_word']:.3f} | {m['chars_per_token']:.3f} | "
                    f"{m['bytes_per_token']:.3f} | {100 * m['byte_fallback_share']:.2f}% |"
                )
        lines.append("")
    if report["parallel"]:
        ref = report["reference_lang"]
        lines += [
            "## Parallel text",
            "",
            f"Parity: tokens for the language / tokens for the same text in `{ref}`.",
            "",
            "| language | "
            + " | ".join(f"{n} tokens/word | {n} parity" for n in names)
            + " | "
            + " | ".join(f"{n} chars/token" for n in names)
            + " |",
            "| --- |" + " ---: |" * (3 * len(names)),
        ]
        for lang, by_tok in report["parallel"].items():
            cells = [f"{by_tok[n]['fertility']:.3f} | {by_tok[n]['parity']:.3f}" for n in names]
            cells += [f"{by_tok[n]['chars_per_token']:.3f}" for n in names]
            lines.append(f"| {lang} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![tokenizer comparison](report.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Grouped bars per language/corpus: tokens per word and parity, one bar per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    names = list(report["tokenizers"])
    reference = report["reference_lang"]
    per_word = "tokens per word (lower is better)"
    panels = []
    if report["corpora"]:
        panels.append((f"{per_word}: corpora", report["corpora"], "fertility"))
    if report["parallel"]:
        panels.append((f"{per_word}: parallel text", report["parallel"], "fertility"))
        panels.append((
            f"parity: tokens for the same text over {reference}'s (1 = as cheap as {reference})",
            report["parallel"], "parity",
        ))  # fmt: skip
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    width = 0.8 / len(names)
    for ax, (title, data, key) in zip(axes[:, 0], panels, strict=True):
        groups = list(data)
        for i, name in enumerate(names):
            xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [data[g][name][key] for g in groups], width=width, label=name)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(title)
        values = [data[g][name][key] for g in groups for name in names]
        if max(values) > 10 * min(values):  # e.g. Thai, written without spaces between words
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
