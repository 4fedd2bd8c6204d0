"""The compile driver: config → Relax module → the pass list → model library, written atomically.

Phases (each reported): export the nn.Module to Relax, attach `_metadata`, lower with the passes
below and the target's schedules, build, write the library (with any kernels the target builds itself
linked in: CUDA's nvcc fatbin) under a temporary name and rename it. Which schedules and kernels a target
gets is decided in its `TargetSpec` (targets.py), not here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from gptbc.artifact.cache import cache_disabled, get_or_build, sources_hash
from gptbc.artifact.config import GPTBC_CONFIG, GPTBigCodeConfig, ModelSource, load_gptbc_config
from gptbc.errors import GptbcError
from gptbc.artifact.files import atomic_path, made_parents
from gptbc.artifact.manifest import library_manifest, tensor_parallel
from gptbc.artifact.sharding import check_tensor_parallel, rank_view
from gptbc.artifact.params import converted_params
from gptbc.artifact.quantization import Quantization, check_activation_mode, get_quantization
from gptbc.compile.targets import CPU_PIPELINE, Build, Pipeline, get_target, plan_build


def default_output(model_name: str, quant: str, spelling: str, build: Build, tp: int = 1) -> Path:
    shards = f"-tp{tp}" if tp > 1 else ""
    return Path("dist") / "libs" / f"{model_name}-{quant}{shards}-{spelling.replace(':', '-')}{build.suffix}"


def attach_metadata(mod, meta: dict):
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    with bb.function("_metadata", []):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(meta)))
    return bb.get()


# The pass list is TVM's default Relax pipeline for CPUs (`relax.backend.cpu_generic.pipeline`), imported, for
# every target, with these additions, each for a reason:
# - FuseTransposeMatmul before legalization: x @ permute_dims(W) becomes one NT-matmul kernel; otherwise every
#   call materializes W transposed.
# - the target's schedule rules (`TargetSpec.pipeline.schedule_rules`) between fusion and lowering: TVM's CPU
#   pipeline schedules nothing (single-threaded naive loops); GPU targets get dlight's rules kept off the
#   tensorize paths that crash TVM 0.27 (schedules.gpu_rules) instead of TVM's GPU list, which tensorizes.
# - the target's kernel replacements (`TargetSpec.pipeline.replace_kernels`) before any pass: on CPUs our
#   prefill attention in place of TVM's serial scalar kernels (kernels.py).
# - TIR CSE guarded per kernel (`guarded_tir_cse`) during the build: TVM 0.27's CSE breaks some kernels.
# - buffer compaction for block-structured kernels only (`compact_block_kernels`): plain-TIR kernels have no
#   block buffers to compact, and the pass's analysis of their bodies was a quarter of a tiny CPU build.
# Left out of TVM's list: library dispatch (DispatchSampling, DispatchSortScan), as the model has no sampling,
# sort or scan op for them to dispatch. TVM's generic-GPU lists equal the CPU ones apart from their schedules;
# its CUDA list also has RewriteCUDAGraph, which gptbc has not adopted.


def fusion_passes(target) -> list:
    """Legalize Relax ops to TIR and fuse them into kernels (dequantization already sits inside the
    matmul/lookup compute of a quantized weight, see quantization/layers.py, so fusion never separates them)."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as tvm_default

    return [relax.transform.FuseTransposeMatmul()] + tvm_default.legalize_passes(target)


def lowering_passes(target) -> list:
    """Relax → VM: memory planning and shape lowering, TVM's default lists."""
    from tvm.relax.backend.cpu_generic import pipeline as tvm_default

    return tvm_default.dataflow_lower_passes(target) + tvm_default.finalize_passes(target)


def relax_pipeline(pipeline: Pipeline, target, batch_invariant: bool = False):
    """The module pass `relax.build` runs: fusion, `pipeline`'s schedule rules, lowering."""
    import tvm
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0, name=f"gptbc_{pipeline.name}_pipeline")
    def run(mod, _ctx):
        with target:
            schedule = dl.ApplyDefaultSchedule(*pipeline.schedule_rules(batch_invariant))
            return tvm.transform.Sequential(fusion_passes(target) + [schedule] + lowering_passes(target))(mod)

    return run


