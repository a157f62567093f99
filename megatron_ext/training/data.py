"""Training and validation data: megatron-core's blended GPT datasets, batched per rank.

The training set is megatron-core's ``BlendedDataset`` over each dataset's training part, with
the ``--data-path`` weights (token shares: every sample has ``seq_length + 1`` tokens; without
weights, each dataset's share of the tokens, as Megatron-LM blends). Each dataset is read epoch
after epoch, each epoch a one-epoch megatron-core ``GPTDataset`` shuffled and packed with its own
seed: the order of the samples does not depend on how many the run needs (see
:class:`EpochwiseDataset`). Each dataset's validation split, and each held-out dataset of
``--valid-data-path`` (whole), is built alone, so that validation loss and bits per character
are reported per language. Each iteration reads the global batch of samples
``[consumed, consumed + global_batch_size)``, ``consumed`` being the samples read before it;
each data-parallel rank takes its contiguous slice of it
(megatron's pretraining sampler), so the data position is one number, saved with every
checkpoint, and a resumed run reads exactly the batches an uninterrupted one would, even with
another global batch size or more iterations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split, normalize

from megatron_ext.data.indexed import IndexedDatasetError, check_indexed_files
from megatron_ext.hashing import sha256_file
from megatron_ext.tokenizer.encoders import (
    SentencePieceEncoder,
    first_other_piece,
    load_sentencepiece,
)
from megatron_ext.training.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """One micro-batch, ``[micro_batch_size, seq_length]`` tensors on the training device."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None


class DatasetTokenizer:
    """What megatron-core's GPT datasets read of a tokenizer: sizes, end of document, identity.

    ``unique_identifiers`` enters megatron-core's dataset-cache key, so indices built for one
    tokenizer are never reused for another.
    """

    def __init__(self, encoder: SentencePieceEncoder, model_path: str) -> None:
        self.vocab_size = encoder.vocab_size
        self.eod = encoder.eod
        self.model_path = model_path
        self.sha256 = sha256_file(model_path)
        self.unique_identifiers = {
            "class": "SentencePieceTokenizer",
            "tokenizer_model_sha256": self.sha256,
        }


