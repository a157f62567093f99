"""Offline sentence splitting for ``--split-sentences``.

Megatron-LM's preprocess calls ``nltk.download("punkt")`` and then ``nltk.load``; without network
access that hangs or fails. Nothing here touches the network or NLTK's data path: Punkt parameters
are trained on the input itself (``PunktTrainer``, deterministic), loaded from a JSON file that a
previous run saved, or left untrained. Languages written without spaces between sentences
(Chinese, Japanese) use a punctuation rule instead, since Punkt needs whitespace after a boundary.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # nltk costs 0.3 s to import: only runs that split sentences pay for it
    from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters

# Sentence-final punctuation beyond Latin ". ? !", by language (ISO 639-1 or NLTK's names).
_EXTRA_SENT_END = {
    "ar": ("؟", "۔"),
    "fa": ("؟", "۔"),
    "ur": ("؟", "۔"),
    "hi": ("।", "॥"),
    "mr": ("।", "॥"),
    "ne": ("।", "॥"),
    "bn": ("।", "॥"),
    "sa": ("।", "॥"),
    "am": ("።", "፧"),
    "ckb": ("؟", "۔"),
    "ps": ("؟", "۔"),
    "sd": ("؟", "۔"),
    "ug": ("؟",),
    "hy": ("։",),
    "my": ("။",),
}
_NLTK_NAMES = {
    "arabic": "ar",
    "persian": "fa",
    "farsi": "fa",
    "urdu": "ur",
    "hindi": "hi",
    "marathi": "mr",
    "nepali": "ne",
    "bengali": "bn",
    "sanskrit": "sa",
    "amharic": "am",
    "armenian": "hy",
    "burmese": "my",
    "chinese": "zh",
    "japanese": "ja",
    "english": "en",
    # NLTK's other Punkt languages (Latin sentence ends).
    "czech": "cs",
    "danish": "da",
    "dutch": "nl",
    "estonian": "et",
    "finnish": "fi",
    "french": "fr",
    "german": "de",
    "greek": "el",
    "italian": "it",
    "malayalam": "ml",
    "norwegian": "no",
    "polish": "pl",
    "portuguese": "pt",
    "russian": "ru",
    "slovene": "sl",
    "spanish": "es",
    "swedish": "sv",
    "turkish": "tr",
    # ISO 639-3 codes of the languages with their own rules (the UDHR sample names them so).
    "ara": "ar",
    "arb": "ar",
    "fas": "fa",
    "pes": "fa",
    "urd": "ur",
    "hin": "hi",
    "mar": "mr",
    "nep": "ne",
    "npi": "ne",
    "ben": "bn",
    "san": "sa",
    "amh": "am",
    "hye": "hy",
    "mya": "my",
    "zho": "zh",
    "cmn": "zh",
    "jpn": "ja",
    "eng": "en",
    # Arabic varieties and other languages written like those above.
    **dict.fromkeys(("arz", "ary", "arq", "aeb", "apc", "ajp", "acm", "afb", "ars", "ayl"), "ar"),
    "prs": "fa",
    "pus": "ps",
    "pbt": "ps",
    "snd": "sd",
    "uig": "ug",
    "kurdish": "ckb",
    **dict.fromkeys(("yue", "wuu", "cantonese"), "zh"),
}
_UNSPACED = {"zh", "ja"}
_CJK_END = "。！？!?"
_CJK_CLOSE = "」』”’）)]》"


# --punkt-params values other than a file.
PUNKT_TRAIN = "train"
PUNKT_UNTRAINED = "untrained"


def language_code(lang: str) -> str:
    """ISO 639-1 code for an NLTK-style language name or a code (``english`` -> ``en``)."""
    lang = lang.strip().lower()
    return _NLTK_NAMES.get(lang, lang)


def check_language(lang: str) -> None:
    """Refuse what is neither an ISO 639 code nor a known language name.

    A typo (``arabc``) or a corpus name (``ar_web``) would otherwise split with the Latin rules
    only, missing Arabic's ``؟``, without a word. A code this module has no rules for (most
    languages written in Latin or Cyrillic script need none) still splits at ``. ? !`` only.

    Raises:
        ValueError: Naming ``lang`` and what is accepted.
    """
    if not re.fullmatch(r"[a-z]{2,3}", language_code(lang)):
        raise ValueError(
            f"{lang!r} is not a language: give an ISO 639 code (en, ar, zh; arb) or an NLTK name "
            "(english, arabic)"
        )


# Right-to-left text often wraps punctuation in direction marks ("\u200f.\u200f"), which Punkt
# takes for word characters, missing the boundary. Punkt reads a copy where the marks are spaces
# (same length, so its spans index the original text).
_DIRECTION_MARKS_AS_SPACES = str.maketrans(dict.fromkeys("\u200e\u200f\u061c", " "))


def _language_vars(code: str) -> PunktLanguageVars:
    from nltk.tokenize.punkt import PunktLanguageVars

    extra = _EXTRA_SENT_END.get(code, ())
    attrs = {"sent_end_chars": PunktLanguageVars.sent_end_chars + extra}
    return type("LanguageVars", (PunktLanguageVars,), attrs)()


@dataclass
class SentenceSplitter:
    """Splits a document into sentences for one language.

    Args:
        lang: Language (``en``, ``ar``, ``zh``, or NLTK names such as ``english``).
        keep_newlines: Keep the whitespace after each sentence with it, so the sentences
            concatenate back to the document (Megatron-LM's flag of that name does the same
            with a modified Punkt regex, but still drops it after closing quotes).
        params: Trained Punkt parameters; None splits untrained.

    The object is picklable so worker processes receive it.
    """

    lang: str
    keep_newlines: bool
    params: PunktParameters | None

    def __post_init__(self) -> None:
        self._punkt = None
        if language_code(self.lang) not in _UNSPACED:
            from nltk.tokenize.punkt import PunktSentenceTokenizer

            vars_ = _language_vars(language_code(self.lang))
            self._punkt = PunktSentenceTokenizer(lang_vars=vars_)
            if self.params is not None:
                self._punkt._params = self.params

    def __getstate__(self) -> dict:
        return {"lang": self.lang, "keep_newlines": self.keep_newlines, "params": self.params}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def split(self, text: str) -> list[str]:
        """The sentences of ``text`` (whitespace between them kept only with ``keep_newlines``)."""
        if self._punkt is None:
            return _split_unspaced(text, self.keep_newlines)
        spans = list(self._punkt.span_tokenize(text.translate(_DIRECTION_MARKS_AS_SPACES)))
        if not self.keep_newlines:
            return [text[a:b] for a, b in spans]
        if not spans:
            return [text] if text else []
        starts = [0] + [a for a, _ in spans[1:]]
        return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=True)]


_END, _CLOSE = re.escape(_CJK_END), re.escape(_CJK_CLOSE)
# After end punctuation not followed by more of it or a closing quote, or after such a quote.
_UNSPACED_BOUNDARY = re.compile(
    rf"(?<=[{_END}])(?![{_END}{_CLOSE}])|(?<=[{_END}][{_CLOSE}])(?![{_CLOSE}])"
)


def _split_unspaced(text: str, keep_newlines: bool) -> list[str]:
    pieces = _UNSPACED_BOUNDARY.split(text)
    if not keep_newlines:
        return [p.strip() for p in pieces if p.strip()]
    sentences: list[str] = []
    for piece in pieces:
        body = piece.lstrip()
        if sentences:
            sentences[-1] += piece[: len(piece) - len(body)]
        elif piece != body:
            body = piece
        if body:
            sentences.append(body)
    return sentences


def train_punkt(texts: Iterable[str], lang: str) -> PunktParameters:
    """Learn Punkt parameters (abbreviations, collocations, sentence starters) from ``texts``."""
    from nltk.tokenize.punkt import PunktTrainer

    trainer = PunktTrainer(lang_vars=_language_vars(language_code(lang)))
    for text in texts:
        trainer.train(text, finalize=False)
    trainer.finalize_training()
    return trainer.get_params()


def save_punkt_params(params: PunktParameters, path: str | os.PathLike) -> None:
    """Write Punkt parameters as JSON (loadable with ``load_punkt_params``; no pickle)."""
    data = {
        "abbrev_types": sorted(params.abbrev_types),
        "collocations": sorted(list(c) for c in params.collocations),
        "sent_starters": sorted(params.sent_starters),
        "ortho_context": dict(sorted(params.ortho_context.items())),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)


def load_punkt_params(path: str | os.PathLike) -> PunktParameters:
    """Read Punkt parameters written by ``save_punkt_params``.

    Raises:
        ValueError: If the file is missing or malformed (never falls back to a download).
    """
    from nltk.tokenize.punkt import PunktParameters

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        params = PunktParameters()
        params.abbrev_types = set(data["abbrev_types"])
        params.collocations = {tuple(c) for c in data["collocations"]}
        params.sent_starters = set(data["sent_starters"])
        for word, flags in data["ortho_context"].items():
            params.ortho_context[word] = int(flags)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot read Punkt parameters ({err})") from err
    return params
