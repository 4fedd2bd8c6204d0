"""Building the native executables (CMakeLists.txt) with the README's commands: once per machine, options and
source version for the whole suite (`shared_build`, through the artifact cache), or in a test's own build directory
when the test is about the build itself (`build`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cmake(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["cmake", *args], cwd=cwd, env=env, capture_output=True, text=True)


def build(build_dir: Path, *options: str, target: str | None = None) -> Path:
    """`cmake -S . -B build && cmake --build build -j2` (only `target` when given: each test builds no more than
    it runs), with the Python running the tests first on PATH (the wheel CMake finds is that Python's)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    steps = [["-S", ".", "-B", str(build_dir), *options],
             ["--build", str(build_dir), "-j2", *(["--target", target] if target else [])]]
    for args in steps:
        done = cmake(*args, cwd=REPO, env=env)
        assert done.returncode == 0, f"cmake {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return build_dir


def shared_build(*options: str) -> Path:
    """Every native target built with `options`, taken from the artifact cache when the same sources, options,
    Python, TVM and compiler built it before (a test that runs gptbc-run, gptbc-check-manifest or the CCL library
    uses this; it never changes the folder)."""
    import importlib.metadata
    import shutil

    from gptbc.artifact import cache

    compiler = shutil.which("c++") or ""
    key = {"options": list(options), "sources": cache.sources_hash(REPO / "CMakeLists.txt", REPO / "cmake",
                                                                    REPO / "native", pattern="*"),
           "python": sys.executable, "tvm": importlib.metadata.version("apache-tvm"),
           "tvm_ffi": importlib.metadata.version("apache-tvm-ffi"),
           "compiler": [compiler, os.stat(compiler).st_mtime_ns if compiler else None]}
    entry = cache.get_or_build("native", key, lambda folder: build(folder / "build", *options),
                               describe=f"the tests' native build {' '.join(options) or '(default options)'}",
                               log=lambda _m: None)
    return entry.path / "build"
