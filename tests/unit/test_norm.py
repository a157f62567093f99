"""model/norm.py's RMSNorm: its weight in the training dtype, so PyTorch's fused kernel runs."""

from __future__ import annotations

import warnings

import pytest
import torch
from megatron.core.transformer import TransformerConfig

from megatron_ext.model.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_follows_params_dtype_and_matches_llama(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, normalization="RMSNorm",
    )  # fmt: skip
    torch.manual_seed(0)
    norm = RMSNorm(config, 64, eps=1e-5)
    assert norm.weight.dtype == dtype
    x = torch.randn(3, 2, 64, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    with warnings.catch_warnings():
        # PyTorch warns when input and weight dtypes differ and it falls back to unfused ops.
        warnings.filterwarnings("error", message="Mismatch dtype")
        got = norm(x)
    reference = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    reference.weight.data.copy_(norm.weight.data)
    # bf16: the two round differently inside; they agree to one unit in the last place.
    bf16 = dtype == torch.bfloat16
    torch.testing.assert_close(
        got, reference(x), rtol=2**-7 if bf16 else 0, atol=1e-2 if bf16 else 0
    )
