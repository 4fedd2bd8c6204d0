"""Every target builds the tiny model here, and each artifact holds what its runtime needs."""

from __future__ import annotations

import json
import struct
import platform
import subprocess
import tarfile

import numpy as np
import pytest

from gptbc.compile.compiler import compile_model
from gptbc.artifact.config import resolve_model
from gptbc.errors import GptbcError
from gptbc.compile.targets import TARGETS, plan_build
from gptbc.runtime.devices import DEVICE_KINDS, parse_device_kind
from test_cli import MODEL_FUNCTIONS

EM_AARCH64, EM_CUDA = 183, 190
MACHO_ARM64 = (0xFEEDFACF, 0x0100000C)


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return struct.unpack_from("<H", data, 18)[0]


def assert_model_functions_and_metadata(blob: bytes, target: str) -> None:
    for name in MODEL_FUNCTIONS:
        assert name.encode() in blob, f"{target}: function {name} missing"
    start = blob.index(b'{"gptbc_version"')
    meta, _ = json.JSONDecoder().raw_decode(blob[start:].decode("utf-8", "replace"))
    assert meta["target"] == target and meta["model_config"]["n_embd"] == 64
    assert meta["params"][0]["name"] == "transformer.wte.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hf_models import make_checkpoint

    hf = make_checkpoint(tmp_path_factory.mktemp("t") / "hf", n_embd=64, n_head=4, n_layer=1)
    return resolve_model(str(hf))


def build(tiny, target, tmp_path, suffix, quant="q0f32"):
    out = tmp_path / f"lib{suffix}"
    assert compile_model(tiny, target, quant, out, log=lambda _m: None) == out
    return out


@pytest.mark.nvcc
@pytest.mark.parametrize("variant, sass, ptx", [("sm_75", [75], [75]), ("sm_90,sm_80", [80, 90], [90])])
def test_cuda_library_holds_sass_for_each_arch_and_ptx_for_newer_gpus(tiny, tmp_path, variant, sass, ptx):
    from gptbc.artifact.fatbin import can_run, fatbin_entries
    from test_cuda_library import embedded_fatbin

    lib = build(tiny, f"cuda:{variant}", tmp_path, ".so")
    blob = lib.read_bytes()
    assert elf_machine(blob) == 62  # x86-64 host code
    assert b"__global__" not in blob  # no CUDA C for a load-time compiler...
    assert_model_functions_and_metadata(blob, f"cuda:{variant}")
    fat = embedded_fatbin(blob)  # ...the kernels compiled by nvcc, inside the library
    # The SM field of every embedded CUDA ELF (read from the ELF headers, independently of our parser).
    elf_sms, pos = [], fat.find(b"\x7fELF")
    while pos >= 0:
        assert elf_machine(fat[pos:]) == EM_CUDA
        elf_sms.append((struct.unpack_from("<I", fat, pos + 48)[0] >> 8) & 0xFF)
        pos = fat.find(b"\x7fELF", pos + 4)
    assert sorted(elf_sms) == sass
    entries = fatbin_entries(fat)
    assert sorted(a for k, a in entries if k == "sass") == sass and [a for k, a in entries if k == "ptx"] == ptx
    meta, _ = json.JSONDecoder().raw_decode(blob[blob.index(b'{"gptbc_version"'):].decode("utf-8", "replace"))
    assert sorted((e["kind"], e["arch"]) for e in meta["cuda_fatbin"]) == sorted(entries)
    # What runs where: the H200 (sm_90) runs an sm_80 build through its PTX; older GPUs do not.
    assert can_run(entries, 90) and can_run(entries, 100) and not can_run(entries, min(sass) - 5)


def test_cuda_library_refused_on_a_gpu_it_cannot_run(tmp_path):
    """The load-time check, with the local GPU's arch faked (no GPU here): it reads the manifest's
    `cuda_fatbin` and fails in one line naming what the fatbin holds and the flag that fixes it."""
    from gptbc.runtime.cuda import check_runnable

    lib = tmp_path / "lib.so"
    meta = {"cuda_fatbin": [{"kind": "sass", "arch": 86}, {"kind": "ptx", "arch": 86}]}
    check_runnable(meta, lib, 86)
    check_runnable(meta, lib, 89)  # same major, newer minor: the SASS runs
    check_runnable(meta, lib, 90)  # newer major: the PTX is JIT-compiled
    check_runnable({}, lib, 80)  # a library without CUDA kernels: nothing to check
    with pytest.raises(GptbcError) as err:
        check_runnable(meta, lib, 80)
    msg = str(err.value)
    assert "sm_86" in msg and "compute_86" in msg and "--target cuda:sm_80" in msg and "\n" not in msg
    for bad in ([], [{"kind": "cubin", "arch": 86}], [{"kind": "sass", "arch": "86"}], [{"arch": 86}], "sm_86"):
        with pytest.raises(GptbcError, match=r"lib\.so metadata: cuda_fatbin is not a list"):
            check_runnable({"cuda_fatbin": bad}, lib, 90)


