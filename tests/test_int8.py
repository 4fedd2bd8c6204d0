"""int8 activations (issue 14): the integer dot-product kernel, the tiled weight layout and its repacking,
the instruction it is built for, and how the compiled model wires them (kernels_int8.py)."""

from __future__ import annotations

import dataclasses
import math
import platform
from pathlib import Path

import numpy as np
import pytest
import tvm

from gptbc.compile import kernels_int8 as ki
from gptbc.artifact.quantization import get_quantization, quantize, unpack_bits
from gptbc.compile.targets import host_cpu_target
from kernel_build import built

HOST = tvm.target.Target(host_cpu_target())  # this CPU, as `gptbc compile --target cpu` builds


def cpu_flags() -> set[str]:
    """This CPU's features as the kernel reports them (/proc/cpuinfo): a probe independent of the function under
    test (ki.int8_isa), so that an int8_isa that stopped seeing VNNI fails here instead of skipping the VNNI tests."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


FLAGS = cpu_flags()
VNNI_HERE = ("avx512_vnni" in FLAGS and "avx512vl" in FLAGS) or "avx_vnni" in FLAGS
VNNI512_HERE = {"avx512_vnni", "avx512bw", "avx512vl"} <= FLAGS


def build(func):
    return built(func.with_attr("global_symbol", "main"), HOST)


def tensor(a):
    return tvm.runtime.tensor(a)


def integer_reference(x: np.ndarray, packed: np.ndarray, scale: np.ndarray, bits: int, bias, act,
                      minimum: np.ndarray | None = None, high: np.ndarray | None = None, zero: int = 0) -> np.ndarray:
    """What the kernel computes, in numpy from the row layout: int8 rows per group (round half to even),
    exact integer group sums, scale products, then bias and activation; float64. With `minimum` (an affine
    layout's q_min): the nibbles are q itself (no offset) and each group adds min * sx * sum(xq); `high` (a 5- or
    6-bit layout's q_high) puts bits - 4 bits above each nibble; `zero` (the 6-bit layout): q - zero, a scale
    per 16."""
    m, k = x.shape[0] * x.shape[1], x.shape[2]
    groups = x.reshape(m, k // 32, 32).astype(np.float32)
    amax = np.abs(groups).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.rint(groups * inv[..., None]).astype(np.int64)
    if bits == 8:
        wq = packed.astype(np.int64)
    else:
        shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
        wq = ((packed[:, :, None] >> shifts) & np.uint32(15)).reshape(packed.shape[0], -1).astype(np.int64)
        if high is not None:
            wq = wq | (unpack_bits(high, bits - 4)[:, :k].astype(np.int64) << 4)
        wq = wq - zero if minimum is not None or high is not None else wq - 7
    n, per = wq.shape[0], 16 if zero else 32
    sums = np.einsum("mgj,ngj->mng", xq.reshape(m, k // per, per), wq.reshape(n, k // per, per))
    sx = np.repeat((amax / np.float32(127)).astype(np.float64), 32 // per, axis=-1)[:, None, :]
    y = (sums * sx * scale.astype(np.float32).astype(np.float64)[None]).sum(-1)
    if minimum is not None:
        y = y + (xq.sum(-1)[:, None, :] * sx * minimum.astype(np.float64)[None]).sum(-1)
    if bias is not None:
        y = y + bias.astype(np.float32)
    if act == "gelu_tanh":
        y = 0.5 * y * (1 + np.tanh(0.7978845608028654 * (y + 0.044715 * y ** 3)))
    elif act == "gelu_erf":
        y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
    elif act == "relu":
        y = np.maximum(y, 0)
    return y.reshape(*x.shape[:2], n)


def repacked(packed: np.ndarray, scale: np.ndarray, bits: int, layout: str = "dot", *more: np.ndarray):
    """The weights and scales (and `more`: an affine layout's q_min, scale-shaped, and q_high, uint32) as the
    runner hands them to the kernel: through the library's repack kernels (built for this machine: they are
    plain loops, the same on every CPU)."""
    out = []
    for a, kind in [(packed, ki.weight_repack(bits, layout)), (scale, "scale")] + [
            (a, f"high{bits - 4}" if a.dtype == np.uint32 else "scale") for a in more]:
        out.append(tensor(np.zeros_like(a)))
        build(ki.repack_kernel(kind, a.shape, str(a.dtype)))["main"](tensor(a), out[-1])
    return tuple(out)


def affine_layout(quant: str):
    """A scheme name, or "qk5"/"qk6": qkf32_a's 5- or 6-bit layout (what a Q5_K / Q6_K tensor converts to)."""
    if quant.startswith("qk"):
        return dataclasses.replace(get_quantization("qkf32_a"), widths=(("m", int(quant[2])),)).layout("m")
    return get_quantization(quant)


AVX2_HERE = "avx2" in FLAGS


@pytest.mark.skipif(not FLAGS, reason="no /proc/cpuinfo to probe this CPU independently")
def test_int8_isa_sees_what_the_cpu_has():
    """int8_isa (what `auto` and the kernels pick) against /proc/cpuinfo's flags (x86) or Features (aarch64)."""
    if platform.machine() in ("aarch64", "arm64"):
        want = "smmla" if "i8mm" in FLAGS else "sdot" if "asimddp" in FLAGS else "generic"
    else:
        want = "vnni512" if VNNI512_HERE else "vnni" if VNNI_HERE else "avx2" if AVX2_HERE else "generic"
    assert ki.int8_isa(HOST) == want, sorted(FLAGS)
ISAS = ["generic",
        pytest.param("avx2", marks=pytest.mark.skipif(not AVX2_HERE, reason="this CPU has no AVX2 to run it")),
        pytest.param("vnni", marks=pytest.mark.skipif(not VNNI_HERE, reason="this CPU has no VNNI "
                                                      "(AVX512-VNNI with VL, or AVX-VNNI) to run it")),
        pytest.param("vnni512", marks=pytest.mark.skipif(not VNNI512_HERE, reason="this CPU has no AVX512-VNNI "
                                                         "with BW and VL to run it"))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant", ["q8f32_1", "q4f32_1", "q4f16_1"])
@pytest.mark.parametrize("k, n, bias, act", [(96, 40, False, None), (128, 72, True, "gelu_tanh"), (64, 8, True, "relu")])
def test_kernel_matches_the_integer_reference(isa, quant, k, n, bias, act):
    """Odd shapes (3 groups; 5 and 9 blocks of 8 outputs, a task left partly empty), 1..70 rows (every
    remainder of the 4-row tile, the 512-bit kernels' 5- and 6-row tiles alone and after 4-row ones, more rows than
    one chunk), negative weights and activations, an all-zero group, bias and the fused activations."""
    check_against_integer_reference(isa, quant, k, n, bias, act)


@pytest.mark.parametrize("isa", ISAS)
def test_erf_gelu_epilogue_matches_the_integer_reference(isa):
    """The exact-erf GELU applied in each kernel (256- and 512-bit vectors) on the same odd shape as gelu_tanh."""
    check_against_integer_reference(isa, "q4f32_1", 128, 72, True, "gelu_erf")


def check_against_integer_reference(isa: str, quant: str, k: int, n: int, bias: bool, act: str | None) -> None:
    q = get_quantization(quant)
    dtype = q.model_dtype
    rng = np.random.default_rng(k + n)
    packed, scale = quantize(rng.standard_normal((n, k)).astype(np.float32), q)
    w, s = repacked(packed, scale, q.bits)
    b = rng.standard_normal(n).astype(dtype) if bias else None
    lib = build(ki.int8_matmul_cpu(k, n, q.bits, isa, dtype, dtype, dtype, bias, act))
    for rows in (1, 2, 3, 5, 6, 9, 10, 70):
        x = (rng.standard_normal((1, rows, k)) * 3).astype(dtype)
        x[0, 0, :32] = 0  # a group with max |x| = 0 quantizes to zeros
        y = tensor(np.zeros((1, rows, n), dtype))
        lib["main"](*([tensor(x), w, s] + ([tensor(b)] if bias else []) + [y]))
        want = integer_reference(x, packed, scale, q.bits, b, act)
        err = np.abs(y.numpy().astype(np.float64) - want).max() / np.abs(want).max()
        assert err < (2e-3 if dtype == "float16" else 2e-6), f"{rows} rows: relative error {err:.1e}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant", ["q4f32_a", "q4f16_a", "qk5", "qk6"])
@pytest.mark.parametrize("k, n, bias, act", [(96, 40, False, None), (128, 72, True, "gelu_tanh"), (64, 8, True, "relu")])
def test_affine_kernel_matches_the_integer_reference(isa, quant, k, n, bias, act):
    """The affine layouts: q4*_a and qk*_a's 5-bit one (w = scale * q + min per 32, q 0..15 or 0..31, its fifth
    bit in q_high) and 6-bit one (w = scale * (q - 32), a scale per 16, q's top 2 bits in q_high): the same odd
    shapes and row counts as above, with weights whose groups are all positive, all negative or mixed (mins of
    both signs, a zero scale), and every value bit set (Q4_0-like nibble 15, q 31 or 63); the bias in the
    activation dtype, scales and mins float32."""
    q = affine_layout(quant)
    dtype = q.model_dtype
    rng = np.random.default_rng(k + n + 1)
    weights = rng.standard_normal((n, k)).astype(np.float32)
    weights[0, :32] = np.abs(weights[0, :32]) + 1  # min > 0
    weights[1, 32:64] = -np.abs(weights[1, 32:64]) - 1  # max < 0
    weights[2, :32] = 0.25  # one value: scale 0, min 0.25
    packed, scale, *more = quantize(weights, q)
    packed[3, 0] = 0xFFFFFFFF  # nibble 15 throughout a word
    if q.high_bits:
        more[-1][3, 0] = 0xFFFFFFFF  # ... and every bit above it
    args = repacked(packed, scale, q.bits, "dot", *more)
    b = rng.standard_normal(n).astype(dtype) if bias else None
    lib = build(ki.int8_matmul_cpu(k, n, q.bits, isa, dtype, "float32", dtype, bias, act, q.has_min, q.zero))
    for rows in (1, 2, 3, 5, 6, 9, 10, 70):
        x = (rng.standard_normal((1, rows, k)) * 3).astype(dtype)
        x[0, 0, :32] = 0  # a group with max |x| = 0 quantizes to zeros
        y = tensor(np.zeros((1, rows, n), dtype))
        lib["main"](*([tensor(x), *args] + ([tensor(b)] if bias else []) + [y]))
        want = integer_reference(x, packed, scale, q.bits, b, act, more[0] if q.has_min else None,
                                 more[-1] if q.high_bits else None, q.zero)
        err = np.abs(y.numpy().astype(np.float64) - want).max() / np.abs(want).max()
        assert err < (2e-3 if dtype == "float16" else 2e-6), f"{rows} rows: relative error {err:.1e}"


@pytest.mark.parametrize("layout", ["dot", "mmla"])
@pytest.mark.parametrize("bits", [4, 8])
def test_repacking_follows_the_tiled_layout(bits, layout):
    """Every weight and scale lands where the layout's index functions (used by the TE reference) say: the
    "dot" layout of the x86 / sdot / generic kernels and the "mmla" one of the smmla kernel (kernels_arm.py)."""
    from gptbc.compile import kernels_arm as ka

    q = get_quantization("q4f32_1" if bits == 4 else "q8f32_1")
    n, k = 24, 96
    packed, scale = quantize(np.random.default_rng(bits).standard_normal((n, k)).astype(np.float32), q)
    w, s = repacked(packed, scale, bits, layout)
    flat_w, flat_s = w.numpy().reshape(-1), s.numpy().reshape(-1)
    for row in range(n):
        for col in range(k):
            if bits == 4:
                word, shift = (ka.mmla_int4 if layout == "mmla" else ki.tiled_int4)(row, col, k)
                got = (int(flat_w[word]) >> shift) & 15
                want = (int(packed[row, col // 8]) >> (4 * (col % 8))) & 15
            elif layout == "mmla":  # signed, as converted
                got = int(flat_w[ka.mmla_int8(row, col, k)])
                want = int(packed[row, col])
            else:
                got = int(flat_w.view(np.uint8)[ki.tiled_int8(row, col, k)]) - 128
                want = int(packed[row, col])
            assert got == want, (row, col)
        for g in range(k // 32):
            assert flat_s[ki.tiled_scale(row, g, k // 32)] == scale[row, g]


@pytest.mark.parametrize("bits", [5, 6])
def test_high_bits_repack_where_the_layout_says(bits):
    """A 5- or 6-bit weight's q_high lands in the planes high_plane_byte names (which the TE reference and the
    embedding's lookup read): bit (col % 32) // 4 of that byte is bit p of the value above its nibble."""
    q = affine_layout(f"qk{bits}")
    n, k = 16, 96
    packed, scale, *more = quantize(np.random.default_rng(bits).standard_normal((n, k)).astype(np.float32), q)
    high = more[-1]
    flat = repacked(packed, scale, bits, "dot", high)[2].numpy().reshape(-1).view(np.uint8)
    values = unpack_bits(high, bits - 4)
    for row in range(n):
        for col in range(k):
            got = sum(((int(flat[ki.high_plane_byte(row, col, k, bits - 4, p)]) >> (col % 32 // 4)) & 1) << p
                      for p in range(bits - 4))
            assert got == values[row, col], (row, col)


def test_targets_get_their_dot_product_instruction():
    """The instruction is chosen from the target's features, and is in the code built for them: 512-bit vpdpbusd
    where AVX-512 has VNNI (and BW/VL), 256-bit with AVX-VNNI alone, vpmaddubsw on AVX2."""
    x86 = lambda cpu: tvm.target.Target({"kind": "llvm", "mcpu": cpu})  # noqa: E731
    icelake, alderlake, haswell, baseline = x86("icelake-server"), x86("alderlake"), x86("haswell"), x86("x86-64")
    assert [ki.int8_isa(x86(cpu)) for cpu in ("icelake-server", "znver4", "znver5", "sapphirerapids")] == ["vnni512"] * 4
    assert ki.int8_isa(alderlake) == "vnni"  # AVX-VNNI, no AVX-512
    assert ki.int8_isa(x86("skylake-avx512")) == "avx2"  # AVX-512 without VNNI
    assert ki.int8_isa(haswell) == "avx2"
    assert ki.int8_isa(baseline) == "generic"
    assert ki.int8_isa(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})) == "generic"
    for bits in (4, 8):
        for target, want, absent in ((icelake, "vpdpbusd\t%zmm", "vpmaddubsw"), (alderlake, "vpdpbusd\t%ymm", "zmm"),
                                     (haswell, "vpmaddubsw", "vpdpbusd"), (baseline, None, "vpdpbusd")):
            kernel = ki.int8_matmul_cpu(256, 64, bits, ki.int8_isa(target), "float32", "float32", "float32")
            lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target)
            asm = lib.mod.inspect_source("asm") if not lib.mod.imports else lib.mod.imports[0].inspect_source("asm")
            assert (want is None or want in asm) and absent not in asm, (bits, str(target), want)


# qkf32_a with the widths of a Q4_K_M-like file: each affine layout in one model (the rest 6 bits)
MIXED = (("transformer.h.0.attn.c_attn", 5), ("transformer.h.0.mlp.c_fc", 4))


def exported(quant: str, activation: str = "gelu_pytorch_tanh", layout: str = "dot"):
    from gptbc.compile.compiler import export_relax
    from gptbc.artifact.config import GPTBigCodeConfig

    cfg = GPTBigCodeConfig(n_embd=64, n_head=2, n_layer=1, n_positions=64, vocab_size=72, n_inner=96,
                           activation_function=activation)
    q = dataclasses.replace(get_quantization(quant), int8_activations=True, int8_layout=layout)
    return export_relax(cfg, dataclasses.replace(q, widths=MIXED) if q.per_tensor else q, HOST)


def op_layout(func, quant: str):
    """The layout an int8_matmul op of a `quant` model reads, from its attributes (qk*_a mixes them)."""
    high = int(func.attrs["gptbc_high"])
    return affine_layout(f"qk{4 + high}") if quant.startswith("qk") else get_quantization(quant)


@pytest.mark.parametrize("quant", ["q4f32_1", "q8f16_1", "q4f32_a", "q4f16_a", "qkf32_a"])
def test_every_int8_op_of_a_model_equals_its_kernel(quant):
    """Each int8_matmul of an exported model (qkv with bias, fc with bias + GELU, the projections, the tied
    LM head without bias) computes the same as the kernel the pipeline swaps in, on random inputs (affine
    layouts: q_min and q_high among the op's parameters, as its attributes gptbc_affine and gptbc_high say;
    qkf32_a with 4-, 5- and 6-bit layers)."""
    mod, params, plan = exported(quant)
    swapped = ki.use_int8_kernels(mod, HOST, "dot")
    # the op at each call site against the kernel the swapped module calls there (one kernel serves every
    # entry point's op of the same shape: fewer kernels than ops, every call naming one that exists)
    kernel_of = dict(zip(called(mod), called(swapped), strict=True))
    kernels = {gv.name_hint for gv in swapped.functions if gv.name_hint.startswith("int8_matmul")}
    ops = {name for name in kernel_of if name.startswith("int8_matmul")}
    assert {kernel_of[name] for name in ops} == kernels and len(kernels) < len(ops)
    assert set(kernel_of.values()) <= {gv.name_hint for gv in swapped.functions}
    rng = np.random.default_rng(0)
    seen, widths, built = set(), set(), {}
    for gv, func in mod.functions.items():
        if not gv.name_hint.startswith("int8_matmul"):
            continue
        q = op_layout(func, quant)
        affine = bool(int(func.attrs["gptbc_affine"]))
        assert affine == q.has_min and int(func.attrs["gptbc_zero"]) == q.zero
        widths.add(q.bits)
        x, wbuf, sbuf, *bbuf, ybuf = func.params
        bbuf = bbuf[int(affine) + int(bool(q.high_bits)):]
        seen.add((bool(bbuf), str(func.attrs["gptbc_epilogue"])))
        k, n = int(x.shape[-1]), int(ybuf.shape[-1])
        rows = 1 if isinstance(x.shape[1], tvm.tirx.IntImm) else 6
        w, s, *mn = repacked(*(lambda p: (p[0], p[1], q.bits, "dot", *p[2:]))(
            quantize(rng.standard_normal((n, k)).astype(np.float32), q)))
        args = [tensor(rng.standard_normal((1, rows, k)).astype(str(x.dtype))), w, s, *mn]
        args += [tensor(rng.standard_normal(n).astype(str(bbuf[0].dtype)))] if bbuf else []
        kernel = kernel_of[gv.name_hint]
        if kernel not in built:  # one build per kernel: three entry points' ops share it
            built[kernel] = build(swapped[kernel])
        outs = []
        for lib in (build(func), built[kernel]):
            y = tensor(np.zeros((1, rows, n), str(ybuf.dtype)))
            lib["main"](*args, y)
            outs.append(y.numpy().astype(np.float64))
        err = np.abs(outs[0] - outs[1]).max() / np.abs(outs[0]).max()
        assert err < (2e-3 if q.model_dtype == "float16" else 1e-5), f"{gv.name_hint}: {err:.1e}"
    for part in (".q_min", ".q_high"):  # every q_min is repacked with its scales, every q_high as one
        assert {n for n in plan if n.endswith(part)} == {n for n, _, _ in params if n.endswith(part)}
    assert widths == ({4, 5, 6} if quant.startswith("qk") else {get_quantization(quant).bits})
    assert seen == {(True, ""), (True, "gelu_tanh"), (False, "")}  # qkv and projections, fc, the tied LM head


def called(mod) -> list[str]:
    """The function each call_tir of `mod`'s Relax functions names, in order."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    names = []
    for gv, func in sorted(mod.functions.items(), key=lambda item: item[0].name_hint):
        if isinstance(func, tvm.relax.Function):
            for block in func.body.blocks:
                names += [b.value.args[0].name_hint for b in block.bindings
                          if isinstance(b.value, tvm.relax.Call) and b.value.op.same_as(call_tir)]
    return names


@pytest.mark.parametrize("quant", ["q4f32_1", "q8f32_1", "q4f32_a"])
def test_mmla_layout_model_reads_its_weights_as_the_smmla_kernel_does(quant):
    """A model built for an i8mm CPU repacks its weights to the mmla layout, and its int8_matmul ops' reference
    (what the smmla kernel replaces; run here, it is plain TE) reads them as the integer reference does. With the
    embedding's lookup reading the same index functions (test_repacking_follows_the_tiled_layout), a model whose
    layers and repacking disagreed would fail here, on any CPU."""
    mod, params, plan = exported(quant, layout="mmla")
    assert {plan[n] for n in plan if n.endswith(".q_weight")} == {"int4_mmla" if "q4" in quant else "int8_mmla"}
    q = get_quantization(quant)
    rng = np.random.default_rng(1)
    for gv, func in mod.functions.items():
        if not gv.name_hint.startswith("int8_matmul"):
            continue
        x, wbuf, sbuf, *bbuf, ybuf = func.params
        bbuf = bbuf[1:] if q.kind == "affine" else bbuf  # q_min first
        k, n = int(x.shape[-1]), int(ybuf.shape[-1])
        packed, scale, *minimum = quantize(rng.standard_normal((n, k)).astype(np.float32), q)
        w, s, *mn = repacked(packed, scale, q.bits, "mmla", *minimum)
        rows = 1 if isinstance(x.shape[1], tvm.tirx.IntImm) else 3
        xs = rng.standard_normal((1, rows, k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32) if bbuf else None
        y = tensor(np.zeros((1, rows, n), np.float32))
        build(func)["main"](*([tensor(xs), w, s, *mn] + ([tensor(bias)] if bbuf else []) + [y]))
        want = integer_reference(xs, packed, scale, q.bits, bias, str(func.attrs["gptbc_epilogue"]) or None,
                                 *minimum)
        assert np.abs(y.numpy() - want).max() / np.abs(want).max() < 1e-5, gv.name_hint


def test_repack_plan_and_layers_agree():
    """Every tiled parameter gets a repack function, and only those; an untileable shape stays as converted."""
    _, params, plan = exported("q4f32_1")
    assert set(plan) == {n for n, _, _ in params if n.endswith((".q_weight", ".q_scale"))}
    assert {plan[n] for n in plan if n.endswith(".q_weight")} == {"int4"}
    from gptbc.compile.quantized_layers import tiled

    q = dataclasses.replace(get_quantization("q4f32_1"), int8_activations=True)
    assert tiled(q, 72, 64) and not tiled(q, 70, 64) and not tiled(q, 72, 48)
    assert not tiled(get_quantization("q4f32_1"), 72, 64)  # float activations: nothing tiled


def test_erf_gelu_runs_in_the_kernel():
    """Exact-erf GELU (HF "gelu": StarCoder-15B and its fine-tunes) is applied by the kernel before it stores its
    outputs, as gelu_tanh is: TVM's separate GELU op calls libm's erff per value (14% of a 9-row verify step)."""
    mod, _, _ = exported("q4f32_1", activation="gelu")
    epilogues = {str(f.attrs.get("gptbc_epilogue")) for gv, f in mod.functions.items()
                 if gv.name_hint.startswith("int8_matmul")}
    assert epilogues == {"", "gelu_erf"}
    assert not any("R.nn.gelu(" in f.script() for gv, f in mod.functions.items()
                   if not isinstance(f, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("lanes", [8, 16])
def test_epilogue_gelus_match_their_definitions(lanes):
    """The kernels' vectorized GELUs (rational tanh and erf, clamped) against math.erf / math.tanh from -12 to 12,
    both vector widths: within 1e-6 absolute everywhere (a wrong coefficient or clamp fails)."""
    from gptbc.compile.int8_base import EPILOGUES
    from tvm.script import tirx as T

    size = 4096
    x = np.linspace(-12, 12, size).astype(np.float32)
    erf = np.vectorize(math.erf)(x.astype(np.float64) / math.sqrt(2))
    want = {"gelu_erf": 0.5 * x * (1 + erf),
            "gelu_tanh": 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x.astype(np.float64) ** 3)))}
    for act, expected in want.items():
        @T.prim_func
        def apply(a: T.Buffer((size,), "float32"), b: T.Buffer((size,), "float32")):
            for i in T.serial(size // lanes):
                b[T.ramp(i * lanes, 1, lanes)] = EPILOGUES[act](a[T.ramp(i * lanes, 1, lanes)], lanes)

        out = tensor(np.zeros(size, np.float32))
        build(apply)["main"](tensor(x), out)
        assert np.abs(out.numpy() - expected).max() < 1e-6, act


def test_activation_option_errors():
    from gptbc.compile.compiler import choose_activations
    from gptbc.errors import GptbcError

    q4 = get_quantization("q4f32_1")
    assert choose_activations("int8", q4, HOST).int8_activations
    assert not choose_activations("float", q4, HOST).int8_activations
    assert choose_activations("auto", q4, HOST).int8_activations == VNNI_HERE
    assert not choose_activations("auto", get_quantization("q0f32"), HOST).int8_activations
    with pytest.raises(GptbcError, match=r"^--activations int8: only CPU targets .*\(target is cuda\)$"):
        choose_activations("int8", q4, tvm.target.Target({"kind": "cuda", "arch": "sm_80"}))
    with pytest.raises(GptbcError, match=r"^--activations int8: q0f32 has float weights"):
        choose_activations("int8", get_quantization("q0f32"), HOST)
    with pytest.raises(GptbcError, match=r"^--activations fp8: choose from auto, int8, float$"):
        choose_activations("fp8", q4, HOST)


def test_affine_activation_choices():
    """q4*_a gets int8 activations as the grouped schemes do, in the layout of the CPU's kernel (dot; mmla on an
    i8mm CPU); the per-tensor qk*_a too, in the dot layout everywhere (an i8mm CPU runs its sdot kernels)."""
    from gptbc.compile.compiler import choose_activations

    qa = get_quantization("q4f16_a")
    assert choose_activations("int8", qa, HOST).int8_activations
    assert choose_activations("auto", qa, HOST).int8_activations == VNNI_HERE
    sdot = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+dotprod"]})
    assert ki.int8_isa(sdot) == "sdot"
    chosen = choose_activations("auto", qa, sdot)
    assert chosen.int8_activations and chosen.int8_layout == "dot"
    v1 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1"})
    assert ki.int8_isa(v1) == "smmla"
    chosen = choose_activations("auto", qa, v1)
    assert chosen.int8_activations and chosen.int8_layout == "mmla"
    qk = get_quantization("qkf32_a")  # 4-, 5- and 6-bit layers: dot-layout kernels only, sdot on i8mm CPUs
    assert choose_activations("int8", qk, HOST).int8_activations
    assert choose_activations("auto", qk, HOST).int8_activations == VNNI_HERE
    chosen = choose_activations("auto", qk, v1)
    assert chosen.int8_activations and chosen.int8_layout == "dot"
    swapped = ki.use_int8_kernels(exported("qkf32_a")[0], v1, "dot")  # the sdot kernels, for an i8mm CPU
    assert all(f.attrs.get("tirx.is_scheduled") for gv, f in swapped.functions.items()
               if gv.name_hint.startswith("int8_matmul"))
