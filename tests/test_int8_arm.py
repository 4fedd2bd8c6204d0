"""The int8-activation kernels on aarch64 (sdot in kernels_int8.py, smmla in kernels_arm.py), executed under
qemu-aarch64: against the numpy integer reference of tests/test_int8.py as a CPU with dotprod and i8mm
(`-cpu max`); each build on the CPUs it must run on and must not (SIGILL: the instruction is really used); and
which kernel each Arm CPU gets. The kernels are cross-compiled, all cases of an instruction into one .so, and
called by gptbc-call (native/call_main.cc), itself cross-built against the aarch64 TVM runtime, all calls of one
qemu run in one process (loading the runtime under qemu is most of a small call's time). qemu proves the results,
not the speed."""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tvm

from aarch64_tools import CXX, qemu
from kernel_build import built_file
from gptbc.artifact.quantization import get_quantization, quantize
from gptbc.compile import kernels_int8 as ki
from gptbc.compile.targets import ARM_CPUS, aarch64_target, arm_cpu_features
from test_int8 import affine_layout, integer_reference, repacked

pytestmark = pytest.mark.aarch64
BASELINE = tvm.target.Target(aarch64_target("cortex-a72"))  # Armv8.0: the generic kernel
DOTPROD = tvm.target.Target(aarch64_target("cortex-a76"))  # Armv8.2 with dotprod: the sdot kernel
I8MM = tvm.target.Target(aarch64_target("neoverse-v1"))  # dotprod and i8mm: the smmla kernel
BUILT_FOR = {"generic": BASELINE, "sdot": DOTPROD, "smmla": I8MM}
SIGILL = -4


