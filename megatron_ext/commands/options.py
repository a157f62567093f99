"""Command-line options and console settings shared by the tools."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from megatron_ext.data.preprocess import ON_BAD_LINE
from megatron_ext.tokenizer.normalize import NORMALIZERS


def add_corpus_reading_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--json-key`` and ``--on-bad-line``, with the same meaning in every tool."""
    parser.add_argument("--json-key", default="text", help="JSON field with the text")
    parser.add_argument(
        "--on-bad-line",
        choices=ON_BAD_LINE,
        default="error",
        help="malformed input lines: stop with file:line (default) or skip them",
    )


def add_normalize_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, purpose: str
) -> None:
    """``--normalize``: normalisers from ``tokenizer.normalize``, applied in the order given.

    Args:
        parser: Where to add the option.
        purpose: What the tool normalises, the start of the help text.
    """
    parser.add_argument(
        "--normalize",
        nargs="+",
        choices=sorted(NORMALIZERS),
        default=[],
        help=f"{purpose} (default: none)",
    )


# Exit codes, the same in every tool: scripts (a Slurm job's re-queue) can tell a run worth
# retrying from one that would fail again.
INPUT_REFUSED = 2  # the command line, config or inputs are wrong (as argparse's usage errors)
RUN_FAILED = 1  # the work failed: a full disk, a killed worker, a diverged loss


def fail(command: str, err: BaseException, code: int) -> int:
    """Print ``megatron-ext COMMAND: error: ERR`` on stderr; returns ``code``."""
    print(f"megatron-ext {command}: error: {err}", file=sys.stderr)
    return code


def positive_int(text: str) -> int:
    """An ``argparse`` type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def usable_cores() -> int:
    """The cores this process may run on: a Slurm job's or ``taskset``'s, not the machine's."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def quiet_known_warnings() -> None:
    """Silence megatron-core's warnings that every run prints and that need no action."""
    for message in (
        "Transformer Engine and Apex are not installed",
        "Apex is not installed",
        "full scope is deprecated",
        ".*ShardedTensor",
        ".*load_state_dict.*deprecated",
        # torch's own about the collectives megatron-core's distributed optimizer calls.
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        # train checks CUDA_DEVICE_MAX_CONNECTIONS itself, on GPUs only (launch_warning).
        "When using sequence parallelism it is recommended to set the environment variable",
    ):
        warnings.filterwarnings("ignore", message=message)
    # megatron-core's optimizer asks every parameter for .grad, a view's too.
    warnings.filterwarnings(
        "ignore",
        message="The .grad attribute of a Tensor that is not a leaf Tensor",
        module=r"megatron\.core\.optimizer",
    )
