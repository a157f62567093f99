"""YAML files as this project reads them: safe types only, and no key given twice."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


class YamlFileError(ValueError):
    """A YAML file that cannot be read (the message names it, and the line where known)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping.

    YAML itself keeps the last value silently, so a setting repeated further down a long file
    would override the one the reader sees (or a language of a blend would vanish).
    """


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """The data in the YAML file at ``path``.

    Args:
        path: The file.
        what: What the file is, for the message when it cannot be read ("config", "manifest").

    Raises:
        YamlFileError: ``PATH: line N: problem`` for bad YAML or a repeated key; ``PATH: cannot
            read WHAT (reason)`` otherwise.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        line = f"line {mark.line + 1}: " if mark else ""
        raise YamlFileError(f"{path}: {line}{err.problem}") from err
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise YamlFileError(f"{path}: cannot read {what} ({err})") from err
