"""The int8-activation kernel on aarch64 (sdot, kernels_int8.py), executed under qemu-aarch64: against the numpy
integer reference of tests/test_int8.py as a CPU with dotprod (`-cpu max`), and the baseline build as a
Cortex-A72, which has no dotprod. Each kernel is cross-compiled to a .so and called by gptbc-call (native/
call_main.cc), itself cross-built against the aarch64 TVM runtime. qemu proves the results, not the speed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from aarch64_tools import CXX, qemu
from gptbc.artifact.quantization import get_quantization, quantize
from gptbc.compile import kernels_int8 as ki
from gptbc.compile.targets import aarch64_target
from test_int8 import integer_reference, repacked

pytestmark = pytest.mark.aarch64
DOTPROD = tvm.target.Target(aarch64_target("cortex-a76"))  # Armv8.2 with dotprod: the sdot kernel
BASELINE = tvm.target.Target(aarch64_target("cortex-a72"))  # Armv8.0: the generic kernel


@pytest.fixture(scope="module")
def call_tool():
    """(gptbc-call for aarch64, the folders of its TVM libraries): built once, cached like a bundle's gptbc-run."""
    from gptbc.bundle import build_program, cached_program, foreign_runtime

    runtime = foreign_runtime("aarch64", log=print)
    exe = cached_program("aarch64", "gptbc-call")
    if not exe.is_file():
        build_program("aarch64", runtime, exe, log=print)
    return exe, [runtime.tvm_dir / "lib", runtime.ffi_dir / "lib"]


def cross_build(kernel, target, path: Path) -> Path:
    from tvm.support import cc

    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target)
    lib.export_library(str(path), fcompile=cc.cross_compiler(CXX))
    return path


def call(call_tool, lib: Path, cpu: str, args: list[np.ndarray], tmp: Path) -> subprocess.CompletedProcess:
    """Run lib's main(*args) under qemu as `cpu`; the last argument is the output, read back into args[-1]."""
    exe, lib_dirs = call_tool
    tvm.runtime.save_param_dict_to_file({str(i): tvm.runtime.tensor(a) for i, a in enumerate(args)}, str(tmp / "in"))
    done = subprocess.run([*qemu(cpu), "-E", "LD_LIBRARY_PATH=" + ":".join(map(str, lib_dirs)), str(exe), str(lib),
                           "main", str(tmp / "in"), str(tmp / "out")], capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        args[-1][...] = tvm.runtime.load_param_dict_from_file(str(tmp / "out"))[str(len(args) - 1)].numpy()
    return done


def instructions(kernel, target) -> str:
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target)
    return lib.mod.inspect_source("asm") if not lib.mod.imports else lib.mod.imports[0].inspect_source("asm")


def test_dotprod_targets_get_sdot_and_baseline_ones_do_not():
    assert ki.int8_isa(DOTPROD) == "sdot" and ki.int8_isa(tvm.target.Target(aarch64_target("neoverse-n1"))) == "sdot"
    assert ki.int8_isa(BASELINE) == "generic" and ki.int8_isa(tvm.target.Target(aarch64_target(None))) == "generic"
    for bits in (4, 8):
        assert "sdot" in instructions(ki.int8_matmul_cpu(256, 64, bits, "sdot", "float32", "float32", "float32"),
                                      DOTPROD)
        assert "sdot" not in instructions(ki.int8_matmul_cpu(256, 64, bits, ki.int8_isa(BASELINE), "float32",
                                                             "float32", "float32"), BASELINE)


@pytest.mark.parametrize("quant", ["q8f32_1", "q4f32_1", "q4f16_1"])
@pytest.mark.parametrize("k, n, bias, act", [(96, 40, False, None), (128, 72, True, "gelu_tanh"), (64, 8, True, "relu")])
def test_sdot_kernel_matches_the_integer_reference_under_qemu(quant, k, n, bias, act, call_tool, tmp_path):
    """tests/test_int8.py's odd shapes, row counts that reach every remainder of the 4-row tile and more rows
    than one chunk, an all-zero group, bias and both fused activations; weights repacked by the library's repack kernels
    (the same tiled layout on every CPU)."""
    q = get_quantization(quant)
    dtype = q.model_dtype
    rng = np.random.default_rng(k + n)
    packed, scale = quantize(rng.standard_normal((n, k)).astype(np.float32), q)
    w, s = (t.numpy() for t in repacked(packed, scale, q.bits))
    b = rng.standard_normal(n).astype(dtype) if bias else None
    lib = cross_build(ki.int8_matmul_cpu(k, n, q.bits, "sdot", dtype, dtype, dtype, bias, act), DOTPROD,
                      tmp_path / "kernel.so")
    for rows in (1, 3, 70):  # 70 rows: full 4-row tiles, a remainder of 2, two chunks (qemu time is the cost)
        x = (rng.standard_normal((1, rows, k)) * 3).astype(dtype)
        x[0, 0, :32] = 0  # a group with max |x| = 0 quantizes to zeros
        y = np.zeros((1, rows, n), dtype)
        done = call(call_tool, lib, "max", [x, w, s] + ([b] if bias else []) + [y], tmp_path)
        assert done.returncode == 0, done.stderr
        want = integer_reference(x, packed, scale, q.bits, b, act)
        err = np.abs(y.astype(np.float64) - want).max() / np.abs(want).max()
        assert err < (2e-3 if dtype == "float16" else 2e-6), f"{rows} rows: relative error {err:.1e}"


