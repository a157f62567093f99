"""Corpus readers on the deliberately malformed edge file and on every supported container."""

import gzip
import json
import os
import shutil

import pytest

from megatron_ext.data.readers import (
    BLANK_LINE,
    INVALID_JSON,
    INVALID_UTF8,
    LONE_SURROGATE,
    MISSING_KEY,
    NOT_A_STRING,
    NOT_AN_OBJECT,
    BadField,
    InputError,
    expand_inputs,
    iter_blocks,
    parse_block,
)


def records(path, keys=("text",), block_bytes=4 << 20):
    return [
        (line, fields)
        for block in iter_blocks(str(path), block_bytes)
        for line, fields in parse_block(block, list(keys))
    ]


def records_of_bytes(path, data, **kwargs):
    path.write_bytes(data)
    return records(path, **kwargs)


def reasons(recs):
    return {line: (f[0].reason if isinstance(f[0], BadField) else "text") for line, f in recs}


def test_a_lone_surrogate_escape_is_a_bad_line_and_a_pair_is_a_character(tmp_path):
    """json.loads accepts "\\ud800" and gives a str that no tokenizer takes (UTF-8 cannot hold
    it): the line is classified here, where file:line is known, not in the tokenizer."""
    data = (
        '{"text": "pair \\ud83d\\ude00", "src": "a"}\n'
        '{"text": "half \\ud800 of one", "src": "b"}\n'
        '{"text": "ok", "src": "low \\uDC00"}\n'
        '{"text": "backslash u \\\\ud800 is text"}\n'
    )
    recs = records_of_bytes(tmp_path / "s.jsonl", data.encode(), keys=("text", "src"))
    assert recs[0][1] == ["pair \U0001f600", "a"]
    assert recs[1][1][0] == BadField(
        LONE_SURROGATE,
        '"text" has a lone surrogate \\ud800 (half of a JSON surrogate-pair escape) at character 5',
    )
    assert recs[1][1][1] == "b"
    assert recs[2][1][0] == "ok" and recs[2][1][1].reason == LONE_SURROGATE
    assert recs[3][1][0] == "backslash u \\ud800 is text"


def test_edge_file_lines_classified_as_documented(corpora):
    # edge/README.md: which of the 15 lines parse, and why the others do not.
    got = reasons(records(corpora / "edge" / "bad_lines.jsonl"))
    assert got == {
        1: "text",
        2: "text",
        3: "text",
        4: INVALID_JSON,
        5: INVALID_UTF8,
        6: NOT_A_STRING,
        7: MISSING_KEY,
        8: "text",
        9: "text",
        10: "text",
        11: INVALID_JSON,
        12: BLANK_LINE,
        13: "text",
        14: "text",
        15: "text",
    }


def test_edge_texts_match_strict_json_and_bom_is_gone(corpora):
    path = corpora / "edge" / "bad_lines.jsonl"
    raw = path.read_bytes().split(b"\n")
    for line, fields in records(path):
        if isinstance(fields[0], str):
            content = raw[line - 1].removeprefix(b"\xef\xbb\xbf").removesuffix(b"\r")
            assert fields[0] == json.loads(content.decode("utf-8"))["text"]
    first = records(path)[0][1][0]
    assert not first.startswith("\ufeff")
    assert len(records(path)[12][1][0].encode()) == 2 * 1024 * 1024  # line 13: exactly 2 MiB


@pytest.mark.parametrize("block_bytes", [1, 97, 4096])
def test_small_blocks_give_the_same_records(corpora, block_bytes):
    path = corpora / "edge" / "mixed_script.jsonl"
    assert records(path, block_bytes=block_bytes) == records(path)


def test_compressed_and_parquet_inputs_read_the_same(tmp_path, corpora):
    source = corpora / "zh" / "train.jsonl"
    expected = [(line, fields) for line, fields in records(source)]
    gz = tmp_path / "zh.jsonl.gz"
    gz.write_bytes(gzip.compress(source.read_bytes()))
    zstandard = pytest.importorskip("zstandard")
    zst = tmp_path / "zh.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(source.read_bytes()))
    assert records(gz, block_bytes=1000) == expected
    assert records(zst, block_bytes=1000) == expected

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f[0] for _, f in expected]
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), tmp_path / "zh.parquet")
    assert records(tmp_path / "zh.parquet") == expected
    bad = records(tmp_path / "zh.parquet", keys=("n", "missing"))
    assert bad[0][1][0].reason == NOT_A_STRING and bad[0][1][1].reason == MISSING_KEY


