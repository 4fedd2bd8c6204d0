"""Kernels a test compiles on their own (a PrimFunc or a TIR module, not a model library) go through the artifact
cache too: the same module for the same target is built once across runs. The key is the module's TVMScript text
with its constants (`show_meta`), the target, the pass context's options and TVM's version."""

from __future__ import annotations

import hashlib

import tvm

from gptbc.artifact import cache

FILE = "kernels.so"


def built(mod, target) -> tvm.runtime.Module:
    """`tvm.tirx.build(mod, target)` (a PrimFunc builds as "main"), loaded from the cache when built before."""
    if isinstance(mod, tvm.tirx.PrimFunc):
        mod = tvm.IRModule({"main": mod})
    target = tvm.target.Target(target)
    ctx = tvm.transform.PassContext.current()
    parts = {"tir_module": hashlib.sha256(mod.script(show_meta=True).encode()).hexdigest(),
             "tvm_target": str(target.export()), "opt_level": ctx.opt_level,
             "config": str(sorted((str(k), str(v)) for k, v in ctx.config.items())), "tvm": tvm.__version__}
    names = ", ".join(sorted(gv.name_hint for gv in mod.get_global_vars()))
    entry = cache.get_or_build("libraries", parts,
                               lambda folder: tvm.tirx.build(mod, target).export_library(str(folder / FILE)),
                               describe=f"a test's kernels ({names})", log=lambda _m: None)
    return tvm.runtime.load_module(str(entry.path / FILE))
