"""Text-to-ids encoders with the meaning Megatron-LM gives each ``--tokenizer-type``.

Preprocessing must write exactly what Megatron-LM's ``tools/preprocess_data.py`` would, so each
encoder reproduces ``megatron/training/tokenizer/tokenizer.py``:

* ``SentencePieceTokenizer``: ids from the model, plus Megatron's special tokens ``<CLS>``
  ``<SEP>`` ``<EOD>`` ``<MASK>`` (and ``<PAD>``/``<BOS>``/``<EOS>`` when the model lacks them)
  appended after the model's pieces; occurrences of any special token's text become its id;
  the end-of-document id is ``<EOD>``'s.
* ``Llama2Tokenizer``: ``<s>`` (bos) before every encoded text; end of document is ``</s>`` (eos).
* ``GPTSentencePieceTokenizer``: plain ids; end of document is the model's eos.
* ``HuggingFaceTokenizer``: ``AutoTokenizer`` with its own special tokens; end of document is its
  eos. Remote code is never trusted.

Unlike Megatron's per-document ``tokenize``, ``encode_batch`` takes many texts at once, which is
where the speed of preprocessing comes from.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

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


class _SentencePieceBase(TextEncoder):
    def __init__(self, model_path: str | os.PathLike, num_threads: int = -1) -> None:
        self.processor = load_sentencepiece(model_path)
        self.num_threads = num_threads

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=self.num_threads)


class GPTSentencePieceEncoder(_SentencePieceBase):
    """Megatron's ``GPTSentencePieceTokenizer``: the model's ids, eos as end of document."""

    def __init__(self, model_path: str | os.PathLike, num_threads: int = -1) -> None:
        super().__init__(model_path, num_threads)
        self.vocab_size = self.processor.get_piece_size()
        self.eod = self.processor.eos_id()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text."""
        return self._encode(texts)


class Llama2Encoder(_SentencePieceBase):
    """Megatron's ``Llama2Tokenizer``: ``<s>`` before each text, ``</s>`` as end of document."""

    def __init__(self, model_path: str | os.PathLike, num_threads: int = -1) -> None:
        super().__init__(model_path, num_threads)
        self.vocab_size = self.processor.get_piece_size()
        self.bos = self.processor.bos_id()
        self.eod = self.processor.eos_id()
        if self.bos < 0 or self.eod < 0:
            raise TokenizerLoadError(
                f"{model_path}: Llama2Tokenizer needs bos and eos pieces; this model has "
                f"bos_id={self.bos}, eos_id={self.eod}"
            )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[bos] + ids`` of each text."""
        bos = [self.bos]
        return [bos + ids for ids in self._encode(texts)]


class SentencePieceEncoder(_SentencePieceBase):
    """Megatron's ``SentencePieceTokenizer`` (special tokens appended, ``<EOD>`` ends documents)."""

    def __init__(self, model_path: str | os.PathLike, num_threads: int = -1) -> None:
        super().__init__(model_path, num_threads)
        sp = self.processor
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        self.special_tokens: dict[str, int] = {}

        def add(token: str) -> int:
            if token not in vocab:
                vocab[token] = len(vocab)
            self.special_tokens[token] = vocab[token]
            return vocab[token]

        for token in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            add(token)
        for model_id, fallback in (
            (sp.pad_id(), "<PAD>"),
            (sp.bos_id(), "<BOS>"),
            (sp.eos_id(), "<EOS>"),
        ):
            add(sp.id_to_piece(model_id) if 0 <= model_id < sp.get_piece_size() else fallback)
        self.vocab_size = len(vocab)
        self.eod = self.special_tokens["<EOD>"]
        # Every special token starts with "<": texts without one take the fast batched path.
        self._first_chars = {token[0] for token in self.special_tokens}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, special-token strings mapped to their ids."""
        plain = [i for i, t in enumerate(texts) if not any(c in t for c in self._first_chars)]
        result: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, self._encode([texts[i] for i in plain]), strict=True):
            result[i] = ids
        done = set(plain)
        for i, text in enumerate(texts):
            if i not in done:
                result[i] = self._encode_with_specials(text)
        return result

    def _encode_with_specials(self, text: str) -> list[int]:
        # Megatron's loop: encode up to the earliest special token, emit its id, continue after it.
        ids: list[int] = []
        idx = 0
        while True:
            found = {tok: pos for tok in self.special_tokens if (pos := text.find(tok, idx)) >= 0}
            if not found:
                break
            token = min(found, key=found.get)
            ids.extend(self.processor.encode(text[idx : found[token]]))
            ids.append(self.special_tokens[token])
            idx = found[token] + len(token)
        ids.extend(self.processor.encode(text[idx:]))
        return ids


class HuggingFaceEncoder(TextEncoder):
    """Megatron's ``HuggingFaceTokenizer``: ``AutoTokenizer`` with its own special tokens."""

    def __init__(self, model_path: str | os.PathLike, num_threads: int = -1) -> None:
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
        """Token ids of each text, with the tokenizer's own special tokens."""
        return self.tokenizer(texts)["input_ids"] if texts else []


_ENCODERS: dict[str, type[TextEncoder]] = {
    "SentencePieceTokenizer": SentencePieceEncoder,
    "Llama2Tokenizer": Llama2Encoder,
    "GPTSentencePieceTokenizer": GPTSentencePieceEncoder,
    "HuggingFaceTokenizer": HuggingFaceEncoder,
}


def build_encoder(
    tokenizer_type: str, tokenizer_model: str | os.PathLike, num_threads: int = -1
) -> TextEncoder:
    """Build the encoder for a Megatron ``--tokenizer-type``.

    Args:
        tokenizer_type: One of ``TOKENIZER_TYPES``.
        tokenizer_model: SentencePiece ``.model`` file, or a Hugging Face tokenizer directory.
        num_threads: Threads for batch encoding (1 inside worker processes).

    Raises:
        TokenizerLoadError: Unknown type, or a model that cannot be loaded.
    """
    if tokenizer_type not in _ENCODERS:
        raise TokenizerLoadError(
            f"unknown --tokenizer-type {tokenizer_type}; choose from {', '.join(TOKENIZER_TYPES)}"
        )
    return _ENCODERS[tokenizer_type](tokenizer_model, num_threads=num_threads)
