"""Where the CPU collectives library (libgptbc_ccl_cpu.so, native/ccl/cpu_ccl.cc) comes from.

GPTBC_CCL_LIBRARY names a built one. Otherwise, from a gptbc checkout, it is built with the project's CMake
(`cmake --build BUILD --target gptbc_ccl_cpu`) once per source version into the artifact cache, the first time a
tensor-parallel run asks for it: single-device runs never build or load it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gptbc.artifact import cache
from gptbc.errors import GptbcError

LIBRARY = "libgptbc_ccl_cpu.so"
REPO = Path(__file__).resolve().parents[3]
SOURCES = ("CMakeLists.txt", "native/ccl/cpu_ccl.cc", "native/ccl/wheel_headers/tvm/support/io.h",
           "cmake/FindTVMRuntime.cmake")


def ccl_library() -> Path:
    """The path of a loadable libgptbc_ccl_cpu.so (built here if needed)."""
    named = os.environ.get("GPTBC_CCL_LIBRARY")
    if named:
        if not Path(named).is_file():
            raise GptbcError(f"GPTBC_CCL_LIBRARY={named}: file not found")
        return Path(named)
    if not all((REPO / f).is_file() for f in SOURCES):
        raise GptbcError(f"--tensor-parallel needs {LIBRARY}: build it in a gptbc checkout with `cmake -S . -B build "
                         f"&& cmake --build build --target gptbc_ccl_cpu` and set GPTBC_CCL_LIBRARY to build/{LIBRARY}")
    digest = hashlib.sha256(sys.executable.encode())
    for f in SOURCES:
        digest.update((REPO / f).read_bytes())
    entry = cache.get_or_build("ccl", {"sources": digest.hexdigest()}, _cmake_build, describe=LIBRARY,
                               log=lambda m: print(m, file=sys.stderr, flush=True), announce_reuse=False)
    return entry.path / LIBRARY


def _cmake_build(folder: Path) -> None:
    """Build the library in a scratch folder and keep only it, in `folder` (the cache entry)."""
    with tempfile.TemporaryDirectory(prefix="build.", dir=folder) as build:
        _cmake_steps(Path(build))
        shutil.copy2(Path(build) / LIBRARY, folder / LIBRARY)


def _cmake_steps(build: Path) -> None:
    steps = [["-S", str(REPO), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"],
             ["--build", str(build), "--target", "gptbc_ccl_cpu", "-j2"]]
    for args in steps:
        try:
            done = subprocess.run(["cmake", *args], capture_output=True, text=True)
        except FileNotFoundError:
            raise GptbcError(f"--tensor-parallel needs {LIBRARY}, built with CMake: install cmake "
                             f"(or set GPTBC_CCL_LIBRARY to a built one)") from None
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["?"]
            raise GptbcError(f"building {LIBRARY} in {build} failed (cmake {args[0]}): {last[0][:300]}")
