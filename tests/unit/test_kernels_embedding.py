"""Vocab-parallel embedding (one shard, no communication) against F.embedding + masking.

Without a process group a shard starting at id 0 is the whole vocabulary, so the shard cases
start elsewhere (ids below, in and above it then belong to other ranks).

Agreement with megatron-core's VocabParallelEmbedding at TP=1 and TP=2 is in
tests/integration/test_kernels_tp.py.
"""

import random

import pytest
import torch
from torch.nn import functional as F  # noqa: N812 - the universal alias

from kernels.embedding import vocab_parallel_embedding
from tests.helpers import CPU_TENSOR_BACKENDS, DEVICE, aliases_main_grad

# On a GPU machine the same tests run the compiled kernels on CUDA tensors.
# On a machine without CUDA the Triton cases run in Triton's interpreter (see tests/conftest.py).
TRITON = pytest.mark.triton_interpreter
BACKENDS = ["torch", pytest.param("triton", marks=TRITON)]


def shard_reference(ids, weight, vocab_start, trainable_rows=None):
    """What megatron-core does for one shard, written with plain autograd ops."""
    rows = ids - vocab_start
    hit = (rows >= 0) & (rows < weight.shape[0])
    if trainable_rows is not None:
        # Rows outside the range keep their values but are cut off from the graph.
        start, end = (r - vocab_start for r in trainable_rows)
        row_ids = torch.arange(weight.shape[0], device=weight.device)[:, None]
        trainable = (row_ids >= start) & (row_ids < end)
        weight = torch.where(trainable, weight, weight.detach())
    return F.embedding(rows.where(hit, 0), weight) * hit[..., None]


def make_inputs(shape, vocab, hidden, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, 2 * vocab, shape, generator=gen)
    ids.view(-1)[: ids.numel() // 2] = vocab + 3  # a hot row: many tokens sum into it
    return ids.to(DEVICE), weight.to(DEVICE)


def lookup_and_grad(fn, ids, weight, upstream, **kwargs):
    weight = weight.detach().clone().requires_grad_()
    out = fn(ids, weight, **kwargs)
    out.backward(upstream)
    return out.detach(), weight.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 7), (1,), (0,)], ids=["batch", "one-token", "empty"])
@pytest.mark.parametrize("vocab_start", [37, 74])
def test_matches_masked_f_embedding(backend, shape, vocab_start):
    ids, weight = make_inputs(shape, 37, 20)
    upstream = torch.randn(*shape, 20, device=DEVICE)
    got = lookup_and_grad(
        vocab_parallel_embedding, ids, weight, upstream, vocab_start=vocab_start, backend=backend
    )
    want = lookup_and_grad(shard_reference, ids, weight, upstream, vocab_start=vocab_start)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(16))
