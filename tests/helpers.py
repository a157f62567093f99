"""Small helpers shared by tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def read_texts(path: Path, key: str = "text") -> list[str]:
    """The ``key`` field of every line of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


def aliases_main_grad(weight) -> bool:
    """Whether ``weight.grad`` lies in ``weight.main_grad``'s memory (no weight-sized tensor)."""
    if weight.grad is None:
        return False
    return weight.grad.untyped_storage().data_ptr() == weight.main_grad.untyped_storage().data_ptr()


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
