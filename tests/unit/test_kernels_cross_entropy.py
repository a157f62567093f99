"""Fused linear cross-entropy against plain PyTorch autograd on materialised logits (TP=1).

Multi-rank agreement with megatron-core's vocab_parallel_cross_entropy is in
tests/integration/test_kernels_tp.py.
"""

import random
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F  # noqa: N812 - the universal alias

import kernels.cross_entropy as ce
from kernels.cross_entropy import fused_linear_cross_entropy
from tests.helpers import CPU_TENSOR_BACKENDS, DEVICE, REPO, aliases_main_grad

# On a GPU machine the same tests run the compiled kernels on CUDA tensors.
# On a machine without CUDA the Triton cases run in Triton's interpreter (see tests/conftest.py).
TRITON = pytest.mark.triton_interpreter
BACKENDS = ["torch", pytest.param("triton", marks=TRITON)]
# (label_smoothing, z_loss, softcap)
FEATURES = [(0.0, 0.0, None), (0.1, 0.0, None), (0.0, 1e-3, None), (0.1, 1e-3, 3.0)]


@pytest.fixture(autouse=True)
def small_blocks_and_chunks(monkeypatch):
    # 64-wide blocks, so V=203 spans four blocks, the last one partial: the online
    # log-sum-exp and the masked tail are exercised, not a single-block special case. Token
    # chunks follow the size rule alone (a few rows here), without the CPU and GPU floors.
    monkeypatch.setattr(ce, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(ce, "MIN_GPU_CHUNK_ROWS", 1)
    monkeypatch.setattr(ce, "MIN_CPU_CHUNK_LOGITS", 1)


def unfused_loss(
    hidden,
    weight,
    labels,
    *,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    reduction="mean",
    ignore_index=-100,
    loss_mask=None,
):
    """The loss on materialised fp32 logits with torch's own ops, as a user would write it."""
    logits = hidden.float() @ weight.float().t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    vocab = weight.shape[0]
    # megatron-core's smoothing convention is torch's with eps * V / (V - 1).
    eps = label_smoothing * vocab / (vocab - 1)
    loss = F.cross_entropy(
        logits, labels, reduction="none", label_smoothing=eps, ignore_index=ignore_index
    )
    valid = (labels != ignore_index).float()
    loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    weights = valid if loss_mask is None else valid * loss_mask.float()
    if reduction == "none":
        return loss * weights
    if reduction == "sum":
        return (loss * weights).sum()
    # No token counts: 0, the documented convention (0 / 0 would be nan).
    return (loss * weights).sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)


def make_inputs(n, h, v, dtype=torch.float32, seed=0, ignore_every=5):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE)


def loss_and_grads(fn, hidden, weight, labels, upstream=None, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, labels, **kwargs)
    grad = torch.ones_like(loss) if upstream is None else upstream
    loss.backward(grad)
    return loss.detach(), hidden.grad, weight.grad


def assert_close(actual, expected, atol, rtol):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.float(), e.float(), atol=atol, rtol=rtol)


TWO_ROW_KERNELS = pytest.param("triton-two-row-kernels", marks=TRITON)