def check_batch_invariant_build(spec, config) -> None:
    """--batch-invariant on a CPU needs our vectorized attention kernels, which want head_dim in 16-lane steps
    (the GPU ones, kernels_gpu.py, take any head_dim)."""
    from gptbc.compile.kernels import LANES

    if spec.pipeline is CPU_PIPELINE and config.head_dim % LANES:
        raise GptbcError(f"--batch-invariant: head_dim {config.head_dim} is not a multiple of {LANES}, "
                         f"which the invariant CPU attention kernels need")


def check_own_scheme(source: ModelSource, quant: Quantization, tp: int = 1) -> None:
    """A converted weights directory compiles only for the scheme (and the --tensor-parallel) its weights are in."""
    if source.directory is None or not (source.directory / GPTBC_CONFIG).is_file():
        return
    converted = load_gptbc_config(source.directory)
    if tensor_parallel(converted) != tp:
        raise GptbcError(f"--tensor-parallel {tp}: {source.directory} holds weights converted with --tensor-parallel "
                         f"{tensor_parallel(converted)}, and a converted directory compiles for its own N")
    have = converted["quantization"]
    keep = lambda d: d.get("kind") in ("group", "affine") and not d.get("quantize_lm_head", True)  # noqa: E731
    if have["name"] != quant.name or keep(have) != keep(quant.describe()):
        held = have["name"] + (" with an unquantized lm_head" if keep(have) else "")
        raise GptbcError(f"--quantization {quant.name}{' --no-quantize-lm-head' if keep(quant.describe()) else ''}: "
                         f"{source.directory} holds {held} weights, and a converted directory compiles for its "
                         f"own scheme (leave out --quantization, or convert the HF checkpoint again)")


def own_widths(source: ModelSource, quant: Quantization) -> Quantization:
    """A per-tensor scheme compiled from a converted directory: with the widths its weights have (quantization.py);
    from a config alone, every module in the scheme's default layout."""
    if not quant.per_tensor or source.directory is None or not (source.directory / GPTBC_CONFIG).is_file():
        return quant
    import dataclasses

    from gptbc.artifact.quantization import quantization_of

    have = quantization_of(load_gptbc_config(source.directory)["quantization"], str(source.directory / GPTBC_CONFIG))
    return dataclasses.replace(quant, widths=have.widths)


def export_relax(cfg: GPTBigCodeConfig, quant: Quantization, target, batch_invariant: bool = False, tp: int = 1):
    """The model's Relax IRModule (all exported functions, parameters packed), before any pass, its
    parameters as (name, shape, dtype) in the order the functions take them, and which of them the runtime
    repacks when loading ({name: kind}, layers.repack_plan). With `tp` > 1: one rank's model."""
    from gptbc.compile.model import GPTBigCodeForCausalLM, param_list
    from gptbc.compile.quantized_layers import repack_plan

    model = GPTBigCodeForCausalLM(cfg, target, quant, batch_invariant, tp)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    params = param_list(named_params)
    if params != converted_params(cfg, quant, tp):  # the converter writes that list; a library must take the same
        raise GptbcError(f"internal: the {quant.name} model's parameters differ from artifact.params.converted_params")
    return mod, params, repack_plan(named_params)


def choose_activations(option: str, quant: Quantization, target) -> Quantization:
    """`quant` with int8 activations on or off (--activations): `auto` turns them on for grouped schemes on
    CPUs with an integer dot-product instruction (x86 VNNI, where they measured faster; aarch64's sdot and
    smmla, whose kernel reads its own weight layout, set here too);
    `int8` on any CPU (a generic kernel where there is neither); `float` keeps the float-activation kernels.
    The affine schemes have them too: q4*_a in both layouts; the per-tensor qk*_a (4-, 5- and 6-bit layers) in the
    dot layout only, which i8mm CPUs run with sdot."""
    import dataclasses

    from gptbc.compile.kernels_int8 import int8_isa, int8_layout

    check_activation_mode(option)
    cpu = target.kind.name == "llvm"
    isa = int8_isa(target)
    if option == "int8" and not cpu:
        raise GptbcError(f"--activations int8: only CPU targets have int8-activation kernels (target is {target.kind.name})")
    if option == "int8" and quant.kind not in ("group", "affine"):
        raise GptbcError(f"--activations int8: {quant.name} has float weights; int8 activations need a grouped "
                         f"scheme (q8*/q4*)")
    # auto: where the integer dot is one instruction per 4 inputs or better (vpdpbusd, sdot, smmla); AVX2's
    # two-step dot lost to the float kernels in prefill, so it is not picked
    on = quant.kind in ("group", "affine") and cpu and (
        option == "int8" or (option == "auto" and isa in ("vnni512", "vnni", "sdot", "smmla")))
    layout = int8_layout("sdot" if quant.per_tensor and isa == "smmla" else isa)  # qk*_a: no smmla kernel
    return dataclasses.replace(quant, int8_activations=on, int8_layout=layout if on else "dot")


