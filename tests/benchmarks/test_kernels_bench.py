"""Kernel benchmarks (numbers and method in docs/benchmarks.md, "## Kernels").

CPU (``make bench``): the fused linear cross-entropy reference against a logits-materialising
baseline at N=8192, H=1024, V=64000, fp32. Each forward+backward runs in a fresh subprocess that
reports its own wall time and peak resident memory above what it held before the call (inputs
included in neither): large CPU tensors are mmap-backed, so freed memory leaves the process and
the high-water mark ``VmHWM`` is the true peak. (Not ``ru_maxrss``: it keeps the pre-``exec``
copy of the parent, so a large pytest process would set a floor under the child's.)

GPU (skipped without CUDA; run ``pytest tests/benchmarks/test_kernels_bench.py --benchmark-only
-k gpu -s``): fused linear CE against the bare lm-head GEMMs, torch matmul + F.cross_entropy,
megatron-core's fused vocab-parallel CE on materialised logits and Liger-Kernel's fused linear CE
(each skipped if not installed); at H=4096 the GPU time of the fused paths by kind of kernel
(torch.profiler); the training path (dW into ``main_grad``) at chunk floors of
1024-4096 rows; the embedding against torch's gather and ``embedding_dense_backward``; the
rotary embedding against megatron-core's unfused one. ``-s`` prints a markdown summary table at
the end.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn import functional as F  # noqa: N812 - the universal alias

import kernels.cross_entropy as ce
from kernels.cross_entropy import fused_linear_cross_entropy
from kernels.embedding import vocab_parallel_embedding
from tests.benchmarks.conftest import GEMM_KERNELS, kernel_breakdown

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")

# ---------------------------------------------------------------------------------------- CPU

_CPU_CHILD = textwrap.dedent(
    """
    import json, re, resource, sys, time
    import torch, torch.nn.functional as F
    from kernels.cross_entropy import fused_linear_cross_entropy

    impl, n, h, v = sys.argv[1], *map(int, sys.argv[2:])
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    # Touch every page the run's inputs and outputs will use, then take the baseline.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    start = time.perf_counter()
    if impl == "fused":
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    else:
        loss = F.cross_entropy(hidden @ weight.t(), labels)
    loss.backward()
    seconds = time.perf_counter() - start
    status = open("/proc/self/status").read()
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak - before, "loss": loss.item()}))
    """
)
_CPU_RESULTS: dict[str, dict] = {}


def _run_cpu_child(impl: str, n: int, h: int, v: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CPU_CHILD, impl, str(n), str(h), str(v)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["baseline", "fused"])
def test_cpu_loss_memory_and_time(benchmark, impl):
    n, h, v = 8192, 1024, 64000
    result = benchmark.pedantic(_run_cpu_child, args=(impl, n, h, v), rounds=1, iterations=1)
    _CPU_RESULTS[impl] = result
    benchmark.extra_info.update(
        peak_mib=result["peak_bytes"] / 2**20, inner_seconds=result["seconds"]
    )
    if len(_CPU_RESULTS) == 2:
        base, fused = _CPU_RESULTS["baseline"], _CPU_RESULTS["fused"]
        assert abs(base["loss"] - fused["loss"]) < 1e-3
        benchmark.extra_info.update(
            memory_ratio=fused["peak_bytes"] / base["peak_bytes"],
            time_ratio=fused["seconds"] / base["seconds"],
        )
        print(
            f"\nCPU N={n} H={h} V={v} fp32: peak {base['peak_bytes'] / 2**20:.0f} MiB -> "
            f"{fused['peak_bytes'] / 2**20:.0f} MiB "
            f"({fused['peak_bytes'] / base['peak_bytes']:.3f}x), "
            f"time {base['seconds']:.1f} s -> {fused['seconds']:.1f} s "
            f"({fused['seconds'] / base['seconds']:.2f}x)"
        )
        assert fused["peak_bytes"] <= base["peak_bytes"] / 8


_ALIGNMENT_SECONDS: dict[str, float] = {}


@pytest.mark.parametrize("row_align", [128, 1], ids=["aligned", "unaligned"])
def test_cpu_loss_over_a_vocabulary_of_any_size(benchmark, monkeypatch, row_align):
    """The loss leaves megatron's padding rows out, so a shard's classes are any number: 32,001
    here (Llama-2 and one new piece; 32,128 rows with the padding). The logits' rows at a
    128-aligned stride (the default) against rows exactly as long as the classes."""
    monkeypatch.setattr(ce, "LOGITS_ROW_ALIGN", row_align)
    n, h, v, rows = 1024, 1024, 32001, 32128
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = (torch.randn(rows, h, generator=gen) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)

    def step():
        hidden.grad = weight.grad = None
        fused_linear_cross_entropy(hidden, weight, labels, vocab_size=v).backward()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    _ALIGNMENT_SECONDS[str(row_align)] = benchmark.stats.stats.median
    if len(_ALIGNMENT_SECONDS) == 2:
        ratio = _ALIGNMENT_SECONDS["1"] / _ALIGNMENT_SECONDS["128"]
        benchmark.extra_info.update(unaligned_over_aligned=ratio)
        print(f"\nCPU N={n} H={h} V={v} fp32 fwd+bwd: unaligned rows take {ratio:.2f}x aligned")


# ---------------------------------------------------------------------------------------- GPU

_GPU_ROWS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _gpu_summary():
    yield
    if not _GPU_ROWS:
        return
    print(f"\n\n{torch.cuda.get_device_name()}; median ms over the rounds; peak MiB above inputs")
    print("| benchmark | shape | impl | ms | peak MiB | note |")
    print("|---|---|---|---|---|---|")
    for row in _GPU_ROWS:
        print(
            f"| {row['bench']} | {row['shape']} | {row['impl']} | {row['ms']:.3f} | "
            f"{row['peak_mib']:.0f} | {row.get('note', '')} |"
        )


def _measure(benchmark, step, rounds=10, inner=1) -> tuple[float, float]:
    """Median ms of ``step`` (run ``inner`` times per round) and its peak extra memory in MiB."""

    def timed():
        for _ in range(inner):
            step()
        torch.cuda.synchronize()

    timed()  # compile / autotune / allocate outside the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
    ms = benchmark.stats.stats.median * 1e3 / inner
    benchmark.extra_info.update(ms=ms, peak_mib=peak)
    return ms, peak


def _megatron_ce():
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    if not parallel_state.model_parallel_is_initialized():
        from megatron_ext import distributed

        distributed.init(1, rank=0, world_size=1)
    group = parallel_state.get_tensor_model_parallel_group()

    def loss_fn(hidden, weight, labels):
        logits = (hidden @ weight.t())[:, None]
        return fused_vocab_parallel_cross_entropy(logits, labels[:, None], group).mean()

    return loss_fn


def _liger_ce():
    liger = pytest.importorskip("liger_kernel.transformers.functional")
    return lambda hidden, weight, labels: liger.liger_fused_linear_cross_entropy(
        hidden, weight, labels
    )


def _loss_fn(impl):
    if impl == "fused":
        return fused_linear_cross_entropy
    if impl == "fused-none":
        # Per-token losses, as megatron-core's loss functions take them: backward recomputes.
        return lambda hidden, weight, labels: fused_linear_cross_entropy(
            hidden, weight, labels, reduction="none"
        ).mean()
    if impl == "torch":
        return lambda hidden, weight, labels: F.cross_entropy(hidden @ weight.t(), labels)
    if impl == "megatron":
        return _megatron_ce()
    return _liger_ce()


CE_SHAPES = [(h, v) for h in (4096, 8192) for v in (32000, 57344, 64000)]


def _ce_inputs(n: int, h: int, v: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(v, h, device="cuda", generator=gen, dtype=torch.bfloat16) / h**0.5
    labels = torch.randint(0, v, (n,), device="cuda", generator=gen)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def _ce_step(impl, hidden, weight, labels):
    """One forward+backward of ``impl`` (see ``test_gpu_linear_cross_entropy``)."""
    if impl == "gemms":
        # The floor: logits = H W^T, dH = G W, dW = G^T H with G a ready-made logits gradient.
        grad_logits = torch.randn(
            hidden.shape[0], weight.shape[0], device="cuda", dtype=torch.bfloat16
        )
        h_, w_ = hidden.detach(), weight.detach()

        def step():
            hidden.grad = weight.grad = None
            h_ @ w_.t()
            grad_logits @ w_
            grad_logits.t() @ h_

        return step
    if impl == "fused-ddp":
        return _ddp_step(hidden, weight, labels)
    loss_fn = _loss_fn(impl)

    def step():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, labels).backward()

    return step


def _ddp_step(hidden, weight, labels, **kwargs):
    """As in training under megatron-core's DDP: the weight's fp32 main_grad exists before the
    step (it is the gradient buffer, whatever the loss), and dW goes straight into it."""
    weight.main_grad = torch.zeros(weight.shape, device="cuda")
    weight.grad_added_to_main_grad = False

    def step():
        hidden.grad = weight.grad = None
        fused_linear_cross_entropy(hidden, weight, labels, **kwargs).backward()

    return step


@gpu
@pytest.mark.parametrize(
    "impl", ["gemms", "fused", "fused-ddp", "fused-none", "torch", "megatron", "liger"]
)
@pytest.mark.parametrize(("h", "v"), CE_SHAPES, ids=[f"H{h}-V{v}" for h, v in CE_SHAPES])
def test_gpu_linear_cross_entropy(benchmark, impl, h, v):
    n = 8192
    step = _ce_step(impl, *_ce_inputs(n, h, v))
    ms, peak = _measure(benchmark, step, rounds=10)
    _GPU_ROWS.append(
        dict(bench="linear CE fwd+bwd", shape=f"N={n} H={h} V={v}", impl=impl, ms=ms, peak_mib=peak)
    )


# Which GPU kernels a step of the loss spends its time in, by kernel name.
_CE_KERNEL_KINDS = (
    GEMM_KERNELS,
    ("CE statistics", re.compile(r"_ce_stats_kernel")),
    ("CE gradient", re.compile(r"_ce_grad_kernel")),
    ("CE rows, one kernel", re.compile(r"_ce_whole_row_kernel")),
    ("copy/cast", re.compile(r"copy", re.IGNORECASE)),
)


@gpu
@pytest.mark.parametrize("impl", ["gemms", "fused", "fused-ddp", "fused-ddp-two-row-kernels"])
@pytest.mark.parametrize("v", [32000, 64000])
def test_gpu_linear_cross_entropy_breakdown(benchmark, monkeypatch, impl, v):
    """Where the fused loss's time goes at H=4096, the shape furthest from the 1.15x goal.

    ``two-row-kernels``: the statistics and gradient kernels TP needs, run at TP=1, against which
    the one-kernel row pass (the TP=1 default) is measured.
    """
    from kernels import cross_entropy

    n, h = 8192, 4096
    if impl == "fused-ddp-two-row-kernels":
        monkeypatch.setattr(cross_entropy, "ONE_ROW_KERNEL_WITHOUT_TP", False)
    step = _ce_step(impl.removesuffix("-two-row-kernels"), *_ce_inputs(n, h, v))
    ms, peak = _measure(benchmark, step, rounds=5)
    _GPU_ROWS.append(
        dict(
            bench="linear CE by kernel",
            shape=f"N={n} H={h} V={v}",
            impl=impl,
            ms=ms,
            peak_mib=peak,
            note=kernel_breakdown(step, _CE_KERNEL_KINDS),
        )
    )


@gpu
@pytest.mark.parametrize("variant", ["padding-as-classes", "aligned", "unaligned"])
def test_gpu_loss_without_padding_rows(benchmark, monkeypatch, variant):
    """The training path at an expanded vocabulary of 57,003 ids (57,088 rows at TP=1): every
    row a class, as in megatron-core; the ids alone, the logits' rows at a 128-aligned stride
    (the default); and the ids alone in rows exactly 57,003 long."""
    n, h, v, rows = 8192, 4096, 57003, 57088
    hidden, weight, labels = _ce_inputs(n, h, rows)
    labels = labels % v
    if variant == "unaligned":
        monkeypatch.setattr(ce, "LOGITS_ROW_ALIGN", 1)
    vocab = None if variant == "padding-as-classes" else v
    ms, peak = _measure(benchmark, _ddp_step(hidden, weight, labels, vocab_size=vocab), rounds=10)
    _GPU_ROWS.append(
        dict(bench="linear CE, padding", shape=f"N={n} H={h} V={v}", impl=variant, ms=ms,
             peak_mib=peak)
    )  # fmt: skip


FLOOR_SHAPES = [(4096, 32000), (4096, 57344), (4096, 64000)]
FLOORS = (1024, 2048, 4096)


@gpu
@pytest.mark.parametrize(("h", "v"), FLOOR_SHAPES, ids=[f"H{h}-V{v}" for h, v in FLOOR_SHAPES])
def test_gpu_chunk_floor(benchmark, monkeypatch, h, v):
    """The training path (fused-ddp) at each GPU chunk floor against the bare GEMMs.

    The floor (``MIN_GPU_CHUNK_ROWS``) decides both how often dW's fp32 accumulator is read and
    written (time) and the chunk's logits (memory, and its growth with the vocabulary). The
    differences are a few percent, as large as the drift of the GPU's clocks from one benchmark
    to the next, so each round times every floor and the GEMMs back to back (CUDA events) and
    the medians compare rounds taken under the same conditions. The order rotates from round to
    round: a variant that follows another without a synchronisation in between has its host-side
    set-up hidden behind the other's kernels, one that follows the fused loss's backward (which
    reads the upstream gradient on the host) does not.
    """
    from kernels import cross_entropy

    n = 8192
    inputs = _ce_inputs(n, h, v)
    variants = {"gemms": _ce_step("gemms", *inputs), **{f: _ddp_step(*inputs) for f in FLOORS}}
    times: dict = {name: [] for name in variants}

    def run(name):
        if name != "gemms":
            monkeypatch.setattr(cross_entropy, "MIN_GPU_CHUNK_ROWS", name)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        variants[name]()
        end.record()
        return start, end

    names = list(variants)

    def one_round():
        first = len(times["gemms"]) % len(names)
        events = {name: run(name) for name in names[first:] + names[:first]}
        torch.cuda.synchronize()
        for name, (start, end) in events.items():
            times[name].append(start.elapsed_time(end))

    one_round()  # compile, allocate
    for times_of_variant in times.values():
        times_of_variant.clear()
    benchmark.pedantic(one_round, rounds=15, iterations=1)
    gemms = statistics.median(times["gemms"])
    for floor in FLOORS:
        monkeypatch.setattr(cross_entropy, "MIN_GPU_CHUNK_ROWS", floor)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        variants[floor]()
        torch.cuda.synchronize()
        ms = statistics.median(times[floor])
        rows = cross_entropy._chunk_rows(n, h, v, on_gpu=True)
        _GPU_ROWS.append(
            dict(
                bench="linear CE fwd+bwd, DDP",
                shape=f"N={n} H={h} V={v}",
                impl=f"fused-ddp, floor {floor}",
                ms=ms,
                peak_mib=(torch.cuda.max_memory_allocated() - before) / 2**20,
                note=f"{rows}-row chunks, {ms / gemms:.3f}x the GEMMs' {gemms:.2f} ms",
            )
        )


EMB_TOKENS, EMB_H, EMB_V = 32768, 4096, 64000


def _embedding_inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(EMB_V, EMB_H, device="cuda", generator=gen, dtype=torch.bfloat16)
    ids = torch.randint(0, EMB_V, (EMB_TOKENS,), device="cuda", generator=gen)
    return ids, weight


@gpu
@pytest.mark.parametrize("impl", ["fused", "torch", "copy"])
def test_gpu_embedding_forward(benchmark, impl):
    ids, weight = _embedding_inputs()
    if impl == "copy":
        # What the GPU can move: a device-to-device copy of the same bytes.
        src = torch.empty(EMB_TOKENS, EMB_H, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)

        def step():
            dst.copy_(src)

    elif impl == "fused":

        def step():
            vocab_parallel_embedding(ids, weight)

    else:

        def step():
            F.embedding(ids, weight)

    ms, peak = _measure(benchmark, step, rounds=20, inner=10)
    moved = 2 * EMB_TOKENS * EMB_H * weight.element_size() + ids.numel() * ids.element_size()
    tb_s = moved / (ms * 1e-3) / 1e12
    benchmark.extra_info.update(tb_per_s=tb_s)
    _GPU_ROWS.append(
        dict(
            bench="embedding fwd",
            shape=f"T={EMB_TOKENS} H={EMB_H} V={EMB_V}",
            impl=impl,
            ms=ms,
            peak_mib=peak,
            note=f"{tb_s:.2f} TB/s",
        )
    )


@gpu
@pytest.mark.parametrize("impl", ["fused", "fused-main-grad", "torch"])
def test_gpu_embedding_backward(benchmark, impl):
    ids, weight = _embedding_inputs()
    grad_out = torch.randn(EMB_TOKENS, EMB_H, device="cuda", dtype=torch.bfloat16)
    if impl == "torch":

        def step():
            torch.ops.aten.embedding_dense_backward(grad_out, ids, EMB_V, -1, False)

    else:
        weight.requires_grad_()
        if impl == "fused-main-grad":
            weight.main_grad = torch.zeros(EMB_V, EMB_H, device="cuda")
            weight.grad_added_to_main_grad = False
        out = vocab_parallel_embedding(ids, weight)

        def step():
            weight.grad = None
            torch.autograd.backward(out, grad_out, retain_graph=True)

    ms, peak = _measure(benchmark, step, rounds=20, inner=5)
    _GPU_ROWS.append(
        dict(
            bench="embedding bwd",
            shape=f"T={EMB_TOKENS} H={EMB_H} V={EMB_V}",
            impl=impl,
            ms=ms,
            peak_mib=peak,
        )
    )


# Llama-2 7B's queries at seq 4,096, one sequence: 32 heads of 128.
ROPE_SHAPE = (4096, 1, 32, 128)


@gpu
@pytest.mark.parametrize("impl", ["fused", "megatron", "copy"])
def test_gpu_rope(benchmark, impl):
    """Rotary embedding forward + backward: kernels/rope.py against megatron-core's unfused
    function (what runs without TE) and a copy there and back (the bandwidth bound)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from kernels.rope import rotary_embedding

    seq, _, _, dim = ROPE_SHAPE
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(ROPE_SHAPE, device="cuda", generator=gen, dtype=torch.bfloat16)
    t.requires_grad_(impl != "copy")
    grad_out = torch.randn_like(t)
    # megatron-core's RotaryEmbedding: fp32 angles [s, 1, 1, dim].
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device="cuda") / dim)
    angles = torch.outer(torch.arange(seq, device="cuda", dtype=torch.float32), inv_freq)
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]
    if impl == "copy":

        def step():
            t.clone()
            grad_out.clone()

    else:
        rope = rotary_embedding if impl == "fused" else _apply_rotary_pos_emb_bshd

        def step():
            torch.autograd.backward(rope(t, freqs), grad_out)
            t.grad = None

    ms, peak = _measure(benchmark, step, rounds=20, inner=10)
    moved = 4 * t.numel() * t.element_size()  # each way: read the input, write the output
    _GPU_ROWS.append(
        dict(
            bench="rope fwd+bwd",
            shape="s={} b={} heads={} dim={}".format(*ROPE_SHAPE),
            impl=impl,
            ms=ms,
            peak_mib=peak,
            note=f"{moved / (ms * 1e-3) / 1e12:.2f} TB/s",
        )
    )