def check_datasets(
    prefixes: list[str], tokenizer: DatasetTokenizer, split: str, flag: str = "--data-path"
) -> list[str]:
    """Check each dataset's files and split, and compare its tokenizer with the run's.

    ``megatron-ext preprocess`` records its tokenizer's sha256 and size in
    ``{prefix}.stats.json``; datasets without that record (Megatron-LM's own tool) are left to the
    per-batch check in :func:`micro_batches`.

    Args:
        prefixes: The datasets.
        tokenizer: The run's tokenizer.
        split: The train/validation/test shares they are read with (megatron-core's form).
        flag: The option that named them, for the messages.

    Raises:
        ConfigError: A dataset's ``.bin`` or ``.idx`` file is missing or not as long as its index
            says, ``split`` gives a part of it a share but no sequences, or a dataset was made
            with a larger vocabulary than the run's (its ids would fall outside the embedding) or
            with one whose ids name other pieces.

    A dataset made with another tokenizer is accepted if each of its ids names the same piece in
    the run's tokenizer: the base of an expanded one (named in the run's ``expansion.json``, or
    compared piece by piece when the record's tokenizer file is at hand).

    Returns:
        A warning for each dataset made with another tokenizer file that cannot be compared.
    """
    warnings = []
    for prefix in prefixes:
        missing = [name for name in (prefix + ".bin", prefix + ".idx") if not Path(name).is_file()]
        if missing:
            raise ConfigError(
                f"{flag}: {' and '.join(missing)} not found (a prefix names the pair that "
                "megatron-ext preprocess writes)"
            )
        try:
            sequences, _ = check_indexed_files(prefix)
        except IndexedDatasetError as err:
            raise ConfigError(f"{flag}: {err}") from err
        _check_split_parts(prefix, sequences, split, flag)
        record = Path(prefix + ".stats.json")
        if not record.is_file():
            continue
        try:
            used = json.loads(record.read_text(encoding="utf-8"))["tokenizer"]
            size, sha256 = int(used["vocab_size"]), used["sha256"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{record}: not a preprocessing record ({err!r})") from err
        if size > tokenizer.vocab_size:
            raise ConfigError(
                f"{record}: {prefix} was tokenized with {used.get('model')} ({size:,} pieces), "
                f"larger than --tokenizer-model {tokenizer.model_path} "
                f"({tokenizer.vocab_size:,} pieces)"
            )
        if sha256 == tokenizer.sha256:
            continue
        made_with = f"{prefix} was tokenized with {used.get('model')} ({size:,} pieces)"
        other_piece = _first_other_piece(used, tokenizer)
        if other_piece:
            raise ConfigError(
                f"{record}: {made_with}, whose ids name other pieces than in --tokenizer-model "
                f"{tokenizer.model_path} ({other_piece}): preprocess it again with the run's "
                "tokenizer"
            )
        if other_piece is None:
            warnings.append(
                f"warning: {made_with}, not --tokenizer-model {tokenizer.model_path}, and that "
                "file is not there to compare: fine if it is the base tokenizer of the expanded "
                f"one, wrong for any other ({record})"
            )
    return warnings


def _check_split_parts(prefix: str, sequences: int, split: str, flag: str) -> None:
    """Refuse a split part with a share but no sequences: megatron-core would hang on it.

    megatron-core gives each part with a share the sequences from ``round(start * n)`` to
    ``round(end * n)``; an empty one makes ``GPTDataset`` count epochs of 0 tokens forever.
    """
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for part, bookends in zip(("train", "validation", "test"), matrix, strict=True):
        if bookends is None:
            continue
        start, end = (int(round(bookend * sequences)) for bookend in bookends)
        if start == end:
            raise ConfigError(
                f"{flag}: {prefix} has {sequences:,} sequences and its {part} part of "
                f"--split {split} gets none of them (megatron-core would wait forever for its "
                "samples): give that part a larger share, or 0"
                if sequences
                else f"{flag}: {prefix} holds no sequences (an empty input to preprocess?)"
            )


def _first_other_piece(used: dict, tokenizer: DatasetTokenizer) -> str | None:
    """Where the ids of the tokenizer in a preprocessing record mean another piece in the run's.

    Returns:
        "" when every id of ``used`` names the same piece in the run's tokenizer (its base, for
        an expanded one), the first id that does not (with both pieces), or None when the
        record's tokenizer file is neither the base named in the run's ``expansion.json`` nor
        at its recorded path.
    """
    expansion = Path(tokenizer.model_path).with_name("expansion.json")
    if expansion.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            base = json.loads(expansion.read_text(encoding="utf-8"))["inputs"]["base_model"]
            if base["sha256"] == used["sha256"]:
                return ""
    model = used.get("model")
    if not (model and Path(model).is_file() and sha256_file(model) == used["sha256"]):
        return None
    theirs, ours = load_sentencepiece(model), load_sentencepiece(tokenizer.model_path)
    i = first_other_piece(theirs, ours)
    if i is None:
        return ""
    return f"id {i:,} is {theirs.id_to_piece(i)!r} there, {ours.id_to_piece(i)!r} here"


# A held-out dataset is validation data from end to end.
HELD_OUT_SPLIT = "0,1,0"
# Saved with each checkpoint: how the samples of a dataset read more than once are ordered.
# Checkpoints without it used megatron-core's order, which depended on the run's sample count;
# "epochwise" ones read every epoch in the first epoch's packing.
DATA_ORDER = "epochwise-repacked"


@dataclass
class Datasets:
    """The training blend and the validation sets by name (``TrainConfig.validation_sets``)."""

    train: torch.utils.data.Dataset
    valid: dict[str, torch.utils.data.Dataset]


def index_cache_dir(config: TrainConfig, prefixes: list[str]) -> str:
    """Where megatron-core caches the sample indices of the datasets at ``prefixes``.

    megatron-core names its cached indices by the prefix and the settings, not by the files'
    contents: a dataset rewritten under the same prefix (``preprocess --force``) would meet the
    old dataset's indices: an IndexError when it shrank and, when it grew, samples laid out for
    the old documents (the added ones never read), without an error. So the indices go into a
    subdirectory named by the files' sizes and modification times.
    """
    base = config.data_cache_path or os.path.join(os.path.dirname(prefixes[0]), "cache")
    digest = hashlib.sha256()
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            stat = os.stat(prefix + suffix)
            digest.update(f"{prefix}{suffix} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    path = os.path.join(base, digest.hexdigest()[:16])
    # Here, on every rank: megatron-core writes on rank 0 alone, where a failure would leave
    # the other ranks waiting at its barrier. A read-only cache that holds the indices is fine.
    try:
        os.makedirs(path, exist_ok=True)
        empty = not os.listdir(path)
    except OSError as err:
        raise ConfigError(_cache_error(config, path, err.strerror)) from err
    if empty and not os.access(path, os.W_OK):
        raise ConfigError(_cache_error(config, path, "not writable"))
    return path


def _cache_error(config: TrainConfig, path: str, why: str) -> str:
    where = "--data-cache-path" if config.data_cache_path else "the default, beside the data"
    return (
        f"dataset index cache {path} ({where}): {why}; give a writable directory with "
        "--data-cache-path"
    )


def _dataset_config(
    config: TrainConfig, tokenizer: DatasetTokenizer, blend, split: str
) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        blend=blend,
        split=split,
        path_to_cache=index_cache_dir(config, blend[0]),
        tokenizer=tokenizer,
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=config.reset_attention_mask,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=config.reset_attention_mask,
    )


def build_datasets(
    config: TrainConfig, tokenizer: DatasetTokenizer, train_samples: int | None = None
) -> Datasets:
    """Build (or load from megatron-core's index cache) the training and validation datasets.

    Needs ``torch.distributed`` initialised (megatron-core builds the indices on rank 0 first).

    Args:
        config: The run's settings.
        tokenizer: End-of-document id and identity for the index cache.
        train_samples: Samples the training blend must provide (default: the whole run's).

    The datasets must have passed :func:`check_datasets` (megatron-core hangs on an empty part).
    """
    if train_samples is None:
        train_samples = config.train_iters * config.global_batch_size
    valid_samples = max(config.eval_iters, 1) * config.global_batch_size
    valid = {}
    for name, (prefix, held_out) in config.validation_sets().items():
        split = HELD_OUT_SPLIT if held_out else config.split
        part = _one_part(_dataset_config(config, tokenizer, ([prefix], None), split), Split.valid)
        valid[name] = _build([0, valid_samples, 0], part)[Split.valid.value]
    return Datasets(train=_training_blend(config, tokenizer, train_samples), valid=valid)


class EpochwiseDataset(torch.utils.data.Dataset):
    """One dataset's training part read epoch after epoch, each epoch shuffled and packed anew.

    megatron-core's ``GPTDataset`` shuffles the documents of all the epochs a sample count needs
    together, so its order depends on the count: a run resumed with more iterations (or a larger
    batch) would continue its saved position in a reshuffled order, reading again samples it
    had trained on. Here each epoch is a one-epoch ``GPTDataset`` of its own: the first in
    megatron-core's own order, epoch ``e`` with a seed drawn from the run's seed and ``e`` alone,
    so its documents are shuffled and packed into samples anew. The samples of any count are the
    first of every larger count, each document once per epoch. The epochs share the dataset's
    open files, and one epoch besides the first has its indices open at a time.

    Args:
        first: The dataset's training part, one epoch (megatron-core's ``num_samples=None``).
        epochs: How many epochs to read.
        seed: The run's seed.
    """

    def __init__(self, first: GPTDataset, epochs: int, seed: int) -> None:
        self.first = first
        self.epochs = epochs
        self.seed = seed
        self.epoch_samples = len(first)
        self.dataset_path = first.dataset_path
        self.index_split = first.index_split  # read by megatron-core's BlendedDataset
        self.unique_identifiers = {
            "class": type(self).__name__,
            "first": first.unique_identifiers,
            "epochs": epochs,
        }
        self._open: tuple[int, GPTDataset] = (0, first)

    def build_epoch_indices(self) -> None:
        """Build and cache every later epoch's indices: on rank 0 first, as megatron-core's."""
        for epoch in range(1, self.epochs):
            BlendedMegatronDatasetBuilder.build_generic_dataset(
                GPTDataset, lambda: True, True, *self._epoch_args(epoch)
            )

    def _epoch_args(self, epoch: int) -> tuple:
        first = self.first
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        config = dataclasses.replace(first.config, random_seed=seed)
        return first.dataset, first.dataset_path, first.indices, None, first.index_split, config

    def epoch(self, epoch: int) -> GPTDataset:
        """The one-epoch ``GPTDataset`` of ``epoch`` (counted from 0)."""
        if not epoch:
            return self.first
        if self._open[0] != epoch:
            # The indices build_epoch_indices cached: loaded on every rank, not built.
            dataset = GPTDataset(*self._epoch_args(epoch))
            # Samples are counted from the tokens, whatever their order: a megatron-core that
            # counted otherwise would shift every later sample of the blend.
            if len(dataset) != self.epoch_samples:
                raise RuntimeError(
                    f"{self.dataset_path}: epoch {epoch} holds {len(dataset)} samples, the "
                    f"first {self.epoch_samples}"
                )
            self._open = epoch, dataset
        return self._open[1]

    def __len__(self) -> int:
        return self.epoch_samples * self.epochs

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, sample = divmod(int(index), self.epoch_samples)
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"sample {index} of {self.dataset_path}'s {len(self)}")
        return self.epoch(epoch)[sample]


