"""Every `--target` spelling in one table: the TVM target it means, what it produces, what it needs.

Adding a target is adding a `TargetSpec` here; the compile driver and `gptbc targets` read this
table and nothing else decides per-target behaviour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from .errors import GptbcError


@dataclass(frozen=True)
class TargetSpec:
    name: str
    aliases: tuple[str, ...]
    description: str
    make: Callable[[], dict]  # → TVM target JSON (host included where it differs)
    output_suffix: str  # ".so", ".tar", ...
    toolchain: str  # what building needs, in words
    device: str  # runtime device this library runs on ("cpu", "cuda", ...)


def host_cpu_target(num_cores: int | None = None, mcpu: str | None = None) -> dict:
    """This machine's CPU: its LLVM cpu name (enables AVX2/AVX-512/NEON as present) and core count."""
    from tvm.target import codegen

    return {
        "kind": "llvm",
        "mcpu": mcpu or str(codegen.llvm_get_system_cpu()),
        "num-cores": int(num_cores or os.cpu_count() or 1),
    }


TARGETS: list[TargetSpec] = [
    TargetSpec(
        name="cpu",
        aliases=("llvm",),
        description="this machine's CPU (LLVM, host CPU features), native shared library",
        make=host_cpu_target,
        output_suffix=".so",
        toolchain="LLVM inside TVM + a C compiler to link (cc)",
        device="cpu",
    ),
]


def get_target(name: str) -> TargetSpec:
    for spec in TARGETS:
        if name == spec.name or name in spec.aliases:
            return spec
    known = ", ".join(n for s in TARGETS for n in (s.name, *s.aliases))
    raise GptbcError(f"--target {name}: unknown target (choose from {known})")


def tvm_target(spec: TargetSpec):
    import tvm

    return tvm.target.Target(spec.make())
