"""Kernels a test compiles on their own (a PrimFunc or a TIR module, not a model library) go through the artifact
cache too: the same module for the same target is built once across runs. The key is the module's TVMScript text
with its constants (`show_meta`), the target, the pass context's options and TVM's version."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import tvm

from gptbc.artifact import cache

FILE = "kernels.so"


def _tool(name: str) -> list:
    """A compiler as the key sees it: its path and modification time (a new toolchain builds anew)."""
    path = shutil.which(name) or name
    return [path, os.stat(path).st_mtime_ns if os.path.exists(path) else None]


def built(mod, target) -> tvm.runtime.Module:
    """`tvm.tirx.build(mod, target)` (a PrimFunc builds as "main"), loaded from the cache when built before."""
    return tvm.runtime.load_module(str(built_file(mod, target)))


def built_file(mod, target, cross_compiler: str | None = None) -> Path:
    """The cached shared library of `tvm.tirx.build(mod, target)`, linked by `cross_compiler` when given (a
    library for another machine, which this one cannot load)."""
    if isinstance(mod, tvm.tirx.PrimFunc):
        mod = tvm.IRModule({"main": mod})
    target = tvm.target.Target(target)
    ctx = tvm.transform.PassContext.current()
    parts = {"tir_module": hashlib.sha256(mod.script(show_meta=True).encode()).hexdigest(),
             "tvm_target": str(target.export()), "opt_level": ctx.opt_level,
             "config": str(sorted((str(k), str(v)) for k, v in ctx.config.items())), "tvm": tvm.__version__,
             "cross_compiler": _tool(cross_compiler) if cross_compiler else None}

    def build(folder: Path) -> None:
        lib = tvm.tirx.build(mod, target)
        if cross_compiler:
            from tvm.support import cc

            lib.export_library(str(folder / FILE), fcompile=cc.cross_compiler(cross_compiler))
        else:
            lib.export_library(str(folder / FILE))

    names = ", ".join(sorted(gv.name_hint for gv in mod.get_global_vars()))
    entry = cache.get_or_build("libraries", parts, build, describe=f"a test's kernels ({names})", log=lambda _m: None)
    return entry.path / FILE
