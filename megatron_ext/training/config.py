r"""The training configuration: one dataclass, read from YAML, overridden with Megatron-LM flags.

YAML keys and command-line overrides use Megatron-LM's argument names (``train_iters`` in YAML
or ``--train-iters`` on the command line), so a Megatron user can bring a launch script along::

    megatron-ext train --config examples/configs/tiny.yaml --train-iters 200 \
        --data-path 0.25 data/en_text_document 0.75 data/ar_text_document --save ckpt

Training runs in *stages*, each with its own trainable parameters and learning-rate schedule
(warm-up, then decay). Without a ``stages`` list there is one stage training everything with the
top-level optimiser settings; a stage leaves out what it inherits from them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_ext.yamlfile import YamlFileError, read_yaml


class ConfigError(ValueError):
    """A configuration that cannot be used (the message names the file or flag)."""


TRAINABLE = ("all", "embeddings")
LR_DECAY_STYLES = ("cosine", "linear", "constant", "WSD")
# How WSD anneals over its last lr_wsd_decay_iters (megatron-core's choices).
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# megatron-core's recompute_modules that a dense Llama layer has.
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
# Smallest value of each numeric setting: sizes and counts start at 1; rates, intervals (0: off)
# and limits at 0. Settings that may be None are checked when set.
AT_LEAST = {
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "make_vocab_size_divisible_by": 1,
    # The first new id: 0 or below would make every row "new" (and 0 read as unset).
    "base_vocab_size": 1,
    "micro_batch_size": 1,
    "global_batch_size": 1,
    "seq_length": 1,
    "train_iters": 1,
    "eval_iters": 1,
    "log_interval": 1,
    "ddp_bucket_size": 1,
    "recompute_num_layers": 1,
    "lr": 0,
    "min_lr": 0,
    "lr_warmup_iters": 0,
    "lr_wsd_decay_iters": 1,
    "weight_decay": 0,
    "adam_beta1": 0,
    "adam_beta2": 0,
    "clip_grad": 0,
    "eval_interval": 0,
    "save_interval": 0,
    "keep_last_checkpoints": 0,
    "max_skipped_iters": 0,
    "seed": 0,
}
# Upper bounds. The seed shuffles the data through numpy's RandomState, which takes 32 bits.
AT_MOST = {"seed": 2**32 - 1}
# Settings that must be above 0 (when set).
POSITIVE = ("adam_eps", "exit_duration_in_mins", "peak_tflops")


@dataclass
class StageConfig:
    """One training stage.

    Attributes:
        name: Shown in logs and metrics.
        train_iters: Iterations in this stage; the last stage may leave it out and runs until the
            run's ``train_iters``.
        trainable: ``all`` or ``embeddings`` (input embedding and output layer only).
        new_rows_only: With ``embeddings``: only the rows of the new tokens (ids from the base
            vocabulary size on) change; the base rows stay bitwise unchanged (needs
            ``weight_decay: 0``).
        lr: Peak learning rate (None: the run's ``lr``); likewise the fields below.
        min_lr: Learning rate at the end of the decay.
        lr_warmup_iters: Linear warm-up from 0 over this many iterations of the stage.
        lr_decay_style: ``cosine``, ``linear`` or ``constant`` over the rest of the stage, or
            ``WSD``: constant, then annealed to ``min_lr`` over its last ``lr_wsd_decay_iters``.
        lr_wsd_decay_iters: With ``WSD``: the iterations of the anneal.
        lr_wsd_decay_style: With ``WSD``: the anneal's shape.
        weight_decay: AdamW weight decay.
    """

    name: str
    train_iters: int | None = None
    trainable: str = "all"
    new_rows_only: bool = False
    lr: float | None = None
    min_lr: float | None = None
    lr_warmup_iters: int | None = None
    lr_decay_style: str | None = None
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_style: str | None = None
    weight_decay: float | None = None


@dataclass
class TrainConfig:
    """Everything a training run needs; field names are Megatron-LM's argument names.

    Attributes:
        arch: A preset name (``llama2-7b``, ``tiny``, ...) or a mapping of ``LlamaArch`` fields,
            optionally with ``preset`` to start from. Taken from the checkpoint's metadata when
            ``pretrained_checkpoint`` is set.
        tokenizer_model: SentencePiece model; sets the vocabulary size and the end-of-document id.
        pretrained_checkpoint: A converted checkpoint (``megatron-ext convert``) to start from:
            weights only.
        base_vocab_size: First id of the new tokens for ``new_rows_only`` stages (default: the
            converted checkpoint's base vocabulary).
        kernels: ``fused`` (this project's embedding and linear cross-entropy kernels) or
            ``megatron`` (megatron-core's embedding, output layer and cross-entropy).
        transformer_impl: ``transformer_engine``, ``local`` or ``auto`` (TE on a GPU if installed).
        bf16: bf16 parameters and activations with fp32 main weights and gradients.
        recompute_activations: Megatron-LM's shorthand for ``recompute_granularity:
            selective`` (with megatron-core's default module, ``core_attn``).
        recompute_granularity: Activation recomputation (None: none). ``full`` keeps only the
            input of each group of layers (see ``recompute_method``) and runs the group again in
            backward; ``selective`` recomputes the parts of every layer in
            ``recompute_modules``.
        recompute_method: With ``full``: ``uniform`` checkpoints every group of
            ``recompute_num_layers`` layers of a pipeline stage; ``block`` only the first
            ``recompute_num_layers`` layers of each stage, the others keep their activations.
            Default ``uniform``.
        recompute_num_layers: With ``full``: layers per group (``uniform``) or layers
            recomputed per pipeline stage (``block``). Default 1.
        recompute_modules: With ``selective``: any of ``core_attn`` (attention's softmax; with
            fused attention, as here, it keeps next to nothing), ``mlp`` (the SwiGLU MLP's
            intermediate activations, the largest part of a layer's) and ``layernorm`` (the
            norms' outputs). Default: ``core_attn``, as in megatron-core.
        bias_swiglu_fusion: megatron-core's fused SwiGLU, ``silu(gate) * up`` in one compiled
            kernel (``torch.compile``) instead of three (None: on a GPU, as Megatron-LM does).
        apply_rope_fusion: The rotary embedding in one kernel each way: Transformer Engine's
            where TE is installed, else this project's (``kernels/rope.py``, with ``--kernels
            fused``). None: on a GPU when either is there.
        gradient_accumulation_fusion: The weight-gradient GEMMs of megatron-core's linear
            layers add into the fp32 ``main_grad`` directly, with no bf16 gradient in between
            (apex's ``fused_weight_gradient_mlp_cuda`` where installed, else this project's
            with ``--kernels fused``; TE layers do it themselves). None: on a GPU when either
            is there.
        make_vocab_size_divisible_by: Vocabulary padding unit (times the TP size).
        tensor_model_parallel_size: TP size.
        pipeline_model_parallel_size: PP size.
        sequence_parallel: Megatron sequence parallelism (needs TP > 1).
        use_distributed_optimizer: Shard the optimizer state (fp32 main weights, Adam moments)
            over the data-parallel ranks (megatron-core's ``DistributedOptimizer``).
        overlap_grad_reduce: Start each gradient bucket's data-parallel reduction as soon as
            the last micro-batch's backward pass has produced it, overlapping it with the rest
            of the backward pass (megatron-core's DDP); off: one reduction after backward.
        overlap_param_gather: With the distributed optimizer, gather the updated weights bucket
            by bucket during the next forward pass instead of all at once after the optimizer
            step (megatron-core's forward pre-hooks; needs ``overlap_grad_reduce``, as in
            Megatron-LM).
        ddp_bucket_size: Parameters per gradient bucket under ``overlap_grad_reduce`` (None:
            megatron-core's default, max(40M, 1M x data-parallel size)).
        micro_batch_size: Sequences per micro-batch per data-parallel rank.
        global_batch_size: Sequences per iteration (all ranks, all micro-batches).
        seq_length: Tokens per sequence.
        train_iters: Total iterations over all stages.
        data_path: Megatron's ``--data-path``: ``[w1, prefix1, w2, prefix2, ...]`` or prefixes.
        data_names: Names of the datasets in metrics (default: from the prefixes, e.g. ``ar``).
        split: Train/validation/test split of every dataset (Megatron's ``--split``); each
            dataset's validation part is validated and reported on its own. ``100,0,0`` trains on
            all of them (then ``valid_data_path`` is needed).
        valid_data_path: Prefixes of held-out datasets (Megatron's ``--valid-data-path``, without
            weights), each validated whole and reported on its own, as well as the validation
            parts of ``--split``: a fixed validation set, or a language the run does not train
            on (English retention).
        valid_data_names: Names of the held-out datasets in metrics (default: from the prefixes).
        data_cache_path: Where megatron-core caches the dataset indices (default: ``cache``
            beside the first dataset), in a subdirectory per version of the data files.
        reset_position_ids: Positions restart after each end-of-document (Megatron-LM's flag).
            megatron-core's RoPE ignores position ids, so with these models
            ``reset_attention_mask`` alone isolates the documents.
        reset_attention_mask: Document-aware packing: tokens attend only within their document.
        eod_mask_loss: No loss on predicting from the end-of-document token.
        lr: Peak learning rate.
        min_lr: Final learning rate.
        lr_warmup_iters: Warm-up iterations.
        lr_decay_style: ``cosine``, ``linear``, ``constant`` or ``WSD`` (warm-up, stable,
            decay: the peak rate until the last ``lr_wsd_decay_iters`` of the stage, then an
            anneal to ``min_lr``; a run extended with ``--train-iters`` keeps its peak rate
            until the new anneal instead of following a cosine stretched anew).
        lr_wsd_decay_iters: With ``WSD``: iterations of the anneal at the end of each stage.
        lr_wsd_decay_style: With ``WSD``: ``exponential`` (Megatron-LM's default),
            ``linear``, ``cosine`` or ``minus_sqrt``.
        weight_decay: AdamW weight decay (not applied to norms).
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        adam_eps: AdamW epsilon.
        clip_grad: Gradient clipping by global norm (0: off).
        stages: The training stages (empty: one stage training everything).
        eval_interval: Iterations between validations (0: only at the end).
        eval_iters: Validation iterations per language.
        eval_at_start: Also validate before the first step (the starting point's loss and bpc).
        save: Checkpoint directory (also where ``metrics.jsonl`` goes).
        load: Checkpoint directory to resume from (usually the same as ``save``).
        no_load_optim: Resume the weights, position and schedule but start the optimizer state
            afresh (Megatron-LM's flag; e.g. to change TP/PP under the distributed optimizer,
            whose saved state loads at another data-parallel size only, unless saved with
            ``dist_ckpt_optim_fully_reshardable``).
        dist_ckpt_optim_fully_reshardable: Save the distributed optimizer's state a tensor per
            parameter, gathered over the data-parallel ranks at each save, so that a resume may
            change TP and PP too (Megatron-LM's flag); costs that gather's time and host memory.
        distrib_optim_fully_reshardable_mem_efficient: With the above, gather on the first
            data-parallel rank alone over gloo instead of on every rank over NCCL: host memory
            on one rank instead of all, but slower and written by that rank alone (Megatron-LM's
            flag; always so without CUDA).
        save_interval: Iterations between checkpoints (0: only at the end and on SIGTERM).
        keep_last_checkpoints: Older checkpoints are deleted (0: keep all).
        force: Let ``save`` name a directory that holds another run's checkpoints (a run not
            resumed from there): this run starts its own in it, its checkpoints replacing the
            others as it saves and ``metrics.jsonl`` starting anew. Without it that is an error.
        async_save: Write checkpoints in the background (megatron-core's asynchronous
            ``dist_checkpointing``); each is published once complete on all ranks.
        log_interval: Iterations between console lines (metrics.jsonl gets every iteration).
        tensorboard_dir: TensorBoard event files (None: no TensorBoard).
        on_nonfinite: ``skip``: a NaN/Inf loss or gradient norm skips the update (counted);
            ``stop``: stop with an error.
        max_skipped_iters: Skip at most this many iterations in a row; one more non-finite
            iteration stops the run.
        exit_signal_handler: On SIGTERM (Slurm pre-emption) save a checkpoint and exit cleanly.
        exit_duration_in_mins: Save and exit cleanly after this many minutes (before a job's
            time limit; the Slurm template sets it from the limit).
        peak_tflops: Per-device peak TFLOP/s for MFU (default: known GPUs; None on a CPU).
        seed: Random seed (weights, data order).
    """

    arch: str | dict[str, Any] = "tiny"
    tokenizer_model: str | None = None
    pretrained_checkpoint: str | None = None
    base_vocab_size: int | None = None
    kernels: str = "fused"
    transformer_impl: str = "auto"
    bf16: bool = False
    recompute_activations: bool = False
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: list[str] | None = None
    bias_swiglu_fusion: bool | None = None
    apply_rope_fusion: bool | None = None
    gradient_accumulation_fusion: bool | None = None
    make_vocab_size_divisible_by: int = 128
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: int | None = None
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 256
    train_iters: int = 100
    data_path: list[str] = field(default_factory=list)
    data_names: list[str] | None = None
    split: str = "98,2,0"
    valid_data_path: list[str] | None = None
    valid_data_names: list[str] | None = None
    data_cache_path: str | None = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_style: str = "exponential"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    stages: list[StageConfig] = field(default_factory=list)
    eval_interval: int = 0
    eval_iters: int = 2
    eval_at_start: bool = False
    save: str | None = None
    load: str | None = None
    no_load_optim: bool = False
    dist_ckpt_optim_fully_reshardable: bool = False
    distrib_optim_fully_reshardable_mem_efficient: bool = False
    save_interval: int = 0
    keep_last_checkpoints: int = 2
    force: bool = False
    async_save: bool = False
    log_interval: int = 10
    tensorboard_dir: str | None = None
    on_nonfinite: str = "skip"
    max_skipped_iters: int = 10
    exit_signal_handler: bool = True
    exit_duration_in_mins: float | None = None
    peak_tflops: float | None = None
    seed: int = 1234

    def resolved_stages(self) -> list[StageConfig]:
        """The stages with inherited settings filled in and the last one running to the end.

        Raises:
            ConfigError: If the stages need more iterations than ``train_iters``.
        """
        stages = self.stages or [StageConfig(name="train")]
        out = []
        used = 0
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            iters = stage.train_iters
            if iters is not None and iters < 1:
                raise ConfigError(
                    f"stage {stage.name!r}: train_iters must be at least 1, got {iters}"
                )
            if iters is None:
                if not last:
                    raise ConfigError(f"stage {stage.name!r}: train_iters is needed (not last)")
                iters = self.train_iters - used
            elif last and used + iters != self.train_iters:
                raise ConfigError(
                    f"the stages add up to {used + iters} iterations but --train-iters is "
                    f"{self.train_iters}: leave train_iters out of the last stage "
                    f"({stage.name!r}) to run it until --train-iters, or make them agree"
                )
            if iters <= 0:
                raise ConfigError(
                    f"stage {stage.name!r} gets {iters} iterations: the stages need more than "
                    f"train_iters={self.train_iters}"
                )
            used += iters
            inherit = {
                name: getattr(self, name) if getattr(stage, name) is None else getattr(stage, name)
                for name in STAGE_INHERITED
            }
            out.append(dataclasses.replace(stage, train_iters=iters, **inherit))
        return out

    @property
    def data_blend(self) -> tuple[list[str], list[float] | None]:
        """(prefixes, weights or None) from ``data_path``, as megatron-core reads it."""
        from megatron.core.datasets.utils import get_blend_from_list

        return get_blend_from_list([str(x) for x in self.data_path])

    def dataset_names(self) -> list[str]:
        """One short name per dataset: ``data_names``, or the prefixes minus shared parts."""
        return list(self.data_names) if self.data_names else _short_names(self.data_blend[0])

    def validation_sets(self) -> dict[str, tuple[str, bool]]:
        """Name -> (prefix, held out) of every validation set, in report order.

        The validation parts of ``--split`` (when it gives them a share) come first, then the
        held-out datasets of ``--valid-data-path``.
        """
        sets = {}
        if self.split_shares()[1] > 0:
            sets.update(
                (name, (prefix, False))
                for name, prefix in zip(self.dataset_names(), self.data_blend[0], strict=True)
            )
        held_out = self.held_out_prefixes
        names = list(self.valid_data_names) if self.valid_data_names else _short_names(held_out)
        for name, prefix in zip(names, held_out, strict=True):
            if name in sets:
                raise ConfigError(
                    f"--valid-data-path: {prefix} would be reported as {name!r}, as "
                    f"{sets[name][0]} is: give the held-out sets other names with "
                    "--valid-data-names"
                )
            sets[name] = (prefix, True)
        return sets

    @property
    def held_out_prefixes(self) -> list[str]:
        """The ``--valid-data-path`` prefixes (none: an empty list)."""
        return [str(p) for p in self.valid_data_path or []]

    def split_shares(self) -> list[float]:
        """The train, validation and test shares of ``--split``, as megatron-core reads them."""
        from megatron.core.datasets.blended_megatron_dataset_config import (
            parse_and_normalize_split,
        )

        return parse_and_normalize_split(self.split)

    def _check_split(self) -> None:
        # megatron-core reads the numbers in the string and ignores the rest: "-1,2,0" is 1,2,0.
        parts = [part.strip() for part in re.split(r"[,/]", self.split)]
        shares = [float(p) for p in parts if re.fullmatch(r"\d+\.?\d*|\.\d+", p)]
        if not 1 <= len(parts) <= 3 or len(shares) != len(parts) or sum(shares) <= 0:
            raise ConfigError(
                f"--split {self.split}: give up to three shares of train, validation and test, "
                "not negative and not all 0 (e.g. --split 98,2,0)"
            )
        if self.split_shares()[0] == 0:
            raise ConfigError(
                f"--split {self.split} gives training no share of --data-path: give it the "
                "first share (e.g. --split 98,2,0)"
            )
        if self.split_shares()[1] == 0 and not self.valid_data_path:
            raise ConfigError(
                f"--split {self.split} leaves no validation data: give the validation split a "
                "share (--split 98,2,0) or held-out datasets with --valid-data-path"
            )

    def _check_data_path(self) -> None:
        """Refuse what megatron-core would misread or fail on with a bare assertion."""
        items = [str(x) for x in self.data_path]
        numbers = [_is_number(x) for x in items]
        if any(numbers) and not (len(items) % 2 == 0 and all(numbers[0::2])):
            raise ConfigError(
                f"--data-path {' '.join(items)}: give a weight before every prefix "
                "(--data-path 0.25 en 0.75 ar) or none (--data-path en ar)"
            )
        prefixes, weights = self.data_blend
        for prefix, weight in zip(prefixes, weights or [], strict=False):
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(
                    f"--data-path: {prefix} has weight {weight:g}; weights must be positive "
                    "(leave a dataset out rather than weighting it 0)"
                )
        again = _repeated([_dataset_file(p) for p in prefixes])
        if again is not None:
            raise ConfigError(
                f"--data-path lists {prefixes[again]} twice: give each dataset once, with one "
                "weight"
            )
        names = self.dataset_names()
        again = _repeated(names)
        if again is not None:
            raise ConfigError(
                f"--data-path: two datasets would both be reported as {names[again]!r}: give "
                "them distinct names with --data-names"
            )

    def _check_valid_data_path(self) -> None:
        held_out = self.held_out_prefixes
        if any(_is_number(x) for x in held_out):
            raise ConfigError(
                f"--valid-data-path {' '.join(held_out)}: give prefixes without weights (each "
                "held-out dataset is validated and reported on its own)"
            )
        if self.valid_data_names and len(self.valid_data_names) != len(held_out):
            raise ConfigError(
                f"--valid-data-names has {len(self.valid_data_names)} names for "
                f"{len(held_out)} datasets"
            )
        again = _repeated([_dataset_file(p) for p in held_out])
        if again is not None:
            raise ConfigError(f"--valid-data-path lists {held_out[again]} twice")
        trained = {_dataset_file(p) for p in self.data_blend[0]}
        for prefix in held_out:
            if _dataset_file(prefix) in trained:
                raise ConfigError(
                    f"--valid-data-path: {prefix} is in --data-path too, so the run trains on it: "
                    "a held-out dataset must be one the run does not train on (the validation "
                    "part of --split is held out of each --data-path dataset)"
                )
        names = self.valid_data_names or _short_names(held_out)
        again = _repeated(names)
        if again is not None:
            raise ConfigError(
                f"--valid-data-path: two datasets would both be reported as {names[again]!r}: "
                "give them distinct names with --valid-data-names"
            )
        self.validation_sets()  # a held-out set named like a --split validation set

    def validate(self, world_size: int) -> None:
        """Check the settings against each other and the number of processes.

        Raises:
            ConfigError: Naming the setting (as a command-line flag) and the problem.
        """
        self._check_ranges()
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(
                f"{world_size} processes cannot be split into --tensor-model-parallel-size {tp} "
                f"x --pipeline-model-parallel-size {pp} (start a multiple of {tp * pp}: "
                + (
                    f"torchrun --nproc-per-node {tp * pp} -m megatron_ext.cli train ..."
                    if tp * pp <= 8
                    # The fewest whole nodes whose GPUs split into TP x PP groups.
                    else f"{math.lcm(8, tp * pp) // 8} nodes of 8 GPUs or a multiple, with "
                    "examples/slurm/train.sbatch"
                )
                + ")"
            )
        dp = world_size // (tp * pp)
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of "
                f"--micro-batch-size {self.micro_batch_size} x {dp} data-parallel ranks"
            )
        if not self.data_path:
            raise ConfigError("--data-path is required (e.g. --data-path 0.25 en 0.75 ar)")
        if self.tokenizer_model is None:
            raise ConfigError("--tokenizer-model is required (the SentencePiece model)")
        if self.data_names and len(self.data_names) != len(self.data_blend[0]):
            raise ConfigError(
                f"--data-names has {len(self.data_names)} names for "
                f"{len(self.data_blend[0])} datasets"
            )
        self._check_data_path()
        self._check_split()
        self._check_valid_data_path()
        if self.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.sequence_parallel and self.seq_length % tp:
            raise ConfigError(
                f"--sequence-parallel splits the sequence over {tp} tensor-parallel ranks: "
                f"--seq-length {self.seq_length} is not a multiple of {tp}"
            )
        if self.overlap_param_gather and not (
            self.use_distributed_optimizer and self.overlap_grad_reduce
        ):
            raise ConfigError(
                "--overlap-param-gather needs --use-distributed-optimizer and "
                "--overlap-grad-reduce (as in Megatron-LM)"
            )
        if self.dist_ckpt_optim_fully_reshardable and not self.use_distributed_optimizer:
            raise ConfigError(
                "--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer (the "
                "regular optimizer's checkpoints load at any layout already)"
            )
        if (
            self.distrib_optim_fully_reshardable_mem_efficient
            and not self.dist_ckpt_optim_fully_reshardable
        ):
            raise ConfigError(
                "--distrib-optim-fully-reshardable-mem-efficient needs "
                "--dist-ckpt-optim-fully-reshardable"
            )
        if self.ddp_bucket_size is not None and not self.overlap_grad_reduce:
            raise ConfigError(
                "--ddp-bucket-size needs --overlap-grad-reduce (without it megatron-core reduces "
                "all gradients in one bucket)"
            )
        choices = {
            "kernels": ("fused", "megatron"),
            "transformer_impl": ("auto", "local", "transformer_engine"),
            "on_nonfinite": ("skip", "stop"),
            "lr_decay_style": LR_DECAY_STYLES,
            "lr_wsd_decay_style": LR_WSD_DECAY_STYLES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_flag(name)} must be one of {', '.join(allowed)}")
        self.recompute()
        names = [stage.name for stage in self.stages]
        again = _repeated(names)
        if again is not None:
            # Metrics, logs and the resume warnings name stages: one name, one stage.
            raise ConfigError(f"two stages are named {names[again]!r}: give each its own name")
        stages = self.resolved_stages()
        if self.lr_wsd_decay_iters is not None and all(
            stage.lr_decay_style != "WSD" for stage in stages
        ):
            raise ConfigError("--lr-wsd-decay-iters needs --lr-decay-style WSD")
        for stage in stages:
            if stage.trainable not in TRAINABLE:
                raise ConfigError(f"stage {stage.name!r}: trainable must be one of {TRAINABLE}")
            if stage.lr_decay_style not in LR_DECAY_STYLES:
                raise ConfigError(
                    f"stage {stage.name!r}: lr_decay_style {stage.lr_decay_style!r} is not one "
                    f"of {', '.join(LR_DECAY_STYLES)}"
                )
            self._check_wsd(stage)
            if stage.new_rows_only and stage.trainable != "embeddings":
                raise ConfigError(f"stage {stage.name!r}: new_rows_only needs trainable=embeddings")
            if stage.new_rows_only and stage.weight_decay:
                raise ConfigError(
                    f"stage {stage.name!r}: new_rows_only needs weight_decay: 0 (decay would "
                    "move the rows it keeps frozen)"
                )
            for name in ("lr", "min_lr", "lr_warmup_iters", "weight_decay"):
                if getattr(stage, name) < 0:
                    raise ConfigError(f"stage {stage.name!r}: {name} must be at least 0")
            if stage.min_lr > stage.lr:
                raise ConfigError(
                    f"stage {stage.name!r}: min_lr {stage.min_lr:g} is above its lr {stage.lr:g} "
                    "(the learning rate decays from lr to min_lr)"
                )
            if stage.lr_warmup_iters >= stage.train_iters:
                raise ConfigError(self._no_decay_left(stage))

    def _no_decay_left(self, stage: StageConfig) -> str:
        """Why ``stage`` has no iteration left to decay, and the settings that would leave some."""
        warmup, iters = stage.lr_warmup_iters, stage.train_iters
        message = f"stage {stage.name!r}: {warmup} warm-up iterations leave none of its {iters}"
        if not self.stages:
            return (
                f"--lr-warmup-iters {warmup} leaves none of --train-iters {iters} to decay: "
                f"raise --train-iters to at least {warmup + 1}, or lower --lr-warmup-iters"
            )
        warmup_setting = "its lr_warmup_iters (or --lr-warmup-iters, which it inherits)"
        given = next(s.train_iters for s in self.stages if s.name == stage.name)
        if stage.name != self.stages[-1].name:
            return f"{message} to decay: give it more train_iters, or lower {warmup_setting}"
        # The last stage: its length is what --train-iters leaves after the stages before it.
        earlier = self.train_iters - iters
        also = " (and its train_iters with it)" if given is not None else ""
        return (
            f"{message} to decay (--train-iters {self.train_iters} less the {earlier} of the "
            f"stages before it): raise --train-iters{also} to at least {earlier + warmup + 1}, "
            f"or lower {warmup_setting}"
        )

    def _check_wsd(self, stage: StageConfig) -> None:
        """The stage's anneal style is known; a WSD stage's anneal is set and fits its length."""
        where = f"stage {stage.name!r}" if self.stages else "--lr-decay-style WSD"
        if stage.lr_wsd_decay_style not in LR_WSD_DECAY_STYLES:
            raise ConfigError(
                f"{where}: lr_wsd_decay_style must be one of {', '.join(LR_WSD_DECAY_STYLES)}"
            )
        if stage.lr_decay_style != "WSD":
            return
        anneal = stage.lr_wsd_decay_iters
        if anneal is None or anneal < 1:
            raise ConfigError(
                f"{where}: WSD needs lr_wsd_decay_iters of at least 1 (--lr-wsd-decay-iters: the "
                "iterations of the final anneal)"
            )
        if stage.lr_warmup_iters + anneal > stage.train_iters:
            raise ConfigError(
                f"{where}: {stage.lr_warmup_iters} warm-up and {anneal} anneal iterations "
                f"exceed its {stage.train_iters}"
            )

    def recompute(self) -> dict[str, Any]:
        """megatron-core's ``TransformerConfig`` recomputation fields for these settings.

        Returns:
            ``recompute_granularity`` and, with ``full``, ``recompute_method`` and
            ``recompute_num_layers``, or with ``selective``, ``recompute_modules``; empty when
            nothing is recomputed.

        Raises:
            ConfigError: Unknown values, or settings of one granularity given with the other.
        """
        granularity = self.recompute_granularity
        if self.recompute_activations:
            if granularity not in (None, "selective"):
                raise ConfigError(
                    "--recompute-activations is Megatron-LM's --recompute-granularity selective: "
                    f"give one or the other, not --recompute-granularity {granularity} too"
                )
            granularity = "selective"
        if granularity is None:
            given = [
                _flag(name)
                for name in ("recompute_method", "recompute_num_layers", "recompute_modules")
                if getattr(self, name) is not None
            ]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} need --recompute-granularity (full or selective)"
                )
            return {}
        if granularity not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(
                f"--recompute-granularity must be one of {', '.join(RECOMPUTE_GRANULARITIES)}"
            )
        if granularity == "selective":
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{_flag(name)} is for --recompute-granularity full; selective "
                        "recomputes the --recompute-modules of every layer"
                    )
            modules = list(self.recompute_modules or ["core_attn"])
            if not set(modules) <= set(RECOMPUTE_MODULES):
                raise ConfigError(
                    f"--recompute-modules {' '.join(modules)}: choose from "
                    f"{', '.join(RECOMPUTE_MODULES)}"
                )
            return {"recompute_granularity": "selective", "recompute_modules": modules}
        if self.recompute_modules is not None:
            raise ConfigError(
                "--recompute-modules is for --recompute-granularity selective; full recomputes "
                "whole layers"
            )
        method = self.recompute_method or "uniform"
        if method not in RECOMPUTE_METHODS:
            raise ConfigError(f"--recompute-method must be one of {', '.join(RECOMPUTE_METHODS)}")
        return {
            "recompute_granularity": "full",
            "recompute_method": method,
            "recompute_num_layers": self.recompute_num_layers or 1,
        }

    def _check_ranges(self) -> None:
        """Each numeric setting within its range (before anything divides by one)."""
        for name, lowest in AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < lowest:
                raise ConfigError(f"{_flag(name)} must be at least {lowest}, got {value}")
        for name, highest in AT_MOST.items():
            value = getattr(self, name)
            if value is not None and value > highest:
                raise ConfigError(f"{_flag(name)} must be at most {highest}, got {value}")
        for name in POSITIVE:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{_flag(name)} must be above 0, got {value}")
        for name in ("adam_beta1", "adam_beta2"):
            if getattr(self, name) >= 1:
                raise ConfigError(f"{_flag(name)} must be below 1, got {getattr(self, name)}")


def _dataset_file(prefix: str) -> str:
    """The file a prefix's ``.bin`` resolves to: one for an absolute path or a link to a dataset.

    Links may be to the directory or to the files themselves.
    """
    return os.path.realpath(prefix + ".bin")


def _repeated(items: list[str]) -> int | None:
    """The index of the first item equal to an earlier one (None: all distinct)."""
    seen = set()
    for i, item in enumerate(items):
        if item in seen:
            return i
        seen.add(item)
    return None


def _short_names(prefixes: list[str]) -> list[str]:
    """Dataset names from prefixes: the file names minus ``_text_document`` and shared words."""
    stems = [Path(p).name.removesuffix("_text_document") for p in prefixes]
    if len(stems) > 1:
        common = os.path.commonprefix(stems)
        common = common[: common.rfind("_") + 1]  # only whole "_"-separated words
        stems = [s[len(common) :] or s for s in stems]
    return stems


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
_STAGE_HINTS = typing.get_type_hints(StageConfig)


def _scalar_type(hint: Any) -> Any:
    """The non-None type of ``X | None``; the hint itself otherwise."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _coerce(name: str, value: Any, where: str) -> Any:
    """``value`` (from YAML or the command line) as the type of field ``name``."""
    if value is None:
        return _unset(_HINTS[name], _flag(name), where)
    if name == "stages":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: stages must be a list of mappings")
        return [_stage(s, f"{where}: stages[{i}]") for i, s in enumerate(value)]
    if name == "arch":
        if isinstance(value, str | dict):
            return value
        raise ConfigError(f"{where}: arch must be a preset name or a mapping")
    target = _scalar_type(_HINTS[name])
    if typing.get_origin(target) is list:
        # A YAML string "0.25 en 0.75 ar" is the command line's words.
        items = value if isinstance(value, list) else str(value).split()
        return [str(x) for x in items]
    if isinstance(value, list):
        raise ConfigError(f"{where}: {_flag(name)} takes one value, got {value}")
    return coerce_value(target, _flag(name), value, where)


def _unset(hint: Any, label: str, where: str) -> None:
    """None (YAML's ``null``) for a setting that may be unset; a ConfigError for the others."""
    if type(None) not in typing.get_args(hint):
        raise ConfigError(f"{where}: {label} needs a value, got null")
    return None


def coerce_value(target: type, label: str, value: Any, where: str) -> Any:
    """``value`` as a ``target`` (bool, int, float or str), or a ConfigError naming ``label``.

    Strings are read as the command line gives them ("8", "1e-4", "true"); a YAML boolean is
    not a number (Python's True would pass as 1).
    """
    try:
        if isinstance(value, bool) and target in (int, float):
            raise ValueError(value)
        if target is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError(value)
            return int(number)
        if target is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        if isinstance(value, dict | list):
            raise ValueError(value)
        return str(value)
    except (TypeError, ValueError) as err:
        kind = "a finite float" if target is float else target.__name__
        raise ConfigError(f"{where}: {label} expects {kind}, got {value!r}") from err


def _stage(data: Any, where: str) -> StageConfig:
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"{where}: a stage is a mapping with at least a name")
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _STAGE_HINTS:
            raise ConfigError(
                f"{where}: unknown key {key!r} (known: {', '.join(sorted(_STAGE_HINTS))})"
            )
        hint = _STAGE_HINTS[name]
        if value is None:
            values[name] = _unset(hint, name, where)
        else:
            values[name] = coerce_value(_scalar_type(hint), name, value, where)
    return StageConfig(**values)


# Megatron-LM flags a user may reach for that work differently here.
_ELSEWHERE = {
    **dict.fromkeys(
        ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
         "num_query_groups", "max_position_embeddings", "vocab_size"),
        "the architecture comes from the converted checkpoint, or from --arch (a preset name) "
        "or arch: in the YAML config (a mapping such as {preset: llama2-7b, num_layers: 16})",
    ),
    "lr_decay_iters": "the learning rate decays until the end of each stage (--train-iters, or "
    "a stage's train_iters)",
    "tokenizer_type": "the tokenizer is a SentencePiece model (--tokenizer-model)",
    "finetune": "--pretrained-checkpoint starts a new run from a checkpoint's weights (the "
    "optimizer, schedule and data position start afresh); --load resumes one",
    **dict.fromkeys(
        ("train_samples", "lr_warmup_samples", "lr_decay_samples", "lr_warmup_fraction"),
        "the schedule counts iterations: --train-iters and --lr-warmup-iters (per stage: "
        "stages: in the YAML config)",
    ),
    "rampup_batch_size": "there is no batch-size ramp-up; a resumed run may take another "
    "--global-batch-size (the data position counts samples, so none are repeated or skipped)",
    "override_opt_param_scheduler": "not needed: a resumed run takes the new schedule settings "
    "and warns that they changed",
    **dict.fromkeys(
        ("ckpt_fully_parallel_save", "ckpt_format"),
        "checkpoints are always megatron-core's dist_checkpointing (torch_dist), the writes "
        "shared by the data-parallel replicas",
    ),
    "untie_embeddings_and_output_weights": "the embedding and output layer are always untied "
    "(as in Llama-2)",
    "distributed_backend": "the backend follows the device: NCCL on GPUs, gloo on CPUs",
    "wandb_project": "metrics go to <save>/metrics.jsonl and, with --tensorboard-dir, TensorBoard",
}  # fmt: skip


def _known(name: str, where: str, spelled: str) -> str:
    if name in _FIELDS:
        return name
    if name in _ELSEWHERE:
        raise ConfigError(f"{where}: {spelled} is not a setting here: {_ELSEWHERE[name]}")
    # Close enough to be a typo: a looser match offered unrelated settings.
    close = difflib.get_close_matches(name, _FIELDS, n=1, cutoff=0.75)
    hint = f" (did you mean {_flag(close[0])}?)" if close else ""
    raise ConfigError(f"{where}: unknown setting {spelled!r}{hint}")


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--train-iters", "10", "--data-path", "0.3", "a", "0.7", "b", "--bf16"]`` -> values.

    A flag takes the values up to the next flag: one for a scalar (none for a boolean, meaning
    true), any number for a list such as ``--data-path``. ``--flag=value`` gives the first value
    in the flag, as argparse allows.
    """
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"command line: expected a --flag, got {token!r}")
        token, equals, inline = token.partition("=")
        name = _known(token[2:].replace("-", "_"), "command line", token)
        j = i + 1
        while j < len(argv) and not (argv[j].startswith("--") and argv[j][2:3].isalpha()):
            j += 1
        args = [inline, *argv[i + 1 : j]] if equals else argv[i + 1 : j]
        target = _scalar_type(_HINTS[name])
        if typing.get_origin(target) is list:
            values[name] = _coerce(name, args, "command line")
        elif not args and target is bool:
            values[name] = True
        elif len(args) == 1:
            values[name] = _coerce(name, args[0], "command line")
        else:
            raise ConfigError(f"command line: {token} takes one value, got {args}")
        i = j
    return values


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (None: defaults), then apply command-line ``overrides``.

    Relative paths inside the YAML stay relative to the working directory, as Megatron-LM's do.

    Raises:
        ConfigError: Naming the file or flag.
    """
    values: dict[str, Any] = {}
    if path is not None:
        where = str(path)
        try:
            data = read_yaml(path, "config") or {}
        except YamlFileError as err:
            raise ConfigError(str(err)) from err
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of settings")
        for key, value in data.items():
            name = _known(str(key).replace("-", "_"), where, str(key))
            values[name] = _coerce(name, value, where)
    values.update(parse_overrides(overrides or []))
    return TrainConfig(**values)


def settings_help(width: int = 100) -> str:
    """Every setting as a flag with its default and its description.

    Read from :class:`TrainConfig`'s docstring, so ``--help`` and the code say the same.
    """
    described: dict[str, str] = {}
    name = None
    for line in (TrainConfig.__doc__ or "").split("Attributes:", 1)[-1].splitlines():
        if match := re.match(r"^ {8}(\w+): (.*)", line):
            name = match.group(1)
            described[name] = match.group(2)
        elif name and line.startswith(" " * 12):
            described[name] += " " + line.strip()
    lines = []
    for setting in dataclasses.fields(TrainConfig):
        default = setting.default
        if default is dataclasses.MISSING:
            default = setting.default_factory()
        shown = "" if default in (None, [], False) else f" (default {_shown(default)})"
        text = described.get(setting.name, "").replace("``", "")
        lines.append(f"  {_flag(setting.name)}{shown}")
        lines.extend(textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The configuration as plain data (for the checkpoint and the run log)."""
    return dataclasses.asdict(config)


# Settings that give a saved state another meaning when they change between a checkpoint and the
# run resuming it (Megatron-LM refuses a changed schedule; a changed blend it takes silently).
# The data position is a count of samples into an order that these settings decide.
DATA_ORDER_SETTINGS = ("data_path", "split", "seq_length", "seed")
# The learning rate at the saved step is recomputed from these.
SCHEDULE_SETTINGS = (
    "train_iters",
    "lr",
    "min_lr",
    "lr_warmup_iters",
    "lr_decay_style",
    "lr_wsd_decay_iters",
    "lr_wsd_decay_style",
)
# What a stage leaves out it takes from the run: its schedule (but its length) and weight decay.
STAGE_INHERITED = (*(name for name in SCHEDULE_SETTINGS if name != "train_iters"), "weight_decay")


def resume_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Warnings for settings that differ from those a checkpoint was saved with.

    Resuming with them is allowed (a new data mix or a longer run are common reasons), but it
    does not continue the saved run exactly, so the run log says what changed and what that does.

    Args:
        saved: The checkpoint's configuration (its ``config_dict``).
        config: The configuration resuming it.

    Returns:
        One message per kind of change (data order, schedule, stages), naming the flags.
    """
    current = config_dict(config)

    def same(name: str) -> bool:
        if name == "data_path" and isinstance(saved[name], list):
            # The same files by another path (relative, absolute, through a link): no change.
            return _real_paths(saved[name]) == _real_paths(current[name])
        return saved[name] == current[name]

    def changes(names: tuple[str, ...]) -> str:
        return ", ".join(
            f"{_flag(name)} {_shown(saved[name])} -> {_shown(current[name])}"
            for name in names
            if name in saved and not same(name)
        )

    warnings = []
    if data := changes(DATA_ORDER_SETTINGS):
        warnings.append(
            f"warning: resuming with {data}: the saved data position (samples read so far) now "
            "counts into another order of samples, so some may be read twice and others never"
        )
    if schedule := changes(SCHEDULE_SETTINGS):
        warnings.append(
            f"warning: resuming with {schedule}: the learning rate continues on the new schedule "
            "from the saved step"
        )
    if "stages" in saved and saved["stages"] != current["stages"]:
        warnings.append(
            f"warning: resuming with other --stages ({_stage_list(saved['stages'])} -> "
            f"{_stage_list(current['stages'])}): the saved position (stage number, iterations "
            "in it) is taken in the new list"
        )
    return warnings


def _real_paths(data_path: list) -> list:
    """``--data-path`` with each prefix resolved (the weights as they are)."""
    return [x if _is_number(str(x)) else _dataset_file(x) for x in data_path]


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _stage_list(stages: list[dict[str, Any]]) -> str:
    if not stages:
        return "one stage training everything"
    return ", ".join(f"{s.get('name')}: {s.get('train_iters') or 'rest'}" for s in stages)
