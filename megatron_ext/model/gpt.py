"""megatron-core ``GPTModel`` built from a :class:`~megatron_ext.arch.LlamaArch`.

With ``fused_kernels`` the model runs this project's kernels where megatron-core would run its
own: the vocab-parallel embedding (:mod:`kernels.embedding`) and, when labels are given, the
fused linear cross-entropy (:mod:`kernels.cross_entropy`), which never materialises the logits,
and in megatron-core's local spec PyTorch's fused attention (:mod:`megatron_ext.model.attention`);
:mod:`megatron_ext.model.fusions` adds the rotary embedding and weight-gradient accumulation
through megatron-core's own fusion slots.
Parameters, sharding and checkpoint keys are megatron-core's either way, so checkpoints move
freely between the two.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.utils import get_pg_rank, get_pg_size

from kernels.cross_entropy import fused_linear_cross_entropy, shard_rows_in_vocab
from kernels.embedding import FusedVocabParallelEmbedding
from megatron_ext.arch import LlamaArch
from megatron_ext.model.attention import FusedDotProductAttention
from megatron_ext.model.norm import RMSNorm


def transformer_engine_enabled(use_transformer_engine: bool | None = None) -> bool:
    """Whether the TE layer spec is used: as forced, else on a GPU when TE imports."""
    if use_transformer_engine is not None:
        return use_transformer_engine
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(
    config: TransformerConfig,
    use_transformer_engine: bool | None = None,
    fused_attention: bool = False,
):
    """Transformer Engine's layer spec on a GPU when TE imports, else megatron-core's local one.

    The two name some weights differently (TE fuses the norms into ``linear_qkv``/``linear_fc1``);
    checkpoints are written with ``dist_checkpointing``, whose keys do not depend on the spec.
    The local spec is returned as the whole block (this stage's layers and the final norm), all
    normalised by :class:`~megatron_ext.model.norm.RMSNorm`, so it runs under sequence
    parallelism and its final norm does not depend on whether apex is installed.
    ``fused_attention`` puts :class:`~megatron_ext.model.attention.FusedDotProductAttention` into
    the local spec (TE's attention is fused already).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_engine_enabled(use_transformer_engine):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules = dataclasses.replace(
        layer.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm
    )
    if fused_attention:
        attention = layer.submodules.self_attention
        attention.submodules = dataclasses.replace(
            attention.submodules, core_attention=FusedDotProductAttention
        )
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=RMSNorm
    )


def build_gpt_model(
    arch: LlamaArch,
    config,
    padded_vocab_size: int,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    parallel_output: bool = True,
    use_transformer_engine: bool | None = None,
    fused_kernels: bool = False,
) -> LlamaGPTModel:
    """A ``GPTModel`` (this rank's pipeline stage) with Llama's RoPE and untied output layer.

    Args:
        arch: The architecture.
        config: Its ``TransformerConfig`` (``arch.transformer_config(...)``).
        padded_vocab_size: Rows of the embedding and output layer (Megatron pads the vocab).
        pre_process: This stage has the embedding.
        post_process: This stage has the final norm and output layer.
        parallel_output: Keep logits split over tensor-parallel ranks (False gathers them).
        use_transformer_engine: Force the layer spec (None: TE on a GPU when installed).
        fused_kernels: Run this project's embedding and linear cross-entropy kernels and, in
            the local spec, PyTorch's fused attention (else megatron-core's own throughout).
    """
    return LlamaGPTModel(
        fused_kernels=fused_kernels,
        unpadded_vocab_size=arch.vocab_size,
        config=config,
        transformer_layer_spec=layer_spec(
            config, use_transformer_engine, fused_attention=fused_kernels
        ),
        vocab_size=padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,  # a float works (used as rotary_base ** x); int() would cut
    )


