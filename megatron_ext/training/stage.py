"""What one training stage trains with: frozen parameters, DDP, optimizer, LR schedule, step.

Each stage builds megatron-core's ``DistributedDataParallel``, optimizer and
``OptimizerParamScheduler`` anew around the model, because what a stage trains decides what DDP
and the optimizer hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.model.gpt import LlamaGPTModel
from megatron_ext.training.config import ConfigError, StageConfig, TrainConfig
from megatron_ext.training.model import ModelPlan

EMBEDDING_WEIGHT = "embedding.word_embeddings.weight"
OUTPUT_WEIGHT = "output_layer.weight"


def _trainable(name: str, stage: StageConfig) -> bool:
    return stage.trainable == "all" or name in (EMBEDDING_WEIGHT, OUTPUT_WEIGHT)


def new_rows(stage: StageConfig, plan: ModelPlan) -> tuple[int, int] | None:
    """Global ids whose embedding/output rows a ``new_rows_only`` stage trains."""
    if not stage.new_rows_only:
        return None
    if plan.base_vocab_size is None:
        raise ConfigError(
            f"stage {stage.name!r}: new_rows_only needs --base-vocab-size (or a converted "
            "checkpoint that records it)"
        )
    if plan.base_vocab_size >= plan.arch.vocab_size:
        raise ConfigError(
            f"stage {stage.name!r}: new_rows_only, but there are no new rows (base vocabulary "
            f"{plan.base_vocab_size}, vocabulary {plan.arch.vocab_size})"
        )
    return (plan.base_vocab_size, plan.arch.vocab_size)


def _mask_frozen_rows(module: LlamaGPTModel, rows: tuple[int, int]) -> None:
    """Zero the gradient of embedding/output rows outside ``rows`` (this rank's vocab shard)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in module.named_parameters():
        if name in (EMBEDDING_WEIGHT, OUTPUT_WEIGHT) and param.requires_grad:
            shard = param.shape[0]
            ids = torch.arange(shard, device=param.device) + tp_rank * shard
            frozen = (ids < rows[0]) | (ids >= rows[1])
            grad = param.main_grad if hasattr(param, "main_grad") else param.grad
            if grad is not None:
                grad[frozen] = 0


@dataclass
class StageRun:
    """What one stage trains with."""

    module: LlamaGPTModel
    model: DistributedDataParallel
    optimizer: Any
    scheduler: OptimizerParamScheduler

    def gather_params(self) -> None:
        """Bring every weight on this rank up to date before it is read outside training.

        With ``overlap_param_gather`` an optimizer step updates only this rank's shard; the
        others arrive bucket by bucket in the next training forward pass (megatron-core's
        forward pre-hooks, re-armed by ``zero_grad_buffer``). Validation, a checkpoint or a
        new stage would otherwise read the previous step's weights (as Megatron-LM, which
        syncs before each).
        """
        if self.model.use_forward_hook:
            self.model.start_param_sync(force_sync=True)


def build_stage(
    config: TrainConfig, plan: ModelPlan, stage: StageConfig, module: LlamaGPTModel
) -> StageRun:
    """Freeze what ``stage`` does not train, then wrap ``module`` in DDP and build its optimizer."""
    for name, param in module.named_parameters():
        param.requires_grad = _trainable(name, stage)
    rows = new_rows(stage, plan)
    if rows is not None and config.kernels == "fused":
        module.set_trainable_rows(rows)  # the embedding then skips the frozen rows outright
    elif config.kernels == "fused":
        module.set_trainable_rows(None)

    def finalize(model_chunks, *args, **kwargs):
        # After the data-parallel reductions: with overlap_grad_reduce they start during backward.
        result = finalize_model_grads(model_chunks, *args, **kwargs)
        if rows is not None:
            _mask_frozen_rows(module, rows)
        return result

    module.config.finalize_model_grads_func = finalize
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=config.overlap_grad_reduce,
        overlap_param_gather=config.overlap_param_gather,
        bucket_size=config.ddp_bucket_size,
        use_distributed_optimizer=config.use_distributed_optimizer,
    )
    model = DistributedDataParallel(module.config, ddp_config, module)
    # As Megatron-LM does: with overlap, only the last micro-batch of a step starts reductions.
    module.config.no_sync_func = model.no_sync if config.overlap_grad_reduce else None
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=stage.lr,
            min_lr=stage.min_lr,
            weight_decay=stage.weight_decay,
            adam_beta1=config.adam_beta1,
            adam_beta2=config.adam_beta2,
            adam_eps=config.adam_eps,
            clip_grad=0.0,  # clipped in optimizer_step, after the non-finite check
            bf16=config.bf16,
            params_dtype=plan.dtype,
            use_distributed_optimizer=config.use_distributed_optimizer,
        ),
        [model],
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=stage.lr,
        min_lr=stage.min_lr,
        lr_warmup_steps=stage.lr_warmup_iters,
        lr_decay_steps=stage.train_iters,
        lr_decay_style=stage.lr_decay_style,
        wsd_decay_steps=stage.lr_wsd_decay_iters,
        lr_wsd_decay_style=stage.lr_wsd_decay_style,
        start_wd=stage.weight_decay,
        end_wd=stage.weight_decay,
        wd_incr_steps=stage.train_iters,
        wd_incr_style="constant",
    )
    # Iteration k of a stage (1-based) uses the schedule's value at k: no zero-lr first step.
    scheduler.step(1)
    return StageRun(module, model, optimizer, scheduler)


def optimizer_step(optimizer, clip_grad: float) -> tuple[bool, float]:
    """Clip and apply the gradients unless their norm is NaN/Inf; returns (applied, norm)."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        return False, grad_norm
    if clip_grad > 0:
        _clip_grads(optimizer.get_parameters(), clip_grad, grad_norm)
    optimizer.step_with_ready_grads()
    return True, grad_norm


def _clip_grads(params: list[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale the (main) gradients so that their global norm is at most ``max_norm``.

    megatron-core's ``clip_grad_by_total_norm_fp32`` with the same coefficient, without its
    CUDA-only type assertion.
    """
    coefficient = max_norm / (total_norm + 1e-6)
    grads = [p.grad for p in params if p.grad is not None]
    if coefficient < 1.0 and grads:
        torch._foreach_mul_(grads, coefficient)
