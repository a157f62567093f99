"""Text-to-ids encoders with the meaning Megatron gives each ``--tokenizer-type``.

Preprocessing must write exactly what Megatron-LM's ``tools/preprocess_data.py`` writes. Current
Megatron-LM builds its tokenizers with megatron-core's
``megatron.core.tokenizers.text.utils.build_tokenizer``, and the tests compare against it:

* ``SentencePieceTokenizer``, ``Llama2Tokenizer``, ``GPTSentencePieceTokenizer``: the model's
  ids, no bos/eos added; the end-of-document id is the model's eos (``</s>``, 2 for Llama-2).
* ``HuggingFaceTokenizer``: ``AutoTokenizer`` ids without the tokenizer's special tokens unless
  ``include_special_tokens`` (Megatron-LM's ``--tokenizer-hf-include-special-tokens``); end of
  document is its eos. Remote code is never trusted.

Unlike Megatron's per-document ``tokenize``, ``encode_batch`` takes many texts at once, which is
where much of the speed of preprocessing comes from.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

from megatron_ext.hashing import pieces_sha256

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
)


class TokenizerLoadError(ValueError):
    """The tokenizer file or directory cannot be used."""


class TextEncoder(ABC):
    """Turns texts into token ids the way a Megatron ``--tokenizer-type`` does."""

    vocab_size: int
    eod: int

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text."""


def load_sentencepiece(model_path: str | os.PathLike):
    """Load a SentencePiece model, turning its terse C++ errors into a message naming the file.

    Raises:
        TokenizerLoadError: If the file is missing or is not a SentencePiece model.
    """
    import sentencepiece

    path = os.fspath(model_path)
    if not os.path.isfile(path):
        raise TokenizerLoadError(f"{path}: tokenizer model not found")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(path)
    except (OSError, RuntimeError) as err:
        raise TokenizerLoadError(f"{path}: not a SentencePiece model ({err})") from err
    return processor


def first_other_piece(base, extended) -> int | None:
    """The first id of ``base`` that names another piece in ``extended`` (None: it extends it).

    Both are ``SentencePieceProcessor`` s; ``extended`` has at least ``base``'s pieces.
    """
    return next(
        (i for i in range(len(base)) if base.id_to_piece(i) != extended.id_to_piece(i)), None
    )


class SentencePieceEncoder(TextEncoder):
    """The SentencePiece types: the model's ids; end of document is the model's eos (``</s>``)."""

    def __init__(self, model_path: str | os.PathLike, num_threads: int = -1) -> None:
        self.processor = load_sentencepiece(model_path)
        self.num_threads = num_threads
        self.vocab_size = self.processor.get_piece_size()
        self.eod = self.processor.eos_id()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no bos/eos: Megatron adds only the end of document)."""
        return self.processor.encode(texts, num_threads=self.num_threads)

    def pieces_sha256(self) -> str:
        """The vocabulary's fingerprint (:func:`megatron_ext.hashing.pieces_sha256`)."""
        return pieces_sha256(map(self.processor.id_to_piece, range(self.vocab_size)))


class HuggingFaceEncoder(TextEncoder):
    """Megatron's ``HuggingFaceTokenizer``: ``AutoTokenizer`` with its own special tokens."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        num_threads: int = -1,
        include_special_tokens: bool = False,
    ) -> None:
        self.include_special_tokens = include_special_tokens
        if num_threads == 1:
            # One worker per core: the Rust thread pool would only oversubscribe.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise TokenizerLoadError(
                "HuggingFaceTokenizer needs transformers: pip install 'megatron-ext[hf]'"
            ) from err
        path = os.fspath(model_path)
        if not os.path.isdir(path):
            raise TokenizerLoadError(f"{path}: not a directory with Hugging Face tokenizer files")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise TokenizerLoadError(
                f"{path}: cannot load a Hugging Face tokenizer ({err})"
            ) from err
        self.vocab_size = len(self.tokenizer)
        eos = self.tokenizer.eos_token_id
        self.eod = -1 if eos is None else int(eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (with special tokens only if ``include_special_tokens``)."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=self.include_special_tokens)["input_ids"]


_ENCODERS: dict[str, type[TextEncoder]] = {
    "SentencePieceTokenizer": SentencePieceEncoder,
    "Llama2Tokenizer": SentencePieceEncoder,
    "GPTSentencePieceTokenizer": SentencePieceEncoder,
    "HuggingFaceTokenizer": HuggingFaceEncoder,
}


def build_encoder(
    tokenizer_type: str,
    tokenizer_model: str | os.PathLike,
    num_threads: int = -1,
    hf_include_special_tokens: bool = False,
) -> TextEncoder:
    """Build the encoder for a Megatron ``--tokenizer-type``.

    Args:
        tokenizer_type: One of ``TOKENIZER_TYPES``.
        tokenizer_model: SentencePiece ``.model`` file, or a Hugging Face tokenizer directory.
        num_threads: Threads for batch encoding (1 inside worker processes).
        hf_include_special_tokens: ``HuggingFaceTokenizer`` only: add its special tokens.

    Raises:
        TokenizerLoadError: Unknown type, or a model that cannot be loaded.
    """
    if tokenizer_type not in _ENCODERS:
        raise TokenizerLoadError(
            f"unknown --tokenizer-type {tokenizer_type}; choose from {', '.join(TOKENIZER_TYPES)}"
        )
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceEncoder(tokenizer_model, num_threads, hf_include_special_tokens)
    return _ENCODERS[tokenizer_type](tokenizer_model, num_threads=num_threads)
