"""Loading a CUDA library: refuse one whose kernels the local GPU cannot run.

The kernels are an nvcc fatbin linked into the library (compile/cuda.py), so loading it needs no compile
hook, NVRTC or cuda-python; what the fatbin holds is the manifest's `cuda_fatbin` field.
"""

from __future__ import annotations

from pathlib import Path

from gptbc.artifact.fatbin import can_run, describe
from gptbc.errors import GptbcError


def local_sm() -> int | None:
    """The SM number of CUDA device 0 (90 for an H100/H200), None without one."""
    import tvm

    dev = tvm.cuda(0)
    return int(dev.compute_version.replace(".", "")) if dev.exist else None


def fatbin_contents(meta: dict, lib: Path) -> list[tuple[str, int]] | None:
    """[(kind, arch)] from a library manifest's `cuda_fatbin`; None for a library without one."""
    if "cuda_fatbin" not in meta:
        return None
    try:
        entries = [(e["kind"], e["arch"]) for e in meta["cuda_fatbin"]]
    except (KeyError, TypeError):
        entries = []
    if not entries or any(k not in ("sass", "ptx") or type(a) is not int for k, a in entries):
        raise GptbcError(f"--lib {lib} metadata: cuda_fatbin is not a list of {{kind: sass|ptx, arch: int}} "
                         f"(compile the library again)")
    return entries


def check_runnable(meta: dict, lib: Path, sm: int | None) -> None:
    """Refuse, before any kernel runs, a library whose fatbin holds nothing a GPU of SM `sm` can run."""
    entries = fatbin_contents(meta, lib)
    if sm is None or entries is None:
        return
    if not can_run(entries, sm):
        raise GptbcError(f"--lib {lib}: its CUDA kernels hold {describe(entries)}, nothing this GPU (sm_{sm}) "
                         f"can run; rebuild with --target cuda:sm_{sm}")
