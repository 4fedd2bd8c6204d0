"""A CUDA library is one file: nvcc's fatbin is linked into it, and it loads with no compile hook.

How far this goes without a GPU: TVM registers the CUDA module loader (`ffi.Module.load_from_bytes.cuda`)
only when libtvm_runtime_cuda.so loads, and that needs the driver's libcuda.so.1, absent here. The test
builds a stand-in libcuda.so.1 (every driver symbol libtvm_runtime_cuda.so imports, each returning
CUDA_ERROR_NO_DEVICE), so `import tvm` loads the real CUDA runtime module; then, in a process whose
`tvm_callback_cuda_compile` raises, it loads the library copied alone into an empty folder, reaches its
CUDA device module and looks up every kernel the fatbin defines. No kernel is launched: cuModuleLoadData
runs at the first launch, which needs a GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gptbc.artifact.config import resolve_model
from gptbc.artifact.fatbin import FATBIN_MAGIC, fatbin_entries
from gptbc.compile.compiler import compile_model

EM_CUDA, STT_FUNC, STB_GLOBAL, SHT_SYMTAB = 190, 2, 1, 2
STO_CUDA_ENTRY = 0x10  # st_other flag of a __global__ function in a CUDA ELF
CUDA_ERROR_NO_DEVICE = 100

pytestmark = pytest.mark.nvcc  # conftest: skipped without nvcc or cc, failed under GPTBC_REQUIRE_NVCC=1


def embedded_fatbin(blob: bytes) -> bytes:
    """The one CUDA fatbin inside a file: header (magic, version, header size, payload size) and payload."""
    start = blob.find(struct.pack("<I", FATBIN_MAGIC))
    assert start >= 0, "no fatbin in the library"
    assert blob.find(struct.pack("<I", FATBIN_MAGIC), start + 4) < 0, "more than one fatbin in the library"
    header, payload = struct.unpack_from("<HQ", blob, start + 6)
    return blob[start:start + header + payload]


def cuda_elf_kernels(elf: bytes) -> tuple[int, set[str]]:
    """(SM number, names of its kernels: global functions flagged as entries) of one CUDA ELF."""
    assert elf[:4] == b"\x7fELF" and struct.unpack_from("<H", elf, 18)[0] == EM_CUDA
    sm = (struct.unpack_from("<I", elf, 48)[0] >> 8) & 0xFF
    shoff, = struct.unpack_from("<Q", elf, 40)
    shentsize, shnum = struct.unpack_from("<HH", elf, 58)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != SHT_SYMTAB:
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            st_name, st_info, st_other, st_shndx = struct.unpack_from("<IBBH", elf, pos)
            if st_info & 0xF == STT_FUNC and st_info >> 4 == STB_GLOBAL and st_other & STO_CUDA_ENTRY and st_shndx:
                names.add(elf[strtab + st_name:elf.index(b"\0", strtab + st_name)].decode())
    return sm, names


def runtime_cuda_library() -> Path:
    import tvm

    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if not lib.is_file():
        pytest.skip(f"this TVM wheel has no CUDA runtime ({lib} is missing)")
    return lib


def libcuda_stand_in(folder: Path) -> Path:
    """A libcuda.so.1 exporting what libtvm_runtime_cuda.so imports from the driver, all failing with
    CUDA_ERROR_NO_DEVICE: enough for the runtime to load, never to run a kernel."""
    runtime = runtime_cuda_library()
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(runtime)], capture_output=True, text=True,
                               check=True).stdout.split()
    driver = sorted({s for s in undefined if s.startswith("cu") and not s.startswith("cuda") and "@" not in s})
    assert "cuModuleLoadData" in driver, f"{runtime}: does not import cuModuleLoadData; its driver calls changed"
    source = folder / "libcuda.c"
    source.write_text("".join(f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for name in driver))
    folder.joinpath("libcuda.so.1").unlink(missing_ok=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(folder / "libcuda.so.1"),
                    str(source)], check=True)
    return folder


LOAD_WITHOUT_HOOK = r"""
import json, sys
import tvm, tvm_ffi

loader = tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True)
assert loader is not None, "libtvm_runtime_cuda.so did not load (the CUDA module loader is not registered)"

@tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
def refuse(code):
    raise RuntimeError("the library asked for tvm_callback_cuda_compile")

def cuda_modules(m):
    return ([m] if m.kind == "cuda" else []) + [c for i in m.imports for c in cuda_modules(i)]

lib = tvm.runtime.load_module("lib.so")
[cuda] = cuda_modules(lib)
def has(name):
    try:
        return cuda.get_function(name, query_imports=False) is not None
    except AttributeError:  # tvm_ffi's answer for a name the module does not define
        return False

kernels = json.loads(sys.argv[1])
found = [k for k in kernels if has(k)]
unknown = has("no_such_kernel")
# The control: a CUDA module saved as source (TVM's own format) does call the hook.
try:
    loader(bytes.fromhex(sys.argv[2]))
    source_module = "loaded"
except Exception as err:
    source_module = str(err).strip().splitlines()[-1]
