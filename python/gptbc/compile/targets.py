"""Every per-target decision in one table: for each `--target` spelling the TVM target it means, the
compile pipeline it gets, what it produces and needs, and the runtime device kind (and CPU architecture)
it runs on. The runtime side of a device spelling (`--device`) is runtime/devices.py.

Adding a target is adding a `TargetSpec` here; the compile driver and `gptbc targets` read this table
and nothing else decides per-target behaviour at compile time. Importing this module imports no TVM
(the hooks import what they need when called).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

from gptbc.errors import GptbcError

WASM_HOST = {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}
MAC_HOST = {"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": "apple-m1"}
AARCH64_TRIPLE = "aarch64-linux-gnu"


@dataclass(frozen=True)
class Build:
    """What `gptbc compile` makes for a target on this machine."""

    target: dict  # TVM target JSON (host included where it differs from this machine)
    suffix: str  # ".so", ".dylib" or ".tar"
    system_lib: bool = False  # objects for static linking (.tar) rather than a shared library
    cc: str | None = None  # cross compiler used to link a shared library
    shared_needs: str | None = None  # a .tar only because this is missing (what to install for a .so), in words


def _cpu_rules(batch_invariant: bool = False) -> list:
    from gptbc.compile.schedules import cpu_rules

    return cpu_rules(batch_invariant)


def _gpu_rules(batch_invariant: bool = False) -> list:
    from gptbc.compile.schedules import gpu_rules

    return gpu_rules(batch_invariant)


def _cpu_kernels(mod, cfg, quant, target, _batch_invariant: bool = False):
    from gptbc.compile.kernels import use_fast_cpu_attention
    from gptbc.compile.kernels_int8 import use_int8_kernels

    cores = int(target.attrs.get("num-cores", 1) or 1)
    mod = use_fast_cpu_attention(mod, cfg.n_kv_head, cfg.n_head, cfg.head_dim, quant.model_dtype, cores)
    return use_int8_kernels(mod, target, quant.int8_layout) if quant.int8_activations else mod


@dataclass(frozen=True)
class Pipeline:
    """How the compile driver lowers the model for a family of targets (the passes around these: compiler.py)."""

    name: str
    # (batch_invariant) → dlight rules applied to every fused kernel (schedules.py)
    schedule_rules: Callable[[bool], list]
    # (Relax module, config, quantization, target, batch_invariant) → the module with hand-written kernels swapped
    # in, before any pass
    replace_kernels: Callable[[Any, Any, Any, Any, bool], Any] = field(default=lambda mod, *_args: mod)


# CPU: our matmul / parallel schedules, our prefill attention in place of TVM's serial CPU kernels, and
# with int8 activations the integer dot-product matmuls (kernels_int8.py).
CPU_PIPELINE = Pipeline("cpu", _cpu_rules, _cpu_kernels)
def _gpu_kernels(mod, cfg, quant, target, batch_invariant: bool = False):
    from gptbc.compile.kernels import use_race_free_merge
    from gptbc.compile.kernels_gpu import use_invariant_gpu_attention

    # TVM's kernel is sized by the threads per block the target allows (256 on webgpu and vulkan, 1024 on CUDA)
    mod = use_race_free_merge(mod, cfg.n_head, cfg.head_dim, quant.model_dtype, int(target.attrs["max_num_threads"]))
    if batch_invariant:
        mod = use_invariant_gpu_attention(mod, cfg.n_kv_head, cfg.n_head, cfg.head_dim, quant.model_dtype)
    return mod


def _invariant_gpu_kernels(mod, cfg, quant, target, batch_invariant: bool = False):
    return _gpu_kernels(mod, cfg, quant, target, True) if batch_invariant else mod


# GPU (Metal): dlight's rules (kept off the tensorize paths that crash TVM 0.27, see schedules.gpu_rules) and
# TVM's kernels; a batch-invariant library gets the kernels below (our attention, and the race-free merge whose
# formula it shares).
GPU_PIPELINE = Pipeline("gpu", _gpu_rules, _invariant_gpu_kernels)


# Vulkan and WebGPU: the GPU pipeline, and TVM's attention-state merge kernel replaced by one without its
# data race (kernels.merge_state_inplace): their devices need not run a block's threads in lockstep
# (lavapipe does not), and TVM's kernel is wrong there (docs/targets.md, Problem 3). Batch-invariant
# libraries also get our attention kernels (kernels_gpu.py).
WGPU_PIPELINE = Pipeline("gpu", _gpu_rules, _gpu_kernels)
# CUDA: the same. TVM's merge kernel relies on a head's threads running in lockstep, which CUDA does not
# promise since Volta (independent thread scheduling), and a head spans two warps at head_dim 256.
CUDA_PIPELINE = Pipeline("gpu", _gpu_rules, _gpu_kernels)


def _fatbin_contents(variant: str | None) -> list[tuple[str, int]]:
    from gptbc.compile.cuda import fatbin_plan

    return fatbin_plan(cuda_archs(variant))


def _fatbin_packer(executable, target, variant: str | None) -> tuple[Callable, str]:
    from gptbc.compile.cuda import fatbin_packer

    archs = cuda_archs(variant)
    return fatbin_packer(executable, target, archs), f"compile CUDA kernels with nvcc for {','.join(archs)} (+ PTX)"


def _keep_cuda_source():
    from gptbc.compile.cuda import keep_cuda_source

    return keep_cuda_source()


@dataclass(frozen=True)
class Embedded:
    """Kernels the compiler builds itself and links into the library (CUDA: nvcc's fatbin, see cuda.py)."""

    contents: Callable[[str | None], list[tuple[str, int]]]  # variant → what they hold, for the manifest
    building: Callable[[], Any]  # a context manager TVM's build runs in (CUDA: keep the kernels as source)
    # (built executable, TVM target, variant) → (export_library's fpack_imports, what it did)
    packer: Callable[[Any, Any, str | None], tuple[Callable, str]]


CUDA_FATBIN = Embedded(_fatbin_contents, _keep_cuda_source, _fatbin_packer)


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    device: str  # runtime device kind the library runs on: "cpu", "cuda", "metal", "vulkan", "webgpu"
    pipeline: Pipeline  # CPU_PIPELINE or GPU_PIPELINE
    toolchain: str  # what building needs, in words
    plan: Callable[[str | None], Build]  # variant ("sm_86" in "cuda:sm_86") → what to build
    aliases: tuple[str, ...] = ()
    variant_pattern: str | None = None  # regex a ":variant" must match
    unavailable: Callable[[], str | None] = field(default=lambda: None)  # why this machine cannot build it
    arch: str | None = None  # the CPU architecture the library's host code is for; None: this machine's
    embedded: Embedded | None = None  # kernels built by gptbc and linked into the library


def host_cpu_target(mcpu: str | None = None, num_cores: int | None = None) -> dict:
    """This machine's CPU: its LLVM cpu name (AVX2/AVX-512/NEON as present) and core count."""
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": mcpu or str(codegen.llvm_get_system_cpu()),
            "num-cores": int(num_cores or os.cpu_count() or 1)}


