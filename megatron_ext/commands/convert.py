r"""``megatron-ext convert``: Llama-2 Hugging Face <-> megatron-core checkpoints.

Examples::

    megatron-ext convert hf-to-megatron --hf-dir llama-2-7b-hf --output-dir ckpt/7b-ar \
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 \
        --tokenizer-model expanded/tokenizer.model --embedding-init avg_subwords
    megatron-ext convert megatron-to-hf --megatron-dir ckpt/7b-ar --output-dir 7b-ar-hf \
        --tokenizer-model expanded/tokenizer.model
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_ext.checkpoint.convert import DTYPES
from megatron_ext.commands.options import (
    INPUT_REFUSED,
    RUN_FAILED,
    fail,
    quiet_known_warnings,
)
from megatron_ext.embeddings.init import INIT_METHODS

PROG = "megatron-ext convert"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (Megatron-LM flag names)."""
    # No abbreviations: a flag added later would change what an abbreviation means.
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mc = sub.add_parser(
        "hf-to-megatron",
        help="HF Llama -> megatron-core dist checkpoint",
        allow_abbrev=False,
        description="Megatron-LM's tools/checkpoint/convert.py names are accepted too: "
        "--load-dir, --save-dir, --target-tensor-parallel-size, --target-pipeline-parallel-size.",
    )
    to_mc.add_argument(
        "--hf-dir", "--load-dir", required=True, help="HF checkpoint directory (config.json)"
    )
    to_mc.add_argument(
        "--output-dir", "--save-dir", required=True, help="megatron-core checkpoint directory"
    )
    to_mc.add_argument(
        "--tensor-model-parallel-size",
        "--target-tensor-parallel-size",
        type=int,
        default=1,
        help="TP the model will train with (sets vocab padding; loads at any TP)",
    )
    to_mc.add_argument(
        "--pipeline-model-parallel-size",
        "--target-pipeline-parallel-size",
        type=int,
        default=1,
        help="PP the model will train with (checked; loads at any PP)",
    )
    to_mc.add_argument("--tokenizer-model", help="expanded tokenizer: grow embedding and output")
    to_mc.add_argument(
        "--base-tokenizer-model",
        help="the checkpoint's tokenizer (default: tokenizer.model in --hf-dir)",
    )
    to_mc.add_argument(
        "--embedding-init",
        choices=INIT_METHODS,
        default="avg_subwords",
        help="initialisation of new rows (default: avg_subwords)",
    )
    to_mc.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="vocab padding multiple, times TP (default: 128)",
    )
    to_mc.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="stored dtype (default: bf16, what training uses; Llama-2's fp16 weights are then "
        "rounded: fp32 keeps them exactly)",
    )
    to_mc.add_argument(
        "--freeze-base-rows",
        action="store_true",
        help="record that training should update only the new rows at first",
    )
    to_mc.add_argument("--seed", type=int, default=1234, help="seed of random inits")
    to_mc.add_argument("--force", action="store_true", help="overwrite --output-dir")
    to_hf = sub.add_parser(
        "megatron-to-hf",
        help="megatron-core checkpoint -> HF Llama",
        allow_abbrev=False,
        description="Megatron-LM's --load-dir and --save-dir are accepted too.",
    )
    to_hf.add_argument(
        "--megatron-dir",
        "--load-dir",
        required=True,
        help="checkpoint written by megatron-ext: a converted one, an iter_* directory, or a "
        "training run's --save directory (its latest checkpoint)",
    )
    to_hf.add_argument("--output-dir", "--save-dir", required=True, help="HF directory to write")
    to_hf.add_argument(
        "--tokenizer-model",
        help="the checkpoint's tokenizer.model (checked against it), written beside the weights "
        "with Hugging Face tokenizer files",
    )
    to_hf.add_argument(
        "--dtype", choices=sorted(DTYPES), help="exported dtype (default: as stored)"
    )
    to_hf.add_argument("--force", action="store_true", help="overwrite --output-dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    quiet_known_warnings()
    from megatron_ext.arch import ArchitectureError
    from megatron_ext.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_ext.checkpoint.hf import CheckpointError
    from megatron_ext.outputs import OutputExistsError, OutputHoldsInputError
    from megatron_ext.tokenizer.encoders import TokenizerLoadError
    from megatron_ext.training.checkpointing import CheckpointLoadError

    started = time.perf_counter()
    try:
        from megatron_ext import distributed

        distributed.init(rank=0, world_size=1)  # this process alone
        if args.direction == "hf-to-megatron":
            meta = hf_to_megatron(
                args.hf_dir,
                args.output_dir,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                tokenizer_model=args.tokenizer_model,
                base_tokenizer_model=args.base_tokenizer_model,
                embedding_init=args.embedding_init,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                dtype=args.dtype,
                freeze_base_rows=args.freeze_base_rows,
                seed=args.seed,
                force=args.force,
            )
            summary = (
                f"vocab {meta['base_vocab_size']:,} -> {meta['vocab_size']:,} "
                f"(padded {meta['padded_vocab_size']:,}, TP {args.tensor_model_parallel_size}, "
                f"new rows {meta['embedding_init'] or 'none'}), {meta['source_dtype']} -> "
                f"{meta['dtype']}{_rounding(meta['source_dtype'], meta['dtype'])}"
            )
        else:
            checkpoint = _latest_if_run(args.megatron_dir)
            config = megatron_to_hf(
                checkpoint, args.output_dir, tokenizer_model=args.tokenizer_model,
                dtype=args.dtype, force=args.force,
            )  # fmt: skip
            summary = (
                f"vocab {config['vocab_size']:,}, {config['num_hidden_layers']} layers, "
                f"{config['torch_dtype']}"
            )
            if config["tokenizer_files_skipped"]:
                summary += (
                    "; tokenizer.model only, no Hugging Face tokenizer files: "
                    f"{config['tokenizer_files_skipped']}"
                )
    except (
        CheckpointError,
        CheckpointLoadError,
        ArchitectureError,
        OutputExistsError,
        OutputHoldsInputError,
        TokenizerLoadError,
    ) as err:
        return fail("convert", err, INPUT_REFUSED)
    except OSError as err:  # a full disk, a directory without write permission
        return fail("convert", err, RUN_FAILED)
    print(f"convert: done: {args.direction} -> {args.output_dir}: {summary}, "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    return 0


def _rounding(source: str, stored: str) -> str:
    """A note when storing ``source`` weights as ``stored`` rounds them."""
    exact = {("bfloat16", "bf16"), ("float16", "fp16")}
    if stored == "fp32" or (source, stored) in exact:
        return ""
    return " (rounded: old rows are no longer bitwise the source's; --dtype fp32 keeps them)"


def _latest_if_run(directory: str) -> str:
    """``directory``, or the checkpoint its ``latest`` pointer names if it is a run's --save."""
    from megatron_ext.training.checkpointing import latest_checkpoint

    latest = latest_checkpoint(directory)
    if latest is None:
        return directory
    print(f"convert: {directory} is a training run: exporting its latest checkpoint, {latest}")
    return str(latest)


if __name__ == "__main__":
    sys.exit(main())
