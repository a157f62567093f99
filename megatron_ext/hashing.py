"""Content hashes recorded in metadata (inputs, tokenizers) and used to verify downloads."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(child)))
    return digest.hexdigest()


def pieces_sha256(pieces: Iterable[str]) -> str:
    """Hex sha256 of a vocabulary's pieces in id order.

    Two vocabularies have the same one exactly when each id names the same piece, whatever else
    their files hold (scores, normaliser settings, serialisation).
    """
    text = json.dumps(list(pieces), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
