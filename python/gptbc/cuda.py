"""CUDA kernels compiled ahead of time: the nvcc build for a list of archs, what a fatbin holds, and
whether the local GPU can run it.

TVM 0.27's CUDA codegen stores CUDA C in the library and compiles it when the library is loaded
(NVRTC through cuda-python by default). `gptbc compile` compiles that source with nvcc instead and
writes `LIB.fatbin` + `LIB.fatbin.json` beside the library: SASS for every requested arch and PTX for
the highest, so a library built on a machine without a GPU (sm_80 by default) still runs on newer
GPUs (an H100/H200 is sm_90) through the driver's PTX JIT. At load time the runtime serves that fatbin
to TVM's compile hook, after checking that the local GPU can run something in it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .errors import GptbcError

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2


def nvcc_gencode(archs: list[str]) -> list[str]:
    """nvcc flags: SASS for each arch, PTX for the highest (JIT-compiled by the driver on newer GPUs)."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    top = archs[-1][3:]
    return flags + ["-gencode", f"arch=compute_{top},code=compute_{top}"]


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


def find_cuda_module(module):
    if module.kind == "cuda":
        return module
    for imported in module.imports:
        found = find_cuda_module(imported)
        if found is not None:
            return found
    return None


def aot_cuda_kernels(executable, target, archs: list[str], output: Path) -> dict[Path, bytes]:
    """nvcc-compile the library's CUDA kernels: `LIB.fatbin` and `LIB.fatbin.json` (what it holds, the
    SHA-256 of the kernel source it was built from)."""
    from tvm.support import nvcc

    module = find_cuda_module(executable.mod)
    if module is None:
        raise GptbcError("internal: the CUDA build holds no CUDA module")
    source = module.inspect_source("cuda")
    try:
        with target:
            fatbin = bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=nvcc_gencode(archs),
                                             compiler="nvcc"))
    except Exception as err:
        raise GptbcError(f"nvcc failed on the generated kernels for {','.join(archs)}: "
                         f"{str(err).strip().splitlines()[-1][:300]}") from None
    entries = fatbin_entries(fatbin)
    info = {"arch": ",".join(archs), "contents": [{"kind": k, "arch": a} for k, a in entries],
            "source_sha256": hashlib.sha256(source.encode()).hexdigest()}
    fat_path = output.with_name(output.name + ".fatbin")
    return {fat_path: fatbin, fat_path.with_name(fat_path.name + ".json"): json.dumps(info).encode()}


def local_sm() -> int | None:
    """The SM number of CUDA device 0 (90 for an H100/H200), None without one."""
    import tvm

    dev = tvm.cuda(0)
    return int(dev.compute_version.replace(".", "")) if dev.exist else None


def check_runnable(lib: Path, sm: int | None) -> None:
    """Refuse, before anything runs, a library whose fatbin holds nothing the local GPU can run."""
    info_path = lib.with_name(lib.name + ".fatbin.json")
    if sm is None or not info_path.is_file():
        return
    try:
        entries = [(e["kind"], int(e["arch"])) for e in json.loads(info_path.read_text())["contents"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise GptbcError(f"{info_path}: unreadable (rebuild the library with gptbc compile)") from None
    if not can_run(entries, sm):
        raise GptbcError(f"--lib {lib}: its CUDA kernels hold {describe(entries)}, nothing this GPU (sm_{sm}) "
                         f"can run; rebuild with --target cuda:sm_{sm}")


def serve_prebuilt_kernels(lib: Path) -> None:
    """Answer TVM's load-time CUDA compile hook with the fatbin `gptbc compile` made, when it matches.

    Other sources (another library, or a mismatch) go to TVM's own compiler (NVRTC, or nvcc with
    TVM_CUDA_COMPILE_MODE=nvcc).
    """
    import tvm_ffi
    from tvm.support import nvcc

    check_runnable(lib, local_sm())
    fat = lib.with_name(lib.name + ".fatbin")
    info_path = fat.with_name(fat.name + ".json")
    prebuilt = {}
    if fat.is_file() and info_path.is_file():
        prebuilt[json.loads(info_path.read_text())["source_sha256"]] = fat.read_bytes()
    previous = nvcc.tvm_callback_cuda_compile

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def compile_hook(code):
        return prebuilt.get(hashlib.sha256(code.encode()).hexdigest()) or previous(code)
