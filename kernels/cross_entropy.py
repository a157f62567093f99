"""Fused linear + cross-entropy over a vocab-parallel output layer, without the [N, V] logits.

The loss of token ``n`` with label ``y`` over the global vocabulary of ``V`` classes (all TP
ranks; with ``vocab_size``, the rows that pad the weight past it are no classes) is, with
``s = label_smoothing * V / (V - 1)``::

    z_v  = h_n . w_v                       logits, fp32 accumulation
    z_v <- cap * tanh(z_v / cap)           only with softcap, before everything else
    lse  = log sum_v exp(z_v)
    loss = lse - (1 - s) z_y - (s / V) sum_v z_v + z_loss * lse^2

This is megatron-core's ``vocab_parallel_cross_entropy`` (its smoothing puts ``label_smoothing``
of the mass on the ``V - 1`` wrong classes, i.e. ``F.cross_entropy(label_smoothing=s)``), with its
smoothing term taken over the whole vocabulary under TP where megatron-core uses only the local
partition; z-loss is PaLM's ``z_loss * lse^2`` per token; soft-capping is Gemma-2's.
Megatron-core also counts the rows that pad the vocabulary to a multiple of 128 x TP as classes
(each with a logit, 0 for the zero rows of a converted checkpoint); given ``vocab_size``, these
rows take no probability and get no gradient, so the loss is the unpadded (exported) model's at
any TP size.

Tokens whose label is ``ignore_index`` or whose ``loss_mask`` is 0 get loss 0 and no gradient.
``reduction="none"`` returns the per-token losses (what megatron-core's
``compute_language_model_loss`` returns); ``"sum"`` sums them weighted by ``loss_mask``; ``"mean"``
divides that sum by the number (mask weight) of non-ignored tokens, and is 0 when there are none.

Algorithm: tokens are processed in chunks of ``C`` rows; for each chunk the logits
``[C, V/TP]`` exist only in the input dtype, the per-token max, sum-exp, target logit and logit sum
are combined across TP with one MAX and one SUM all-reduce of size ``O(C)``, and the gradient with
respect to the logits is written over the logits in place (without TP, the Triton path does the
statistics, the loss and that gradient in one kernel, two passes over each row). With
``mean``/``sum`` reduction the gradients are computed during the forward pass (the upstream
gradient is a scalar, applied in backward), so forward+backward costs the three lm-head GEMMs;
with ``none`` the per-token upstream gradient is only known in backward, which recomputes each
chunk's logits (a fourth GEMM). So do fp16 inputs, whose narrow range needs the upstream
gradient (the loss scale) applied before the logits' gradient is rounded, and a second backward
through the same graph. ``dW`` is accumulated in fp32 into megatron-core's ``main_grad``
when present, else into a private buffer; on the mean/sum path that happens during the forward
pass (so a forward with gradients enabled under megatron-core's DDP must be followed by its
backward, as in training), and backward only corrects for an upstream gradient other than 1 by
recomputing ``(factor - 1) dW``. ``dH`` is all-reduced across TP inside backward, so callers must
not wrap ``hidden`` in ``copy_to_tensor_model_parallel_region``.
"""

# Triton spells compile-time constants (tl.constexpr parameters) in upper case.
# ruff: noqa: N803

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels._common import (
    Backend,
    accumulate_mm_fp32,
    check_ids_in_vocab,
    check_token_ids,
    finish_weight_grad,
    has_main_grad,
    resolve_tp_group,
    use_triton,
    weight_grad_buffer,
)

_REDUCTIONS = ("none", "sum", "mean")
# Widest vocab block a program handles at once (tests lower it to exercise partial blocks).
MAX_BLOCK_V = 8192
# Smallest chunk (see _chunk_rows; tests lower both to 1 to get several chunks): token rows on a
# GPU, logits (rows x vocab shard) on a CPU.
MIN_GPU_CHUNK_ROWS = 2048
MIN_CPU_CHUNK_LOGITS = 512 * 32000
# Row stride of the logits, in elements (see _LogitsBuffer); megatron pads the vocabulary to
# multiples of 128 for the same reason.
LOGITS_ROW_ALIGN = 128
# Without TP, the Triton path takes each row's loss and gradient in one launch
# (_ce_whole_row_kernel); benchmarks turn this off to measure what that saves over the two
# kernels TP needs, and tests to run those at TP=1.
ONE_ROW_KERNEL_WITHOUT_TP = True


