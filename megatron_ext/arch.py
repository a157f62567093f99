"""Llama-family architectures: a dataclass, presets, HF configs, megatron-core configs.

``LlamaArch`` is read from and written to a Hugging Face ``config.json`` and turned into the
megatron-core ``TransformerConfig`` that builds the same network.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


class ArchitectureError(ValueError):
    """A configuration this project cannot build or convert."""


# What transformers' LlamaConfig takes for a key its config.json leaves out, so that a trimmed or
# hand-written config converts to the model transformers would load from it.
HF_DEFAULTS = {
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}

_FIELD_RULES = {
    "int": "an integer of at least 1",
    "float": "a finite number above 0",
    "bool": "true or false",
}


def _check_field(name: str, kind: str, value: Any) -> None:
    """Raise unless ``value`` is of the field's ``kind`` (its annotation) and in range.

    Checked before anything divides by a field: a YAML ``arch:`` mapping or a hand-written
    ``config.json`` may hold a string, a boolean (which Python counts as 1) or a 0.
    """
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = number and isinstance(value, int) and value >= 1
    else:
        ok = number and math.isfinite(value) and value > 0
    if not ok:
        raise ArchitectureError(f"{name} must be {_FIELD_RULES[kind]}, got {value!r}")


@dataclass(frozen=True)
class LlamaArch:
    """The shape of a Llama-2-style decoder (RMSNorm, SwiGLU, RoPE, GQA, untied output).

    Attributes:
        hidden_size: Model width.
        num_layers: Decoder layers.
        num_attention_heads: Query heads.
        num_query_groups: Key/value heads (GQA); equal to the heads for multi-head attention.
        ffn_hidden_size: SwiGLU inner width.
        vocab_size: True vocabulary size (the tokenizer's), before any padding.
        max_position_embeddings: Longest sequence the RoPE tables cover.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        tie_word_embeddings: Share input embedding and output layer (not in Llama-2).
    """

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_field(field.name, field.type, getattr(self, field.name))
        if self.hidden_size % self.num_attention_heads:
            raise ArchitectureError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ArchitectureError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_query_groups {self.num_query_groups}"
            )

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads

    def with_vocab_size(self, vocab_size: int) -> LlamaArch:
        """The same architecture with another (e.g. expanded) vocabulary."""
        return dataclasses.replace(self, vocab_size=vocab_size)

    def padded_vocab_size(self, tensor_model_parallel_size: int, divisible_by: int = 128) -> int:
        """Megatron's padded vocabulary: a multiple of ``divisible_by * TP``."""
        if divisible_by < 1 or tensor_model_parallel_size < 1:
            raise ArchitectureError(
                f"make-vocab-size-divisible-by ({divisible_by}) and tensor-model-parallel-size "
                f"({tensor_model_parallel_size}) must be at least 1"
            )
        multiple = divisible_by * tensor_model_parallel_size
        return math.ceil(self.vocab_size / multiple) * multiple

    def check_vocab_split(self, padded_vocab_size: int, tensor_model_parallel_size: int) -> None:
        """Raise if the last tensor-parallel rank's share of the padded vocabulary is all padding.

        The loss leaves padding rows out of its softmax, so that rank would have no classes.
        """
        shard = padded_vocab_size // tensor_model_parallel_size
        if self.vocab_size <= padded_vocab_size - shard:
            raise ArchitectureError(
                f"a vocabulary of {self.vocab_size:,} ids padded to {padded_vocab_size:,} rows "
                f"leaves the last of {tensor_model_parallel_size} tensor-parallel ranks only "
                "padding rows (pad less, with a smaller make-vocab-size-divisible-by, or use "
                "fewer tensor-parallel ranks)"
            )

    def check_parallel(self, tensor_model_parallel_size: int, pipeline_model_parallel_size: int):
        """Raise if the model cannot be split this way."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ArchitectureError(
                f"tensor-model-parallel-size ({tp}) and pipeline-model-parallel-size ({pp}) must "
                "be at least 1"
            )
        if self.num_attention_heads % tp or self.num_query_groups % tp:
            raise ArchitectureError(
                f"tensor-model-parallel-size {tp} must divide the {self.num_attention_heads} "
                f"attention heads and the {self.num_query_groups} query groups"
            )
        if self.ffn_hidden_size % tp:
            raise ArchitectureError(
                f"tensor-model-parallel-size {tp} must divide ffn_hidden_size "
                f"{self.ffn_hidden_size}"
            )
        if self.num_layers % pp:
            raise ArchitectureError(
                f"pipeline-model-parallel-size {pp} must divide the {self.num_layers} layers"
            )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> LlamaArch:
        """Read a Hugging Face ``LlamaConfig`` dictionary.

        Raises:
            ArchitectureError: Not a Llama model, or features this project does not convert
                (biases, rope scaling, a head_dim other than hidden/heads).
        """
        model_type = config.get("model_type")
        if model_type != "llama":
            raise ArchitectureError(f"{source}: model_type is {model_type!r}, expected 'llama'")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ArchitectureError(f"{source}: attention/MLP biases are not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise ArchitectureError(f"{source}: hidden_act {config['hidden_act']} is not silu")
        try:
            heads = config["num_attention_heads"]
            fields = dict(
                hidden_size=config["hidden_size"],
                num_layers=config["num_hidden_layers"],
                num_attention_heads=heads,
                num_query_groups=config.get("num_key_value_heads") or heads,
                ffn_hidden_size=config["intermediate_size"],
                vocab_size=config["vocab_size"],
                max_position_embeddings=config.get(
                    "max_position_embeddings", HF_DEFAULTS["max_position_embeddings"]
                ),
                rope_theta=_rope_theta(config, source),
                norm_eps=float(config.get("rms_norm_eps", HF_DEFAULTS["rms_norm_eps"])),
                tie_word_embeddings=config.get(
                    "tie_word_embeddings", HF_DEFAULTS["tie_word_embeddings"]
                ),
            )
        except KeyError as err:
            raise ArchitectureError(f"{source}: missing {err.args[0]}") from err
        except ArchitectureError:  # _rope_theta's, which names the source already
            raise
        except (TypeError, ValueError) as err:  # a null or a string where a number belongs
            raise ArchitectureError(f"{source}: {err}") from err
        try:
            arch = cls(**fields)
        except ArchitectureError as err:
            raise ArchitectureError(f"{source}: {err}") from err
        head_dim = config.get("head_dim")
        if head_dim and head_dim != arch.head_dim:
            raise ArchitectureError(f"{source}: head_dim {head_dim} x {heads} heads != hidden_size")
        return arch

    def to_hf_config(self, **extra: Any) -> dict[str, Any]:
        """A ``config.json`` dictionary for ``LlamaForCausalLM`` (``extra`` adds e.g. token ids)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "intermediate_size": self.ffn_hidden_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            # transformers 5's form, which it reads before the top-level one.
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rope_scaling": None,
            **extra,
        }

    def transformer_config(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        **overrides: Any,
    ):
        """megatron-core's ``TransformerConfig`` for this architecture (no dropout by default).

        ``overrides`` set any other ``TransformerConfig`` field (``params_dtype``, ``bf16``,
        ``sequence_parallel``, ``recompute_granularity``, ...).
        """
        import torch
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.check_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
        settings: dict[str, Any] = {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "ffn_hidden_size": self.ffn_hidden_size,
            "kv_channels": self.head_dim,
            "normalization": "RMSNorm",
            "layernorm_epsilon": self.norm_eps,
            "gated_linear_unit": True,
            "activation_func": torch.nn.functional.silu,
            "add_bias_linear": False,
            "bias_activation_fusion": False,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "tensor_model_parallel_size": tensor_model_parallel_size,
            "pipeline_model_parallel_size": pipeline_model_parallel_size,
            "use_cpu_initialization": not torch.cuda.is_available(),
        }
        settings.update(overrides)
        return TransformerConfig(**settings)


