"""FusedDotProductAttention against megatron-core's DotProductAttention (gloo ranks, TP=1/2)."""

import pytest
import torch

from tests.distributed import run_ranks

S, B, HEADS, GROUPS, HEAD_DIM = 11, 3, 8, 2, 8


def _compare_rank(rank, world_size):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.model.attention import FusedDotProductAttention
    from megatron_ext.training.model import training_device

    model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        attention_dropout=0.0,
        tensor_model_parallel_size=world_size,
        use_cpu_initialization=True,
    )
    theirs = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    ours = FusedDotProductAttention(config, 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(rank)  # each rank holds its own heads
    heads, groups = HEADS // world_size, GROUPS // world_size
    # On a GPU megatron-core's attention allocates its buffers there: the inputs go along.
    device = training_device()
    inputs = [
        torch.randn(S, B, n, HEAD_DIM, generator=gen, dtype=torch.float64).to(device)
        for n in (heads, groups, groups)
    ]
    upstream = torch.randn(S, B, heads * HEAD_DIM, generator=gen, dtype=torch.float64).to(device)
    # Two packed documents per sample (--reset-attention-mask): True hides a position.
    documents = torch.ones(B, 1, S, S, dtype=torch.bool, device=device).triu(1)
    documents[:, :, 5:, :5] = True
    for mask in (None, documents):
        results = []
        for module in (theirs, ours):
            q, k, v = (t.clone().requires_grad_() for t in inputs)
            out = module(q, k, v, mask)
            out.backward(upstream)
            results.append((out, q.grad, k.grad, v.grad))
        for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=f"{name}, mask {mask}")
    # The documents really are separate: the second one's outputs ignore the first's keys.
    q, k, v = (t.clone() for t in inputs)
    k[:5], v[:5] = 0, 0
    torch.testing.assert_close(ours(q, k, v, documents)[5:], ours(*inputs, documents)[5:])


@pytest.mark.parametrize("world_size", [1, 2])
def test_fused_attention_matches_megatron(world_size):
    run_ranks(_compare_rank, world_size)
