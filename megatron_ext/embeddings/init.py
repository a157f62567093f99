"""Initial values for the embedding and output-layer rows of new vocabulary pieces.

``avg_subwords`` (default): each new piece's surface string is tokenized with the *base*
tokenizer and the row is the mean of those pieces' rows (SambaLingo, "LLaMA Beyond English").
Mid-word pieces (no leading ``▁``) are tokenized without SentencePiece's dummy prefix, so that
``تاب`` decomposes into mid-word base pieces, not into ``▁ت`` ...; byte-fallback pieces take part
like any other. ``mean``: the mean of all base rows. ``mean_cov``: samples from a Gaussian with the
base rows' mean and covariance scaled by 1e-9, as transformers' ``mean_resizing`` does.
``gaussian``: N(0, 0.02²), Megatron's default init. ``xavier_uniform``: torch's.

Input and output rows are initialised from their own matrices (Llama-2 does not tie them).
"""

from __future__ import annotations

import os

import torch

INIT_METHODS = ("avg_subwords", "mean", "mean_cov", "gaussian", "xavier_uniform")
GAUSSIAN_STD = 0.02


def _prefixless_processor(model_path: str | os.PathLike):
    """The base model with no dummy prefix and no whitespace trimming, for mid-word pieces."""
    import sentencepiece

    from megatron_ext.tokenizer.sp_proto import parse_model

    with open(model_path, "rb") as f:
        proto = parse_model(f.read()).with_normalizer_flags(
            add_dummy_prefix=False, remove_extra_whitespaces=False
        )
    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.serialize())
    return processor


def subword_decomposition(
    pieces: list[str], base_model: str | os.PathLike, base_size: int
) -> list[list[int]]:
    """Base-tokenizer ids whose rows average into each new piece's row.

    Raises:
        ValueError: If a piece decomposes into an id outside the base vocabulary.
    """
    processor = _prefixless_processor(base_model)
    ids = processor.encode([p.replace("\u2581", " ") for p in pieces])
    for piece, piece_ids in zip(pieces, ids, strict=True):
        if not piece_ids or max(piece_ids) >= base_size:
            raise ValueError(f"piece {piece!r} has no decomposition in the base tokenizer")
    return ids


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
        decomposition: For ``avg_subwords``: base ids per new piece
            (:func:`subword_decomposition`).
        generator: Random source for the sampling methods.

    Returns:
        A ``[num_new, H]`` tensor in ``base_rows``' dtype.
    """
    base = base_rows.float()
    hidden = base.shape[1]
    if method == "avg_subwords":
        if decomposition is None or len(decomposition) != num_new:
            raise ValueError("avg_subwords needs one base decomposition per new piece")
        flat = torch.tensor([i for ids in decomposition for i in ids])
        owner = torch.repeat_interleave(torch.tensor([len(ids) for ids in decomposition]))
        sums = torch.zeros(num_new, hidden).index_add_(0, owner, base[flat])
        rows = sums / torch.bincount(owner, minlength=num_new).unsqueeze(1)
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
        rows = torch.randn(num_new, hidden, generator=generator) * GAUSSIAN_STD
    elif method == "xavier_uniform":
        rows = torch.nn.init.xavier_uniform_(torch.empty(num_new, hidden), generator=generator)
    else:
        raise ValueError(
            f"unknown --embedding-init {method}; choose from {', '.join(INIT_METHODS)}"
        )
    return rows.to(base_rows.dtype)
