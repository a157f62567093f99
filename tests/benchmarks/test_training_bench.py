"""Training steps on CPU, our kernels vs megatron-core's: tiny-config throughput and the memory
an expanded vocabulary costs; the same on a GPU with a ~1B model (skipped without CUDA).

Throughput: same process, same data, same weights (the megatron path is built from the same seed
and the fused embedding re-wraps the same initial weight): one optimizer step of the tiny Llama
(4 x 256, 32,000-piece vocabulary, seq 128, global batch 8) per round.

Memory: each (kernels, vocabulary) pair trains three steps in a fresh process at 8,192 tokens per
micro-batch and reports its peak resident memory above what it held before the model was built,
so parameters, gradients, optimizer state and the step's transients all count. The process maps
every allocation of 128 KiB or more on its own (glibc's ``MALLOC_MMAP_THRESHOLD_``), so freed
tensors leave it and the peak is that of live tensors, as ``max_memory_allocated`` is on a GPU;
with glibc's defaults, memory the heap keeps after a free blurs the comparison. Issue 6's goal:
growing the vocabulary adds at most the new rows' parameters, gradients and Adam state.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_ext.distributed import free_port
from tests.benchmarks.conftest import GEMM_KERNELS, kernel_breakdown, record_training
from tests.conftest import preprocess_languages


@pytest.fixture(scope="module")
def process_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return None


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, corpora, llama2_tokenizer):
    directory = tmp_path_factory.mktemp("bench_data")
    return directory, preprocess_languages(corpora, llama2_tokenizer, directory)


@pytest.mark.parametrize("kernels", ["megatron", "fused"])
def test_tiny_training_step(benchmark, process_group, tiny_data, llama2_tokenizer, kernels):
    from megatron_ext.training.config import load_config
    from megatron_ext.training.loop import LoopState, Trainer
    from megatron_ext.training.model import build_model
    from megatron_ext.training.stage import build_stage

    directory, data = tiny_data
    config = load_config(
        os.path.join(os.path.dirname(__file__), "../../examples/configs/tiny.yaml"),
        [
            "--tokenizer-model", str(llama2_tokenizer), "--kernels", kernels,
            "--data-path", "0.25", data["en"], "0.75", data["ar"],
            "--data-cache-path", str(directory / "cache"), "--train-iters", "200",
        ],
    )  # fmt: skip
    config.stages = []
    trainer = Trainer(config)
    run = build_stage(
        config, trainer.plan, config.resolved_stages()[0], build_model(config, trainer.plan)
    )
    state = LoopState()

    def step():
        trainer.train_step(run, state)
        state.iteration += 1

    benchmark.pedantic(step, rounds=8, warmup_rounds=2)
    tokens = config.global_batch_size * config.seq_length
    record_training(kernels, benchmark.stats.stats.median, tokens)


_MEMORY_CHILD = textwrap.dedent(
    """
    import dataclasses, json, os, re, resource, sys
    from megatron_ext.distributed import free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    from megatron_ext.training.config import load_config
    from megatron_ext.training.loop import LoopState, Trainer
    from megatron_ext.training.model import build_model
    from megatron_ext.training.stage import build_stage

    kernels, vocab, config_path, *overrides = sys.argv[1:]
    vocab = int(vocab)
    config = load_config(config_path, ["--kernels", kernels, *overrides])
    config.stages = []
    trainer = Trainer(config)
    # The data's ids are below 32,000; a larger vocabulary stands for an expanded tokenizer.
    plan = dataclasses.replace(
        trainer.plan, arch=trainer.plan.arch.with_vocab_size(vocab), padded_vocab_size=vocab
    )
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    run = build_stage(config, plan, config.resolved_stages()[0], build_model(config, plan))
    state = LoopState()
    for _ in range(3):
        trainer.train_step(run, state)
    # The process's own high-water mark (ru_maxrss would keep the parent's from before exec).
    status = open("/proc/self/status").read()
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
    print(json.dumps({"peak_bytes": peak - before, "hidden_size": plan.arch.hidden_size}))
    """
)
# glibc settings under which a freed tensor's memory leaves the process (see the docstring).
LIVE_MEMORY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
# Bytes per parameter that do not depend on the step: fp32 weight, fp32 main_grad, Adam's two
# fp32 moments (CPU runs train in fp32 with megatron-core's FP32Optimizer).
CPU_STATE_BYTES_PER_PARAM = 16


@pytest.mark.slow
def test_cpu_expanded_vocab_memory(benchmark, tiny_data, llama2_tokenizer):
    directory, data = tiny_data
    overrides = [
        "--tokenizer-model", str(llama2_tokenizer), "--seq-length", "512",
        "--micro-batch-size", "16", "--global-batch-size", "16", "--eval-iters", "1",
        "--data-path", "0.25", data["en"], "0.75", data["ar"],
        "--data-cache-path", str(directory / "cache"),
    ]  # fmt: skip
    config_path = os.path.join(os.path.dirname(__file__), "../../examples/configs/tiny.yaml")
    vocabs = (32000, 57344)

    def measure() -> dict[tuple[str, int], dict]:
        results = {}
        for kernels in ("fused", "megatron"):
            for vocab in vocabs:
                out = subprocess.run(
                    [sys.executable, "-c", _MEMORY_CHILD, kernels, str(vocab), config_path]
                    + overrides,
                    capture_output=True, text=True, env={**os.environ, **LIVE_MEMORY_MALLOC},
                )  # fmt: skip
                assert out.returncode == 0, f"{kernels} V={vocab}:\n{out.stderr[-3000:]}"
                results[kernels, vocab] = json.loads(out.stdout.strip().splitlines()[-1])
        return results

    results = benchmark.pedantic(measure, rounds=1, iterations=1)
    peaks = {key: result["peak_bytes"] for key, result in results.items()}
    hidden = results["fused", vocabs[0]]["hidden_size"]
    growth = report_vocab_growth(
        peaks, hidden, CPU_STATE_BYTES_PER_PARAM, "8,192 tokens per micro-batch"
    )
    benchmark.extra_info.update({f"{k}_growth_mib": v / 2**20 for k, v in growth.items()})
    assert growth["fused"] < growth["megatron"]


def report_vocab_growth(
    peaks: dict[tuple[str, int], int], hidden: int, state_bytes_per_param: int, setting: str
) -> dict[str, int]:
    """Print, per kernels, how much the peak grows with the vocabulary against the allowance.

    The allowance is the new embedding and output rows' weights, gradients and optimizer state.
    Returns the growth in bytes per kernels choice with both vocabularies measured.
    """
    vocabs = sorted({vocab for _, vocab in peaks})
    if len(vocabs) < 2:
        return {}
    allowance = state_bytes_per_param * (vocabs[-1] - vocabs[0]) * hidden * 2
    mib = 2**20
    print(f"\nexpanded vocabulary {vocabs[0]} -> {vocabs[-1]}, {setting}:")
    print(f"  allowance (new rows' weights, gradients, optimizer state): {allowance / mib:.0f} MiB")
    growth = {}
    for kernels in sorted({k for k, _ in peaks}):
        if (kernels, vocabs[0]) not in peaks or (kernels, vocabs[-1]) not in peaks:
            continue
        small, large = peaks[kernels, vocabs[0]], peaks[kernels, vocabs[-1]]
        growth[kernels] = large - small
        print(
            f"  {kernels}: peak {small / mib:,.0f} -> {large / mib:,.0f} MiB, grows "
            f"{growth[kernels] / mib:,.0f} MiB ({growth[kernels] / allowance:.2f}x the allowance)"
        )
    return growth


# A ~1B Llama-shaped model for the GPU measurements of issue 6 (tokens/s, MFU, peak memory).
# bf16 training state per parameter: bf16 weight, fp32 main_grad, fp32 master weight, Adam's two
# fp32 moments.
GPU_STATE_BYTES_PER_PARAM = 18
_GPU_PEAKS: dict[tuple[str, int], int] = {}
ONE_B = {"hidden_size": 2048, "num_layers": 16, "num_attention_heads": 16, "num_query_groups": 16,
         "ffn_hidden_size": 5632}  # fmt: skip
# Where a training step's GPU time goes, by kernel name (first match wins: cuBLAS and PyTorch's
# attention kernels are both cutlass-based).
_STEP_KERNEL_KINDS = (
    ("attention", re.compile(r"flash|fmha|softmax", re.IGNORECASE)),
    GEMM_KERNELS,
    ("our loss", re.compile(r"_ce_")),
    ("our embedding", re.compile(r"_embedding_")),
    ("optimizer", re.compile(r"multi_tensor|adam", re.IGNORECASE)),
    ("norm", re.compile(r"norm", re.IGNORECASE)),
    ("copy/cast", re.compile(r"copy", re.IGNORECASE)),
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("vocab", [32000, 57344])
@pytest.mark.parametrize(
    "kernels, variant",
    [
        ("megatron", ()),
        ("fused", ()),
        ("fused", ("--transformer-impl", "local")),
        ("fused", ("--transformer-impl", "local", "--apply-rope-fusion", "false")),
        ("fused", ("--transformer-impl", "local", "--gradient-accumulation-fusion", "false")),
        ("fused", ("--micro-batch-size", "4", "--global-batch-size", "32")),
    ],
    ids=[
        "megatron",
        "fused",
        "fused-local-spec",
        "fused-without-rope-fusion",
        "fused-without-wgrad-fusion",
        "fused-micro-batch-4",
    ],
)
def test_gpu_1b_training_step(
    benchmark, process_group, tiny_data, llama2_tokenizer, kernels, variant, vocab
):
    """bf16, seq 4096, micro-batch 1, 8 micro-batches per step, one GPU; peak memory per step.

    The variants run at the first vocabulary only. On megatron-core's local layer spec:
    ``fused-local-spec`` is ours on it where Transformer Engine is installed (elsewhere that is
    ``fused`` again, and skipped); ``fused-without-...`` is ours with one of model/fusions.py's
    fusions turned off, what that fusion (on by default without TE and apex) is worth. On the
    default spec: ``fused-micro-batch-4``, four sequences per micro-batch (32 GiB by
    ``--dry-run``), so each launch carries four times the work: how much of micro-batch 1's step
    is host time rather than GPU time.
    """
    import dataclasses

    from megatron_ext.model.gpt import transformer_engine_enabled
    from megatron_ext.training.config import load_config
    from megatron_ext.training.loop import LoopState, Trainer
    from megatron_ext.training.model import build_model, kernel_summary
    from megatron_ext.training.plan import peak_tflops, plan_run, training_flops_per_token
    from megatron_ext.training.stage import build_stage

    if variant and vocab != 32000:
        pytest.skip("the variants are compared at one vocabulary")
    if variant == ("--transformer-impl", "local") and not transformer_engine_enabled():
        pytest.skip("the local layer spec is what `fused` runs here: no Transformer Engine")
    directory, data = tiny_data
    config = load_config(
        None,
        [
            "--tokenizer-model", str(llama2_tokenizer), "--kernels", kernels, "--bf16",
            "--data-path", "0.25", data["en"], "0.75", data["ar"],
            "--data-cache-path", str(directory / "cache"), "--train-iters", "50",
            "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size", "8",
            *variant,
        ],
    )  # fmt: skip
    config.arch = {"preset": "llama2-7b", **ONE_B}
    trainer = Trainer(config)
    # The data's ids are below 32,000; a larger vocabulary stands for an expanded tokenizer.
    plan = dataclasses.replace(
        trainer.plan, arch=trainer.plan.arch.with_vocab_size(vocab), padded_vocab_size=vocab
    )
    # What this test's model, state and steps hold: an earlier case's model, kept by reference
    # cycles, must neither count nor be freed during the measurement.
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    run = build_stage(config, plan, config.resolved_stages()[0], build_model(config, plan))
    state = LoopState()

    def step():
        trainer.train_step(run, state)
        torch.cuda.synchronize()
        state.iteration += 1

    step()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    tokens_per_s = config.global_batch_size * config.seq_length / benchmark.stats.stats.median
    flops = training_flops_per_token(plan.arch, vocab, config.seq_length) * tokens_per_s
    mfu = f"{100 * flops / (peak_tflops() * 1e12):.1f}%" if peak_tflops() else "n/a"
    # --dry-run's estimate of the same run, to compare with the measured peak.
    estimate = plan_run(config, plan.arch, vocab, world_size=1)
    print(
        f"\n1B {' '.join((kernels, *variant))} V={vocab}: "
        f"{tokens_per_s:,.0f} tokens/s, MFU {mfu}, "
        f"peak {(torch.cuda.max_memory_allocated() - before) / 2**30:.2f} GiB "
        f"(--dry-run: {estimate.total_gib:.2f} GiB, activations {estimate.activations_gib:.2f})"
        f"\n  {kernel_summary(config)}"
    )
    if not variant:
        _GPU_PEAKS[kernels, vocab] = torch.cuda.max_memory_allocated() - before
    print(f"  one step by kind of kernel: {kernel_breakdown(step, _STEP_KERNEL_KINDS)}")
    report_vocab_growth(
        _GPU_PEAKS, plan.arch.hidden_size, GPU_STATE_BYTES_PER_PARAM, "1B, bf16, seq 4096"
    )
    run = state = None  # the step's closure sees these: its model is freed before the next case
