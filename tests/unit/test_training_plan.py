"""`megatron-ext train --dry-run`: sizes checked against transformers' own Llama."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from megatron_ext.arch import PRESETS
from megatron_ext.commands.train import main
from megatron_ext.hashing import pieces_sha256
from megatron_ext.tokenizer.encoders import SentencePieceEncoder
from megatron_ext.training.config import load_config
from megatron_ext.training.plan import peak_tflops, plan_run, training_flops_per_token
from tests.helpers import REPO

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.parametrize("preset", ["llama2-7b", "llama2-70b"])
def test_parameter_count_matches_transformers(preset):
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = PRESETS[preset]
    padded = arch.padded_vocab_size(8)
    with torch.device("meta"):
        reference = LlamaForCausalLM(LlamaConfig(**arch.to_hf_config(vocab_size=padded)))
    config = load_config(None, ["--tensor-model-parallel-size", "8", "--global-batch-size", "16"])
    plan = plan_run(config, arch, padded, world_size=16)
    assert plan.total_params == sum(p.numel() for p in reference.parameters())
    assert plan.data_parallel_size == 2
    assert plan.tokens_per_step == 16 * config.seq_length


@pytest.mark.parametrize(
    ("precision", "distributed_optimizer"),
    [(["--bf16"], "true"), ([], "true"), ([], "false")],
    ids=["bf16-distopt", "fp32-distopt", "fp32"],
)
def test_memory_per_gpu_of_the_busiest_pipeline_stage(precision, distributed_optimizer):
    """70B at TP=2, PP=4, DP=2, counted from transformers' own layers: the first stage holds a
    quarter of the layers and the embedding (the last the output layer, as large)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = PRESETS["llama2-70b"]
    padded = arch.padded_vocab_size(2)
    with torch.device("meta"):
        reference = LlamaForCausalLM(LlamaConfig(**arch.to_hf_config(vocab_size=padded)))
    layer = sum(p.numel() for p in reference.model.layers[0].parameters())
    per_gpu = (arch.num_layers // 4 * layer + padded * arch.hidden_size) // 2
    overrides = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "4",
                 "--global-batch-size", "64", "--use-distributed-optimizer",
                 distributed_optimizer, *precision]  # fmt: skip
    config = load_config(None, overrides)
    plan = plan_run(config, arch, padded, world_size=16)
    gib = 1024**3
    assert plan.params_per_gpu == per_gpu
    assert plan.weights_gib == pytest.approx(per_gpu * (2 if config.bf16 else 4) / gib)
    assert plan.grads_gib == pytest.approx(per_gpu * 4 / gib)  # fp32 gradients, always
    # Adam: fp32 main weights (bf16 only) and two moments, sharded over DP=2 when distributed.
    optimizer = (12 if config.bf16 else 8) / (2 if config.use_distributed_optimizer else 1)
    assert plan.optimizer_gib == pytest.approx(per_gpu * optimizer / gib)
    # Saved: weights, and main weights with moments; the distributed optimizer saves main
    # weights in fp32 too.
    total = sum(p.numel() for p in reference.parameters())
    saved = (2 if config.bf16 else 4) + (
        8 if not (config.bf16 or config.use_distributed_optimizer) else 12
    )
    assert plan.checkpoint_gib == pytest.approx(total * saved / gib)


