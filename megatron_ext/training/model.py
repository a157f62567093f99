"""The model a run trains: architecture from the config or a checkpoint, built per rank."""

from __future__ import annotations

import difflib
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random

from megatron_ext.arch import PRESETS, ArchitectureError, LlamaArch
from megatron_ext.checkpoint.convert import read_metadata
from megatron_ext.model.fusions import (
    apex_weight_gradient,
    transformer_engine_rope,
    use_fused_rope,
    use_fused_weight_gradient,
)
from megatron_ext.model.gpt import LlamaGPTModel, build_gpt_model, transformer_engine_enabled
from megatron_ext.training import checkpointing
from megatron_ext.training.config import ConfigError, TrainConfig, coerce_value


@dataclass
class ModelPlan:
    """The network to train: architecture, padded vocabulary, first new id, parameter dtype."""

    arch: LlamaArch
    padded_vocab_size: int
    base_vocab_size: int | None
    dtype: torch.dtype


def plan_warnings(arch: LlamaArch, config: TrainConfig) -> list[str]:
    """Settings that run, but not as a user would expect; one ``warning:`` line each.

    - ``seq_length`` past the positions the model was trained on: megatron-core computes RoPE
      for any length, so a longer sequence trains without an error on positions the model has
      never seen.
    - Selective recomputation of ``core_attn`` (``--recompute-activations`` in Megatron-LM):
      fused attention keeps no ``s^2`` scores, so it saves nothing, and the checkpoint keeps the
      values as a view of the whole fused QKV output.
    """
    warnings = []
    if config.seq_length > arch.max_position_embeddings:
        warnings.append(
            f"warning: --seq-length {config.seq_length} is beyond the "
            f"{arch.max_position_embeddings} positions the model was trained on "
            f"(max_position_embeddings): RoPE (base {arch.rope_theta:g}) extrapolates past them, "
            "which degrades the model unless a longer context is what this run sets out to train"
        )
    if "core_attn" in config.recompute().get("recompute_modules", []):
        warnings.append(
            "warning: recomputing core_attn (--recompute-activations, or --recompute-modules "
            "core_attn) saves no memory with fused attention, which keeps no s^2 scores, and "
            "keeps more (the whole fused QKV output, for the values): recompute mlp "
            "(--recompute-granularity selective --recompute-modules mlp) or whole layers "
            "(--recompute-granularity full); --dry-run estimates each"
        )
    return warnings


def resolve_arch(
    config: TrainConfig,
    vocab_size: int,
    resume: Path | None,
    pieces_sha256: str | None = None,
) -> ModelPlan:
    """Architecture, padded vocabulary and base vocabulary from the config or a checkpoint.

    Args:
        config: The run's settings.
        vocab_size: Pieces of ``--tokenizer-model``.
        resume: The checkpoint the run resumes, if any.
        pieces_sha256: The tokenizer's fingerprint (:func:`megatron_ext.hashing.pieces_sha256`),
            compared with the one the checkpoint records (None: not compared).

    Raises:
        ConfigError: The tokenizer does not match the checkpoint, or the padded vocabulary
            cannot be split over the tensor-parallel ranks with real ids on each.
    """
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    tp = config.tensor_model_parallel_size
    source = resume or (
        Path(config.pretrained_checkpoint) if config.pretrained_checkpoint else None
    )
    if source is not None:
        meta = read_metadata(source)
        arch = LlamaArch(**meta["arch"])
        padded = meta["padded_vocab_size"]
        base = config.base_vocab_size or meta.get("base_vocab_size")
        where = f"{source}/{checkpointing.METADATA}"
        recorded = meta.get("tokenizer_pieces_sha256")
        _check_same_arch(config, arch, where)
    else:
        arch = _arch_from_config(config.arch).with_vocab_size(vocab_size)
        padded = arch.padded_vocab_size(tp, config.make_vocab_size_divisible_by)
        base = config.base_vocab_size
        where = "config"
        recorded = None
    if arch.vocab_size != vocab_size:
        raise ConfigError(
            f"{where}: vocabulary of {arch.vocab_size} but --tokenizer-model "
            f"{config.tokenizer_model} has {vocab_size} pieces"
        )
    if pieces_sha256 and recorded and recorded != pieces_sha256:
        raise ConfigError(
            f"{where}: made with another tokenizer of {vocab_size:,} pieces than --tokenizer-model "
            f"{config.tokenizer_model} (their ids name other pieces, so the embedding rows "
            "would belong to other tokens): pass the tokenizer it was made with"
        )
    if padded % tp:
        raise ConfigError(
            f"{where}: padded vocabulary {padded} cannot be split over "
            f"--tensor-model-parallel-size {tp}"
        )
    try:
        arch.check_vocab_split(padded, tp)
    except ArchitectureError as err:
        raise ConfigError(f"{where}: {err}") from err
    arch.check_parallel(tp, config.pipeline_model_parallel_size)
    stage_layers = arch.num_layers // config.pipeline_model_parallel_size
    if (config.recompute_num_layers or 0) > stage_layers:
        raise ConfigError(
            f"--recompute-num-layers {config.recompute_num_layers}: a pipeline stage has "
            f"{stage_layers} layers"
        )
    return ModelPlan(arch, padded, base, dtype)


