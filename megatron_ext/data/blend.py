"""Language blends: a manifest of corpora with target token shares -> Megatron ``--data-path``.

Megatron's ``BlendedDataset`` draws *samples* from its datasets in proportion to the normalised
weights, and every GPT sample is the same number of tokens (``seq_length + 1``). The share of
training tokens a language receives is therefore its weight, whatever the size of its corpus: a
1:3 English:Arabic mix by tokens is ``--data-path 0.25 en 0.75 ar``. Corpus size decides something
else, how often each corpus is repeated to deliver its share; ``epochs`` reports that from the
token counts measured during preprocessing, so a user sees before training that, say, the English
corpus would be seen 40 times.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.yamlfile import YamlFileError, read_yaml


class ManifestError(ValueError):
    """A blend manifest that cannot be used."""


@dataclass
class LanguageSpec:
    """One language of a blend.

    Attributes:
        name: Short name used in output paths (``en``, ``ar``).
        inputs: Files or globs (relative ones are relative to the manifest).
        share: Requested share of training tokens (normalised over the manifest).
        lang: Language for sentence splitting; defaults to ``name``.
        normalize: Normalisers for this language (overrides the command line's).
    """

    name: str
    inputs: list[str]
    share: float
    lang: str | None = None
    normalize: list[str] | None = None


@dataclass
class BlendManifest:
    """A blend of languages, read from YAML (see ``examples/quickstart/blend.yaml``)."""

    languages: list[LanguageSpec]
    output_prefix: str | None = None
    train_tokens: int | None = None
    source: str = field(default="<memory>", repr=False)


def load_manifest(path: str | os.PathLike) -> BlendManifest:
    """Read and check a blend manifest.

    The YAML has ``languages`` (a mapping from name to ``inputs``, ``share`` and optionally
    ``lang``, ``normalize``), and optionally ``output_prefix`` and ``train_tokens``. Inputs may
    use ``$VARIABLES`` and ``~``; relative ones are relative to the manifest's folder.

    Raises:
        ManifestError: Naming the file and the problem.
    """
    path = Path(path)
    try:
        data = read_yaml(path, "manifest")
    except YamlFileError as err:
        raise ManifestError(str(err)) from err
    if not isinstance(data, dict) or not isinstance(data.get("languages"), dict):
        raise ManifestError(f"{path}: expected a mapping with a 'languages' mapping")
    unknown = set(data) - {"languages", "output_prefix", "train_tokens"}
    if unknown:
        raise ManifestError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    base = path.parent
    languages = []
    for name, spec in data["languages"].items():
        where = f"{path}: language {name}"
        if not isinstance(spec, dict):
            raise ManifestError(f"{where}: expected a mapping with inputs and share")
        extra = set(spec) - {"inputs", "share", "lang", "normalize"}
        if extra:
            raise ManifestError(f"{where}: unknown keys {', '.join(sorted(extra))}")
        inputs = spec.get("inputs")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs or not all(isinstance(i, str) for i in inputs):
            raise ManifestError(f"{where}: 'inputs' must be a path or a list of paths")
        share = spec.get("share")
        if not isinstance(share, int | float) or isinstance(share, bool) or not share > 0:
            raise ManifestError(f"{where}: 'share' must be a positive number, got {share!r}")
        normalize = spec.get("normalize")
        if isinstance(normalize, str):
            normalize = [normalize]
        for raw in inputs:
            unset = [v for v in re.findall(r"\$\{?(\w+)", raw, re.ASCII) if v not in os.environ]
            if unset:
                raise ManifestError(f"{where}: input {raw}: ${unset[0]} is not set")
        languages.append(
            LanguageSpec(
                name=str(name),
                inputs=[_resolve(i, base) for i in inputs],
                share=float(share),
                lang=spec.get("lang"),
                normalize=normalize,
            )
        )
    if not languages:
        raise ManifestError(f"{path}: no languages")
    train_tokens = data.get("train_tokens")
    if train_tokens is not None:
        try:
            train_tokens = int(float(train_tokens))
        except (TypeError, ValueError) as err:
            raise ManifestError(f"{path}: train_tokens must be a number") from err
    return BlendManifest(languages, data.get("output_prefix"), train_tokens, str(path))


def _resolve(path: str, base: Path) -> str:
    """Expand ``$VARS`` and ``~``; relative paths are relative to the manifest's folder."""
    path = os.path.expanduser(os.path.expandvars(path))
    return path if os.path.isabs(path) else str(base / path)


def blend_weights(shares: Sequence[float]) -> list[float]:
    """Megatron blend weights realising the given token shares (normalised shares)."""
    total = math.fsum(shares)
    return [s / total for s in shares]


def epochs(
    weights: Sequence[float], corpus_tokens: Sequence[int], train_tokens: int
) -> list[float]:
    """How many times each corpus is read to deliver its share of ``train_tokens``."""
    return [w * train_tokens / max(t, 1) for w, t in zip(weights, corpus_tokens, strict=True)]


def data_path_argument(weights: Sequence[float], prefixes: Sequence[str]) -> str:
    """The value of Megatron's ``--data-path`` for a blend (``w1 p1 w2 p2 ...``)."""
    return " ".join(f"{w:.6g} {p}" for w, p in zip(weights, prefixes, strict=True))
