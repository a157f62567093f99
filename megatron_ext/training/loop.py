"""The training loop: stages in order, megatron-core schedules, validation, checkpoints, faults.

One call, :func:`train`, runs a whole configuration on the processes of the current job (one
process per GPU under ``torchrun``/``srun``, or gloo processes on a CPU). Each stage trains with
what :func:`~megatron_ext.training.stage.build_stage` builds; the weights carry over from stage
to stage.

The loss is summed over tokens in every micro-batch and divided once by the number of loss
tokens of the whole global batch (megatron-core's ``calculate_per_token_loss``), so runs with any
TP, PP, DP and micro-batch split optimise the same objective.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import distributed
from megatron_ext.checkpoint.convert import load_into, read_metadata
from megatron_ext.model.gpt import LlamaGPTModel
from megatron_ext.tokenizer.encoders import SentencePieceEncoder
from megatron_ext.tokenizer.metrics import characters_per_piece
from megatron_ext.training import checkpointing
from megatron_ext.training.config import (
    ConfigError,
    StageConfig,
    TrainConfig,
    config_dict,
    resume_changes,
)
from megatron_ext.training.data import (
    DATA_ORDER,
    HELD_OUT_SPLIT,
    Batch,
    DatasetTokenizer,
    build_datasets,
    check_datasets,
    dataset_reads,
    micro_batches,
    repeated_validation_warnings,
    training_data_summary,
)
from megatron_ext.training.metrics import MetricsLog
from megatron_ext.training.model import (
    build_model,
    kernel_summary,
    plan_warnings,
    resolve_arch,
    training_device,
)
from megatron_ext.training.plan import peak_tflops, training_flops_per_token
from megatron_ext.training.signals import SigtermLatch
from megatron_ext.training.stage import StageRun, build_stage, optimizer_step

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss with ``on_nonfinite: stop``, too many skips)."""


@dataclass
class LoopState:
    """Where the run is; saved in every checkpoint (``train_state.json``)."""

    iteration: int = 0
    stage: int = 0
    stage_iteration: int = 0
    skipped_iters: int = 0
    consecutive_skips: int = 0
    scheduler_steps: int = 0
    # The data position: samples of the blend read so far (the global batch size may change
    # between runs, as with a batch-size ramp).
    consumed_samples: int = 0
    # A stop skipped this iteration's periodic validation to save first: the resumed run runs it.
    validation_due: bool = False


@dataclass
class TrainResult:
    """What a run did (on every rank; losses are known on the last pipeline stage)."""

    iteration: int
    losses: list[float] = field(default_factory=list)
    skipped_iters: int = 0
    checkpoint: str | None = None
    interrupted: str | None = None
    valid: dict[str, dict[str, float]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0  # end to end: set-up, checkpoints and validation included
    step_seconds: float = 0.0  # in the training iterations alone


def _forward_step(char_table: torch.Tensor | None, data_iterator, model):
    batch: Batch = next(data_iterator)
    loss_sum = model(
        batch.tokens,
        batch.position_ids,
        batch.attention_mask,
        labels=batch.labels,
        loss_mask=batch.loss_mask,
    )
    return loss_sum, partial(_loss_func, char_table, batch)


def _loss_func(char_table: torch.Tensor | None, batch: Batch, loss_sum: torch.Tensor):
    """Megatron-core's loss-function contract; ``char_table`` None: no character count."""
    tokens = batch.loss_mask.sum()
    if char_table is None:  # training: bits per character are only reported for validation
        chars = torch.zeros((), device=tokens.device)
    else:
        chars = (char_table[batch.labels] * batch.loss_mask).sum()
    report = torch.stack([loss_sum.detach().float(), tokens.float(), chars.float()])
    return loss_sum, tokens.to(torch.int), {"lm loss": report}


def _reduce_report(losses_reduced: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """[loss sum, tokens, characters] over micro-batches and DP ranks (last stage), else None."""
    if not parallel_state.is_pipeline_last_stage():
        return None
    if losses_reduced:
        total = torch.stack([x["lm loss"] for x in losses_reduced]).sum(0)
    else:
        total = torch.zeros(3, device=training_device())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total


def _writable_directory(flag: str, directory: str | None) -> None:
    """Create ``directory`` if needed; a ConfigError naming ``flag`` if it cannot be written."""
    if not directory:
        return
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag} {directory}: cannot create it ({err.strerror})") from err
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"{flag} {directory}: not writable")


