"""Integer dot-product matmul for grouped-int weights on CPUs (int8 activations; issue 14).

    y[m, n] = sum_g sw[n, g] * sx[m, g] * sum_{j in g} xq[m, j] * wq[n, j]

Each row of x is quantized to int8 per group of 32 (sx = max|x[group]| / 127, xq = round(x / sx)) once per
call; a group's int8 x int8 products are summed exactly in int32 and the scale product is applied once per
group, as llama.cpp does for q8_0/q4_0. layers.int8_matmul is the same computation in TE (the reference;
schedules.CPUInt8Matmul swaps this kernel in for it).

The instruction is VNNI's vpdpbusd: in each int32 lane, 4 unsigned bytes times 4 signed bytes, summed (on
AVX2 without VNNI the same sums take vpmaddubsw + vpmaddwd; on aarch64 with dotprod, sdot on each 128-bit half,
signed bytes times signed bytes; elsewhere plain int32 arithmetic). aarch64 with i8mm gets a kernel of its own
(smmla, kernels_arm.py), with its own "mmla" weight layout; everything else reads the "dot" layout below.
The lanes are 8 *outputs*: one instruction multiplies 4 consecutive columns of 8 weight rows by the same
4 activations (broadcast), so a group of 32 columns is 8 instructions into one int32 accumulator per
(row, 8 outputs), then one convert and one multiply-add with the 8 outputs' scales — no horizontal sums,
and the weight bytes need no shuffling because the converted weights are *repacked* once when a model is
loaded (`repack_*`, run by the runner) into this order ("tiled" layout):

    block b = outputs 8b .. 8b + 7, group g: int4: 128 bytes = 4 chunks of 32: chunk c, byte 4 o + t holds
    column 4c + t of output 8b + o (low nibble) and column 4(c + 4) + t (high nibble); int8: 256 bytes =
    8 chunks of 32, chunk c byte 4 o + t = column 4c + t of output 8b + o, stored + 128 (unsigned);
    scales: 8 per (b, g), in output order.

Weights are the unsigned operand (int4 nibbles are wq + 7; int8 are stored wq + 128), so each lane computes
sum((wq + offset) * xq) and starts from -offset * sum(xq) of the group, which depends on the activations
only and is computed once per row in the quantization pass (`nsum`).

The affine 4-bit weights of q4*_a (w = scale * q + min per group of 32, q the stored nibble 0..15; GGUF Q4_0/Q4_1/
Q4_K, asymmetric GPTQ/AWQ) take the same tiles with `affine`: the nibbles are repacked as int4 ones, the lanes start
from 0 (there is no offset: q itself is the unsigned operand), `nsum` holds sum(xq), and each group adds
min * sx * sum(xq) in float after the scale product, from a q_min tiled like the scales (a third parameter):

    y[m, n] = sum_g sx[m, g] * (scale[n, g] * sum_{j in g} xq[m, j] q[n, j] + min[n, g] * sum_{j in g} xq[m, j])

qk*_a's wider affine layouts (quantization.py) keep their low 4 bits in the same int4 tiles, and the bits above them
in a tiled q_high of `high` (1 or 2) planes per (block, group), 32 bytes each, laid out as the nibble chunks:

    plane p, byte 4 o + t: bit c (c = 0..7) = bit p of the high bits of column 4c + t of output 8b + o

so one 32-byte load per plane gives, for chunk c, the high bits of both of its nibble vectors (bits c and c + 4),
which a shift and mask put at bit 4 + p: the unsigned operand is then q itself (0..31 or 0..63; AVX2's
vpmaddubsw pairs stay below int16's limit). The 5-bit layout (scale and min per 32) is otherwise `affine`; the
6-bit one (`zero`: w = scale * (q - 32), a scale per 16) keeps two int32 dots per group of 32 — columns 0..15
are the low nibbles, 16..31 the high ones — each starting from -32 * sum(xq) over its 16 inputs and taking its
own scale.

With AVX512-VNNI (`vnni512`: Zen 4 and 5, Ice Lake and later Xeons) the same tiles run on 512-bit vectors: a vector
holds two consecutive blocks (16 outputs), its weight bytes two 32-byte loads side by side, so the layout and the
repacking are the same for both widths and a tile of 4 rows x 32 outputs needs 16 accumulators instead of 32 (the
256-bit tile spills). A model with an odd count of blocks does its last one in 256-bit vectors. On Zen 4, which
splits a 512-bit instruction in two, that measured 5-9% faster in prefill (fewer instructions, no spills); on cores
that run 512 bits at full width it is what lets vpdpbusd reach their peak.

Work is tiled as ROWS rows x BLOCKS blocks of accumulators (int32 and float32 vectors) in registers: each
unpacked weight vector serves ROWS rows and each activation broadcast BLOCKS blocks, so a step over many
rows (batched decode, verification, prefill) costs far less than rows x one row. With 512-bit vectors the rows of a
chunk that leave 1 or 2 over a multiple of ROWS end in one tile of 5 or 6 rows (24 accumulators still fit), so the
weights are not walked and unpacked again for one or two rows (a verify of 4 drafts is 5 rows). Tasks over output blocks
run in parallel; rows run in chunks whose quantized activations stay in L2 while a task's weights stay in L1.
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from gptbc.compile.int8_base import EPILOGUES, GROUP, LANES, TASK_BLOCKS, entry_points, tileable  # noqa: F401

# register tile: ROWS rows x BLOCKS blocks (4 x 32 outputs; row_tiles spells out remainders of 1..3 rows), and
# blocks per parallel task (64 outputs). Measured on Zen 4 (2 threads, q4 2048 -> 8192): against 4 x 16 tiles and
# 32-output tasks, one row 5% and 512 rows 7% faster, though 4 x 4 int32 + float accumulators exceed the registers.
ROWS, BLOCKS = 4, 4
# vnni512 runs the same 4 x 32 outputs as 4 x 2 512-bit vectors (16 accumulators: no spills); 6 or 8 rows measured
# no better on Zen 4 (2 threads, q4 2048 -> 8192 and back, 16 and 512 rows)
ROW_CHUNK = 64  # rows whose quantized activations stay in L2 while a task walks its outputs


def int8_isa(target) -> str:
    """'vnni512' where the target has AVX512-VNNI with BW and VL (vpdpbusd and the byte work on 512-bit vectors:
    Zen 4 and 5, Ice Lake and later Xeons), 'vnni' where only a 256-bit vpdpbusd (AVX-VNNI: Alder Lake...), 'avx2' for
    vpmaddubsw + vpmaddwd, on aarch64 'smmla' with the i8mm extension (neoverse-v1, apple-m2...) and 'sdot' with
    dotprod only (Armv8.2+: cortex-a76, neoverse-n1...), else 'generic' (int32 multiply-adds, vectorized as LLVM
    can: correct everywhere, fast nowhere)."""
    from tvm.target import codegen

    if target is None or target.kind.name != "llvm":
        return "generic"
    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    has = lambda f: bool(codegen.target_has_features(f, target))  # noqa: E731
    try:
        if triple.startswith(("aarch64", "arm64")):
            return "smmla" if has("i8mm") else "sdot" if has("dotprod") else "generic"
        if has("avx512vnni") and has("avx512bw") and has("avx512vl"):
            return "vnni512"
        if (has("avx512vnni") and has("avx512vl")) or has("avxvnni"):
            return "vnni"
        if has("avx2"):
            return "avx2"
    except Exception:  # noqa: BLE001 - LLVM knows none of these features for this target
        pass
    return "generic"


def int8_layout(isa: str) -> str:
    """The weight layout the kernel for `isa` reads: "mmla" for smmla (kernels_arm.py), else "dot"."""
    return "mmla" if isa == "smmla" else "dot"


def tiled_int4(n, k, in_features: int):
    """(word index in the flat uint32 array, bit shift) of int4 weight (n, k) in the tiled layout."""
    groups = in_features // GROUP
    q = k % GROUP // 4
    byte = ((n // LANES * groups + k // GROUP) * 128 + q % 4 * 32 + n % LANES * 4 + k % 4)
    return byte // 4, byte % 4 * 8 + q // 4 * 4


def tiled_int8(n, k, in_features: int):
    """Byte index in the flat int8 array of int8 weight (n, k) in the tiled layout."""
    groups = in_features // GROUP
    return (n // LANES * groups + k // GROUP) * 256 + k % GROUP // 4 * 32 + n % LANES * 4 + k % 4


def tiled_scale(n, g, groups: int):
    """Index in the flat scale array of the scale of (output n, group g) in the tiled layout."""
    return (n // LANES * groups + g) * LANES + n % LANES


def _flat(index, cols: int):
    return index // cols, index % cols


def tiled_dequant(w, s, n, k, in_features: int, bits: int, layout: str = "dot", mins=None, highs=None,
                  zero: int = 0):
    """float32 value of weight (n, k) read from tiled (w, s) in TE (layers' reference semantics), in the
    "dot" layout or kernels_arm's "mmla" one (its int8 values are stored signed, as converted). With `mins`
    (an affine weight's tiled q_min): value * scale + min, as quantized_layers._dequant; with `zero` (the 6-bit
    affine layout, a scale per 16): (value - zero) * scale. `highs`: a 5- or 6-bit weight's tiled q_high,
    whose bits (bits - 4 per value) go above the nibble."""
    from gptbc.compile import kernels_arm

    groups = in_features // GROUP
    halves = 2 if zero else 1
    scale = tirx.Cast("float32", s[_flat(tiled_scale(n, k // (GROUP // halves), groups * halves), groups * halves)])
    if bits == 8 and layout == "mmla":
        return tirx.Cast("float32", w[_flat(kernels_arm.mmla_int8(n, k, in_features), in_features)]) * scale
    if bits == 8:
        stored = w[_flat(tiled_int8(n, k, in_features), in_features)]
        return tirx.Cast("float32", tirx.Cast("int32", tirx.reinterpret("uint8", stored)) - 128) * scale
    word, shift = (kernels_arm.mmla_int4 if layout == "mmla" else tiled_int4)(n, k, in_features)
    value = (w[_flat(word, in_features // 8)] >> tirx.Cast("uint32", shift)) & tirx.const(15, "uint32")
    for p in range(bits - 4 if bits in (5, 6) else 0):
        byte = high_plane_byte(n, k, in_features, bits - 4, p)
        bit = (highs[_flat(byte // 4, in_features * (bits - 4) // 32)] >> tirx.Cast("uint32", byte % 4 * 8 + k % GROUP // 4)
               ) & tirx.const(1, "uint32")
        value = value | (bit << tirx.const(4 + p, "uint32"))
    if zero:
        return (tirx.Cast("float32", value) - float(zero)) * scale
    if mins is not None:
        return tirx.Cast("float32", value) * scale + mins[_flat(tiled_scale(n, k // GROUP, groups), groups)]
    return (tirx.Cast("float32", value) - 7.0) * scale


def high_plane_byte(n, k, in_features: int, high: int, plane):
    """Byte index, in the flat uint8 view of a tiled q_high, of plane `plane` (of `high`) for weight (n, k): bit
    (k % 32) // 4 of that byte is the weight's (module docstring)."""
    groups = in_features // GROUP
    return ((n // LANES * groups + k // GROUP) * high + plane) * 32 + n % LANES * 4 + k % 4


# ---- load-time repacking: row layout (quantization/__init__.py) -> tiled ----

def repack_int4(n: int, k: int):
    """uint32 [n, k / 8] rows -> the same shape, tiled."""
    words = k // 8

    @T.prim_func(private=True)
    def repack(src: T.Buffer((n, words), "uint32"), dst: T.Buffer((n, words), "uint32")):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((n * words * 4,), "uint8", data=dst.data)
        for b in T.parallel(n // LANES):
            for g, c, o, t in T.grid(k // GROUP, 4, LANES, 4):
                lo = (src[b * LANES + o, (g * GROUP + c * 4 + t) // 8] >> T.uint32((c * 4 + t) % 8 * 4)) & T.uint32(15)
                hi = (src[b * LANES + o, (g * GROUP + c * 4 + 16 + t) // 8] >> T.uint32((c * 4 + 16 + t) % 8 * 4)) & T.uint32(15)
                flat[(b * (k // GROUP) + g) * 128 + c * 32 + o * 4 + t] = T.Cast("uint8", lo | (hi << T.uint32(4)))

    return repack


def repack_int8(n: int, k: int):
    """int8 [n, k] rows -> the same shape, tiled, + 128 (read as unsigned)."""

    @T.prim_func(private=True)
    def repack(src: T.Buffer((n, k), "int8"), dst: T.Buffer((n, k), "int8")):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((n * k,), "int8", data=dst.data)
        for b in T.parallel(n // LANES):
            for g, c, o, t in T.grid(k // GROUP, 8, LANES, 4):
                flat[(b * (k // GROUP) + g) * 256 + c * 32 + o * 4 + t] = src[b * LANES + o, g * GROUP + c * 4 + t] ^ T.int8(-128)

    return repack


def repack_scale(n: int, groups: int, dtype: str):
    """Scales [n, groups] -> the same shape, tiled (8 outputs of a group side by side)."""

    @T.prim_func(private=True)
    def repack(src: T.Buffer((n, groups), dtype), dst: T.Buffer((n, groups), dtype)):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((n * groups,), dtype, data=dst.data)
        for b in T.parallel(n // LANES):
            for g, o in T.grid(groups, LANES):
                flat[(b * groups + g) * LANES + o] = src[b * LANES + o, g]

    return repack


def repack_high(n: int, k: int, high: int):
    """q_high uint32 [n, k * high / 32] rows (each value's `high` bits, little-end-first) -> the same shape, tiled:
    per (block, group) `high` planes of 32 bytes, byte 4 o + t of plane p holding bit p of columns 4 c + t
    (c = 0..7, at bit c) of output 8 b + o."""
    words = k * high // 32

    @T.prim_func(private=True)
    def repack(src: T.Buffer((n, words), "uint32"), dst: T.Buffer((n, words), "uint32")):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((n * words * 4,), "uint8", data=dst.data)
        for b in T.parallel(n // LANES):
            for g, p, o, t in T.grid(k // GROUP, high, LANES, 4):
                byte = T.alloc_buffer((1,), "uint32")
                byte[0] = T.uint32(0)
                for c in T.serial(8):
                    j = (g * GROUP + c * 4 + t) * high + p  # the bit's place in the row's bit stream
                    byte[0] = byte[0] | (((src[b * LANES + o, j // 32] >> T.Cast("uint32", j % 32)) & T.uint32(1))
                                         << T.Cast("uint32", c))
                flat[((b * (k // GROUP) + g) * high + p) * 32 + o * 4 + t] = T.Cast("uint8", byte[0])

    return repack


# ---- the matmul ----

@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; a model has a few distinct shapes
@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; libraries share shapes
def int8_matmul_cpu(k: int, n: int, bits: int, isa: str, x_dtype: str, scale_dtype: str, out_dtype: str,
                    bias: bool = False, act: str | None = None, affine: bool = False, zero: int = 0):
    """y (b, s, n) = act(x (b, s, k) @ W.T + bias) for tiled grouped-int W (q8: int8 [n, k]; q4: uint32
    [n, k / 8]) and tiled scales [n, k / 32]; activations quantized to int8 per group inside (module
    docstring). `bias` adds a parameter (n,) in the scale dtype; `act` is None or one of EPILOGUES, applied
    to each finished vector of 8 outputs (a separate elementwise kernel cost prefill 19% of its time).

    `affine`: the weight is an affine layout's with a min (quantization.py), w = scale * q + min per group of
    32, q unsigned: the nibble (bits 4) or, for bits 5, the nibble and its fifth bit from a q_high parameter
    after the q_min one [n, k / 32] (both tiled: module docstring); the bias is in x's dtype. Each group's
    integer dot is then sum(xq * q) (no offset to undo) and the group adds min * sx * sum(xq) in float: `nsum`
    holds sum(xq) itself. `zero` (bits 6, no min): w = scale * (q - zero) with one scale per 16 inputs: each
    half-group's dot starts from -zero * sum(xq) over its 16 inputs and takes its own scale."""
    if isa == "smmla":  # its own tiles and layout
        from gptbc.compile.kernels_arm import int8_matmul_mmla

        assert bits in (4, 8) and not zero
        return int8_matmul_mmla(k, n, bits, x_dtype, scale_dtype, out_dtype, bias, act, affine)
    assert act in (None, *EPILOGUES)
    assert tileable(n, k) and (bits in (4, 8) if not (affine or zero) else bits == 6 if zero else bits in (4, 5))
    nibbles = bits != 8  # 4-, 5- and 6-bit values keep their low 4 bits in the int4 tiles
    high = bits - 4 if nibbles else 0  # bits per value in the q_high planes
    halves = 2 if zero else 1  # scales per group of 32 inputs
    halved, wide = zero > 0, high > 0  # bools for the macros' ifs (an int there is refused)
    groups = k // GROUP
    blocks = n // LANES
    chunks = 4 if nibbles else 8  # 32-byte weight vectors per (block, group)
    per_block = chunks * 32  # weight bytes per (block, group)
    offset = 0 if affine or zero else 7 if bits == 4 else 128
    bias_dtype = x_dtype if affine or zero else scale_dtype
    tasks = -(-blocks // TASK_BLOCKS)
    if isa in ("avx2", "sdot") and bits == 8:  # these dots take signed weights (below): no offset to undo
        offset = 0
    start = 1 if affine else -(zero or offset)  # nsum = start * sum(xq) over a group (half-group with `zero`)
    quads = [[4 * lane + t for lane in range(LANES)] for t in range(4)]  # each int32 lane's 4 byte products

    wide512 = isa == "vnni512" and blocks > 1
    W = 2 if wide512 else 1  # blocks per vector
    odd = wide512 and blocks % 2 == 1

    def dot(acc, wv, xv, lanes: int = LANES):
        """acc (int32x8, or x16) + per lane: its 4 weight bytes (unsigned, wq + offset) times 4 activations (int8)."""
        if isa in ("vnni", "vnni512") and lanes == 16:
            return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, wv, xv)
        if isa in ("vnni", "vnni512"):
            return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc, wv, xv)
        if isa == "avx2":  # vpmaddubsw (pairs into int16) + vpmaddwd (pairs into int32)
            a, b = wv, xv
            if bits == 8:  # 255 x 127 x 2 would saturate int16: take |wq| and move its sign onto x instead
                ws = tirx.reinterpret("int8x32", wv ^ tirx.Broadcast(tirx.const(128, "uint8"), 32))
                a = tirx.reinterpret("uint8x32", tirx.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", ws, ws))
                b = tirx.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", xv, ws)
            pairs = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", a, b)
            return acc + tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs,
                                                    tirx.Broadcast(tirx.const(1, "int16"), 16))
        if isa == "sdot":
            from gptbc.compile.kernels_arm import sdot

            return sdot(acc, wv ^ tirx.Broadcast(tirx.const(128, "uint8"), 32) if bits == 8 else wv, xv)
        return acc + _quad_sums(wv, xv, quads)

    def epilogue(v, lanes: int = LANES):  # the activation, on one finished vector of outputs (bias added)
        return EPILOGUES[act](v, lanes) if act else v

    def high_bits(hf, base, bit):
        """Per byte of a 32-byte weight vector: its value's bits above the nibble, as uint8x32 — bit `bit` of the
        byte of each of the `high` planes of 32 bytes from `base` in hf, put at bit 4 + plane."""
        out = None
        for p in range(high):
            plane = tirx.reinterpret("uint16x16", tirx.BufferLoad(hf, [tirx.Ramp(base + p * 32, 1, 32)]))
            v = ((plane >> tirx.Broadcast(tirx.Cast("uint16", bit), 16)) & tirx.Broadcast(tirx.const(0x0101, "uint16"), 16)
                 ) << tirx.Broadcast(tirx.const(4 + p, "uint16"), 16)
            out = v if out is None else out | v
        return tirx.reinterpret("uint8x32", out)

    def joined(load, b, w: int, lanes: int):
        """load(block) for the w consecutive blocks from b as one vector: w = 2 puts two 256-bit blocks' vectors
        side by side in a 512-bit one (the tiled layout is per 8 outputs; both halves are plain loads)."""
        parts = [load(b + h) for h in range(w)]
        return parts[0] if w == 1 else tirx.Shuffle(parts, list(range(lanes * w)))

    def make_tile(w: int):
        """The register tile over `nvecs` vectors of w blocks (8 w outputs) each: w = 1 with 256-bit vectors, 2
        with 512-bit ones (vnni512)."""
        vl = LANES * w
        f32, u8, i8 = f"float32x{vl}", f"uint8x{4 * vl}", f"int8x{4 * vl}"

        def weights(wb, b, g, c):  # chunk c of group g: 32 bytes per block
            return joined(lambda blk: tirx.BufferLoad(wb, [tirx.Ramp((blk * groups + g) * per_block + c * 32, 1, 32)]),
                          b, w, 32)

        def high_of(hf, b, g, bit):
            return joined(lambda blk: high_bits(hf, (blk * groups + g) * high * 32, bit), b, w, 32)

        def scales(buf, b, at, per):  # per-block float vectors: scale (or min) `at` of the block's `per`
            return tirx.Cast(f32, joined(lambda blk: tirx.BufferLoad(buf, [tirx.Ramp((blk * per + at) * LANES, 1,
                                                                                      LANES)]), b, w, LANES))

        @T.macro
        def tile(xq4, xs, nsum, wb, sf, mf, hf, bvec, y, acci, acch, accf, wv, m0, b0, nrows, nvecs):
            for a in T.unroll(nrows * nvecs):
                accf[a] = T.broadcast(T.float32(0), vl)
            for g in T.serial(groups):
                for r in T.unroll(nrows):
                    for bb in T.unroll(nvecs):
                        if affine:  # nsum is sum(xq), for the min term below
                            acci[r * nvecs + bb] = T.broadcast(T.int32(0), vl)
                        else:
                            acci[r * nvecs + bb] = T.broadcast(nsum[m0 + r, g * halves], vl)
                        if halved:  # the second half-group's own sum
                            acch[r * nvecs + bb] = T.broadcast(nsum[m0 + r, g * halves + 1], vl)
                for c in T.unroll(chunks):
                    for bb in T.unroll(nvecs):
                        if nibbles:  # one 32-byte load holds chunk c (low nibbles) and chunk c + 4 (high)
                            raw = weights(wb, b0 + bb * w, g, c)
                            wv[bb * 2] = raw & T.broadcast(T.uint8(15), 4 * vl)
                            wv[bb * 2 + 1] = T.reinterpret(u8, T.reinterpret(f"uint16x{2 * vl}", raw) >> T.broadcast(
                                T.uint16(4), 2 * vl)) & T.broadcast(T.uint8(15), 4 * vl)
                            if wide:  # bit c of a plane's byte: column c's; bit c + 4: column c + 4's
                                wv[bb * 2] = wv[bb * 2] | high_of(hf, b0 + bb * w, g, c)
                                wv[bb * 2 + 1] = wv[bb * 2 + 1] | high_of(hf, b0 + bb * w, g, c + 4)
                        else:
                            wv[bb * 2] = weights(wb, b0 + bb * w, g, c)
                    for r in T.unroll(nrows):
                        for bb in T.unroll(nvecs):
                            acci[r * nvecs + bb] = dot(acci[r * nvecs + bb], wv[bb * 2], T.reinterpret(
                                i8, T.broadcast(xq4[m0 + r, g * 8 + c], vl)), vl)
                            if nibbles:  # columns 16..31: acch is the second half-group's (acci where no halves)
                                acch[r * nvecs + bb] = dot(acch[r * nvecs + bb], wv[bb * 2 + 1], T.reinterpret(
                                    i8, T.broadcast(xq4[m0 + r, g * 8 + c + 4], vl)), vl)
                for r in T.unroll(nrows):
                    for bb in T.unroll(nvecs):
                        accf[r * nvecs + bb] = accf[r * nvecs + bb] + T.Cast(f32, acci[r * nvecs + bb]) * (
                            scales(sf, b0 + bb * w, g * halves, groups * halves) * T.broadcast(xs[m0 + r, g], vl))
                        if halved:
                            accf[r * nvecs + bb] = accf[r * nvecs + bb] + T.Cast(f32, acch[r * nvecs + bb]) * (
                                scales(sf, b0 + bb * w, g * halves + 1, groups * halves)
                                * T.broadcast(xs[m0 + r, g], vl))
                        if affine:  # + min * sx * sum(xq)
                            accf[r * nvecs + bb] = accf[r * nvecs + bb] + scales(mf, b0 + bb * w, g, groups) * (
                                T.broadcast(xs[m0 + r, g] * T.Cast("float32", nsum[m0 + r, g]), vl))
            for r in T.unroll(nrows):
                for bb in T.unroll(nvecs):
                    if bias:
                        accf[r * nvecs + bb] = accf[r * nvecs + bb] + T.Cast(
                            f32, bvec[T.ramp((b0 + bb * w) * LANES, 1, vl)])
                    y[m0 + r, T.ramp((b0 + bb * w) * LANES, 1, vl)] = T.Cast(f"{out_dtype}x{vl}", epilogue(
                        accf[r * nvecs + bb], vl))

        @T.macro
        def row_tiles(xq4, xs, nsum, wb, sf, mf, hf, bvec, y, acci, acch, accf, wv, r0, rn, b0, nvecs):
            # 512-bit vectors: where 1 or 2 rows are left over a multiple of 4 (5, 6, 9, 10... rows), they and the
            # last 4 make one 5- or 6-row tile rather than a 1- or 2-row one that walks and unpacks the weights again
            # (a verify of 4 drafts is 5 rows: 7-13% faster alone at StarCoder's MLP shapes). Not for a task's
            # partial block pair (nvecs 1): less code to build for a path few shapes take. 512-bit only: there 5 and 6
            # rows fit the 32 registers (4 x 4 256-bit tiles spill already).
            wider = w == 2 and nvecs > 1
            for t in T.serial(rn // ROWS - T.if_then_else(
                    wider and rn % ROWS < 3 and rn % ROWS > 0 and rn > ROWS, 1, 0)):
                tile(xq4, xs, nsum, wb, sf, mf, hf, bvec, y, acci, acch, accf, wv, r0 + t * ROWS, b0, ROWS, nvecs)
            if wider and rn % ROWS == 1 and rn > ROWS:
                tile(xq4, xs, nsum, wb, sf, mf, hf, bvec, y, acci, acch, accf, wv, r0 + rn - ROWS - 1, b0, ROWS + 1,
                     nvecs)
            if wider and rn % ROWS == 2 and rn > ROWS:
                tile(xq4, xs, nsum, wb, sf, mf, hf, bvec, y, acci, acch, accf, wv, r0 + rn - ROWS - 2, b0, ROWS + 2,
                     nvecs)
            if rn % ROWS == 1 and (not wider or rn == 1):
                tile(xq4, xs, nsum, wb, sf, mf, hf, bvec, y, acci, acch, accf, wv, r0 + rn - 1, b0, 1, nvecs)
            if rn % ROWS == 2 and (not wider or rn == 2):
                tile(xq4, xs, nsum, wb, sf, mf, hf, bvec, y, acci, acch, accf, wv, r0 + rn - 2, b0, 2, nvecs)
            if rn % ROWS == 3:
                tile(xq4, xs, nsum, wb, sf, mf, hf, bvec, y, acci, acch, accf, wv, r0 + rn - 3, b0, 3, nvecs)

        return row_tiles

    row_tiles = make_tile(1)
    row_tiles_wide = make_tile(2) if wide512 else row_tiles  # vnni512: 2 blocks per vector, single blocks as 256

    @T.macro
    def compute(x3, w, scale, mins, highs, bvec, y3, b, s):
        x = T.decl_buffer((b * s, k), x_dtype, data=x3.data)
        y = T.decl_buffer((b * s, n), out_dtype, data=y3.data)
        wb = T.decl_buffer((n * k * (4 if nibbles else 8) // 8,), "uint8", data=w.data)
        sf = T.decl_buffer((n * groups * halves,), scale_dtype, data=scale.data)
        mf = T.decl_buffer((n * groups,), scale_dtype, data=mins.data)
        hf = T.decl_buffer((n * k * max(high, 1) // 8,), "uint8", data=highs.data)
        bf = T.decl_buffer((n,), bias_dtype, data=bvec.data)
        xq = T.alloc_buffer((b * s, k), "int8")
        xq4 = T.decl_buffer((b * s, k // 4), "int32", data=xq.data)  # 4 activations as one broadcastable word
        xs = T.alloc_buffer((b * s, groups), "float32")
        nsum = T.alloc_buffer((b * s, groups * halves), "int32")
        # 1. quantize each row per group: xq = round(x / sx), sx = max|x| / 127, nsum = start * sum(xq) (per
        # half-group with `zero`)
        for mg in T.parallel(b * s * groups):
            v = T.Cast("float32x32", x[mg // groups, T.ramp(mg % groups * GROUP, 1, GROUP)])
            amax = T.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fmax.v32f32", T.fabs(v))
            q = T.Cast("int32x32", T.nearbyint(v * T.broadcast(T.if_then_else(
                amax > T.float32(0), T.float32(127) / amax, T.float32(0)), GROUP)))
            xq[mg // groups, T.ramp(mg % groups * GROUP, 1, GROUP)] = T.Cast("int8x32", q)
            xs[mg // groups, mg % groups] = amax / T.float32(127)
            if halved:
                for h in T.unroll(2):
                    nsum[mg // groups, mg % groups * 2 + h] = T.call_llvm_pure_intrin(
                        "int32", "llvm.vector.reduce.add.v16i32", T.Cast("int32x16", xq[
                            mg // groups, T.ramp(mg % groups * GROUP + h * 16, 1, 16)])) * T.int32(start)
            else:
                nsum[mg // groups, mg % groups] = T.call_llvm_pure_intrin(
                    "int32", "llvm.vector.reduce.add.v32i32", q) * T.int32(start)
        # 2. the dots: output blocks in parallel tasks; rows in chunks; ROWS x BLOCKS register tiles (vnni512:
        # ROWS x BLOCKS / 2 512-bit vectors, the same 32 outputs)
        for task in T.parallel(tasks):
            # "global", not "local": TVM 0.27 puts a CPU kernel's small *global* buffers on the stack (LLVM keeps
            # them in registers) but every "local" one in a heap workspace, whose loads and stores LLVM keeps
            # when the function is large (3x slower prefill in a whole model; not in a one-kernel module)
            acci = T.alloc_buffer((ROWS * BLOCKS,), "int32x8")
            halves_acc = T.alloc_buffer((ROWS * BLOCKS if halved else 1,), "int32x8")
            acch = (acci, halves_acc)[int(halved)]  # the second half-groups' dots; one group's dot without halves
            accf = T.alloc_buffer((ROWS * BLOCKS,), "float32x8")
            wv = T.alloc_buffer((BLOCKS * 2,), "uint8x32")
            acci2 = T.alloc_buffer(((ROWS + 2) * BLOCKS // W,), f"int32x{LANES * W}")
            halves_acc2 = T.alloc_buffer(((ROWS + 2) * BLOCKS // W if halved else 1,), f"int32x{LANES * W}")
            acch2 = (acci2, halves_acc2)[int(halved)]
            accf2 = T.alloc_buffer(((ROWS + 2) * BLOCKS // W,), f"float32x{LANES * W}")
            wv2 = T.alloc_buffer((BLOCKS // W * 2,), f"uint8x{32 * W}")
            for chunk in T.serial((b * s + ROW_CHUNK - 1) // ROW_CHUNK):
                for bt in T.serial(TASK_BLOCKS // BLOCKS):
                    if task * TASK_BLOCKS + bt * BLOCKS + BLOCKS <= blocks:
                        row_tiles_wide(xq4, xs, nsum, wb, sf, mf, hf, bf, y, acci2, acch2, accf2, wv2,
                                       chunk * ROW_CHUNK, T.min(ROW_CHUNK, b * s - chunk * ROW_CHUNK),
                                       task * TASK_BLOCKS + bt * BLOCKS, BLOCKS // W)
                    else:
                        for bb in T.serial(BLOCKS // W):
                            if task * TASK_BLOCKS + bt * BLOCKS + bb * W + W <= blocks:
                                row_tiles_wide(xq4, xs, nsum, wb, sf, mf, hf, bf, y, acci2, acch2, accf2, wv2,
                                               chunk * ROW_CHUNK, T.min(ROW_CHUNK, b * s - chunk * ROW_CHUNK),
                                               task * TASK_BLOCKS + bt * BLOCKS + bb * W, 1)
                            if odd:  # vnni512 with an odd count of blocks: the last one in 256-bit vectors
                                if task * TASK_BLOCKS + bt * BLOCKS + bb * W + W > blocks and (
                                        task * TASK_BLOCKS + bt * BLOCKS + bb * W < blocks):
                                    row_tiles(xq4, xs, nsum, wb, sf, mf, hf, bf, y, acci, acch, accf, wv,
                                              chunk * ROW_CHUNK, T.min(ROW_CHUNK, b * s - chunk * ROW_CHUNK),
                                              task * TASK_BLOCKS + bt * BLOCKS + bb * W, 1)

    return entry_points(compute, k, n, 4 if nibbles else 8, x_dtype, scale_dtype, out_dtype, bias, affine, high,
                        GROUP // halves)


def _quad_sums(wv, xv, quads):
    """Per int32 lane, the sum of its 4 byte products (the generic stand-in for vpdpbusd)."""
    prod = tirx.Cast("int32x32", wv) * tirx.Cast("int32x32", xv)
    return (tirx.Shuffle([prod], quads[0]) + tirx.Shuffle([prod], quads[1]) + tirx.Shuffle([prod], quads[2])
            + tirx.Shuffle([prod], quads[3]))


# ---- wiring into a compiled module ----

def _has_block(func, name: str) -> bool:
    from tvm import s_tir

    try:
        s_tir.Schedule(func).get_sblock(name)
        return True
    except Exception:  # noqa: BLE001 - no such block (or not a block-structured function)
        return False


def use_int8_kernels(mod, target, layout: str):
    """`mod` with every `int8_matmul` op (layers.int8_matmul, still its TE reference) replaced by
    int8_matmul_cpu for `target`'s instructions; the op's attributes (symbol, opaque pattern) kept. `layout`
    is the one the model's layers were built for (Quantization.int8_layout): it must be what the kernel reads."""
    import tvm

    isa = int8_isa(target)
    kernel_isa = "sdot" if isa == "smmla" and layout == "dot" else isa  # i8mm CPUs have sdot too (per-tensor qk*_a)
    if int8_layout(kernel_isa) != layout:
        from gptbc.errors import GptbcError

        raise GptbcError(f"internal: the {isa} kernel reads the {int8_layout(isa)} layout, the model has {layout}")
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    # the TE references differ per entry point (prefill seq_len, decode 1, batch...) but the kernel takes any
    # rows: one PrimFunc per distinct kernel, the others' calls sent to it (10 fewer kernels to build in a
    # 2-layer model's 15)
    first: dict[tuple, Any] = {}
    duplicates: dict[Any, Any] = {}
    for gv, func in list(mod.functions.items()):
        if not (isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("int8_matmul")
                and _has_block(func, "int8_matmul")):
            continue
        attrs = func.attrs or {}
        affine = bool(int(attrs.get("gptbc_affine", 0)))  # q_min, then q_high, come before the bias
        high, zero = int(attrs.get("gptbc_high", 0)), int(attrs.get("gptbc_zero", 0))
        x, w, s, *rest, y = func.params  # buffers: this TVM's PrimFunc keeps them as its parameters
        bias = rest[int(affine) + int(bool(high)):]
        k, n = int(x.shape[-1]), int(y.shape[-1])
        act = str(attrs.get("gptbc_epilogue", "")) or None
        bits = 8 if str(w.dtype) == "int8" else 4 + high
        args = (k, n, bits, kernel_isa, str(x.dtype), str(s.dtype), str(y.dtype), bool(bias), act, affine, zero)
        # ours is plain TIR (no blocks): the block-lowering pipeline would de-optimize it
        kept = {key: value for key, value in (func.attrs or {}).items() if key != "s_tir"}
        same = (args, tuple(sorted((key, str(value)) for key, value in kept.items())))
        if same in first:
            duplicates[gv] = first[same]
            continue
        first[same] = gv
        new = int8_matmul_cpu(*args)
        for key, value in kept.items():
            new = new.with_attr(key, value)
        mod[gv] = new.with_attr("tirx.is_scheduled", True)
    return _call_instead(mod, duplicates) if duplicates else mod


def _call_instead(mod, instead: dict):
    """`mod` without the functions keyed in `instead`, every reference to one naming its value instead."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Redirect(relax.PyExprMutator):
        def visit_global_var_(self, gv):
            return instead.get(gv, gv)

    redirect = Redirect(mod)
    functions = {gv: redirect.visit_expr(func) if isinstance(func, relax.Function) else func
                 for gv, func in mod.functions.items() if gv not in instead}
    return tvm.IRModule(functions, attrs=mod.attrs)


def weight_repack(bits: int, layout: str) -> str:
    """The repack kind of a grouped weight for `layout` ("dot" or "mmla"): "int4", "int8", "int4_mmla"... (the
    nibbles of a 5- or 6-bit affine weight are an int4 one; its q_high is "high1" or "high2")."""
    return ("int8" if bits == 8 else "int4") + ("" if layout == "dot" else f"_{layout}")


def repack_kernel(kind: str, shape: tuple[int, ...], dtype: str):
    """The PrimFunc (src, dst) that repacks a converted parameter of this shape for `kind` (weight_repack's,
    or "scale")."""
    from gptbc.compile.kernels_arm import repack_int4_mmla, repack_int8_mmla

    makers = {"int4": lambda: repack_int4(shape[0], shape[1] * 8), "int8": lambda: repack_int8(shape[0], shape[1]),
              "int4_mmla": lambda: repack_int4_mmla(shape[0], shape[1] * 8),
              "int8_mmla": lambda: repack_int8_mmla(shape[0], shape[1]),
              "high1": lambda: repack_high(shape[0], shape[1] * 32, 1),
              "high2": lambda: repack_high(shape[0], shape[1] * 16, 2),
              "scale": lambda: repack_scale(shape[0], shape[1], dtype)}
    return makers[kind]()


def add_repack_functions(mod, plan: dict[str, str], params: list[tuple[str, tuple[int, ...], str]]):
    """Relax functions that repack each tiled parameter of `plan` ({name: repack_kernel's kind}); returns the
    module and {parameter name: function name} for the library manifest (the runners call them once)."""
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    made: dict[tuple, str] = {}
    names: dict[str, str] = {}
    for name, shape, dtype in params:
        kind = plan.get(name)
        if kind is None:
            continue
        key = (kind, tuple(shape), dtype)
        if key not in made:
            fname = f"repack_{kind}_{'x'.join(map(str, shape))}_{dtype}"
            # the runners call FNAME_kernel themselves where they give it the output tensor (runner._repack_kernel)
            prim = bb.add_func(repack_kernel(kind, shape, dtype).with_attr("tirx.is_scheduled", True), fname + "_kernel")
            src = relax.Var("src", relax.TensorType(list(shape), dtype))
            with bb.function(fname, [src]):
                out = bb.emit(relax.call_tir(prim, [src], relax.TensorType(list(shape), dtype)))
                bb.emit_func_output(out)
            made[key] = fname
        names[name] = made[key]
    return bb.get(), names
