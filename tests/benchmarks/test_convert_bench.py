"""Conversion time and peak memory for a ~1B-parameter Llama-shaped checkpoint.

Goal (issue 4): peak RSS of ``megatron-ext convert hf-to-megatron`` at most 1.5x the bf16 model
size (Megatron-LM's converter builds the whole fp32 model, about 4x). Peak RSS is the converting
process's own ``VmHWM``.
"""

import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

ONE_B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096,
)  # fmt: skip

PROBE = (
    "import re, sys\n"
    "from megatron_ext.commands.convert import main\n"
    "code = main(sys.argv[1:])\n"
    "print('vmhwm_kb', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
    "sys.exit(code)\n"
)


@pytest.fixture(scope="module")
def one_b_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama1b")
    config = transformers.LlamaConfig(**ONE_B, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(directory, max_shard_size="1GB")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return directory, size


def test_convert_1b_time_and_peak_rss(benchmark, one_b_checkpoint, tmp_path):
    hf_dir, bf16_bytes = one_b_checkpoint
    peaks = []

    def convert():
        out = tmp_path / "mcore"
        result = subprocess.run(
            [sys.executable, "-c", PROBE, "hf-to-megatron", "--hf-dir", str(hf_dir),
             "--output-dir", str(out), "--dtype", "bf16", "--force"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        peaks.append(int(re.search(r"vmhwm_kb (\d+)", result.stdout).group(1)) * 1024)

    benchmark.pedantic(convert, rounds=1, iterations=1)
    ratio = max(peaks) / bf16_bytes
    benchmark.extra_info.update(
        bf16_model_gib=bf16_bytes / 2**30, peak_rss_gib=max(peaks) / 2**30, rss_over_bf16=ratio
    )
    print(f"\nconvert 1B: bf16 model {bf16_bytes / 2**30:.2f} GiB, peak RSS "
          f"{max(peaks) / 2**30:.2f} GiB = {ratio:.2f}x")  # fmt: skip
