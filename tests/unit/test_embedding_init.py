"""New-row initialisation: decompositions checked against the base tokenizer's own pieces."""

import re

import pytest
import sentencepiece as spm
import torch

from megatron_ext.embeddings.init import (
    INIT_METHODS,
    SAMPLED_INITS,
    init_new_rows,
    subword_decomposition,
)
from megatron_ext.tokenizer.sp_proto import CONTROL, USER_DEFINED, Piece


def piece_bytes(processor, ids):
    out = b""
    for i in ids:
        piece = processor.id_to_piece(i)
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        out += bytes([int(byte.group(1), 16)]) if byte else piece.encode()
    return out


def test_decomposition_spells_each_piece_with_base_pieces(llama2_tokenizer):
    base = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    texts = ["▁كتاب", "تاب", "▁السلام", "ية", "▁hello", "ello", "٣٤", "ـــ", "▁😀"]
    pieces = [Piece(text, 0.0) for text in texts] + [Piece("<|im_start|>", 0.0, USER_DEFINED)]
    ids = subword_decomposition(pieces, llama2_tokenizer, len(base))
    for piece, piece_ids in zip(pieces, ids, strict=True):
        assert piece_bytes(base, piece_ids) == piece.piece.encode(), (piece, piece_ids)
        if piece.piece.startswith("▁"):  # a word-initial piece splits as the base splits the word
            assert piece_ids == base.encode(piece.piece[1:]), piece
    # A mid-word piece never starts with a word-initial base piece.
    for text, piece_ids in zip(texts, ids, strict=False):
        if not text.startswith("▁"):
            assert not base.id_to_piece(piece_ids[0]).startswith("▁"), (text, piece_ids)


def test_a_control_piece_has_no_spelling_and_gets_the_mean(llama2_tokenizer):
    base_size = len(spm.SentencePieceProcessor(model_file=str(llama2_tokenizer)))
    pieces = [Piece("<pad>", 0.0, CONTROL), Piece("▁hello", 0.0)]
    decomposition = subword_decomposition(pieces, llama2_tokenizer, base_size)
    assert decomposition[0] is None and decomposition[1]
    base = torch.randn(base_size, 4, generator=torch.Generator().manual_seed(0))
    rows = init_new_rows("avg_subwords", base, 2, decomposition=decomposition)
    torch.testing.assert_close(rows[0], base.mean(0))
    torch.testing.assert_close(rows[1], base[decomposition[1]].mean(0))
    with pytest.raises(ValueError, match="'' has no decomposition"):
        subword_decomposition([Piece("", 0.0)], llama2_tokenizer, base_size)


def test_avg_subwords_is_the_mean_of_the_decomposition():
    base = torch.randn(10, 4)
    rows = init_new_rows("avg_subwords", base, 2, decomposition=[[1, 2, 3], [7]])
    torch.testing.assert_close(rows[0], base[[1, 2, 3]].mean(0))
    torch.testing.assert_close(rows[1], base[7])
    assert init_new_rows("avg_subwords", base, 0, decomposition=[]).shape == (0, 4)


def test_sampled_rows_follow_the_base_rows_scale_and_the_seed():
    rows_, new, hidden = 4000, 1000, 64
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows_, hidden, generator=g) * 0.5 + 3.0
    mean = base.mean(0)
    torch.testing.assert_close(init_new_rows("mean", base, 3), mean.expand(3, hidden))

    def sample(method, seed=1):
        generator = torch.Generator().manual_seed(seed)
        return init_new_rows(method, base, new, generator=generator)

    # mean_cov: the mean plus noise of sqrt(1e-9) times the base rows' spread.
    spread = (sample("mean_cov") - mean).std() / base.std()
    assert 0.8 * 1e-9**0.5 < spread < 1.2 * 1e-9**0.5
    # gaussian: centred on zero with the base rows' own standard deviation (here 0.5).
    gaussian = sample("gaussian")
    assert abs(gaussian.mean()) < 0.01 and abs(gaussian.std() / base.std() - 1) < 0.02
    # xavier_uniform: torch's bound for the whole resized matrix.
    bound = (6 / (rows_ + new + hidden)) ** 0.5
    xavier = sample("xavier_uniform")
    assert 0.99 * bound < xavier.abs().max() <= bound
    reference = torch.nn.init.xavier_uniform_(torch.empty(rows_ + new, hidden))
    assert abs(xavier.std() / reference.std() - 1) < 0.02
    for method in SAMPLED_INITS:
        assert torch.equal(sample(method), sample(method)), method
        assert not torch.equal(sample(method), sample(method, seed=2)), method


def test_dtype_kept_and_unknown_method():
    base = torch.randn(4, 4, dtype=torch.bfloat16)
    assert init_new_rows("mean", base, 2).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="choose from"):
        init_new_rows("zeros", base, 2)
    assert set(INIT_METHODS) == {"avg_subwords", "mean", "mean_cov", "gaussian", "xavier_uniform"}