@pytest.mark.parametrize("layers_trainable", [True, False], ids=["all", "embeddings"])
def test_flops_per_token_match_pytorchs_count_of_a_transformers_step(layers_trainable):
    """MFU's numerator against torch's FLOP counter on transformers' Llama, forward + backward.

    A stage training only the embedding and output layer computes no weight gradients in the
    layers, so its MFU counts a third less of their FLOPs (it used to count all).
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    arch, seq = PRESETS["tiny"], 64
    model = LlamaForCausalLM(
        LlamaConfig(**arch.to_hf_config(vocab_size=arch.vocab_size), attn_implementation="eager")
    )
    for name, param in model.named_parameters():
        param.requires_grad_(layers_trainable or "layers." not in name)
    ids = torch.randint(0, arch.vocab_size, (1, seq))
    with FlopCounterMode(display=False) as counter:
        model(ids).logits.float().sum().backward()
    counted = counter.get_total_flops() / seq
    assert training_flops_per_token(
        arch, arch.vocab_size, seq, layers_trainable=layers_trainable
    ) == pytest.approx(counted, rel=1e-9)


def test_dry_run_prints_layout_without_a_gpu_or_data(capsys, llama2_tokenizer):
    argv = [
        "--dry-run", "--arch", "llama2-70b", "--world-size", "64",
        "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
        "--tokenizer-model", str(llama2_tokenizer), "--data-path", "no/such/data",
        "--global-batch-size", "512", "--seq-length", "4096", "--bf16",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "processes: 64 = TP 8 x PP 4 x DP 2" in out
    assert "2,097,152 tokens/step" in out
    assert "memory per GPU (estimate)" in out
    # bf16 weights, fp32 main weights and Adam's two moments: 14 bytes per parameter.
    params = float(re.search(r"parameters: ([\d.]+) B in all", out).group(1)) * 1e9
    checkpoint = float(re.search(r"checkpoint: ([\d.]+) GiB per save", out).group(1))
    assert checkpoint == pytest.approx(params * 14 / 1024**3, rel=1e-3)
    assert "warning" not in out
    assert "fully reshardable" not in out
    # The count a model card gives leaves out the rows padding the vocabulary for TP: as
    # transformers' Llama at the tokenizer's own vocabulary counts it.
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = int(re.search(r"vocabulary (\d+) \(padded \d+\)", out).group(1))
    with torch.device("meta"):
        hf_config = LlamaConfig(**PRESETS["llama2-70b"].to_hf_config(vocab_size=vocab))
        reference = sum(p.numel() for p in LlamaForCausalLM(hf_config).parameters())
    unpadded = float(re.search(r"\(([\d.]+) B without the vocabulary's padding", out).group(1))
    assert unpadded == pytest.approx(reference / 1e9, abs=1e-3)
    # Each save gathers a model-parallel shard's fp32 main weights and moments on every process.
    assert main([*argv, "--dist-ckpt-optim-fully-reshardable"]) == 0
    out = capsys.readouterr().out
    busiest = float(re.search(r"([\d.]+) B on the busiest GPU", out).group(1)) * 1e9
    gathered = float(re.search(r"each save gathers ([\d.]+) GiB", out).group(1))
    assert gathered == pytest.approx(busiest * 12 / 1024**3, rel=1e-2)
    assert "into host memory on every process" in out
    assert main([*argv, "--dist-ckpt-optim-fully-reshardable",
                 "--distrib-optim-fully-reshardable-mem-efficient"]) == 0  # fmt: skip
    assert (
        "on the first data-parallel rank of each model-parallel shard, which alone writes it"
        in (capsys.readouterr().out)
    )
    # 4 micro-batches through 4 stages: 3 / 7 of each step idle.
    assert main([*argv, "--global-batch-size", "8"]) == 0
    assert "4 micro-batches per step through 4 pipeline stages leave each GPU idle 43%" in (
        capsys.readouterr().out
    )
    assert main([*argv, "--world-size", "60"]) == 2
    err = capsys.readouterr().err
    assert "60 processes cannot be split" in err and "4 nodes of 8 GPUs or a multiple" in err
    assert main([*argv, "--world-size", "0"]) == 2  # was read as unset
    assert "--world-size must be at least 1, got 0" in capsys.readouterr().err


def test_dry_run_warns_of_a_sequence_beyond_the_models_positions(capsys, llama2_tokenizer):
    """megatron-core's RoPE takes any length: 8,192 on Llama-2 (4,096) trains without an error."""
    argv = [
        "--dry-run", "--arch", "llama2-7b", "--tokenizer-model", str(llama2_tokenizer),
        "--data-path", "no/such/data",
    ]  # fmt: skip
    assert main([*argv, "--seq-length", "4096"]) == 0
    out = capsys.readouterr().out
    assert "warning: --seq-length" not in out
    # fp32 on one GPU: far more than an 80 GB GPU holds, which the plan says.
    total = float(re.search(r"= ([\d.]+) GiB\n", out).group(1))
    assert total > 100 and f"warning: {total:.1f} GiB per GPU does not fit an 80 GB" in out
    assert main([*argv, "--seq-length", "8192"]) == 0
    assert "warning: --seq-length 8192 is beyond the 4096 positions" in capsys.readouterr().out


