"""`megatron-ext train --dry-run`: sizes checked against transformers' own Llama."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.arch import PRESETS
from megatron_ext.commands.train import main
from megatron_ext.training.config import load_config
from megatron_ext.training.plan import plan_run


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
    assert main([*argv, "--world-size", "60"]) == 2
    assert "60 processes cannot be split" in capsys.readouterr().err
