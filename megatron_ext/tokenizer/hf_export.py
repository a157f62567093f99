"""Hugging Face tokenizer files that reproduce a SentencePiece BPE model token for token.

SentencePiece BPE starts from characters and repeatedly fuses the adjacent pair whose fusion is
the highest-scoring piece. A ``tokenizers`` BPE model does the same with merges ranked by list
order, so the merge list here holds, for every piece, each split into two pieces of the vocabulary,
ranked by the piece's score (then id). Text handling mirrors an identity-normalised Llama-style
model: spaces become ``▁``, a ``▁`` is prepended (dummy prefix), no pre-tokenizer (pieces never
cross a ``▁`` except the whitespace pieces the model itself has), byte fallback for characters
outside the vocabulary.

The files are loaded as ``PreTrainedTokenizerFast`` (``tokenizer_class`` in
``tokenizer_config.json``), never through transformers' ``LlamaTokenizer``, whose 5.x
conversion from ``tokenizer.model`` disagrees with SentencePiece on runs of spaces.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from megatron_ext.tokenizer.sp_proto import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, ModelProto

SPIECE_UNDERLINE = "▁"


class HFExportError(ValueError):
    """The model uses a feature the exported files cannot reproduce."""


def bpe_merges(model: ModelProto) -> list[tuple[str, str]]:
    """Every ``(left, right)`` whose concatenation is a piece, in SentencePiece's merge priority."""
    ids = {p.piece: i for i, p in enumerate(model.pieces) if p.type == NORMAL}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-model.pieces[i].score, i, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def check_exportable(model: ModelProto) -> None:
    """Raise ``HFExportError`` unless the exported files can reproduce ``model`` exactly."""
    spec, norm = model.trainer_spec(), model.normalizer_spec()
    if spec["model_type"] != "bpe":
        raise HFExportError(f"only BPE models can be exported, not {spec['model_type']}")
    if norm["name"] != "identity":
        raise HFExportError(
            f"normalisation '{norm['name']}' is not reproduced; only 'identity' models "
            "(Llama, Mistral) can be exported"
        )
    user_defined = [p.piece for p in model.pieces if p.type == USER_DEFINED]
    if user_defined:
        # Hugging Face cuts the text at each added token and prepends "▁" to every part.
        raise HFExportError(
            f"user-defined pieces ({', '.join(map(repr, user_defined[:3]))}"
            f"{', ...' if len(user_defined) > 3 else ''}) are not reproduced: Hugging Face "
            "would add a space after each"
        )
    scores = Counter(p.score for p in model.pieces if p.type == NORMAL)
    # Llama-2's whitespace runs share the lowest score, -1e9; the files agree with SentencePiece
    # on them (tested on every shared corpus). Ties above it are --method append's new pieces.
    tied = sorted(s for s, n in scores.items() if n > 1 and s > min(scores))
    if tied:
        examples = [p.piece for p in model.pieces if p.type == NORMAL and p.score == tied[0]]
        raise HFExportError(
            f"{sum(scores[s] for s in tied):,} pieces share scores ({examples[0]!r} and "
            f"{examples[1]!r} at {tied[0]}): SentencePiece breaks such ties by position in the "
            "text, which tokenizer.json's merge ranks cannot express (an --method append "
            "expansion?)"
        )


def build_tokenizer(model: ModelProto):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece ``model``.

    Raises:
        HFExportError: For a non-BPE model or a normalisation other than ``identity``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    check_exportable(model)
    spec, norm = model.trainer_spec(), model.normalizer_spec()
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=bpe_merges(model),
            unk_token=spec["unk_piece"],
            fuse_unk=True,
            byte_fallback=spec["byte_fallback"],
        )
    )
    steps = []
    if norm["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm["add_dummy_prefix"]:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    specials = [p.piece for p in model.pieces if p.type in (UNKNOWN, CONTROL)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = spec["bos_piece"]
    if bos in vocab:
        # Llama convention: <s> in front of every sequence (add_special_tokens=True).
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return tokenizer


def save_hf_files(model: ModelProto, directory: str | os.PathLike) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    Returns:
        The files written.
    """
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    spec = model.trainer_spec()
    names = {p.piece for p in model.pieces}
    special = {
        f"{role}_token": spec[f"{role}_piece"]
        for role in ("bos", "eos", "unk", "pad")
        if spec[f"{role}_piece"] in names
    }
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(model),
        clean_up_tokenization_spaces=False,
        **special,
    )
    fast.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # AutoTokenizer must build the fast tokenizer from tokenizer.json as written, not re-convert
    # tokenizer.model through LlamaTokenizer (which splits runs of spaces differently).
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (directory / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return [directory / n for n in ("tokenizer.json", "tokenizer_config.json")] + [
        directory / "special_tokens_map.json"
    ]
