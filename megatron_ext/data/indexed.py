r"""Writer (and a size check) for Megatron's indexed dataset format (``.bin`` + ``.idx``).

Byte-compatible with ``megatron.core.datasets.indexed_dataset`` (``IndexedDatasetBuilder`` writes
the same bytes, ``IndexedDataset`` reads ours), but takes whole blocks of documents as NumPy arrays
so that writing costs a few large ``write`` calls instead of Python work per document. It does not
import torch or megatron-core, which keeps worker start-up and the write path light.

Format (megatron/core/datasets/indexed_dataset.py): ``.bin`` is the raw token ids, no header.
``.idx`` is ``MMIDIDX\\x00\\x00``, ``<Q`` version 1, ``<B`` dtype code, ``<Q`` sequence count,
``<Q`` document-index count, int32 sequence lengths, int64 byte pointers, int64 document indices
(sequence numbers where documents start, beginning with 0 and ending with the sequence count).
"""

from __future__ import annotations

import os
import struct

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1

# megatron.core.datasets.indexed_dataset.DType
DTYPE_CODES: dict[type[np.number], int] = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}

# DType.optimal_dtype: Megatron switches to int32 at 65,500, not at 65,536.
UINT16_VOCAB_LIMIT = 65500


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair that is not a whole Megatron indexed dataset (names the file)."""


# Magic, version, dtype code, sequence count, document-index count.
_HEADER = struct.Struct("<QBQQ")
_HEADER_SIZE = len(INDEX_HEADER) + _HEADER.size


def check_indexed_files(prefix: str) -> tuple[int, int]:
    """Check that ``prefix``'s ``.idx`` is whole and its ``.bin`` as long as the index says.

    Reads only the header and the last sequence's length and pointer, so it costs the same for
    any dataset size. A pair cut short (an interrupted copy) otherwise fails deep inside
    megatron-core's reader, or at the first sample past the end, without naming the file.

    Returns:
        The number of sequences and of documents.

    Raises:
        IndexedDatasetError: A missing header, an unknown version or dtype, or a size other than
            the header implies.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    with open(idx_path, "rb") as idx:
        head = idx.read(_HEADER_SIZE)
        if len(head) < _HEADER_SIZE or not head.startswith(INDEX_HEADER):
            raise IndexedDatasetError(f"{idx_path}: not a Megatron index (no MMIDIDX header)")
        version, code, sequences, doc_indices = _HEADER.unpack(head[len(INDEX_HEADER) :])
        dtype = {c: t for t, c in DTYPE_CODES.items()}.get(code)
        if version != INDEX_VERSION or dtype is None:
            raise IndexedDatasetError(f"{idx_path}: unknown version {version} or dtype {code}")
        expected = _HEADER_SIZE + 12 * sequences + 8 * doc_indices
        size = os.path.getsize(idx_path)
        if size != expected:
            raise IndexedDatasetError(
                f"{idx_path}: {size:,} bytes, but its header announces {sequences:,} sequences "
                f"and {doc_indices:,} document indices ({expected:,} bytes): the file is cut "
                "short or damaged"
            )
        bin_expected = 0
        if sequences:
            idx.seek(_HEADER_SIZE + 4 * (sequences - 1))
            (last_length,) = struct.unpack("<i", idx.read(4))
            idx.seek(_HEADER_SIZE + 4 * sequences + 8 * (sequences - 1))
            (last_pointer,) = struct.unpack("<q", idx.read(8))
            bin_expected = last_pointer + last_length * np.dtype(dtype).itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != bin_expected:
        raise IndexedDatasetError(
            f"{bin_path}: {bin_size:,} bytes, but {idx_path} says its {sequences:,} sequences "
            f"take {bin_expected:,}: one of the two is cut short, or they come from different "
            "runs"
        )
    return sequences, max(doc_indices - 1, 0)


def token_dtype(vocab_size: int) -> type[np.number]:
    """The token dtype Megatron uses for a vocabulary: uint16 below 65,500 ids, int32 above."""
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