def _check_same_arch(config: TrainConfig, saved: LlamaArch, where: str) -> None:
    """A config that names an architecture (not the default) must name the checkpoint's."""
    if config.arch == TrainConfig.arch:
        return
    asked = asdict(_arch_from_config(config.arch))
    differ = [
        f"{name} {value} (config: {asked[name]})"
        for name, value in asdict(saved).items()
        if name != "vocab_size" and asked[name] != value
    ]
    if differ:
        raise ConfigError(
            f"{where}: the checkpoint's architecture is not the config's arch: "
            f"{', '.join(differ)}; the checkpoint decides it, so leave arch out of the config"
        )


def _arch_from_config(arch: str | dict[str, Any]) -> LlamaArch:
    if isinstance(arch, str):
        if arch not in PRESETS:
            raise ConfigError(f"--arch {arch}: unknown preset (known: {', '.join(PRESETS)})")
        return PRESETS[arch]
    fields = dict(arch)
    preset = fields.pop("preset", None)
    if preset is not None:
        base = asdict(_arch_from_config(preset))
        base.update(fields)
        fields = base
    fields.setdefault("vocab_size", 1)  # a placeholder: the tokenizer's size replaces it
    types = typing.get_type_hints(LlamaArch)
    for name, value in fields.items():
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(types)})"
            raise ConfigError(f"arch: unknown field {name!r}{hint}")
        fields[name] = coerce_value(types[name], name, value, "arch")
    try:
        return LlamaArch(**fields)
    except (TypeError, ArchitectureError) as err:
        raise ConfigError(f"arch: {err}") from err


def training_device() -> torch.device:
    """This process's GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def kernel_fusions(config: TrainConfig) -> dict[str, bool]:
    """megatron-core's fused kernels that Megatron-LM turns on by default, where they can run.

    Returns:
        ``TransformerConfig`` fields: each fusion as the config asks, else on where available.

    Raises:
        ConfigError: A fusion is asked for where what it needs is missing.
    """
    on_gpu = torch.cuda.is_available()
    # megatron-core imports TE's fused RoPE and apex's fused weight-gradient GEMM when it can;
    # --kernels fused brings its own where they are missing (model/fusions.py, on any device).
    ours = config.kernels == "fused"
    have = {
        "bias_swiglu_fusion": (True, ""),
        "apply_rope_fusion": (
            (on_gpu and transformer_engine_rope()) or ours,
            "--kernels fused, or Transformer Engine's fused RoPE on a GPU",
        ),
        "gradient_accumulation_fusion": (
            (on_gpu and apex_weight_gradient()) or ours,
            "--kernels fused, or apex's fused_weight_gradient_mlp_cuda extension on a GPU",
        ),
    }
    chosen = {}
    for name, (available, needs) in have.items():
        asked = getattr(config, name)
        if asked and not available:
            raise ConfigError(f"--{name.replace('_', '-')} needs {needs}")
        chosen[name] = (on_gpu and available) if asked is None else asked
    # Megatron-LM's --bias-swiglu-fusion is TransformerConfig's bias_activation_fusion.
    chosen["bias_activation_fusion"] = chosen.pop("bias_swiglu_fusion")
    return chosen


def _forced_transformer_engine(config: TrainConfig) -> bool | None:
    """``--transformer-impl`` as ``transformer_engine_enabled``'s argument (None: auto)."""
    return {"auto": None, "local": False, "transformer_engine": True}[config.transformer_impl]


