"""Documents for tokenizer training and metrics, read with the preprocessing readers.

Tokenizer tools accept the same inputs as ``megatron-ext preprocess`` (jsonl/txt/parquet, .gz/.zst,
globs) and treat bad lines the same way: an error naming ``file:line`` unless skipping is asked
for; blank lines and empty documents are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from megatron_ext.data.readers import (
    BAD_LINE_REASONS,
    BadField,
    InputError,
    expand_inputs,
    iter_blocks,
    parse_block,
)


def iter_documents(
    patterns: Sequence[str],
    key: str = "text",
    skip_bad_lines: bool = False,
    normalize: Callable[[str], str] | None = None,
) -> Iterator[str]:
    """Texts of every usable record of the files named by ``patterns``, in order.

    Args:
        patterns: Files or globs.
        key: JSON field (or Parquet column) holding the text; plain text has one field.
        skip_bad_lines: Skip malformed lines instead of raising.
        normalize: Applied to each text (documents empty afterwards are dropped).

    Raises:
        InputError: A missing or unreadable file, or a malformed line unless skipping.
    """
    for (field,) in iter_records(patterns, [key], skip_bad_lines, flag="--corpus"):
        text = normalize(field) if normalize else field
        if text.strip():
            yield text


def iter_records(
    patterns: Sequence[str], keys: Sequence[str], skip_bad_lines: bool, flag: str
) -> Iterator[list[str]]:
    """The string fields ``keys`` of every usable record of the files named by ``patterns``.

    Raises:
        InputError: A missing or unreadable file (named with ``flag``), or a malformed line
            (a field missing or not a string) unless skipping; blank lines are skipped.
    """
    for path in expand_inputs(patterns, flag=flag):
        for block in iter_blocks(path):
            for line, fields in parse_block(block, keys):
                bad = next((f for f in fields if isinstance(f, BadField)), None)
                if bad is None:
                    yield fields
                elif bad.reason in BAD_LINE_REASONS and not skip_bad_lines:
                    raise InputError(
                        f"{path}:{line}: {bad.message} (pass --on-bad-line skip to skip)"
                    )
