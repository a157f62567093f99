"""What a run costs before it starts: parameters and memory per GPU, FLOPs per token, MFU.

Used by ``megatron-ext train --dry-run`` (printed without touching a GPU or the data) and by the
training loop (model FLOPs utilisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_ext.arch import LlamaArch

# Dense bf16 tensor-core peaks (TFLOP/s, NVIDIA's datasheets) by device-name fragment. The first
# fragment in the name wins: the PCIe and NVL H100s ("NVIDIA H100 PCIe") before the SXM one
# ("NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def peak_tflops(override: float | None = None) -> float | None:
    """``override``, else the peak of this process's GPU if known, else None (e.g. a CPU)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS if key in name), None)


def layer_params(arch: LlamaArch) -> int:
    """Parameters of one decoder layer (attention, SwiGLU MLP, two RMSNorms)."""
    h, kv = arch.hidden_size, arch.num_query_groups * arch.head_dim
    return 2 * h * h + 2 * h * kv + 3 * h * arch.ffn_hidden_size + 2 * h


def layer_activation_bytes(arch: LlamaArch, config) -> tuple[float, float]:
    """Bytes one decoder layer keeps for backward, and its input's bytes, on one rank.

    For one micro-batch, as megatron-core's layers keep them with fused attention (flash or
    cuDNN: no ``s^2`` scores), the fused SwiGLU and a fused RMSNorm (TE's, or torch's on a GPU:
    input and a per-row scale), counted in units of ``s*b*h`` elements:

    - the two norms' inputs (the residual stream) and their outputs, which the QKV and first MLP
      GEMMs keep as their inputs: 4, split over TP ranks by sequence parallelism, else whole;
    - attention: queries, keys and values after RoPE and the attention output (the output
      projection's input): ``2 + 2 * groups / heads``, split over TP;
    - MLP: the first GEMM's output (gate and up, the SwiGLU's input) and the SwiGLU's output
      (the second GEMM's input): ``3 * ffn / h``, split over TP.

    Besides, per layer: attention's fp32 log-sum-exp per query row, and RoPE's cosine and sine
    tables for queries and keys (``[s, head_dim]`` each; TE's fused RoPE keeps none).

    Selective recomputation drops what its modules recompute: ``mlp`` the MLP's part,
    ``layernorm`` the norms' outputs. ``core_attn`` drops only the log-sum-exp (fused attention
    keeps no ``s^2`` scores) and adds ``1 + groups / heads``: its checkpoint keeps the values as
    megatron-core passes them, a view of the whole fused QKV output.
    ``tests/integration/test_activation_memory.py`` checks these counts against the tensors the
    model saves.

    Returns:
        (bytes kept without full recomputation, bytes of the layer's input: what full
        recomputation keeps).
    """
    tp, sp = config.tensor_model_parallel_size, config.sequence_parallel
    h = arch.hidden_size
    s, b, element = config.seq_length, config.micro_batch_size, 2 if config.bf16 else 4
    unit = s * b * h * element
    whole = 1 / tp if sp else 1.0  # the residual stream and the norms' outputs
    norm_inputs = 2 * whole
    norm_outputs = 2 * whole
    attention = (2 + 2 * arch.num_query_groups / arch.num_attention_heads) / tp
    mlp = 3 * arch.ffn_hidden_size / h / tp
    log_sum_exp = b * arch.num_attention_heads // tp * s * 4
    modules = config.recompute().get("recompute_modules", [])
    if "core_attn" in modules:
        attention += (1 + arch.num_query_groups / arch.num_attention_heads) / tp
        log_sum_exp = 0
    if "mlp" in modules:
        mlp = 0.0
    if "layernorm" in modules:
        norm_outputs = 0.0
    small = log_sum_exp + 4 * s * arch.head_dim * element  # and RoPE's tables
    return (norm_inputs + norm_outputs + attention + mlp) * unit + small, whole * unit


