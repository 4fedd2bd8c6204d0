"""Loading a CUDA library: refuse one whose kernels the local GPU cannot run, and serve TVM's load-time
compile hook the fatbin `gptbc compile` wrote beside it (compile/cuda.py), so no NVRTC is needed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gptbc.artifact.fatbin import can_run, describe
from gptbc.errors import GptbcError


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