class LlamaGPTModel(GPTModel):
    """``GPTModel`` whose training forward returns the masked loss sum, optionally fused.

    ``forward(..., labels=labels, loss_mask=loss_mask)`` returns the scalar
    ``sum(loss_mask * per-token loss)`` (fp32), with megatron-core's output layer and
    cross-entropy or, with ``fused_kernels``, the fused linear cross-entropy, which then costs
    the three lm-head GEMMs and no ``[tokens, vocab]`` logits. With ``labels`` only, per-token
    losses ``[b, s]`` as in megatron-core; without labels, logits (padding columns included).
    Either loss is a softmax over the ``unpadded_vocab_size`` real ids, unlike megatron-core's,
    which gives the rows padding the vocabulary to a multiple of 128 x TP probability too: the
    loss is the exported model's, whatever the TP size.
    """

    def __init__(
        self, *args, unpadded_vocab_size: int, fused_kernels: bool = False, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.unpadded_vocab_size = unpadded_vocab_size
        self.fused_kernels = fused_kernels
        if fused_kernels and self.pre_process:
            self.embedding.word_embeddings = _fused_embedding(
                self.embedding.word_embeddings, self.config
            )

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        loss_mask = kwargs.get("loss_mask")
        in_training_loss = (
            self.post_process
            and labels is not None
            and kwargs.get("inference_context") is None
            and not kwargs.get("mtp_in_postprocess")
            and self.config.mtp_num_layers is None
        )
        if not in_training_loss:
            return super()._postprocess(
                hidden_states, input_ids, position_ids, labels, *args, **kwargs
            )
        if not self.fused_kernels:
            losses = super()._postprocess(
                hidden_states, input_ids, position_ids, labels, *args, **kwargs
            )
            return losses if loss_mask is None else (losses.float() * loss_mask).sum()
        if self.output_layer.sequence_parallel:
            # The kernel all-reduces dH over TP itself, so the gather's backward only splits.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.output_layer.tp_group
            )
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            _run_forward_pre_hooks(self.output_layer, hidden_states)
            weight = self.output_layer.weight
        return fused_linear_cross_entropy(
            hidden_states.transpose(0, 1),
            weight,
            labels,
            reduction="none" if loss_mask is None else "sum",
            loss_mask=loss_mask,
            tp_group=self.output_layer.tp_group,
            vocab_size=self.unpadded_vocab_size,
        )

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        """megatron-core's loss, with the padding rows' logits set to -inf (no probability)."""
        if logits.shape[-1] != self.output_layer.output_size_per_partition:
            # Gathered logits (parallel_output=False): megatron-core's loss reads them as this
            # rank's shard.
            raise ValueError("the loss needs this rank's logits: build with parallel_output=True")
        group = self.output_layer.tp_group
        classes = shard_rows_in_vocab(
            logits.shape[-1], get_pg_rank(group), get_pg_size(group), self.unpadded_vocab_size
        )
        if classes < logits.shape[-1]:
            # In place: the output layer's backward does not read its output.
            logits[..., classes:] = float("-inf")
        return super().compute_language_model_loss(labels, logits)

    def set_trainable_rows(self, rows: tuple[int, int] | None) -> None:
        """Only embedding rows in ``[start, end)`` get gradients (fused embedding only)."""
        if self.pre_process:
            embedding = self.embedding.word_embeddings
            if not isinstance(embedding, FusedVocabParallelEmbedding):
                raise ValueError("trainable rows need the fused embedding (kernels: fused)")
            embedding.trainable_rows = rows


def _run_forward_pre_hooks(module: torch.nn.Module, *args: torch.Tensor) -> None:
    """Run ``module``'s forward pre-hooks as calling it would, for a use of its weight alone.

    The fused loss reads the output layer's weight without calling the layer. Hooks that must
    run before that weight is used still do: megatron-core DDP's, which under
    ``overlap_param_gather`` waits for the weight's all-gather (and starts the next bucket's).
    """
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            hook(module, args, {})
        else:
            hook(module, args)


def _fused_embedding(original, config) -> FusedVocabParallelEmbedding:
    """A fused embedding module around ``original``'s weight (no new initialisation)."""
    fused = FusedVocabParallelEmbedding(
        original.num_embeddings,
        original.embedding_dim,
        # The weight is replaced by the original one: skip initialising (and drawing random
        # numbers for) a second copy, so both kernel choices build identical models.
        init_method=lambda weight: None,
        reduce_scatter_embeddings=original.reduce_scatter_embeddings,
        config=config,
        tp_group=original.tp_group,
    )
    fused.weight = original.weight
    return fused
