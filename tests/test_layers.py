"""The import layering declared in pyproject.toml ([tool.importlinter]) holds, the check catches a break, no gptbc
module imports another in a cycle, and running a library imports nothing of the compiler."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(python_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(python_path)}  # before site-packages: this copy of gptbc is analysed
    return subprocess.run(["lint-imports", "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          env=env, capture_output=True, text=True)


def broken_copy(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    """lint-imports on a copy of the package with `line` appended to `module` (a path under gptbc/)."""
    shutil.copytree(ROOT / "python" / "gptbc", tmp_path / "gptbc")
    with open(tmp_path / "gptbc" / module, "a") as f:
        f.write(f"\n{line}  # noqa: E402,F401 - the violation under test\n")
    return lint_imports(tmp_path)


def test_layers_point_one_way():
    run = lint_imports(ROOT / "python")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "6 kept, 0 broken" in run.stdout


def test_a_lower_layer_importing_a_higher_one_fails_the_check(tmp_path):
    run = broken_copy(tmp_path, "runtime/scheduler.py", "from gptbc.runtime import engine")
    assert run.returncode != 0
    assert "BROKEN" in run.stdout and "gptbc.runtime.scheduler -> gptbc.runtime.engine" in run.stdout, run.stdout[-3000:]


def test_the_runtime_importing_the_compiler_fails_the_check(tmp_path):
    run = broken_copy(tmp_path, "runtime/runner.py", "from gptbc.compile import compiler")
    assert run.returncode != 0
    assert "BROKEN" in run.stdout and "gptbc.runtime.runner -> gptbc.compile.compiler" in run.stdout, run.stdout[-3000:]


CYCLES = """
import json, sys
import grimp
graph = grimp.build_graph("gptbc", exclude_type_checking_imports=True, cache_dir=None)
edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
index, low, stack, on_stack, groups = {}, {}, [], set(), []
def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on_stack:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        group = []
        while True:
            w = stack.pop()
            on_stack.discard(w)
            group.append(w)
            if w == v:
                break
        if len(group) > 1:
            groups.append(sorted(group))
for m in sorted(edges):
    if m not in index:
        visit(m)
print(json.dumps(groups))
"""


def import_cycles(python_path: Path) -> list[list[str]]:
    """Groups of gptbc modules that import each other, directly or around a loop (in a fresh interpreter, so
    the copy of gptbc under `python_path` is the one analysed)."""
    env = {**os.environ, "PYTHONPATH": str(python_path)}
    run = subprocess.run([sys.executable, "-c", CYCLES], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_no_import_cycle_anywhere():
    assert import_cycles(ROOT / "python") == []


def test_the_cycle_check_can_fail(tmp_path):
    shutil.copytree(ROOT / "python" / "gptbc", tmp_path / "gptbc")
    with open(tmp_path / "gptbc" / "artifact" / "files.py", "a") as f:
        f.write("\nfrom gptbc.artifact import config  # noqa: E402,F401 - the cycle under test\n")
    assert ["gptbc.artifact.checkpoint_layouts", "gptbc.artifact.config", "gptbc.artifact.files",
            "gptbc.artifact.manifest"] in import_cycles(tmp_path)  # (manifest reads files.contained)


RUN_WITHOUT_COMPILER = """
import json, sys
from gptbc.runtime.engine import Engine
engine = Engine(sys.argv[1], sys.argv[2])
out = engine.complete("def f(", max_new_tokens=4)
compiler = sorted(m for m in sys.modules if m.startswith("gptbc.compile"))
print(json.dumps({"tokens": len(out.token_ids), "compiler_modules": compiler}))
"""


def test_running_a_library_imports_no_compile_module(tiny_model):
    """The runtime's promise to a slim install: load and run with none of gptbc's compile side. (TVM 0.27's own
    `import tvm` imports its relax frontend and dlight whatever we do; only gptbc-run needs no compiler at all.)"""
    m = tiny_model("mqa64")
    run = subprocess.run([sys.executable, "-c", RUN_WITHOUT_COMPILER, str(m.out_dir), str(m.lib)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 4
    assert result["compiler_modules"] == []
