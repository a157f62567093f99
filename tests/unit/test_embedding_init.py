"""New-row initialisation: decompositions checked against the base tokenizer's own pieces."""

import re

import pytest
import sentencepiece as spm
import torch

from megatron_ext.embeddings.init import INIT_METHODS, init_new_rows, subword_decomposition


def piece_bytes(processor, ids):
    out = b""
    for i in ids:
        piece = processor.id_to_piece(i)
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        out += bytes([int(byte.group(1), 16)]) if byte else piece.encode()
    return out


def test_decomposition_spells_each_piece_with_base_pieces(llama2_tokenizer):
    base = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    pieces = ["▁كتاب", "تاب", "▁السلام", "ية", "▁hello", "ello", "٣٤", "ـــ"]
    ids = subword_decomposition(pieces, llama2_tokenizer, len(base))
    for piece, piece_ids in zip(pieces, ids, strict=True):
        assert piece_bytes(base, piece_ids) == piece.encode(), (piece, piece_ids)
    # A mid-word piece never starts with a word-initial base piece.
    assert not base.id_to_piece(ids[1][0]).startswith("▁")


def test_avg_subwords_is_the_mean_of_the_decomposition():
    base = torch.randn(10, 4)
    rows = init_new_rows("avg_subwords", base, 2, decomposition=[[1, 2, 3], [7]])
    torch.testing.assert_close(rows[0], base[[1, 2, 3]].mean(0))
    torch.testing.assert_close(rows[1], base[7])


def test_mean_and_mean_cov_stay_at_the_mean_and_random_ones_do_not():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, 8, generator=g) + 3.0
    mean = base.mean(0)
    torch.testing.assert_close(init_new_rows("mean", base, 3), mean.expand(3, 8))
    close = init_new_rows("mean_cov", base, 3, generator=g)
    assert (close - mean).abs().max() < 1e-3
    for method in ("gaussian", "xavier_uniform"):
        rows = init_new_rows(method, base, 3, generator=g)
        assert rows.shape == (3, 8) and (rows - mean).abs().mean() > 1.0


def test_dtype_kept_and_unknown_method():
    base = torch.randn(4, 4, dtype=torch.bfloat16)
    assert init_new_rows("mean", base, 2).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="choose from"):
        init_new_rows("zeros", base, 2)
    assert set(INIT_METHODS) == {"avg_subwords", "mean", "mean_cov", "gaussian", "xavier_uniform"}
