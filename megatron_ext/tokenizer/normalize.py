"""Text normalisation shared by preprocessing and tokenizer training (off unless asked for).

``nfkc``: Unicode NFKC (folds Arabic presentation forms, full-width Latin, ligatures).
``arabic``: removes tatweel (U+0640), harakat and the other combining marks (U+0610-U+061A, the
small high signs and small harakat; U+064B-U+065F; U+0670), Quranic annotation marks (U+06D6-U+06ED,
but not the letters and symbols among them), the Arabic letter mark (U+061C), and maps the alef
variants أ إ آ ٱ to bare alef ا.

Normalisers compose in the order given (``["nfkc", "arabic"]``); each is a ``str -> str`` function
built on ``str.translate`` / ``unicodedata`` so it costs little next to tokenization.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence

_ARABIC_DELETE = (
    [0x0640, 0x061C, 0x0670]
    + list(range(0x0610, 0x061B))
    + list(range(0x064B, 0x0660))
    + list(range(0x06D6, 0x06DD))
    + list(range(0x06DF, 0x06E5))
    + [0x06E7, 0x06E8]
    + list(range(0x06EA, 0x06EE))
)
_ALEF_VARIANTS = {0x0622: 0x0627, 0x0623: 0x0627, 0x0625: 0x0627, 0x0671: 0x0627}
_ARABIC_TABLE = {**dict.fromkeys(_ARABIC_DELETE), **_ALEF_VARIANTS}


def normalize_nfkc(text: str) -> str:
    """Unicode NFKC."""
    return unicodedata.normalize("NFKC", text)


def normalize_arabic(text: str) -> str:
    """Strip tatweel, diacritics and the letter mark; unify alef variants."""
    return text.translate(_ARABIC_TABLE)


NORMALIZERS: dict[str, Callable[[str], str]] = {
    "nfkc": normalize_nfkc,
    "arabic": normalize_arabic,
}


def build_normalizer(names: Sequence[str] | None) -> Callable[[str], str] | None:
    """Compose the named normalisers, in order.

    Args:
        names: Names from ``NORMALIZERS``; empty or None means no normalisation.

    Returns:
        A function applying them all, or None when there is nothing to apply.

    Raises:
        ValueError: For an unknown name.
    """
    if not names:
        return None
    unknown = [n for n in names if n not in NORMALIZERS]
    if unknown:
        raise ValueError(
            f"unknown normalisation {', '.join(unknown)}; choose from {', '.join(NORMALIZERS)}"
        )
    steps = [NORMALIZERS[n] for n in names]
    if len(steps) == 1:
        return steps[0]

    def normalize(text: str) -> str:
        for step in steps:
            text = step(text)
        return text

    return normalize
