"""The import layering declared in pyproject.toml ([tool.importlinter]) holds, and the check catches a break."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(python_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(python_path)}  # before site-packages: this copy of gptbc is analysed
    return subprocess.run(["lint-imports", "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          env=env, capture_output=True, text=True)


def test_layers_point_one_way():
    run = lint_imports(ROOT / "python")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


def test_a_lower_layer_importing_a_higher_one_fails_the_check(tmp_path):
    shutil.copytree(ROOT / "python" / "gptbc", tmp_path / "gptbc")
    with open(tmp_path / "gptbc" / "scheduler.py", "a") as f:
        f.write("\nfrom . import engine  # noqa: E402,F401 - the violation under test\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0
    assert "BROKEN" in run.stdout and "gptbc.scheduler -> gptbc.engine" in run.stdout, run.stdout[-3000:]
