#!/usr/bin/env python3
"""Fetch the sample corpora and tokenizers (same as ``megatron-ext fetch-sample-data``)."""

import sys

from megatron_ext.commands.fetch_sample_data import main

if __name__ == "__main__":
    sys.exit(main())