class IndexedDatasetWriter:
    """Streams token blocks into a ``.bin`` file and writes the matching ``.idx`` at the end.

    Args:
        bin_path: Where the token ids go (usually a temporary name, see ``AtomicOutputs``).
        dtype: Token dtype, normally ``token_dtype(vocab_size)``.
    """

    def __init__(self, bin_path: str | os.PathLike, dtype: type[np.number]) -> None:
        if dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {dtype}")
        self.dtype = np.dtype(dtype)
        self._bin_path = os.fspath(bin_path)
        self._bin = open(bin_path, "wb")  # noqa: SIM115 - closed in finalize()/close()
        self._sequence_lengths: list[np.ndarray] = []
        self._sequences_per_document: list[np.ndarray] = []

    def add_documents(
        self,
        tokens: np.ndarray,
        sequence_lengths: np.ndarray,
        sequences_per_document: np.ndarray,
    ) -> None:
        """Append a block of documents.

        Args:
            tokens: All token ids of the block, concatenated, already in ``dtype``.
            sequence_lengths: Length of each sequence (a sentence, or a whole document).
            sequences_per_document: How many consecutive sequences make up each document.
        """
        if tokens.dtype != self.dtype:
            raise TypeError(f"tokens are {tokens.dtype}, the dataset is {self.dtype}")
        if int(sequence_lengths.sum()) != tokens.size:
            raise ValueError("sequence lengths do not add up to the number of tokens")
        if int(sequences_per_document.sum()) != sequence_lengths.size:
            raise ValueError("sequences per document do not add up to the number of sequences")
        try:
            self._bin.write(memoryview(np.ascontiguousarray(tokens)).cast("B"))
        except OSError as err:  # a write names no file: ENOSPC would not say which disk
            raise OSError(err.errno, err.strerror, self._bin_path) from err
        # Kept per block, 4 bytes per sequence and per document: the index is written from them
        # block by block, never whole in memory (it takes 12 bytes per sequence and 8 per
        # document: GBs for a corpus split into sentences).
        self._sequence_lengths.append(sequence_lengths.astype(np.int32, copy=False))
        self._sequences_per_document.append(sequences_per_document.astype(np.int32, copy=False))

    def finalize(self, idx_path: str | os.PathLike) -> tuple[int, int]:
        """Close the ``.bin`` and write the ``.idx``.

        Returns:
            The number of documents and of tokens written.
        """
        self.close()
        sequences = sum(part.size for part in self._sequence_lengths)
        documents = sum(part.size for part in self._sequences_per_document)
        tokens = 0  # the running sequence pointer, in tokens
        try:
            with open(idx_path, "wb") as idx:
                idx.write(INDEX_HEADER)
                idx.write(struct.pack("<Q", INDEX_VERSION))
                idx.write(struct.pack("<B", DTYPE_CODES[self.dtype.type]))
                idx.write(struct.pack("<Q", sequences))
                idx.write(struct.pack("<Q", documents + 1))
                for part in self._sequence_lengths:
                    idx.write(part.tobytes())
                for part in self._sequence_lengths:
                    ends = np.cumsum(part, dtype=np.int64) + tokens
                    idx.write(((ends - part) * self.dtype.itemsize).tobytes())
                    tokens = int(ends[-1]) if part.size else tokens
                idx.write(np.zeros(1, np.int64).tobytes())
                first = 0  # the running document index
                for part in self._sequences_per_document:
                    ends = np.cumsum(part, dtype=np.int64) + first
                    idx.write(ends.tobytes())
                    first = int(ends[-1]) if part.size else first
        except OSError as err:
            raise OSError(err.errno, err.strerror, os.fspath(idx_path)) from err
        return documents, tokens

    def close(self) -> None:
        """Close the ``.bin`` (``finalize`` does; alone when a run is aborted)."""
        try:
            self._bin.close()  # flushes the last write
        except OSError as err:
            raise OSError(err.errno, err.strerror, self._bin_path) from err