@dataclass(frozen=True)
class LibraryPlan:
    """What one library is: the model, the target as resolved here, and the scheme with its activation kernels."""

    source: ModelSource
    spec: Any  # targets.TargetSpec
    build: Build
    target: Any  # tvm.target.Target
    target_name: str
    quant: Quantization
    batch_invariant: bool
    tensor_parallel: int

    @property
    def key(self) -> dict:
        return library_key(self)

    @property
    def file_name(self) -> str:
        return f"library{self.build.suffix}"


def plan_library(source: ModelSource, target_name: str, quantization: str, quantize_lm_head: bool = True,
                 activations: str = "auto", batch_invariant: bool = False, tensor_parallel: int = 1) -> LibraryPlan:
    """Check the options against the model and the target (one-line errors) and resolve them."""
    spec, build = plan_build(target_name)
    if batch_invariant:
        check_batch_invariant_build(spec, source.config)
        if tensor_parallel > 1:
            raise GptbcError(f"--batch-invariant with --tensor-parallel {tensor_parallel}: not supported together "
                             f"(the invariant kernels and load_kv are single-device)")
    quant = get_quantization(quantization, quantize_lm_head)
    check_own_scheme(source, quant, tensor_parallel)
    quant = own_widths(source, quant)
    check_tensor_parallel(source.config, quant, tensor_parallel)
    check_activation_mode(activations)

    import tvm

    target = tvm.target.Target(build.target)
    return LibraryPlan(source, spec, build, target, target_name, choose_activations(activations, quant, target),
                       batch_invariant, tensor_parallel)


def cached_library(plan: LibraryPlan, log: Callable[[str], None] = print) -> Path:
    """The library of `plan` in the artifact cache, built there first if it is not (one line says which)."""
    entry = get_or_build("libraries", plan.key, lambda folder: _build_library(plan, folder / plan.file_name, log),
                         describe=describe_library(plan), log=log)
    return entry.path / plan.file_name


def compile_model(source: ModelSource, target_name: str, quantization: str, output: str | Path | None = None,
                  log: Callable[[str], None] = print, quantize_lm_head: bool = True, activations: str = "auto",
                  batch_invariant: bool = False, tensor_parallel: int = 1, cache: bool = True) -> Path:
    """Build the model library for `source` and return its path. `batch_invariant`: a row's result does not
    depend on the other rows of a call (docs/determinism.md). `tensor_parallel` N > 1: the library of
    one rank of N (sharding.py), whose row-parallel layers sum across ranks through the session's CCL.
    `cache`: take the library from the artifact cache when the same one was built before (its key is everything
    the library depends on, `library_key`), else build it there; either way `output` gets a copy. False (or
    GPTBC_NO_CACHE=1) builds it straight into `output`."""
    plan = plan_library(source, target_name, quantization, quantize_lm_head, activations, batch_invariant,
                        tensor_parallel)
    build = plan.build
    output = Path(output) if output else default_output(source.name, plan.quant.name, target_name, build,
                                                        tensor_parallel)
    if "".join(output.suffixes[-1:]) != build.suffix:
        needs = f" (a .so needs {build.shared_needs})" if build.shared_needs else ""
        raise GptbcError(f"-o {output}: target {target_name} produces a {build.suffix} file here{needs}")
    with made_parents(output):  # made for this output; removed again if the build fails
        if not cache or cache_disabled():
            return _build_library(plan, output, log)
        built = cached_library(plan, log)
        with atomic_path(output) as tmp:
            shutil.copyfile(built, tmp)
            os.chmod(tmp, 0o755 if build.suffix in (".so", ".dylib") else 0o644)
    return output


