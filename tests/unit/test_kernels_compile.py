"""The Triton kernels compile for the GPUs users train on, without spilling registers.

The other kernel tests run Triton's interpreter on a CPU, which accepts code the compiler may
reject and says nothing about registers. Here each kernel is compiled ahead of time, with no GPU,
for the A100 (sm_80) and the H100/H200 (sm_90) at the launch settings the kernels use, through
the ``ptxas`` that Triton ships and runs; its report gives each kernel's registers and spills.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import triton

from tests.helpers import REPO

ARCHS = (80, 90)
DTYPES = ("bf16", "fp32")  # the logits / embedding dtype (bf16: GPU training)
# Vocabulary shards from 32,000 at TP=8 (4,000 columns: 4,096-wide blocks) to whole vocabularies.
SHARD_VOCABS = (4000, 64000)
HIDDEN = 8192


def _signatures(dtype: str) -> dict[str, dict[str, str]]:
    """Each kernel's argument types, as its launches pass them (``dtype``: the data's)."""
    return {
        "_ce_stats_kernel": {
            "logits_ptr": f"*{dtype}", "stride": "i64", "target_ptr": "*i64",
            "max_ptr": "*fp32", "sumexp_ptr": "*fp32", "target_logit_ptr": "*fp32",
            "logit_sum_ptr": "*fp32", "n_cols": "i32", "softcap": "fp32",
        },
        "_ce_grad_kernel": {
            "logits_ptr": f"*{dtype}", "stride": "i64", "target_ptr": "*i64", "lse_ptr": "*fp32",
            "scale_ptr": "*fp32", "n_cols": "i32", "z_coef": "fp32", "smooth": "fp32",
            "target_coef": "fp32", "softcap": "fp32",
        },
        "_ce_whole_row_kernel": {
            "logits_ptr": f"*{dtype}", "stride": "i64", "target_ptr": "*i64", "lse_ptr": "*fp32",
            "loss_ptr": "*fp32", "scale_ptr": "*fp32", "n_cols": "i32", "z_loss": "fp32",
            "z_coef": "fp32", "smooth": "fp32", "target_coef": "fp32", "softcap": "fp32",
        },
        "_embedding_fwd_kernel": {
            "ids_ptr": "*i64", "weight_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
            "n_tokens": "i32", "hidden": "i32", "weight_row_stride": "i64", "vocab_start": "i32",
            "shard_rows": "i32",
        },
        "_rope_kernel": {
            "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "freqs_ptr": "*fp32",
            **dict.fromkeys(("stride_xs", "stride_xb", "stride_xh", "stride_os", "stride_ob",
                             "stride_oh", "stride_fs", "stride_fb", "batch", "heads", "dim"),
                            "i32"),
        },
        # The gradient goes into megatron-core's fp32 main_grad.
        "_embedding_bwd_kernel": {
            "grad_out_ptr": f"*{dtype}", "order_ptr": "*i64", "segment_start_ptr": "*i64",
            "segment_row_ptr": "*i64", "grad_weight_ptr": "*fp32", "hidden": "i32",
            "grad_weight_row_stride": "i64",
        },
    }  # fmt: skip


def _variants():
    """(kernel name, dtype, constexprs, num_warps) for every launch setting worth compiling."""
    from kernels import cross_entropy, embedding, rope

    for dtype in DTYPES:
        for n_cols in SHARD_VOCABS:
            launch = cross_entropy._row_launch(n_cols, on_gpu=True)
            num_warps = launch.pop("num_warps")
            for softcap in (False, True):
                constexprs = {"HAS_SOFTCAP": softcap, **launch}
                yield "_ce_stats_kernel", dtype, constexprs, num_warps
                yield "_ce_grad_kernel", dtype, constexprs, num_warps
                # The whole vocabulary on one rank (TP=1): only the unsharded width.
                if n_cols == max(SHARD_VOCABS):
                    for write_grad in (False, True):
                        whole = {**constexprs, "WRITE_GRAD": write_grad}
                        yield "_ce_whole_row_kernel", dtype, whole, num_warps
        # Contiguous rows: Triton specialises an integer argument equal to 1 as a constant.
        forward = {**embedding._forward_launch(HIDDEN), "weight_col_stride": 1}
        backward = {**embedding._backward_launch(HIDDEN), "grad_weight_col_stride": 1}
        yield "_embedding_fwd_kernel", dtype, forward, 4
        yield "_embedding_bwd_kernel", dtype, backward, 4
        # Llama's 128-wide heads per rank: 32 (7B), 16 (7B at TP=2, the 1B benchmark), 8 (70B's
        # GQA keys).
        for heads in (32, 16, 8):
            launch = rope._launch(heads, 64)
            num_warps = launch.pop("num_warps")
            for backward_pass in (False, True):
                constexprs = {"HALF": 64, "BACKWARD": backward_pass, **launch}
                yield "_rope_kernel", dtype, constexprs, num_warps


def _compile_report() -> None:
    """In a child without TRITON_INTERPRET: compile every variant, print ptxas's figures."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import cross_entropy, embedding, rope

    kernels = {**vars(cross_entropy), **vars(embedding), **vars(rope)}
    knobs.nvidia.dump_ptxas_log = True
    results = []
    for arch in ARCHS:
        for name, dtype, constexprs, num_warps in _variants():
            signature = {**_signatures(dtype)[name], **dict.fromkeys(constexprs, "constexpr")}
            source = ASTSource(fn=kernels[name], signature=signature, constexprs=constexprs)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                triton.compile(
                    source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
                )
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
            registers = re.search(r"Used (\d+) registers", log.getvalue())
            results.append(
                {
                    "kernel": name, "arch": arch, "dtype": dtype, "constexprs": constexprs,
                    "num_warps": num_warps, "registers": int(registers.group(1)),
                    "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
                }
            )  # fmt: skip
    print(json.dumps(results))


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no CUDA backend")
    knobs = pytest.importorskip("triton.knobs", reason="Triton < 3.4 cannot print ptxas's report")
    if not hasattr(knobs.nvidia, "dump_ptxas_log"):
        pytest.skip(f"Triton {triton.__version__} cannot print ptxas's report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        # A fresh cache: ptxas reports only what it compiles.
        env["TRITON_CACHE_DIR"] = cache
        child = subprocess.run(
            [sys.executable, "-c", f"from {__name__} import _compile_report; _compile_report()"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    for r in results:
        print(
            f"sm_{r['arch']} {r['kernel']} {r['dtype']} {r['constexprs']} warps={r['num_warps']}: "
            f"{r['registers']} registers, {r['spill_bytes']} bytes spilled"
        )
    return results


def test_every_kernel_compiles_for_a100_and_h100(compiled):
    expected = {(name, arch) for arch in ARCHS for name, *_ in _variants()}
    assert {(r["kernel"], r["arch"]) for r in compiled} == expected
    assert len(compiled) == len(ARCHS) * len(list(_variants()))


def test_bf16_kernels_do_not_spill(compiled):
    # GPU training runs them on bf16 data. (fp32 logits with soft-capping spill 4 bytes in the
    # gradient kernel on sm_90 with Triton 3.9: a path no training configuration here uses.)
    spilled = [r for r in compiled if r["dtype"] == "bf16" and r["spill_bytes"]]
    assert not spilled, spilled
