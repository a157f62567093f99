"""Llama's RMSNorm for megatron-core's local layer spec, sequence parallelism included.

megatron-core's local spec builds its norms with ``WrappedTorchNorm``, which refuses sequence
parallelism, and takes the final norm from whatever is installed (apex's ``FusedLayerNorm``,
which refuses RMSNorm, when apex is there without Transformer Engine). This module is the one
norm of the local spec, so the model does not depend on the environment.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron-core's norm constructor.

    The weight is created in ``config.params_dtype``, as Transformer Engine's norms and
    Megatron-LM's bf16 wrapper make it: with the input's dtype, PyTorch runs its fused RMSNorm
    kernel (a bf16 input with an fp32 weight falls back to its unfused elementwise path).

    Under sequence parallelism each tensor-parallel rank normalises its own slice of the
    sequence, so the weight's gradient on a rank is a partial sum. The weight is marked
    ``sequence_parallel``, as Transformer Engine's and apex's norms mark theirs, and
    megatron-core's ``finalize_model_grads`` sums it over the tensor-parallel group.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        del persist_layer_norm, zero_centered_gamma, normalization  # megatron-core's interface
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError(
                f"RMSNorm: the config asks for {config.normalization}"
                f"{' with zero-centred gamma' if config.layernorm_zero_centered_gamma else ''}"
            )
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
