"""``megatron-ext train``: continued pretraining on Megatron-Core from a YAML config.

Run one process per GPU (``torchrun --nproc-per-node 8 -m megatron_ext.cli train ...``, or the
Slurm scripts in ``examples/slurm/``); on a CPU, gloo processes (``torchrun --nproc-per-node 2``).
Settings after ``--config`` override the YAML with Megatron-LM's flag names.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from megatron_ext.commands.options import (
    INPUT_REFUSED,
    RUN_FAILED,
    fail,
    quiet_known_warnings,
)
from megatron_ext.training.config import ConfigError, load_config, settings_help
from megatron_ext.training.signals import SigtermLatch

EPILOG = """\
Any setting of the config can be overridden with Megatron-LM's flag name, e.g.
  --train-iters 1000 --micro-batch-size 2 --global-batch-size 64 --seq-length 4096
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel
  --data-path 0.25 data/en_text_document 0.75 data/ar_text_document
  --tokenizer-model tokenizer.model --pretrained-checkpoint converted/ --save ckpt --load ckpt
  --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 100 --kernels megatron --bf16
(--flag=value works too). The settings (in the YAML without the dashes, with underscores; more
in megatron_ext/training/config.py, TrainConfig):
"""


def build_parser() -> argparse.ArgumentParser:
    """The command's own options; everything else is a config override."""
    parser = argparse.ArgumentParser(
        prog="megatron-ext train",
        description=__doc__.splitlines()[0],
        epilog=EPILOG + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML training config (e.g. examples/configs/tiny.yaml)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the parallel layout, parameters and memory per GPU and tokens per step, "
        "then exit without training",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        help="processes to plan for with --dry-run (default: $WORLD_SIZE, else TP x PP)",
    )
    return parser


def dry_run(config, world_size: int | None) -> int:
    """Print the resolved plan; touches neither a GPU nor the data."""
    from megatron_ext.tokenizer.encoders import SentencePieceEncoder
    from megatron_ext.training.model import plan_warnings, resolve_arch
    from megatron_ext.training.plan import plan_run
    from megatron_ext.training.stage import new_rows

    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    if world_size is not None and world_size < 1:
        raise ConfigError(f"--world-size must be at least 1, got {world_size}")
    world_size = world_size or int(os.environ.get("WORLD_SIZE", tp * pp))
    config.validate(world_size)
    planned = _before_conversion(config)
    tokenizer = SentencePieceEncoder(planned.tokenizer_model)
    plan = resolve_arch(planned, tokenizer.vocab_size, None, tokenizer.pieces_sha256())
    # The run's refusal of a stage of new rows, here too; before conversion the checkpoint
    # will record the base vocabulary.
    if plan.base_vocab_size is not None or planned is config:
        for stage in config.resolved_stages():
            new_rows(stage, plan)
    config = planned
    run = plan_run(config, plan.arch, plan.padded_vocab_size, world_size)
    arch = plan.arch
    print(
        f"model: {arch.num_layers} layers, hidden {arch.hidden_size}, heads "
        f"{arch.num_attention_heads} ({arch.num_query_groups} KV groups), ffn "
        f"{arch.ffn_hidden_size}, vocabulary {arch.vocab_size} (padded {plan.padded_vocab_size})"
    )
    for line in run.lines(config):
        print(line)
    for warning in plan_warnings(arch, config):
        print(warning)
    for i, stage in enumerate(config.resolved_stages(), 1):
        rows = " (new rows only)" if stage.new_rows_only else ""
        anneal = ""
        if stage.lr_decay_style == "WSD":
            anneal = f", {stage.lr_wsd_decay_style} anneal {stage.lr_wsd_decay_iters}"
        print(
            f"stage {i} {stage.name!r}: {stage.train_iters} iterations, trains "
            f"{stage.trainable}{rows}, lr {stage.lr:g} -> {stage.min_lr:g} "
            f"({stage.lr_decay_style}, warm-up {stage.lr_warmup_iters}{anneal})"
        )
    tokens = run.tokens_per_step * config.train_iters
    print(f"total: {config.train_iters} iterations, {tokens:,} tokens")
    return 0


def _before_conversion(config):
    """``config`` planned with its ``--arch`` when its converted checkpoint is not there yet."""
    from megatron_ext.arch import PRESETS
    from megatron_ext.checkpoint.convert import METADATA
    from megatron_ext.training.config import TrainConfig

    checkpoint = config.pretrained_checkpoint
    if not checkpoint or (Path(checkpoint) / METADATA).is_file():
        return config
    if config.arch == TrainConfig.arch:
        raise ConfigError(
            f"--pretrained-checkpoint {checkpoint}: not converted yet (no {METADATA}); to plan "
            f"before converting, name its architecture too: --arch ({', '.join(PRESETS)})"
        )
    print(f"note: {checkpoint} is not converted yet: planning with --arch {config.arch}")
    return dataclasses.replace(config, pretrained_checkpoint=None)


def summary(result, save: str | None) -> str:
    """The closing line(s): where the run ended, what it processed, how well it validates."""
    # Stopped before its first iteration, a run has nothing to save.
    checkpoint = result.checkpoint or ("(none written)" if save else "(none: no --save)")
    status = f"interrupted ({result.interrupted})" if result.interrupted else "done"
    speed = result.tokens / result.step_seconds if result.step_seconds else 0.0
    lines = [
        f"train: {status} at iteration {result.iteration}, {result.skipped_iters} skipped in the "
        f"whole run; this job trained {result.tokens:,} tokens, {result.step_seconds:.0f} s in "
        f"iterations ({speed:,.0f} tokens/s), {result.seconds:.0f} s end to end; "
        f"checkpoint {checkpoint}"
    ]
    for lang, values in result.valid.items():
        lines.append(
            f"  validation {lang}: loss {values['loss']:.4f}, bits/char {values['bpc']:.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args, overrides = build_parser().parse_known_args(argv)
    quiet_known_warnings()
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        return fail("train", err, INPUT_REFUSED)
    if not args.dry_run and config.exit_signal_handler:
        SigtermLatch()  # before the seconds of importing torch and megatron-core below
    from megatron_ext.arch import ArchitectureError
    from megatron_ext.checkpoint.hf import CheckpointError
    from megatron_ext.tokenizer.encoders import TokenizerLoadError
    from megatron_ext.training.checkpointing import CheckpointLoadError, CheckpointSaveError

    # Bad inputs: the message names the file, flag or tensor.
    input_errors = (
        ConfigError,
        ArchitectureError,
        CheckpointError,
        CheckpointLoadError,
        TokenizerLoadError,
    )
    try:
        if args.dry_run:
            return dry_run(config, args.world_size)
        from megatron_ext.training.loop import TrainingError, train

        try:
            result = train(config)
        except (TrainingError, CheckpointSaveError) as err:
            return fail("train", err, RUN_FAILED)
    except input_errors as err:
        return fail("train", err, INPUT_REFUSED)
    import torch.distributed as dist

    if dist.get_rank() == dist.get_world_size() - 1:  # the last pipeline stage knows the losses
        print(summary(result, config.save))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
