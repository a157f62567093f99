"""Initial values for the embedding and output-layer rows of new vocabulary pieces.

``avg_subwords`` (default): each new piece's surface string is tokenized with the *base*
tokenizer and the row is the mean of those pieces' rows (SambaLingo, "LLaMA Beyond English").
Every piece is tokenized without SentencePiece's dummy prefix, its ``▁`` read as the space it
stands for: so ``▁كتاب`` starts with a word-initial base piece and the mid-word ``تاب`` does not.
Byte-fallback pieces take part like any other; user-defined pieces, matched verbatim in text, are
averaged from their spelling too. A control or unused piece never occurs in text: it gets the
mean of all base rows.

``mean``: the mean of all base rows. ``mean_cov``: samples from a Gaussian with the base rows'
mean and covariance scaled by 1e-9, as transformers' ``mean_resizing`` does (so within 1e-4 of
``mean``). ``gaussian``: N(0, σ²) with σ the base rows' own standard deviation (Megatron's fixed
0.02 would be another scale than a trained model's). ``xavier_uniform``: what torch's gives the
whole resized matrix, U(-a, a) with a = √(6 / (rows + H)).

Input and output rows are initialised from their own matrices (Llama-2 does not tie them).
"""

from __future__ import annotations

import os

import sentencepiece
import torch

from megatron_ext.tokenizer.sp_proto import CONTROL, UNUSED, Piece, parse_model

INIT_METHODS = ("avg_subwords", "mean", "mean_cov", "gaussian", "xavier_uniform")
SAMPLED_INITS = ("mean_cov", "gaussian", "xavier_uniform")  # those that draw from the seed


def check_init_method(method: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``method`` is one of ``INIT_METHODS``."""
    if method not in INIT_METHODS:
        raise ValueError(
            f"unknown --embedding-init {method}; choose from {', '.join(INIT_METHODS)}"
        )


def _prefixless_processor(model_path: str | os.PathLike) -> sentencepiece.SentencePieceProcessor:
    """The base model with no dummy prefix and no whitespace trimming, for mid-word pieces."""
    with open(model_path, "rb") as f:
        proto = parse_model(f.read()).with_normalizer_flags(
            add_dummy_prefix=False, remove_extra_whitespaces=False
        )
    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.serialize())
    return processor


def subword_decomposition(
    pieces: list[Piece], base_model: str | os.PathLike, base_size: int
) -> list[list[int] | None]:
    """Base-tokenizer ids whose rows average into each new piece's row.

    Returns:
        Per piece, its base ids; None for a control or unused piece (no text to split).

    Raises:
        ValueError: A piece is empty or needs ``<unk>`` (a base tokenizer without byte
            fallback that cannot spell it), or a size mismatch puts an id outside the base.
    """
    processor = _prefixless_processor(base_model)
    texts = [p.piece.replace("\u2581", " ") for p in pieces if p.type not in (CONTROL, UNUSED)]
    spelled = iter(processor.encode(texts))
    decomposition = []
    for piece in pieces:
        if piece.type in (CONTROL, UNUSED):
            decomposition.append(None)
            continue
        ids = next(spelled)
        if not ids or processor.unk_id() in ids or max(ids) >= base_size:
            raise ValueError(f"piece {piece.piece!r} has no decomposition in the base tokenizer")
        decomposition.append(ids)
    return decomposition


def init_new_rows(
    method: str,
    base_rows: torch.Tensor,
    num_new: int,
    *,
    decomposition: list[list[int]] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rows for ``num_new`` new pieces, computed in fp32 from ``base_rows`` [V_base, H].

    Args:
        method: One of ``INIT_METHODS``.
        base_rows: The embedding (or output-layer) rows of the base vocabulary.
        num_new: How many rows to make.
        decomposition: For ``avg_subwords``: base ids per new piece, None for the base mean
            (:func:`subword_decomposition`).
        generator: Random source for the sampling methods.

    Returns:
        A ``[num_new, H]`` tensor in ``base_rows``' dtype.
    """
    check_init_method(method)
    base = base_rows.float()
    hidden = base.shape[1]
    if method == "avg_subwords":
        if decomposition is None or len(decomposition) != num_new:
            raise ValueError("avg_subwords needs one base decomposition per new piece")
        everything = range(base.shape[0])  # a piece with no text: the mean of all rows
        spelled = [everything if ids is None else ids for ids in decomposition]
        flat = torch.tensor([i for ids in spelled for i in ids], dtype=torch.long)
        counts = torch.tensor([len(ids) for ids in spelled], dtype=torch.long)
        owner = torch.repeat_interleave(torch.arange(num_new), counts)
        sums = torch.zeros(num_new, hidden).index_add_(0, owner, base[flat])
        rows = sums / counts.clamp(min=1).unsqueeze(1)
    elif method == "mean":
        rows = base.mean(0).expand(num_new, hidden).clone()
    elif method == "mean_cov":
        mean = base.mean(0)
        centered = base - mean
        covariance = centered.T @ centered / base.shape[0]
        scale = torch.linalg.cholesky(1e-9 * covariance + 1e-12 * torch.eye(hidden))
        noise = torch.randn(num_new, hidden, generator=generator)
        rows = mean + noise @ scale.T
    elif method == "gaussian":
        rows = torch.randn(num_new, hidden, generator=generator) * base.std()
    else:  # xavier_uniform, bounded as for the whole resized matrix
        bound = (6 / (base.shape[0] + num_new + hidden)) ** 0.5
        rows = (torch.rand(num_new, hidden, generator=generator) * 2 - 1) * bound
    return rows.to(base_rows.dtype)
