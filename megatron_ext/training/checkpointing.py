"""Training checkpoints: megatron-core ``dist_checkpointing``, written atomically, keep-last-k.

Layout (Megatron-LM's)::

    <save>/iter_0000100/                  dist_checkpointing (torch_dist) of model + optimizer
           iter_0000100/train_state.json  iteration, stage, scheduler, skipped steps, layout
           iter_0000100/megatron_ext.json architecture and vocabulary (``convert megatron-to-hf``)
    <save>/latest_checkpointed_iteration.txt
    <save>/interrupted.json               present while a run stopped early (SIGTERM, time budget)

A checkpoint is written into ``iter_XXXXXXX.tmp`` by all ranks (data-parallel replicas sharing
the replicated tensors; in the background with ``async_save``), renamed by rank 0 once complete,
and only then does the ``latest`` pointer (replaced atomically) name it; a job killed at any
moment leaves either the previous checkpoint as latest or the new one complete, and its
half-written temporary directory is removed by the next save. A checkpoint being deleted (pruned,
or replaced by a new one of its iteration) is first renamed to ``iter_XXXXXXX.deleting``, so no
half-deleted one is left under a checkpoint's name either. The model state is resharded
on load, so a run saved at TP=2 resumes at TP=1, and so is the optimizer state as its format
allows (:func:`optimizer_format`); the per-rank RNG states are restored only when the parallel
layout is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_ext.checkpoint.convert import (
    DIST_CHECKPOINT_ERRORS,
    METADATA,
    apply_model_state,
    error_cause,
    load_dist_checkpoint,
    model_sharded_state,
)
from megatron_ext.checkpoint.hf import CheckpointError, read_json_file

logger = logging.getLogger(__name__)

LATEST = "latest_checkpointed_iteration.txt"
INTERRUPTED = "interrupted.json"
TRAIN_STATE = "train_state.json"
# Suffixes of directories that are not checkpoints: one being written, one being deleted.
WRITING, DELETING = ".tmp", ".deleting"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the message names it, the cause and the latest)."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be resumed from (the message names the path)."""


def checkpoint_dir(save: str | os.PathLike, iteration: int) -> Path:
    """Directory of the checkpoint taken after ``iteration``."""
    return Path(save) / f"iter_{iteration:07d}"


def latest_checkpoint(load: str | os.PathLike) -> Path | None:
    """The checkpoint the ``latest`` pointer names, or None if there is none yet.

    Raises:
        CheckpointLoadError: If the pointer names a checkpoint that is missing or incomplete.
    """
    pointer = Path(load) / LATEST
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    try:
        iteration = int(text)
    except ValueError as err:
        raise CheckpointLoadError(f"{pointer}: expected an iteration number, got {text!r}") from err
    path = checkpoint_dir(load, iteration)
    if not (path / TRAIN_STATE).is_file():
        hint = _earlier_checkpoint_hint(path)
        raise CheckpointLoadError(f"{pointer} names {path}, which is missing or incomplete{hint}")
    return path