@dataclass(frozen=True)
class Case:
    """One kernel (quantization, k inputs, n outputs, bias, fused activation) and its weights in row layout;
    `exact`: integer activations with max |x| = 127 per group and unit scales, so every output is an integer
    below 2^24 that the kernel must produce exactly (its int32 group sums are exact)."""

    quant: str
    k: int
    n: int
    bias: bool
    act: str | None
    exact: bool = False

    @property
    def q(self):
        """The case's layout: a scheme's, or "qk5"/"qk6" for qk*_a's 5- or 6-bit one (test_int8.affine_layout)."""
        return affine_layout(self.quant)

    @property
    def dtype(self) -> str:
        return self.q.model_dtype

    def weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        q, rng = self.q, np.random.default_rng(self.k + self.n)
        bias = rng.standard_normal(self.n).astype(self.dtype) if self.bias else None
        if not self.exact:
            packed, scale, *_min = quantize(rng.standard_normal((self.n, self.k)).astype(np.float32), q)
            return packed, scale, bias
        scale = np.ones((self.n, self.k // 32), self.dtype)
        if q.bits == 8:
            return rng.integers(-127, 128, (self.n, self.k)).astype(np.int8), scale, bias
        nibbles = rng.integers(0, 15, (self.n, self.k // 8, 8)).astype(np.uint32)
        return (nibbles << (np.arange(8, dtype=np.uint32) * 4)).sum(-1, dtype=np.uint32), scale, bias

    def more(self) -> list[np.ndarray]:
        """An affine case's q_min and q_high, those its layout has, from the same draws as `weights`."""
        q, rng = self.q, np.random.default_rng(self.k + self.n)
        if q.kind != "affine":
            return []
        assert not self.exact
        if self.bias:
            rng.standard_normal(self.n)
        return list(quantize(rng.standard_normal((self.n, self.k)).astype(np.float32), q)[2:])

    def inputs(self, rows: int) -> np.ndarray:
        rng = np.random.default_rng(rows)
        if self.exact:
            x = rng.integers(-126, 127, (1, rows, self.k)).astype(self.dtype)
            x[..., ::32] = 127
            return x
        x = (rng.standard_normal((1, rows, self.k)) * 3).astype(self.dtype)
        x[0, 0, :32] = 0  # a group with max |x| = 0 quantizes to zeros
        return x

    @property
    def function(self) -> str:
        """The kernel's name in a library of cases (exact data shares its kernel)."""
        return f"{self.quant}_{self.k}x{self.n}_{self.bias:d}_{self.act}"

    def kernel(self, isa: str):
        q = self.q
        return ki.int8_matmul_cpu(self.k, self.n, q.bits, isa, self.dtype, q.scale_dtype, self.dtype, self.bias,
                                  self.act, q.has_min, q.zero)


# tests/test_int8.py's odd shapes (3 groups; 5 and 9 blocks of 8 outputs, a task left partly empty; 1 block), each
# with int8 and int4 weights, bias and both fused activations, float16 twice; and exact data for each weight width
# (the same kernels as the first two: a kernel is 4 s of TVMScript parsing, most of these tests' time)
CASES = [Case("q8f32_1", 96, 40, False, None), Case("q4f32_1", 96, 40, False, None),
         Case("q8f32_1", 128, 72, True, "gelu_tanh"), Case("q4f16_1", 128, 72, True, "gelu_erf"),
         Case("q8f16_1", 64, 8, True, "relu"), Case("q4f32_1", 64, 8, True, "relu"),
         Case("q8f32_1", 96, 40, False, None, exact=True), Case("q4f32_1", 96, 40, False, None, exact=True),
         Case("q4f32_a", 96, 40, False, None), Case("q4f16_a", 128, 72, True, "gelu_tanh")]  # scale and min per 32
# qk*_a's 5- and 6-bit layouts: the dot layout only (an i8mm CPU runs them with sdot), so sdot's cases alone
DOT_CASES = [Case("qk5", 128, 72, True, "gelu_tanh"), Case("qk6", 96, 40, False, None)]
CASES_OF = {"sdot": CASES + DOT_CASES, "smmla": CASES}
ROWS = (1, 3, 70)  # one row (decode), an odd count (smmla pairs the last row with zeros), more than a row chunk


@pytest.fixture(scope="module")
def call_tool():
    """(gptbc-call for aarch64, the folders of its TVM libraries): built once, cached like a bundle's gptbc-run."""
    from gptbc.bundle import foreign_runtime, native_program

    runtime = foreign_runtime("aarch64", log=print)
    exe = native_program("aarch64", runtime, log=print, name="gptbc-call")
    return exe, [runtime.tvm_dir / "lib", runtime.ffi_dir / "lib"]


def cross_build(kernels: dict, target) -> Path:
    """An aarch64 .so of {function name: kernel} (through the artifact cache: kernel_build)."""
    mod = tvm.IRModule({name: k.with_attr("global_symbol", name) for name, k in kernels.items()})
    return built_file(mod, target, CXX)


def call(call_tool, lib: Path, cpu: str, calls: list[tuple[str, list[np.ndarray]]],
         tmp: Path) -> subprocess.CompletedProcess:
    """Run each (function, args) of lib under qemu as `cpu`, in one process; each call's last argument is its
    output, read back into that array."""
    exe, lib_dirs = call_tool
    argv = []
    for i, (func, args) in enumerate(calls):
        tvm.runtime.save_param_dict_to_file({str(j): tvm.runtime.tensor(a) for j, a in enumerate(args)},
                                            str(tmp / f"in{i}"))
        argv += [func, str(tmp / f"in{i}"), str(tmp / f"out{i}")]
    done = subprocess.run([*qemu(cpu), "-E", "LD_LIBRARY_PATH=" + ":".join(map(str, lib_dirs)), str(exe), str(lib),
                           *argv], capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        for i, (_func, args) in enumerate(calls):
            args[-1][...] = tvm.runtime.load_param_dict_from_file(str(tmp / f"out{i}"))[str(len(args) - 1)].numpy()
    return done


@functools.lru_cache(maxsize=None)  # each repack is a host build
def repacked_weights(case: Case, layout: str) -> tuple[np.ndarray, ...]:
    """The case's weights and scales (and an affine case's mins) repacked by the library's own repack kernels into
    `layout`."""
    packed, scale, _bias = case.weights()
    return tuple(t.numpy() for t in repacked(packed, scale, case.q.bits, layout, *case.more()))


def case_calls(isa: str, cases: list[Case]) -> list[tuple[Case, int, list[np.ndarray]]]:
    """(case, rows, kernel arguments with a zeroed output) for each case and row count, in the layout `isa` reads."""
    out = []
    for case in cases:
        w, s, *mn = repacked_weights(case, ki.int8_layout(isa))
        bias = case.weights()[2]
        for rows in ROWS:
            args = [case.inputs(rows), w, s, *mn] + ([bias] if case.bias else [])
            out.append((case, rows, args + [np.zeros((1, rows, case.n), case.dtype)]))
    return out


@pytest.fixture(scope="module")
def kernel_runs(call_tool, tmp_path_factory):
    """kernel_runs(isa) → (its .so holding every case's kernel, [(case, rows, args with the output filled)]), run
    once under `-cpu max` (dotprod and i8mm)."""
    runs = {}

    def get(isa: str):
        if isa not in runs:
            tmp = tmp_path_factory.mktemp(isa)
            lib = cross_build({case.function: case.kernel(isa) for case in CASES_OF[isa]}, BUILT_FOR[isa])
            calls = case_calls(isa, CASES_OF[isa])
            done = call(call_tool, lib, "max", [(case.function, args) for case, _rows, args in calls], tmp)
            assert done.returncode == 0, done.stderr
            runs[isa] = lib, calls
        return runs[isa]

    return get


@pytest.mark.parametrize("isa", ["sdot", "smmla"])
def test_kernel_matches_the_integer_reference_under_qemu(isa, kernel_runs):
    for case, rows, args in kernel_runs(isa)[1]:
        y, want = args[-1].astype(np.float64), reference(case, args[0])
        if case.exact:
            assert np.array_equal(y, want), f"{case}, {rows} rows: not the exact integer sums"
        else:
            err = np.abs(y - want).max() / np.abs(want).max()
            assert err < (2e-3 if case.dtype == "float16" else 2e-6), f"{case}, {rows} rows: relative error {err:.1e}"


def test_smmla_and_sdot_kernels_give_the_same_bits(kernel_runs):
    """The same int32 group sums and the same float epilogue, operation for operation: equal outputs, not close
    (the cases both have: sdot's list ends with its dot-layout-only ones)."""
    for (case, rows, a), (_, _, b) in zip(kernel_runs("sdot")[1], kernel_runs("smmla")[1]):
        assert np.array_equal(a[-1], b[-1]), f"{case}, {rows} rows"


def reference(case: Case, x: np.ndarray) -> np.ndarray:
    packed, scale, bias = case.weights()
    q, more = case.q, case.more()
    return integer_reference(x, packed, scale, q.bits, bias, case.act, more[0] if q.has_min else None,
                             more[-1] if q.high_bits else None, q.zero)


def instructions(kernels: list, target) -> str:
    mod = tvm.IRModule({f"k{i}": k.with_attr("global_symbol", f"k{i}") for i, k in enumerate(kernels)})
    lib = tvm.compile(mod, target=target)
    return lib.mod.inspect_source("asm") if not lib.mod.imports else lib.mod.imports[0].inspect_source("asm")


def test_each_arm_cpu_gets_the_kernel_of_its_features():
    """smmla where LLVM gives the CPU i8mm, sdot where it has dotprod only, the generic kernel on Armv8.0: a
    CPU that got a kernel it cannot run (SIGILL on the board), or a slower one than it can, fails here."""
    want = {"generic": "generic", "cortex-a72": "generic", "cortex-a76": "sdot", "neoverse-n1": "sdot",
            "neoverse-v1": "smmla", "neoverse-v2": "smmla"}
    for cpu in ["generic", *ARM_CPUS]:
        features = arm_cpu_features(cpu)
        isa = ki.int8_isa(tvm.target.Target(aarch64_target(cpu)))
        assert isa == ("smmla" if "i8mm" in features else "sdot" if "dotprod" in features else "generic"), cpu
        assert want.get(cpu, isa) == isa, cpu


def test_builds_hold_the_instruction_of_their_cpu():
    """smmla in i8mm builds and in no dotprod-only one (cortex-a76, neoverse-n1), sdot in those, neither in a
    cortex-a72 build; int8 and int4 weights (kernels the other tests parse too)."""
    for cpu, present, absent in (("neoverse-v1", ["smmla"], []), ("cortex-a76", ["sdot"], ["smmla"]),
                                 ("neoverse-n1", ["sdot"], ["smmla"]), ("cortex-a72", [], ["sdot", "smmla"])):
        target = tvm.target.Target(aarch64_target(cpu))
        asm = instructions([case.kernel(ki.int8_isa(target)) for case in CASES[:2]], target)
        assert all(i in asm for i in present) and not any(i in asm for i in absent), cpu


def test_each_build_runs_on_its_cpu_and_stops_on_a_lesser_one(call_tool, kernel_runs, tmp_path):
    """The sdot build computes the reference on a Cortex-A76 and the generic one on a Cortex-A72; the smmla build
    stops with SIGILL on the Cortex-A76 (no i8mm) and the sdot build on the Cortex-A72 (no dotprod), which shows
    those instructions are the ones that ran under -cpu max."""
    case = CASES[0]
    libs = {"generic": cross_build({case.function: case.kernel("generic")}, BASELINE),
            "sdot": kernel_runs("sdot")[0], "smmla": kernel_runs("smmla")[0]}
    for isa, cpu, runs in (("generic", "cortex-a72", True), ("sdot", "cortex-a76", True),
                           ("sdot", "cortex-a72", False), ("smmla", "cortex-a76", False)):
        _, _rows, args = case_calls(isa, [case])[-1]  # the most rows
        done = call(call_tool, libs[isa], cpu, [(case.function, args)], tmp_path)
        if runs:
            assert done.returncode == 0, (isa, cpu, done.stderr)
            want = reference(case, args[0])
            assert np.abs(args[-1] - want).max() / np.abs(want).max() < 2e-6, (isa, cpu)
        else:
            assert done.returncode == SIGILL, (isa, cpu, done.returncode, done.stderr)


def test_auto_activations_pick_int8_and_the_layout_of_the_arm_cpu():
    from gptbc.compile.compiler import choose_activations

    q4 = get_quantization("q4f32_1")
    for target, layout in ((DOTPROD, "dot"), (I8MM, "mmla")):
        for q in (q4, get_quantization("q4f16_a")):
            chosen = choose_activations("auto", q, target)
            assert chosen.int8_activations and chosen.int8_layout == layout, (str(target), q.name)
    assert not choose_activations("auto", q4, BASELINE).int8_activations
    forced = choose_activations("int8", q4, BASELINE)  # the generic kernel, on request
    assert forced.int8_activations and forced.int8_layout == "dot"


def test_trained_model_i8mm_bundle_equals_the_x86_int8_path(tmp_path):
    """The shipped trained model, q4f32_1 compiled for a Neoverse-V1 (auto: int8 activations, smmla, weights
    repacked to the mmla layout), bundled and run under qemu as a CPU with i8mm, gives the greedy ids of the x86
    int8 build in the Python engine: the int32 group sums are exact on both and the float work around them is the
    same operations in the same order, so it meets the same accuracy thresholds (tests/test_quantization.py).
    On a Neoverse-N1 (dotprod, no i8mm) the same bundle stops with SIGILL: the model runs the smmla kernel."""
    import json

    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.artifact.manifest import library_metadata_of
    from gptbc.bundle import make_bundle
    from gptbc.compile.compiler import compile_model
    from gptbc.runtime.engine import Engine
    from test_quantization import TRAINED

    out = convert_weight(TRAINED, "q4f32_1", tmp_path / "out", progress=False)
    arm = compile_model(resolve_model(str(out)), "aarch64-linux:neoverse-v1", "q4f32_1", tmp_path / "arm.so",
                        log=lambda _m: None)
    meta = library_metadata_of(arm)
    assert meta["activations"] == "int8"
    kinds = {p["repack"].split("_")[2] for p in meta["params"] if p.get("repack") and p["name"].endswith(".q_weight")}
    assert kinds == {"mmla"}  # repack_int4_mmla_<shape>_<dtype>
    host = compile_model(resolve_model(str(out)), "cpu", "q4f32_1", tmp_path / "host.so", log=lambda _m: None,
                         activations="int8")
    bundle, _ = make_bundle(out, arm, tmp_path / "bundle", log=lambda _m: None)
    engine = Engine(out, host, prefix_cache_size=0)
    rng = np.random.default_rng(0)

    def run(cpu: str, prompt: list[int]) -> subprocess.CompletedProcess:
        return subprocess.run([*qemu(cpu), str(bundle / "gptbc-run"), "--prompt-ids", ",".join(map(str, prompt)),
                               "--max-new-tokens", "64", "--json"], capture_output=True, text=True, timeout=300)

    for _ in range(3):
        prompt = rng.integers(0, engine.config.vocab_size, 8).tolist()
        done = run("max", prompt)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["token_ids"] == engine.generate(prompt, 64)
    assert run("neoverse-n1", [1, 2, 3]).returncode == SIGILL
