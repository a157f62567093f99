#!/usr/bin/env python3
"""Llama-2 HF <-> megatron-core checkpoints (same as ``megatron-ext convert``)."""

import sys

from megatron_ext.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