class StopRequest:
    """Decides, the same on every rank, when a run should save and stop early.

    Two reasons: a SIGTERM (Slurm pre-emption, ``scancel``) when ``exit_signal_handler`` is on,
    and ``exit_duration_in_mins`` elapsed since ``started`` (a ``time.monotonic()``; leave time
    to save before a job's time limit). One all-reduce per iteration makes every rank agree.
    """

    def __init__(
        self, exit_signal_handler: bool, exit_duration_in_mins: float | None, started: float
    ) -> None:
        self.reason: str | None = None
        self._signalled = False
        self._started = started
        self._limit = None if exit_duration_in_mins is None else 60 * exit_duration_in_mins
        self._previous = None
        if exit_signal_handler:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            # One that came while the command was still importing (SigtermLatch) counts.
            self._signalled = isinstance(self._previous, SigtermLatch) and self._previous.fired

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    def check(self, time_budget: bool = True) -> bool:
        """True (on every rank) once any rank was signalled or (``time_budget``) it is spent."""
        timed_out = self._limit is not None and time.monotonic() - self._started > self._limit
        flags = torch.tensor([int(self._signalled), int(timed_out)], device=training_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            self.reason = "SIGTERM"
        elif flags[1] and time_budget:
            self.reason = "--exit-duration-in-mins"
        return self.reason is not None

    def restore(self) -> None:
        """Put back the previous SIGTERM handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """Runs a :class:`TrainConfig` on the processes of this job."""

    def __init__(self, config: TrainConfig) -> None:
        # The time budget counts the set-up (checkpoint loading, dataset indices) too: the job's
        # time limit does.
        self.started = time.monotonic()
        self.config = config
        # From the start: a job pre-empted while it builds dataset indices or loads a checkpoint
        # still stops cleanly (and is re-queued) rather than dying on the default handler.
        self.stop = StopRequest(
            config.exit_signal_handler, config.exit_duration_in_mins, self.started
        )
        try:
            self._set_up(config)
        except BaseException:
            self.stop.restore()
            raise

    def _set_up(self, config: TrainConfig) -> None:
        if launched_apart := distributed.launch_without_torchrun():
            raise ConfigError(launched_apart)
        # Before megatron-core splits the processes, which would fail with a bare RuntimeError.
        self.world_size = distributed.job_world_size()
        config.validate(self.world_size)
        # Before hours of training, not at the first save.
        _writable_directory("--save", config.save)
        _writable_directory("--tensorboard-dir", config.tensorboard_dir)
        distributed.init(
            config.tensor_model_parallel_size, config.pipeline_model_parallel_size, seed=config.seed
        )
        self.device = training_device()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_logger = dist.get_rank() == self.world_size - 1  # on the last pipeline stage
        tokenizer = SentencePieceEncoder(config.tokenizer_model, num_threads=1)
        self.char_table = torch.from_numpy(characters_per_piece(tokenizer.processor)).to(
            self.device
        )
        self.resume = (
            checkpointing.resume_checkpoint(config.load, config.save) if config.load else None
        )
        # A run continues its --save directory only when it resumes from that directory.
        self.continues_save = bool(
            config.save
            and self.resume is not None
            and Path(config.load).resolve() == Path(config.save).resolve()
        )
        if config.save and not self.continues_save and not config.force:
            existing = checkpointing.complete_checkpoints(config.save)
            if existing:
                raise ConfigError(
                    f"--save {config.save} already holds another run's checkpoints (newest: "
                    f"{existing[-1].name}): resume it with --load {config.save}, choose another "
                    "--save, or pass --force to start this run there (replacing them)"
                )
            log = Path(config.save) / "metrics.jsonl"
            # With --load naming it too, an earlier attempt of this job that saved no checkpoint
            # (a re-queued job killed early): its iterations are redone, and logged anew.
            this_job = config.load and Path(config.load).resolve() == Path(config.save).resolve()
            if log.is_file() and log.stat().st_size and not this_job:
                raise ConfigError(
                    f"--save {config.save} already holds an earlier run's {log.name} and no "
                    "checkpoint to resume: choose another --save, or pass --force to start this "
                    "run there (replacing it)"
                )
        self.checkpoints = (
            checkpointing.CheckpointWriter(
                config.save,
                config.keep_last_checkpoints,
                config.async_save,
                checkpointing.optimizer_format(
                    config.use_distributed_optimizer, config.dist_ckpt_optim_fully_reshardable
                ),
                config.distrib_optim_fully_reshardable_mem_efficient,
            )
            if config.save
            else None
        )
        self.start = LoopState()
        saved_data_order = None
        if self.resume is not None:
            saved = checkpointing.read_train_state(self.resume)
            saved_data_order = saved.get("data_order")
            self.start = LoopState(**{k: saved[k] for k in asdict(self.start) if k in saved})
            for warning in resume_changes(saved.get("config", {}), config):
                self._log_rank0(warning)
        self.tokenizer_pieces_sha256 = tokenizer.pieces_sha256()
        self.plan = resolve_arch(
            config, tokenizer.vocab_size, self.resume, self.tokenizer_pieces_sha256
        )
        remaining = max(config.train_iters - self.start.iteration, 0) * config.global_batch_size
        dataset_tokenizer = DatasetTokenizer(tokenizer, config.tokenizer_model)
        self.tokenizer_sha256 = dataset_tokenizer.sha256
        held_out = config.held_out_prefixes
        for warning in [
            *check_datasets(config.data_blend[0], dataset_tokenizer, config.split),
            *check_datasets(held_out, dataset_tokenizer, HELD_OUT_SPLIT, "--valid-data-path"),
        ]:
            self._log_rank0(warning)
        tp, on_gpu = config.tensor_model_parallel_size, torch.cuda.is_available()
        for warning in (
            distributed.launch_warning(tp, on_gpu),
            *plan_warnings(self.plan.arch, config),
        ):
            if warning:
                self._log_rank0(warning)
        train_samples = self.start.consumed_samples + remaining
        self.datasets = build_datasets(config, dataset_tokenizer, train_samples)
        if train_samples:
            reads = dataset_reads(self.datasets.train, train_samples)
            names = config.dataset_names()
            self._log_rank0(training_data_summary(reads, train_samples, names))
            repeated = any(epochs > 1 for _, epochs in reads)
            if self.resume is not None and repeated and saved_data_order != DATA_ORDER:
                self._log_rank0(
                    f"warning: {self.resume.name} was saved by an earlier megatron-ext, which "
                    "ordered the samples of a dataset read more than once otherwise: from here "
                    "on some samples the run trained on may be read again"
                )
        for warning in repeated_validation_warnings(self.datasets.valid, config):
            self._log_rank0(warning)
        self.stages = config.resolved_stages()
        if self.resume is not None:
            self._check_resume_position()
        self.micro_batches = config.global_batch_size // (config.micro_batch_size * self.dp_size)
        self.flops_per_token = {
            trainable: training_flops_per_token(
                self.plan.arch,
                self.plan.padded_vocab_size,
                config.seq_length,
                layers_trainable=trainable == "all",
            )
            for trainable in {stage.trainable for stage in self.stages}
        }
        self.peak = peak_tflops(config.peak_tflops)
        self.forward_backward = get_forward_backward_func()

    def metadata(self) -> dict[str, Any]:
        """``megatron_ext.json`` of the checkpoints (read by ``convert megatron-to-hf``)."""
        return {
            "format": "megatron-core dist_checkpointing (torch_dist)",
            "arch": asdict(self.plan.arch),
            "vocab_size": self.plan.arch.vocab_size,
            "padded_vocab_size": self.plan.padded_vocab_size,
            "base_vocab_size": self.plan.base_vocab_size,
            "tensor_model_parallel_size": self.config.tensor_model_parallel_size,
            "pipeline_model_parallel_size": self.config.pipeline_model_parallel_size,
            "dtype": "bf16" if self.config.bf16 else "fp32",
            "tokenizer_sha256": self.tokenizer_sha256,
            "tokenizer_pieces_sha256": self.tokenizer_pieces_sha256,
            "source": self.config.pretrained_checkpoint,
        }

    def _batches(self, dataset, first_sample: int):
        return micro_batches(
            dataset,
            first_sample,
            self.config,
            self.dp_rank,
            self.dp_size,
            self.device,
            self.plan.arch.vocab_size,
        )

    def _run_schedule(self, run: StageRun, batches, forward_only: bool) -> torch.Tensor | None:
        return _reduce_report(
            self.forward_backward(
                forward_step_func=partial(_forward_step, self.char_table if forward_only else None),
                data_iterator=batches,
                model=[run.model],
                num_microbatches=self.micro_batches,
                seq_length=self.config.seq_length,
                micro_batch_size=self.config.micro_batch_size,
                forward_only=forward_only,
            )
        )

    def train_step(self, run: StageRun, state: LoopState) -> tuple[float | None, bool, float]:
        """One iteration: (loss on the last stage else None, update applied, grad norm)."""
        run.model.zero_grad_buffer()
        run.optimizer.zero_grad()
        report = self._run_schedule(
            run, self._batches(self.datasets.train, state.consumed_samples), forward_only=False
        )
        state.consumed_samples += self.config.global_batch_size
        applied, grad_norm = optimizer_step(run.optimizer, self.config.clip_grad)
        loss = None if report is None else float(report[0] / report[1].clamp_min(1))
        return loss, applied, grad_norm

    @torch.no_grad()
    def evaluate(self, run: StageRun) -> dict[str, dict[str, float]]:
        """Loss and bits per character of each validation set (on the last stage only)."""
        run.gather_params()
        run.model.eval()
        results = {}
        for name, dataset in self.datasets.valid.items():
            total = torch.zeros(3, device=self.device)
            for i in range(self.config.eval_iters):
                report = self._run_schedule(
                    run,
                    self._batches(dataset, i * self.config.global_batch_size),
                    forward_only=True,
                )
                if report is not None:
                    total += report
            loss_sum, tokens, chars = (float(x) for x in total)
            results[name] = {
                "loss": loss_sum / max(tokens, 1),
                "bpc": loss_sum / math.log(2) / max(chars, 1),
                "tokens": int(tokens),
            }
        run.model.train()
        return results if parallel_state.is_pipeline_last_stage() else {}

    def run(self) -> TrainResult:
        """Train to ``train_iters`` (or until SIGTERM); returns what happened."""
        config = self.config
        state = dataclasses.replace(self.start)
        if self.resume is not None:
            self._log_rank0(f"resuming from {self.resume} (iteration {state.iteration})")
        elif config.load:
            # As on a job's first run, where --load names the directory --save is about to fill.
            start = config.pretrained_checkpoint or "newly initialised weights"
            self._log_rank0(
                f"--load {config.load}: no checkpoint there yet (no "
                f"{checkpointing.LATEST!r} file); starting from {start}"
            )
        # A finished run resumed (re-run, or killed during its final validation) validates its
        # last checkpoint again; with nothing to validate there is no work.
        revalidate = (
            self.resume is not None and self._position(state) is None and config.eval_iters > 0
        )
        metrics = MetricsLog(
            Path(config.save) / "metrics.jsonl" if config.save and self.is_logger else None,
            config.tensorboard_dir if self.is_logger else None,
            resume_step=state.iteration if self.continues_save else None,
            revalidate=revalidate or state.validation_due,
            start_step=state.iteration,
        )
        if revalidate:
            self._log_rank0(f"{self.resume.name} ends the run: validating it again")
        stop = self.stop
        result = TrainResult(iteration=state.iteration)
        started, first_iteration = time.perf_counter(), state.iteration
        self._log_rank0(kernel_summary(config))
        module = build_model(config, self.plan)
        if self.resume is None and config.pretrained_checkpoint:
            load_into(module, config.pretrained_checkpoint)
            self._check_freeze_request(config.pretrained_checkpoint)
        resuming = self.resume is not None
        run = None
        try:
            # Signalled during the set-up: stop, nothing new to save. A time budget the set-up
            # spent still gets one iteration and its checkpoint: each re-queued job progresses.
            if stop.check(time_budget=False):
                result.interrupted = stop.reason
            if revalidate and not result.interrupted:
                run = self._finished_run(module, state)
            while not result.interrupted and (position := self._position(state)) is not None:
                state.stage, state.stage_iteration = position
                stage = self.stages[state.stage]
                if run is not None:
                    run.gather_params()
                    weights = run.module.state_dict()
                    # Free the finished stage's gradient buffers and optimizer state before the
                    # next stage's model exists; its weights live on in ``weights``.
                    run = module = None
                    gc.collect()  # the model and its config's finalize hook form a cycle
                    module = self._model_with(weights)
                    del weights
                run = build_stage(config, self.plan, stage, module)
                # Mid-stage, the optimizer and schedule continue; a new stage starts them afresh.
                continuing = resuming and state.stage_iteration > 0
                load_optimizer = continuing and not config.no_load_optim
                if resuming:
                    checkpointing.load_checkpoint(
                        self.resume,
                        module,
                        run.optimizer if load_optimizer else None,
                        config.use_distributed_optimizer,
                    )
                if not load_optimizer:
                    run.optimizer.reload_model_params()  # its fp32 main weights from the model's
                if continuing and config.no_load_optim:
                    self._log_rank0(
                        f"warning: --no-load-optim: {self.resume.name}'s optimizer state is not "
                        "loaded, Adam's moments start afresh (leave the flag out of later resumes)"
                    )
                if continuing:
                    run.scheduler.step(state.scheduler_steps - run.scheduler.num_steps)
                else:
                    state.scheduler_steps = run.scheduler.num_steps
                resuming = False
                self._log_rank0(
                    f"stage {state.stage + 1}/{len(self.stages)} {stage.name!r}: "
                    f"{stage.train_iters} iterations, trains {stage.trainable}"
                    + (" (new rows only)" if stage.new_rows_only else "")
                    + f", lr {stage.lr:g}"
                )
                if (config.eval_at_start and state.iteration == 0) or state.validation_due:
                    self._validate(run, state, metrics)
                    state.validation_due = False
                if self._train_stage(run, stage, state, metrics, stop, result):
                    result.interrupted = stop.reason
                    break
            if config.save:
                self.checkpoints.wait()  # a background save must be published to count
            if run is not None and not result.interrupted:
                # Validating again trains nothing: nothing new to save (in another --save too).
                if config.save and not revalidate and not self._saved_at(state.iteration):
                    self._save(run, state)
                result.valid = self._validate(run, state, metrics)
            if config.save:
                self.checkpoints.wait()
                if dist.get_rank() == 0:
                    checkpointing.mark_interrupted(config.save, result.interrupted, state.iteration)
        except TrainingError:
            # Raised on every rank alike (the grad norm is all-reduced), so the collective wait is
            # safe: the background save of the last healthy state is published, not abandoned.
            if config.save:
                self.checkpoints.wait()
            raise
        finally:
            stop.restore()
            metrics.close()
        result.iteration = state.iteration
        result.seconds = time.perf_counter() - started
        result.tokens = (state.iteration - first_iteration) * config.global_batch_size
        result.tokens *= config.seq_length
        result.skipped_iters = state.skipped_iters
        if config.save:
            latest = checkpointing.latest_checkpoint(config.save)
            result.checkpoint = str(latest) if latest else None
        return result

    def _check_resume_position(self) -> None:
        """Refuse a checkpoint this run's ``train_iters`` and stages cannot continue from.

        A checkpoint is a position in its run's stage list; with other stage lengths it would
        land in another stage, or past the last one, and the run would end early as "done".
        """
        saved, name = self.start, self.resume.name
        if saved.iteration > self.config.train_iters:
            raise ConfigError(
                f"{name} is at iteration {saved.iteration}, past this run's --train-iters "
                f"{self.config.train_iters}: nothing is left to train (raise --train-iters, or "
                "start a new run from it with --pretrained-checkpoint)"
            )
        lengths = [s.train_iters for s in self.stages]
        if saved.stage >= len(lengths) or (
            sum(lengths[: saved.stage]) + saved.stage_iteration != saved.iteration
        ):
            described = ", ".join(f"{s.name!r} {s.train_iters}" for s in self.stages)
            raise ConfigError(
                f"{name} was saved at iteration {saved.iteration}, {saved.stage_iteration} "
                f"iterations into stage {saved.stage + 1} of its run; this run's stages "
                f"({described} iterations) do not place iteration {saved.iteration} there. "
                "Resume with the stages it was saved with (its train_state.json's config), or "
                "start a new run from it with --pretrained-checkpoint"
            )

    def _position(self, state: LoopState) -> tuple[int, int] | None:
        """(stage, iteration within it) to continue from, past finished stages; None: done.

        A checkpoint keeps the position it was saved at, so a finished run resumed with a larger
        ``train_iters`` continues its last stage with the saved optimizer state.
        """
        stage, stage_iteration = state.stage, state.stage_iteration
        while stage < len(self.stages) and stage_iteration >= self.stages[stage].train_iters:
            stage, stage_iteration = stage + 1, 0
        return (stage, stage_iteration) if stage < len(self.stages) else None

    def _finished_run(self, module: LlamaGPTModel, state: LoopState) -> StageRun:
        """The last stage holding the finished checkpoint's weights (no optimizer state)."""
        run = build_stage(self.config, self.plan, self.stages[state.stage], module)
        checkpointing.load_checkpoint(
            self.resume, module, None, self.config.use_distributed_optimizer
        )
        return run

    def _model_with(self, weights: dict[str, Any]) -> LlamaGPTModel:
        """A fresh model holding ``weights``, for the next stage's DDP and optimizer."""
        module = build_model(self.config, self.plan)
        module.load_state_dict(weights)
        return module

    def _train_stage(
        self,
        run: StageRun,
        stage: StageConfig,
        state: LoopState,
        metrics: MetricsLog,
        stop: StopRequest,
        result: TrainResult,
    ) -> bool:
        """Iterate to the end of the stage; True if stopped early (after saving)."""
        config = self.config
        tokens_per_step = config.global_batch_size * config.seq_length
        while state.stage_iteration < stage.train_iters:
            start = time.perf_counter()
            loss, applied, grad_norm = self.train_step(run, state)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            result.step_seconds += elapsed
            state.iteration += 1
            state.stage_iteration += 1
            lr = run.optimizer.param_groups[0]["lr"]
            if applied:
                state.consecutive_skips = 0
                run.scheduler.step(1)
                state.scheduler_steps = run.scheduler.num_steps
            else:
                state.skipped_iters += 1
                state.consecutive_skips += 1
            if loss is not None:
                result.losses.append(loss)
            tokens_per_s = tokens_per_step / elapsed
            mfu = None
            if self.peak:
                flops_per_token = self.flops_per_token[stage.trainable]
                achieved = flops_per_token * tokens_per_s / self.world_size
                mfu = achieved / (self.peak * 1e12)
            entry = {
                "step": state.iteration,
                "stage": stage.name,
                "loss": _json_number(loss),
                "lr": lr,
                "grad_norm": _json_number(grad_norm),
                "tokens_per_s": tokens_per_s,
                "mfu": mfu,
                "skipped": not applied,
                "skipped_iters": state.skipped_iters,
                **self._consumed(state),
            }
            if self.is_logger:
                metrics.write(entry)
                if state.iteration % config.log_interval == 0 or state.iteration == 1:
                    print(_console_line(entry, config.train_iters), flush=True)
            if not applied:
                self._check_skip(state, grad_norm, loss)
            last = state.iteration == config.train_iters
            # A stop that comes with the last iteration lets the run end as finished: it saves
            # anyway, and a job re-queued on interrupted.json would have nothing left to do.
            interrupted = stop.check() and not last
            # A stopping run saves first: validation could outlast the grace time after SIGTERM.
            validate = config.eval_interval and state.iteration % config.eval_interval == 0
            if validate and not last:
                if interrupted:  # saved with the checkpoint: the resumed run validates first
                    state.validation_due = config.eval_iters > 0
                else:
                    self._validate(run, state, metrics)
            periodic = config.save_interval and state.iteration % config.save_interval == 0
            if config.save and (periodic or interrupted):
                self._save(run, state)
            elif config.save:
                self.checkpoints.poll()
            if interrupted:
                saved = "saved" if config.save else "not saved (no --save)"
                self._log_rank0(f"{stop.reason}: {saved} at iteration {state.iteration}, exiting")
                return True
        return False

    def _consumed(self, state: LoopState) -> dict[str, int]:
        return {
            "consumed_samples": state.consumed_samples,
            "consumed_tokens": state.consumed_samples * self.config.seq_length,
        }

    def _check_freeze_request(self, checkpoint: str) -> None:
        """Warn when a checkpoint converted with --freeze-base-rows meets no new-rows stage."""
        requested = read_metadata(checkpoint).get("freeze_base_rows")
        if requested and not any(s.new_rows_only for s in self.stages):
            self._log_rank0(
                f"warning: {checkpoint} was converted with --freeze-base-rows, but no stage "
                "trains only the new rows (add one: trainable: embeddings, new_rows_only: "
                "true, weight_decay: 0; see examples/configs/llama2-7b-ar.yaml)"
            )

    def _check_skip(self, state: LoopState, grad_norm: float, loss: float | None) -> None:
        """Stop on a non-finite update if so configured, or after too many in a row."""
        config = self.config
        message = f"iteration {state.iteration}: grad norm is {grad_norm} (loss {loss})"
        if config.on_nonfinite == "stop":
            raise TrainingError(f"{message}; stopping (--on-nonfinite stop)")
        if state.consecutive_skips > config.max_skipped_iters:
            raise TrainingError(
                f"{message}; {state.consecutive_skips} iterations in a row skipped "
                f"(--max-skipped-iters {config.max_skipped_iters})"
            )
        self._log_rank0(f"{message}: update skipped")

    def _saved_at(self, iteration: int) -> bool:
        latest = checkpointing.latest_checkpoint(self.config.save)
        return latest is not None and latest == checkpointing.checkpoint_dir(
            self.config.save, iteration
        )

    def _save(self, run: StageRun, state: LoopState) -> Path:
        run.gather_params()
        train_state = {
            **asdict(state),
            "config": config_dict(self.config),
            "data_order": DATA_ORDER,
        }
        path = self.checkpoints.save(
            state.iteration, run.module, run.optimizer, train_state, self.metadata()
        )
        self._log_rank0(
            f"saving {path} in the background" if self.config.async_save else f"saved {path}"
        )
        return path

    def _validate(
        self, run: StageRun, state: LoopState, metrics: MetricsLog
    ) -> dict[str, dict[str, float]]:
        if not self.config.eval_iters:
            return {}
        results = self.evaluate(run)
        if self.is_logger:
            for lang, values in results.items():
                metrics.write(
                    {
                        "step": state.iteration,
                        "split": "valid",
                        "lang": lang,
                        **values,
                        **self._consumed(state),
                    }
                )
                print(
                    f"validation {lang}: loss {values['loss']:.4f}, bpc {values['bpc']:.4f}",
                    flush=True,
                )
        return results

    def _log_rank0(self, message: str) -> None:
        if dist.get_rank() == 0:
            print(message, flush=True)


def _json_number(value: float | None) -> float | str | None:
    """``value``, or ``"nan"``/``"inf"`` as strings (JSON has no non-finite numbers)."""
    return value if value is None or math.isfinite(value) else str(value)


def _console_line(entry: dict[str, Any], total: int) -> str:
    loss = entry["loss"]
    loss = f"{loss:.4f}" if isinstance(loss, float) else str(loss)
    grad = entry["grad_norm"]
    grad = f"{grad:.3f}" if isinstance(grad, float) else grad
    mfu = "" if entry["mfu"] is None else f" | MFU {100 * entry['mfu']:.1f}%"
    return (
        f"iter {entry['step']}/{total} | {entry['stage']} | loss {loss} | lr {entry['lr']:.3g} | "
        f"grad norm {grad} | {entry['tokens_per_s']:,.0f} tokens/s{mfu}"
        + (" | skipped" if entry["skipped"] else "")
    )


def train(config: TrainConfig) -> TrainResult:
    """Run ``config`` on this job's processes (see :class:`Trainer`)."""
    return Trainer(config).run()