@pytest.mark.parametrize("backend", [*BACKENDS, TWO_ROW_KERNELS])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("features", FEATURES, ids=["plain", "smooth", "zloss", "all"])
def test_matches_unfused_autograd_fp32(monkeypatch, backend, reduction, features):
    if backend == "triton-two-row-kernels":
        # What TP>1 runs (statistics, then gradient) and the benchmarks compare against.
        monkeypatch.setattr(ce, "ONE_ROW_KERNEL_WITHOUT_TP", False)
        backend = "triton"
    smoothing, z_loss, softcap = features
    hidden, weight, labels = make_inputs(37, 16, 203)
    opts = dict(label_smoothing=smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction)
    # A non-trivial upstream gradient: per-token for "none", a scalar != 1 otherwise.
    upstream = (torch.randn(37) if reduction == "none" else torch.tensor(1.7)).to(DEVICE)
    got = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, labels, upstream, backend=backend, **opts
    )
    want = loss_and_grads(unfused_loss, hidden, weight, labels, upstream, **opts)
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[0].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_loss_mask(backend):
    hidden, weight, labels = make_inputs(1, 8, 203, ignore_every=0)
    got = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, backend=backend)
    want = loss_and_grads(unfused_loss, hidden, weight, labels)
    assert_close(got, want, atol=1e-5, rtol=1e-5)

    hidden, weight, labels = make_inputs(16, 8, 203)
    mask = torch.rand(16, generator=torch.Generator().manual_seed(3)).round().to(DEVICE)
    got = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, labels, backend=backend, loss_mask=mask
    )
    want = loss_and_grads(unfused_loss, hidden, weight, labels, loss_mask=mask)
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def random_case(seed):
    """Shapes, dtypes and options drawn from a seed: the combinations no other test spells out."""
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    lead = rng.choice([(1,), (2,), (37,), (37,), (3, 5), (4, 1, 3)])
    h, v = rng.choice([1, 5, 16, 17, 48]), rng.choice([2, 3, 33, 64, 129])
    options = dict(
        ignore_index=rng.choice([-100, -1, 0]),  # 0: a real id, ignored
        label_smoothing=rng.choice([0.0, 0.1, 0.5]),
        z_loss=rng.choice([0.0, 1e-2]),
        softcap=rng.choice([None, 2.0, 30.0]),
        reduction=rng.choice(["none", "sum", "mean"]),
    )
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, h, generator=gen) * rng.choice([0.1, 1.0, 3.0])
    weight = torch.randn(v, h, generator=gen) / h**0.5
    labels = torch.randint(0, v, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < 0.2] = options["ignore_index"]
    if rng.random() < 0.4:  # 0/1 as megatron's loss mask, or fractional weights
        mask = torch.rand(lead, generator=gen)
        options["loss_mask"] = (mask if rng.random() < 0.5 else (mask < 0.7).float()).to(DEVICE)
    # Same values, other strides.
    if rng.random() < 0.3 and hidden.dim() > 2:
        hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    column_major_weight = rng.random() < 0.3
    upstream = torch.randn(lead, generator=gen) if options["reduction"] == "none" else None
    grads = rng.choice([(True, True), (True, False), (False, True)])
    padding = rng.choice([0, 0, 1, 7])  # megatron's padding rows: no classes
    if padding:
        options["vocab_size"] = v
        weight = torch.cat([weight, torch.randn(padding, h, generator=gen)])
    if column_major_weight:
        weight = weight.t().contiguous().t()
    hidden, weight = hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype)
    return hidden, weight, labels.to(DEVICE), upstream, grads, options


