"""Reading and writing safetensors files, memory-mapped and tensor by tensor.

Our own small reader/writer instead of `safetensors.numpy` because we need: bfloat16 (numpy has
none; `ml_dtypes` supplies it), zero-copy memory-mapped views, a one-line error naming the file
for a corrupt header, and a writer that streams tensors one at a time (peak memory = one tensor).
The format is the public one (8-byte little-endian header length, JSON header, raw data), so the
files we write load with `safetensors` and the native runner alike.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import ml_dtypes
import numpy as np

from gptbc.errors import GptbcError
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
MAX_HEADER = 100 * 1024 * 1024


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
        size = self.path.stat().st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise GptbcError(f"{self.path}: corrupt safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise GptbcError(f"{self.path}: corrupt safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(self._file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise GptbcError(f"{self.path}: corrupt safetensors header (not valid JSON)") from None
        if not isinstance(header, dict):
            raise GptbcError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise GptbcError(f"{self.path}: tensor {name!r} has a bad header entry {info!r}") from None
            if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or start < 0 \
                    or self._base + end > size:
                raise GptbcError(f"{self.path}: tensor {name!r} data offsets do not match its shape/dtype "
                                 f"or the file size")
            self._entries[name] = (dtype, shape, start, end)
        access = mmap.ACCESS_COPY if private else mmap.ACCESS_READ
        self._map = mmap.mmap(self._file.fileno(), 0, access=access) if size else None

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
