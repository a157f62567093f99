"""The dry run's activation estimate against the tensors megatron-core's layers keep for backward.

Each case builds the real model (local spec, fused kernels, the fused SwiGLU that GPU runs use)
on gloo ranks, runs one training forward pass, and walks the autograd graph for the tensors its
nodes have saved, counting each storage once and leaving out parameters. Layers add the same
amount each, so the difference between a 3-layer and a 1-layer model is what two layers keep;
:func:`stage_activation_bytes` must give that difference.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import random as mcore_random

from megatron_ext.arch import LlamaArch
from megatron_ext.training.config import load_config
from megatron_ext.training.plan import stage_activation_bytes
from tests.distributed import run_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo multi-rank test")

# GQA with 4 query heads per key/value head, and Llama's FFN ratio (11008 / 4096).
ARCH = LlamaArch(256, 1, 8, 2, 688, 1000, max_position_embeddings=1024)
SETTINGS = ["--seq-length", "128", "--micro-batch-size", "2", "--bias-swiglu-fusion", "true"]


def saved_bytes(model, loss: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages that ``loss``'s graph keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                values = value if isinstance(value, tuple | list) else [value]
                tensors += [t for t in values if isinstance(t, torch.Tensor)]
        if hasattr(node, "saved_tensors"):  # custom autograd Functions' ctx.save_for_backward
            tensors += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return sum(storages.values())


def _measure(rank, world_size, overrides):
    """Bytes kept by a 1-layer and a 3-layer model's forward pass on this rank."""
    from dataclasses import replace

    from megatron_ext.training.model import ModelPlan, build_model

    config = load_config(None, [*SETTINGS, *overrides])
    measured = {}
    for layers in (1, 3):
        plan = ModelPlan(replace(ARCH, num_layers=layers), 1024, None, torch.float32)
        model = build_model(config, plan)
        tokens = torch.randint(0, ARCH.vocab_size, (config.micro_batch_size, config.seq_length))
        positions = torch.arange(config.seq_length).expand_as(tokens)
        measured[layers] = saved_bytes(model, model(tokens, positions, None, labels=tokens))
    return measured


@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [
        (1, []),
        (2, ["--tensor-model-parallel-size", "2"]),
        (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        (1, ["--recompute-granularity", "selective", "--recompute-modules", "mlp"]),
        (1, ["--recompute-activations"]),  # core_attn: nothing to drop with fused attention
        (
            2,
            [
                *["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                *["--recompute-granularity", "selective", "--recompute-modules", "mlp"],
            ],
        ),
        (1, ["--recompute-granularity", "full"]),
        (
            2,
            [
                "--tensor-model-parallel-size",
                "2",
                "--sequence-parallel",
                "--recompute-granularity",
                "full",
            ],
        ),
        (
            1,
            [
                "--recompute-granularity",
                "full",
                "--recompute-method",
                "block",
                "--recompute-num-layers",
                "2",
            ],
        ),
    ],
    ids=[
        "tp1",
        "tp2",
        "tp2-sp",
        "mlp",
        "core-attn",
        "tp2-sp-mlp",
        "full",
        "tp2-sp-full",
        "block",
    ],
)
def test_estimate_matches_what_the_layers_keep(world_size, overrides):
    config = load_config(None, [*SETTINGS, *overrides])
    tp = config.tensor_model_parallel_size
    measured = run_ranks(_measure, world_size, overrides, tensor_model_parallel_size=tp)[0]
    (three, _), (one, _) = (stage_activation_bytes(ARCH, config, n) for n in (3, 1))
    expected = three - one
    # On a CPU torch's RMSNorm is composite and keeps the normalised input (x * rstd) besides x;
    # on a GPU it is one kernel keeping x and the per-row scale, as TE's does and as the
    # estimate counts. One extra [s, b, h] tensor per norm, in every layer that keeps its own.
    recompute = config.recompute()

    def layers_keeping_their_own(layers: int) -> int:
        if recompute.get("recompute_granularity") == "full":
            if recompute["recompute_method"] == "uniform":
                return 0
            return layers - min(recompute["recompute_num_layers"], layers)
        return layers

    whole = 1 / tp if config.sequence_parallel else 1
    norm_extra = 2 * whole * config.seq_length * config.micro_batch_size * ARCH.hidden_size * 4
    expected += (layers_keeping_their_own(3) - layers_keeping_their_own(1)) * norm_extra
    assert measured[3] - measured[1] == pytest.approx(expected, rel=0.002), (measured, expected)


def _build(rank, world_size, overrides):
    from megatron_ext.training.model import ModelPlan, build_model

    build_model(
        load_config(None, [*SETTINGS, *overrides]), ModelPlan(ARCH, 1024, None, torch.float32)
    )


@pytest.mark.skipif(mcore_random.HAVE_TE, reason="megatron-core's layernorm recompute runs with TE")
def test_layernorm_recompute_without_transformer_engine_is_refused():
    """megatron-core 0.16 fails inside the first forward pass (a NameError) without TE."""
    with pytest.raises(AssertionError, match="--recompute-modules layernorm needs Transformer"):
        run_ranks(
            _build, 1, ["--recompute-granularity", "selective", "--recompute-modules", "layernorm"]
        )
