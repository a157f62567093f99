"""Rotary position embedding in one kernel each way, for megatron-core's local layer spec.

Without Transformer Engine, megatron-core applies RoPE with about a dozen PyTorch ops per tensor
and direction (cos, sin, casts, the rotated half's negation and concatenations, multiplies and
adds), each a kernel launch over the whole query or key. This kernel reads each row once and
writes it once, forward and backward. It computes megatron-core's function exactly as written:
``out = t * cos(f) + rotate_half(t) * sin(f)`` over the first ``freqs.shape[-1]`` channels of
``t``, the rest passed through, with ``rotate_half([x1, x2]) = [-x2, x1]``; the arithmetic is in
fp32 (megatron-core's rounds ``cos`` and ``sin`` to the input's dtype first, Transformer Engine's
fused kernel does not).

Layout: ``t`` is ``[s, b, heads, dim]`` (megatron-core's sbhd, any strides over the first three
dimensions, the last contiguous) and ``freqs`` ``[s, 1 or b, 1, rot_dim]``, as megatron-core's
``RotaryEmbedding`` makes it. Non-interleaved rotation only (Llama's).
"""

# Triton spells compile-time constants (tl.constexpr parameters) in upper case.
# ruff: noqa: N803

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels._common import Backend, use_triton


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    freqs_ptr,
    stride_xs,
    stride_xb,
    stride_xh,
    stride_os,
    stride_ob,
    stride_oh,
    stride_fs,
    stride_fb,
    batch,
    heads,
    dim,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # One program per (position, sequence, block of heads); every head of a position shares its
    # cos and sin.
    pid = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements
    head_blocks = tl.cdiv(heads, BLOCK_H)
    s = pid // (batch * head_blocks)
    b = (pid // head_blocks) % batch
    h = (pid % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    col = tl.arange(0, BLOCK_HALF)
    col_ok = col < HALF
    f_row = freqs_ptr + s * stride_fs + b * stride_fb
    f1 = tl.load(f_row + col, mask=col_ok, other=0.0).to(tl.float32)
    f2 = tl.load(f_row + HALF + col, mask=col_ok, other=0.0).to(tl.float32)
    c1, s1 = tl.cos(f1)[None, :], tl.sin(f1)[None, :]
    c2, s2 = tl.cos(f2)[None, :], tl.sin(f2)[None, :]
    mask = (h < heads)[:, None] & col_ok[None, :]
    x_rows = x_ptr + s * stride_xs + b * stride_xb + h[:, None] * stride_xh
    o_rows = out_ptr + s * stride_os + b * stride_ob + h[:, None] * stride_oh
    x1 = tl.load(x_rows + col[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + HALF + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transpose of the forward map: d/dx1 gathers from out1 and out2, likewise d/dx2.
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_rows + col[None, :], o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_rows + HALF + col[None, :], o2.to(out_ptr.dtype.element_ty), mask=mask)
    # Channels past the rotated ones pass through (gradients too: the map is the identity there).
    for start in range(2 * HALF, dim, BLOCK_PASS):
        rest = start + tl.arange(0, BLOCK_PASS)
        rest_mask = (h < heads)[:, None] & (rest < dim)[None, :]
        values = tl.load(x_rows + rest[None, :], mask=rest_mask)
        tl.store(o_rows + rest[None, :], values, mask=rest_mask)


def _rope_triton(t: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    # The kernel walks the last dimension of both with unit stride.
    if t.stride(-1) != 1:
        t = t.contiguous()
    if freqs.stride(-1) != 1:
        freqs = freqs.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    seq, batch, heads, dim = t.shape
    half = freqs.shape[-1] // 2
    launch = _launch(heads, half)
    grid = (seq * batch * triton.cdiv(heads, launch["BLOCK_H"]),)
    _rope_kernel[grid](
        t,
        out,
        freqs,
        t.stride(0),
        t.stride(1),
        t.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        freqs.stride(0),
        freqs.stride(1) if freqs.shape[1] > 1 else 0,
        batch,
        heads,
        dim,
        HALF=half,
        BACKWARD=backward,
        **launch,
    )
    return out


def _launch(heads: int, half: int) -> dict:
    """Block sizes and warps for ``heads`` heads whose rotated half is ``half`` wide.

    Up to 2,048 elements of each half per program (all of a position's heads; for Llama's
    128-wide heads, up to 32 of them), 8 per thread.
    """
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(heads), max(1, 2048 // block_half))
    num_warps = min(8, max(1, block_h * block_half // 256))
    return {"BLOCK_H": block_h, "BLOCK_HALF": block_half, "BLOCK_PASS": 64, "num_warps": num_warps}


def _rope_torch(t: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    """The same map in PyTorch ops (CPU, and the kernel's reference in tests)."""
    half = freqs.shape[-1] // 2
    compute = torch.promote_types(t.dtype, torch.float32)
    x1 = t[..., :half].to(compute)
    x2 = t[..., half : 2 * half].to(compute)
    f = freqs.to(compute)
    c1, c2 = torch.cos(f[..., :half]), torch.cos(f[..., half:])
    s1, s2 = torch.sin(f[..., :half]), torch.sin(f[..., half:])
    if backward:
        o1, o2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        o1, o2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    return torch.cat((o1.to(t.dtype), o2.to(t.dtype), t[..., 2 * half :]), dim=-1)


class _RotaryEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, freqs: torch.Tensor, triton_path: bool) -> torch.Tensor:
        ctx.save_for_backward(freqs)
        ctx.triton_path = triton_path
        rope = _rope_triton if triton_path else _rope_torch
        return rope(t, freqs, backward=False)

    @staticmethod
    @once_differentiable  # linear in grad_out: its second derivative flows through grad_out only
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (freqs,) = ctx.saved_tensors
        rope = _rope_triton if ctx.triton_path else _rope_torch
        return rope(grad_out, freqs, backward=True), None, None


def rotary_embedding(
    t: torch.Tensor, freqs: torch.Tensor, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Apply rotary position embedding to ``t`` (see the module docstring for the exact map).

    Args:
        t: ``[s, b, heads, dim]`` queries or keys.
        freqs: ``[s, 1 or b, 1, rot_dim]`` angles (megatron-core's rotary embedding), ``rot_dim``
            even, positive and at most ``dim``; the channels past it pass through.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.

    Returns:
        A new ``[s, b, heads, dim]`` tensor in ``t``'s dtype.

    Raises:
        ValueError: Shapes that do not match.
    """
    rot_dim = freqs.shape[-1]
    if t.dim() != 4 or freqs.dim() != 4:
        raise ValueError(f"t {tuple(t.shape)} and freqs {tuple(freqs.shape)} must be 4-D (sbhd)")
    if rot_dim % 2 or not 0 < rot_dim <= t.shape[-1]:
        raise ValueError(
            f"freqs' last dimension {rot_dim} must be even, positive and at most t's {t.shape[-1]}"
        )
    if freqs.shape[0] != t.shape[0] or freqs.shape[1] not in (1, t.shape[1]) or freqs.shape[2] != 1:
        raise ValueError(f"freqs {tuple(freqs.shape)} does not match t {tuple(t.shape)}")
    return _RotaryEmbedding.apply(t, freqs, use_triton(t, backend))


def fused_apply_rotary_pos_emb(
    t: torch.Tensor,
    freqs: torch.Tensor,
    transpose_output_memory: bool = False,
    interleaved: bool = False,
) -> torch.Tensor:
    """:func:`rotary_embedding` with Transformer Engine's signature.

    It is the signature megatron-core calls when ``apply_rope_fusion`` is on
    (``rope_utils.fused_apply_rotary_pos_emb``).

    Raises:
        ValueError: Interleaved rotation, which this kernel does not implement.
    """
    del transpose_output_memory  # TE's deprecated layout hint; the output is always contiguous
    if interleaved:
        raise ValueError("fused rotary embedding: interleaved rotation is not implemented")
    return rotary_embedding(t, freqs)
