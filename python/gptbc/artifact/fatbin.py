"""What a CUDA fatbin holds (SASS and PTX per arch) and whether a GPU of a given SM can run it: read by the
compiler when it records a library's kernels and by the runtime before it loads them."""

from __future__ import annotations

import struct

from gptbc.errors import GptbcError

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2


def fatbin_entries(blob: bytes) -> list[tuple[str, int]]:
    """[("sass" | "ptx", arch number like 80 or 90)] of a fatbin, read from its entry headers.

    Layout (CUDA's fatbinary container): a 16-byte header (magic, version, header size, payload size),
    then entries, each a header (kind u16 at 0, its header size u32 at 4, payload size u64 at 8, the SM
    number u32 at 28) followed by its payload.
    """
    if len(blob) < 16 or struct.unpack_from("<I", blob)[0] != FATBIN_MAGIC:
        raise GptbcError("not a CUDA fatbin (bad magic)")
    header_size, payload = struct.unpack_from("<HQ", blob, 6)
    entries, pos, end = [], header_size, header_size + payload
    while pos + 32 <= min(end, len(blob)):
        kind, entry_header, size = struct.unpack_from("<HxxIQ", blob, pos)
        arch = struct.unpack_from("<I", blob, pos + 28)[0]
        if kind in (KIND_PTX, KIND_ELF):
            entries.append(("ptx" if kind == KIND_PTX else "sass", arch))
        if entry_header == 0:
            break
        pos += entry_header + size
    return entries


def can_run(entries: list[tuple[str, int]], sm: int) -> bool:
    """SASS runs on its own major version at an equal or higher minor; PTX on any equal or newer GPU."""
    for kind, arch in entries:
        if kind == "sass" and arch // 10 == sm // 10 and arch <= sm:
            return True
        if kind == "ptx" and arch <= sm:
            return True
    return False


def describe(entries: list[tuple[str, int]]) -> str:
    sass = [f"sm_{a}" for k, a in entries if k == "sass"]
    ptx = [f"compute_{a}" for k, a in entries if k == "ptx"]
    return "SASS for " + (", ".join(sass) or "no arch") + "; PTX for " + (", ".join(ptx) or "no arch")