def _training_blend(
    config: TrainConfig, tokenizer: DatasetTokenizer, samples: int
) -> BlendedDataset | EpochwiseDataset:
    """At least ``samples`` training samples: the datasets read epoch by epoch, blended."""
    prefixes, weights = config.data_blend
    blend_config = _dataset_config(config, tokenizer, (prefixes, weights), config.split)
    first_epochs = [_training_epoch(blend_config, prefix) for prefix in prefixes]
    for prefix, first in zip(prefixes, first_epochs, strict=True):
        if not len(first):
            tokens = int(np.sum(first.dataset.sequence_lengths[first.indices]))
            raise ConfigError(
                f"--data-path: the training part of {prefix} holds {tokens:,} tokens, less than "
                f"one sample (--seq-length {config.seq_length} + 1): too small to train on"
            )
    if weights is None:
        weights = [float(len(epoch)) for epoch in first_epochs]
    weights = normalize(weights)
    # megatron-core's builder sizes the blend so: each dataset's share rounded up.
    size = sum(math.ceil(samples * weight) for weight in weights)
    datasets = [
        # The blend's greedy draw takes at most weight * size + 1 samples from a dataset.
        EpochwiseDataset(first, math.ceil((math.ceil(size * weight) + 1) / len(first)), config.seed)
        for first, weight in zip(first_epochs, weights, strict=True)
    ]
    with _index_cache_errors(blend_config):
        for dataset in datasets:
            dataset.build_epoch_indices()
        if len(datasets) == 1:
            return datasets[0]
        # On rank 0 first, which writes the index cache, as megatron-core's builder does.
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            BlendedDataset, lambda: True, True, datasets, weights, size, blend_config
        )


