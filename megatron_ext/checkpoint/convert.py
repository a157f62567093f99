"""Hugging Face Llama <-> megatron-core distributed checkpoints, with vocabulary expansion.

``hf_to_megatron`` reads the HF tensors one at a time into megatron-core's layout (bf16, fp16 or
fp32) and saves them with ``dist_checkpointing`` (torch_dist). The sharded state dict comes from a
model built on the *meta* device, so no memory is spent on a model copy, but every converted tensor
is held until the save: the peak is about the model's size in the stored dtype (1.2x measured,
beside 0.4 GB of imports; ``megatron_to_hf`` 1.6x), so a 70B model needs some 170 GB of host
memory in bf16. Keys and global shapes are megatron-core's own, so the checkpoint loads at any
TP/PP (``load_into``); only the vocabulary padding (a multiple of 128 x TP) depends on the TP
given at conversion, and it is recorded in ``megatron_ext.json`` with the true vocabulary size.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext.arch import LlamaArch
from megatron_ext.checkpoint.hf import (
    CheckpointError,
    HFCheckpoint,
    check_finite,
    expected_shapes,
    read_json_file,
    save_hf_checkpoint,
)
from megatron_ext.checkpoint.layout import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT_LAYER,
    hf_layer_to_megatron,
    hf_name,
    megatron_layer_to_hf,
)
from megatron_ext.embeddings.init import (
    SAMPLED_INITS,
    check_init_method,
    init_new_rows,
    subword_decomposition,
)
from megatron_ext.hashing import sha256_file
from megatron_ext.outputs import atomic_directory, check_output_dir
from megatron_ext.tokenizer.encoders import (
    SentencePieceEncoder,
    TokenizerLoadError,
    first_other_piece,
    load_sentencepiece,
)
from megatron_ext.tokenizer.sp_proto import Piece, parse_model

METADATA = "megatron_ext.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# dist_checkpointing raises many types, and torch's CheckpointException (a failed rank's reads
# or writes, gathered on every rank) derives from BaseException, not Exception.
DIST_CHECKPOINT_ERRORS = (Exception, CheckpointException)


def error_cause(err: BaseException) -> str:
    """``Type: last line`` of an error.

    torch's CheckpointException carries every failed rank's whole traceback in its message; the
    last line says what went wrong.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else 'no message'}"