def test_metal_objects_hold_shaders(tiny, tmp_path):
    lib = build(tiny, "metal", tmp_path, ".tar")
    members = tar_members(lib)
    assert set(members) == {"lib0.o", "devc.o"}
    for data in members.values():
        assert struct.unpack_from("<II", data) == MACHO_ARM64  # arm64 macOS objects
    assert members["devc.o"].count(b"kernel void") > 10  # Metal Shading Language kernels
    assert_model_functions_and_metadata(members["devc.o"], "metal")


def test_webgpu_objects_hold_wgsl(tiny, tmp_path):
    lib = build(tiny, "webgpu", tmp_path, ".tar")
    members = tar_members(lib)
    assert all(data[:4] == b"\0asm" for data in members.values())  # wasm32 objects
    assert members["devc.o"].count(b"@compute") > 10  # WGSL compute shaders
    assert_model_functions_and_metadata(members["devc.o"], "webgpu")


def test_aarch64_objects(tiny, tmp_path):
    suffix = plan_build("aarch64-linux")[1].suffix
    lib = build(tiny, "aarch64-linux", tmp_path, suffix)
    blobs = tar_members(lib) if suffix == ".tar" else {"lib": lib.read_bytes()}
    assert blobs and all(elf_machine(b) == EM_AARCH64 for b in blobs.values())
    assert_model_functions_and_metadata(b"".join(blobs.values()), "aarch64-linux")


@pytest.mark.aarch64  # needs the cross compiler: skipped without it, failed under GPTBC_REQUIRE_AARCH64=1
def test_aarch64_shared_library_for_a_named_cpu(tiny, tmp_path):
    lib = build(tiny, "aarch64-linux:cortex-a76", tmp_path, ".so")
    blob = lib.read_bytes()
    assert elf_machine(blob) == EM_AARCH64 and blob[16] == 3  # ET_DYN: a shared library, not objects
    assert_model_functions_and_metadata(blob, "aarch64-linux:cortex-a76")


@pytest.mark.parametrize("cpu, has, lacks", [(None, ["neon"], ["dotprod", "i8mm"]),
                                             ("cortex-a72", ["neon"], ["dotprod", "i8mm"]),
                                             ("cortex-a76", ["dotprod"], ["i8mm"]),
                                             ("neoverse-n1", ["dotprod"], ["i8mm"]),
                                             ("neoverse-v1", ["dotprod", "i8mm"], [])])
def test_arm_cpu_sets_the_features_llvm_compiles_for(cpu, has, lacks):
    from tvm.target import Target, codegen

    target = Target(plan_build("aarch64-linux" + (f":{cpu}" if cpu else ""))[1].target)
    assert target.attrs["mcpu"] == (cpu or "generic") and str(target.attrs["mtriple"]) == "aarch64-linux-gnu"
    for feature in has:
        assert codegen.target_has_features(feature, target), feature
    for feature in lacks:
        assert not codegen.target_has_features(feature, target), feature


def test_unknown_arm_cpu_is_a_one_line_error_naming_the_known_ones():
    with pytest.raises(GptbcError) as info:
        plan_build("aarch64-linux:cortex-z99")
    msg = str(info.value)
    assert "unknown CPU 'cortex-z99'" in msg and "cortex-a76" in msg and "neoverse-v1" in msg and "\n" not in msg


def test_aarch64_without_a_cross_compiler(tiny, tmp_path, monkeypatch):
    """No aarch64-linux-gnu-g++ on PATH: the target falls back to objects, and asking for a .so names the package
    (before any work is done or any file written)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    spec, plan = plan_build("aarch64-linux")
    assert plan.suffix == ".tar" and plan.cc is None
    with pytest.raises(GptbcError) as info:
        compile_model(tiny, "aarch64-linux", "q0f32", tmp_path / "out" / "lib.so", log=lambda _m: None)
    assert "apt-get install g++-aarch64-linux-gnu" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_vulkan_builds_wgsl_into_a_native_library_without_vulkan_codegen(tiny, tmp_path):
    """Without SPIR-V codegen (the wheel), --target vulkan is WGSL kernels in a .so for this CPU (run by gptbc's
    WebGPU runtime, tests/test_vulkan.py); with it, TVM's own Vulkan library."""
    from gptbc.compile.targets import vulkan_codegen

    lib = build(tiny, "vulkan", tmp_path, ".so")
    blob = lib.read_bytes()
    assert_model_functions_and_metadata(blob, "vulkan")
    assert elf_machine(blob) in (62, EM_AARCH64)  # x86-64 or aarch64 host code: a native library
    if not vulkan_codegen():
        assert b"@compute @workgroup_size" in blob  # WGSL compute shaders in the device module


