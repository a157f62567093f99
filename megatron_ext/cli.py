"""The ``megatron-ext`` command: one subcommand per tool, each also runnable as ``tools/<name>.py``.

Subcommand modules are imported only when chosen, so ``megatron-ext preprocess`` never pays for
importing torch or megatron-core.
"""

from __future__ import annotations

import importlib
import os
import select
import sys

# name -> (module with main(argv) -> int, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": (
        "megatron_ext.commands.preprocess",
        "corpora (jsonl/txt/parquet, .gz/.zst) -> Megatron indexed datasets; language blends",
    ),
    "convert": (
        "megatron_ext.commands.convert",
        "Llama-2 Hugging Face <-> megatron-core checkpoints, growing the vocabulary",
    ),
    "expand-tokenizer": (
        "megatron_ext.commands.expand_tokenizer",
        "add target-language pieces to a SentencePiece BPE tokenizer (+ Hugging Face files)",
    ),
    "tokenizer-report": (
        "megatron_ext.commands.tokenizer_report",
        "fertility, chars/bytes per token, byte fallback and parallel parity of tokenizers",
    ),
    "train": (
        "megatron_ext.commands.train",
        "continued pretraining on megatron-core (TP/PP/DP, stages, checkpoints) from a config",
    ),
    "fetch-sample-data": (
        "megatron_ext.commands.fetch_sample_data",
        "build the sample corpora and fetch the tokenizers used by the demo and tests",
    ),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: megatron-ext COMMAND [options]   (megatron-ext COMMAND --help)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; returns its exit code."""
    try:
        code = _dispatch(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe's (a socket, a worker's): a failure to report
        # The reader left early (``megatron-ext --help | head``): stop quietly, as Unix tools
        # do. Python's advice: point stdout at /dev/null, so the flush at exit cannot fail
        # again with a second traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a tool whose reader left
    return code


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end is closed (an error to poll)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no real stdout
        return False


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"megatron-ext: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return module.main(rest)
    except ImportError as err:
        if err.name != "kernels":
            raise
        # Another project's `kernels` package hides ours (megatron_ext/model/__init__.py says
        # which and what to do): one line, as the commands' own errors.
        from megatron_ext.commands.options import RUN_FAILED, fail

        return fail(name, err, RUN_FAILED)


if __name__ == "__main__":
    sys.exit(main())
