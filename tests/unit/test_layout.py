"""Layout transforms between Hugging Face and megatron-core: exact inverses; the presets."""

import torch

from megatron_ext.arch import PRESETS, LlamaArch
from megatron_ext.checkpoint.layout import (
    deinterleave_qkv,
    hf_layer_to_megatron,
    interleave_qkv,
    megatron_layer_to_hf,
)

ARCH = LlamaArch(64, 4, 8, 2, 96, 300)


def hf_layer(arch, layer=0):
    g = torch.Generator().manual_seed(layer)
    h, d = arch.hidden_size, arch.head_dim
    shapes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.v_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
    }
    return {f"model.layers.{layer}.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}


def test_layer_round_trip_is_exact():
    hf = hf_layer(ARCH, 3)
    megatron = dict(hf_layer_to_megatron(hf.__getitem__, 3, ARCH))
    back = dict(megatron_layer_to_hf(megatron.__getitem__, 3, ARCH))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_qkv_groups_hold_their_own_heads():
    d, groups, per_group = ARCH.head_dim, ARCH.num_query_groups, 4
    q = torch.arange(8 * d).repeat_interleave(64).view(8 * d, 64).float()
    k = -torch.arange(1, 2 * d + 1).repeat_interleave(64).view(2 * d, 64).float()
    v = 1000 + k
    qkv = interleave_qkv(q, k, v, ARCH)
    block = (per_group + 2) * d
    for g in range(groups):
        rows = qkv[g * block : (g + 1) * block]
        assert torch.equal(rows[: per_group * d], q[g * per_group * d : (g + 1) * per_group * d])
        assert torch.equal(rows[per_group * d : per_group * d + d], k[g * d : (g + 1) * d])
        assert torch.equal(rows[per_group * d + d :], v[g * d : (g + 1) * d])
    back = deinterleave_qkv(qkv, ARCH)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


def test_presets():
    assert PRESETS["llama2-70b"].head_dim == 128
    # Megatron pads to a multiple of 128 x TP: 32,000 is one at TP 1 and 2 only.
    llama = PRESETS["llama2-7b"]
    assert [llama.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [32000, 32000, 32256, 32768]
