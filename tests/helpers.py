"""Small helpers shared by tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# The repository's root.
REPO = Path(__file__).resolve().parents[1]


def read_texts(path: Path, key: str = "text") -> list[str]:
    """The ``key`` field of every line of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


def tensor_parallel_shards(name: str, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """A full megatron-core weight's shards on TP ranks 0..tp-1, as megatron-core lays them out.

    Written from megatron-core's layer definitions (column-parallel: split rows; row-parallel:
    split columns; SwiGLU's ``[gate; up]`` split as ``[gate_i; up_i]``; norms replicated), for
    references built outside megatron-core's own sharding. Vocabulary rows must be padded.
    """
    from megatron_ext.checkpoint.layout import EMBEDDING, FC1, OUTPUT_LAYER, QKV

    if name.endswith(FC1):
        gate, up = tensor.chunk(2)
        return [torch.cat(pair) for pair in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
    if name in (EMBEDDING, OUTPUT_LAYER) or name.endswith(QKV):
        return list(tensor.chunk(tp, dim=0))
    if name.endswith(("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")):
        return list(tensor.chunk(tp, dim=1))
    return [tensor] * tp


def aliases_main_grad(weight) -> bool:
    """Whether ``weight.grad`` lies in ``weight.main_grad``'s memory (no weight-sized tensor)."""
    if weight.grad is None:
        return False
    return weight.grad.untyped_storage().data_ptr() == weight.main_grad.untyped_storage().data_ptr()


# Where the kernel tests put their tensors: the GPU when there is one (the Triton kernels run
# compiled), else the CPU (Triton under its interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Backends for tests of CPU tensors (the checks that raise at once there): on a GPU machine the
# Triton kernels run only on CUDA tensors, without the interpreter.
CPU_TENSOR_BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=[
            pytest.mark.triton_interpreter,
            pytest.mark.skipif(
                torch.cuda.is_available(), reason="CPU tensors reach Triton only in its interpreter"
            ),
        ],
    ),
]
