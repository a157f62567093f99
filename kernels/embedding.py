"""Vocab-parallel embedding for an expanded vocabulary, with a deterministic sparse backward.

Forward: one kernel masks the ids outside this rank's shard, gathers the rows and zeroes the
masked ones (megatron-core's ``VocabParallelEmbedding`` does this in four ops), then the same
all-reduce across TP, or reduce-scatter to sequence-parallel ``[s/TP, b, h]`` layout.

Backward: the ids that fall in this shard (and in ``trainable_rows``) are stably sorted; each
unique row's gradient is the sum of its tokens' output gradients, taken in token order in fp32 by
one program per (row, hidden block) and added once to the fp32 gradient buffer. No atomics, so two
runs give bitwise-identical gradients, and only rows that occur are touched: rows outside
``trainable_rows`` get exactly zero and cost nothing. The buffer is megatron-core's ``main_grad``
under its DistributedDataParallel (nothing dense is then written at all), else a zero tensor of the
parameter dtype, each row's fp32 sum rounded once into it.
"""

# Triton spells compile-time constants (tl.constexpr parameters) in upper case.
# ruff: noqa: N803

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from torch.autograd.function import once_differentiable

from kernels._common import (
    Backend,
    check_ids_in_vocab,
    check_token_ids,
    finish_weight_grad,
    has_main_grad,
    resolve_tp_group,
    use_triton,
)


@triton.jit
def _embedding_fwd_kernel(
    ids_ptr,
    weight_ptr,
    out_ptr,
    n_tokens,
    hidden,
    weight_row_stride,
    weight_col_stride,
    vocab_start,
    shard_rows,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = weight[ids[t] - vocab_start] if that row is in this shard, else 0."""
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < n_tokens
    col_mask = cols < hidden
    rows = tl.load(ids_ptr + tokens, mask=token_mask, other=0).to(tl.int64) - vocab_start
    hit = token_mask & (rows >= 0) & (rows < shard_rows)
    values = tl.load(
        weight_ptr + rows[:, None] * weight_row_stride + cols[None, :] * weight_col_stride,
        mask=hit[:, None] & col_mask[None, :],
        other=0.0,
    )
    tl.store(
        out_ptr + tokens.to(tl.int64)[:, None] * hidden + cols[None, :],
        values,
        mask=token_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _embedding_bwd_kernel(
    grad_out_ptr,
    order_ptr,
    segment_start_ptr,
    segment_row_ptr,
    grad_weight_ptr,
    hidden,
    grad_weight_row_stride,
    grad_weight_col_stride,
    BLOCK_H: tl.constexpr,
):
    """grad_weight[row] += sum of grad_out over the segment's tokens, in order, in fp32.

    The sum is rounded once, to the buffer's dtype (fp32 ``main_grad``, or the parameter's).
    """
    segment = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    start = tl.load(segment_start_ptr + segment)
    end = tl.load(segment_start_ptr + segment + 1)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i in range(start, end):
        token = tl.load(order_ptr + i).to(tl.int64)
        acc += tl.load(grad_out_ptr + token * hidden + cols, mask=col_mask, other=0.0).to(
            tl.float32
        )
    row = tl.load(segment_row_ptr + segment).to(tl.int64)
    dest = grad_weight_ptr + row * grad_weight_row_stride + cols * grad_weight_col_stride
    total = tl.load(dest, mask=col_mask, other=0.0).to(tl.float32) + acc
    tl.store(dest, total.to(grad_weight_ptr.dtype.element_ty), mask=col_mask)


def _forward_launch(hidden: int) -> dict[str, int]:
    """Tile of the forward kernel: 32 tokens x up to 256 columns."""
    return {"BLOCK_N": 32, "BLOCK_H": min(256, triton.next_power_of_2(hidden))}


def _backward_launch(hidden: int) -> dict[str, int]:
    """Columns of one row's gradient that one backward program sums."""
    return {"BLOCK_H": min(1024, triton.next_power_of_2(hidden))}


