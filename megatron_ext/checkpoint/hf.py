"""Hugging Face Llama checkpoints: lazy, validated reading; sharded safetensors writing.

Reading never loads the whole model: tensors come one at a time from safetensors (memory-mapped)
or from ``pytorch_model*.bin`` files opened with ``torch.load(weights_only=True, mmap=True)``.
Every problem names the file or the tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from megatron_ext.arch import ArchitectureError, LlamaArch


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted (message names the file or tensor)."""


def read_json_file(path: Path) -> dict:
    """A JSON file a checkpoint holds; a damaged one is a CheckpointError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: damaged, not JSON ({err})") from err


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a weight file's read errors into a CheckpointError naming it.

    safetensors' messages (``incomplete metadata``, ``header too large``) and torch's for an old
    or foreign ``.bin`` name no file.
    """
    unreadable: tuple[type[BaseException], ...] = (RuntimeError, OSError, EOFError)
    if path.suffix == ".safetensors":  # safetensors is optional for .bin checkpoints
        from safetensors import SafetensorError

        unreadable += (SafetensorError,)
    try:
        yield
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused, it holds objects other than tensors (loaded with "
            f"weights_only=True; code in a pickle is never run): {str(err).splitlines()[0]}"
        ) from err
    except unreadable as err:
        if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path}: in torch's format from before 1.6, which cannot be memory-mapped; "
                "re-save it (torch.save, or transformers' save_pretrained)"
            ) from err
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: cannot be read, damaged or cut short? ({cause})") from err


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """``tensor``, refused (as ``what``) when it holds a NaN or an infinity.

    Raises:
        CheckpointError: ``{what} has N NaN or infinite values``.
    """
    finite = torch.isfinite(tensor)
    if not finite.all():
        raise CheckpointError(f"{what} has {int((~finite).sum()):,} NaN or infinite values")
    return tensor


def expected_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Every weight of a Hugging Face ``LlamaForCausalLM`` with its shape."""
    h, d = arch.hidden_size, arch.head_dim
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
                p + "self_attn.k_proj.weight": (arch.num_query_groups * d, h),
                p + "self_attn.v_proj.weight": (arch.num_query_groups * d, h),
                p + "self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
                p + "mlp.gate_proj.weight": (arch.ffn_hidden_size, h),
                p + "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
                p + "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
            }
        )
    return shapes


_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")


class HFCheckpoint:
    """A Hugging Face Llama checkpoint directory, read lazily.

    Args:
        directory: Holds ``config.json`` and the weights (single file or sharded with an index).

    Raises:
        CheckpointError: Missing config or weight files, a non-Llama architecture, tensors
            missing or of the wrong shape.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: not found")
        self.config = read_json_file(config_path)
        try:
            self.arch = LlamaArch.from_hf_config(self.config, str(config_path))
        except ArchitectureError as err:
            raise CheckpointError(str(err)) from err
        self.files = self._weight_map()
        self._open: dict[Path, object] = {}
        self._validate()

    def _weight_map(self) -> dict[str, Path]:
        for index_name in _INDEXES:
            index = self.directory / index_name
            if index.is_file():
                weight_map = read_json_file(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{index}: no weight_map (tensor name -> shard file)")
                files = {name: self.directory / f for name, f in weight_map.items()}
                missing = sorted({str(f) for f in files.values() if not f.is_file()})
                if missing:
                    raise CheckpointError(f"{index}: shard(s) missing: {', '.join(missing)}")
                return files
        for single in _SINGLE:
            path = self.directory / single
            if path.is_file():
                return {name: path for name in self._names_in(path)}
        raise CheckpointError(
            f"{self.directory}: no weights (expected {', '.join(_SINGLE + _INDEXES)})"
        )

    @staticmethod
    def _names_in(path: Path) -> Iterable[str]:
        with _reading(path):
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    return list(f.keys())
            return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))

    def _validate(self) -> None:
        expected = expected_shapes(self.arch)
        names = set(self.files) - {n for n in self.files if n.endswith("rotary_emb.inv_freq")}
        if self.arch.tie_word_embeddings and "lm_head.weight" in names:
            # Some exports write the tied matrix twice: one copy is the same model, another is not.
            if not torch.equal(self.get("lm_head.weight"), self.get("model.embed_tokens.weight")):
                raise CheckpointError(
                    f"{self.files['lm_head.weight']}: tensor lm_head.weight differs from "
                    "model.embed_tokens.weight, but config.json ties them "
                    "(tie_word_embeddings: true): which one is the model's?"
                )
            names.discard("lm_head.weight")
        missing = sorted(set(expected) - names)
        if missing:
            raise CheckpointError(
                f"{self.directory}: tensor {missing[0]} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        unexpected = sorted(names - set(expected))
        if unexpected:
            raise CheckpointError(f"{self.directory}: unexpected tensor {unexpected[0]}")
        for name, shape in expected.items():
            actual = tuple(self.shape(name))
            if actual != shape:
                hint = ""
                if name in ("model.embed_tokens.weight", "lm_head.weight"):
                    hint = f" (config.json says vocab_size {self.arch.vocab_size})"
                raise CheckpointError(
                    f"{self.files[name]}: tensor {name} has shape {actual}, expected {shape}{hint}"
                )

    def _bin(self, path: Path) -> dict[str, torch.Tensor]:
        # .bin shards are memory-mapped once; their pages are read only when a tensor is used.
        if path not in self._open:
            with _reading(path):
                self._open[path] = torch.load(
                    path, map_location="cpu", weights_only=True, mmap=True
                )
        return self._open[path]

    def _in_file(self, name: str) -> Path:
        """The file that holds ``name``, refusing an index that names the wrong one."""
        path = self.files[name]
        names = self._bin(path) if path.suffix != ".safetensors" else self._safetensors_names(path)
        if name not in names:
            raise CheckpointError(f"{path}: has no tensor {name}, though the index says it has")
        return path

    def _safetensors_names(self, path: Path) -> set[str]:
        if path not in self._open:
            self._open[path] = set(self._names_in(path))
        return self._open[path]

    def shape(self, name: str) -> torch.Size:
        """Shape of a tensor, without reading its data."""
        path = self._in_file(name)
        if path.suffix != ".safetensors":
            return self._bin(path)[name].shape
        from safetensors import safe_open

        with _reading(path), safe_open(str(path), framework="pt") as f:
            return torch.Size(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now (a safetensors file is unmapped again right after).

        Raises:
            CheckpointError: The tensor is missing, unreadable, or holds NaN or infinities
                (a model that would train on them without a word).
        """
        if name not in self.files:
            raise CheckpointError(f"{self.directory}: tensor {name} is missing")
        path = self._in_file(name)
        if path.suffix != ".safetensors":
            tensor = self._bin(path)[name]
        else:
            from safetensors import safe_open

            with _reading(path), safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(name)
        return check_finite(tensor, f"{path}: tensor {name}")


def save_hf_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    directory: str | os.PathLike,
    config: dict,
    max_shard_bytes: int = 5 << 30,
) -> None:
    """Write tensors as sharded safetensors with an index, plus ``config.json``.

    Tensors are consumed one at a time and each shard is written as soon as it is full, so at
    most one shard is held in memory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    total_bytes = 0
    weight_map: dict[str, int] = {}
    written: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(written) + 1:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            written.append(name)
            shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total_bytes += size
        weight_map[name] = len(written)
    flush()
    total = len(written)
    final_names = {}
    for i, name in enumerate(written):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(directory / name, directory / final)
        final_names[i] = final
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": {name: final_names[i] for name, i in sorted(weight_map.items())},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
