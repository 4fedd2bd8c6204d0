"""gptbc's native WebGPU runtime (native/webgpu/) on wgpu-native: how `--target vulkan` runs without a TVM
built with Vulkan codegen.

The apache-tvm wheel has no SPIR-V codegen and no Vulkan runtime, but its WebGPU codegen builds WGSL kernels
into a native `.so` (target `{"kind": "webgpu", "host": <this CPU>}`). `libgptbc_webgpu` gives TVM a device
for those kernels (device type kDLWebGPU) on wgpu-native, which runs WGSL on Vulkan (Metal, DX12 elsewhere).

The library is built from the C++ sources shipped in the package (gptbc.webgpu_src) with CMake on first use,
into the artifact cache (artifact/cache.py), keyed by a hash of the sources, the wgpu-native library and the TVM
runtime, so `pip install -e ".[vulkan]"` is the whole install. `GPTBC_WEBGPU_LIB` names a prebuilt one instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from gptbc.artifact import cache
from gptbc.errors import GptbcError

DEVICE_TYPE = 15  # kDLWebGPU
LIB_NAME = "libgptbc_webgpu.so"
NO_ADAPTER = ("no Vulkan adapter found: install a Vulkan driver (Debian/Ubuntu: apt-get install "
              "mesa-vulkan-drivers, which includes lavapipe, a CPU Vulkan device; or your GPU vendor's driver)")
INSTALL_WGPU = "pip install -e \".[vulkan]\" (or pip install wgpu)"


def wgpu_native_dir() -> Path:
    """The PyPI `wgpu` package's resources/: libwgpu_native and webgpu.h / wgpu.h."""
    spec = importlib.util.find_spec("wgpu")
    if spec is None or not spec.submodule_search_locations:
        raise GptbcError(f"the Vulkan runtime needs wgpu-native, from the `wgpu` Python package: {INSTALL_WGPU}")
    res = Path(spec.submodule_search_locations[0]) / "resources"
    if not (res / "webgpu.h").is_file() or not list(res.glob("libwgpu_native*.so")):
        raise GptbcError(f"{res}: the `wgpu` package has no libwgpu_native / webgpu.h for this platform")
    return res


def source_dir() -> Path:
    spec = importlib.util.find_spec("gptbc.webgpu_src")
    if spec is None or not spec.submodule_search_locations:
        raise GptbcError("gptbc.webgpu_src (the runtime's C++ sources) is missing: reinstall gptbc")
    return Path(spec.submodule_search_locations[0])


def _tvm_runtime() -> tuple[list[str], list[str]]:
    """Include directories and libraries of the TVM runtime gptbc runs with (the wheel's)."""
    paths = {}
    for name in ("tvm", "tvm_ffi"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise GptbcError(f"cannot find the {name} package (apache-tvm) to build the Vulkan runtime against")
        paths[name] = Path(spec.submodule_search_locations[0])
    includes = [str(paths["tvm"] / "include"), str(paths["tvm_ffi"] / "include")]
    libs = [str(paths["tvm"] / "lib" / "libtvm_runtime.so"), str(paths["tvm_ffi"] / "lib" / "libtvm_ffi.so")]
    for p in includes + libs:
        if not Path(p).exists():
            raise GptbcError(f"{p}: missing from the TVM install; the Vulkan runtime is built against it")
    return includes, libs


def _build_key(src: Path, wgpu_dir: Path, tvm_libs: list[str]) -> str:
    h = hashlib.sha256()
    for f in sorted(src.iterdir()):
        if f.suffix in (".cc", ".h", ".txt"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    for f in [*sorted(wgpu_dir.glob("libwgpu_native*.so")), wgpu_dir / "webgpu.h", wgpu_dir / "wgpu.h", *map(Path, tvm_libs)]:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def runtime_library() -> Path:
    """Path of libgptbc_webgpu.so: GPTBC_WEBGPU_LIB, else the cached build, else built now (once)."""
    if os.environ.get("GPTBC_WEBGPU_LIB"):
        lib = Path(os.environ["GPTBC_WEBGPU_LIB"])
        if not lib.is_file():
            raise GptbcError(f"GPTBC_WEBGPU_LIB={lib}: file not found")
        return lib
    wgpu_dir = wgpu_native_dir()
    src = source_dir()
    includes, libs = _tvm_runtime()
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise GptbcError(f"building the Vulkan runtime needs {tool} on PATH (and a C++17 compiler): install "
                             f"cmake and g++ (Debian/Ubuntu: apt-get install cmake g++)")

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="build.", dir=folder) as scratch:
            cmds = [["cmake", "-S", str(src), "-B", scratch, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DWGPU_NATIVE_DIR={wgpu_dir}", f"-DGPTBC_TVM_INCLUDE_DIRS={';'.join(includes)}",
                     f"-DGPTBC_TVM_LIBRARIES={';'.join(libs)}"],
                    ["cmake", "--build", scratch, "-j", str(min(4, os.cpu_count() or 1))]]
            for cmd in cmds:
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln.lower()]
                    why = (lines or (proc.stdout + proc.stderr).strip().splitlines() or ["?"])[0]
                    raise GptbcError(f"building the Vulkan runtime ({src}) failed: {why.strip()[:300]}")
            shutil.copy2(Path(scratch) / LIB_NAME, folder / LIB_NAME)

    entry = cache.get_or_build("webgpu", {"build": _build_key(src, wgpu_dir, libs)}, build,
                               describe="the Vulkan runtime (libgptbc_webgpu)",
                               log=lambda m: print(m, file=sys.stderr, flush=True), announce_reuse=False)
    return entry.path / LIB_NAME


