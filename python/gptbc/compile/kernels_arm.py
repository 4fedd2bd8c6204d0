"""The aarch64 instructions of the int8-activation matmul (kernels_int8.py has the numerics and the x86 kernels).

dotprod (`sdot`, Armv8.2+: cortex-a76, neoverse-n1...) slots into kernels_int8's kernel as its `dot`: per int32
lane, 4 signed bytes times 4, on each 128-bit half of its 256-bit vectors; it reads the "dot" layout unchanged.

i8mm (`smmla`, Armv8.6 and some earlier cores: neoverse-v1/v2, apple-m2...) multiplies a 2x8 int8 tile by an
8x2 one into a 2x2 int32 tile: 32 products per instruction, twice sdot's, when both tiles are full. Its operands
are 2 rows x 8 columns each, so this module has a kernel of its own (`int8_matmul_mmla`) with its own layouts:

    activations (made by the quantization pass, per call): rows in pairs; for pair p and 8 columns 8c..8c+7,
    16 bytes: row 2p's 8 values then row 2p + 1's (an odd last row is paired with a row of zeros);
    weights ("mmla" layout, repacked when loaded): block b = outputs 8b .. 8b + 7, group g, chunk c = columns
    32g + 8c .. + 7: int8: 64 bytes, 16 per output pair q: output 8b + 2q's 8 values, then 8b + 2q + 1's (signed,
    as converted); int4: 32 bytes, byte 16 (q % 2) + 8 j + t holds output 8b + 2q + j, column 8c + t in its low
    nibble for q < 2, high nibble for q >= 2 (so one load and two masks give all four pairs).
    scales: the "dot" layout's (8 per block and group).

smmla(acc, activations, weights) adds (row i, output j) into lane 2i + j of each output pair's 4 lanes, so a tile of
2 rows x 8 outputs is 4 instructions per chunk into an int32x16 accumulator; at the end of a group two shuffles
turn it into each row's 8 outputs, and from there the float epilogue is kernels_int8's: same operations, same
order, so the results equal the sdot kernel's bit for bit. A single row (decode) pairs with zeros: as many
instructions as sdot, no gain; rows in pairs (prefill, batches, verification) take half.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from gptbc.compile.int8_base import EPILOGUES, GROUP, LANES, TASK_BLOCKS, entry_points, tileable

PAIRS, BLOCKS = 2, 2  # register tile: 2 row pairs x 2 blocks = 4 int32x16 accumulators (16 of the 32 registers)
PAIR_CHUNK = 32  # row pairs whose quantized activations stay in L2 while a task walks its outputs
CHUNKS = GROUP // 8  # 8-column chunks per group


def sdot(acc, wv, xv):
    """aarch64 sdot on the two 128-bit halves: per int32 lane, 4 signed weight bytes times 4 activations, summed
    onto acc. Weights must be signed bytes here: int8 ones with their +128 removed (wq), int4 nibbles as they
    are (wq + 7 is 0..15, also a signed byte; the kernel's nsum undoes the 7)."""
    w, x = tirx.reinterpret("int8x32", wv), tirx.reinterpret("int8x32", xv)
    halves = [tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", _lanes(acc, h * 4, 4),
                                         _lanes(w, h * 16, 16), _lanes(x, h * 16, 16)) for h in range(2)]
    return tirx.Shuffle(halves, _consts(range(LANES)))


def _consts(indices) -> list:
    return [tirx.const(i, "int32") for i in indices]


def _lanes(v, start: int, size: int):
    return tirx.Shuffle([v], _consts(range(start, start + size)))


# ---- the mmla layout, as index arithmetic (ints or TIR expressions) ----