def test_dry_run_refuses_a_tensor_parallel_rank_of_padding_only(capsys, llama2_tokenizer):
    """The loss has no classes on such a rank (its output rows are all past the vocabulary)."""
    argv = [
        "--dry-run", "--arch", "llama2-7b", "--world-size", "8",
        "--tensor-model-parallel-size", "8", "--tokenizer-model", str(llama2_tokenizer),
        "--data-path", "no/such/data",
    ]  # fmt: skip
    # 32,000 ids padded to 65,536 rows: ranks 4 to 7 hold 8,192 rows of padding each.
    assert main([*argv, "--make-vocab-size-divisible-by", "8192"]) == 2
    err = capsys.readouterr().err
    assert (
        "config: a vocabulary of 32,000 ids padded to 65,536 rows leaves the last of 8 "
        "tensor-parallel ranks only padding rows (pad less" in err
    )
    assert main([*argv, "--make-vocab-size-divisible-by", "128"]) == 0


def test_dry_run_sizes_each_recomputation(capsys, llama2_tokenizer):
    """Llama-2 70B at TP=8, PP=4 with SP: each choice moves the activations as it should."""
    argv = [
        "--dry-run", "--arch", "llama2-70b", "--world-size", "64",
        "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
        "--sequence-parallel", "--tokenizer-model", str(llama2_tokenizer),
        "--data-path", "no/such/data", "--global-batch-size", "512", "--seq-length", "4096",
        "--bf16",
    ]  # fmt: skip

    def activations(*flags):
        assert main([*argv, *flags]) == 0
        out = capsys.readouterr().out
        return float(re.search(r"activations ([\d.]+) GiB", out).group(1)), out

    none, out = activations()
    assert "warning" not in out
    core_attn, out = activations("--recompute-activations")
    assert "warning: recomputing core_attn" in out
    mlp, _ = activations("--recompute-granularity", "selective", "--recompute-modules", "mlp")
    block, _ = activations(
        "--recompute-granularity", "full", "--recompute-method", "block",
        "--recompute-num-layers", "10",
    )  # fmt: skip
    full, _ = activations("--recompute-granularity", "full")
    assert full < mlp < none < core_attn
    # Half the stage's layers recomputed: about half the activations.
    assert full < block < none and block == pytest.approx(none / 2, rel=0.1)
    # 20 layers per stage: all of them recomputed one by one keep the layers' inputs alone.
    every, _ = activations(
        "--recompute-granularity", "full", "--recompute-method", "block",
        "--recompute-num-layers", "20",
    )  # fmt: skip
    assert every == pytest.approx(full, abs=0.05)
    assert main([*argv, "--recompute-granularity", "full", "--recompute-num-layers", "21"]) == 2
    assert "--recompute-num-layers 21: a pipeline stage has 20 layers" in capsys.readouterr().err


def _converted_metadata(directory, arch, base_vocab_size: int, **recorded) -> None:
    """The ``megatron_ext.json`` a ``convert hf-to-megatron`` at TP=8 writes (only the file)."""
    (directory / "megatron_ext.json").write_text(
        json.dumps(
            {
                "arch": asdict(arch),
                "vocab_size": arch.vocab_size,
                "padded_vocab_size": arch.padded_vocab_size(8),
                "base_vocab_size": base_vocab_size,
                **recorded,
            }
        )
    )