@lru_cache(maxsize=None)
def load_runtime() -> Path:
    """Build if needed and load libgptbc_webgpu into this process (registers the webgpu device with TVM)."""
    import tvm  # noqa: F401 - libtvm_runtime must be loaded (globally) before the runtime links to it

    lib = runtime_library()
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())  # silences a harmless wgpu/Mesa warning
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise GptbcError(f"cannot load the Vulkan runtime {lib}: {str(err).splitlines()[0][:200]}") from None
    return lib


def adapters() -> list[dict]:
    """The adapters wgpu-native finds, in device-id order: discrete, integrated, CPU, others."""
    import tvm

    load_runtime()
    return json.loads(str(tvm.get_global_func("gptbc.webgpu.adapters")()))


def device(index: int):
    """tvm.device for WebGPU adapter `index` ('vulkan:N'); one-line errors when there is none."""
    import tvm

    found = adapters()
    if not found:
        raise GptbcError(NO_ADAPTER)
    if index >= len(found):
        names = ", ".join(f"{a['index']}: {a['name']} ({a['type']})" for a in found)
        raise GptbcError(f"device vulkan:{index}: no such adapter (found {names})")
    return tvm.device("webgpu", index)


def adapter_of(dev) -> dict:
    return adapters()[dev.index]


def stats(dev) -> dict:
    """Dispatch / submit / pipeline / readback counters of a device (for tests and benchmarks)."""
    import tvm

    return json.loads(str(tvm.get_global_func("gptbc.webgpu.stats")(dev.index)))


def check_model(meta: dict, dev, lib) -> None:
    """Before any weight is copied or kernel run: every tensor fits the adapter's storage-binding limit,
    and a float16 model has an adapter with shader-f16."""
    check_merge_kernel(lib)
    a = adapter_of(dev)
    limit = int(a["max_storage_buffer_binding_size"])
    dtypes = {p["dtype"] for p in meta["params"]}
    if "float16" in dtypes and not a["shader_f16"]:
        raise GptbcError(f"--lib {lib} computes in float16 ({meta['quantization']['name']}), but the Vulkan adapter "
                         f"{a['name']} has no shader-f16 support; use a float32 scheme (q0f32, q4f32_1, q8f32_1)")
    narrow = sorted(d for d in dtypes if _itemsize(d) == 1 or d == "bfloat16")
    if narrow:
        raise GptbcError(f"--lib {lib} ({meta['quantization']['name']}) has {', '.join(narrow)} weights, which WGSL "
                         f"cannot address (no 8-bit or bfloat16 types); on Vulkan use q0f32, q0f16, q4f32_1 or q4f16_1")
    for p in meta["params"]:
        nbytes = _itemsize(p["dtype"])
        for d in p["shape"]:
            nbytes *= int(d)
        if nbytes > limit:
            raise GptbcError(f"tensor {p['name']} ({p['dtype']}{p['shape']}) is {nbytes} bytes, over the Vulkan "
                             f"adapter {a['name']}'s max storage-buffer binding of {limit} bytes; quantize it "
                             f"(e.g. --quantization q4f16_1) or use an adapter with a larger limit")


def check_merge_kernel(lib) -> None:
    """Refuse a library whose attention-state merge is TVM's racy kernel (built before docs/targets.md's Problem 3
    was fixed): on adapters that do not run a block's threads in lockstep it computes wrong attention for every
    forward onto KV history (chunked prompts, prefix reuse, verify). Ours has a barrier; TVM's has none."""
    blob = Path(lib).read_bytes()
    start = blob.find(b"fn tir_attention_merge_state_kernel(")
    if start < 0:
        return
    end = blob.find(b"\n}\n", start)
    if b"workgroupBarrier()" not in blob[start:end if end > 0 else len(blob)]:
        raise GptbcError(f"--lib {lib} was built with TVM's attention-state merge kernel, which computes wrong "
                         f"attention on this runtime (docs/targets.md, Problem 3); rebuild it with this gptbc "
                         f"(gptbc compile ... --target vulkan)")


def _itemsize(dtype: str) -> int:
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "uint32": 4, "int8": 1, "uint8": 1}
    if dtype in sizes:
        return sizes[dtype]
    import numpy as np

    return np.dtype(dtype).itemsize
