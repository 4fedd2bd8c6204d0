"""Building the native executables (CMakeLists.txt) in a test's own build directory, with the README's commands."""

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