def test_random_cases_match_masked_f_embedding(backend, seed):
    """Shapes, dtypes, strides and trainable ranges drawn from a seed.

    Rows wider than one forward tile (256 columns), fp16, a column-strided weight, and trainable
    ranges that start before, end after or miss this shard.
    """
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    shape = rng.choice([(1,), (5,), (3, 7), (2, 3, 4)])
    vocab, hidden = rng.choice([1, 3, 37]), rng.choice([1, 7, 64, 300])
    vocab_start = rng.choice([5, 40])
    ids, weight = make_inputs(shape, vocab, hidden, dtype=dtype, seed=seed)
    ids = ids + vocab_start - vocab // 2  # some ids below, in and above the shard
    if rng.random() < 0.5:
        weight = weight.t().contiguous().t()
    trainable = None
    if rng.random() < 0.5:
        bounds = sorted(rng.randint(vocab_start - 3, vocab_start + vocab + 3) for _ in range(2))
        trainable = tuple(bounds)
    upstream = torch.randn(*shape, hidden, device=DEVICE).to(dtype)
    kwargs = dict(vocab_start=vocab_start, trainable_rows=trainable)
    got = lookup_and_grad(
        vocab_parallel_embedding, ids, weight, upstream, backend=backend, **kwargs
    )
    # The reference in fp32: exact row sums of the half-precision upstream values.
    want = lookup_and_grad(shard_reference, ids, weight.float(), upstream.float(), **kwargs)
    torch.testing.assert_close(got[0].float(), want[0], atol=0, rtol=0)
    # Each row's sum is accumulated in fp32 and rounded once: within one ulp of the dtype.
    ulp = {torch.float32: 2**-20, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(got[1].float(), want[1], atol=1e-6, rtol=ulp)
    assert got[1].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradient_accumulates_in_fp32(backend):
    """64 tokens hit one bf16 row: fp32 accumulation then one rounding stays within 1 bf16 ulp.

    (1 ulp, not half: Triton's CPU interpreter truncates on casts to bf16 where GPUs round to
    nearest.)
    """
    ids = torch.full((64,), 3, device=DEVICE)
    weight = torch.randn(8, 16, dtype=torch.bfloat16, device=DEVICE)
    upstream = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    upstream = upstream.to(DEVICE)
    out, grad = lookup_and_grad(vocab_parallel_embedding, ids, weight, upstream, backend=backend)
    exact = upstream.double().sum(0)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad[3].double(), exact, atol=0, rtol=2**-7)
    assert torch.equal(out, weight[3].expand(64, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_rows_freeze_the_others_exactly(backend):
    ids, weight = make_inputs((4, 9), 40, 12)
    upstream = torch.randn(4, 9, 12, device=DEVICE)
    trainable = (50, 70)  # global ids; this shard holds 40..79
    _, grad = lookup_and_grad(
        vocab_parallel_embedding,
        ids,
        weight,
        upstream,
        vocab_start=40,
        trainable_rows=trainable,
        backend=backend,
    )
    _, want = lookup_and_grad(
        shard_reference, ids, weight, upstream, vocab_start=40, trainable_rows=trainable
    )
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)
    frozen = torch.ones(40, dtype=torch.bool, device=DEVICE)
    frozen[10:30] = False
    assert torch.count_nonzero(grad[frozen]) == 0
    assert torch.count_nonzero(grad[~frozen]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_runs_bitwise_identical(backend):
    ids, weight = make_inputs((8, 64), 16, 24, dtype=torch.bfloat16)
    ids %= 16  # the whole vocabulary, with its hot row
    upstream = torch.randn(8, 64, 24, device=DEVICE).bfloat16()
    first = lookup_and_grad(vocab_parallel_embedding, ids, weight, upstream, backend=backend)
    second = lookup_and_grad(vocab_parallel_embedding, ids, weight, upstream, backend=backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_main_grad_touches_only_occurring_rows(backend):
    ids = torch.tensor([[1, 5, 5, 9]], device=DEVICE)
    weight = torch.randn(12, 8, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    weight.main_grad = torch.randn(12, 8, device=DEVICE)
    weight.grad_added_to_main_grad = False
    before = weight.main_grad.clone()
    upstream = torch.randn(1, 4, 8, device=DEVICE)
    vocab_parallel_embedding(ids, weight, backend=backend).backward(upstream.bfloat16())
    assert weight.grad_added_to_main_grad
    assert aliases_main_grad(weight)  # DDP's hook drops it; it costs no memory
    untouched = torch.ones(12, dtype=torch.bool, device=DEVICE)
    untouched[[1, 5, 9]] = False
    assert torch.equal(weight.main_grad[untouched], before[untouched])
    added = weight.main_grad - before
    expected = torch.zeros(12, 8, device=DEVICE)
    expected.index_add_(0, ids[0], upstream[0].bfloat16().float())
    torch.testing.assert_close(added, expected, atol=1e-6, rtol=1e-6)


def test_reference_gradcheck_float64():
    ids = torch.tensor([[0, 3, 3, 7, 9]])
    weight = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)

    def fn(w):
        return vocab_parallel_embedding(
            ids, w, vocab_start=2, trainable_rows=(3, 8), backend="torch"
        )

    assert torch.autograd.gradcheck(fn, (weight,))


@pytest.mark.parametrize("backend", CPU_TENSOR_BACKENDS)
@pytest.mark.parametrize("bad", [8, 1000, -1])
def test_rejects_ids_outside_the_vocabulary(backend, bad):
    """Without a process group a shard from id 0 is the whole vocabulary; no rank holds others.

    megatron-core's layer fails on them at TP=1 (``F.embedding``'s IndexError); the kernels
    would give them a zero row. CPU tensors only: CUDA ones are left to the loss's check.
    """
    weight = torch.randn(8, 4)
    ids = torch.tensor([[1, 0, 7], [2, 3, 4]])
    vocab_parallel_embedding(ids, weight, backend=backend)
    ids[1, 2] = bad
    with pytest.raises(
        ValueError, match=rf"ids\[1, 2\] = {bad} is outside the vocabulary \[0, 8\)"
    ):
        vocab_parallel_embedding(ids, weight, backend=backend)
    # A shard from another id on: the caller's own split, others' ids are theirs (zero rows).
    assert not vocab_parallel_embedding(ids, weight, vocab_start=2000, backend=backend).any()


def test_rejects_a_trainable_range_that_ends_before_it_starts():
    """(40000, 32000) for (32000, 40000) would otherwise train no row at all, silently."""
    weight = torch.randn(8, 4, device=DEVICE)
    ids = torch.tensor([[1, 0]], device=DEVICE)
    vocab_parallel_embedding(ids, weight, trainable_rows=(4, 4))  # empty: no row trains
    with pytest.raises(ValueError, match=r"trainable_rows \(6, 4\): start is above end"):
        vocab_parallel_embedding(ids, weight, trainable_rows=(6, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.uint8])
def test_rejects_ids_that_are_not_int64_or_int32(backend, dtype):
    """As F.embedding does; the Triton path would truncate 1.7 to row 1, uint8 would wrap."""
    weight = torch.randn(8, 4, device=DEVICE)
    ids = torch.tensor([[1, 0]], device=DEVICE)
    vocab_parallel_embedding(ids.int(), weight, backend=backend)
    with pytest.raises(ValueError, match=f"ids must be an int64 or int32 tensor.*{dtype}"):
        vocab_parallel_embedding(ids.to(dtype), weight, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_row_stays_in_its_row(backend):
    """Another shard's ids get exact zeros, as megatron-core assigns them: the mask used to
    multiply row 0, so its NaN reached every token of the other ranks through the all-reduce."""
    weight = torch.randn(11, 8, device=DEVICE)
    weight[0] = float("nan")
    ids = torch.tensor([105, 200, 3], device=DEVICE)
    out = vocab_parallel_embedding(ids, weight, vocab_start=100, backend=backend)
    torch.testing.assert_close(out[0], weight[5], rtol=0, atol=0)
    assert not out[1:].any() and out[1:].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_derivative_is_refused(backend):
    """A gradient penalty (create_graph=True) got no second-order term from the Triton path."""
    ids, weight = make_inputs((2, 3), 16, 8)
    ids, weight = ids % 16, weight.requires_grad_()
    out = vocab_parallel_embedding(ids, weight, backend=backend)
    (grad,) = torch.autograd.grad(out.square().sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad.square().sum().backward()


@pytest.mark.parametrize(
    "weight", [torch.randn(8), torch.randn(0, 4), torch.ones(8, 4, dtype=torch.int64)],
    ids=["1-d", "no-rows", "integer"],
)  # fmt: skip
def test_rejects_a_weight_that_is_no_shard(weight):
    with pytest.raises(ValueError, match=r"is not a \[rows, hidden\] floating-point shard"):
        vocab_parallel_embedding(torch.tensor([0], device=DEVICE), weight.to(DEVICE))