def _cpu(variant: str | None) -> Build:
    return Build(host_cpu_target(mcpu=variant), ".so")


def _local_cuda_arch() -> str | None:
    try:
        import tvm

        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + dev.compute_version.replace(".", "")
    except Exception:  # no CUDA runtime at all
        return None
    return None


def cuda_archs(variant: str | None) -> list[str]:
    """`sm_80,sm_90` → ["sm_80", "sm_90"] (sorted); no variant: the local GPU's arch, else sm_80."""
    archs = variant.split(",") if variant else [_local_cuda_arch() or "sm_80"]
    return sorted(set(archs), key=lambda a: (int(a[3:].rstrip("a")), a))


def _cuda(variant: str | None) -> Build:
    # Kernels are generated for the lowest arch (so they use nothing a listed GPU lacks); nvcc then
    # writes SASS for every listed arch and PTX for the highest (CUDA_FATBIN: cuda.fatbin_packer).
    arch = cuda_archs(variant)[0]
    # 48 KiB is the static shared-memory limit on every CUDA GPU; stating it keeps TVM from guessing.
    return Build({"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152, "host": host_cpu_target()},
                 ".so")


def _metal(_variant: str | None) -> Build:
    if platform.system() == "Darwin":
        return Build({"kind": "metal", "host": host_cpu_target()}, ".dylib")
    # Elsewhere: objects for an arm64 macOS app to link (its runtime registers the system library).
    return Build({"kind": "metal", "host": MAC_HOST}, ".tar", system_lib=True)


def vulkan_codegen() -> bool:
    """Does this TVM have SPIR-V (Vulkan) codegen? The apache-tvm wheel does not."""
    return _has_global("target.build.vulkan")


def _vulkan(_variant: str | None) -> Build:
    if vulkan_codegen():
        return Build({"kind": "vulkan", "host": host_cpu_target()}, ".so")
    # WGSL kernels in a native .so, run by gptbc's WebGPU runtime on wgpu-native over Vulkan (webgpu.py).
    return Build({"kind": "webgpu", "host": host_cpu_target()}, ".so")


def vulkan_path() -> str:
    """Which way --target vulkan builds and runs on this machine, in words (for `gptbc targets`)."""
    if vulkan_codegen():
        return "SPIR-V: this TVM has Vulkan codegen (USE_VULKAN=ON); TVM's Vulkan runtime runs it"
    return ("WGSL: this TVM has no Vulkan codegen, so kernels are WGSL in a native .so, run by gptbc's WebGPU "
            "runtime on wgpu-native over Vulkan")


def _webgpu(_variant: str | None) -> Build:
    return Build({"kind": "webgpu", "host": WASM_HOST}, ".tar", system_lib=True)


# The x86 CPUs `gptbc targets` lists for `--target cpu:MCPU` (LLVM names; any other works too), each with what it is.
X86_CPUS = {
    "haswell": "Intel 4th gen Core and later without AVX-512 (AVX2)",
    "skylake-avx512": "Xeon Skylake-SP (AVX-512 without VNNI)",
    "icelake-server": "Xeon Ice Lake",
    "sapphirerapids": "Xeon Sapphire Rapids and later",
    "alderlake": "Intel Core 12th-14th gen (AVX-VNNI, no AVX-512)",
    "znver3": "AMD Zen 3 (AVX2)",
    "znver4": "AMD Zen 4 (512-bit vectors at half rate)",
    "znver5": "AMD Zen 5 (512-bit vectors at full width)",
}
X86_FEATURES = ("avx2", "avx512f", "avx512vnni", "avxvnni")  # what `gptbc targets` reports per x86 CPU


def x86_cpu_features(cpu: str) -> list[str]:
    """The features of X86_FEATURES that LLVM turns on for this x86-64 CPU name."""
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})
    return [f for f in X86_FEATURES if codegen.target_has_features(f, target)]