def _training_epoch(blend_config: GPTDatasetConfig, prefix: str) -> GPTDataset:
    """One epoch of the training part of ``prefix``, in megatron-core's order."""
    epoch_config = dataclasses.replace(blend_config, blend=([prefix], None))
    # Size None: one epoch (megatron-core's meaning).
    return _build([None, 0, 0], _one_part(epoch_config, Split.train))[Split.train.value]


def _one_part(dataset_config: GPTDatasetConfig, part: Split) -> GPTDatasetConfig:
    """``dataset_config``, building only ``part`` of its split.

    megatron-core builds every part with a share, a whole epoch of indices each, a size of 0 too.
    """
    matrix = dataset_config.split_matrix
    dataset_config.split_matrix = [m if i == part.value else None for i, m in enumerate(matrix)]
    return dataset_config


def _build(sizes: list[int | None], dataset_config: GPTDatasetConfig) -> list:
    """megatron-core's datasets of each split part, or None for a part not built."""
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, dataset_config)
    with _index_cache_errors(dataset_config):
        return builder.build()


@contextlib.contextmanager
def _index_cache_errors(dataset_config: GPTDatasetConfig) -> Iterator[None]:
    """megatron-core's failure to build the indices, as a ConfigError naming the cache."""
    try:
        yield
    except Exception as err:
        # megatron-core raises a bare Exception from any OSError while it builds (rank 0).
        cause = err.__cause__
        if not isinstance(cause, OSError):
            raise
        path = dataset_config.path_to_cache
        unwritable = cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC)
        hint = "; give a writable directory with --data-cache-path" if unwritable else ""
        raise ConfigError(
            f"dataset index cache {path}: the indices could not be built ({cause}){hint}"
        ) from err