def test_plain_text_one_document_per_line(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"\xef\xbb\xbffirst line\r\n\r\nsecond \t line\n  \nlast without newline")
    got = records(path)
    assert [(n, f[0]) for n, f in got if isinstance(f[0], str)] == [
        (1, "first line"),
        (3, "second \t line"),
        (5, "last without newline"),
    ]
    assert [n for n, f in got if isinstance(f[0], BadField)] == [2, 4]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("doc.jsonl", "a"),
        ("doc.json", "a"),
        ("doc.ndjson", "a"),
        ("doc.JSONL", "a"),
        ("doc.txt", '{"text": "a"}'),
        ("doc.text", '{"text": "a"}'),
    ],
)
def test_each_documented_suffix_reads_as_its_format(tmp_path, name, text):
    """The module's documented suffixes: JSON Lines parse the object, plain text keeps the line."""
    assert records_of_bytes(tmp_path / name, b'{"text": "a"}\n') == [(1, [text])]


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('["a list"]\n"a string"\n{"text": null}\n')
    got = records(path)
    assert [f[0].reason for _, f in got] == [NOT_AN_OBJECT, NOT_AN_OBJECT, NOT_A_STRING]


def test_expand_inputs(tmp_path, corpora):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        shutil.copy(corpora / "edge" / "mixed_script.jsonl", tmp_path / name)
    assert expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")]) == [
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "b.jsonl"),
    ]
    with pytest.raises(InputError, match="^--input .*missing.jsonl: no such file"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match="^--corpus .*: a directory"):
        expand_inputs([str(tmp_path)], flag="--corpus")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(InputError, match="unknown input format"):
        expand_inputs([str(tmp_path / "x.csv")])


def test_corrupt_gzip_is_named(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(b"not gzip at all\n")
    with pytest.raises(InputError, match="bad.jsonl.gz: cannot decompress"):
        records(path)


def test_zstd_cut_short_or_damaged_is_named_and_frames_are_all_read(tmp_path, corpora):
    """python-zstandard's stream_reader silently stops at a cut (an interrupted download)."""
    zstandard = pytest.importorskip("zstandard")
    source = (corpora / "ar" / "valid.jsonl").read_bytes()
    expected = records_of_bytes(tmp_path / "plain.jsonl", source)
    whole = zstandard.ZstdCompressor().compress(source)
    half = len(source) // 2
    # Two frames, as parallel compressors (pzstd) and concatenated files write them.
    frames = zstandard.ZstdCompressor().compress(source[:half])
    frames += zstandard.ZstdCompressor().compress(source[half:])
    assert records_of_bytes(tmp_path / "frames.jsonl.zst", frames, block_bytes=1000) == expected
    for name, data in (("short.jsonl.zst", whole[:-10]), ("frames_short.jsonl.zst", frames[:-10])):
        with pytest.raises(InputError, match=f"{name}: cannot decompress .*ends inside a zstd"):
            records_of_bytes(tmp_path / name, data)
    damaged = bytearray(whole)
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = bytes(64)
    with pytest.raises(InputError, match="damaged.jsonl.zst: cannot decompress .*damaged"):
        records_of_bytes(tmp_path / "damaged.jsonl.zst", bytes(damaged))


def test_parquet_rows_are_numbered_across_batches(tmp_path):
    """A bad record is named by its row (1-based), also past the reader's first batch."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts: list[str | None] = [f"document {i}" for i in range(5000)]
    texts[4096] = None
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1500)
    read = records(path)
    assert [line for line, _ in read] == list(range(1, 5001))
    bad = [line for line, (field,) in read if not isinstance(field, str)]
    assert bad == [4097]


def test_blocks_account_for_every_input_byte(tmp_path, corpora):
    """Progress counts bytes of the file as stored: all of them, once, in every format."""
    source = corpora / "zh" / "train.jsonl"
    paths = [source, tmp_path / "zh.jsonl.gz"]
    paths[1].write_bytes(gzip.compress(source.read_bytes()))
    zstandard = pytest.importorskip("zstandard")
    paths.append(tmp_path / "zh.jsonl.zst")
    paths[2].write_bytes(zstandard.ZstdCompressor().compress(source.read_bytes()))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paths.append(tmp_path / "zh.parquet")
    texts = [fields[0] for _, fields in records(source)]
    rows = (texts * (5000 // len(texts) + 1))[:5000]  # beyond the reader's batches of rows
    pq.write_table(pa.table({"text": rows}), paths[3], row_group_size=1000)
    for path in paths:
        consumed = [block.consumed for block in iter_blocks(str(path), 1 << 14)]
        assert len(consumed) > 2 and sum(consumed) == os.path.getsize(path), path.name
