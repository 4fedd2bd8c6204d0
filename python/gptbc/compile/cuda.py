"""CUDA kernels compiled ahead of time by nvcc and embedded in the library, so it is one file.

TVM 0.27's CUDA codegen (BuildCUDA) hands CUDA C to a module factory. With no CUDA runtime loaded (no
libcuda, as on a build machine) that is a fallback module that keeps the source; with one, the factory
compiles the source at build time through `tvm_callback_cuda_compile` (NVRTC). A library whose CUDA module
holds source (format "cuda") must compile it again when it loads, through that Python hook. A module whose
format is a binary one ("fatbin", "cubin", "ptx") goes straight to cuModuleLoadData: no hook, no NVRTC, no
Python (src/backend/cuda/runtime/cuda_module.cc, CUDAModuleCreateImpl and CUDAModuleLoadFromBytes).

So gptbc builds with TVM_COMPILE_FORCE_FALLBACK=1 (the module keeps its source, on any machine), compiles
that source with nvcc (SASS for each requested arch, PTX for the highest, so an sm_80 build also runs on an
H100/H200 through the driver's JIT) and, when the library is written, swaps the CUDA module's serialized
bytes `[fmt "cuda"][function table][source]` for `[fmt "fatbin"][function table][fatbin]` in the blob
TVM links into the library (`__tvm_ffi__library_bin`, tvm-ffi's library_module.cc). What the fatbin holds
is recorded in the library's manifest (`cuda_fatbin`); runtime/cuda.py reads it there.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Callable, Iterator

from gptbc.artifact.fatbin import fatbin_entries
from gptbc.errors import GptbcError

FORCE_FALLBACK = "TVM_COMPILE_FORCE_FALLBACK"


def nvcc_gencode(archs: list[str]) -> list[str]:
    """nvcc flags: SASS for each arch, PTX for the highest (JIT-compiled by the driver on newer GPUs)."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    top = archs[-1][3:]
    return flags + ["-gencode", f"arch=compute_{top},code=compute_{top}"]


def fatbin_plan(archs: list[str]) -> list[tuple[str, int]]:
    """What nvcc_gencode(archs) makes nvcc write: [("sass", 80), ..., ("ptx", highest)]."""
    numbers = [int(a[3:].rstrip("a")) for a in archs]
    return [("sass", n) for n in numbers] + [("ptx", numbers[-1])]


@contextlib.contextmanager
def keep_cuda_source() -> Iterator[None]:
    """While TVM builds: make its CUDA codegen keep the kernels as source (its fallback module), even where
    a CUDA runtime is loaded and would otherwise compile them with NVRTC (cuda_fallback_module.h reads the
    variable at every build)."""
    before = os.environ.get(FORCE_FALLBACK)
    os.environ[FORCE_FALLBACK] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[FORCE_FALLBACK]
        else:
            os.environ[FORCE_FALLBACK] = before


def find_cuda_module(module):
    if module.kind == "cuda":
        return module
    for imported in module.imports:
        found = find_cuda_module(imported)
        if found is not None:
            return found
    return None


def nvcc_fatbin(source: str, target, archs: list[str]) -> bytes:
    """The kernels compiled by nvcc; checked to hold exactly fatbin_plan(archs), which the manifest records."""
    from tvm.support import nvcc

    try:
        with target:
            fatbin = bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=nvcc_gencode(archs),
                                             compiler="nvcc"))
    except Exception as err:
        raise GptbcError(f"nvcc failed on the generated kernels for {','.join(archs)}: "
                         f"{str(err).strip().splitlines()[-1][:300]}") from None
    if sorted(fatbin_entries(fatbin)) != sorted(fatbin_plan(archs)):
        raise GptbcError(f"internal: nvcc's fatbin holds {fatbin_entries(fatbin)}, expected {fatbin_plan(archs)}")
    return fatbin


def _u64(blob: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", blob, pos)[0], pos + 8


def _sized(data: bytes) -> bytes:
    """tvm-ffi's stream encoding of a string or bytes: u64 length, then the bytes."""
    return struct.pack("<Q", len(data)) + data


def cuda_module_with_fatbin(saved: bytes, source: bytes, fatbin: bytes) -> bytes:
    """A CUDA module's SaveToBytes output `[fmt "cuda"][fmap][source]` with the source replaced by `fatbin`."""
    head, tail = _sized(b"cuda"), _sized(source)
    if not (saved.startswith(head) and saved.endswith(tail)):
        raise GptbcError("internal: the CUDA module was not saved as the CUDA source nvcc compiled")
    return _sized(b"fatbin") + saved[len(head):len(saved) - len(tail)] + _sized(fatbin)


def embed_fatbin(blob: bytes, source: bytes, fatbin: bytes) -> bytes:
    """The library blob with every CUDA module holding `fatbin` instead of `source`.

    Layout (tvm-ffi, src/ffi/extra/library_module.cc, ProcessLibraryBin): u64 byte count of the rest; the
    import tree as two u64 vectors (indptr, child indices); then per module its kind (a string) and,
    unless the kind is "_lib" (the host code itself), its SaveToBytes output (bytes).
    """
    size, pos = _u64(blob, 0)
    if size != len(blob) - 8:
        raise GptbcError("internal: TVM's packed library blob has an unexpected size")
    indptr_len, _ = _u64(blob, pos)
    for _vector in range(2):
        count, pos = _u64(blob, pos)
        pos += 8 * count
    parts, swapped = [blob[8:pos]], 0
    for _module in range(indptr_len - 1):
        length, pos = _u64(blob, pos)
        kind, pos = blob[pos:pos + length], pos + length
        parts.append(_sized(kind))
        if kind == b"_lib":
            continue
        length, pos = _u64(blob, pos)
        saved, pos = blob[pos:pos + length], pos + length
        if kind == b"cuda":
            saved, swapped = cuda_module_with_fatbin(saved, source, fatbin), swapped + 1
        parts.append(_sized(saved))
    if pos != len(blob) or swapped != 1:
        raise GptbcError(f"internal: TVM's packed library blob holds {swapped} CUDA modules, expected 1")
    return _sized(b"".join(parts))


def blob_object(blob: bytes, symbol: str, workdir: Path) -> Path:
    """An assembler file defining `symbol` as `blob` (the compiler driver that links the library assembles
    it); .incbin keeps a many-megabyte fatbin out of C source."""
    data = workdir / "gptbc_imports.bin"
    data.write_bytes(blob)
    asm = workdir / "gptbc_imports.S"
    asm.write_text(f"""\t.section .rodata
\t.globl {symbol}
\t.type {symbol}, %object
\t.balign 8
{symbol}:
\t.incbin "{data}"
\t.size {symbol}, . - {symbol}
\t.section .note.GNU-stack,"",%progbits
""")
    return asm


def fatbin_packer(executable, target, archs: list[str]) -> Callable:
    """nvcc-compile the built library's kernels; return export_library's `fpack_imports`, which links them in."""
    import tvm

    module = find_cuda_module(executable.mod)
    if module is None:
        raise GptbcError("internal: the CUDA build holds no CUDA module")
    source = module.inspect_source("cuda")
    fatbin = nvcc_fatbin(source, target, archs)

    def pack(mod, _is_system_lib: bool, prefix: str, workdir: str) -> str:
        blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes()
        symbol = prefix + tvm.get_global_func("runtime.ModuleImportsBlobName")()
        return str(blob_object(embed_fatbin(blob, source.encode(), fatbin), symbol, Path(workdir)))

    return pack
