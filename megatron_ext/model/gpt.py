"""megatron-core ``GPTModel`` built from a :class:`~megatron_ext.arch.LlamaArch`."""

from __future__ import annotations

import torch

from megatron_ext.arch import LlamaArch


def layer_spec(use_transformer_engine: bool | None = None):
    """Transformer Engine's layer spec on a GPU when TE imports, else megatron-core's local one.

    The two name some weights differently (TE fuses the norms into ``linear_qkv``/``linear_fc1``);
    checkpoints are written with ``dist_checkpointing``, whose keys do not depend on the spec.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine is None:
        use_transformer_engine = torch.cuda.is_available()
        if use_transformer_engine:
            try:
                import transformer_engine  # noqa: F401
            except ImportError:
                use_transformer_engine = False
    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(
    arch: LlamaArch,
    config,
    padded_vocab_size: int,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    parallel_output: bool = True,
    use_transformer_engine: bool | None = None,
):
    """A ``GPTModel`` (this rank's pipeline stage) with Llama's RoPE and untied output layer.

    Args:
        arch: The architecture.
        config: Its ``TransformerConfig`` (``arch.transformer_config(...)``).
        padded_vocab_size: Rows of the embedding and output layer (Megatron pads the vocab).
        pre_process: This stage has the embedding.
        post_process: This stage has the final norm and output layer.
        parallel_output: Keep logits split over tensor-parallel ranks (False gathers them).
        use_transformer_engine: Force the layer spec (None: TE on a GPU when installed).
    """
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(use_transformer_engine),
        vocab_size=padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta),
    )
