"""What a preprocessing run's outputs are made from, and whether a re-run may keep them.

Each ``.stats.json`` records the inputs (path, size and modification time: hashing hundreds of GB
would take minutes), the tokenizer (sha256) and the settings that change the bytes. A manifest
re-run keeps a language's outputs only when they are whole (``check_indexed_files``) and that
record matches what the run would use now.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_ext.data.indexed import IndexedDatasetError, check_indexed_files
from megatron_ext.data.readers import BAD_LINE_REASONS, expand_inputs
from megatron_ext.data.sentences import PUNKT_TRAIN, PUNKT_UNTRAINED
from megatron_ext.hashing import sha256_file, sha256_path

if TYPE_CHECKING:
    from megatron_ext.data.preprocess import PreprocessConfig

_ABSENT = "(not recorded)"


def outputs_made_from(config: PreprocessConfig, files: list[str]) -> dict:
    """``inputs``, ``tokenizer`` and ``settings`` as ``.stats.json`` records them.

    Settings that cannot change the bytes are recorded as None (``lang`` without sentence
    splitting), so that they do not refuse outputs that would come out the same; a Punkt file
    is recorded by content.
    """
    split = config.split_sentences
    punkt: str | dict | None = config.punkt_params if split else None
    if split and punkt not in (PUNKT_TRAIN, PUNKT_UNTRAINED):
        try:
            digest = sha256_file(config.punkt_params)
        except OSError as err:  # a wrong path: the user's to fix, not a failed run
            raise ValueError(
                f"--punkt-params {config.punkt_params}: cannot read it ({err.strerror})"
            ) from err
        punkt = {"file": config.punkt_params, "sha256": digest}
    return {
        "inputs": [
            {"path": f, "bytes": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns}
            for f in files
        ],
        "tokenizer": {
            "type": config.tokenizer_type,
            "sha256": sha256_path(config.tokenizer_model),
            "hf_include_special_tokens": config.tokenizer_hf_include_special_tokens,
        },
        "settings": {
            "append_eod": config.append_eod,
            "split_sentences": split,
            "lang": config.lang if split else None,
            "keep_newlines": config.keep_newlines if split else None,
            "punkt_params": punkt,
            "normalize": list(config.normalize),
            "on_bad_line": config.on_bad_line,
        },
    }


def reusable_outputs(
    config: PreprocessConfig, paths: dict[str, tuple[Path, Path, Path]]
) -> tuple[dict[str, dict] | None, str]:
    """Whether a run's outputs are already there, whole, and made from what it would use.

    Args:
        config: The run's settings.
        paths: ``{key: (.bin, .idx, .stats.json)}`` (``preprocess.output_paths``).

    Returns:
        ``({key: stats}, "")`` when every output can be kept; ``(None, why)`` when outputs exist
        but cannot; ``(None, "")`` when none exist.
    """
    if not any(p.exists() for group in paths.values() for p in group):
        return None, ""
    made_from = outputs_made_from(config, expand_inputs(config.inputs))
    found = {}
    for key, (bin_path, _idx, stats_path) in paths.items():
        try:
            stats = json.loads(stats_path.read_text(encoding="utf-8"))
            sequences, documents = check_indexed_files(config.output_stem(key))
        except (OSError, ValueError, IndexedDatasetError) as err:  # JSONDecodeError: ValueError
            return None, f"they are incomplete or damaged ({err})"
        if (sequences, documents) != (stats.get("sequences"), stats.get("documents")):
            return None, f"{bin_path} does not hold what {stats_path} counts"
        why = _why_not_the_same(stats, made_from)
        if why:
            return None, f"{stats_path} {why}"
        found[key] = stats
    return found, ""


def _why_not_the_same(stats: dict, made_from: dict) -> str:
    """What differs between a ``.stats.json`` and ``outputs_made_from``'s record ("": nothing)."""
    inputs = stats.get("inputs") or []
    if any(not isinstance(i, dict) or "mtime_ns" not in i for i in inputs):
        return (
            "was written by an earlier megatron-ext, which did not record the inputs' "
            "modification times"
        )
    tokenizer = stats.get("tokenizer") or {}
    recorded = {
        "inputs": inputs,
        "tokenizer": {k: tokenizer.get(k, _ABSENT) for k in made_from["tokenizer"]},
        "settings": dict(stats.get("settings") or {}),
    }
    expected = {**made_from, "settings": dict(made_from["settings"])}
    skipped = stats.get("skipped") or {}
    if not any(skipped.get(reason) for reason in BAD_LINE_REASONS):
        # No line was bad: stopping at one or skipping it gives these same bytes.
        recorded["settings"].pop("on_bad_line", None)
        expected["settings"].pop("on_bad_line")
    for part, value in expected.items():
        if recorded[part] != value:
            return f"records other {part}: {_difference(recorded[part], value)}"
    return ""


def _difference(recorded: object, expected: object) -> str:
    """The first difference between a recorded part and the current one, for a message."""
    if isinstance(recorded, dict) and isinstance(expected, dict):
        for name in [*expected, *(k for k in recorded if k not in expected)]:
            old, new = recorded.get(name, _ABSENT), expected.get(name, _ABSENT)
            if old != new:
                return f"{name} {old!r}, now {new!r}"
    if isinstance(recorded, list) and isinstance(expected, list):
        for old, new in itertools.zip_longest(recorded, expected):
            if old == new:
                continue
            if not isinstance(new, dict):
                return f"{old.get('path') if isinstance(old, dict) else old} is not an input now"
            if not isinstance(old, dict) or old.get("path") != new["path"]:
                return f"{new['path']} is a new input"
            return f"{new['path']} has changed since (size or modification time)"
    return f"{recorded!r}, now {expected!r}"