def _rope_theta(config: dict[str, Any], source: str) -> float:
    """The RoPE base of a ``LlamaConfig``, refusing any RoPE scaling.

    transformers 5 writes ``rope_parameters`` (``rope_theta``, ``rope_type``) and no top-level
    ``rope_theta``; earlier versions write ``rope_theta`` and ``rope_scaling``.
    """
    parameters = config.get("rope_parameters") or {}
    if not isinstance(parameters, dict):
        raise ArchitectureError(f"{source}: rope_parameters is not an object")
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if config.get("rope_scaling") or rope_type != "default":
        scaling = config.get("rope_scaling") or parameters
        raise ArchitectureError(
            f"{source}: RoPE scaling ({scaling}) is not supported (Llama-2 has none)"
        )
    theta = config.get("rope_theta")
    if theta is not None and "rope_theta" in parameters and parameters["rope_theta"] != theta:
        raise ArchitectureError(
            f"{source}: rope_theta {theta} and rope_parameters.rope_theta "
            f"{parameters['rope_theta']} disagree"
        )
    if theta is None:
        theta = HF_DEFAULTS["rope_theta"]
    return float(parameters.get("rope_theta", theta))


PRESETS: dict[str, LlamaArch] = {
    "llama2-7b": LlamaArch(4096, 32, 32, 32, 11008, 32000),
    "llama2-13b": LlamaArch(5120, 40, 40, 40, 13824, 32000),
    "llama2-70b": LlamaArch(8192, 80, 64, 8, 28672, 32000),
    # CPU-sized, same design (GQA included) for tests and the demo.
    "tiny": LlamaArch(256, 4, 8, 4, 688, 32000, max_position_embeddings=1024),
}
