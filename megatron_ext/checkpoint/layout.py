"""Where each Llama weight lives in Hugging Face and in megatron-core, and in what layout.

Everything works one tensor (or one layer) at a time, so a converter never needs a second copy of
a layer (``checkpoint/convert.py`` says what it holds at its peak). Facts (checked against
megatron-core and by the logits-equivalence tests):

* QKV is one matrix, interleaved per query group: ``[q heads of group 0 | k0 | v0 | q heads of
  group 1 | k1 | v1 ...]``; tensor parallelism hands each rank whole groups (a plain split).
* SwiGLU ``linear_fc1`` is ``[gate; up]``, and each TP shard is ``[gate_i; up_i]``.
* Column-parallel (split dim 0): QKV, fc1, embedding, output layer. Row-parallel (dim 1):
  ``linear_proj`` (o_proj), ``linear_fc2`` (down_proj). Norms are replicated.
* Hugging Face q/k weights are already in rotate-half order (megatron ``rotary_interleaved=False``).
* Names below are those of megatron-core's local layer spec. megatron-core's
  ``dist_checkpointing`` shards them over TP and PP itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from megatron_ext.arch import LlamaArch

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

_LAYER = "decoder.layers.{}."
# megatron-core (local spec) suffix -> Hugging Face suffix, for the one-to-one weights.
_LAYER_ONE_TO_ONE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
QKV = "self_attention.linear_qkv.weight"
FC1 = "mlp.linear_fc1.weight"
_HF_LAYER = "model.layers.{}."
_HF_GLOBAL = {
    EMBEDDING: "model.embed_tokens.weight",
    FINAL_NORM: "model.norm.weight",
    OUTPUT_LAYER: "lm_head.weight",
}


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: LlamaArch):
    """Hugging Face q, k, v projections -> megatron-core's grouped ``linear_qkv``."""
    groups, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // groups
    hidden = q.shape[1]
    return torch.cat(
        [
            q.view(groups, per_group * d, hidden),
            k.view(groups, d, hidden),
            v.view(groups, d, hidden),
        ],
        dim=1,
    ).reshape(-1, hidden)


def deinterleave_qkv(qkv: torch.Tensor, arch: LlamaArch) -> tuple[torch.Tensor, ...]:
    """megatron-core's ``linear_qkv`` -> Hugging Face q, k, v projections."""
    groups, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // groups
    hidden = qkv.shape[1]
    q, k, v = qkv.view(groups, (per_group + 2) * d, hidden).split([per_group * d, d, d], dim=1)
    return (q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden))


def hf_layer_to_megatron(
    get: Callable[[str], torch.Tensor], layer: int, arch: LlamaArch
) -> Iterator[tuple[str, torch.Tensor]]:
    """One decoder layer's weights in megatron-core names and layout (unsharded).

    Args:
        get: Returns a Hugging Face tensor by name (lazily, e.g. from safetensors).
        layer: Global layer index.
        arch: The architecture.
    """
    hf = _HF_LAYER.format(layer)
    mc = _LAYER.format(layer)
    for mc_suffix, hf_suffix in _LAYER_ONE_TO_ONE.items():
        yield mc + mc_suffix, get(hf + hf_suffix)
    yield (
        mc + QKV,
        interleave_qkv(
            get(hf + "self_attn.q_proj.weight"),
            get(hf + "self_attn.k_proj.weight"),
            get(hf + "self_attn.v_proj.weight"),
            arch,
        ),
    )
    yield mc + FC1, torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")])


def megatron_layer_to_hf(
    get: Callable[[str], torch.Tensor], layer: int, arch: LlamaArch
) -> Iterator[tuple[str, torch.Tensor]]:
    """One decoder layer's weights in Hugging Face names and layout."""
    hf = _HF_LAYER.format(layer)
    mc = _LAYER.format(layer)
    for mc_suffix, hf_suffix in _LAYER_ONE_TO_ONE.items():
        yield hf + hf_suffix, get(mc + mc_suffix)
    q, k, v = deinterleave_qkv(get(mc + QKV), arch)
    yield hf + "self_attn.q_proj.weight", q
    yield hf + "self_attn.k_proj.weight", k
    yield hf + "self_attn.v_proj.weight", v
    gate, up = get(mc + FC1).chunk(2)
    yield hf + "mlp.gate_proj.weight", gate
    yield hf + "mlp.up_proj.weight", up


def hf_name(megatron_global_name: str) -> str | None:
    """Hugging Face name of a non-layer megatron-core weight (None for layer weights)."""
    return _HF_GLOBAL.get(megatron_global_name)