def load_dist_checkpoint(sharded: dict, checkpoint_dir: str | os.PathLike) -> dict:
    """``dist_checkpointing.load``, its failures a CheckpointError naming the checkpoint.

    Raises:
        CheckpointError: The checkpoint cannot be read, or one of its tensors has another
            global shape than ``sharded`` expects (torch's reader would load the overlap only:
            a model with a smaller vocabulary would get the first rows without a word).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    common = Path(checkpoint_dir) / COMMON_STATE_FNAME
    if not common.is_file():
        # megatron-core's own message for this is an AttributeError from its error path.
        found = "damaged or incomplete" if common.parent.is_dir() else "no such directory"
        raise CheckpointError(f"{checkpoint_dir}: no {common.name} there ({found})")
    try:
        stored = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
        for tensor in nested_values(sharded):
            if not isinstance(tensor, ShardedTensor) or tensor.key not in stored:
                continue
            saved = tuple(stored[tensor.key].global_shape)
            if saved != tuple(tensor.global_shape):
                raise CheckpointError(
                    f"{checkpoint_dir}: {tensor.key} is {list(saved)} there but "
                    f"{list(tensor.global_shape)} in the model loading it (another vocabulary "
                    "or architecture)"
                )
        return dist_checkpointing.load(sharded, str(checkpoint_dir))
    except CheckpointError:
        raise
    except DIST_CHECKPOINT_ERRORS as err:
        raise CheckpointError(f"{checkpoint_dir}: cannot load ({error_cause(err)})") from err


def _vocabulary_plan(
    hf: HFCheckpoint, tokenizer_model: str | None, base_tokenizer_model: str | None
) -> tuple[int, list[Piece], str | None]:
    """(new vocabulary size, new pieces, base tokenizer path) after checking the tokenizers."""
    if tokenizer_model is None:
        return hf.arch.vocab_size, [], None
    new = load_sentencepiece(tokenizer_model)
    base_path = base_tokenizer_model or str(hf.directory / "tokenizer.model")
    if not os.path.isfile(base_path):
        raise CheckpointError(
            f"{base_path}: the base tokenizer is needed to grow the vocabulary "
            "(pass --base-tokenizer-model)"
        )
    base = load_sentencepiece(base_path)
    old_size = hf.arch.vocab_size
    if len(new) < old_size:
        raise CheckpointError(
            f"{tokenizer_model}: {len(new)} pieces, fewer than the checkpoint's vocabulary of "
            f"{old_size} (a checkpoint with added tokens, e.g. 32001, needs a tokenizer that has "
            "them too)"
        )
    if len(base) != old_size:
        raise CheckpointError(
            f"{base_path}: {len(base)} pieces but the checkpoint's vocabulary is {old_size}"
        )
    i = first_other_piece(base, new)
    if i is not None:
        raise CheckpointError(
            f"{tokenizer_model}: piece {i} is {new.id_to_piece(i)!r}, the base has "
            f"{base.id_to_piece(i)!r}: the new tokenizer must extend the base one"
        )
    return len(new), parse_model(Path(tokenizer_model).read_bytes()).pieces[old_size:], base_path


def _pieces_sha256(tokenizer_model: str, vocab_size: int) -> str | None:
    """The fingerprint of the tokenizer whose ids the rows follow (None: no such file at hand).

    Without growth that is the Hugging Face checkpoint's own ``tokenizer.model``, if it has a
    SentencePiece one of the model's size.
    """
    if not os.path.isfile(tokenizer_model):
        return None
    try:
        encoder = SentencePieceEncoder(tokenizer_model)
    except TokenizerLoadError:
        return None
    return encoder.pieces_sha256() if encoder.vocab_size == vocab_size else None


def _vocab_rows(
    base_rows: torch.Tensor,
    padded: int,
    method: str,
    new_pieces: list[Piece],
    decomposition: list[list[int]] | None,
    generator: torch.Generator,
) -> torch.Tensor:
    parts = [base_rows]
    if new_pieces:
        parts.append(
            init_new_rows(
                method,
                base_rows,
                len(new_pieces),
                decomposition=decomposition,
                generator=generator,
            )
        )
    true_size = base_rows.shape[0] + len(new_pieces)
    # Padding rows are zero: their logits are exactly 0 and are dropped on export.
    parts.append(torch.zeros(padded - true_size, base_rows.shape[1], dtype=base_rows.dtype))
    return torch.cat(parts)


def _cast(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``tensor`` in ``dtype``, refused when it holds, or the cast makes, a NaN or an infinity.

    bf16 and fp32 weights above fp16's 65,504 become infinities in fp16. One check after the
    cast covers both: a cast keeps NaN and infinities (``HFCheckpoint.get`` has already named
    a source tensor's own).
    """
    return check_finite(tensor.to(dtype).contiguous(), f"{what} cast to {dtype}")


def _meta_model(arch: LlamaArch, padded_vocab: int, dtype: torch.dtype):
    from megatron_ext.model.gpt import build_gpt_model

    config = arch.transformer_config(
        1, 1, perform_initialization=False, params_dtype=dtype, use_cpu_initialization=True
    )
    with torch.device("meta"):
        return build_gpt_model(arch, config, padded_vocab, use_transformer_engine=False)


