"""Where each Llama weight lives in Hugging Face and in megatron-core, and how TP/PP split it.

Everything works one tensor (or one layer) at a time, so converters can stream checkpoints far
larger than memory. Facts (checked against megatron-core and by the logits-equivalence tests):

* QKV is one matrix, interleaved per query group: ``[q heads of group 0 | k0 | v0 | q heads of
  group 1 | k1 | v1 ...]``; tensor parallelism hands each rank whole groups (a plain split).
* SwiGLU ``linear_fc1`` is ``[gate; up]``, and each TP shard is ``[gate_i; up_i]``.
* Column-parallel (split dim 0): QKV, fc1, embedding, output layer. Row-parallel (dim 1):
  ``linear_proj`` (o_proj), ``linear_fc2`` (down_proj). Norms are replicated.
* Hugging Face q/k weights are already in rotate-half order (megatron ``rotary_interleaved=False``).
* Names below are those of megatron-core's local layer spec; pipeline stages number their layers
  from 0, so a stage's names are the global ones shifted by the stage's first layer.
"""

from __future__ import annotations

import re
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

_COLUMN = (EMBEDDING, OUTPUT_LAYER, QKV)
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


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


def _suffix(name: str) -> str:
    match = re.match(r"decoder\.layers\.\d+\.(.+)$", name)
    return match.group(1) if match else name


def split_tensor_parallel(name: str, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """This weight's shards for TP ranks 0..tp-1 (vocab rows must already be padded)."""
    suffix = _suffix(name)
    if suffix == FC1:
        gate, up = tensor.chunk(2)
        return [torch.cat(pair) for pair in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
    if suffix in _COLUMN or name in _COLUMN:
        return list(tensor.chunk(tp, dim=0))
    if suffix in _ROW:
        return list(tensor.chunk(tp, dim=1))
    return [tensor] * tp


def merge_tensor_parallel(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`split_tensor_parallel` (replicated weights: rank 0's copy)."""
    suffix = _suffix(name)
    if suffix == FC1:
        gates, ups = zip(*(shard.chunk(2) for shard in shards), strict=True)
        return torch.cat([*gates, *ups])
    if suffix in _COLUMN or name in _COLUMN:
        return torch.cat(shards, dim=0)
    if suffix in _ROW:
        return torch.cat(shards, dim=1)
    return shards[0]


def stage_layers(num_layers: int, pipeline_model_parallel_size: int, stage: int) -> range:
    """Global indices of the layers on a pipeline stage (megatron-core's even split)."""
    per_stage = num_layers // pipeline_model_parallel_size
    return range(stage * per_stage, (stage + 1) * per_stage)


def to_stage_name(global_name: str, first_layer: int) -> str:
    """A layer weight's name inside its pipeline stage (layers numbered from 0 there)."""
    return re.sub(
        r"^decoder\.layers\.(\d+)\.",
        lambda m: f"decoder.layers.{int(m.group(1)) - first_layer}.",
        global_name,
    )