def _lookup(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int, triton_path: bool):
    """Rows of this shard for ``ids``; zeros for ids owned by other ranks."""
    flat = ids.reshape(-1)
    out = torch.empty(flat.numel(), weight.shape[1], dtype=weight.dtype, device=weight.device)
    if triton_path and flat.numel() > 0:
        launch = _forward_launch(weight.shape[1])
        grid = (
            triton.cdiv(flat.numel(), launch["BLOCK_N"]),
            triton.cdiv(weight.shape[1], launch["BLOCK_H"]),
        )
        _embedding_fwd_kernel[grid](
            flat.contiguous(),
            weight,
            out,
            flat.numel(),
            weight.shape[1],
            *weight.stride(),
            vocab_start,
            weight.shape[0],
            **launch,
        )
    elif not triton_path:
        rows = flat - vocab_start
        hit = (rows >= 0) & (rows < weight.shape[0])
        # Selected, not multiplied by the mask: a NaN in row 0 would give NaN for every other
        # rank's id (megatron-core assigns 0 too).
        torch.where(hit[:, None], weight[rows.where(hit, 0)], weight.new_zeros(()), out=out)
    return out.view(*ids.shape, weight.shape[1])


def _segments(
    ids: torch.Tensor, vocab_start: int, row_range: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the tokens whose local row lies in ``row_range`` by row, deterministically.

    Returns:
        ``order`` (token indices sorted by row, ties in token order), ``segment_start``
        (``[U + 1]`` offsets into ``order``) and ``segment_row`` (``[U]`` unique local rows).
    """
    rows = ids.reshape(-1) - vocab_start
    tokens = torch.nonzero((rows >= row_range[0]) & (rows < row_range[1])).squeeze(1)
    sorted_rows, perm = torch.sort(rows[tokens], stable=True)
    segment_row, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    segment_start = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=segment_start[1:])
    return tokens[perm], segment_start, segment_row


def _accumulate_rows(
    grad_out: torch.Tensor,
    segments: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grad_weight: torch.Tensor,
    triton_path: bool,
) -> None:
    """``grad_weight[row] += sum(grad_out[tokens of row])`` for each segment, summed in fp32."""
    order, segment_start, segment_row = segments
    if segment_row.numel() == 0:
        return
    hidden = grad_out.shape[1]
    if triton_path:
        launch = _backward_launch(hidden)
        _embedding_bwd_kernel[(segment_row.numel(), triton.cdiv(hidden, launch["BLOCK_H"]))](
            grad_out,
            order,
            segment_start,
            segment_row,
            grad_weight,
            hidden,
            *grad_weight.stride(),
            **launch,
        )
        return
    # index_add_ on CPU walks the (sorted) tokens sequentially: the same order as the kernel.
    segment_of_token = torch.repeat_interleave(segment_start.diff())
    acc = torch.promote_types(grad_weight.dtype, torch.float32)
    sums = grad_weight[segment_row].to(acc)
    sums.index_add_(0, segment_of_token, grad_out[order].to(acc))
    grad_weight[segment_row] = sums.to(grad_weight.dtype)


class VocabParallelEmbeddingFunction(torch.autograd.Function):
    """This rank's part of the lookup (before the TP reduction), with the sparse fp32 backward."""

    @staticmethod
    def forward(
        ctx,
        ids: torch.Tensor,
        weight: torch.Tensor,
        vocab_start: int,
        row_range: tuple[int, int],
        triton_path: bool,
    ) -> torch.Tensor:
        """Masked gather; ``row_range`` is the local row range that receives gradients."""
        ctx.save_for_backward(ids, weight)
        ctx.vocab_start, ctx.row_range, ctx.triton_path = vocab_start, row_range, triton_path
        return _lookup(ids, weight, vocab_start, triton_path)

    @staticmethod
    @once_differentiable  # linear in grad_out: its second derivative flows through grad_out only
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Sorted segment sums into ``main_grad`` when present, else a zero gradient tensor."""
        ids, weight = ctx.saved_tensors
        # Each row's sum is already fp32, so without main_grad one rounding to the parameter
        # dtype per row is all that is left: no dense fp32 buffer and no cast pass over it.
        grad_weight = weight.main_grad if has_main_grad(weight) else torch.zeros_like(weight)
        segments = _segments(ids, ctx.vocab_start, ctx.row_range)
        grad_out = grad_out.reshape(-1, weight.shape[1]).contiguous()
        _accumulate_rows(grad_out, segments, grad_weight, ctx.triton_path)
        return None, finish_weight_grad(weight, grad_weight), None, None, None


def vocab_parallel_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    *,
    vocab_start: int = 0,
    trainable_rows: tuple[int, int] | None = None,
    tp_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Embed global token ids with this rank's vocab shard, reduced across tensor parallelism.

    Args:
        ids: Global token ids, e.g. ``[b, s]``.
        weight: This rank's shard ``[V / TP, H]`` of the embedding table.
        vocab_start: Global id of the shard's first row.
        trainable_rows: ``(start, end)`` global ids whose rows receive gradients (e.g.
            ``(32000, V)`` for the new tokens); other rows get exactly zero. None: all rows.
        tp_group: Tensor-parallel group; None: megatron-core's TP group if ``parallel_state`` is
            initialised, else no parallelism.
        sequence_parallel: Reduce-scatter to megatron's sequence-parallel layout: ``[b, s]`` ids
            give ``[s / TP, b, H]``, as ``VocabParallelEmbedding(reduce_scatter_embeddings=True)``.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.

    Returns:
        ``[*ids.shape, H]`` embeddings (``[s / TP, b, H]`` with sequence parallelism).

    Raises:
        ValueError: ``ids`` are not int64 or int32, or ``trainable_rows`` ends before it starts;
            on CPU tensors also an id outside the vocabulary (the shard times the TP size; CUDA
            tensors are not checked here).
    """
    check_token_ids("ids", ids)
    if weight.dim() != 2 or weight.shape[0] == 0 or not weight.is_floating_point():
        raise ValueError(
            f"weight {tuple(weight.shape)} {weight.dtype} is not a [rows, hidden] floating-point "
            "shard with at least one row"
        )
    if trainable_rows is not None and trainable_rows[0] > trainable_rows[1]:
        raise ValueError(f"trainable_rows {tuple(trainable_rows)}: start is above end")
    shard_end = vocab_start + weight.shape[0]
    start, end = trainable_rows if trainable_rows is not None else (vocab_start, shard_end)
    row_range = (max(start, vocab_start) - vocab_start, max(min(end, shard_end) - vocab_start, 0))
    group = resolve_tp_group(tp_group)
    world = dist.get_world_size(group) if group else 1
    # The vocabulary is megatron-core's even split over the group; a lone shard that does not
    # start at 0 is a caller's own split, whose extent is unknown here. Not on CUDA: the check's
    # five small launches would cost about 8 % of the lookup itself (0.19 ms for 32k tokens at
    # H=4096 on an H100), and in training the same ids reach the loss as labels, which it checks.
    if not ids.is_cuda and (group or vocab_start == 0):
        check_ids_in_vocab("ids", ids, weight.shape[0] * world)
    out = VocabParallelEmbeddingFunction.apply(
        ids, weight, vocab_start, row_range, use_triton(weight, backend)
    )
    if sequence_parallel:
        out = out.transpose(0, 1).contiguous()
        return reduce_scatter_to_sequence_parallel_region(out, group=group) if group else out
    return reduce_from_tensor_model_parallel_region(out, group=group) if group else out


class FusedVocabParallelEmbedding(VocabParallelEmbedding):
    """Drop-in for megatron-core's ``VocabParallelEmbedding`` that runs the fused kernels.

    Same constructor (plus ``trainable_rows``), sharding, parameters and checkpoint keys, so
    checkpoints move freely between the two; ``trainable_rows`` may be changed between training
    stages (e.g. embedding-only warm-up on the new rows, then all rows).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_method: Callable,
        reduce_scatter_embeddings: bool = False,
        config: ModelParallelConfig,
        tp_group: dist.ProcessGroup | None = None,
        trainable_rows: tuple[int, int] | None = None,
    ):
        super().__init__(
            num_embeddings,
            embedding_dim,
            init_method=init_method,
            reduce_scatter_embeddings=reduce_scatter_embeddings,
            config=config,
            tp_group=tp_group,
        )
        self.trainable_rows = trainable_rows

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        """Embed ``input_`` (``[b, s]`` global ids) exactly as the parent module's forward does."""
        return vocab_parallel_embedding(
            input_,
            self.weight,
            vocab_start=self.vocab_start_index,
            trainable_rows=self.trainable_rows,
            tp_group=self.tp_group,
            sequence_parallel=self.reduce_scatter_embeddings,
        )
