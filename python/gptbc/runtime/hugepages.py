"""CPU memory for the weights the kernels stream, on transparent huge pages where Linux offers them.

A decode step reads every weight once, in long streams. On 4 KiB pages each stream takes a TLB miss and a page
walk every 4 KiB, and the cores' prefetchers stop at each page's end; on 2 MiB pages neither happens. Linux gives
anonymous memory huge pages only where a program asks (`madvise`, the usual THP setting), and TVM's CPU allocator
does not ask (numpy does, for its own large arrays), so the runner puts the tensors the int8 kernels stream (the
repacked weights, nearly all of a model's bytes) in one mapping that asks: the repack kernels write them there.
Measured on a Zen 4 (BENCHMARKS.md, "Session 6"): a santacoder-shaped decode step 9-10% faster at 4 and 8 bits.
Where there are no huge pages (another OS, THP off, no free 2 MiB blocks) the mapping is ordinary memory.
"""

from __future__ import annotations

import mmap

import numpy as np

HUGE = 2 << 20  # the x86-64 and arm64 (4 KiB granule) PMD page size
ALIGN = 4096  # each tensor starts on a page of its own (the kernels need 64 bytes)


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class HugePageArena:
    """One anonymous private mapping for tensors of `sizes` bytes, advised for huge pages, handed out one after the
    other (`empty`, or `place` for a copy). It lives as long as any tensor in it (they hold its buffer)."""

    def __init__(self, sizes: list[int]):
        total = sum(map(_rounded, sizes))
        self._map = mmap.mmap(-1, total + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP compiled out of this kernel: ordinary pages, still correct
            pass
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._next = (-self._bytes.ctypes.data) % HUGE  # start on a huge page: nothing of the first one is wasted
        self._end = self._next + total

    def fits(self, nbytes: int) -> bool:
        return self._next + nbytes <= self._end

    def empty(self, shape: tuple[int, ...], dtype: str):
        """A TVM tensor of `shape` and `dtype` in the arena's next bytes (not initialized)."""
        import tvm

        dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not self.fits(nbytes):
            raise ValueError(f"internal: the huge-page arena has {self._end - self._next} bytes left, not {nbytes}")
        view = self._bytes[self._next:self._next + nbytes].view(dtype).reshape(shape)
        self._next += _rounded(nbytes)
        return tvm.runtime.from_dlpack(view)

    def place(self, tensor):
        """A copy of CPU tensor `tensor` in the arena."""
        placed = self.empty(tuple(tensor.shape), str(tensor.dtype))
        tensor.copyto(placed)
        return placed


def arena_for(sizes: list[int]) -> HugePageArena | None:
    """An arena for tensors of `sizes` bytes where this platform can advise huge pages, else None (keep the tensors
    as they are)."""
    if not sum(sizes) or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return None
    try:
        return HugePageArena(sizes)
    except (OSError, ValueError):  # no address space or memory for it: the VM's own tensors serve as well
        return None