def x86_int8_kernel(cpu: str) -> str:
    """The int8-activation kernel an x86-64 CPU gets (kernels_int8.int8_isa), and whether `--activations auto`
    picks it: vnni512, vnni (both on by default), avx2 or generic (only with --activations int8)."""
    import tvm

    from gptbc.compile.kernels_int8 import int8_isa

    isa = int8_isa(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu}))
    return isa if isa in ("vnni512", "vnni") else f"{isa} (float by default)"


# The Arm CPUs the docs name, each with the boards it is (any other CPU name LLVM knows for aarch64 works
# too). LLVM's -mcpu implies the features: dotprod (sdot/udot) from cortex-a76 on, i8mm (smmla) on neoverse-v1/v2.
ARM_CPUS = {
    "cortex-a72": "Raspberry Pi 4",
    "cortex-a76": "Raspberry Pi 5",
    "cortex-a78ae": "Jetson Orin's CPU",
    "neoverse-n1": "AWS Graviton2, Ampere Altra",
    "neoverse-v1": "AWS Graviton3",
    "neoverse-v2": "AWS Graviton4, NVIDIA Grace",
    "apple-m1": "Linux on Apple M1 (Asahi)",
}
ARM_FEATURES = ("neon", "dotprod", "i8mm", "sve")  # what `gptbc targets` reports per CPU
AARCH64_COMPILERS = (f"{AARCH64_TRIPLE}-g++", f"{AARCH64_TRIPLE}-gcc")
AARCH64_PACKAGE = "g++-aarch64-linux-gnu"


