"""Collects benchmark medians and prints ratios against the same run's baselines."""

from collections import defaultdict

_MEDIANS: dict = defaultdict(dict)
_TRAINING: dict[str, tuple[float, int]] = {}


def record(corpus: str, name: str, workers: int, seconds: float) -> None:
    """Remember one benchmark's median time for the summary."""
    _MEDIANS[corpus][(name, workers)] = seconds


def record_training(kernels: str, seconds: float, tokens: int) -> None:
    """Remember one training-step benchmark's median (``kernels``: fused or megatron)."""
    _TRAINING[kernels] = (seconds, tokens)


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