def checkpoint_iteration(checkpoint: Path) -> int | None:
    """The iteration a checkpoint directory's name gives.

    None for any other name: a half-written ``.tmp``, one being deleted, or a user's copy such as
    ``iter_0000008_backup``, which pruning must not count (or delete).
    """
    match = re.fullmatch(r"iter_(\d{7,})", checkpoint.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The published checkpoints under ``root``, oldest first."""
    found = [p.parent for p in Path(root).glob(f"iter_*/{TRAIN_STATE}")]
    ours = [c for c in found if checkpoint_iteration(c) is not None]
    return sorted(ours, key=checkpoint_iteration)


def _iteration(checkpoint: Path) -> int | str:
    # From the checkpoint's own record: a directory may have been renamed.
    try:
        return int(read_train_state(checkpoint)["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return "its iteration"


def _earlier_checkpoint_hint(checkpoint: Path) -> str:
    """How to resume from the newest complete checkpoint before ``checkpoint`` ('' if none)."""
    current = checkpoint_iteration(checkpoint)
    earlier = [
        p
        for p in complete_checkpoints(checkpoint.parent)
        if current is not None and checkpoint_iteration(p) < current
    ]
    if not earlier:
        return ""
    return (
        f"; to resume from {earlier[-1].name} instead, write {_iteration(earlier[-1])} into "
        f"{checkpoint.parent / LATEST}"
    )


def resume_checkpoint(load: str | os.PathLike, save: str | os.PathLike | None) -> Path | None:
    """The checkpoint ``--load`` resumes, or None on the first run of a job.

    None only where ``load`` is also the ``--save`` directory and holds no checkpoint yet: a job
    re-queued with the same flags finds its own checkpoints there later. Anything else without a
    run to resume is refused, since the run would otherwise quietly start from fresh weights.

    Raises:
        CheckpointLoadError: ``load`` is one checkpoint rather than its run's directory, weights
            without a training state, checkpoints without the pointer naming one, or holds
            nothing and is not ``save``.
    """
    latest = latest_checkpoint(load)
    if latest is not None:
        return latest
    load = Path(load)
    if (load / TRAIN_STATE).is_file():
        raise CheckpointLoadError(
            f"--load {load}: one checkpoint of the run in {load.parent}; --load takes the run's "
            f"directory and resumes the checkpoint its {LATEST} names (to resume this one, write "
            f"{_iteration(load)} into {load.parent / LATEST})"
        )
    if (load / METADATA).is_file():
        raise CheckpointLoadError(
            f"--load {load}: weights without a training state (as `megatron-ext convert` writes "
            f"them); start a run from them with --pretrained-checkpoint {load}"
        )
    done = complete_checkpoints(load)
    if done:
        raise CheckpointLoadError(
            f"--load {load}: holds checkpoints up to {done[-1].name} but no {LATEST} naming the "
            f"one to resume: write its iteration (e.g. {_iteration(done[-1])}) into it"
        )
    if save is None or load.resolve() != Path(save).resolve():
        found = f"no {LATEST}" if load.is_dir() else "no such directory"
        raise CheckpointLoadError(
            f"--load {load}: no checkpoint there ({found}); a job that starts afresh and resumes "
            "itself later passes the same directory as --save and --load"
        )
    return None


def _layout() -> dict[str, int]:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


def _rng_object(state: Any) -> ShardedObject:
    """This rank's RNG states as one entry of a (PP, TP, DP) grid."""
    layout = _layout()
    return ShardedObject(
        "rng_state",
        state,
        (
            layout["pipeline_model_parallel_size"],
            layout["tensor_model_parallel_size"],
            layout["data_parallel_size"],
        ),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(),
        ),
        replica_id=0,
    )


def _rng_state() -> dict[str, Any]:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def optimizer_format(distributed: bool, fully_reshardable: bool = False) -> str:
    """How a run's optimizer state is laid out in its checkpoints.

    ``replicated``: the regular optimizer's state, a tensor per parameter and state, resharded on
    load like the model. ``dp_reshardable``: megatron-core's distributed optimizer writes each
    rank's shard of its flat buffers as it is, without communication (Megatron-LM's default);
    it loads at another data-parallel size only. ``fully_reshardable`` (Megatron-LM's
    ``--dist-ckpt-optim-fully-reshardable``): each save gathers the distributed optimizer's
    shards over the data-parallel ranks into host memory and writes them a tensor per parameter,
    like the regular optimizer's; it loads at any TP, PP and data-parallel size.
    """
    if not distributed:
        return "replicated"
    return "fully_reshardable" if fully_reshardable else "dp_reshardable"