# Loss and gradients against fp32 math on the same values, as a fraction of the largest
# reference value: half-precision logits carry an absolute rounding error that grows with their
# magnitude (hidden states up to 3x larger here than elsewhere) and a sum over 37 tokens adds 37
# of them. Per-element relative error would fail near-zero gradients for no fault of the kernel.
RANDOM_CASE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def assert_close_at_scale(actual, expected, tol):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, atol=tol * max(scale, 1.0), rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(24))
def test_random_cases_match_unfused(backend, seed):
    hidden, weight, labels, upstream, grads, options = random_case(seed)
    hidden.requires_grad_(grads[0])
    weight.requires_grad_(grads[1])
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend, **options)
    assert loss.dtype == torch.float32
    assert loss.shape == (labels.shape if options["reduction"] == "none" else ())
    ref_hidden = hidden.detach().float().requires_grad_(grads[0])
    ref_weight = weight.detach().float().requires_grad_(grads[1])
    mask = options.pop("loss_mask", None)
    vocab = options.pop("vocab_size", weight.shape[0])
    ref_loss = unfused_loss(
        ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        ref_weight[:vocab],
        labels.flatten(),
        loss_mask=None if mask is None else mask.flatten(),
        **options,
    )
    ref_loss = ref_loss.view(loss.shape)
    upstream = (torch.tensor(1.7) if upstream is None else upstream).to(DEVICE)
    loss.backward(upstream)
    ref_loss.backward(upstream)
    tol = RANDOM_CASE_TOLERANCE[hidden.dtype]
    assert_close_at_scale(loss, ref_loss.detach(), tol)
    for mine, ref in ((hidden, ref_hidden), (weight, ref_weight)):
        assert (mine.grad is not None) == mine.requires_grad
        if mine.requires_grad:
            assert mine.grad.dtype == mine.dtype
            assert_close_at_scale(mine.grad.float(), ref.grad, tol)
    if weight.requires_grad:
        assert not weight.grad[vocab:].any()  # padding rows: exactly no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_documented_tolerance(backend):
    """bf16 inputs: loss within 2e-2 and gradients within 2e-2 of fp32 math on the same values.

    The tolerance covers bf16 logits (8 bits of mantissa, |z| ~ 4 here) and bf16 gradients;
    accumulation itself is fp32.
    """
    hidden, weight, labels = make_inputs(64, 32, 203, dtype=torch.bfloat16)
    got = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, labels, backend=backend, label_smoothing=0.1
    )
    want = loss_and_grads(unfused_loss, hidden.float(), weight.float(), labels, label_smoothing=0.1)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_rounded_weight_gradient_accumulation(monkeypatch):
    """The fallback for a torch without fp32-output GEMMs: one bf16 rounding of each product."""
    from kernels import _common

    monkeypatch.setattr(_common, "ROUNDED_BLOCK_ROWS", 3)  # 7 rows: blocks of 3, 3 and 1
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 64, generator=gen).bfloat16()
    b = torch.randn(64, 5, generator=gen).bfloat16()
    exact = a.double() @ b.double()
    acc = torch.randn(7, 5, generator=gen)
    start = acc.clone()
    _common.accumulate_mm_rounded(acc, a, b)
    # bf16 keeps 8 significant bits: rounding moves a value by at most 2^-8 of itself.
    bound = 2.0**-8 * exact.abs() + 1e-5 * (start.double().abs() + exact.abs())
    assert ((acc.double() - start.double() - exact).abs() <= bound).all()
    _common.accumulate_mm_rounded(acc.fill_(float("nan")), a, b, overwrite=True)
    assert ((acc.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-6).all()


def test_weight_gradient_products_of_bf16_are_not_rounded():
    """(1 + 2^-7)^2 = 1 + 2^-6 + 2^-14 needs 15 bits: fp32 keeps the 2^-14, bf16 would not.

    On CUDA this is cuBLAS's fp32-output GEMM, on a CPU the upcast operands.
    """
    from kernels._common import accumulate_mm_fp32

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if DEVICE == "cuda" and (major, minor) < (2, 8):
        pytest.skip(f"torch {torch.__version__} has no fp32-output GEMM (the rounded fallback)")
    a = torch.full((4, 1), 1 + 2.0**-7, dtype=torch.bfloat16, device=DEVICE)
    acc = torch.zeros(4, 4, device=DEVICE)
    accumulate_mm_fp32(acc, a, a.t())
    assert (acc == 1 + 2.0**-6 + 2.0**-14).all(), acc


def test_bf16_loss_within_tolerance_with_rounded_weight_gradients(monkeypatch):
    """With the fallback in place of the fp32-output GEMM, bf16 stays within its tolerance."""
    from kernels import _common

    monkeypatch.setattr(ce, "accumulate_mm_fp32", _common.accumulate_mm_rounded)
    hidden, weight, labels = make_inputs(64, 32, 203, dtype=torch.bfloat16)
    got = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, backend="torch")
    want = loss_and_grads(unfused_loss, hidden.float(), weight.float(), labels)
    assert_close(got, want, atol=2e-2, rtol=2e-2)


@TRITON
def test_bf16_triton_matches_reference():
    hidden, weight, labels = make_inputs(64, 32, 203, dtype=torch.bfloat16)
    got = loss_and_grads(
        fused_linear_cross_entropy,
        hidden,
        weight,
        labels,
        backend="triton",
        z_loss=1e-3,
        softcap=3.0,
        reduction="none",
    )
    want = loss_and_grads(
        fused_linear_cross_entropy,
        hidden,
        weight,
        labels,
        backend="torch",
        z_loss=1e-3,
        softcap=3.0,
        reduction="none",
    )
    # Same algorithm, same bf16 roundings; only exp/tanh implementations differ.
    assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("features", FEATURES, ids=["plain", "smooth", "zloss", "all"])
