"""Training-step throughput of the tiny config on CPU: our kernels vs megatron-core's.

Same process, same data, same weights (the megatron path is built from the same seed and the
fused embedding re-wraps the same initial weight): one optimizer step of the tiny Llama (4 x 256,
32,000-piece vocabulary, seq 128, global batch 8) per round.
"""

from __future__ import annotations

import os

import pytest

from tests.benchmarks.conftest import record_training
from tests.conftest import preprocess_languages
from tests.distributed import free_port


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