def _inner_optimizers(optimizer) -> list:
    """The optimizers a megatron-core ``ChainedOptimizer`` chains (or ``optimizer`` alone)."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _fill_fresh_optimizer_state(optimizer) -> None:
    """Give an optimizer that has not stepped yet the state a step would create (all zero).

    megatron-core's distributed optimizer, over torch's Adam (no apex or TE), takes its step count
    from the Adam state, which is empty until the first update: saving or loading through a
    fresh one (a run resuming, a new stage) fails on an assertion. Zero moments at step 0 are
    what Adam starts from anyway.
    """
    for inner in _inner_optimizers(optimizer):
        inner.init_state_fn(inner.optimizer, inner.config)
        for param_state in inner.optimizer.state.values():
            param_state.setdefault("step", torch.tensor(0.0))


def _restore_adam_steps(optimizer) -> None:
    """Set each parameter's torch Adam step from its group's, as the checkpoint recorded it.

    Without apex or TE, megatron-core's distributed optimizer saves torch Adam's per-parameter
    step counters as one ``step`` per parameter group. Its load leaves the counters at the fresh
    optimizer's value, or makes every parameter share one tensor that Adam then increments once
    per parameter: either way the bias correction after a resume would not be the saved run's.
    """
    for inner in _inner_optimizers(optimizer):
        if not isinstance(inner, DistributedOptimizer):
            continue
        for group in inner.optimizer.param_groups:
            # apex/TE's Adam counts in the group alone: its parameters' states have no step.
            for param in group["params"] if "step" in group else []:
                if "step" in inner.optimizer.state.get(param, {}):
                    inner.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))


@contextlib.contextmanager
def _keeping_torch_adam_steps(optimizer, optimizer_format: str) -> Iterator[None]:
    """Let megatron-core load a ``fully_reshardable`` optimizer state into torch's Adam.

    megatron-core 0.16 copies every entry of each parameter's Adam state from the checkpoint,
    which keeps the step per parameter group, not per parameter as torch's Adam (no apex or TE)
    does: a ``step`` KeyError. Here each parameter's own step is handed back unchanged;
    :func:`_restore_adam_steps` then sets it from the group's.
    """
    if optimizer_format != "fully_reshardable":
        yield
        return
    patched = [
        inner for inner in _inner_optimizers(optimizer) if isinstance(inner, DistributedOptimizer)
    ]
    for inner in patched:
        set_states = inner._set_main_param_and_optimizer_states

        def set_states_keeping_step(model_param, tensors, inner=inner, set_states=set_states):
            own = inner._get_main_param_and_optimizer_states(model_param)
            set_states(model_param, {"step": own["step"], **tensors} if "step" in own else tensors)

        inner._set_main_param_and_optimizer_states = set_states_keeping_step
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # the class's method again


def _drop_ungathered_param_state(optimizer_state: dict[str, Any]) -> None:
    """Leave out the ``param_state: None`` of ranks that a one-rank gather left without it.

    With the ``fully_reshardable`` gather on the first data-parallel rank alone, the others
    report ``None``; the first rank's common state has no such key once its tensors are taken
    out, so megatron-core would warn at every save that the ranks' common states differ.
    """
    chained = [part for part in optimizer_state.values() if isinstance(part, dict)]
    for part in [optimizer_state, *chained]:
        if "param_state" in part and part["param_state"] is None:
            del part["param_state"]


def _sharded_state(
    model_state: dict[str, Any],
    optimizer,
    optimizer_format: str | None,
    is_loading: bool,
    with_rng: bool,
    gather_on_one_rank: bool = False,
) -> dict[str, Any]:
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        _fill_fresh_optimizer_state(optimizer)
        # megatron-core's default for the distributed optimizer, "fully_sharded_model_space",
        # can no longer be written (its ShardedTensors use flattened_range, which 0.16 refuses).
        metadata = (
            None
            if optimizer_format == "replicated"
            else {
                "distrib_optim_sharding_type": optimizer_format,
                # fully_reshardable: gather on the first data-parallel rank alone, over gloo,
                # rather than on every rank over NCCL (which needs CUDA).
                "distrib_optim_fully_reshardable_mem_efficient": gather_on_one_rank
                or not torch.cuda.is_available(),
            }
        )
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata=metadata
        )
        _drop_ungathered_param_state(state["optimizer"])
    if with_rng:
        state["rng_state"] = _rng_object(_rng_state())
    return state


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


class CheckpointWriter:
    """Writes checkpoints into one root, in the background with ``async_save``.

    With ``async_save`` megatron-core's asynchronous ``dist_checkpointing`` copies the state off
    the GPU and a separate process writes the files while training goes on; the checkpoint is
    published (renamed from its temporary directory, then named by the ``latest`` pointer) only
    once every rank has written its part, when :meth:`poll` or :meth:`wait` finds it done. At
    most one save is in flight: the next :meth:`save` waits for the previous one first.

    Args:
        save: The checkpoint root.
        keep_last: Delete all but the newest ``keep_last`` checkpoints (0: keep all).
        async_save: Write in the background.
        optimizer_format: The optimizer state's layout (see :func:`optimizer_format`).
        gather_on_one_rank: ``fully_reshardable``: gather the optimizer state on the first
            data-parallel rank alone (Megatron-LM's
            ``--distrib-optim-fully-reshardable-mem-efficient``; always so without CUDA).
    """

    def __init__(
        self,
        save: str | os.PathLike,
        keep_last: int = 0,
        async_save: bool = False,
        optimizer_format: str = "replicated",
        gather_on_one_rank: bool = False,
    ):
        self.save_dir = Path(save)
        self.keep_last = keep_last
        self.optimizer_format = optimizer_format
        self.gather_on_one_rank = gather_on_one_rank
        self._queue = AsyncCallsQueue() if async_save else None
        self._in_flight: Path | None = None  # the staging directory of a background save

    def save(
        self,
        iteration: int,
        model,
        optimizer,
        train_state: dict[str, Any],
        metadata: dict[str, Any],
    ) -> Path:
        """Start the checkpoint of ``iteration`` on all ranks (collective).

        Args:
            iteration: Iterations completed.
            model: This rank's (unwrapped) model chunk.
            optimizer: The megatron-core optimizer.
            train_state: JSON-able loop state (written by rank 0).
            metadata: ``megatron_ext.json`` contents (architecture, vocabulary, dtype).

        Returns:
            The checkpoint directory it will have once published (at once without async).
        """
        self.wait()
        final = checkpoint_dir(self.save_dir, iteration)
        staging = final.with_name(final.name + WRITING)
        if dist.get_rank() == 0:
            # Half-written checkpoints of killed jobs (one job writes to a checkpoint directory).
            for stale in [
                *self.save_dir.glob(f"iter_*{WRITING}"),
                *self.save_dir.glob(f"iter_*{DELETING}"),
            ]:
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        sharded = _sharded_state(
            model.sharded_state_dict(),
            optimizer,
            self.optimizer_format,
            is_loading=False,
            with_rng=True,
            gather_on_one_rank=self.gather_on_one_rank,
        )
        train_state = {**train_state, "optimizer_format": self.optimizer_format}
        publish = functools.partial(
            self._publish, staging, final, iteration, train_state, dict(metadata)
        )
        try:
            request = dist_checkpointing.save(
                sharded,
                str(staging),
                sharded_strategy=_save_strategy(),
                async_sharded_save=self._queue is not None,
            )
            if request is None:
                publish()
        except DIST_CHECKPOINT_ERRORS as err:
            raise self._save_error(staging, err) from err
        if request is not None:
            request.add_finalize_fn(publish)
            self._queue.schedule_async_request(request)
            self._in_flight = staging
        return final

    def poll(self) -> None:
        """Publish a background save that every rank has finished (collective; cheap)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Finish and publish a background save (collective)."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self._queue is None or not self._queue.get_num_unfinalized_calls():
            return
        try:
            self._queue.maybe_finalize_async_calls(blocking=blocking)
        except DIST_CHECKPOINT_ERRORS as err:  # a writer failed: every rank raises here
            raise self._save_error(self._in_flight, err) from err

    def _save_error(self, staging: Path | None, err: BaseException) -> CheckpointSaveError:
        """What a failed save says: the checkpoint, the cause's last line, what is left."""
        free = shutil.disk_usage(self.save_dir).free / 2**30
        try:
            latest = latest_checkpoint(self.save_dir)
        except CheckpointLoadError:
            latest = None
        if latest is None:
            left = "There is no complete checkpoint there yet."
        else:
            left = f"The latest complete checkpoint, {latest.name}, is intact: --load resumes it."
        return CheckpointSaveError(
            f"{staging}: the checkpoint could not be written ({error_cause(err)}); {free:,.1f} GiB "
            f"free on that file system. {left}"
        )

    def _publish(
        self,
        staging: Path,
        final: Path,
        iteration: int,
        train_state: dict[str, Any],
        metadata: dict[str, Any],
    ) -> None:
        # Called after megatron-core's own finalize step, whose barrier follows every rank's
        # writes (at once without async; once all writers are done with it).
        if dist.get_rank() == 0:
            _write_json(staging / METADATA, metadata)
            _write_json(staging / TRAIN_STATE, {**train_state, "layout": _layout()})
            # Re-saving an iteration after a resume: the new one replaces it, and the old one is
            # deleted once the pointer names the new one.
            replaced = _set_aside(final) if final.exists() else None
            os.replace(staging, final)
            pointer = self.save_dir / LATEST
            tmp_pointer = pointer.with_name(pointer.name + ".tmp")
            with open(tmp_pointer, "w", encoding="utf-8") as f:
                f.write(f"{iteration}\n")
                f.flush()
                os.fsync(f.fileno())  # or a power cut can leave the renamed pointer empty
            os.replace(tmp_pointer, pointer)
            _fsync_dir(self.save_dir)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
            if self.keep_last:
                _prune(self.save_dir, self.keep_last, final)
            if self._queue is not None:
                print(f"checkpoint {final} complete", flush=True)
        dist.barrier()


