"""Command-line options shared by the tools that read corpora."""

from __future__ import annotations

import argparse

from megatron_ext.data.preprocess import ON_BAD_LINE


def add_corpus_reading_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--json-key`` and ``--on-bad-line``, with the same meaning in every tool."""
    parser.add_argument("--json-key", default="text", help="JSON field with the text")
    parser.add_argument(
        "--on-bad-line",
        choices=ON_BAD_LINE,
        default="error",
        help="malformed input lines: stop with file:line (default) or skip them",
    )