def test_baseline_build_runs_on_a_cortex_a72_and_the_sdot_build_does_not(call_tool, tmp_path):
    """The cortex-a72 build (generic kernel) computes the reference on a Cortex-A72; the dotprod build stops there
    with SIGILL, which shows the sdot instructions are the ones that run under -cpu max."""
    q = get_quantization("q4f32_1")
    k, n, rows = 96, 40, 5
    rng = np.random.default_rng(1)
    packed, scale = quantize(rng.standard_normal((n, k)).astype(np.float32), q)
    w, s = (t.numpy() for t in repacked(packed, scale, 4))
    x = rng.standard_normal((1, rows, k)).astype(np.float32)
    want = integer_reference(x, packed, scale, 4, None, None)
    for name, target, isa in (("baseline", BASELINE, "generic"), ("dotprod", DOTPROD, "sdot")):
        lib = cross_build(ki.int8_matmul_cpu(k, n, 4, isa, "float32", "float32", "float32"), target,
                          tmp_path / f"{name}.so")
        y = np.zeros((1, rows, n), np.float32)
        done = call(call_tool, lib, "cortex-a72", [x, w, s, y], tmp_path)
        if name == "baseline":
            assert done.returncode == 0, done.stderr
            assert np.abs(y - want).max() / np.abs(want).max() < 2e-6
        else:
            assert done.returncode == -4, (done.returncode, done.stderr)  # SIGILL: no dotprod on a Cortex-A72


def test_auto_activations_pick_int8_where_the_arm_cpu_has_dotprod():
    from gptbc.compile.compiler import choose_activations

    q4 = get_quantization("q4f32_1")
    assert choose_activations("auto", q4, DOTPROD).int8_activations
    assert not choose_activations("auto", q4, BASELINE).int8_activations
    assert choose_activations("int8", q4, BASELINE).int8_activations  # the generic kernel, on request


def test_trained_model_int8_bundle_equals_the_x86_int8_path(tmp_path):
    """The shipped trained model, q4f32_1 compiled for a Cortex-A76 (auto: int8 activations, sdot), bundled and
    run under qemu as a dotprod CPU, gives the greedy ids of the x86 int8 build in the Python engine: the int32
    group sums are exact on both and the float work around them is the same operations in the same order, so
    it meets the same accuracy thresholds (tests/test_quantization.py)."""
    import json

    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.bundle import library_metadata, make_bundle
    from gptbc.compile.compiler import compile_model
    from gptbc.runtime.engine import Engine
    from test_quantization import TRAINED

    out = convert_weight(TRAINED, "q4f32_1", tmp_path / "out", progress=False)
    arm = compile_model(resolve_model(str(out)), "aarch64-linux:cortex-a76", "q4f32_1", tmp_path / "arm.so",
                        log=lambda _m: None)
    assert library_metadata(arm, arm.read_bytes())["activations"] == "int8"
    host = compile_model(resolve_model(str(out)), "cpu", "q4f32_1", tmp_path / "host.so", log=lambda _m: None,
                         activations="int8")
    bundle, _ = make_bundle(out, arm, tmp_path / "bundle", log=lambda _m: None)
    engine = Engine(out, host, prefix_cache_size=0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        prompt = rng.integers(0, engine.config.vocab_size, 8).tolist()
        done = subprocess.run([*qemu("max"), str(bundle / "gptbc-run"), "--prompt-ids", ",".join(map(str, prompt)),
                               "--max-new-tokens", "64", "--json"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["token_ids"] == engine.generate(prompt, 64)