def stage_activation_bytes(arch: LlamaArch, config, stage_layers: int) -> tuple[float, float]:
    """Activation bytes of a pipeline stage of ``stage_layers`` layers on one rank.

    Returns:
        (bytes kept per micro-batch from forward to backward, bytes that recomputation brings
        back during backward: one recomputed group of layers, for one micro-batch at a time).
    """
    kept, layer_input = layer_activation_bytes(arch, config)
    recompute = config.recompute()
    if recompute.get("recompute_granularity") != "full":
        return kept * stage_layers, 0.0
    group = min(recompute["recompute_num_layers"], stage_layers)
    if recompute["recompute_method"] == "uniform":  # every group keeps only its input
        return math.ceil(stage_layers / group) * layer_input, group * kept
    # block: the first `group` layers are recomputed one at a time, the others keep everything.
    return group * layer_input + (stage_layers - group) * kept, kept


def training_flops_per_token(
    arch: LlamaArch, padded_vocab_size: int, seq_length: int, layers_trainable: bool = True
) -> float:
    """Model FLOPs of forward + backward per token (no recomputation counted, as MFU defines).

    Every weight multiplies each token once forward (2 FLOPs per weight) and twice backward: the
    input's gradient and the weight's. Attention adds ``QK^T`` and ``AV``: ``4 * seq_length *
    hidden`` per layer forward, twice that backward. With the layers frozen (a stage training only
    the embedding and output layer) their weights' gradients are not computed, but the inputs'
    are, to reach the embedding.
    """
    h = arch.hidden_size
    layer_weights = arch.num_layers * (layer_params(arch) - 2 * h)
    per_layer_weight = 6 if layers_trainable else 4
    attention = 3 * 4 * arch.num_layers * seq_length * h
    return 6.0 * padded_vocab_size * h + per_layer_weight * layer_weights + attention


# What an 80 GB GPU leaves for tensors: the CUDA context, NCCL's buffers and the allocator's
# fragmentation take a few GiB that the estimate does not count.
GPU_TENSOR_BUDGET_GIB = 74.0
# Warn above this share of a step that 1F1B leaves each GPU idle.
MAX_PIPELINE_BUBBLE = 0.2


@dataclass
class RunPlan:
    """Sizes of a run per GPU (the busiest pipeline stage)."""

    world_size: int
    data_parallel_size: int
    tokens_per_step: int
    micro_batches: int
    total_params: int
    params_per_gpu: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    flops_per_step: float
    checkpoint_gib: float
    # Host memory a --dist-ckpt-optim-fully-reshardable save gathers the optimizer state into.
    optimizer_gather_gib: float = 0.0
    # Of total_params: the rows that pad the vocabulary to a multiple of 128 x TP.
    padding_params: int = 0
    pipeline_stages: int = 1

    @property
    def total_gib(self) -> float:
        """Estimated memory per GPU: weights, gradients, optimizer state and activations."""
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib

    def lines(self, config) -> list[str]:
        """Human-readable summary of the plan."""
        total = self.total_gib
        lines = [
            f"processes: {self.world_size} = TP {config.tensor_model_parallel_size} x PP "
            f"{config.pipeline_model_parallel_size} x DP {self.data_parallel_size}",
            f"batch: global {config.global_batch_size} x seq {config.seq_length} = "
            f"{self.tokens_per_step:,} tokens/step; micro-batch {config.micro_batch_size}, "
            f"{self.micro_batches} micro-batches per step per DP rank",
            f"parameters: {self.total_params / 1e9:.3f} B in all"
            + (
                f" ({(self.total_params - self.padding_params) / 1e9:.3f} B without the "
                "vocabulary's padding rows)"
                if self.padding_params
                else ""
            )
            + f", {self.params_per_gpu / 1e9:.3f} B on the busiest GPU",
            f"memory per GPU (estimate): weights {self.weights_gib:.1f} GiB + grads "
            f"{self.grads_gib:.1f} GiB + optimizer {self.optimizer_gib:.1f} GiB + activations "
            f"{self.activations_gib:.1f} GiB = {total:.1f} GiB",
            f"model FLOPs per step: {self.flops_per_step:.3e}",
            f"checkpoint: {self.checkpoint_gib:.1f} GiB per save (weights and optimizer state), "
            f"about {self.checkpoint_gib / self.world_size:.1f} GiB written by each process",
        ]
        pp, m = self.pipeline_stages, self.micro_batches
        bubble = (pp - 1) / (m + pp - 1)
        if bubble > MAX_PIPELINE_BUBBLE:
            lines.append(
                f"warning: {m} micro-batches per step through {pp} pipeline stages leave each "
                f"GPU idle {bubble:.0%} of the step (1F1B's bubble, (PP - 1) / (micro-batches + "
                "PP - 1)): raise --global-batch-size or lower --micro-batch-size"
            )
        if total > GPU_TENSOR_BUDGET_GIB:
            lines.append(
                f"warning: {total:.1f} GiB per GPU does not fit an 80 GB H100 or A100, which "
                f"leaves about {GPU_TENSOR_BUDGET_GIB:.0f} GiB for tensors (the CUDA context, "
                "NCCL's buffers and fragmentation take the rest, and are not in the estimate): "
                "use more tensor or pipeline parallelism, --recompute-granularity, or a smaller "
                "--micro-batch-size"
            )
        if self.optimizer_gather_gib:
            where = (
                "the first data-parallel rank of each model-parallel shard, which alone writes it"
                if config.distrib_optim_fully_reshardable_mem_efficient
                else "every process (--distrib-optim-fully-reshardable-mem-efficient: on one "
                "data-parallel rank only)"
            )
            lines.append(
                f"fully reshardable optimizer checkpoint: each save gathers "
                f"{self.optimizer_gather_gib:.1f} GiB of optimizer state into host memory on "
                f"{where}"
            )
        return lines


