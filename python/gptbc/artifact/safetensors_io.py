"""Reading and writing safetensors files, memory-mapped and tensor by tensor.

Our own small reader/writer instead of `safetensors.numpy` because we need: bfloat16 (numpy has
none; `ml_dtypes` supplies it), zero-copy memory-mapped views, a one-line error naming the file
for a corrupt header, and a writer that streams tensors one at a time (peak memory = one tensor).
The format is the public one (8-byte little-endian header length, JSON header, raw data), so the
files we write load with `safetensors` and the native runner alike.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import ml_dtypes
import numpy as np

from gptbc.errors import GptbcError
from gptbc.artifact.files import clip, reading
from gptbc.artifact.manifest import ALIGNMENT

# safetensors dtype name ↔ numpy dtype
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("float64"), "F32": np.dtype("float32"), "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("int64"), "I32": np.dtype("int32"),
    "I16": np.dtype("int16"), "I8": np.dtype("int8"), "U8": np.dtype("uint8"), "U32": np.dtype("uint32"),
    "BOOL": np.dtype("bool"),
}
NAMES = {v: k for k, v in DTYPES.items()}
# The header is padded so data starts ALIGN-byte aligned (the manifest's alignment: TVM takes CPU tensors without
# a copy only at such addresses). The format forbids gaps between tensors, so writers put sizes that are
# multiples of ALIGN first (`aligned_order`) to keep those tensors aligned too.
ALIGN = ALIGNMENT
# The largest header read: 16 MiB holds ~100,000 tensor entries (the largest checkpoints have a few thousand), and
# its parse stays far from a memory limit even for a set of many shards.
MAX_HEADER = 16 * 1024 * 1024
MAX_DIMS = 8


def dtype_name(dtype: np.dtype | str) -> str:
    """numpy dtype → TVM-style name ('float32', 'bfloat16', 'uint32', ...)."""
    return str(np.dtype(dtype))


def aligned_order(sizes: list[int]) -> list[int]:
    """Indices in a write order that keeps every tensor whose byte size is a multiple of ALIGN aligned."""
    return sorted(range(len(sizes)), key=lambda i: sizes[i] % ALIGN != 0)


class SafetensorsFile:
    """A memory-mapped safetensors file; `get(name)` returns a view, not a copy.

    Views are read-only unless `private=True`: a copy-on-write mapping, whose views are writable
    arrays (what DLPack needs to hand them to TVM) while the file itself is never written.
    """

    def __init__(self, path: str | Path, private: bool = False):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as err:
            raise GptbcError(f"{self.path}: cannot open ({err.strerror})") from None
        try:
            with reading(self.path, "safetensors header"):
                size = os.fstat(self._file.fileno()).st_size
                self.metadata, self._base, self._entries = _read_header(self._file, self.path, size)
                access = mmap.ACCESS_COPY if private else mmap.ACCESS_READ
                self._map = mmap.mmap(self._file.fileno(), 0, access=access) if size else None
        except BaseException:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self._entries[name]
        return dtype, shape

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[name]
        if end == start:
            return np.zeros(shape, dtype)
        return np.frombuffer(self._map, dtype=dtype, count=(end - start) // dtype.itemsize,
                             offset=self._base + start).reshape(shape)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process's resident memory (they are re-read if touched again).

        Reading a mapped file makes its pages count toward our RSS until unmapped; a converter that
        streams a 4.5 GB checkpoint would otherwise end up holding all of it.
        """
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, start, end = self._entries[name]
        page = mmap.PAGESIZE
        lo = (self._base + start) // page * page
        hi = min(-(-(self._base + end) // page) * page, len(self._map))
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        self._entries.clear()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # views still alive; the mapping goes when they do
                pass
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Entry = tuple[np.dtype, tuple[int, ...], int, int]  # dtype, shape, start and end in the data section


def _read_header(f: BinaryIO, path: Path, size: int) -> tuple[dict, int, dict[str, Entry]]:
    """(metadata, where the data starts, name → (dtype, shape, start, end) in the data section) of a safetensors
    file of `size` bytes; every length and offset is checked against the file before it is used."""
    head = f.read(8)
    if len(head) < 8:
        raise GptbcError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise GptbcError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size}, at most "
                         f"{MAX_HEADER} read)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise GptbcError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    except RecursionError:
        raise GptbcError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise GptbcError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise GptbcError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data = size - 8 - n
    entries = {name: _entry(path, name, info, data) for name, info in header.items()}
    # the format forbids overlapping tensors: one byte written through one tensor would change another
    spans = sorted((start, end, name) for name, (_, _, start, end) in entries.items() if end > start)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise GptbcError(f"{path}: corrupt safetensors header (tensors {clip(a)} and {clip(b)} overlap)")
    return metadata, 8 + n, entries


def _entry(path: Path, name: str, info: object, data: int) -> Entry:
    """One header entry, checked: a known dtype, a shape of non-negative integers, offsets inside the data
    section (`data` bytes) spanning exactly the shape's bytes."""
    def bad(why: str) -> GptbcError:
        return GptbcError(f"{path}: tensor {clip(name)} has a bad header entry ({why})")

    if not isinstance(info, dict):
        raise bad(f"not an object: {clip(info)}")
    dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise bad(f"dtype {clip(info.get('dtype'))} is not one of {', '.join(DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
            not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {clip(shape)} is not a list of at most {MAX_DIMS} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise bad(f"data_offsets {clip(offsets)} is not two integers")
    start, end = offsets
    if not 0 <= start <= end <= data:
        raise bad(f"data_offsets {clip(offsets)} are not inside the file's {data} data bytes")
    if end - start != math.prod(shape) * dtype.itemsize:
        raise bad(f"data_offsets {clip(offsets)} span {end - start} bytes, its shape and dtype "
                  f"{math.prod(shape) * dtype.itemsize}")
    return dtype, tuple(shape), start, end


def _pad(n: int) -> int:
    return (-n) % ALIGN


def write_safetensors(path: str | Path, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                      arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors whose names/shapes/dtypes are known up front, taking the data one array at a time.

    `arrays` yields the tensors in the order of `specs` (a generator keeps only one in memory).
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * _pad(8 + len(raw))  # trailing spaces are valid JSON and align the data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        # Drive the producer to its end (no zip): a generator's code after its last yield must run too.
        count = 0
        for arr in arrays:
            if count == len(specs):
                raise GptbcError(f"{path}: got more tensors than the {len(specs)} header entries")
            name, shape, dtype = specs[count]
            _write_array(f, name, shape, np.dtype(dtype), arr)
            count += 1
        if count != len(specs):
            raise GptbcError(f"{path}: got {count} tensors for {len(specs)} header entries")


def _write_array(f: BinaryIO, name: str, shape: tuple[int, ...], dtype: np.dtype, arr: np.ndarray) -> None:
    if tuple(arr.shape) != tuple(shape) or arr.dtype != dtype:
        raise GptbcError(f"tensor {name}: produced {arr.dtype}{list(arr.shape)}, planned {dtype}{list(shape)}")
    f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)  # uint8 view: bfloat16 has no buffer format