@pytest.mark.parametrize("spelling, fragment", [("cuda:sm80", "sm_"), ("metal:m3", "no variant"),
                                                ("tpu", "unknown target")])
def test_bad_target_spellings(spelling, fragment):
    with pytest.raises(GptbcError, match=fragment):
        plan_build(spelling)


@pytest.mark.parametrize("spelling, want", [("cpu", ("cpu", 0)), ("llvm", ("cpu", 0)), ("cuda:1", ("cuda", 1)),
                                            ("metal", ("metal", 0)), ("vulkan:0", ("vulkan", 0)),
                                            ("rocm:2", ("rocm", 2)), ("opencl", ("opencl", 0))])
def test_device_spellings(spelling, want):
    assert parse_device_kind(spelling) == want


@pytest.mark.parametrize("spelling", ["gpu", "cuda:x", "cuda:-1", "cuda:\u00b2", "webgpu", "CPU"])
def test_bad_device_spellings_are_one_line(spelling):
    with pytest.raises(GptbcError) as info:
        parse_device_kind(spelling)
    assert str(info.value) == (f"device {spelling!r}: expected one of cpu, cuda, llvm, metal, opencl, rocm, vulkan, "
                               f"optionally with :INDEX")


def test_every_runnable_target_names_a_runtime_device_kind():
    """The two tables agree: a library's recorded device is one the runtime can be asked for."""
    for spec in TARGETS:
        assert spec.device in set(DEVICE_KINDS.values()) or spec.device == "webgpu", spec.name
        assert spec.pipeline.name == ("cpu" if spec.device == "cpu" else "gpu"), spec.name


def test_quantized_gpu_build(tiny, tmp_path):
    """Fused dequantize-matmul kernels get GPU schedules too (WebGPU: no nvcc needed)."""
    lib = build(tiny, "webgpu", tmp_path, ".tar", quant="q4f16_1")
    assert b"dequant" in tar_members(lib)["devc.o"]


def test_targets_command_lists_every_target():
    out = subprocess.run(["gptbc", "targets"], capture_output=True, text=True, check=True).stdout
    for spec in TARGETS:
        assert spec.name in out
    assert "vulkan path: " in out and ("WGSL" in out or "SPIR-V" in out)
    features = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  aarch64-linux:")}
    assert features["aarch64-linux:cortex-a72"] == "neon" and features["aarch64-linux:neoverse-n1"] == "neon+dotprod"
    assert "i8mm" in features["aarch64-linux:neoverse-v1"]
    kernels = {line.split()[0]: line.split()[2] for line in out.splitlines() if line.startswith("  aarch64-linux:")}
    assert kernels["aarch64-linux:cortex-a72"] == "int8:generic" and kernels["aarch64-linux:cortex-a76"] == "int8:sdot"
    assert kernels["aarch64-linux:neoverse-v1"] == kernels["aarch64-linux:neoverse-v2"] == "int8:smmla"
    x86 = {line.split()[0]: line.split()[2] for line in out.splitlines() if line.startswith("  cpu:")}
    assert x86["cpu:znver4"] == x86["cpu:znver5"] == x86["cpu:icelake-server"] == "int8:vnni512"
    assert x86["cpu:alderlake"] == "int8:vnni" and x86["cpu:haswell"] == x86["cpu:skylake-avx512"] == "int8:avx2"
    if platform.machine() in ("x86_64", "AMD64"):
        assert sum(line.startswith("  cpu:") and line.endswith("this machine") for line in out.splitlines()) == 1


def test_device_argmax_on_cpu(engine_of):
    """argmax (used on GPUs so greedy steps copy back ids, not logits) matches numpy, ties to the first maximum."""
    import tvm

    engine = engine_of("mqa64")
    logits = np.random.default_rng(0).standard_normal((3, engine.config.vocab_size)).astype(np.float32)
    logits[1, [9, 5, 40]] = 100.0
    t = tvm.runtime.tensor(logits, engine.runner.dev)
    assert engine.runner.vm["argmax"](t).numpy().tolist() == logits.argmax(-1).tolist()
    assert logits.argmax(-1)[1] == 5


def test_device_greedy_path_equals_host_path(engine_of):
    engine = engine_of("mha64")
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    engine.scheduler.clear_prefix_cache()
    want = engine.generate_batch(prompts, 8)
    engine.runner.on_cpu = False  # take the GPU branch: argmax on the device
    try:
        engine.scheduler.clear_prefix_cache()
        assert engine.generate_batch(prompts, 8) == want
    finally:
        engine.runner.on_cpu = True


def test_library_for_another_device(tiny_model, capsys):
    from gptbc.cli import main

    m = tiny_model("mqa64")
    capsys.readouterr()
    assert main(["generate", str(m.out_dir), "--lib", str(m.lib), "--prompt-ids", "1", "--device", "cuda:0"]) == 1
    err = capsys.readouterr().err
    assert "cuda:0" in err and err.startswith("error: ")