def test_reference_gradcheck_float64(reduction, features):
    smoothing, z_loss, softcap = features
    hidden, weight, labels = (t.cpu() for t in make_inputs(6, 3, 7, dtype=torch.float64))
    hidden.requires_grad_()
    weight.requires_grad_()

    def fn(h, w):
        return fused_linear_cross_entropy(
            h,
            w,
            labels,
            label_smoothing=smoothing,
            z_loss=z_loss,
            softcap=softcap,
            reduction=reduction,
            backend="torch",
        )

    # gradcheck runs backward twice: the second recomputes what the first got from the forward
    # pass, in another order of operations (the same values to rounding).
    assert torch.autograd.gradcheck(fn, (hidden, weight), nondet_tol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_mean_is_zero_with_zero_grads(backend):
    hidden, weight, _ = make_inputs(4, 8, 203)
    labels = torch.full((4,), -100, device=DEVICE)
    loss, dh, dw = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, labels, backend=backend
    )
    assert loss.item() == 0.0
    assert not dh.any() and not dw.any()

    # An empty micro-batch behaves the same way.
    loss, dh, dw = loss_and_grads(
        fused_linear_cross_entropy, hidden[:0], weight, labels[:0], backend=backend
    )
    assert loss.item() == 0.0 and dh.shape == (0, 8) and not dw.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_reproducible(backend):
    hidden, weight, labels = make_inputs(64, 32, 203, dtype=torch.bfloat16)
    first = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, backend=backend)
    second = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, backend=backend)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_frozen_output_layer_gets_no_weight_gradient():
    hidden, weight, labels = make_inputs(8, 8, 203)
    hidden.requires_grad_()
    fused_linear_cross_entropy(hidden, weight, labels).backward()
    want = loss_and_grads(unfused_loss, hidden, weight, labels)[1]
    torch.testing.assert_close(hidden.grad, want, atol=1e-6, rtol=1e-5)
    assert weight.grad is None