def describe_library(plan: LibraryPlan) -> str:
    """How a cache line names a library: "cpu/znver4 q4f16_1, int8 activations"."""
    t = plan.build.target
    mcpu = t.get("mcpu") or t.get("arch") or t.get("host", {}).get("mcpu")
    acts = ", int8 activations" if plan.quant.int8_activations else ""
    name = plan.target_name
    return f"{name}{'/' + mcpu if mcpu and mcpu not in name else ''} {plan.quant.name}{acts}"


def library_key(plan: LibraryPlan) -> dict:
    """Everything a library depends on: the model config (with its compile-time sizes), the scheme with its
    widths and activation kernels, the target as resolved here (CPU model, cores, cross compiler), the options,
    the compiler's and converter's sources, the toolchain, and the gptbc and TVM versions. Not the weights:
    a library runs any weights of its config and scheme."""
    import tvm

    from gptbc import __version__

    build, quant = plan.build, plan.quant
    tools = [build.cc] if build.cc else []
    if plan.spec.embedded is not None:
        tools.append(shutil.which("nvcc"))
    return {"model_config": plan.source.config.to_dict(), "quantization": quant.describe(),
            "activations": [quant.int8_activations, quant.int8_layout], "target": plan.target_name,
            "resolved_target": build.target, "system_lib": build.system_lib, "suffix": build.suffix,
            "batch_invariant": plan.batch_invariant, "tensor_parallel": plan.tensor_parallel, "gptbc": __version__,
            "tvm": tvm.__version__, "sources": compiler_sources(), "toolchain": [(t, _mtime(t)) for t in tools]}


def _mtime(path: str | None) -> int | None:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def compiler_sources() -> str:
    """A hash of the compile and artifact packages' sources (the library's code and its manifest)."""
    package = Path(__file__).resolve().parents[1]
    return sources_hash(package / "compile", package / "artifact")


def _build_library(plan: LibraryPlan, output: Path, log: Callable[[str], None]) -> Path:
    """Export, lower, build and write the library to `output` (atomically)."""
    import tvm
    from tvm import relax

    from gptbc.compile import kernels

    source, quant, spec, build, target = plan.source, plan.quant, plan.spec, plan.build, plan.target
    target_name, batch_invariant, tensor_parallel = plan.target_name, plan.batch_invariant, plan.tensor_parallel

    def phase(name: str, start: float) -> float:
        now = time.perf_counter()
        log(f"[gptbc] {name}: {now - start:.1f}s")
        return now

    t = time.perf_counter()
    mod, params, plan = export_relax(source.config, quant, target, batch_invariant, tensor_parallel)
    # the attention kernels are built for one rank's heads
    mod = spec.pipeline.replace_kernels(mod, rank_view(source.config, tensor_parallel), quant, target, batch_invariant)
    repack: dict[str, str] = {}
    if plan:
        from gptbc.compile.kernels_int8 import add_repack_functions

        mod, repack = add_repack_functions(mod, plan, params)
    variant, embedded = get_target(target_name)[1], spec.embedded
    fatbin = embedded.contents(variant) if embedded else None
    # tvm_version: a bundle ships the runtime of exactly the TVM that built the library (bundle.py)
    meta = {**library_manifest(source, quant, spec.device, target_name, params, repack, fatbin, tensor_parallel),
            "tvm_version": tvm.__version__, "batch_invariant": batch_invariant,
            **({"attention_grain": kernels.GRAIN} if batch_invariant else {})}
    mod = attach_metadata(mod, meta)
    shards = f", {tensor_parallel} tensor-parallel ranks" if tensor_parallel > 1 else ""
    t = phase(f"export {source.name} ({quant.name}, {'int8' if quant.int8_activations else 'float'} activations"
              f"{shards}) to Relax", t)

    building = embedded.building() if embedded else contextlib.nullcontext()
    with tvm.transform.PassContext(opt_level=3), guarded_tir_cse() as cse_skipped, compact_block_kernels(), building:
        executable = relax.build(mod, target, relax_pipeline=relax_pipeline(spec.pipeline, target, batch_invariant),
                                 system_lib=build.system_lib)
    if cse_skipped:
        log(f"[gptbc] TIR CSE left out of {len(cse_skipped)} kernel(s) it would break: {', '.join(cse_skipped)}")
    t = phase(f"lower and build for {target_name}", t)

    packing = {}
    if embedded:
        pack, what = embedded.packer(executable, target, variant)
        packing, t = {"fpack_imports": pack}, phase(what, t)

    with atomic_path(output) as tmp:
        if build.cc:
            from tvm.support import cc  # tvm.contrib.cc before TVM 0.27

            executable.export_library(str(tmp), fcompile=cc.cross_compiler(build.cc), **packing)
        else:
            executable.export_library(str(tmp), **packing)
        os.chmod(tmp, 0o755 if build.suffix in (".so", ".dylib") else 0o644)
    phase(f"write {output} ({'objects for static linking' if build.system_lib else 'shared library'})", t)
    return output


