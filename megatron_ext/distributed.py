"""Process-group and megatron-core ``parallel_state`` setup; the only home of the CPU shims.

``init`` picks NCCL when a GPU is present and gloo otherwise. Without a GPU, megatron-core still
calls a few CUDA-only functions, so :func:`install_cpu_shims` replaces exactly those (and nothing
on machines with a GPU): ``torch.cuda.current_device`` returns ``"cpu"`` (megatron-core passes it
as a ``device=`` argument), ``torch.cuda.synchronize`` does nothing (dist_checkpointing's writer
calls it), ``device="cuda"`` allocations inside a few megatron-core modules (causal masks,
pipeline schedules, optimizers) go to the CPU, a parameter asked for its type name gives the CUDA
one (megatron-core's mixed-precision and distributed optimizers accept parameters by that name),
megatron-core's CUDA RNG tracker is replaced by :class:`CpuRNGStatesTracker`, which forks the CPU
generator so that dropout stays reproducible and its state checkpointable, and activation
recomputation's save/restore of the CUDA generator does nothing (it saves the CPU generator as
well).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron-core's RNG tracker with named states of the CPU generator instead of CUDA's."""

    def add(self, name: str, seed: int) -> None:
        """Track a new named state seeded with ``seed`` (same checks as the CUDA tracker)."""
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the block with the CPU generator in state ``name``, then restore the caller's."""
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_initialize_rng_tracker(*args: object, force_reset: bool = False, **kwargs: object) -> None:
    # Replaces megatron-core's initialize_rng_tracker (which would build a CUDA tracker); it is
    # looked up as a module global by get_cuda_rng_tracker and model_parallel_cuda_manual_seed.
    if force_reset or not mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED:
        mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


class _CpuDeviceTorch:
    """``torch`` as seen by megatron-core modules that hard-code ``device="cuda"`` allocations.

    Attribute access goes to ``torch``; calls given ``device="cuda"`` get ``device="cpu"``.
    """

    def __getattr__(self, name: str) -> object:
        attr = getattr(torch, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def call(*args: object, **kwargs: object) -> object:
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return call


# megatron-core modules whose module-level ``torch`` allocates on "cuda" (causal masks, pipeline
# schedules' receive buffers, the optimizers' scalar flags and gradient-norm buffers).
_CUDA_ALLOCATING_MODULES = (
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
)


def _type_named_as_on_cuda(self: torch.nn.Parameter, dtype=None, non_blocking=False, **kwargs):
    # megatron-core's mixed-precision and distributed optimizers accept parameters by type name
    # ("torch.cuda.BFloat16Tensor"); asked for its name, a CPU parameter gives the CUDA one.
    if dtype is None and not kwargs:
        return torch.Tensor.type(self).replace("torch.", "torch.cuda.", 1)
    return torch.Tensor.type(self, dtype, non_blocking, **kwargs)


def install_cpu_shims() -> None:
    """Make megatron-core's CUDA-only calls work on a machine without a GPU (idempotent).

    Raises:
        RuntimeError: If a GPU is present: the shims would hide real CUDA.
    """
    if torch.cuda.is_available():
        raise RuntimeError("CPU shims must not be installed on a machine with a GPU")
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    mcore_random.initialize_rng_tracker = _cpu_initialize_rng_tracker
    # Activation recomputation saves and restores "the CUDA generator" besides the CPU one and
    # the tracker's states; without a GPU there is no such generator (the CPU one is saved too).
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None
    for module_name in _CUDA_ALLOCATING_MODULES:
        importlib.import_module(module_name).torch = _CpuDeviceTorch()
    torch.nn.Parameter.type = _type_named_as_on_cuda
    if not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        _cpu_initialize_rng_tracker(force_reset=True)


def job_world_size() -> int:
    """Processes in this job: the process group's, else torchrun's ``WORLD_SIZE``, else 1."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def init(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int | None = None,
) -> str:
    """Initialise ``torch.distributed`` and megatron-core's model-parallel state.

    The process group is created from ``rank``/``world_size`` if given, else from the usual
    ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` environment (torchrun, srun wrappers);
    an existing process group is reused.

    Args:
        tensor_model_parallel_size: TP size.
        pipeline_model_parallel_size: PP size.
        rank: This process's global rank.
        world_size: Number of processes.
        seed: If set, seeds torch and megatron-core's model-parallel RNG states.

    Returns:
        The backend in use: ``"nccl"`` or ``"gloo"``.
    """
    gpu = torch.cuda.is_available()
    if not gpu:
        install_cpu_shims()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = job_world_size() if world_size is None else world_size
        if gpu:
            torch.cuda.set_device(
                int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world_size == 1:  # alone: any free port (torchrun's default clashes with other jobs)
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world_size)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    if seed is not None:
        torch.manual_seed(seed)
        mcore_random.model_parallel_cuda_manual_seed(seed)
    return dist.get_backend()


# Launchers that start every process of a job themselves: the variable each sets to the count.
_LAUNCHER_TASKS = {
    "SLURM_STEP_NUM_TASKS": "srun",
    "OMPI_COMM_WORLD_SIZE": "mpirun",
    "PMI_SIZE": "a PMI launcher",
}


def launch_without_torchrun(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why this process would train alone although a launcher started several, or None.

    Without torchrun's ``WORLD_SIZE`` each process takes itself for the whole job, a free port
    of its own, and the same ``--save`` as all the others.
    """
    if "WORLD_SIZE" in environ:
        return None
    for variable, launcher in _LAUNCHER_TASKS.items():
        tasks = environ.get(variable, "")
        if tasks.isdigit() and int(tasks) > 1:
            return (
                f"{tasks} processes started by {launcher} ({variable}={tasks}) without torchrun: "
                "each would train alone into the same --save. Start one torchrun per node "
                "(examples/slurm/train.sbatch does)"
            )
    return None


def launch_warning(
    tensor_model_parallel_size: int, on_gpu: bool, environ: Mapping[str, str] = os.environ
) -> str | None:
    """A warning when tensor parallelism on GPUs runs without ``CUDA_DEVICE_MAX_CONNECTIONS=1``.

    megatron-core's tensor-parallel layers launch a collective and then the GEMM that should hide
    it, relying on one hardware queue to start them in that order; with several queues the GEMM
    may run first and the communication is no longer overlapped (Megatron-LM's launch scripts
    set the variable; it must be set before CUDA starts, so it cannot be fixed from here).
    """
    if not on_gpu or tensor_model_parallel_size == 1:
        return None
    value = environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if value == "1":
        return None
    return (
        f"warning: CUDA_DEVICE_MAX_CONNECTIONS is {value or 'unset'}: with tensor parallelism "
        "megatron-core overlaps communication with computation only when it is 1 (export it "
        "before launching, as examples/slurm/train.sbatch does)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
