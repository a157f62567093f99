#!/usr/bin/env python3
"""Corpora -> Megatron indexed datasets (same as ``megatron-ext preprocess``)."""

import sys

from megatron_ext.commands.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
