"""Spawn N ranks on 127.0.0.1 for multi-rank tests (reused by every integration test).

``run_ranks(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in ``world_size``
fresh processes with ``megatron_ext.distributed.init`` already called (TP = ``world_size`` unless
``tensor_model_parallel_size`` or ``pipeline_model_parallel_size`` say otherwise) and
re-raises the first failure in the test process. ``fn`` must be importable (module level) and
should put what it wants checked in assertions inside the rank, or return picklable values,
which come back in rank order.
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from megatron_ext.distributed import free_port


def _worker(rank, world_size, port, tp, pp, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # One thread per rank: the test machine has two cores.
    torch.set_num_threads(1)
    from megatron_ext import distributed

    try:
        distributed.init(tp, pp, rank=rank, world_size=world_size, seed=1234)
        # Plain pickle bytes: torch's queue pickler would pass tensors as shared-memory file
        # descriptors, which vanish if this process exits before the parent reads them.
        results.put((rank, pickle.dumps(fn(rank, world_size, *args)), None))
    except BaseException:  # reported to the parent, which re-raises
        results.put((rank, None, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    tensor_model_parallel_size: int | None = None,
    pipeline_model_parallel_size: int = 1,
    timeout: float = 300.0,
) -> list[Any]:
    """Run ``fn`` on ``world_size`` ranks; return its results in rank order.

    Ranks use gloo on a CPU machine and NCCL, one GPU each, on a GPU machine; a test needing more
    ranks than there are GPUs is skipped there.
    """
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        pytest.skip(f"{world_size} ranks need {world_size} GPUs, this machine has fewer")
    pp = pipeline_model_parallel_size
    tp = world_size // pp if tensor_model_parallel_size is None else tensor_model_parallel_size
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        outcome = _spawn(fn, world_size, tp, pp, args, timeout)
        errors = [f"rank {rank}:\n{err}" for rank, _, err in sorted(outcome) if err]
        if not (errors and attempt < _PORT_ATTEMPTS and "EADDRINUSE" in errors[0]):
            break
    if errors:
        raise AssertionError("\n".join(errors))
    return [pickle.loads(value) for _, value, _ in sorted(outcome, key=lambda item: item[0])]


# A port free when chosen can be taken (by any process's outgoing connection) before rank 0
# listens on it; the ranks then fail in init, before ``fn`` runs, and start again on another.
_PORT_ATTEMPTS = 3


def _spawn(fn, world_size, tp, pp, args, timeout) -> list[tuple[int, bytes | None, str | None]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, tp, pp, fn, args, results))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        return [results.get(timeout=timeout) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
