"""Training-step throughput of the tiny config on CPU: our kernels vs megatron-core's.

Same process, same data, same weights (the megatron path is built from the same seed and the
fused embedding re-wraps the same initial weight): one optimizer step of the tiny Llama (4 x 256,
32,000-piece vocabulary, seq 128, global batch 8) per round.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_ext.distributed import free_port
from tests.benchmarks.conftest import record_training
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


# A ~1B Llama-shaped model for the GPU measurements of issue 6 (tokens/s, MFU, peak memory).
ONE_B = {"hidden_size": 2048, "num_layers": 16, "num_attention_heads": 16, "num_query_groups": 16,
         "ffn_hidden_size": 5632}  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("vocab", [32000, 57344])
@pytest.mark.parametrize("kernels", ["megatron", "fused"])
def test_gpu_1b_training_step(
    benchmark, process_group, tiny_data, llama2_tokenizer, kernels, vocab
):
    """bf16, seq 4096, micro-batch 1, 8 micro-batches per step, one GPU; peak memory per step."""
    import dataclasses

    from megatron_ext.training.config import load_config
    from megatron_ext.training.loop import LoopState, Trainer
    from megatron_ext.training.model import build_model
    from megatron_ext.training.plan import peak_tflops, training_flops_per_token
    from megatron_ext.training.stage import build_stage

    directory, data = tiny_data
    config = load_config(
        None,
        [
            "--tokenizer-model", str(llama2_tokenizer), "--kernels", kernels, "--bf16",
            "--data-path", "0.25", data["en"], "0.75", data["ar"],
            "--data-cache-path", str(directory / "cache"), "--train-iters", "50",
            "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size", "8",
        ],
    )  # fmt: skip
    config.arch = {"preset": "llama2-7b", **ONE_B}
    trainer = Trainer(config)
    # The data's ids are below 32,000; a larger vocabulary stands for an expanded tokenizer.
    plan = dataclasses.replace(
        trainer.plan, arch=trainer.plan.arch.with_vocab_size(vocab), padded_vocab_size=vocab
    )
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
    print(
        f"\n1B {kernels} V={vocab}: {tokens_per_s:,.0f} tokens/s, MFU {mfu}, "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    )
