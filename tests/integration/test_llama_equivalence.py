"""transformers' LlamaForCausalLM and our megatron-core model give the same logits (fp32)."""

import pytest
import torch
from torch.nn import functional

from megatron_ext.arch import LlamaArch
from megatron_ext.checkpoint.layout import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT_LAYER,
    hf_layer_to_megatron,
    hf_name,
)
from tests.distributed import run_ranks
from tests.helpers import tensor_parallel_shards

transformers = pytest.importorskip("transformers")


def tiny_llama(kv_heads: int, **config_overrides):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=300,  # not a multiple of 128: padding is exercised
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        initializer_range=0.2,  # large enough weights that logits differ by more than noise
        tie_word_embeddings=False,
        **config_overrides,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    # Norm weights start at 1, which would let a mapping swap or drop a norm unseen.
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
    return model


def megatron_shard(hf_model, arch: LlamaArch, tp: int, rank: int) -> dict:
    """This TP rank's state dict in megatron-core names, vocab padded with zero rows."""
    hf = hf_model.state_dict()
    padded = arch.padded_vocab_size(tp)
    full = {}
    for layer in range(arch.num_layers):
        full.update(hf_layer_to_megatron(hf.__getitem__, layer, arch))
    for name in (EMBEDDING, FINAL_NORM, OUTPUT_LAYER):
        full[name] = hf[hf_name(name)]
    for name in (EMBEDDING, OUTPUT_LAYER):
        full[name] = functional.pad(full[name], (0, 0, 0, padded - arch.vocab_size))
    return {name: tensor_parallel_shards(name, t, tp)[rank] for name, t in full.items()}


def transformer_engine_names(state: dict) -> dict:
    """Local-spec weight names as Transformer Engine's layer spec has them: its norms live in
    ``linear_qkv``/``linear_fc1`` (megatron-core's own map between the two specs)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    renames = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    renamed = {}
    for name, tensor in state.items():
        for local, te in renames.items():
            name = name.replace(f".{local}", f".{te}")
        renamed[name] = tensor
    return renamed


def load_megatron_model(
    hf_model, arch, world_size, rank, use_transformer_engine: bool = False, **kwargs
):
    """Our model at this TP rank with ``hf_model``'s weights (vocabulary padded for TP), on
    megatron-core's local layer spec unless ``use_transformer_engine``."""
    from megatron_ext.model.gpt import build_gpt_model

    model = build_gpt_model(arch, use_transformer_engine=use_transformer_engine, **kwargs)
    state = megatron_shard(hf_model, arch, world_size, rank)
    if use_transformer_engine:
        state = transformer_engine_names(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    return model


def compare_logits(rank, world_size, kv_heads, rope_backend=None):
    """``rope_backend``: None for megatron-core's unfused RoPE, else ``kernels/rope.py`` forced
    onto that backend through megatron-core's fused-RoPE slot (``use_fused_rope``)."""
    hf_model = tiny_llama(kv_heads)
    arch = LlamaArch.from_hf_config(hf_model.config.to_dict())
    if rope_backend is not None:
        from megatron.core.models.common.embeddings import rope_utils

        from kernels.rope import rotary_embedding

        # This process's own slot (run_ranks starts fresh processes); megatron-core passes
        # ``interleaved=False`` for Llama.
        rope_utils.fused_apply_rotary_pos_emb = lambda t, freqs, interleaved: rotary_embedding(
            t, freqs, backend=rope_backend
        )
    model = load_megatron_model(
        hf_model,
        arch,
        world_size,
        rank,
        config=arch.transformer_config(world_size, 1, apply_rope_fusion=rope_backend is not None),
        padded_vocab_size=arch.padded_vocab_size(world_size),
        parallel_output=False,
    ).eval()
    tokens = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, positions, attention_mask=None)[..., : arch.vocab_size]
        reference = hf_model(tokens).logits
    assert reference.abs().max() > 1.0  # the comparison below is not trivially small
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_transformers(tp, kv_heads):
    run_ranks(compare_logits, tp, kv_heads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_rope_logits_match_transformers(backend):
    """kernels/rope.py in the model (both paths; Triton under the interpreter on a CPU) against
    transformers' own rotary embedding, with GQA: queries and keys of different head counts."""
    run_ranks(compare_logits, 1, 2, backend)


def compare_losses(rank, world_size, fused_kernels):
    """Per-token and masked-sum losses against cross-entropy on transformers' logits.

    transformers' model has no padding rows: ours must give them no probability (and so no
    gradient), whatever the TP size makes of the padding (84 rows at TP=1, 212 at TP=2, all on
    the last rank).
    """
    hf_model = tiny_llama(2)
    arch = LlamaArch.from_hf_config(hf_model.config.to_dict())
    padded = arch.padded_vocab_size(world_size)

    def build(**kwargs):
        config = arch.transformer_config(world_size, 1)
        return load_megatron_model(
            hf_model, arch, world_size, rank, config=config, padded_vocab_size=padded, **kwargs
        )

    model = build(fused_kernels=fused_kernels)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, arch.vocab_size, (2, 24), generator=gen)
    labels = torch.randint(0, arch.vocab_size, (2, 24), generator=gen)
    loss_mask = (torch.rand(2, 24, generator=gen) < 0.8).float()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    reference = functional.cross_entropy(
        hf_model(tokens).logits.transpose(1, 2), labels, reduction="none"
    ).detach()
    with torch.no_grad():
        per_token = model(tokens, positions, attention_mask=None, labels=labels)
    torch.testing.assert_close(per_token, reference, rtol=0, atol=1e-4)
    total = model(tokens, positions, attention_mask=None, labels=labels, loss_mask=loss_mask)
    torch.testing.assert_close(total, (reference * loss_mask).sum(), rtol=1e-5, atol=1e-4)
    total.backward()
    shard = padded // world_size
    first_padding_row = max(arch.vocab_size - rank * shard, 0)
    grad = model.output_layer.weight.grad
    assert grad[:first_padding_row].abs().max() > 0
    assert not grad[first_padding_row:].any()
    if world_size > 1 and not fused_kernels:
        # megatron-core's loss would read gathered logits as this rank's shard.
        gathered = build(parallel_output=False)
        with pytest.raises(ValueError, match="build with parallel_output=True"):
            gathered(tokens, positions, attention_mask=None, labels=labels)


