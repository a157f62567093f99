"""Our indexed-dataset writer against megatron-core's builder and reader."""

import contextlib
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_ext.data.indexed import (
    IndexedDatasetError,
    IndexedDatasetWriter,
    check_indexed_files,
    token_dtype,
)


def _random_documents(rng, vocab, n_docs, max_sentences):
    docs = []
    for _ in range(n_docs):
        lengths = rng.integers(1, 40, size=rng.integers(1, max_sentences + 1))
        docs.append((rng.integers(0, vocab, size=lengths.sum()), lengths))
    return docs


def _write_ours(prefix, docs, dtype, blocks=3, parts=None):
    """Written in ``blocks`` equal parts, or in the given lists of document numbers."""
    writer = IndexedDatasetWriter(f"{prefix}.bin", dtype)
    for part in parts if parts is not None else np.array_split(np.arange(len(docs)), blocks):
        chosen = [docs[i] for i in part]
        tokens = np.concatenate([t for t, _ in chosen]) if chosen else np.zeros(0)
        lengths = np.concatenate([n for _, n in chosen]) if chosen else np.zeros(0)
        writer.add_documents(
            tokens.astype(dtype),
            lengths.astype(np.int32),
            np.array([len(n) for _, n in chosen], dtype=np.int64),
        )
    writer.finalize(f"{prefix}.idx")


def _write_megatron(prefix, docs, dtype):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for tokens, lengths in docs:
        builder.add_document(tokens.tolist(), lengths.tolist())
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize(
    ("vocab", "max_sentences"), [(32000, 1), (64005, 4), (65500, 1), (128256, 3)]
)
def test_bytes_match_megatron_builder_and_read_back(tmp_path, vocab, max_sentences):
    rng = np.random.default_rng(vocab)
    docs = _random_documents(rng, vocab, 50, max_sentences)
    dtype = token_dtype(vocab)
    _write_ours(tmp_path / "ours", docs, dtype)
    _write_megatron(tmp_path / "ref", docs, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()

    dataset = IndexedDataset(str(tmp_path / "ours"))
    flat = [(tokens, lengths) for tokens, lengths in docs]
    sequences = [s for tokens, lengths in flat for s in np.split(tokens, np.cumsum(lengths)[:-1])]
    assert len(dataset) == len(sequences)
    for i, expected in enumerate(sequences):
        np.testing.assert_array_equal(dataset[i], expected)
    expected_doc_index = np.concatenate([[0], np.cumsum([len(n) for _, n in docs])])
    np.testing.assert_array_equal(dataset.document_indices, expected_doc_index)


def test_blocks_without_documents_change_no_byte(tmp_path):
    """The index is written block by block: empty blocks (all lines skipped) must not shift
    the pointers or document indices."""
    docs = _random_documents(np.random.default_rng(0), 32000, 20, 3)
    _write_ours(tmp_path / "ours", docs, np.uint16, blocks=64)  # 44 of them empty, at the end
    # and empty ones between full ones, where a pointer reset would shift what follows.
    parts = [[0, 1], [], [2, 3], [], [], list(range(4, 20))]
    _write_ours(tmp_path / "between", docs, np.uint16, parts=parts)
    _write_megatron(tmp_path / "ref", docs, np.uint16)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
        assert (tmp_path / f"between{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_named(tmp_path):
    """A write names no file, so ENOSPC said "No space left on device" without saying where."""
    writer = IndexedDatasetWriter("/dev/full", np.uint16)
    tokens = np.zeros(1 << 20, np.uint16)  # past any write buffer
    with pytest.raises(OSError, match="No space left on device") as caught:
        writer.add_documents(tokens, np.array([tokens.size]), np.array([1]))
    assert caught.value.filename == "/dev/full"
    with contextlib.suppress(OSError):  # whatever is still buffered cannot be flushed either
        writer.close()
    writer = IndexedDatasetWriter(tmp_path / "ok.bin", np.uint16)
    with pytest.raises(OSError, match="No space left on device") as caught:
        writer.finalize("/dev/full")
    assert caught.value.filename == "/dev/full"


def test_empty_dataset_matches_megatron(tmp_path):
    _write_ours(tmp_path / "ours", [], np.uint16, blocks=1)
    _write_megatron(tmp_path / "ref", [], np.uint16)
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()


@pytest.mark.parametrize("vocab", [1000, 32000, 57344, 64005, 65499, 65500, 65536, 128256])
def test_token_dtype_is_megatrons_choice(vocab):
    assert token_dtype(vocab) is DType.optimal_dtype(vocab)


def test_rejects_inconsistent_blocks(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "x.bin", np.uint16)
    with pytest.raises(ValueError, match="sequence lengths"):
        writer.add_documents(np.zeros(5, np.uint16), np.array([2, 2]), np.array([2]))
    with pytest.raises(ValueError, match="sequences per document"):
        writer.add_documents(np.zeros(4, np.uint16), np.array([2, 2]), np.array([1]))
    with pytest.raises(TypeError):
        writer.add_documents(np.zeros(4, np.int32), np.array([2, 2]), np.array([2]))
    writer.close()


@pytest.mark.parametrize("vocab", [32000, 128256])  # uint16 and int32 tokens
def test_size_check_accepts_megatrons_files_and_names_a_pair_cut_short(tmp_path, vocab):
    docs = _random_documents(np.random.default_rng(0), vocab, n_docs=30, max_sentences=3)
    prefix = str(tmp_path / "d")
    _write_megatron(prefix, docs, DType.optimal_dtype(vocab))
    reference = IndexedDataset(prefix)
    assert check_indexed_files(prefix) == (len(reference), len(reference.document_indices) - 1)
    del reference
    whole_idx, whole_bin = (tmp_path / "d.idx").read_bytes(), (tmp_path / "d.bin").read_bytes()

    for damaged in (whole_bin[:-2], whole_bin + b"\0\0"):  # a token short, or another run's
        (tmp_path / "d.bin").write_bytes(damaged)
        with pytest.raises(IndexedDatasetError, match=r"d\.bin: [\d,]+ bytes, but .*d\.idx says"):
            check_indexed_files(prefix)
    (tmp_path / "d.bin").write_bytes(whole_bin)
    (tmp_path / "d.idx").write_bytes(whole_idx[:9] + bytes([2]) + whole_idx[10:])  # version 2
    with pytest.raises(IndexedDatasetError, match="version"):
        check_indexed_files(prefix)
    (tmp_path / "d.idx").write_bytes(whole_idx[:-8])
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: [\d,]+ bytes, but its header"):
        check_indexed_files(prefix)
    (tmp_path / "d.idx").write_bytes(b"not an index at all, just bytes")
    with pytest.raises(IndexedDatasetError, match="no MMIDIDX header"):
        check_indexed_files(prefix)


def test_size_check_accepts_an_empty_dataset(tmp_path):
    prefix = str(tmp_path / "empty")
    _write_megatron(prefix, [], np.uint16)
    assert check_indexed_files(prefix) == (0, 0)