def test_a_checkpoint_made_with_another_tokenizer_of_its_size_is_refused(
    tmp_path, capsys, llama2_tokenizer
):
    """Same size, other pieces (an expansion re-run on other text): its rows are other tokens'."""
    tokenizer = SentencePieceEncoder(llama2_tokenizer)
    pieces = [tokenizer.processor.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    argv = [
        "--dry-run", "--arch", "llama2-7b", "--tensor-model-parallel-size", "8",
        "--pretrained-checkpoint", str(tmp_path), "--tokenizer-model", str(llama2_tokenizer),
        "--data-path", "no/such/data",
    ]  # fmt: skip
    arch = PRESETS["llama2-7b"].with_vocab_size(len(pieces))
    _converted_metadata(tmp_path, arch, len(pieces), tokenizer_pieces_sha256=pieces_sha256(pieces))
    assert main(argv) == 0
    capsys.readouterr()
    pieces[-2:] = pieces[-1], pieces[-2]
    _converted_metadata(tmp_path, arch, len(pieces), tokenizer_pieces_sha256=pieces_sha256(pieces))
    assert main(argv) == 2
    assert f"made with another tokenizer of {len(pieces):,} pieces" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "world_size"),
    [("llama2-7b-ar.yaml", 8), ("llama2-70b-ar.yaml", 64)],
)
def test_example_cluster_configs_fit_an_h100(
    tmp_path, capsys, llama2_tokenizer, config, world_size
):
    """The Slurm examples' configs resolve, and their estimated memory fits an 80 GB GPU."""
    base = SentencePieceEncoder(llama2_tokenizer).vocab_size
    argv = [
        "--dry-run", "--config", str(EXAMPLES / config), "--world-size", str(world_size),
        "--pretrained-checkpoint", str(tmp_path), "--tokenizer-model", str(llama2_tokenizer),
    ]  # fmt: skip
    assert main(argv) == 2  # no converted checkpoint there yet
    assert "not converted yet (no megatron_ext.json); to plan before converting, name its " in (
        capsys.readouterr().err
    )
    name = config.removesuffix("-ar.yaml")
    preset = PRESETS[name]
    # Sized before converting: the architecture named, the vocabulary the tokenizer's.
    assert main([*argv, "--arch", name]) == 0
    before = capsys.readouterr().out
    assert f"is not converted yet: planning with --arch {name}" in before
    # A checkpoint grown by 25,000 pieces does not go with the base tokenizer: named, exit 2.
    _converted_metadata(tmp_path, preset.with_vocab_size(base + 25000), base)
    assert main(argv) == 2
    assert f"vocabulary of {base + 25000} but --tokenizer-model" in capsys.readouterr().err
    # The examples' first stage trains the new rows: with Llama-2's own tokenizer there are
    # none, and the run refuses it (the plan too). Planned as if its last 8,000 pieces were new.
    _converted_metadata(tmp_path, preset.with_vocab_size(base), base)
    assert main(argv) == 2
    assert "new_rows_only, but there are no new rows" in capsys.readouterr().err
    _converted_metadata(tmp_path, preset.with_vocab_size(base), base - 8000)
    assert main(argv) == 0
    out = capsys.readouterr().out
    # An H100 80GB holds 79.6 GiB; leave 2.6 GiB for the CUDA context and NCCL's buffers.
    for plan in (out, before):  # before: the vocabulary padded for this run, not the converter's
        assert float(re.search(r"= ([\d.]+) GiB", plan).group(1)) < 77, plan


def test_mfu_peak_follows_the_device_name(monkeypatch):
    """torch.cuda.get_device_name() of each card; the PCIe and NVL H100s are slower than SXM."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def peak_of(name):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
        return peak_tflops()

    sxm = peak_of("NVIDIA H100 80GB HBM3")
    assert peak_of("NVIDIA H100 PCIe") < peak_of("NVIDIA H100 NVL") < sxm
    assert peak_of("NVIDIA H200") == peak_of("NVIDIA GH200 480GB") == sxm
    assert peak_of("NVIDIA A100-SXM4-80GB") == peak_of("NVIDIA A100 80GB PCIe") < sxm
    assert peak_of("Tesla T4") is None  # unknown: no MFU rather than a wrong one
    assert peak_of("NVIDIA H100 PCIe") == 756.0 and peak_tflops(500.0) == 500.0


def test_dry_run_refuses_a_stage_of_new_rows_without_any(capsys, llama2_tokenizer):
    """The run refuses it at start; the plan used to print it (with the base tokenizer)."""
    argv = [
        "--config", str(REPO / "examples" / "configs" / "llama2-70b-ar.yaml"), "--dry-run",
        "--world-size", "64", "--arch", "llama2-70b", "--tokenizer-model", str(llama2_tokenizer),
    ]  # fmt: skip
    # Before conversion the checkpoint will record the base vocabulary: nothing to check yet.
    assert main(argv) == 0
    assert "(new rows only)" in capsys.readouterr().out
    assert main([*argv, "--base-vocab-size", "32000"]) == 2
    assert "new_rows_only, but there are no new rows (base vocabulary 32000, vocabulary 32000)" in (
        capsys.readouterr().err
    )