def aarch64_target(cpu: str | None) -> dict:
    """The TVM target for an aarch64 Linux CPU (None: generic armv8-a with NEON, which runs on every board)."""
    return {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mcpu": cpu or "generic", "mattr": ["+neon"], "num-cores": 4}


def check_arm_cpu(cpu: str) -> None:
    """LLVM falls back to `generic` (with a warning) on a CPU name it does not know: refuse it instead."""
    import tvm
    from tvm.target import codegen

    known = set(codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": AARCH64_TRIPLE})))
    if cpu not in known:
        raise GptbcError(f"--target aarch64-linux:{cpu}: unknown CPU {cpu!r} (known: {', '.join(ARM_CPUS)}, or any "
                         f"of LLVM's {len(known)} aarch64 CPU names)")


def arm_cpu_features(cpu: str | None) -> list[str]:
    """The features of ARM_FEATURES that LLVM turns on for this CPU."""
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target(aarch64_target(cpu))
    return [f for f in ARM_FEATURES if codegen.target_has_features(f, target)]


def arm_int8_kernel(cpu: str | None) -> str:
    """The int8-activation kernel this CPU's features give (kernels_int8.int8_isa): smmla, sdot or generic."""
    import tvm

    from gptbc.compile.kernels_int8 import int8_isa

    return int8_isa(tvm.target.Target(aarch64_target(cpu)))


def aarch64_compiler() -> str | None:
    return next((path for name in AARCH64_COMPILERS if (path := shutil.which(name))), None)


def _aarch64(variant: str | None) -> Build:
    if variant:
        check_arm_cpu(variant)
    target = aarch64_target(variant)
    cc = aarch64_compiler()
    if cc:
        return Build(target, ".so", cc=cc)
    return Build(target, ".tar", system_lib=True,
                 shared_needs=f"the cross compiler {AARCH64_COMPILERS[0]} (Debian/Ubuntu: apt-get install "
                              f"{AARCH64_PACKAGE})")


def _has_global(name: str) -> bool:
    import tvm

    return tvm.get_global_func(name, allow_missing=True) is not None


def _no_nvcc() -> str | None:
    return None if shutil.which("nvcc") else "nvcc not found on PATH (install the CUDA toolkit)"


TARGETS: list[TargetSpec] = [
    TargetSpec("cpu", "this machine's CPU (LLVM with the host's features; `cpu:MCPU` overrides)", "cpu",
               CPU_PIPELINE, "LLVM (in TVM) and a C compiler to link", _cpu, aliases=("llvm",),
               variant_pattern=r"[\w.-]+"),
    TargetSpec("cuda", "NVIDIA GPU; `cuda:sm_XX[,sm_YY...]` picks the architectures (default: the local GPU's, "
               "else sm_80); PTX of the highest is embedded for newer GPUs", "cuda", CUDA_PIPELINE, "nvcc", _cuda,
               variant_pattern=r"sm_\d{2,3}a?(,sm_\d{2,3}a?)*", unavailable=_no_nvcc, embedded=CUDA_FATBIN),
    TargetSpec("metal", "Apple silicon GPU: a .dylib on macOS, elsewhere a .tar of objects for a macOS build",
               "metal", GPU_PIPELINE, "LLVM (in TVM); on macOS the Xcode command line tools", _metal),
    TargetSpec("vulkan", "Vulkan GPU: SPIR-V with a TVM built with USE_VULKAN=ON, else WGSL kernels in a .so run "
               "by gptbc's WebGPU runtime (wgpu-native)", "vulkan", WGPU_PIPELINE,
               "LLVM (in TVM) and a C compiler; running needs the vulkan extra (wgpu) and a Vulkan driver", _vulkan),
    TargetSpec("webgpu", "browsers (WGSL shaders, wasm32 host code), a .tar for a web runtime", "webgpu",
               WGPU_PIPELINE, "LLVM (in TVM)", _webgpu),
    TargetSpec("aarch64-linux", "64-bit Arm Linux boards: `aarch64-linux:CPU` tunes for a CPU and uses its "
               "features (dotprod, i8mm; list below), default generic armv8-a + NEON; a .so with the cross compiler, "
               "else a .tar", "cpu", CPU_PIPELINE, f"LLVM (in TVM); {AARCH64_COMPILERS[0]} to link a .so", _aarch64,
               variant_pattern=r"[\w.+-]+", arch="aarch64"),
]


def get_target(spelling: str) -> tuple[TargetSpec, str | None]:
    """`cuda:sm_86` → (the cuda entry, "sm_86"); unknown names and bad variants are one-line errors."""
    name, _, variant = spelling.partition(":")
    for spec in TARGETS:
        if name == spec.name or name in spec.aliases:
            if variant and not (spec.variant_pattern and re.fullmatch(spec.variant_pattern, variant)):
                raise GptbcError(f"--target {spelling}: {spec.name} takes no variant {variant!r}"
                                 + (f" (expected {spec.variant_pattern})" if spec.variant_pattern else ""))
            return spec, variant or None
    known = ", ".join(n for s in TARGETS for n in (s.name, *s.aliases))
    raise GptbcError(f"--target {spelling}: unknown target (choose from {known})")


def plan_build(spelling: str) -> tuple[TargetSpec, Build]:
    """Resolve a target spelling and check this machine can build it, before any work is done."""
    spec, variant = get_target(spelling)
    why = spec.unavailable()
    if why:
        raise GptbcError(f"--target {spelling}: cannot build here: {why}")
    return spec, spec.plan(variant)
