"""CUDA kernels compiled ahead of time: the nvcc build of a library's kernels for a list of archs.

TVM 0.27's CUDA codegen stores CUDA C in the library and compiles it when the library is loaded
(NVRTC through cuda-python by default). `gptbc compile` compiles that source with nvcc instead and
writes `LIB.fatbin` + `LIB.fatbin.json` beside the library: SASS for every requested arch and PTX for
the highest, so a library built on a machine without a GPU (sm_80 by default) still runs on newer
GPUs (an H100/H200 is sm_90) through the driver's PTX JIT. runtime/cuda.py serves that fatbin at load
time; artifact/fatbin.py reads what a fatbin holds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gptbc.artifact.fatbin import fatbin_entries
from gptbc.errors import GptbcError



def nvcc_gencode(archs: list[str]) -> list[str]:
    """nvcc flags: SASS for each arch, PTX for the highest (JIT-compiled by the driver on newer GPUs)."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    top = archs[-1][3:]
    return flags + ["-gencode", f"arch=compute_{top},code=compute_{top}"]


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


