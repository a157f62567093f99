"""Training and validation data: megatron-core's blended GPT datasets, batched per rank.

The training set is megatron-core's ``BlendedMegatronDatasetBuilder`` over ``GPTDataset`` with
the ``--data-path`` weights (token shares: every sample has ``seq_length + 1`` tokens). Each
dataset's validation split is also built alone, so that validation loss and bits per character
are reported per language. Each iteration reads the global batch of samples
``[consumed, consumed + global_batch_size)``, ``consumed`` being the samples read before it; each
data-parallel rank takes its contiguous slice of it (megatron's pretraining sampler), so the data
position is one number, saved with every checkpoint, and a resumed run reads exactly the batches
an uninterrupted one would, even with another global batch size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_ext.hashing import sha256_file
from megatron_ext.tokenizer.encoders import SentencePieceEncoder
from megatron_ext.training.config import TrainConfig

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
        self.unique_identifiers = {
            "class": "SentencePieceTokenizer",
            "tokenizer_model_sha256": sha256_file(model_path),
        }


@dataclass
class Datasets:
    """The training blend and one validation set per dataset name."""

    train: torch.utils.data.Dataset
    valid: dict[str, torch.utils.data.Dataset]


def _dataset_config(config: TrainConfig, tokenizer: DatasetTokenizer, blend) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        blend=blend,
        split=config.split,
        path_to_cache=config.data_cache_path or os.path.join(os.path.dirname(blend[0][0]), "cache"),
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
    """
    prefixes, weights = config.data_blend
    if train_samples is None:
        train_samples = config.train_iters * config.global_batch_size
    valid_samples = max(config.eval_iters, 1) * config.global_batch_size
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset,
        [train_samples, 0, 0],
        lambda: True,
        _dataset_config(config, tokenizer, (prefixes, weights)),
    ).build()
    valid = {}
    for name, prefix in zip(config.dataset_names(), prefixes, strict=True):
        _, dataset, _ = BlendedMegatronDatasetBuilder(
            GPTDataset,
            [0, valid_samples, 0],
            lambda: True,
            _dataset_config(config, tokenizer, ([prefix], None)),
        ).build()
        if dataset is None:
            raise ValueError(
                f"{prefix}: no validation documents with --split {config.split} "
                "(give the validation split a share)"
            )
        valid[name] = dataset
    return Datasets(train=train, valid=valid)


def micro_batches(
    dataset: torch.utils.data.Dataset,
    first_sample: int,
    config: TrainConfig,
    data_parallel_rank: int,
    data_parallel_size: int,
    device: torch.device,
) -> Iterator[Batch]:
    """This rank's micro-batches of the global batch that starts at sample ``first_sample``."""
    per_rank = config.global_batch_size // data_parallel_size
    start = first_sample + data_parallel_rank * per_rank
    for offset in range(0, per_rank, config.micro_batch_size):
        samples = [dataset[start + offset + k] for k in range(config.micro_batch_size)]
        yield _collate(samples, device)


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


def token_counts_by_dataset(dataset: torch.utils.data.Dataset, samples: int) -> np.ndarray:
    """How many of the first ``samples`` samples of a blend come from each of its datasets."""
    return np.bincount(np.asarray(dataset.dataset_index[:samples]), minlength=len(dataset.datasets))
