"""Collects benchmark medians and prints ratios against the same run's baselines; splits a GPU
step's time by kind of kernel."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

import torch

_MEDIANS: dict = defaultdict(dict)
_TRAINING: dict[str, tuple[float, int]] = {}


def record(corpus: str, name: str, workers: int, seconds: float) -> None:
    """Remember one benchmark's median time for the summary."""
    _MEDIANS[corpus][(name, workers)] = seconds


def record_training(kernels: str, seconds: float, tokens: int) -> None:
    """Remember one training-step benchmark's median (``kernels``: fused or megatron)."""
    _TRAINING[kernels] = (seconds, tokens)


# cuBLAS names its GEMM kernels *gemm*, *xmma*, cutlass* or nvjet*.
GEMM_KERNELS = ("GEMM", re.compile(r"gemm|xmma|cutlass|nvjet", re.IGNORECASE))


def kernel_breakdown(step: Callable[[], object], kinds: tuple[tuple[str, re.Pattern], ...]) -> str:
    """GPU time of one ``step`` by kind of kernel (first pattern matching its name, else
    "other"): ms and launches, largest first; then the span from the first kernel's start to the
    last one's end, whose excess over the sum is time the GPU sat idle within the step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    kernels = [event for event in prof.events() if event.device_type == DeviceType.CUDA]
    for event in kernels:
        kind = next((k for k, pattern in kinds if pattern.search(event.name)), "other")
        entry = totals.setdefault(kind, [0.0, 0])
        entry[0] += event.time_range.elapsed_us() / 1e3
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    busy = ", ".join(f"{kind} {ms:.2f} ms ({count})" for kind, (ms, count) in ranked)
    return f"{busy}; span {span / 1e3:.2f} ms"


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    if "fused" in _TRAINING and "megatron" in _TRAINING:
        (ours, tokens), (base, _) = _TRAINING["fused"], _TRAINING["megatron"]
        write("")
        write(
            f"tiny training step: ours {tokens / ours:,.0f} tokens/s, megatron-core "
            f"{tokens / base:,.0f} tokens/s ({base / ours:.2f}x)"
        )
    if not _MEDIANS:
        return
    write("")
    write("preprocessing: median seconds and ratios (same run)")
    for corpus, times in _MEDIANS.items():
        for workers in (1, 2):
            ours, base = times.get(("ours", workers)), times.get(("baseline", workers))
            tok = times.get(("tokenizer", 1))
            if ours and base and tok:
                write(
                    f"  {corpus} workers={workers}: ours {ours:.2f}s, baseline {base:.2f}s "
                    f"({base / ours:.2f}x faster), tokenizer alone {tok:.2f}s "
                    f"(ours/tokenizer {ours / tok:.2f})"
                )
        if ("ours", 1) in times and ("ours", 2) in times:
            write(
                f"  {corpus} scaling 1->2 workers: {times[('ours', 1)] / times[('ours', 2)]:.2f}x"
            )
