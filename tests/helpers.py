"""Small helpers shared by tests."""

from __future__ import annotations

import json
from pathlib import Path


def read_texts(path: Path, key: str = "text") -> list[str]:
    """The ``key`` field of every line of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]
