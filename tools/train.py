#!/usr/bin/env python3
"""Continued pretraining on megatron-core (same as ``megatron-ext train``)."""

import sys

from megatron_ext.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