def kernel_summary(config: TrainConfig) -> str:
    """One line naming the layer spec, kernels and fusions ``build_model`` will use here.

    A run that silently fell back (no Transformer Engine on the nodes, no apex) says so in its
    first lines instead of only in its tokens/s.

    Raises:
        ConfigError: As :func:`kernel_fusions`.
    """
    forced = _forced_transformer_engine(config)
    use_te = transformer_engine_enabled(forced)
    if use_te:
        spec = "Transformer Engine"
    elif forced is False:
        spec = "local (--transformer-impl local)"
    elif torch.cuda.is_available():
        spec = "local (Transformer Engine not installed)"
    else:
        spec = "local (no GPU)"
    if config.kernels == "fused":
        attention = "" if use_te else ", PyTorch's fused attention"
        kernels = f"ours (embedding, linear cross-entropy{attention})"
    else:
        kernels = "megatron-core's"
    rope = "Transformer Engine's" if transformer_engine_rope() else "kernels/rope.py"
    wgrad = "apex's" if apex_weight_gradient() else "ours"
    names = {
        "bias_activation_fusion": "SwiGLU",
        "apply_rope_fusion": f"RoPE ({rope})",
        "gradient_accumulation_fusion": f"gradient accumulation ({wgrad})",
    }
    on = [names[name] for name, enabled in kernel_fusions(config).items() if enabled]
    return f"layer spec: {spec}; kernels: {kernels}; fusions: {', '.join(on) or 'none'}"


def build_model(config: TrainConfig, plan: ModelPlan) -> LlamaGPTModel:
    """This rank's pipeline stage of the model, on the training device."""
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    overrides: dict[str, Any] = {
        "params_dtype": plan.dtype,
        "pipeline_dtype": plan.dtype,
        "bf16": config.bf16,
        "sequence_parallel": config.sequence_parallel,
        "calculate_per_token_loss": True,
    }
    recompute = config.recompute()
    if "layernorm" in recompute.get("recompute_modules", []) and not mcore_random.HAVE_TE:
        # CheckpointWithoutOutput() sets fp8 = (False is not None) and calls TE's FP8 state.
        raise ConfigError(
            "--recompute-modules layernorm needs Transformer Engine installed: megatron-core "
            "0.16's output-discarding checkpoint calls into it even without fp8"
        )
    overrides.update(recompute)
    use_te = transformer_engine_enabled(_forced_transformer_engine(config))
    overrides.update(kernel_fusions(config))
    if overrides["apply_rope_fusion"]:
        use_fused_rope()
    if overrides["gradient_accumulation_fusion"]:
        use_fused_weight_gradient()
    transformer_config = plan.arch.transformer_config(tp, pp, **overrides)
    if config.reset_attention_mask and use_te:
        raise ConfigError(
            "--reset-attention-mask needs --transformer-impl local (per-document attention "
            "masks are not wired to Transformer Engine's packed-sequence attention yet)"
        )
    model = build_gpt_model(
        plan.arch,
        transformer_config,
        plan.padded_vocab_size,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_transformer_engine=use_te,
        fused_kernels=config.kernels == "fused",
    )
    return model.to(training_device())
