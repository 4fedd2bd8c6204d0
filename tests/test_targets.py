"""Every target builds the tiny model here, and each artifact holds what its runtime needs."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tarfile
import time

import numpy as np
import pytest

from gptbc.compiler import compile_model
from gptbc.config import resolve_model
from gptbc.errors import GptbcError
from gptbc.targets import TARGETS, get_target, plan_build
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


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: cannot compile CUDA kernels")
def test_cuda_library_and_kernels_for_the_requested_arch(tiny, tmp_path):
    for arch in ("sm_80", "sm_75"):
        lib = build(tiny, f"cuda:{arch}", tmp_path / arch, ".so") if (tmp_path / arch).mkdir() is None else None
        blob = lib.read_bytes()
        assert elf_machine(blob) == 62  # x86-64 host code
        assert blob.count(b"__global__") > 10  # TVM 0.27 keeps the CUDA C in the library...
        assert_model_functions_and_metadata(blob, f"cuda:{arch}")
        fat = lib.with_name(lib.name + ".fatbin").read_bytes()  # ...and gptbc ships it compiled by nvcc
        assert fat[:4] == b"\x50\xed\x55\xba"  # fatbin magic
        elf = fat[fat.index(b"\x7fELF"):]
        assert elf_machine(elf) == EM_CUDA and (struct.unpack_from("<I", elf, 48)[0] >> 8) & 0xFF == int(arch[3:])
        info = json.loads(lib.with_name(lib.name + ".fatbin.json").read_text())
        assert info["arch"] == arch and len(info["source_sha256"]) == 64


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


def test_vulkan_builds_wgsl_into_a_native_library_without_vulkan_codegen(tiny, tmp_path):
    """Without SPIR-V codegen (the wheel), --target vulkan is WGSL kernels in a .so for this CPU (run by gptbc's
    WebGPU runtime, tests/test_vulkan.py); with it, TVM's own Vulkan library."""
    from gptbc.targets import vulkan_codegen

    lib = build(tiny, "vulkan", tmp_path, ".so")
    blob = lib.read_bytes()
    assert_model_functions_and_metadata(blob, "vulkan")
    assert elf_machine(blob) in (62, EM_AARCH64)  # x86-64 or aarch64 host code: a native library
    if not vulkan_codegen():
        assert b"@compute @workgroup_size" in blob and b'"kind": "webgpu"' in blob


@pytest.mark.parametrize("spelling, fragment", [("cuda:sm80", "sm_"), ("metal:m3", "no variant"),
                                                ("tpu", "unknown target")])
def test_bad_target_spellings(spelling, fragment):
    with pytest.raises(GptbcError, match=fragment):
        plan_build(spelling)


def test_quantized_gpu_build(tiny, tmp_path):
    """Fused dequantize-matmul kernels get GPU schedules too (WebGPU: no nvcc needed)."""
    lib = build(tiny, "webgpu", tmp_path, ".tar", quant="q4f16_1")
    assert b"dequant" in tar_members(lib)["devc.o"]


def test_targets_command_lists_every_target():
    out = subprocess.run(["gptbc", "targets"], capture_output=True, text=True, check=True).stdout
    for spec in TARGETS:
        assert spec.name in out
    assert "vulkan path: " in out and ("WGSL" in out or "SPIR-V" in out)


def test_device_helpers_on_cpu(engine_of):
    """argmax / softmax_with_temperature (used on GPUs so logits stay on the device) match numpy."""
    import tvm

    engine = engine_of("mqa64")
    logits = np.random.default_rng(0).standard_normal((3, engine.config.vocab_size)).astype(np.float32)
    t = tvm.runtime.tensor(logits, engine.dev)
    assert engine.vm["argmax"](t).numpy().tolist() == logits.argmax(-1).tolist()
    temps = np.array([0.5, 1.0, 2.0], np.float32)
    probs = engine.vm["softmax_with_temperature"](t, tvm.runtime.tensor(temps, engine.dev)).numpy()
    x = logits / temps[:, None]
    want = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_device_greedy_path_equals_host_path(engine_of):
    engine = engine_of("mha64")
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    engine.scheduler.clear_prefix_cache()
    want = engine.generate_batch(prompts, 8)
    engine.on_cpu = False  # take the GPU branch: argmax on the device
    try:
        engine.scheduler.clear_prefix_cache()
        assert engine.generate_batch(prompts, 8) == want
    finally:
        engine.on_cpu = True


def test_library_for_another_device(tiny_model, capsys):
    from gptbc.cli import main

    m = tiny_model("mqa64")
    capsys.readouterr()
    assert main(["generate", str(m.out_dir), "--lib", str(m.lib), "--prompt-ids", "1", "--device", "cuda:0"]) == 1
    err = capsys.readouterr().err
    assert "cuda:0" in err and err.startswith("error: ")