@pytest.mark.parametrize("padding", [0, 5])
@pytest.mark.parametrize("factor", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_accumulates_into_megatron_main_grad(reduction, factor, padding):
    """Under megatron-core's DDP the fp32 gradient is added to ``main_grad``.

    On the mean/sum path it is added during the forward pass; an upstream gradient other than 1
    (loss scaling) is then corrected for in backward. Padding rows' ``main_grad`` is untouched.
    """
    hidden, weight, labels = make_inputs(8, 8, 203 + padding, dtype=torch.bfloat16)
    vocab = 203
    labels = labels.where(labels < vocab, labels - vocab)
    weight.requires_grad_()
    weight.main_grad = torch.randn(weight.shape, device=DEVICE)
    weight.grad_added_to_main_grad = False
    before = weight.main_grad.clone()
    opts = dict(reduction=reduction, vocab_size=vocab)
    with torch.no_grad():
        fused_linear_cross_entropy(hidden, weight, labels, **opts)
    assert torch.equal(weight.main_grad, before)  # no gradients asked for: nothing added
    loss = fused_linear_cross_entropy(hidden, weight, labels, **opts)
    (loss.sum() * factor).backward()
    expected = loss_and_grads(
        unfused_loss, hidden.float(), weight[:vocab].float(), labels, reduction=reduction
    )[2]
    assert weight.grad_added_to_main_grad
    assert aliases_main_grad(weight)  # DDP's hook drops it; it costs no memory
    torch.testing.assert_close(
        weight.main_grad[:vocab] - before[:vocab], factor * expected, atol=1e-2 * factor, rtol=1e-2
    )
    assert torch.equal(weight.main_grad[vocab:], before[vocab:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("main_grad", [False, True], ids=["grad", "main-grad"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_backward_adds_the_gradients_again(backend, main_grad, reduction):
    """``retain_graph``: two backwards add twice the gradients, as autograd on the logits does.

    The mean/sum path hands its forward-computed gradients to the first backward (under DDP
    already added to ``main_grad``), so the second has to recompute them.
    """
    hidden, weight, labels = make_inputs(9, 8, 203)
    hidden.requires_grad_()
    weight.requires_grad_()
    if main_grad:
        weight.main_grad = torch.zeros(weight.shape, device=DEVICE)
        weight.grad_added_to_main_grad = False
        # As megatron-core's DDP does after each accumulation: .grad (our placeholder) dropped.
        weight.register_post_accumulate_grad_hook(lambda param: setattr(param, "grad", None))
    loss = fused_linear_cross_entropy(
        hidden, weight, labels, reduction=reduction, z_loss=1e-3, backend=backend
    )
    (loss.sum() * 3.7).backward(retain_graph=True)
    (loss.sum() * 1.5).backward()
    _, want_h, want_w = loss_and_grads(
        unfused_loss, hidden, weight, labels, reduction=reduction, z_loss=1e-3
    )
    torch.testing.assert_close(hidden.grad, 5.2 * want_h, atol=1e-5, rtol=1e-5)
    got_w = weight.main_grad if main_grad else weight.grad
    torch.testing.assert_close(got_w, 5.2 * want_w, atol=1e-5, rtol=1e-5)


def test_fp16_gradients_keep_the_loss_scale(monkeypatch):
    """fp16 with a loss scale: gradients as accurate as megatron-core's unfused fp16 path.

    That path rounds the logits' gradient to fp16 after the loss scale; rounding it before
    (``scale / N``-sized values, below fp16's normal range) loses the small probabilities. The
    reference is the same fp16 inputs' loss in fp64. Which path fp16 takes is decided above the
    backends, so the PyTorch one shows it (2,048 rows take Triton's interpreter two minutes);
    the fp16 tolerance of the Triton kernels is held to the same reference by the random cases.
    """
    monkeypatch.setattr(ce, "MIN_CPU_CHUNK_LOGITS", 512 * 32000)  # one chunk
    n, loss_scale = 2048, 2.0**16
    hidden, weight, labels = make_inputs(n, 64, 512, dtype=torch.float16, ignore_every=0)
    exact = loss_and_grads(unfused_loss, hidden.double(), weight.double(), labels.cpu())

    def relative_errors(fn, **kwargs):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        (fn(h, w, labels, **kwargs) * loss_scale).backward()
        return [
            ((got.double().cpu() / loss_scale - want).norm() / want.norm()).item()
            for got, want in ((h.grad, exact[1]), (w.grad, exact[2]))
        ]

    def megatron_fp16(h, w, labels):
        return F.cross_entropy((h @ w.t()).float(), labels)

    fused = relative_errors(fused_linear_cross_entropy, backend="torch")
    unfused = relative_errors(megatron_fp16)
    for name, ours, theirs in zip(("dH", "dW"), fused, unfused, strict=True):
        assert ours <= 1.2 * theirs, f"{name}: {ours:.2e} against megatron-style {theirs:.2e}"


def test_float64_runs_the_reference():
    """The Triton kernels compute in fp32: float64 goes to the PyTorch path, or is refused."""
    hidden, weight, labels = make_inputs(4, 8, 16, dtype=torch.float64)
    hidden.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h: fused_linear_cross_entropy(h, weight, labels, backend="auto"),
        (hidden,),
        nondet_tol=1e-12,  # as in test_reference_gradcheck_float64
    )
    with pytest.raises(ValueError, match="use backend='torch' for float64"):
        fused_linear_cross_entropy(hidden, weight, labels, backend="triton")


def test_rejects_bad_arguments():
    hidden, weight, labels = make_inputs(4, 8, 16)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_cross_entropy(hidden, weight, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="label_smoothing needs at least 2 classes"):
        fused_linear_cross_entropy(hidden, weight[:1], labels.clamp(max=0), label_smoothing=0.1)
    with pytest.raises(ValueError, match="does not match"):
        fused_linear_cross_entropy(hidden, weight[:, :4], labels)
    # Megatron's labels are [b, s] where the hidden states are [s, b, H]: refused, not misread.
    hidden_sbh = hidden.reshape(4, 1, -1)
    fused_linear_cross_entropy(hidden_sbh, weight, labels.reshape(4, 1))
    fused_linear_cross_entropy(hidden_sbh, weight, labels)  # flat labels: taken in order
    with pytest.raises(ValueError, match=r"labels \(1, 4\) does not match hidden \(4, 1, 8\)"):
        fused_linear_cross_entropy(hidden_sbh, weight, labels.reshape(1, 4))
    with pytest.raises(ValueError, match="labels has 3 elements for 4 hidden states"):
        fused_linear_cross_entropy(hidden, weight, labels[:3])
    # A one-element mask would broadcast to every token.
    with pytest.raises(ValueError, match="loss_mask has 1 elements for 4 hidden states"):
        fused_linear_cross_entropy(hidden, weight, labels, loss_mask=torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="labels must be an int64 or int32 tensor.*float32"):
        fused_linear_cross_entropy(hidden, weight, labels.float())
    # A negative z-loss would reward large logits; NaN or infinity would make every loss NaN.
    for bad in (-1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="z_loss must be at least 0"):
            fused_linear_cross_entropy(hidden, weight, labels, z_loss=bad)
        with pytest.raises(ValueError, match="softcap must be positive"):
            fused_linear_cross_entropy(hidden, weight, labels, softcap=bad)
    with pytest.raises(ValueError, match="give both one floating-point type"):
        fused_linear_cross_entropy(hidden.long(), weight.long(), labels)
    with pytest.raises(ValueError, match="a vocabulary of 17 ids does not fit in 1 x 16 rows"):
        fused_linear_cross_entropy(hidden, weight, labels, vocab_size=17)
    with pytest.raises(ValueError, match="leaves the last of 1 tensor-parallel ranks"):
        fused_linear_cross_entropy(hidden, weight, labels, vocab_size=0)


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("bad", [16, 1000, -1])
def test_rejects_labels_outside_the_vocabulary(backend, bad):
    """No shard holds them: megatron-core's loss would use a target logit of 0 without a word.

    On CPU tensors, where the check raises at once (CUDA's is a device-side assertion, which
    would end the test process).
    """
    hidden, weight, labels = (t.cpu() for t in make_inputs(6, 8, 16))
    labels = labels.reshape(2, 3)
    assert labels[0, 0] == -100  # ignored: never out of range
    fused_linear_cross_entropy(hidden, weight, labels.flatten(), backend=backend)
    labels[1, 2] = bad
    with pytest.raises(
        ValueError, match=rf"labels\[1, 2\] = {bad} is outside the vocabulary \[0, 16\)"
    ):
        fused_linear_cross_entropy(hidden.reshape(2, 3, 8), weight, labels, backend=backend)
    # A padding row is no class either.
    labels = labels.where(labels < 12, 0)
    labels[1, 2] = 12
    with pytest.raises(
        ValueError, match=r"labels\[1, 2\] = 12 is outside the vocabulary \[0, 12\)"
    ):
        fused_linear_cross_entropy(hidden.reshape(2, 3, 8), weight, labels, vocab_size=12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-side check needs CUDA")
def test_cuda_labels_outside_the_vocabulary_fail_the_next_synchronisation():
    """In a child process: a failed device-side assertion leaves CUDA unusable afterwards."""
    script = """
import torch
from kernels.cross_entropy import fused_linear_cross_entropy
hidden = torch.randn(6, 8, device="cuda")
weight = torch.randn(16, 8, device="cuda")
labels = torch.full((6,), 3, device="cuda")
fused_linear_cross_entropy(hidden, weight, labels)
torch.cuda.synchronize()
print("in range: fine", flush=True)
labels[4] = 16
fused_linear_cross_entropy(hidden, weight, labels)
torch.cuda.synchronize()
"""
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert "in range: fine" in child.stdout, child.stderr[-2000:]
    assert child.returncode != 0
    assert "device-side assert" in child.stderr or "outside the vocabulary" in child.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_derivative_is_refused(backend):
    """A gradient penalty (create_graph=True) silently got no second-order term."""
    hidden, weight, labels = make_inputs(6, 8, 16)
    hidden.requires_grad_()
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        torch.autograd.grad(loss, hidden, create_graph=True)
    torch.autograd.grad(loss, hidden)  # the first derivative, as always


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_that_are_zero_stay_zero_at_extreme_values(backend):
    """As F.cross_entropy: an ignored token's loss is 0 whatever its hidden state, and a z-loss
    of 0 adds nothing even where lse^2 overflows (0 x inf was NaN)."""
    weight = torch.tensor([[1.0, 0.0], [0.5, 0.0]], device=DEVICE)
    hidden = torch.tensor([[1.0, 2.0], [float("inf"), 0.0], [1e20, 0.0]], device=DEVICE)
    labels = torch.tensor([1, -100, 0], device=DEVICE)
    losses = fused_linear_cross_entropy(hidden, weight, labels, reduction="none", backend=backend)
    expected = F.cross_entropy(hidden @ weight.t(), labels, reduction="none")
    torch.testing.assert_close(losses, expected)
    mean = fused_linear_cross_entropy(hidden, weight, labels, backend=backend)
    torch.testing.assert_close(mean, F.cross_entropy(hidden @ weight.t(), labels))
