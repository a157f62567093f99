#!/usr/bin/env python3
"""Tokenizer metrics report (same as ``megatron-ext tokenizer-report``)."""

import sys

from megatron_ext.commands.tokenizer_report import main

if __name__ == "__main__":
    sys.exit(main())