def _save_strategy() -> SaveShardedStrategy:
    """megatron-core's default writer, its work spread over the data-parallel replicas.

    Weights are replicated across data-parallel ranks and megatron-core otherwise has the first
    replica write all of them; here each replica writes a share (Megatron-LM's default
    ``--ckpt-fully-parallel-save``). The files are the same either way.
    """
    strategy = get_default_save_sharded_strategy()
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) == 1:
        return strategy
    return FullyParallelSaveStrategyWrapper(strategy, group)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(save: Path, keep_last: int, latest: Path) -> None:
    """Delete all but the ``keep_last`` newest checkpoints up to ``latest``.

    Later ones are not this run's (a run started with ``--force``, or rolled back): counted,
    they would get this run's own newest checkpoints deleted, the one the pointer names too.
    They stay until this run writes their iterations again.
    """
    last = checkpoint_iteration(latest)
    ours = [c for c in complete_checkpoints(save) if checkpoint_iteration(c) <= last]
    for old in ours[:-keep_last]:
        shutil.rmtree(_set_aside(old), ignore_errors=True)


def _set_aside(checkpoint: Path) -> Path:
    """Rename ``checkpoint`` out of the checkpoints' names, to be deleted.

    Deleting a large checkpoint takes minutes: a pre-empted job killed meanwhile would leave a
    half-deleted one under its name, looking whole (``train_state.json`` may be among the files
    left). The next save removes what such a deletion left.
    """
    aside = checkpoint.with_name(checkpoint.name + DELETING)
    os.replace(checkpoint, aside)
    return aside


