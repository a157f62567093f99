"""Corpus readers: files and globs in, blocks of raw records out, bad lines named by file:line.

Formats: JSON Lines (``.jsonl``, ``.json``, ``.ndjson``), plain text (``.txt``, one document per
line) and Parquet (``.parquet``); ``.gz`` and ``.zst`` are decompressed on the fly. Files are read
in blocks of whole lines (a few MB), never whole, so memory stays bounded on any input size; the
blocks travel to worker processes as bytes, where :func:`parse_block` turns them into records.

Each record field is either the text or a :class:`BadField` saying why it cannot be used. Reasons
in ``BAD_LINE_REASONS`` are input errors (fatal unless skipping was asked for); blank lines and
empty documents are not errors, only dropped and counted.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_KEY = "missing_key"
NOT_A_STRING = "not_a_string"
LONE_SURROGATE = "lone_surrogate"
BLANK_LINE = "blank_line"
EMPTY_DOCUMENT = "empty_document"
BAD_LINE_REASONS = (
    INVALID_UTF8,
    INVALID_JSON,
    NOT_AN_OBJECT,
    MISSING_KEY,
    NOT_A_STRING,
    LONE_SURROGATE,
)

_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "txt",
    ".text": "txt",
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".zst")
_BOM = b"\xef\xbb\xbf"
DEFAULT_BLOCK_BYTES = 1 << 20
_PARQUET_ROWS = 2048


class InputError(ValueError):
    """An input that cannot be read (missing, unknown format, malformed line)."""


@dataclass(frozen=True)
class BadField:
    """Why a record field gives no document."""

    reason: str
    message: str


@dataclass
class RawBlock:
    """Consecutive records of one file, not parsed yet.

    Attributes:
        path: The file, as the user named it (used in messages).
        fmt: ``jsonl``, ``txt`` or ``parquet``.
        first_line: 1-based line (row, for Parquet) number of the first record.
        data: Whole lines as bytes (jsonl, txt) or, for Parquet, one list of values per key.
        consumed: Bytes of the input file consumed by this block (for progress).
    """

    path: str
    fmt: str
    first_line: int
    data: bytes | dict[str, list]
    consumed: int


def input_format(path: str | os.PathLike) -> tuple[str, str | None]:
    """The record format and compression of ``path``, from its name.

    Raises:
        InputError: For a name this module cannot read.
    """
    name = Path(path).name.lower()
    compression = next((c for c in _COMPRESSION if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    fmt = _FORMATS.get(Path(name).suffix)
    if fmt is None or (fmt == "parquet" and compression):
        raise InputError(
            f"{path}: unknown input format; expected one of "
            f"{', '.join(sorted(_FORMATS))}, optionally with .gz or .zst (not for .parquet)"
        )
    return fmt, compression


def expand_inputs(patterns: Sequence[str], flag: str = "--input") -> list[str]:
    """Files named by ``patterns`` (paths or globs), each pattern's matches sorted, no repeats.

    Args:
        patterns: Paths or globs.
        flag: The command-line flag they came from, for error messages.

    Raises:
        InputError: If a pattern matches no file or names a file of unknown format.
    """
    files: list[str] = []
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        )
        if os.path.isdir(pattern):
            raise InputError(f"{flag} {pattern}: a directory; give files or a glob (dir/*.jsonl)")
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise InputError(f"{flag} {pattern}: no such file")
        for match in matches:
            input_format(match)
            if match not in files:
                files.append(match)
    return files


class _CountingReader(io.RawIOBase):
    """Counts the bytes read from the file underneath a decompressor (for progress)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.count += n or 0
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class _ZstdFrames(io.RawIOBase):
    """The zstd frames of a file, decompressed one after another; ending inside one is an error.

    python-zstandard's ``stream_reader`` returns what it has decompressed when its input ends
    mid-frame and then reports end of file: a ``.zst`` cut short (an interrupted download) read
    as a shorter corpus, without a word. gzip raises ``EOFError`` there; this does the same.
    """

    def __init__(self, raw: _CountingReader, read_bytes: int = 1 << 20) -> None:
        import zstandard

        self._raw = raw
        self._read_bytes = read_bytes
        self._context = zstandard.ZstdDecompressor()
        self._frame = self._context.decompressobj()
        self._in_frame = False  # bytes of the current frame fed, its end not reached
        self._out = bytearray()
        self._at_end = False
        self._zstd_error = zstandard.ZstdError

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while len(self._out) < len(buffer) and not self._at_end:
            data = self._raw.read(self._read_bytes)
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (cut short?)")
                self._at_end = True
            while data:  # one read may finish a frame and start the next
                self._in_frame = True
                try:
                    self._out += self._frame.decompress(data)
                except self._zstd_error as err:
                    raise ValueError(f"not zstd data, or damaged ({err})") from err
                data = b""
                if self._frame.eof:
                    data = self._frame.unused_data
                    self._frame, self._in_frame = self._context.decompressobj(), False
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        del self._out[:n]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_stream(path: str, compression: str | None) -> tuple[BinaryIO, _CountingReader]:
    raw = _CountingReader(open(path, "rb"))  # noqa: SIM115 - closed by the caller via the stream
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if compression == ".zst":
        return io.BufferedReader(_ZstdFrames(raw)), raw
    return raw, raw


