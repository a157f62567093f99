"""This project's kernels in megatron-core's fusion slots, where TE or apex would fill them.

megatron-core imports two of its fused kernels from optional packages into module globals and
leaves them empty when the package is missing; a ``TransformerConfig`` asking for the fusion is
then refused. Without Transformer Engine and apex (a plain PyTorch install) these functions fill
the slots with ours, which compute the same thing:

- ``rope_utils.fused_apply_rotary_pos_emb`` (TE's fused RoPE, used with ``apply_rope_fusion``):
  :mod:`kernels.rope`, one kernel each way instead of a dozen PyTorch ops.
- ``tensor_parallel.layers.fused_weight_gradient_mlp_cuda`` (apex's extension, used with
  ``gradient_accumulation_fusion``): each linear layer's weight-gradient GEMM adds into the fp32
  ``main_grad`` directly (:func:`kernels._common.accumulate_mm_fp32`: cuBLAS with an fp32
  output on a GPU), instead of making a bf16 gradient that megatron-core's DDP then adds in.

A filled slot is process-wide, but only read by configs that ask for the fusion, which could not
be built while the slot was empty; TE's and apex's own functions are never replaced.
"""

from __future__ import annotations

import torch

from kernels import rope
from kernels._common import accumulate_mm_fp32


def transformer_engine_rope() -> bool:
    """Whether megatron-core found Transformer Engine's fused rotary embedding."""
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb not in (None, rope.fused_apply_rotary_pos_emb)


def use_fused_rope() -> None:
    """Give megatron-core :mod:`kernels.rope` as its fused rotary embedding where TE's is absent.

    With ``apply_rope_fusion`` on, megatron-core's attention calls the module-level
    ``rope_utils.fused_apply_rotary_pos_emb``; its ``TransformerConfig`` refuses the flag while
    that is None.
    """
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = rope.fused_apply_rotary_pos_emb


class WeightGradientAccumulation:
    """apex's ``fused_weight_gradient_mlp_cuda`` interface: ``main_grad += grad_output^T @ input``.

    megatron-core calls these with the layer's input ``[tokens, in]`` and output gradient
    ``[tokens, out]`` flattened to two dimensions, and the weight's ``main_grad`` ``[out, in]``.
    """

    @staticmethod
    def wgrad_gemm_accum_fp32(
        total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
    ) -> None:
        """Into an fp32 ``main_grad``; bf16/fp16 operands are never rounded on the way."""
        accumulate_mm_fp32(main_grad, grad_output.t(), total_input)

    @staticmethod
    def wgrad_gemm_accum_fp16(
        total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
    ) -> None:
        """Into a ``main_grad`` in the operands' own dtype (megatron-core's bf16 gradients)."""
        main_grad.addmm_(grad_output.t(), total_input)


def apex_weight_gradient() -> bool:
    """Whether megatron-core found apex's fused weight-gradient extension."""
    from megatron.core.tensor_parallel import layers

    return layers._grad_accum_fusion_available and not isinstance(
        getattr(layers, "fused_weight_gradient_mlp_cuda", None), WeightGradientAccumulation
    )


def use_fused_weight_gradient() -> None:
    """Give megatron-core :class:`WeightGradientAccumulation` where apex's extension is absent.

    Call before the model is built: megatron-core's linear layers refuse
    ``gradient_accumulation_fusion`` at construction while the extension is missing. Only its
    linear layers' backward reads the slot (its deferred embedding weight-gradient, a pipeline
    option this project does not set, imports apex by name).
    """
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = WeightGradientAccumulation()
        layers._grad_accum_fusion_available = True