def mark_interrupted(save: str | os.PathLike, reason: str | None, iteration: int) -> None:
    """Record that the run stopped early (a job script then re-queues it), or clear the record."""
    path = Path(save) / INTERRUPTED
    if reason is None:
        path.unlink(missing_ok=True)
    else:
        _write_json(path, {"reason": reason, "iteration": iteration})


def read_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``train_state.json`` of a checkpoint."""
    return read_json_file(Path(path) / TRAIN_STATE)


def _saved_optimizer_format(
    path: Path, train_state: dict[str, Any], distributed: bool, bf16: bool
) -> str:
    """The format to read the checkpoint's optimizer state in, if this run's optimizer can.

    Refused here is what megatron-core would fail on deep inside, or misread.
    """
    saved = train_state.get("optimizer_format", "replicated")
    way_out = (
        "resume with the settings it was saved with, or pass --no-load-optim to restore the "
        "weights and start the optimizer state afresh"
    )
    saved_bf16 = train_state.get("config", {}).get("bf16")
    if saved_bf16 is not None and saved_bf16 != bf16:
        # Mixed precision keeps fp32 main weights in the optimizer state; fp32 runs do not.
        raise CheckpointLoadError(
            f"{path}: its optimizer state was saved {'with' if saved_bf16 else 'without'} "
            f"--bf16 and this run is {'bf16' if bf16 else 'fp32'}: {way_out}"
        )
    if (saved != "replicated") != distributed:
        current = "distributed" if distributed else "replicated"
        raise CheckpointLoadError(
            f"{path}: its optimizer state is {saved}, this run's optimizer is {current} "
            f"(--use-distributed-optimizer): {way_out}"
        )
    here = _layout()
    saved_at = train_state.get("layout", {})
    model_parallel = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    if saved == "dp_reshardable" and any(saved_at.get(k) != here[k] for k in model_parallel):
        raise CheckpointLoadError(
            f"{path}: its distributed-optimizer state was saved dp_reshardable at TP="
            f"{saved_at.get(model_parallel[0])} PP={saved_at.get(model_parallel[1])}, which loads "
            f"at another data-parallel size only (this run: TP={here[model_parallel[0]]} "
            f"PP={here[model_parallel[1]]}): {way_out} (runs saving with "
            "--dist-ckpt-optim-fully-reshardable can change TP and PP)"
        )
    return saved


def load_checkpoint(
    path: str | os.PathLike, model, optimizer, distributed_optimizer: bool = False
) -> dict[str, Any]:
    """Restore model, optimizer (None: weights only) and, if the layout matches, RNG states.

    Args:
        path: The checkpoint directory.
        model: This rank's (unwrapped) model chunk.
        optimizer: The megatron-core optimizer to restore, or None.
        distributed_optimizer: Whether ``optimizer`` is megatron-core's distributed one.

    Returns:
        The checkpoint's train state.

    Raises:
        CheckpointLoadError: The checkpoint cannot be read, or its optimizer state not into
            ``optimizer`` (the other kind, or ``dp_reshardable`` at another TP/PP size).
    """
    train_state = read_train_state(path)
    same_layout = train_state.get("layout") == _layout()
    optimizer_format = (
        None
        if optimizer is None
        else _saved_optimizer_format(
            Path(path),
            train_state,
            distributed_optimizer,
            bf16=any(p.dtype == torch.bfloat16 for p in model.parameters()),
        )
    )
    sharded = _sharded_state(
        model_sharded_state(model),
        optimizer,
        optimizer_format,
        is_loading=True,
        with_rng=same_layout,
    )
    try:
        state = load_dist_checkpoint(sharded, path)
    except CheckpointError as err:
        raise CheckpointLoadError(f"{err}{_earlier_checkpoint_hint(Path(path))}") from err
    apply_model_state(model, state["model"], path)
    if optimizer is not None:
        # fp32 runs: the distributed optimizer's main weights are views of the parameters.
        with torch.no_grad(), _keeping_torch_adam_steps(optimizer, optimizer_format):
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
    if same_layout:
        _set_rng_state(state["rng_state"])
    else:
        logger.warning(
            "%s: saved with %s, resumed with %s: RNG states start afresh",
            path,
            train_state.get("layout"),
            _layout(),
        )
    return train_state
