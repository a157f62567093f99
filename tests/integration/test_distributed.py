"""megatron_ext.distributed on CPU: gloo, parallel_state, and the CPU stand-ins for CUDA calls."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

from megatron_ext import distributed
from tests.distributed import run_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only shims")


def _dropout_mask():
    return torch.nn.functional.dropout(torch.ones(64), p=0.5)


def _rank(rank, world):
    assert torch.distributed.get_backend() == "gloo"
    assert parallel_state.get_tensor_model_parallel_world_size() == world
    assert parallel_state.get_tensor_model_parallel_rank() == rank
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()  # a no-op instead of "Torch not compiled with CUDA enabled"

    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, distributed.CpuRNGStatesTracker)
    outside = torch.get_rng_state()
    with tracker.fork():
        first = _dropout_mask()
        second = _dropout_mask()
    assert torch.equal(torch.get_rng_state(), outside), "fork must restore the caller's state"
    assert not torch.equal(first, second), "the forked state must advance inside the block"

    # Re-seeding reproduces the same stream; the states can be saved and restored (checkpoints).
    model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, distributed.CpuRNGStatesTracker)
    saved = {name: state.clone() for name, state in tracker.get_states().items()}
    with tracker.fork():
        again = _dropout_mask()
    assert torch.equal(again, first)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(_dropout_mask(), first)
    return first


def test_cpu_shims_and_rng_tracker_across_tp_ranks():
    masks = run_ranks(_rank, 2)
    # The model-parallel stream is seeded per TP rank, so dropout differs across ranks.
    assert not torch.equal(masks[0], masks[1])


def test_launch_warning_names_the_queue_setting_tensor_parallelism_needs():
    unset = distributed.launch_warning(8, on_gpu=True, environ={})
    assert "CUDA_DEVICE_MAX_CONNECTIONS is unset" in unset
    many = distributed.launch_warning(8, on_gpu=True, environ={"CUDA_DEVICE_MAX_CONNECTIONS": "8"})
    assert "CUDA_DEVICE_MAX_CONNECTIONS is 8" in many
    assert distributed.launch_warning(8, True, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}) is None
    assert distributed.launch_warning(1, True, {}) is None  # no tensor-parallel collectives
    assert distributed.launch_warning(2, False, {}) is None  # gloo: no hardware queues


def test_a_lone_process_takes_a_free_port_not_torchruns_default():
    """``megatron-ext train`` without torchrun ran into any other job on port 29500."""
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 29500))
            taken.listen()
        except OSError:
            pass  # taken by something else already: the case under test all the same
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE")}
        code = "from megatron_ext import distributed; print(distributed.init(1, 1))"
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("gloo")


def test_processes_a_launcher_started_without_torchrun_are_refused(tmp_path):
    """``srun -n 8 megatron-ext train`` gives no WORLD_SIZE: each process would train alone."""
    assert distributed.launch_without_torchrun({}) is None
    assert distributed.launch_without_torchrun({"SLURM_STEP_NUM_TASKS": "1"}) is None
    # torchrun's processes, under srun's one task per node.
    started = {"SLURM_STEP_NUM_TASKS": "2", "WORLD_SIZE": "16"}
    assert distributed.launch_without_torchrun(started) is None
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "MASTER_PORT")}
    env["SLURM_STEP_NUM_TASKS"] = "8"
    command = [sys.executable, "-m", "megatron_ext.cli", "train", "--tokenizer-model", "t.model"]
    done = subprocess.run(
        [*command, "--data-path", "x", "--save", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == (
        "megatron-ext train: error: 8 processes started by srun (SLURM_STEP_NUM_TASKS=8) without "
        "torchrun: each would train alone into the same --save. Start one torchrun per node "
        "(examples/slurm/train.sbatch does)"
    )
