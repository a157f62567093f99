#!/usr/bin/env python3
"""Add target-language pieces to a SentencePiece tokenizer (`megatron-ext expand-tokenizer`)."""

import sys

from megatron_ext.commands.expand_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