@pytest.mark.parametrize("fused_kernels", [False, True], ids=["megatron", "fused"])
@pytest.mark.parametrize("tp", [1, 2])
def test_loss_matches_transformers_without_padding_rows(tp, fused_kernels):
    run_ranks(compare_losses, tp, fused_kernels)


def compare_transformer_engine(rank, world_size, dtype_name):
    """TE's layer spec with our kernels and the fusions a GPU run turns on, against transformers.

    fp32 runs TE's unfused attention; bf16 its flash or cuDNN attention, as training does,
    allowed twice the error of transformers' own model in bf16 (on a CPU, the local spec's
    bf16 logits are 0.17 off where transformers' are 0.23).
    """
    dtype = getattr(torch, dtype_name)
    hf_model = tiny_llama(2).cuda()
    arch = LlamaArch.from_hf_config(hf_model.config.to_dict())
    model = load_megatron_model(
        hf_model,
        arch,
        world_size,
        rank,
        use_transformer_engine=True,
        config=arch.transformer_config(
            world_size,
            1,
            apply_rope_fusion=True,
            bias_activation_fusion=True,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
        ),
        padded_vocab_size=arch.padded_vocab_size(world_size),
        parallel_output=False,
        fused_kernels=True,
    ).cuda()
    gen = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, arch.vocab_size, (2, 2, 24), generator=gen).cuda()
    positions = torch.arange(tokens.shape[1], device="cuda").expand_as(tokens)
    with torch.no_grad():
        reference = hf_model(tokens).logits
        expected = functional.cross_entropy(reference.transpose(1, 2), labels, reduction="none")
        logits = model(tokens, positions, attention_mask=None)[..., : arch.vocab_size].float()
        per_token = model(tokens, positions, attention_mask=None, labels=labels)
        if dtype == torch.bfloat16:
            rounded = hf_model.to(dtype)(tokens).logits.float()
            rounded_loss = functional.cross_entropy(
                rounded.transpose(1, 2), labels, reduction="none"
            )
            logits_atol = 2 * (rounded - reference).abs().max().item()
            loss_atol = 2 * (rounded_loss - expected).abs().max().item()
        else:  # TE's GEMMs may use TF32, hence more than the local spec's 1e-4
            logits_atol = loss_atol = 2e-2
    assert reference.abs().max() > 1.0
    torch.testing.assert_close(logits, reference, rtol=0, atol=logits_atol)
    torch.testing.assert_close(per_token, expected, rtol=0, atol=loss_atol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine runs on a GPU")
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_transformer_engine_spec_matches_transformers(dtype_name):
    """What a GPU cluster runs by default: the same model on Transformer Engine's layer spec."""
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine not installed")
    run_ranks(compare_transformer_engine, 1, dtype_name)