@triton.jit
def _softcap(z, cap):
    # cap * tanh(z / cap) through exp: portable across Triton versions and the interpreter, and
    # exact at the saturated ends (exp overflowing to inf gives +/-cap).
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0))


@triton.jit
def _scan_row(base, n_cols, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row's max, sum of exp(z - max) and sum of z, in fp32."""
    m = -float("inf")
    s = 0.0
    total = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = _softcap(z, softcap)
        total += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    return m, s, total


@triton.jit
def _target_logit(base, target, softcap, HAS_SOFTCAP: tl.constexpr):
    """z[target] of one row, 0 when the target is not in it (``target`` < 0)."""
    # Loaded after the scan: a value live across its loop makes ptxas spill on sm_90.
    on_shard = target >= 0
    z_t = tl.load(base + tl.where(on_shard, target, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        z_t = _softcap(z_t, softcap)
    return tl.where(on_shard, z_t, 0.0)


@triton.jit
def _write_row_grad(
    base,
    n_cols,
    target,
    lse,
    scale,
    z_coef,
    smooth,
    target_coef,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Overwrite one row of logits with scale * d loss / d logits, computed in fp32."""
    p_coef = 1.0 + z_coef * lse
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = _softcap(z, softcap)
        d = p_coef * tl.exp(z - lse) - smooth - tl.where(cols == target, target_coef, 0.0)
        if HAS_SOFTCAP:
            c = z / softcap
            d = d * (1.0 - c * c)
        tl.store(base + cols, (d * scale).to(base.dtype.element_ty), mask=mask)


@triton.jit
def _ce_stats_kernel(
    logits_ptr,
    stride,
    target_ptr,
    max_ptr,
    sumexp_ptr,
    target_logit_ptr,
    logit_sum_ptr,
    n_cols,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row of a shard: max, sum-exp, target logit and logit sum, which TP ranks combine."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    m, s, total = _scan_row(base, n_cols, softcap, HAS_SOFTCAP, BLOCK_V)
    z_t = _target_logit(base, tl.load(target_ptr + row), softcap, HAS_SOFTCAP)
    tl.store(max_ptr + row, m)
    tl.store(sumexp_ptr + row, s)
    tl.store(target_logit_ptr + row, z_t)
    tl.store(logit_sum_ptr + row, total)


@triton.jit
def _ce_grad_kernel(
    logits_ptr,
    stride,
    target_ptr,
    lse_ptr,
    scale_ptr,
    n_cols,
    z_coef,
    smooth,
    target_coef,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row, given the global log-sum-exp: the logits' gradient over the logits."""
    row = tl.program_id(0).to(tl.int64)
    _write_row_grad(
        logits_ptr + row * stride,
        n_cols,
        tl.load(target_ptr + row),
        tl.load(lse_ptr + row),
        tl.load(scale_ptr + row),
        z_coef,
        smooth,
        target_coef,
        softcap,
        HAS_SOFTCAP,
        BLOCK_V,
    )


@triton.jit
def _ce_whole_row_kernel(
    logits_ptr,
    stride,
    target_ptr,
    lse_ptr,
    loss_ptr,
    scale_ptr,
    n_cols,
    z_loss,
    z_coef,
    smooth,
    target_coef,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row of the whole vocabulary (no TP): log-sum-exp, loss and the logits' gradient.

    One launch instead of the statistics and gradient kernels: the gradient pass (with
    ``WRITE_GRAD``) re-reads a row the first pass has just read, while few enough rows are in
    flight for it to be in L2, and the O(N) arithmetic between the passes needs no kernels.
    """
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    m, s, total = _scan_row(base, n_cols, softcap, HAS_SOFTCAP, BLOCK_V)
    target = tl.load(target_ptr + row)
    z_t = _target_logit(base, target, softcap, HAS_SOFTCAP)
    lse = m + tl.log(s)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, lse - target_coef * z_t - smooth * total + z_loss * lse * lse)
    if WRITE_GRAD:
        scale = tl.load(scale_ptr + row)
        _write_row_grad(
            base, n_cols, target, lse, scale, z_coef, smooth, target_coef, softcap, HAS_SOFTCAP,
            BLOCK_V,
        )  # fmt: skip


@dataclass(frozen=True)
class _Config:
    z_loss: float
    softcap: float | None
    smoothing: float  # s in the module docstring (megatron-core's rescaled label smoothing)
    vocab_size: int  # global, without padding
    shard_classes: int  # leading rows of this rank's shard below vocab_size (the rest: padding)
    reduction: str
    tp_group: dist.ProcessGroup | None
    triton: bool
    # Autograd records this call: forward runs in no-grad mode, where needs_input_grad still
    # reflects requires_grad, so a caller's torch.no_grad() is only visible from outside.
    grad_enabled: bool

    def grad_coefficients(self) -> tuple[float, float, float]:
        """``(z_coef, smooth, target_coef)`` in the logits' gradient.

        ``d loss / d z_v = (1 + z_coef lse) softmax_v - smooth - target_coef [v == y]``, then
        the soft-cap's chain rule.
        """
        return 2.0 * self.z_loss, self.smoothing / self.vocab_size, 1.0 - self.smoothing


def _row_launch(n_cols: int, on_gpu: bool) -> dict[str, int]:
    """Launch settings of the row kernels (one program per row of ``n_cols`` logits)."""
    return {
        "BLOCK_V": min(MAX_BLOCK_V, triton.next_power_of_2(n_cols)),
        "num_warps": 16 if on_gpu else 1,
    }


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    # fp32 math for bf16/fp16/fp32 inputs; float64 stays float64 (gradcheck).
    return torch.promote_types(t.dtype, torch.float32)


def _softcap_torch(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def _row_stats(
    logits: torch.Tensor, target: torch.Tensor, cfg: _Config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Local max, sum-exp (relative to that max), target logit and logit sum of each row.

    The PyTorch path also returns ``exp(z - max)``, computed over the logits in place when they
    are fp32 without soft-capping (what follows needs only that, or recomputes the logits), else
    in the fp32 copy it had to make anyway. The Triton path returns None there.
    """
    rows = logits.shape[0]
    if cfg.triton:
        out = torch.empty(4, rows, dtype=torch.float32, device=logits.device)
        _ce_stats_kernel[(rows,)](
            logits,
            logits.stride(0),
            target,
            out[0],
            out[1],
            out[2],
            out[3],
            logits.shape[1],
            cfg.softcap or 1.0,
            HAS_SOFTCAP=cfg.softcap is not None,
            **_row_launch(logits.shape[1], logits.is_cuda),
        )
        return out[0], out[1], out[2], out[3], None
    z = _softcap_torch(logits.to(_acc_dtype(logits)), cfg.softcap)
    row_max = z.amax(dim=1)
    on_shard = target >= 0
    target_logit = z.gather(1, target.clamp_min(0)[:, None]).squeeze(1).where(on_shard, 0.0)
    # The logit sum only enters the loss through label smoothing: skip that pass without it.
    logit_sum = z.sum(dim=1) if cfg.smoothing else torch.zeros_like(row_max)
    shifted_exp = z.sub_(row_max[:, None]).exp_()
    return row_max, shifted_exp.sum(dim=1), target_logit, logit_sum, shifted_exp


def _logits_grad_(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    cfg: _Config,
    shifted_exp: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Overwrite ``logits`` with ``scale[:, None] * d loss / d logits`` (fp32 math).

    ``shifted_exp``: ``(exp(z - shift), shift)`` from the PyTorch path's statistics pass (the
    softmax then costs one multiply instead of another exp); without it the logits are read.
    """
    z_coef, smooth, target_coef = cfg.grad_coefficients()
    if cfg.triton:
        _ce_grad_kernel[(logits.shape[0],)](
            logits,
            logits.stride(0),
            target,
            lse,
            scale,
            logits.shape[1],
            z_coef,
            smooth,
            target_coef,
            cfg.softcap or 1.0,
            HAS_SOFTCAP=cfg.softcap is not None,
            **_row_launch(logits.shape[1], logits.is_cuda),
        )
        return
    # The per-row factors fold into one multiply; without soft-capping or smoothing and with
    # fp32 logits that is the only pass, written over the logits (which ``p`` may already be).
    row_factor = scale * (1.0 + z_coef * lse)
    if shifted_exp is not None:
        p, shift = shifted_exp
        row_factor = row_factor * torch.exp(shift - lse)
    else:
        p = _softcap_torch(logits.to(_acc_dtype(logits)), cfg.softcap).sub_(lse[:, None]).exp_()
    d = p.mul_(row_factor[:, None])
    if smooth:
        d.sub_((smooth * scale)[:, None])
    rows = torch.nonzero(target >= 0).squeeze(1)
    d[rows, target[rows]] -= target_coef * scale[rows]
    if cfg.softcap is not None:
        # p was a soft-capped copy: the logits themselves are intact.
        c = torch.tanh(logits.to(d.dtype) / cfg.softcap)
        d.mul_(1.0 - c.square())
    if d.data_ptr() != logits.data_ptr():
        logits.copy_(d)


def _global_lse_and_loss(
    logits: torch.Tensor, target: torch.Tensor, cfg: _Config
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Per-token log-sum-exp and loss over the whole (TP-sharded) vocabulary.

    Also returns, on the PyTorch path, ``(exp(z - local max), local max)`` for
    :func:`_logits_grad_`; the logits themselves may have been overwritten by it.
    """
    row_max, sum_exp, target_logit, logit_sum, shifted = _row_stats(logits, target, cfg)
    local_max = row_max
    if cfg.tp_group is not None:
        local_max = row_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=cfg.tp_group)
        sums = torch.stack([sum_exp * torch.exp(local_max - row_max), target_logit, logit_sum])
        dist.all_reduce(sums, group=cfg.tp_group)
        sum_exp, target_logit, logit_sum = sums
    lse = row_max + torch.log(sum_exp)
    loss = lse - (1.0 - cfg.smoothing) * target_logit - (cfg.smoothing / cfg.vocab_size) * logit_sum
    if cfg.z_loss:  # 0 x lse^2 is NaN once lse^2 overflows
        loss += cfg.z_loss * lse.square()
    return lse, loss, None if shifted is None else (shifted, local_max)


def _chunk_loss_(
    logits: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    write_grad: bool,
    lse: torch.Tensor,
    loss: torch.Tensor,
    cfg: _Config,
) -> None:
    """Fill ``lse`` and ``loss`` for one chunk's rows.

    With ``write_grad``, also overwrite ``logits`` with ``scale[:, None] * d loss / d logits``.
    """
    if cfg.triton and cfg.tp_group is None and ONE_ROW_KERNEL_WITHOUT_TP:
        _ce_whole_row_kernel[(logits.shape[0],)](
            logits,
            logits.stride(0),
            target,
            lse,
            loss,
            scale,
            logits.shape[1],
            cfg.z_loss,
            *cfg.grad_coefficients(),
            cfg.softcap or 1.0,
            HAS_SOFTCAP=cfg.softcap is not None,
            WRITE_GRAD=write_grad,
            **_row_launch(logits.shape[1], logits.is_cuda),
        )
        return
    chunk_lse, chunk_loss, shifted_exp = _global_lse_and_loss(logits, target, cfg)
    lse.copy_(chunk_lse)
    loss.copy_(chunk_loss)
    if write_grad:
        _logits_grad_(logits, target, lse, scale, cfg, shifted_exp)


def _chunk_rows(n: int, hidden_size: int, shard_vocab: int, on_gpu: bool) -> int:
    # Liger-Kernel's rule: a chunk's logits take about as much memory as the hidden states. On a
    # GPU at least 2048 rows: every chunk's dW GEMM reads and writes the whole fp32 accumulator
    # (8 bytes per element against 6 * rows flops of the chunk's GEMMs), about 245 / rows of their
    # time on an H200 (H=4096, V=64000: 1.25x the bare GEMMs at 1024 rows, 1.22x at 2048, 1.15x
    # at 4096). 4096 rows would double the chunk's logits, the loss's one vocabulary-sized
    # transient, which 2048 caps at 2048 x V/TP whatever N is (docs/benchmarks.md).
    # A CPU has no tensor cores to hide behind and a few hundred rows amortise the accumulator,
    # but Liger's rule alone gives 4-row chunks at the tiny model's 256 x 32000 (the fp32 dW
    # update per chunk then costs 5x the whole step of the unfused loss). So on a CPU a chunk
    # holds at least 512 x 32000 logits (64 MiB in fp32) whatever the vocabulary: 256 rows at
    # V=57344, and the loss's memory does not grow with the vocabulary.
    rows = triton.next_power_of_2(-(-n * hidden_size // shard_vocab))
    if on_gpu:
        rows = max(rows, MIN_GPU_CHUNK_ROWS)
    else:
        floor = max(MIN_CPU_CHUNK_LOGITS // shard_vocab, 1)
        rows = max(rows, 1 << (floor.bit_length() - 1))  # a power of two, rounded down
    return max(1, min(n, rows))  # at least 1: N=0 must loop zero times


class _LogitsBuffer:
    """One chunk's logits, reused from chunk to chunk.

    Reusing it matters on a CPU, where a fresh tensor of this size is fresh memory from the
    operating system (page faults cost about as much as the arithmetic on it). On a GPU the
    caching allocator reuses memory anyway. Its rows are ``LOGITS_ROW_ALIGN``-aligned: a shard
    whose padding rows are left out has any number of classes (the vocabulary's own size at
    TP=1), and the GEMMs and row kernels keep aligned accesses only with an aligned row stride,
    which megatron's padding of the vocabulary was for.
    """

    def __init__(self, chunk: int, hidden: torch.Tensor, weight: torch.Tensor):
        width = -(-weight.shape[0] // LOGITS_ROW_ALIGN) * LOGITS_ROW_ALIGN
        shape = (min(chunk, hidden.shape[0]), width)
        self._logits = torch.empty(shape, dtype=hidden.dtype, device=hidden.device)

    def logits(self, hidden_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``hidden_rows @ weight.T`` in the reused buffer (a view of it, rows padded)."""
        out = self._logits[: hidden_rows.shape[0], : weight.shape[0]]
        return torch.mm(hidden_rows, weight.t(), out=out)


def _backprop_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    cfg: _Config,
) -> None:
    """Recompute each chunk's logits and accumulate dH (local to this shard) and fp32 dW.

    ``weight`` and ``grad_weight`` are the whole shard; its padding rows are left alone.
    """
    classes = weight[: cfg.shard_classes]
    grad_classes = None if grad_weight is None else grad_weight[: cfg.shard_classes]
    chunk = _chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.is_cuda)
    buffer = _LogitsBuffer(chunk, hidden, classes)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = buffer.logits(hidden[rows], classes)
        _logits_grad_(logits, target[rows], lse[rows], scale[rows], cfg)
        _apply_logits_grad(logits, hidden[rows], classes, grad_hidden, grad_classes, rows, False)


def _apply_logits_grad(
    dlogits: torch.Tensor,
    hidden_rows: torch.Tensor,
    weight: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    rows: slice,
    overwrite_grad_weight: bool,
) -> None:
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden[rows])
    if grad_weight is not None:
        accumulate_mm_fp32(grad_weight, dlogits.t(), hidden_rows, overwrite=overwrite_grad_weight)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Autograd function behind :func:`fused_linear_cross_entropy` (flattened inputs)."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        token_weight: torch.Tensor,
        cfg: _Config,
    ) -> torch.Tensor:
        """Loss; with mean/sum reduction also the gradients, kept until backward scales them."""
        n = hidden.shape[0]
        classes = weight[: cfg.shard_classes]
        if cfg.reduction == "mean":
            scale = token_weight / token_weight.sum().clamp_min(torch.finfo(torch.float32).tiny)
        else:
            scale = token_weight
        need_dh = ctx.needs_input_grad[0] and cfg.grad_enabled
        need_dw = ctx.needs_input_grad[1] and cfg.grad_enabled
        # fp16 needs the upstream gradient (a loss scale) applied before the logits' gradient is
        # rounded to it, or small probabilities underflow; so fp16 recomputes in backward, as
        # ``none`` does (bf16 has fp32's range).
        grads_now = (
            cfg.reduction != "none" and (need_dh or need_dw) and hidden.dtype != torch.float16
        )
        grad_hidden = _empty_rows_like(hidden) if grads_now and need_dh else None
        acc = _acc_dtype(hidden)
        grad_weight = None
        # Under megatron-core's DDP, dW goes straight into the fp32 ``main_grad`` (no private
        # V x H fp32 buffer); backward then only corrects for an upstream gradient other than 1.
        dw_in_main_grad = grads_now and need_dw and has_main_grad(weight)
        if dw_in_main_grad:
            grad_weight = weight.main_grad
        elif grads_now and need_dw:
            # Chunk 0 overwrites the classes' rows (saving a memset); with no tokens there is no
            # chunk 0, and padding rows are never written.
            make = torch.empty if n and len(classes) == len(weight) else torch.zeros
            grad_weight = make(weight.shape, dtype=acc, device=weight.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        loss = torch.empty(n, dtype=acc, device=hidden.device)
        # The whole shard's rows: every TP rank then has the same chunks (and collectives).
        chunk = _chunk_rows(n, hidden.shape[1], weight.shape[0], hidden.is_cuda)
        buffer = _LogitsBuffer(chunk, hidden, classes)
        grad_classes = None if grad_weight is None else grad_weight[: len(classes)]
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = buffer.logits(hidden[rows], classes)
            _chunk_loss_(logits, target[rows], scale[rows], grads_now, lse[rows], loss[rows], cfg)
            if grads_now:
                overwrite = start == 0 and not dw_in_main_grad
                _apply_logits_grad(
                    logits, hidden[rows], classes, grad_hidden, grad_classes, rows, overwrite
                )
        if grads_now:
            _reduce_grad_hidden(grad_hidden, cfg)
        # What recomputing the gradients takes (O(N) + O(N x H)): for ``none``, for an upstream
        # gradient other than 1 under DDP, and for a second backward (``retain_graph``).
        ctx.save_for_backward(hidden, weight, target, lse, scale)
        # Not saved tensors: the first backward scales them in place and hands them over.
        ctx.grad_hidden = grad_hidden
        ctx.grad_weight = None if dw_in_main_grad else grad_weight
        ctx.cfg, ctx.grads_now, ctx.dw_in_main_grad = cfg, grads_now, dw_in_main_grad
        # Selected, not multiplied: an ignored token's loss is 0 even where its hidden state is
        # not finite.
        if cfg.reduction == "none":
            return torch.where(token_weight != 0, loss * token_weight, 0.0)
        return torch.where(scale != 0, loss * scale, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Scale the gradients kept by forward, or recompute them chunk by chunk."""
        # The gradients depend on hidden and weight through kernels autograd cannot see, so a
        # second derivative (a gradient penalty) would silently lack their terms. Autograd runs
        # backward with grad mode on only under create_graph=True.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_linear_cross_entropy has no second derivative (backward with "
                "create_graph=True)"
            )
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hidden, weight, target, lse, scale = ctx.saved_tensors
        if ctx.grads_now:
            ctx.grads_now = False  # a second backward (retain_graph) recomputes
            grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
            ctx.grad_hidden = ctx.grad_weight = None
            # loss.backward() passes exactly 1: skip two passes over dW and dH then (reading the
            # scalar syncs, but backward of the loss starts right after the forward anyway). A
            # Python float keeps the factor exact where a tensor would be rounded to bf16 first.
            factor = grad_loss.item()
            if ctx.dw_in_main_grad:
                grad_weight = weight.main_grad
                if factor != 1.0:
                    # main_grad already holds dW (and other micro-batches' gradients): add
                    # (factor - 1) dW, recomputed. Loss scaling is the only common cause.
                    _backprop_chunks(
                        hidden, weight, target, lse, scale * (factor - 1.0), None, grad_weight,
                        ctx.cfg,
                    )  # fmt: skip
            elif factor != 1.0 and grad_weight is not None:
                grad_weight.mul_(factor)
            if factor != 1.0 and grad_hidden is not None:
                grad_hidden.mul_(factor)
        else:
            grad_hidden = _empty_rows_like(hidden) if need_dh else None
            grad_weight = weight_grad_buffer(weight) if need_dw else None
            scale = grad_loss.to(scale.dtype) * scale
            _backprop_chunks(hidden, weight, target, lse, scale, grad_hidden, grad_weight, ctx.cfg)
            _reduce_grad_hidden(grad_hidden, ctx.cfg)
        return (
            grad_hidden,
            finish_weight_grad(weight, grad_weight) if need_dw else None,
            None,
            None,
            None,
        )


def _empty_rows_like(hidden: torch.Tensor) -> torch.Tensor:
    # Contiguous, so that each chunk's rows are a valid ``out=`` for torch.mm.
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)


def _reduce_grad_hidden(grad_hidden: torch.Tensor | None, cfg: _Config) -> None:
    # Every rank holds the full hidden states but only its vocab shard's contribution to dH.
    if grad_hidden is not None and cfg.tp_group is not None:
        dist.all_reduce(grad_hidden, group=cfg.tp_group)


def shard_rows_in_vocab(shard_rows: int, rank: int, world: int, vocab_size: int) -> int:
    """How many leading rows of a TP rank's vocab shard are real ids, the rest being padding.

    Args:
        shard_rows: Rows of each rank's shard (megatron-core splits the padded vocabulary evenly).
        rank: This rank in the tensor-parallel group, whose shard starts at ``rank * shard_rows``.
        world: The group's size.
        vocab_size: The true vocabulary size.

    Raises:
        ValueError: ``vocab_size`` leaves the last rank's shard only padding (that rank would
            have no classes), or exceeds the padded vocabulary. Every rank raises alike, so
            none is left waiting in a collective.
    """
    if vocab_size > shard_rows * world:
        raise ValueError(
            f"a vocabulary of {vocab_size:,} ids does not fit in {world} x {shard_rows:,} rows"
        )
    if vocab_size <= (world - 1) * shard_rows:
        raise ValueError(
            f"a vocabulary of {vocab_size:,} ids leaves the last of {world} tensor-parallel "
            f"ranks ({shard_rows:,} rows each) only padding rows"
        )
    return min(shard_rows, vocab_size - rank * shard_rows)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    tp_group: dist.ProcessGroup | None = None,
    loss_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, never materialising the logits.

    See the module docstring for the exact loss, including how label smoothing, z-loss and
    soft-capping compose.

    Args:
        hidden: ``[N, H]`` hidden states (any leading shape with ``N`` elements), the same on every
            TP rank.
        weight: This rank's output-layer shard ``[V / TP, H]``, rows ``rank * V / TP`` onwards
            (megatron-core's even vocab split), same dtype as ``hidden``.
        labels: ``[N]`` global token ids (any shape with ``N`` elements).
        ignore_index: Label of tokens that get no loss and no gradient.
        label_smoothing: Megatron-core's smoothing factor in ``[0, 1)``.
        z_loss: Coefficient of the per-token ``lse^2`` penalty.
        softcap: If set, logits become ``softcap * tanh(logits / softcap)`` first.
        reduction: ``"none"`` (per-token losses shaped like ``labels``), ``"sum"`` or ``"mean"``
            (over non-ignored tokens, weighted by ``loss_mask``).
        tp_group: Tensor-parallel group the vocabulary is split over; None: megatron-core's TP
            group if ``parallel_state`` is initialised, else no parallelism.
        loss_mask: Optional per-token weights shaped like ``labels`` (e.g. megatron's loss mask).
        vocab_size: The vocabulary's true size when ``weight`` is padded past it (megatron pads
            it to a multiple of 128 x TP): rows from this global id on are no classes and get a
            zero gradient. None: every row is a class.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.

    Returns:
        The fp32 loss: a scalar, or per-token losses for ``reduction="none"``.

    Raises:
        ValueError: Bad arguments, labels that are not int64/int32, shapes that do not match,
            or a ``vocab_size`` that leaves the last rank's shard only padding; on CPU tensors
            also a label outside the vocabulary that is not ``ignore_index`` (CUDA: a
            device-side assertion).
        RuntimeError: In backward, under ``create_graph=True``: there is no second derivative.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    # Written so that NaN fails too.
    if softcap is not None and not 0 < softcap < math.inf:
        raise ValueError(f"softcap must be positive and finite, got {softcap}")
    if not 0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be at least 0 and finite, got {z_loss}")
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if weight.dim() != 2 or weight.shape[1] != hidden_2d.shape[1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)}"
        )
    for name, tensor in (("labels", labels), ("loss_mask", loss_mask)):
        if tensor is None:
            continue
        if tensor.numel() != hidden_2d.shape[0]:
            raise ValueError(
                f"{name} has {tensor.numel()} elements for {hidden_2d.shape[0]} hidden states"
            )
        # Same count, other layout: megatron's [b, s] labels against [s, b, H] hidden states.
        if tensor.dim() > 1 and tensor.shape != hidden.shape[:-1]:
            raise ValueError(
                f"{name} {tuple(tensor.shape)} does not match hidden {tuple(hidden.shape)}: "
                "give them the same leading shape (or flatten them)"
            )
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(
            f"hidden is {hidden.dtype} and weight {weight.dtype}: give both one floating-point type"
        )
    check_token_ids("labels", labels)

    group = resolve_tp_group(tp_group)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group else (0, 1)
    shard = weight.shape[0]
    vocab = shard * world if vocab_size is None else vocab_size
    shard_classes = shard_rows_in_vocab(shard, rank, world, vocab)
    if label_smoothing and vocab < 2:
        raise ValueError(f"label_smoothing needs at least 2 classes, the vocabulary has {vocab}")
    valid = flat_labels != ignore_index
    check_ids_in_vocab("labels", labels, vocab, ignore_index)
    local = flat_labels - rank * shard
    target = torch.where(valid & (local >= 0) & (local < shard), local, -1)
    token_weight = valid.to(_acc_dtype(hidden))
    if loss_mask is not None:
        token_weight = token_weight * loss_mask.reshape(-1).to(token_weight.dtype)
    cfg = _Config(
        z_loss=z_loss,
        softcap=softcap,
        smoothing=label_smoothing * vocab / (vocab - 1) if label_smoothing else 0.0,
        vocab_size=vocab,
        shard_classes=shard_classes,
        reduction=reduction,
        tp_group=group,
        triton=use_triton(hidden, backend),
        grad_enabled=torch.is_grad_enabled(),
    )
    loss = FusedLinearCrossEntropy.apply(hidden_2d, weight, target, token_weight, cfg)
    return loss.view(labels.shape) if reduction == "none" else loss
