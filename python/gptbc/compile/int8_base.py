"""What the int8-activation matmul kernels share (kernels_int8.py for x86 and the generic kernel,
kernels_arm.py for aarch64's sdot and smmla): the group and block sizes, the activations applied to a finished
vector of outputs, and the PrimFunc entry points around a kernel's compute macro (`entry_points`: one per count
of the optional parameters q_min, q_high and bias). Its own module so that kernels_int8 (which picks a kernel
per target) can import kernels_arm without a cycle."""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from gptbc.compile import tvmscript

tvmscript.install()  # our kernels parse faster (tvmscript.py)

GROUP = 32
LANES = 8  # outputs per block = int32 lanes of a 256-bit vector
TASK_BLOCKS = 8  # blocks of LANES outputs per parallel task


def _splat(f: float, lanes: int = LANES):
    return tirx.Broadcast(tirx.const(f, "float32"), lanes)


def _tanh(v, lanes: int = LANES):
    """tanh of a float32x8 vector as a rational function (Eigen's; |error| ~1e-7): TVM lowers `tanh` to
    scalar libm calls, which made a separate GELU kernel cost 19% of a prefill."""
    c = functools.partial(_splat, lanes=lanes)
    x = tirx.max(tirx.min(v, c(9.0)), c(-9.0))
    x2 = x * x
    p = c(-2.76076847742355e-16)
    for a in (2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08, 1.48572235717979e-05,
              6.37261928875436e-04, 4.89352455891786e-03):
        p = x2 * p + c(a)
    q = c(1.19825839466702e-06)
    for b in (1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03):
        q = x2 * q + c(b)
    return x * p / q


def _gelu_tanh(v, lanes: int = LANES):
    c = functools.partial(_splat, lanes=lanes)
    return c(0.5) * v * (c(1.0) + _tanh(c(0.7978845608028654) * (v + c(0.044715) * v * v * v), lanes))


def _erf(v, lanes: int = LANES):
    """erf of a float32 vector as x * p(x^2) / q(x^2) on x clamped to [-4, 4] (Eigen's float erf, the one TVM's
    topi.fast_erf uses; |error| < 4e-7, and erf(4) is 1 in float32): as with tanh, TVM would call libm's erff once
    per lane, which made StarCoder's separate exact-GELU kernel cost 14% of a 9-row verify step."""
    c = functools.partial(_splat, lanes=lanes)
    x = tirx.max(tirx.min(v, c(4.0)), c(-4.0))
    x2 = x * x
    p = c(-2.72614225801306e-10)
    for a in (2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05, -7.34990630326855e-04,
              -2.95459980854025e-03, -1.60960333262415e-02):
        p = x2 * p + c(a)
    q = c(-1.45660718464996e-05)
    for b in (-2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02):
        q = x2 * q + c(b)
    return x * p / q


def _gelu_erf(v, lanes: int = LANES):  # HF's "gelu" (StarCoder-15B's): x / 2 * (1 + erf(x / sqrt 2))
    c = functools.partial(_splat, lanes=lanes)
    return c(0.5) * v * (c(1.0) + _erf(v * c(0.7071067811865476), lanes))


# What int8_matmul_cpu can apply to its outputs before storing them (quantized_layers.int8_matmul's reference
# computes the same), on a float32 vector of `lanes` (8, or 16 for vnni512)
EPILOGUES = {"gelu_tanh": _gelu_tanh, "gelu_erf": _gelu_erf,
             "relu": lambda v, lanes=LANES: tirx.max(v, _splat(0.0, lanes))}


def tileable(n: int, k: int) -> bool:
    """Whether an (n outputs, k inputs) weight can take the tiled layout."""
    return n % LANES == 0 and k % GROUP == 0


# ---- the tiled layout, as index arithmetic (ints or TIR expressions) ----

