"""Read and write SentencePiece ``ModelProto`` files without the ``protobuf`` package.

A ``tokenizer.model`` is a protobuf ``ModelProto``: repeated ``pieces`` (field 1), then
``trainer_spec`` (2), ``normalizer_spec`` (3), ``self_test_data`` (4), ``denormalizer_spec`` (5).
Expansion only appends pieces and reads a few settings, so a small wire-format codec is enough and
keeps ``protobuf`` out of the dependencies. Every field other than the pieces is kept as the exact
bytes it was read as, so a merged model carries the base model's specs unchanged.

Field numbers are those of sentencepiece's ``sentencepiece_model.proto``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

# TrainerSpec / NormalizerSpec fields read back as training options: number -> (name, kind).
_TRAINER_FIELDS = {
    3: ("model_type", "enum"),
    4: ("vocab_size", "int"),
    10: ("character_coverage", "float"),
    18: ("max_sentence_length", "int"),
    20: ("max_sentencepiece_length", "int"),
    21: ("split_by_unicode_script", "bool"),
    22: ("split_by_whitespace", "bool"),
    23: ("split_by_number", "bool"),
    24: ("treat_whitespace_as_suffix", "bool"),
    25: ("split_digits", "bool"),
    26: ("allow_whitespace_only_pieces", "bool"),
    35: ("byte_fallback", "bool"),
    40: ("unk_id", "int"),
    41: ("bos_id", "int"),
    42: ("eos_id", "int"),
    43: ("pad_id", "int"),
    45: ("unk_piece", "str"),
    46: ("bos_piece", "str"),
    47: ("eos_piece", "str"),
    48: ("pad_piece", "str"),
}
_NORMALIZER_FIELDS = {
    1: ("name", "str"),
    3: ("add_dummy_prefix", "bool"),
    4: ("remove_extra_whitespaces", "bool"),
    5: ("escape_whitespaces", "bool"),
}
# Defaults of sentencepiece_model.proto for fields a model may omit.
_TRAINER_DEFAULTS = {
    "model_type": "unigram",
    "vocab_size": 8000,
    "character_coverage": 0.9995,
    "max_sentence_length": 4192,
    "max_sentencepiece_length": 16,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "treat_whitespace_as_suffix": False,
    "split_digits": False,
    "allow_whitespace_only_pieces": False,
    "byte_fallback": False,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_piece": "<unk>",
    "bos_piece": "<s>",
    "eos_piece": "</s>",
    "pad_piece": "<pad>",
}
_NORMALIZER_DEFAULTS = {
    # Without a name there is no character map either, and sentencepiece normalises nothing.
    "name": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": True,
    "escape_whitespaces": True,
}


class ModelProtoError(ValueError):
    """The bytes are not a SentencePiece model."""


@dataclass
class Piece:
    """One vocabulary entry: string, score and ``SentencePiece.Type``."""

    piece: str
    score: float
    type: int = NORMAL


@dataclass
class ModelProto:
    """Pieces (editable) and the other top-level fields as raw ``(number, bytes)`` records."""

    pieces: list[Piece]
    other_fields: list[tuple[int, int, bytes]] = field(default_factory=list)

    def _submessage(self, number: int) -> bytes:
        for num, wire, raw in self.other_fields:
            if num == number and wire == _LEN:
                return next(_fields(raw))[2]
        return b""

    def trainer_spec(self) -> dict:
        """Training options of the model (defaults filled in), keyed by proto field name."""
        return _read_spec(self._submessage(2), _TRAINER_FIELDS, _TRAINER_DEFAULTS)

    def normalizer_spec(self) -> dict:
        """Normalizer options of the model (defaults filled in), keyed by proto field name."""
        return _read_spec(self._submessage(3), _NORMALIZER_FIELDS, _NORMALIZER_DEFAULTS)

    def with_normalizer_flags(self, **flags: bool) -> ModelProto:
        """A copy with boolean ``normalizer_spec`` options set (``add_dummy_prefix=False``).

        Every other field is kept as read.
        """
        numbers = {}
        for name, value in flags.items():
            number = next((n for n, (f, kind) in _NORMALIZER_FIELDS.items() if f == name), None)
            if number is None or _NORMALIZER_FIELDS[number][1] != "bool":
                raise ValueError(f"{name} is not a boolean normalizer option")
            numbers[number] = value
        options = b"".join(_key(n, _VARINT) + _varint(int(v)) for n, v in numbers.items())
        other = []
        found = False
        for num, wire, raw in self.other_fields:
            if num == 3 and wire == _LEN:
                found = True
                body = next(_fields(raw))[2]
                kept = b"".join(r for n, _, _, r in _fields(body) if n not in numbers)
                raw = _key(3, _LEN) + _length_delimited(kept + options)
            other.append((num, wire, raw))
        if not found:
            other.append((3, _LEN, _key(3, _LEN) + _length_delimited(options)))
        return ModelProto(list(self.pieces), other)

    def serialize(self) -> bytes:
        """The model as ``ModelProto`` bytes: pieces first, then the other fields as read."""
        out = bytearray()
        for p in self.pieces:
            body = _key(1, _LEN) + _length_delimited(p.piece.encode("utf-8"))
            body += _key(2, _FIXED32) + struct.pack("<f", p.score)
            if p.type != NORMAL:
                body += _key(3, _VARINT) + _varint(p.type)
            out += _key(1, _LEN) + _length_delimited(bytes(body))
        for _, _, raw in self.other_fields:
            out += raw
        return bytes(out)


def parse_model(data: bytes) -> ModelProto:
    """Parse ``ModelProto`` bytes.

    Raises:
        ModelProtoError: If the bytes are not a well-formed model with pieces.
    """
    pieces: list[Piece] = []
    other: list[tuple[int, int, bytes]] = []
    try:
        for number, wire, value, raw in _fields(data):
            if number == 1 and wire == _LEN:
                pieces.append(_parse_piece(value))
            else:
                other.append((number, wire, raw))
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as err:
        raise ModelProtoError(f"not a SentencePiece model ({err})") from err
    if not pieces:
        raise ModelProtoError("not a SentencePiece model (no pieces)")
    return ModelProto(pieces, other)


def _parse_piece(data: bytes) -> Piece:
    piece = Piece("", 0.0)
    for number, wire, value, _ in _fields(data):
        if number == 1 and wire == _LEN:
            piece.piece = value.decode("utf-8")
        elif number == 2 and wire == _FIXED32:
            piece.score = struct.unpack("<f", value)[0]
        elif number == 3 and wire == _VARINT:
            piece.type = value
    return piece


def _read_spec(data: bytes, fields: dict, defaults: dict) -> dict:
    spec = dict(defaults)
    for number, wire, value, _ in _fields(data):
        if number not in fields:
            continue
        name, kind = fields[number]
        if kind == "str" and wire == _LEN:
            spec[name] = value.decode("utf-8")
        elif kind == "float" and wire == _FIXED32:
            spec[name] = struct.unpack("<f", value)[0]
        elif kind == "bool" and wire == _VARINT:
            spec[name] = bool(value)
        elif kind == "enum" and wire == _VARINT:
            spec[name] = MODEL_TYPES.get(value, str(value))
        elif kind == "int" and wire == _VARINT:
            # int32 fields hold negative values (pad_id = -1) as 64-bit two's complement.
            spec[name] = value - (1 << 64) if value >= 1 << 63 else value
    return spec


def _fields(data: bytes) -> Iterator[tuple[int, int, object, bytes]]:
    """``(field number, wire type, value, raw bytes of the whole field)`` of a message."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _FIXED64:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == _LEN:
            value, pos = _read_length_delimited(data, pos)
        elif wire == _FIXED32:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated message")
        yield number, wire, value, data[start:pos]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _read_length_delimited(data: bytes, pos: int) -> tuple[bytes, int]:
    length, pos = _read_varint(data, pos)
    if pos + length > len(data):
        raise ValueError("truncated field")
    return data[pos : pos + length], pos + length


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _length_delimited(payload: bytes) -> bytes:
    return _varint(len(payload)) + payload