def plan_run(config, arch: LlamaArch, padded_vocab_size: int, world_size: int) -> RunPlan:
    """Parameters, memory and FLOPs of ``config`` on ``world_size`` processes.

    Memory: weights in the parameter dtype, fp32 gradients, fp32 main weights and Adam moments
    (12 bytes per parameter, divided over data-parallel ranks with the distributed optimizer).
    Activations: what each layer keeps for backward (:func:`layer_activation_bytes`) over the
    busiest stage's layers, times the micro-batches 1F1B keeps in flight (PP of them on the first
    stage); with full recomputation, each recomputed group keeps only its input, and one group's
    activations come back during backward. The fused loss adds no ``[tokens, vocab]`` logits.
    A checkpoint holds each parameter's weight and optimizer state once (the distributed
    optimizer's fp32 main weights even where they are the weights), its writes spread over all
    processes; in the fully reshardable format each save first gathers a model-parallel shard's
    fp32 main weights and moments (12 bytes per parameter) on a process.
    """
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    h = arch.hidden_size
    per_layer = layer_params(arch)
    vocab_rows = padded_vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    total = arch.num_layers * per_layer + vocab_rows + h
    # The busiest stage: the first holds the embedding, the last the output layer; with PP=1
    # one stage holds both.
    stage_layers = arch.num_layers // pp
    stage_vocab = vocab_rows if pp == 1 else padded_vocab_size * h
    per_gpu = (stage_layers * per_layer + stage_vocab) // tp
    bytes_param = 2 if config.bf16 else 4
    gib = 1024**3
    optimizer_bytes = 12 if config.bf16 else 8
    optimizer_shards = dp if config.use_distributed_optimizer else 1
    # Every parameter once: weights, fp32 main weights and Adam's two moments. The distributed
    # optimizer saves main weights in fp32 runs too, where they are the parameters themselves.
    checkpoint_optimizer_bytes = 12 if config.bf16 or config.use_distributed_optimizer else 8
    s = config.seq_length
    micro_batches = config.global_batch_size // (config.micro_batch_size * dp)
    in_flight = min(pp, micro_batches)
    stored, recomputed = stage_activation_bytes(arch, config, stage_layers)
    activations = stored * in_flight + recomputed
    tokens = config.global_batch_size * config.seq_length
    return RunPlan(
        world_size=world_size,
        data_parallel_size=dp,
        tokens_per_step=tokens,
        micro_batches=micro_batches,
        total_params=total,
        padding_params=(padded_vocab_size - arch.vocab_size) * vocab_rows // padded_vocab_size,
        pipeline_stages=pp,
        params_per_gpu=per_gpu,
        weights_gib=per_gpu * bytes_param / gib,
        grads_gib=per_gpu * 4 / gib,
        optimizer_gib=per_gpu * optimizer_bytes / optimizer_shards / gib,
        activations_gib=activations / gib,
        flops_per_step=training_flops_per_token(arch, padded_vocab_size, s) * tokens,
        checkpoint_gib=total * (bytes_param + checkpoint_optimizer_bytes) / gib,
        optimizer_gather_gib=per_gpu * 12 / gib if config.dist_ckpt_optim_fully_reshardable else 0,
    )
