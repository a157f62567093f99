"""model/fusions.py's weight-gradient accumulation: apex's ``fused_weight_gradient_mlp_cuda``
interface, against the fp64 product, and the slot megatron-core's linear layers read."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.model.fusions import (
    WeightGradientAccumulation,
    apex_weight_gradient,
    use_fused_weight_gradient,
)
from tests.helpers import DEVICE


def _operands(dtype: torch.dtype, tokens: int = 37, fan_in: int = 24, fan_out: int = 40):
    gen = torch.Generator().manual_seed(0)
    total_input = torch.randn(tokens, fan_in, generator=gen).to(DEVICE, dtype)
    grad_output = torch.randn(tokens, fan_out, generator=gen).to(DEVICE, dtype)
    main_grad = torch.randn(fan_out, fan_in, generator=gen).to(DEVICE)
    return total_input, grad_output, main_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp32_accumulation_adds_the_unrounded_product(dtype):
    """``main_grad += grad_output^T @ input``, the product never rounded to bf16: within fp32
    rounding of the fp64 result, where rounding the product to bf16 first (megatron-core's
    layers without the fusion) is off by far more."""
    total_input, grad_output, main_grad = _operands(dtype)
    product = grad_output.double().t() @ total_input.double()
    expected = main_grad.double() + product
    WeightGradientAccumulation.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    error = (main_grad.double() - expected).abs().max().item()
    assert error < 1e-4 * expected.abs().max().item()
    if dtype == torch.bfloat16:
        rounded_first = (main_grad.double() - product) + product.to(dtype).double()
        assert (rounded_first - expected).abs().max().item() > 100 * error


def test_same_dtype_accumulation():
    """megatron-core's bf16/fp16 ``main_grad`` (here fp64 throughout, to compare exactly)."""
    total_input, grad_output, main_grad = _operands(torch.float64)
    main_grad = main_grad.double()
    expected = main_grad + grad_output.t() @ total_input
    WeightGradientAccumulation.wgrad_gemm_accum_fp16(total_input, grad_output, main_grad)
    torch.testing.assert_close(main_grad, expected, rtol=1e-12, atol=1e-12)


def test_fills_megatron_cores_slot_only_where_apex_is_missing(monkeypatch):
    from megatron.core.tensor_parallel import layers

    if apex_weight_gradient():
        pytest.skip("apex's fused_weight_gradient_mlp_cuda is installed: it keeps the slot")
    # Restored afterwards, as the import left them.
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", None, raising=False)
    use_fused_weight_gradient()
    assert layers._grad_accum_fusion_available
    assert isinstance(layers.fused_weight_gradient_mlp_cuda, WeightGradientAccumulation)
    assert not apex_weight_gradient()