@contextlib.contextmanager
def compact_block_kernels():
    """Run S-TIR's CompactBufferAllocation only on block-structured kernels (those TVMScript or TE made with the
    `s_tir` attribute). The pass shrinks each buffer allocated in a block to the region the block touches; our
    hand-written kernels (kernels.py's CPU attention, kernels_int8.py) are plain TIR with exactly sized buffers,
    so there is nothing to shrink, yet on TVM 0.27 the pass's region analysis of their unrolled bodies took
    ~2.5 s of a tiny CPU library's 10 s of lowering (measured: BENCHMARKS, issue 34)."""
    import tvm
    from tvm import s_tir, tirx

    original = s_tir.transform.CompactBufferAllocation

    @tirx.transform.prim_func_pass(opt_level=0, name="gptbc.CompactBlockKernels")
    def compact(func, _mod, _ctx):
        if not (func.attrs and func.attrs.get("s_tir")):
            return func
        return original()(tvm.IRModule({"f": func}))["f"]

    # TVM's default TIR pipeline looks the pass factory up on the module when it builds its pass list.
    s_tir.transform.CompactBufferAllocation = lambda *_args, **_kw: compact
    try:
        yield
    finally:
        s_tir.transform.CompactBufferAllocation = original


@contextlib.contextmanager
def guarded_tir_cse():
    """Run TVM's TIR common-subexpression elimination per kernel, keeping a kernel un-CSE'd when CSE breaks it.

    The bug (apache-tvm 0.27.0.post1, tirx.CommonSubexprElim): when the same index expression occurs
    inside a `T.Let` expression and again later in a statement, CSE does not count the occurrence in the
    Let body when placing its new binding, but still substitutes it, so the binding lands *after* that
    first use. SplitHostDevice then fails with "variable cse_vN has been used before definition". It hit
    the paged-KV-cache prefill/tree attention kernels on GPU targets at head_dim 16 (their RoPE branch
    computes `threadIdx.x % 8` inside a Let; the V loads compute it again); see docs/targets.md.
    Disabling CSE for the whole build (`tirx.disable_cse_tir`) would de-optimize every kernel; this
    keeps CSE wherever its output is well formed and yields the names of the kernels it skipped.
    """
    import tvm
    from tvm import tirx

    original = tirx.transform.CommonSubexprElim
    skipped: list[str] = []

    @tirx.transform.prim_func_pass(opt_level=0, name="gptbc.GuardedCommonSubexprElim")
    def guarded(func, _mod, _ctx):
        before = tvm.IRModule({"f": func})
        out = original()(before)
        if tirx.analysis.verify_well_formed(out, assert_mode=False) or \
                not tirx.analysis.verify_well_formed(before, assert_mode=False):
            return out["f"]
        skipped.append(str(func.attrs.get("global_symbol", "?")) if func.attrs else "?")
        return func

    # TVM's default TIR pipeline looks the pass factory up on the module when it builds its pass list.
    tirx.transform.CommonSubexprElim = lambda: guarded
    try:
        yield skipped
    finally:
        tirx.transform.CommonSubexprElim = original