print(json.dumps({"found": found, "unknown": unknown, "source_module": source_module}))
"""


def source_saved_module(blob: bytes) -> bytes:
    """The library's CUDA module bytes `[fmt "fatbin"][fmap][fatbin]` turned back into TVM's own
    `[fmt "cuda"][fmap][source]`, with a one-kernel source: what a library without gptbc's packing holds."""
    fmt = struct.pack("<Q", 6) + b"fatbin"
    start = blob.index(fmt)
    size, = struct.unpack_from("<Q", blob, start - 8)
    saved = blob[start:start + size]
    fatbin = embedded_fatbin(blob)
    assert saved.endswith(struct.pack("<Q", len(fatbin)) + fatbin)
    fmap = saved[len(fmt):len(saved) - 8 - len(fatbin)]
    source = b'extern "C" __global__ void k() {}'
    return struct.pack("<Q", 4) + b"cuda" + fmap + struct.pack("<Q", len(source)) + source


KERNEL_SOURCE: dict[str, str] = {}  # the CUDA C nvcc compiled for the library below (it is not in the library)


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory) -> Path:
    from hf_models import make_checkpoint

    from gptbc.compile import cuda

    root = tmp_path_factory.mktemp("cuda")
    model = resolve_model(str(make_checkpoint(root / "hf", n_embd=64, n_head=4, n_layer=1)))
    out = root / "build" / "lib.so"
    nvcc = cuda.nvcc_fatbin

    def keep_source(source, target, archs):
        KERNEL_SOURCE["lib"] = source
        return nvcc(source, target, archs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda, "nvcc_fatbin", keep_source)
        # cache=False: the kernels must really go through nvcc here, to be seen (a cached library skips it)
        compile_model(model, "cuda:sm_90,sm_80", "q0f32", out, log=lambda _m: None, cache=False)
    return out


def test_cuda_library_is_one_file_whose_manifest_says_what_its_fatbin_holds(cuda_library):
    assert sorted(os.listdir(cuda_library.parent)) == ["lib.so"]  # no sidecar files
    blob = cuda_library.read_bytes()
    assert b"__global__" not in blob  # no CUDA source left to compile at load time
    fatbin = embedded_fatbin(blob)
    elves = [cuda_elf_kernels(fatbin[p:]) for p in range(len(fatbin)) if fatbin.startswith(b"\x7fELF", p)]
    assert sorted(sm for sm, _ in elves) == [80, 90]
    assert elves[0][1] == elves[1][1] and len(elves[0][1]) > 10
    entries = fatbin_entries(fatbin)
    assert sorted(entries) == [("ptx", 90), ("sass", 80), ("sass", 90)]
    start = blob.index(b'{"gptbc_version"')
    meta, _ = json.JSONDecoder().raw_decode(blob[start:].decode("utf-8", "replace"))
    assert sorted((e["kind"], e["arch"]) for e in meta["cuda_fatbin"]) == sorted(entries)


def test_cuda_library_copied_alone_loads_without_the_compile_hook(cuda_library, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(cuda_library, alone / "lib.so")
    fatbin = embedded_fatbin(cuda_library.read_bytes())
    kernels = sorted(cuda_elf_kernels(fatbin[fatbin.index(b"\x7fELF"):])[1])
    control = source_saved_module(cuda_library.read_bytes())
    env = {**os.environ, "LD_LIBRARY_PATH": str(libcuda_stand_in(tmp_path))}
    run = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_HOOK, json.dumps(kernels), control.hex()], cwd=alone,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["found"] == kernels and not result["unknown"]
    assert "the library asked for tvm_callback_cuda_compile" in result["source_module"]


def test_cuda_library_where_tvm_has_no_cuda_runtime_is_a_one_line_error(cuda_library):
    import tvm

    from gptbc.errors import GptbcError
    from gptbc.runtime.runner import load_library

    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        pytest.skip("this process has TVM's CUDA runtime loaded (a libcuda.so.1 is installed)")
    with pytest.raises(GptbcError) as err:
        load_library(cuda_library, tvm.cpu())
    assert str(err.value) == (f"--lib {cuda_library}: a CUDA library, and this TVM has no CUDA runtime (its "
                              f"libtvm_runtime_cuda.so needs the NVIDIA driver's libcuda.so.1)")


def test_cuda_merge_kernel_does_not_rely_on_lockstep_warps(cuda_library):
    """TVM's attention-state merge has every thread of a head read S and then write it with no barrier:
    right only if those threads run in lockstep, which CUDA does not promise since Volta (and a head spans
    two warps at head_dim 256). The CUDA build gets gptbc's kernel: a barrier after the reads, one writer."""
    source = KERNEL_SOURCE["lib"]
    start = re.search(r"tir_attention_merge_state_kernel\([^)]*\) \{", source).start()  # the definition
    kernel = source[start:source.index("\n}\n", start)]
    reads, barrier = kernel.index("= S_ptr["), kernel.index("__syncthreads();")
    write = kernel.index("    S_ptr[")
    assert reads < barrier < write and kernel.count("    S_ptr[") == 1
    assert kernel[:write].rstrip().endswith("if (((int)threadIdx.x) == 0) {")