def iter_blocks(path: str, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[RawBlock]:
    """Read ``path`` in blocks of whole records.

    Args:
        path: An input file.
        block_bytes: Approximate uncompressed bytes per block (a longer line makes a longer block).

    Raises:
        InputError: If the file is not valid gzip/zstd/Parquet.
    """
    fmt, compression = input_format(path)
    if fmt == "parquet":
        yield from _iter_parquet_blocks(path)
        return
    stream, counter = _open_stream(path, compression)
    line = 1
    carry = b""
    consumed = 0
    at_start = True
    with stream:
        while True:
            try:
                chunk = stream.read(block_bytes)
            except (OSError, EOFError, ValueError) as err:
                raise InputError(f"{path}: cannot decompress ({err})") from err
            if not chunk:
                break
            if at_start and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
            at_start = False
            data = carry + chunk if carry else chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
            yield RawBlock(path, fmt, line, block, counter.count - consumed)
            consumed = counter.count
            line += block.count(b"\n")
    if carry:
        yield RawBlock(path, fmt, line, carry, counter.count - consumed)


def _iter_parquet_blocks(path: str) -> Iterator[RawBlock]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from err
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own hierarchy (ArrowInvalid, OSError, ...)
        raise InputError(f"{path}: not a readable Parquet file ({err})") from err
    size = os.path.getsize(path)
    total_rows = max(parquet.metadata.num_rows, 1)
    columns = set(parquet.schema_arrow.names)
    row = 1
    reported = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_ROWS):
        data = {
            name: batch.column(name).to_pylist() for name in batch.schema.names if name in columns
        }
        data["__rows__"] = batch.num_rows
        done = size * (row - 1 + batch.num_rows) // total_rows
        yield RawBlock(path, "parquet", row, data, done - reported)
        reported = done
        row += batch.num_rows


def _field(value: object, key: str) -> str | BadField:
    if value is None:
        return BadField(NOT_A_STRING, f'"{key}" is null')
    if not isinstance(value, str):
        return BadField(NOT_A_STRING, f'"{key}" is a {type(value).__name__}, not a string')
    return value


def _without_lone_surrogate(value: str | BadField, key: str) -> str | BadField:
    r"""``value``, or why not: JSON's ``\ud800`` escapes decode to a code point UTF-8 cannot hold.

    A surrogate pair (an emoji) decodes to one character; half of one is left as a surrogate,
    which every tokenizer rejects.
    """
    if isinstance(value, BadField):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return BadField(
            LONE_SURROGATE,
            f'"{key}" has a lone surrogate \\u{ord(value[err.start]):04x} (half of a JSON '
            f"surrogate-pair escape) at character {err.start}",
        )
    return value


def _parse_json_line(line: str, keys: Sequence[str]) -> list[str | BadField]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        bad = BadField(INVALID_JSON, f"invalid JSON ({err})")
        return [bad] * len(keys)
    if not isinstance(obj, dict):
        bad = BadField(NOT_AN_OBJECT, f"a JSON {type(obj).__name__}, not an object")
        return [bad] * len(keys)
    fields = [
        _field(obj[k], k) if k in obj else BadField(MISSING_KEY, f'no "{k}" key') for k in keys
    ]
    # Only a \uD800-\uDFFF escape makes a surrogate. Testing for "\u" alone would send every
    # line of a corpus written with json.dumps' default ensure_ascii (Arabic as \u06xx) through
    # the check.
    if "\\ud" in line or "\\uD" in line:
        fields = [_without_lone_surrogate(f, k) for f, k in zip(fields, keys, strict=True)]
    return fields


def parse_block(block: RawBlock, keys: Sequence[str]) -> Iterator[tuple[int, list[str | BadField]]]:
    """Records of a block: ``(line number, one field per key)``.

    A blank line gives ``BadField(BLANK_LINE)`` for every key; JSON problems, missing keys and
    non-string values give the matching ``BAD_LINE_REASONS``. Plain text has a single field (the
    line without its line ending).
    """
    if block.fmt == "parquet":
        yield from _parse_parquet(block, keys)
        return
    data: bytes = block.data  # type: ignore[assignment]
    try:
        lines: list[str | bytes] = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    blank = [BadField(BLANK_LINE, "blank line")] * len(keys)
    for offset, line in enumerate(lines):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = BadField(INVALID_UTF8, f"invalid UTF-8 at byte {err.start} of the line")
                yield block.first_line + offset, [bad] * len(keys)
                continue
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip():
            yield block.first_line + offset, blank
        elif block.fmt == "txt":
            yield block.first_line + offset, [line]
        else:
            yield block.first_line + offset, _parse_json_line(line, keys)


def _parse_parquet(
    block: RawBlock, keys: Sequence[str]
) -> Iterator[tuple[int, list[str | BadField]]]:
    data: dict = block.data  # type: ignore[assignment]
    missing = BadField(MISSING_KEY, "no such column")
    columns = [data.get(k) for k in keys]
    for i in range(data["__rows__"]):
        fields = [
            missing if col is None else _field(col[i], k)
            for col, k in zip(columns, keys, strict=True)
        ]
        yield block.first_line + i, fields
