"""Core attention for megatron-core's local layer spec through PyTorch's fused attention.

megatron-core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` scores and
their softmax (``s^2`` memory per head, saved for backward), and repeats the key/value heads for
GQA. Without Transformer Engine that is the only attention megatron-core offers.
:class:`FusedDotProductAttention` computes the same function with
``torch.nn.functional.scaled_dot_product_attention``: flash or memory-efficient kernels on a GPU,
fused kernels on a CPU, grouped heads without copies, no ``s^2`` tensors kept for backward.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch.nn import functional as F  # noqa: N812 - the universal alias


class FusedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` (same constructor, sharding and checkpoint keys) on fused kernels.

    Causal and arbitrary boolean masks (megatron's convention: True hides a position, as with
    ``--reset-attention-mask``) are supported. Features the fused call does not express (attention
    dropout, query-key layer scaling, sliding windows, softmax offsets, attention bias, packed
    sequences) and queries over a longer key cache fall back to megatron-core's implementation.
    """

    def _fused_supported(self, query, key, attention_bias, packed_seq_params) -> bool:
        dropout = self.attention_dropout.p if self.training else 0.0
        return (
            query.shape[0] == key.shape[0]  # not decoding with a KV cache
            and dropout == 0.0
            and attention_bias is None
            and packed_seq_params is None
            and self.softmax_offset is None
            and not self.config.apply_query_key_layer_scaling
            and self.scale_mask_softmax.window_size is None
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """``[sq, b, heads, d]`` queries, ``[sk, b, groups, d]`` keys/values -> ``[sq, b, h]``."""
        if not self._fused_supported(query, key, attention_bias, packed_seq_params):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        # Like megatron-core's, the layer's own mask type decides; the argument is not used.
        causal = self.attn_mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None:
            mask, causal = ~attention_mask, False  # SDPA's True means "attend"
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if torch.is_grad_enabled() and _holds_more(value):
            # megatron-core's value is a view of the fused QKV projection's output (queries and
            # keys leave it through RoPE). Kept for backward as a view, it would keep that whole
            # buffer alive: (1 + 2 x groups / heads) hidden sizes per token instead of v's own.
            v = v.contiguous()
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


def _holds_more(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a view into a larger buffer."""
    return tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()