def entry_points(compute, k: int, n: int, bits: int, x_dtype: str, scale_dtype: str, out_dtype: str, bias: bool,
                 affine: bool = False, high: int = 0, group: int = GROUP):
    """The kernel's PrimFunc around `compute` (a macro (x3, w, scale, mins, highs, bvec, y3, b, s)), with the
    parameters (x, w, scale[, q_min][, q_high][, bias], y): q_min where `affine` (an affine weight's mins, after
    the scales), q_high where `high` (the `high` bits per value above the nibble of a 5- or 6-bit affine weight),
    the bias where `bias` (in x's dtype for an affine weight, else the scales'). Scales and mins are one per
    `group` inputs. `compute` gets the scales' buffer in place of what the kernel does not have (never read)."""
    wshape, wdtype = ((n, k), "int8") if bits == 8 else ((n, k // 8), "uint32")
    sshape = (n, k // group)
    bias_dtype = x_dtype if affine or high else scale_dtype
    extras = [(name, shape, dtype) for name, shape, dtype, present in (
        ("mins", sshape, scale_dtype, affine), ("highs", (n, k * high // 32), "uint32", bool(high)),
        ("bvec", (n,), bias_dtype, bias)) if present]
    # where compute's mins, highs and bvec are in (scale, first extra, second, third)
    at = {name: i + 1 for i, (name, _, _) in enumerate(extras)}
    im, ih, ib = at.get("mins", 0), at.get("highs", 0), at.get("bvec", 0)
    (s1, d1), (s2, d2), (s3, d3) = ([(shape, dtype) for _, shape, dtype in extras] + [(sshape, scale_dtype)] * 3)[:3]

    if len(extras) == 0:
        @T.prim_func(private=True)
        def none(var_x: T.handle, var_w: T.handle, var_s: T.handle, var_y: T.handle):
            T.func_attr({"tirx.noalias": True})
            b = T.int64()
            s = T.int64()
            x3 = T.match_buffer(var_x, (b, s, k), x_dtype)
            w = T.match_buffer(var_w, wshape, wdtype)
            scale = T.match_buffer(var_s, sshape, scale_dtype)
            y3 = T.match_buffer(var_y, (b, s, n), out_dtype)
            compute(x3, w, scale, scale, scale, scale, y3, b, s)

        return none

    if len(extras) == 1:
        @T.prim_func(private=True)
        def one(var_x: T.handle, var_w: T.handle, var_s: T.handle, var_e1: T.handle, var_y: T.handle):
            T.func_attr({"tirx.noalias": True})
            b = T.int64()
            s = T.int64()
            x3 = T.match_buffer(var_x, (b, s, k), x_dtype)
            w = T.match_buffer(var_w, wshape, wdtype)
            scale = T.match_buffer(var_s, sshape, scale_dtype)
            e1 = T.match_buffer(var_e1, s1, d1)
            y3 = T.match_buffer(var_y, (b, s, n), out_dtype)
            compute(x3, w, scale, (scale, e1)[im], (scale, e1)[ih], (scale, e1)[ib], y3, b, s)

        return one

    if len(extras) == 2:
        @T.prim_func(private=True)
        def two(var_x: T.handle, var_w: T.handle, var_s: T.handle, var_e1: T.handle, var_e2: T.handle,
                var_y: T.handle):
            T.func_attr({"tirx.noalias": True})
            b = T.int64()
            s = T.int64()
            x3 = T.match_buffer(var_x, (b, s, k), x_dtype)
            w = T.match_buffer(var_w, wshape, wdtype)
            scale = T.match_buffer(var_s, sshape, scale_dtype)
            e1 = T.match_buffer(var_e1, s1, d1)
            e2 = T.match_buffer(var_e2, s2, d2)
            y3 = T.match_buffer(var_y, (b, s, n), out_dtype)
            compute(x3, w, scale, (scale, e1, e2)[im], (scale, e1, e2)[ih], (scale, e1, e2)[ib], y3, b, s)

        return two

    if len(extras) == 3:
        @T.prim_func(private=True)
        def three(var_x: T.handle, var_w: T.handle, var_s: T.handle, var_e1: T.handle, var_e2: T.handle,
                  var_e3: T.handle, var_y: T.handle):
            T.func_attr({"tirx.noalias": True})
            b = T.int64()
            s = T.int64()
            x3 = T.match_buffer(var_x, (b, s, k), x_dtype)
            w = T.match_buffer(var_w, wshape, wdtype)
            scale = T.match_buffer(var_s, sshape, scale_dtype)
            e1 = T.match_buffer(var_e1, s1, d1)
            e2 = T.match_buffer(var_e2, s2, d2)
            e3 = T.match_buffer(var_e3, s3, d3)
            y3 = T.match_buffer(var_y, (b, s, n), out_dtype)
            compute(x3, w, scale, (scale, e1, e2, e3)[im], (scale, e1, e2, e3)[ih], (scale, e1, e2, e3)[ib], y3, b, s)

        return three
    raise AssertionError(extras)