def mmla_int8(n, k, in_features: int):
    """Byte index in the flat int8 array of int8 weight (n, k) in the mmla layout."""
    groups = in_features // GROUP
    o = n % LANES
    return (n // LANES * groups + k // GROUP) * 256 + k % GROUP // 8 * 64 + o // 2 * 16 + o % 2 * 8 + k % 8


def mmla_int4(n, k, in_features: int):
    """(word index in the flat uint32 array, bit shift) of int4 weight (n, k) in the mmla layout."""
    groups = in_features // GROUP
    o = n % LANES
    byte = (n // LANES * groups + k // GROUP) * 128 + k % GROUP // 8 * 32 + o // 2 % 2 * 16 + o % 2 * 8 + k % 8
    return byte // 4, byte % 4 * 8 + o // 4 * 4


# ---- load-time repacking: row layout (quantization/__init__.py) -> mmla ----

def repack_int4_mmla(n: int, k: int):
    """uint32 [n, k / 8] rows -> the same shape, in the mmla layout."""
    words = k // 8

    @T.prim_func(private=True)
    def repack(src: T.Buffer((n, words), "uint32"), dst: T.Buffer((n, words), "uint32")):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((n * words * 4,), "uint8", data=dst.data)
        for b in T.parallel(n // LANES):
            for g, c, h, j, t in T.grid(k // GROUP, CHUNKS, 2, 2, 8):
                col = g * GROUP + c * 8 + t
                lo = (src[b * LANES + h * 2 + j, col // 8] >> T.uint32(col % 8 * 4)) & T.uint32(15)
                hi = (src[b * LANES + 4 + h * 2 + j, col // 8] >> T.uint32(col % 8 * 4)) & T.uint32(15)
                flat[(b * (k // GROUP) + g) * 128 + c * 32 + h * 16 + j * 8 + t] = T.Cast("uint8", lo | (hi << T.uint32(4)))

    return repack


def repack_int8_mmla(n: int, k: int):
    """int8 [n, k] rows -> the same shape, in the mmla layout (values unchanged: smmla multiplies signed bytes)."""

    @T.prim_func(private=True)
    def repack(src: T.Buffer((n, k), "int8"), dst: T.Buffer((n, k), "int8")):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((n * k,), "int8", data=dst.data)
        for b in T.parallel(n // LANES):
            for g, c, o, t in T.grid(k // GROUP, CHUNKS, LANES, 8):
                flat[(b * (k // GROUP) + g) * 256 + c * 64 + o * 8 + t] = src[b * LANES + o, g * GROUP + c * 8 + t]

    return repack


# ---- the matmul ----

def _mmla4(acc, xv, w01, w23):
    """acc (int32x16: output pair q's 2x2 tile in lanes 4q..4q+3) + smmla of the activation tile xv (2 rows x 8,
    int8x16) with each output pair's weights (pairs 0, 1 in w01, pairs 2, 3 in w23; uint8x32 holding signed bytes)."""
    tiles = []
    for q in range(4):
        w = tirx.reinterpret("int8x32", w01 if q < 2 else w23)
        tiles.append(tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.smmla.v4i32.v16i8", _lanes(acc, 4 * q, 4),
                                                xv, _lanes(w, q % 2 * 16, 16)))
    return tirx.Shuffle(tiles, _consts(range(16)))


def _row(acc, j: int):
    """Row j (0 or 1) of an int32x16 accumulator: its 8 outputs in order (lanes 2j, 2j + 1 of each pair's 4)."""
    return tirx.Shuffle([acc], _consts(4 * q + 2 * j + e for q in range(4) for e in range(2)))


@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; a model has a few distinct shapes
def int8_matmul_mmla(k: int, n: int, bits: int, x_dtype: str, scale_dtype: str, out_dtype: str,
                     bias: bool = False, act: str | None = None, affine: bool = False):
    """kernels_int8.int8_matmul_cpu's computation with smmla: weights in the mmla layout, scales (and an affine
    weight's mins) in the dot one; `affine` as there (q4*_a: nibbles are q, + min * sx * sum(xq) per group, in
    the same float operations and order as the dot kernel)."""
    assert act in (None, *EPILOGUES)
    assert tileable(n, k) and bits in (4, 8) and not (affine and bits != 4)
    groups = k // GROUP
    blocks = n // LANES
    per_block = 128 if bits == 4 else 256  # weight bytes per (block, group)
    offset = 0 if affine else 7 if bits == 4 else 0  # int4 nibbles are wq + 7; int8 weights are signed as they are
    bias_dtype = x_dtype if affine else scale_dtype
    tasks = -(-blocks // TASK_BLOCKS)

    def epilogue(v):
        return EPILOGUES[act](v) if act else v

    @T.macro
    def fold(acci, accf, nsum, xs, sf, mf, p, b, g, a, f, j):
        """Group g's integer sums of row 2p + j, block b (accumulator a) into its float accumulator f."""
        if affine:  # nsum is sum(xq): min * sx * sum(xq) after the dot, as kernels_int8 does
            accf[f] = accf[f] + T.Cast("float32x8", _row(acci[a], j)) * (
                T.Cast("float32x8", sf[T.ramp((b * groups + g) * LANES, 1, LANES)]) * T.broadcast(xs[p * 2 + j, g],
                                                                                                  LANES))
            accf[f] = accf[f] + T.Cast("float32x8", mf[T.ramp((b * groups + g) * LANES, 1, LANES)]) * T.broadcast(
                xs[p * 2 + j, g] * T.Cast("float32", nsum[p * 2 + j, g]), LANES)
        else:
            accf[f] = accf[f] + T.Cast("float32x8", _row(acci[a], j) + T.broadcast(nsum[p * 2 + j, g], LANES)) * (
                T.Cast("float32x8", sf[T.ramp((b * groups + g) * LANES, 1, LANES)])
                * T.broadcast(xs[p * 2 + j, g], LANES))

    @T.macro
    def store(accf, bvec, y, row, b, f):
        if bias:
            accf[f] = accf[f] + T.Cast("float32x8", bvec[T.ramp(b * LANES, 1, LANES)])
        y[row, T.ramp(b * LANES, 1, LANES)] = T.Cast(f"{out_dtype}x8", epilogue(accf[f]))

    @T.macro
    def tile(xqi, xs, nsum, wb, sf, mf, bvec, y, acci, accf, wv, m, p0, npairs, b0, nblocks):
        for a in T.unroll(npairs * 2 * nblocks):
            accf[a] = T.broadcast(T.float32(0), LANES)
        for g in T.serial(groups):
            for a in T.unroll(npairs * nblocks):
                acci[a] = T.broadcast(T.int32(0), 16)
            for c in T.unroll(CHUNKS):
                for bb in T.unroll(nblocks):
                    if bits == 4:  # one 32-byte load: low nibbles are output pairs 0, 1; high ones 2, 3
                        raw = wb[T.ramp(((b0 + bb) * groups + g) * per_block + c * 32, 1, 32)]
                        wv[bb * 2] = raw & T.broadcast(T.uint8(15), 32)
                        wv[bb * 2 + 1] = T.reinterpret("uint8x32", T.reinterpret("uint16x16", raw) >> T.broadcast(
                            T.uint16(4), 16)) & T.broadcast(T.uint8(15), 32)
                    else:
                        wv[bb * 2] = wb[T.ramp(((b0 + bb) * groups + g) * per_block + c * 64, 1, 32)]
                        wv[bb * 2 + 1] = wb[T.ramp(((b0 + bb) * groups + g) * per_block + c * 64 + 32, 1, 32)]
                for pr in T.unroll(npairs):
                    for bb in T.unroll(nblocks):
                        acci[pr * nblocks + bb] = _mmla4(acci[pr * nblocks + bb], xqi[p0 + pr, T.ramp(
                            (g * CHUNKS + c) * 16, 1, 16)], wv[bb * 2], wv[bb * 2 + 1])
            for pr in T.unroll(npairs):
                for bb in T.unroll(nblocks):
                    fold(acci, accf, nsum, xs, sf, mf, p0 + pr, b0 + bb, g, pr * nblocks + bb, pr * 2 * nblocks + bb, 0)
                    fold(acci, accf, nsum, xs, sf, mf, p0 + pr, b0 + bb, g, pr * nblocks + bb,
                         (pr * 2 + 1) * nblocks + bb, 1)
        for pr in T.unroll(npairs):
            for bb in T.unroll(nblocks):
                store(accf, bvec, y, (p0 + pr) * 2, b0 + bb, pr * 2 * nblocks + bb)
                if (p0 + pr) * 2 + 1 < m:  # an odd last row's partner is padding
                    store(accf, bvec, y, (p0 + pr) * 2 + 1, b0 + bb, (pr * 2 + 1) * nblocks + bb)

    @T.macro
    def pair_tiles(xqi, xs, nsum, wb, sf, mf, bvec, y, acci, accf, wv, m, p0, pn, b0, nblocks):
        for t in T.serial(pn // PAIRS):
            tile(xqi, xs, nsum, wb, sf, mf, bvec, y, acci, accf, wv, m, p0 + t * PAIRS, PAIRS, b0, nblocks)
        if pn % PAIRS == 1:
            tile(xqi, xs, nsum, wb, sf, mf, bvec, y, acci, accf, wv, m, p0 + pn - 1, 1, b0, nblocks)

    @T.macro
    def compute(x3, w, scale, mins, highs, bvec, y3, b, s):
        # b * s rows in (b * s + 1) // 2 pairs, spelled out: names bound to them here broke buffer flattening
        x = T.decl_buffer((b * s, k), x_dtype, data=x3.data)
        y = T.decl_buffer((b * s, n), out_dtype, data=y3.data)
        wb = T.decl_buffer((n * k // (8 // bits),), "uint8", data=w.data)
        sf = T.decl_buffer((n * groups,), scale_dtype, data=scale.data)
        mf = T.decl_buffer((n * groups,), scale_dtype, data=mins.data)
        bf = T.decl_buffer((n,), bias_dtype, data=bvec.data)
        xqi = T.alloc_buffer(((b * s + 1) // 2, 2 * k), "int8")
        xs = T.alloc_buffer(((b * s + 1) // 2 * 2, groups), "float32")
        nsum = T.alloc_buffer(((b * s + 1) // 2 * 2, groups), "int32")
        # 1. quantize each row per group (as kernels_int8), written as 8-column pieces into its row pair
        for rg in T.parallel((b * s + 1) // 2 * 2 * groups):
            r, g = rg // groups, rg % groups
            if r < b * s:
                v = T.Cast("float32x32", x[r, T.ramp(g * GROUP, 1, GROUP)])
                amax = T.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fmax.v32f32", T.fabs(v))
                inv = T.if_then_else(amax > T.float32(0), T.float32(127) / amax, T.float32(0))
                q = T.Cast("int32x32", T.nearbyint(v * T.broadcast(inv, GROUP)))
                for c in T.unroll(CHUNKS):  # the same rounding again, 8 columns at a time, to store them apart
                    xqi[r // 2, T.ramp((g * CHUNKS + c) * 16 + r % 2 * 8, 1, 8)] = T.Cast("int8x8", T.nearbyint(
                        T.Cast("float32x8", x[r, T.ramp(g * GROUP + c * 8, 1, 8)]) * T.broadcast(inv, 8)))
                xs[r, g] = amax / T.float32(127)
                nsum[r, g] = T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add.v32i32", q) * T.int32(
                    1 if affine else -offset)
            else:  # the zero row that pairs with an odd last row
                for c in T.unroll(CHUNKS):
                    xqi[r // 2, T.ramp((g * CHUNKS + c) * 16 + 8, 1, 8)] = T.broadcast(T.int8(0), 8)
                xs[r, g] = T.float32(0)
                nsum[r, g] = T.int32(0)
        # 2. the tiles: output blocks in parallel tasks; row pairs in chunks; PAIRS x BLOCKS register tiles
        for task in T.parallel(tasks):
            # "global" buffers, for kernels_int8's reason (TVM puts "local" ones in a heap workspace)
            acci = T.alloc_buffer((PAIRS * BLOCKS,), "int32x16")
            accf = T.alloc_buffer((PAIRS * 2 * BLOCKS,), "float32x8")
            wv = T.alloc_buffer((BLOCKS * 2,), "uint8x32")
            for chunk in T.serial(((b * s + 1) // 2 + PAIR_CHUNK - 1) // PAIR_CHUNK):
                for bt in T.serial(TASK_BLOCKS // BLOCKS):
                    if task * TASK_BLOCKS + bt * BLOCKS + BLOCKS <= blocks:
                        pair_tiles(xqi, xs, nsum, wb, sf, mf, bf, y, acci, accf, wv, b * s, chunk * PAIR_CHUNK,
                                   T.min(PAIR_CHUNK, (b * s + 1) // 2 - chunk * PAIR_CHUNK),
                                   task * TASK_BLOCKS + bt * BLOCKS, BLOCKS)
                    else:
                        for bb in T.serial(BLOCKS):
                            if task * TASK_BLOCKS + bt * BLOCKS + bb < blocks:
                                pair_tiles(xqi, xs, nsum, wb, sf, mf, bf, y, acci, accf, wv, b * s, chunk * PAIR_CHUNK,
                                           T.min(PAIR_CHUNK, (b * s + 1) // 2 - chunk * PAIR_CHUNK),
                                           task * TASK_BLOCKS + bt * BLOCKS + bb, 1)

    return entry_points(compute, k, n, bits, x_dtype, scale_dtype, out_dtype, bias, affine)
