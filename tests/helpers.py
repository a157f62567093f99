"""Small helpers shared by tests."""

from __future__ import annotations

import json
from pathlib import Path


def read_texts(path: Path, key: str = "text") -> list[str]:
    """The ``key`` field of every line of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


def aliases_main_grad(weight) -> bool:
    """Whether ``weight.grad`` lies in ``weight.main_grad``'s memory (no weight-sized tensor)."""
    if weight.grad is None:
        return False
    return weight.grad.untyped_storage().data_ptr() == weight.main_grad.untyped_storage().data_ptr()
