"""Plumbing shared by the kernels: backend choice, TP group resolution, fp32 weight gradients."""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
import torch.distributed as dist

Backend = Literal["auto", "triton", "torch"]


def use_triton(tensor: torch.Tensor, backend: Backend) -> bool:
    """Decide whether a call runs the Triton kernels or the pure-PyTorch reference.

    Args:
        tensor: An input whose device and floating-point dtype decide.
        backend: ``"auto"`` picks Triton on CUDA and the reference elsewhere or for float64
            (the kernels compute in fp32); ``"triton"`` forces the kernels (on CPU this needs
            ``TRITON_INTERPRET=1`` set before ``kernels`` is imported, which is how the tests
            exercise them); ``"torch"`` forces the reference.

    Returns:
        True for the Triton path.

    Raises:
        ValueError: An unknown backend, or ``"triton"`` for float64 inputs.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if tensor.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("the Triton kernels compute in fp32: use backend='torch' for float64")
        return False
    if backend == "auto":
        return tensor.device.type == "cuda"
    return backend == "triton"


def check_token_ids(name: str, ids: torch.Tensor) -> None:
    """Refuse ids that are not int64 or int32 (what ``F.embedding`` takes), naming the argument.

    The Triton kernels would otherwise truncate floats to ids, and narrower integer types
    wrap around when a shard's first id is subtracted.
    """
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an int64 or int32 tensor of token ids, got {ids.dtype}")


def check_ids_in_vocab(
    name: str, ids: torch.Tensor, vocab: int, ignore_index: int | None = None
) -> None:
    """Fail on an id outside ``[0, vocab)`` that is not ``ignore_index``.

    No rank's shard holds such an id, so the kernels would silently give it a zero embedding or
    a target logit of 0 (as megatron-core's vocab-parallel layers do). CPU tensors raise at
    once, naming the first one; CUDA tensors get a device-side assertion, which needs no host
    synchronisation and fails the next synchronising call, as an out-of-range index does in
    ``F.embedding`` or ``F.cross_entropy``.
    """
    in_range = (ids >= 0) & (ids < vocab)
    rule = f"outside the vocabulary [0, {vocab:,})"
    if ignore_index is not None:
        in_range |= ids == ignore_index
        rule += f" and not ignore_index ({ignore_index})"
    if ids.is_cuda:
        torch._assert_async(in_range.all(), f"{name}: an id is {rule}")
    elif not in_range.all():
        where = tuple((~in_range).nonzero()[0].tolist())
        raise ValueError(f"{name}{list(where)} = {int(ids[where])} is {rule}")


def resolve_tp_group(tp_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """Return the tensor-parallel group to communicate over, or None when there is nothing to do.

    ``None`` means megatron-core's TP group when ``parallel_state`` is initialised (the same
    default megatron-core's layers use) and no communication otherwise, so single-process callers
    need no distributed setup. A group of size 1 is also returned as None.
    """
    if tp_group is None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return None
        tp_group = parallel_state.get_tensor_model_parallel_group()
    return tp_group if dist.get_world_size(tp_group) > 1 else None


def accumulate_mm_fp32(
    acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, overwrite: bool = False
) -> None:
    """``acc += a @ b`` (``acc = a @ b`` with ``overwrite``) with ``acc`` in fp32.

    On CUDA, bf16/fp16 operands stay in that dtype on the tensor cores and cuBLAS reads and writes
    the fp32 accumulator directly (``out_dtype``, torch 2.8 onwards), so partial products are never
    rounded to ``a.dtype``; an older torch gets :func:`accumulate_mm_rounded`. CPU has no
    mixed-dtype GEMM, so operands are upcast. ``overwrite`` (beta = 0) lets the first product fill
    an uninitialised buffer, saving a memset of it.
    """
    beta = 0.0 if overwrite else 1.0
    if a.dtype == acc.dtype or not a.is_cuda:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta)
    elif _gemm_has_fp32_output(acc.device):
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    else:
        accumulate_mm_rounded(acc, a, b, overwrite=overwrite)


# Rows of ``a @ b`` that accumulate_mm_rounded makes at a time (bounds its temporary).
ROUNDED_BLOCK_ROWS = 4096


def accumulate_mm_rounded(
    acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, overwrite: bool = False
) -> None:
    """``acc += a @ b`` with the product rounded to ``a.dtype`` before the fp32 addition.

    For a torch without an fp32-output GEMM of half-precision operands. Each call's product is
    rounded once (accumulation inside the GEMM is fp32), as megatron-core's layers round each
    micro-batch's weight gradient without gradient-accumulation fusion; the sum over calls stays
    fp32. The product is made ``ROUNDED_BLOCK_ROWS`` rows at a time, so the temporary is that many
    rows, not a whole weight-sized gradient.
    """
    for start in range(0, a.shape[0], ROUNDED_BLOCK_ROWS):
        rows = slice(start, start + ROUNDED_BLOCK_ROWS)
        product = torch.mm(a[rows], b)
        if overwrite:
            acc[rows].copy_(product)
        else:
            acc[rows].add_(product)


@functools.cache
def _gemm_has_fp32_output(device: torch.device) -> bool:
    """Whether this torch's ``addmm`` writes an fp32 result of bf16 operands (torch >= 2.8)."""
    ones = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    acc = torch.ones(2, 2, device=device)
    try:
        torch.addmm(acc, ones, ones, out_dtype=torch.float32, out=acc)
        works, failure = bool((acc == 3).all()), "a wrong result"
    except (TypeError, RuntimeError) as err:
        works, failure = False, type(err).__name__
    if not works:
        warnings.warn(
            f"torch {torch.__version__}: no GEMM with an fp32 output for bf16/fp16 operands "
            f"({failure}); the fused loss rounds each chunk's weight gradient to bf16/fp16 "
            "before adding it in fp32 (torch 2.8 or later keeps it exact)",
            stacklevel=3,
        )
    return works


def has_main_grad(weight: torch.Tensor) -> bool:
    """Whether megatron-core's DistributedDataParallel gave ``weight`` an fp32 ``main_grad``."""
    return hasattr(weight, "main_grad") and hasattr(weight, "grad_added_to_main_grad")


def weight_grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """The fp32 buffer a backward pass should accumulate ``weight``'s gradient into.

    Under megatron-core's DistributedDataParallel every parameter carries an fp32 ``main_grad``
    buffer; accumulating into it directly (megatron-core's gradient-accumulation-fusion protocol)
    skips a dense parameter-dtype gradient, its rounding and DDP's extra add. Elsewhere it is a
    fresh zero-filled fp32 tensor.
    """
    if has_main_grad(weight):
        return weight.main_grad
    dtype = torch.promote_types(weight.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device)


def finish_weight_grad(weight: torch.Tensor, grad_fp32: torch.Tensor) -> torch.Tensor | None:
    """Turn an fp32 gradient into what ``backward`` returns for ``weight``.

    Args:
        weight: The parameter.
        grad_fp32: Its fp32 gradient: either ``weight_grad_buffer(weight)`` already filled, or a
            private buffer, which is then added to ``main_grad`` when there is one.

    Returns:
        The gradient in the parameter's dtype; under megatron-core's DDP, where the gradient is
        in ``main_grad`` already, :func:`_main_grad_placeholder`.
    """
    if not has_main_grad(weight):
        return grad_fp32.to(weight.dtype)
    if grad_fp32 is not weight.main_grad:
        weight.main_grad.add_(grad_fp32)
    weight.grad_added_to_main_grad = True
    return _main_grad_placeholder(weight)


def _main_grad_placeholder(weight: torch.Tensor) -> torch.Tensor | None:
    """A gradient for ``weight`` that costs no memory, once its real one is in ``main_grad``.

    megatron-core's DDP hook needs a gradient to arrive (under ``overlap_grad_reduce`` it asserts
    one before it marks the weight's bucket ready for its reduction) and drops it unread once
    ``grad_added_to_main_grad`` is set. megatron-core's own layers allocate an uninitialised
    weight-sized tensor for that, V/TP x H at the start of backward for the output layer, where
    activation memory peaks. This is a view of ``main_grad``'s memory in the weight's dtype and
    layout, which autograd adopts as ``weight.grad`` without a copy. It is only returned while
    ``weight.grad`` is None (always so under DDP's hook, which resets it), so that autograd never
    adds to it in place, which would write into ``main_grad``.
    """
    if weight.grad is not None:
        return None
    return weight.main_grad.view(-1).view(weight.dtype)[: weight.numel()].view(weight.shape)
