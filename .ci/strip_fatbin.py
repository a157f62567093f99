"""Keep one GPU architecture's device code in a shared library's CUDA fat binaries.

Transformer Engine's core library carries cubins for nine architectures (463 MB for 2.11); the
device tool carries at most 64 MiB per call. An H100/H200 loads only the ``sm_90`` entries, so
each fat binary in ``.nv_fatbin`` is rewritten in place to hold just the entries of one
architecture (cubins and PTX), its header's size shrunk to match and the freed bytes zeroed:
every offset in the file stays valid, and the zeros compress to nothing. A fat binary with no
entry for that architecture (a kernel built only for other GPUs) is left whole.

    python3 .ci/strip_fatbin.py libtransformer_engine.so stripped.so --arch 90
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
# Fat binary header: magic, version, header size, size of the entries that follow.
FATBIN_HEADER = struct.Struct("<IHHQ")
# Entry header prefix: kind (1 PTX, 2 cubin), version, header size, payload size; the
# architecture (e.g. 90) is a uint32 at byte 28 of the entry header.
ENTRY_HEADER = struct.Struct("<HHIQ")
ENTRY_ARCH_OFFSET = 28


def _section(elf: bytes, name: str) -> tuple[int, int]:
    """File offset and size of an ELF64 little-endian section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        (name_offset,) = struct.unpack_from("<I", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        return name_offset, offset, size

    strtab = header(shstrndx)[1]
    for index in range(shnum):
        name_offset, offset, size = header(index)
        end = elf.index(b"\0", strtab + name_offset)
        if elf[strtab + name_offset : end].decode() == name:
            return offset, size
    raise ValueError(f"no {name} section")


def strip(data: bytearray, arch: int) -> tuple[int, int]:
    """Drop other architectures' entries in place; return bytes kept and dropped."""
    pos, end = _section(data, ".nv_fatbin")
    end += pos
    kept = dropped = 0
    while pos < end:
        magic, _, header_size, entries_size = FATBIN_HEADER.unpack_from(data, pos)
        if magic != FATBIN_MAGIC:  # alignment padding between fat binaries
            pos += 8
            continue
        entry, entries_end = pos + header_size, pos + header_size + entries_size
        keep, others = bytearray(), 0
        while entry < entries_end:
            _, _, entry_header_size, payload_size = ENTRY_HEADER.unpack_from(data, entry)
            if entry_header_size == 0:
                break
            length = entry_header_size + payload_size
            (entry_arch,) = struct.unpack_from("<I", data, entry + ENTRY_ARCH_OFFSET)
            if entry_arch == arch:
                keep += data[entry : entry + length]
                kept += payload_size
            else:
                others += payload_size
            entry += length
        if keep:
            struct.pack_into("<Q", data, pos + 8, len(keep))
            data[pos + header_size : entries_end] = keep.ljust(entries_size, b"\0")
            dropped += others
        pos = entries_end
    return kept, dropped


def main() -> None:
    """Command line: strip LIBRARY into OUTPUT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--arch", type=int, default=90, help="SM version to keep (default 90)")
    args = parser.parse_args()
    data = bytearray(args.library.read_bytes())
    kept, dropped = strip(data, args.arch)
    if not kept:
        raise SystemExit(f"{args.library}: no sm_{args.arch} device code")
    args.output.write_bytes(data)
    print(
        f"{args.library.name}: kept {kept / 2**20:.0f} MiB of sm_{args.arch} code, "
        f"zeroed {dropped / 2**20:.0f} MiB of other architectures'"
    )


if __name__ == "__main__":
    main()