def hf_to_megatron(
    hf_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    tokenizer_model: str | None = None,
    base_tokenizer_model: str | None = None,
    embedding_init: str = "avg_subwords",
    make_vocab_size_divisible_by: int = 128,
    dtype: str = "bf16",
    freeze_base_rows: bool = False,
    seed: int = 1234,
    force: bool = False,
) -> dict:
    """Convert (and optionally grow) a Hugging Face Llama checkpoint to megatron-core.

    Needs ``torch.distributed`` initialised (one process is enough: ``distributed.init()``).

    Returns:
        The metadata written next to the checkpoint.

    Raises:
        CheckpointError: Bad inputs (the message names the file or tensor).
        ArchitectureError: The model or its padded vocabulary cannot be split over these ranks.
        OutputExistsError: ``output_dir`` exists and ``force`` is false.
        ValueError: ``embedding_init`` is not one of ``INIT_METHODS``.
    """
    from megatron.core import dist_checkpointing

    check_init_method(embedding_init)
    output_dir = Path(output_dir)
    check_output_dir(
        output_dir,
        force,
        [
            ("--hf-dir", hf_dir),
            ("--tokenizer-model", tokenizer_model),
            ("--base-tokenizer-model", base_tokenizer_model),
        ],
    )
    hf = HFCheckpoint(hf_dir)
    hf.arch.check_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
    vocab_size, new_pieces, base_path = _vocabulary_plan(hf, tokenizer_model, base_tokenizer_model)
    arch = hf.arch.with_vocab_size(vocab_size)
    padded = arch.padded_vocab_size(tensor_model_parallel_size, make_vocab_size_divisible_by)
    arch.check_vocab_split(padded, tensor_model_parallel_size)
    torch_dtype = DTYPES[dtype]

    decomposition = None
    if new_pieces and embedding_init == "avg_subwords":
        try:
            decomposition = subword_decomposition(new_pieces, base_path, hf.arch.vocab_size)
        except ValueError as err:
            raise CheckpointError(f"{tokenizer_model}: {err} ({base_path})") from err
    generator = torch.Generator().manual_seed(seed)

    def converted():
        for name in (EMBEDDING,) if arch.tie_word_embeddings else (EMBEDDING, OUTPUT_LAYER):
            rows = hf.get(hf_name(name)).float()
            yield (
                name,
                _vocab_rows(rows, padded, embedding_init, new_pieces, decomposition, generator),
            )
        yield FINAL_NORM, hf.get(hf_name(FINAL_NORM))
        for layer in range(arch.num_layers):
            yield from hf_layer_to_megatron(hf.get, layer, arch)

    from tqdm import tqdm

    sharded = _meta_model(arch, padded, torch_dtype).sharded_state_dict()
    sharded = {k: v for k, v in sharded.items() if not k.endswith("_extra_state")}
    progress = tqdm(converted(), "converting", len(sharded), unit=" tensors", disable=None)
    for name, tensor in progress:
        if name not in sharded:
            raise CheckpointError(f"no megatron-core weight {name} for this architecture")
        sharded[name].data = _cast(tensor, torch_dtype, f"converted {name}")

    with atomic_directory(output_dir, force=force) as staging:
        dist_checkpointing.save(sharded, str(staging))
        metadata = {
            "format": "megatron-core dist_checkpointing (torch_dist)",
            "arch": asdict(arch),
            "vocab_size": vocab_size,
            "padded_vocab_size": padded,
            "base_vocab_size": hf.arch.vocab_size,
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
            "tensor_model_parallel_size": tensor_model_parallel_size,
            "pipeline_model_parallel_size": pipeline_model_parallel_size,
            "dtype": dtype,
            "source_dtype": str(hf.get(hf_name(FINAL_NORM)).dtype).removeprefix("torch."),
            "embedding_init": embedding_init if new_pieces else None,
            # What reproduces the sampling methods' rows.
            "seed": seed if new_pieces and embedding_init in SAMPLED_INITS else None,
            "freeze_base_rows": freeze_base_rows,
            "trainable_rows": [hf.arch.vocab_size, vocab_size] if freeze_base_rows else None,
            "tokenizer_sha256": sha256_file(tokenizer_model) if tokenizer_model else None,
            "tokenizer_pieces_sha256": _pieces_sha256(
                tokenizer_model or base_tokenizer_model or str(hf.directory / "tokenizer.model"),
                vocab_size,
            ),
            "source": str(hf.directory.resolve()),
        }
        (staging / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def read_metadata(checkpoint_dir: str | os.PathLike) -> dict:
    """The ``megatron_ext.json`` of a converted checkpoint."""
    path = Path(checkpoint_dir) / METADATA
    if not path.is_file():
        # A training run's directory holds its checkpoints one level down.
        inside = sorted(
            p.parent
            for p in Path(checkpoint_dir).glob(f"iter_*/{METADATA}")
            if not p.parent.suffix  # not one being written (.tmp) or deleted (.deleting)
        )
        hint = f"; its checkpoints are in iter_* directories, e.g. {inside[-1]}" if inside else ""
        raise CheckpointError(f"{path}: not found (not a checkpoint written by megatron-ext){hint}")
    return read_json_file(path)


def model_sharded_state(model) -> dict:
    """megatron-core's sharded state dict of ``model`` without Transformer Engine's extra state."""
    return {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}


def apply_model_state(model, state: dict, source: str | os.PathLike) -> None:
    """Load loaded tensors into ``model``, failing (naming ``source``) on missing or extra keys.

    Raises:
        CheckpointError: Weights missing from or unknown to ``model``.
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_into(model, checkpoint_dir: str | os.PathLike) -> None:
    """Load a converted (or training) checkpoint's weights into this rank's model (any TP/PP)."""
    sharded = model_sharded_state(model)
    state = load_dist_checkpoint(sharded, checkpoint_dir)
    # A training checkpoint also holds optimizer state (its common part comes back too).
    apply_model_state(model, {k: v for k, v in state.items() if k in sharded}, checkpoint_dir)


def _check_export_tokenizer(
    tokenizer_model: str, checkpoint_dir: str, metadata: dict
) -> SentencePieceEncoder:
    """The tokenizer, refused when it is not the one the checkpoint's rows follow.

    Raises:
        CheckpointError: Another number of pieces, or other pieces than the checkpoint recorded.
        TokenizerLoadError: Not a SentencePiece model.
    """
    encoder = SentencePieceEncoder(tokenizer_model)
    vocab_size = metadata["arch"]["vocab_size"]
    if encoder.vocab_size != vocab_size:
        raise CheckpointError(
            f"{tokenizer_model}: {encoder.vocab_size:,} pieces, but {checkpoint_dir} has a "
            f"vocabulary of {vocab_size:,}: export with the tokenizer it was trained with"
        )
    recorded = metadata.get("tokenizer_pieces_sha256")
    actual = encoder.pieces_sha256()
    if recorded and actual != recorded:
        raise CheckpointError(
            f"{tokenizer_model}: as many pieces as {checkpoint_dir}'s vocabulary, but other ones "
            f"(pieces sha256 {actual[:12]}, the checkpoint's {recorded[:12]}): "
            "its ids would name other tokens; export with the tokenizer it was trained with"
        )
    return encoder


def _exportable_tokenizer(tokenizer_model: str):
    """The tokenizer's ``ModelProto`` when Hugging Face files can reproduce it, else why not.

    Returns:
        ``(model, None)`` or ``(None, reason)``.
    """
    from megatron_ext.tokenizer.hf_export import HFExportError, check_exportable

    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        return None, f"{err.name} is not installed (pip install 'megatron-ext[hf]')"
    model = parse_model(Path(tokenizer_model).read_bytes())
    try:
        check_exportable(model)
    except HFExportError as err:
        return None, str(err)
    return model, None


def _special_token_ids(encoder: SentencePieceEncoder | None) -> dict[str, int]:
    """``generation_config.json``'s token ids: the tokenizer's, or Llama-2's without one.

    Llama-2's SentencePiece model has no pad piece, and its own files pad with ``<unk>`` (id 0);
    so does the export of any such tokenizer, so that batched ``generate`` needs no pad setting.
    """
    if encoder is None:
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    processor = encoder.processor
    pad = processor.pad_id() if processor.pad_id() >= 0 else processor.unk_id()
    return {
        "bos_token_id": processor.bos_id(),
        "eos_token_id": processor.eos_id(),
        "pad_token_id": pad,
    }


def megatron_to_hf(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer_model: str | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> dict:
    """Export a converted (or trained) checkpoint back to a Hugging Face directory.

    Padding rows are stripped, so ``config.json``'s ``vocab_size`` is the tokenizer's size. With
    ``tokenizer_model``, the tokenizer goes along: ``tokenizer.model`` and, when they can
    reproduce it, ``tokenizer.json`` and its configuration (which add ``<s>`` as Llama does).
    Needs ``torch.distributed`` initialised (one process).

    Args:
        checkpoint_dir: A converted or training checkpoint written by megatron-ext.
        output_dir: The Hugging Face directory to write.
        tokenizer_model: The tokenizer the checkpoint was made with.
        dtype: ``bf16``, ``fp16`` or ``fp32`` (None: as stored).
        force: Replace an existing ``output_dir``.

    Returns:
        The ``config.json`` written, with ``tokenizer_files_skipped`` (why no Hugging Face
        tokenizer files were written; None when they were, or without ``tokenizer_model``).

    Raises:
        CheckpointError: Not a megatron-ext checkpoint, ``tokenizer_model`` is not the
            checkpoint's tokenizer, or a tensor holds NaN or infinite values (after the cast).
        TokenizerLoadError: ``tokenizer_model`` is missing or not a SentencePiece model.
        OutputExistsError: ``output_dir`` exists and ``force`` is false.
        OutputHoldsInputError: ``output_dir`` is or holds ``checkpoint_dir`` or the tokenizer.
    """
    output_dir = Path(output_dir)
    check_output_dir(
        output_dir,
        force,
        [("--megatron-dir", checkpoint_dir), ("--tokenizer-model", tokenizer_model)],
    )
    metadata = read_metadata(checkpoint_dir)
    arch = LlamaArch(**metadata["arch"])
    encoder, tokenizer_files, skipped = None, None, None
    if tokenizer_model:
        encoder = _check_export_tokenizer(tokenizer_model, str(checkpoint_dir), metadata)
        tokenizer_files, skipped = _exportable_tokenizer(tokenizer_model)
    stored = DTYPES[metadata["dtype"]]
    export_dtype = DTYPES[dtype] if dtype else stored
    model = _meta_model(arch, metadata["padded_vocab_size"], stored)
    sharded = model_sharded_state(model)
    for value in sharded.values():
        if hasattr(value, "data") and isinstance(value.data, torch.Tensor):
            value.data = torch.empty(value.data.shape, dtype=value.data.dtype)
    state = load_dist_checkpoint(sharded, checkpoint_dir)

    def tensors():
        true = arch.vocab_size
        yield "model.embed_tokens.weight", state[EMBEDDING][:true]
        if not arch.tie_word_embeddings:
            yield "lm_head.weight", state[OUTPUT_LAYER][:true]
        yield "model.norm.weight", state[FINAL_NORM]
        for layer in range(arch.num_layers):
            yield from megatron_layer_to_hf(state.__getitem__, layer, arch)

    def cast():
        for name, tensor in tensors():
            yield name, _cast(tensor, export_dtype, f"{checkpoint_dir}: {name}")

    special_ids = _special_token_ids(encoder)
    with atomic_directory(output_dir, force=force) as staging:
        config = arch.to_hf_config(
            torch_dtype=str(export_dtype).removeprefix("torch."),
            bos_token_id=special_ids["bos_token_id"],
            eos_token_id=special_ids["eos_token_id"],
        )
        from tqdm import tqdm

        total = len(expected_shapes(arch))
        save_hf_checkpoint(
            tqdm(cast(), "exporting", total, unit=" tensors", disable=None), staging, config
        )
        generation = {**special_ids, "max_length": arch.max_position_embeddings}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer_model:
            shutil.copy(tokenizer_model, staging / "tokenizer.model")
        if tokenizer_files is not None:
            from megatron_ext.tokenizer.hf_export import save_hf_files

            save_hf_files(tokenizer_files, staging)
    return {**config, "tokenizer_files_skipped": skipped}