def dataset_reads(
    train: BlendedDataset | EpochwiseDataset, samples: int
) -> list[tuple[float, float]]:
    """(share of the samples, epochs read) of each training dataset in the first ``samples``."""
    if isinstance(train, EpochwiseDataset):
        datasets, drawn = [train], [samples]
    else:
        datasets = train.datasets
        drawn = np.bincount(np.asarray(train.dataset_index[:samples]), minlength=len(datasets))
    return [
        (int(count) / samples, int(count) / dataset.epoch_samples)
        for dataset, count in zip(datasets, drawn, strict=True)
    ]


def training_data_summary(reads: list[tuple[float, float]], samples: int, names: list[str]) -> str:
    """One line: each dataset's share of the run's ``samples`` and how many epochs of it they are.

    A weight that repeats a small corpus many times over is otherwise seen nowhere.
    """
    parts = [
        f"{name} {share:.1%} ({epochs:.2f} epochs)"
        for name, (share, epochs) in zip(names, reads, strict=True)
    ]
    return f"training data, {samples:,} samples: " + ", ".join(parts)


def repeated_validation_warnings(valid: dict[str, GPTDataset], config: TrainConfig) -> list[str]:
    """A warning for each validation set that one validation reads twice over or more.

    megatron-core repeats a set smaller than ``eval_iters`` global batches (as many epochs as
    needed): the estimate gains nothing from the repeats, but they cost forward passes.
    """
    batch_tokens = config.global_batch_size * config.seq_length
    read = config.eval_iters * batch_tokens
    warnings = []
    for name, dataset in valid.items():
        tokens = int(np.sum(dataset.dataset.sequence_lengths[dataset.indices]))
        if read >= 2 * tokens:
            once = math.ceil(tokens / batch_tokens)
            warnings.append(
                f"warning: validation set {name!r} ({dataset.dataset_path}) holds {tokens:,} "
                f"tokens and --eval-iters {config.eval_iters} reads {read:,}, "
                f"{read / tokens:.1f} times over: --eval-iters {once} reads all of it once"
            )
    return warnings


def micro_batches(
    dataset: torch.utils.data.Dataset,
    first_sample: int,
    config: TrainConfig,
    data_parallel_rank: int,
    data_parallel_size: int,
    device: torch.device,
    vocab_size: int,
) -> Iterator[Batch]:
    """This rank's micro-batches of the global batch that starts at sample ``first_sample``.

    Raises:
        ConfigError: A sample holds a token id outside the vocabulary (the fused embedding would
            otherwise read it as another rank's row and return zeros).
    """
    per_rank = config.global_batch_size // data_parallel_size
    start = first_sample + data_parallel_rank * per_rank
    for offset in range(0, per_rank, config.micro_batch_size):
        indices = range(start + offset, start + offset + config.micro_batch_size)
        samples = [dataset[i] for i in indices]
        for index, sample in zip(indices, samples, strict=True):
            top = int(max(sample["tokens"].max(), sample["labels"].max()))
            if top >= vocab_size:
                raise ConfigError(
                    f"{_source(dataset, index)}: token id {top:,} in sample {index} is outside "
                    f"the vocabulary of --tokenizer-model {config.tokenizer_model} "
                    f"({vocab_size:,} pieces): preprocessed with another tokenizer?"
                )
        yield _collate(samples, device)


def _source(dataset: torch.utils.data.Dataset, index: int) -> str:
    """The dataset prefix sample ``index`` of a blend (or of one dataset) comes from."""
    if hasattr(dataset, "dataset_index"):
        dataset = dataset.datasets[dataset.dataset_index[index]]
    return dataset.dataset_path


def _collate(samples: list[dict[str, torch.Tensor]], device: torch.device) -> Batch:
    def stack(key: str) -> torch.Tensor:
        return torch.stack([s[key] for s in samples]).to(device, non_blocking=True)

    attention_mask = stack("attention_mask") if "attention_mask" in samples[0] else None
    return Batch(
        tokens=stack("tokens"),
        labels=stack("labels"),
        loss_mask=stack("loss_mask"),
        position_ids=stack("position_ids"),
        attention_mask=attention_mask,
    )
