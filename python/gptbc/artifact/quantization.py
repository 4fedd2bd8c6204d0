"""Weight quantization schemes: one table, one entry per `--quantization` name, and the numpy
quantize / dequantize that the converter writes with and the tests check against. Imports no TVM.

Grouped schemes (`q8*_1`, `q4*_1`) are symmetric with one scale per 32 consecutive input features:
    scale = max|w[group]| / max_int          (max_int = 127 for int8, 7 for int4; int4 may clip, see below)
    q     = round(w / scale)                 (-max_int..max_int)
    w'    = q * scale
int8 values are stored as they are, signed (int8[out, in]): a vector load then needs no unpacking,
which on the CPU is the difference between a compute-bound and a bandwidth-bound int8 GEMV.
int4 values are stored unsigned as q + max_int (0..14), packed little-end-first into uint32 words along
the input dimension (8 per word).
Scales are in the activation dtype. A weight of shape (out, in) becomes
    q_weight uint32[out, ceil(in / 8)] (int4) or int8[out, in] (int8),  q_scale dtype[out, ceil(in / 32)]
with the tail of the last int4 word padded with zero weights (stored as max_int, which dequantizes to 0).
The same layout serves the token embedding (rows are tokens) and so a tied lm_head.

Affine schemes (`q4*_a`, kind "affine") hold what asymmetric 4-bit files hold, exactly: unsigned q (0..15) packed
as above, and per group of 32 a float32 scale and a float32 min, w' = q * scale + min: a third parameter
q_min float32 [out, ceil(in / 32)] beside q_scale (float32 too). (One buffer holding both would give each
dequantized weight two reads of it, which TVM's GPU GEMV analysis refuses.) This represents GGUF Q4_0, Q4_1 and Q4_K (per 32: d * sc and
-dmin * m, products of a half and a 6-bit int, exact in float32), asymmetric GPTQ and AWQ bit for bit: q * scale
is exact (4-bit q times a scale of at most 17 significant bits), so the one rounding of the sum is ggml's.
`layers.py` holds the matching nn.Modules, which dequantize inside the matmul / lookup kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from gptbc.errors import GptbcError


@dataclass(frozen=True)
class Quantization:
    name: str
    kind: str  # "none": as-is in model_dtype; "group": grouped symmetric int; "affine": grouped int with a min
    model_dtype: str  # dtype of activations, scales and unquantized weights
    bits: int = 0
    group_size: int = 0
    quantize_lm_head: bool = True  # False keeps lm_head (and a tied wte) in model_dtype
    # A compile-time choice, not a property of the weights (so not in describe()): linear layers quantize their
    # input rows to int8 and use integer dot products on the CPU, their weights repacked when loaded
    # (layers.int8_matmul, kernels_int8.py). Off: float activations, weights used as converted.
    int8_activations: bool = False
    # With int8 activations, the order the repacked weights take: "dot" (x86, sdot, generic kernels) or "mmla"
    # (aarch64 i8mm's smmla; kernels_arm.py). The target decides (compiler.choose_activations).
    int8_layout: str = "dot"

    @property
    def packed(self) -> bool:
        """Whether quantized weights become q_weight + q_scale (grouped and affine schemes)."""
        return self.kind in ("group", "affine")

    @property
    def scale_dtype(self) -> str:
        """q_scale's dtype: the activation dtype, but float32 for affine (exact products of the file's scales)."""
        return "float32" if self.kind == "affine" else self.model_dtype

    @property
    def per_word(self) -> int:
        """Values per stored element: 8 int4 per uint32 word; int8 is stored unpacked."""
        return 1 if self.bits == 8 else 32 // self.bits

    @property
    def storage_dtype(self) -> str:
        return "int8" if self.bits == 8 else "uint32"

    @property
    def max_int(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "model_dtype": self.model_dtype, "bits": self.bits,
                "group_size": self.group_size, "quantize_lm_head": self.quantize_lm_head}

    def packed_shape(self, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
        rows, cols = shape
        return (rows, -(-cols // self.per_word)), (rows, -(-cols // self.group_size))


# `gptbc compile --activations`: int8 activations where the CPU has VNNI (auto), always, or never
ACTIVATION_MODES = ("auto", "int8", "float")


def check_activation_mode(option: str) -> None:
    if option not in ACTIVATION_MODES:
        raise GptbcError(f"--activations {option}: choose from {', '.join(ACTIVATION_MODES)}")


QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q for q in [
        Quantization("q0f32", "none", "float32"),
        Quantization("q0f16", "none", "float16"),
        Quantization("q0bf16", "none", "bfloat16"),
        Quantization("q8f16_1", "group", "float16", bits=8, group_size=32),
        Quantization("q8f32_1", "group", "float32", bits=8, group_size=32),
        Quantization("q4f16_1", "group", "float16", bits=4, group_size=32),
        Quantization("q4f32_1", "group", "float32", bits=4, group_size=32),
        Quantization("q4f16_a", "affine", "float16", bits=4, group_size=32),
        Quantization("q4f32_a", "affine", "float32", bits=4, group_size=32),
    ]
}


def get_quantization(name: str, quantize_lm_head: bool = True) -> Quantization:
    try:
        q = QUANTIZATIONS[name]
    except KeyError:
        raise GptbcError(f"--quantization {name}: unknown scheme (choose from {', '.join(QUANTIZATIONS)})") from None
    if q.packed and not quantize_lm_head:
        q = Quantization(q.name, q.kind, q.model_dtype, q.bits, q.group_size, quantize_lm_head=False)
    return q


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def is_quantized(q: Quantization, param: str, tied: bool) -> bool:
    """Which weights a grouped scheme packs: every linear weight and the token embedding.

    wpe, LayerNorms and biases stay in model_dtype. With the keep-lm-head flag, lm_head stays too,
    and so does wte when it doubles as the lm_head (tied embeddings).
    """
    if q.kind == "none":
        return False
    if param == "lm_head.weight" or (param == "transformer.wte.weight" and tied):
        return q.quantize_lm_head
    return param == "transformer.wte.weight" or (param.endswith(".weight") and (".attn.c_" in param or ".mlp.c_" in param))


# int4 has so few levels that clipping the largest weights of a group a little lowers its total error;
# try these fractions of max|w| as the top level and keep the best per group (int8 gains nothing).
INT4_CLIP_RATIOS = np.linspace(0.70, 1.0, 16)
ROWS_PER_CHUNK = 2048  # quantize in row blocks: temporaries stay a few MB whatever the tensor size


def quantize(w: np.ndarray, q: Quantization) -> tuple[np.ndarray, ...]:
    """(rows, cols) float → (q_weight, q_scale) (+ q_min for an affine scheme): int8[rows, cols] or
    uint32[rows, ceil(cols / 8)] packed int4, and scales in scale_dtype, laid out as the module docstring says."""
    rows, cols = w.shape
    packed_shape, scale_shape = q.packed_shape((rows, cols))
    parts = [np.empty(packed_shape, q.storage_dtype), np.empty(scale_shape, numpy_dtype(q.scale_dtype))]
    if q.kind == "affine":
        parts.append(np.empty(scale_shape, np.float32))
    for r in range(0, rows, ROWS_PER_CHUNK):
        for part, value in zip(parts, _quantize_rows(w[r:r + ROWS_PER_CHUNK], q)):
            part[r:r + ROWS_PER_CHUNK] = value
    return tuple(parts)


def _round_to(groups: np.ndarray, amax: np.ndarray, ratio: float, q: Quantization):
    # Scales are stored in model_dtype; quantize with the rounded scale so dequantization is consistent.
    scale = (amax * ratio / q.max_int).astype(numpy_dtype(q.model_dtype))
    s32 = scale.astype(np.float32)[..., None]
    ints = np.clip(np.rint(groups / np.where(s32 == 0, 1.0, s32)), -q.max_int, q.max_int)
    err = np.square(ints * s32 - groups).sum(axis=-1)
    return ints, scale, err


def _affine_rows(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest on each group's [min, max] in 15 steps: (q 0..15, float32 scale, float32 min)."""
    lo, hi = groups.min(axis=-1), groups.max(axis=-1)
    step = ((hi - lo) / 15).astype(np.float32)
    q = np.clip(np.rint((groups - lo[..., None]) / np.where(step == 0, 1, step)[..., None]), 0, 15)
    return q, step, lo.astype(np.float32)


def pack_nibbles(ints: np.ndarray) -> np.ndarray:
    """uint [rows, 8k] values 0..15 → uint32 [rows, k], value j at bits 4 (j % 8) of word j // 8."""
    ints = ints.astype(np.uint32).reshape(ints.shape[0], -1, 8)
    return np.bitwise_or.reduce(ints << (np.arange(8, dtype=np.uint32) * 4), axis=-1).astype(np.uint32)


def _quantize_rows(w: np.ndarray, q: Quantization) -> tuple[np.ndarray, ...]:
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    g = q.group_size
    padded = -(-cols // g) * g
    if padded != cols:
        w = np.pad(w, ((0, 0), (0, padded - cols)))
    groups = w.reshape(rows, padded // g, g)
    packed_shape, scale_shape = q.packed_shape((rows, cols))
    if q.kind == "affine":  # padding is zeros, which a group's [min, max] then includes: any q there is harmless
        ints, step, low = _affine_rows(groups)
        return pack_nibbles(ints.reshape(rows, padded))[:, :packed_shape[1]], step, low
    amax = np.abs(groups).max(axis=-1)
    ints, scale, err = _round_to(groups, amax, 1.0, q)
    if q.bits <= 4:
        for ratio in INT4_CLIP_RATIOS[:-1]:
            i2, s2, e2 = _round_to(groups, amax, ratio, q)
            better = e2 < err
            ints[better], scale[better], err[better] = i2[better], s2[better], e2[better]
    if q.bits == 8:
        return ints.reshape(rows, padded)[:, :cols].astype(np.int8), scale
    ints = (ints.astype(np.int32) + q.max_int).reshape(rows, padded).astype(np.uint32)
    return pack_nibbles(ints)[:, :packed_shape[1]], scale[:, :scale_shape[1]]


def dequantize(packed: np.ndarray, scale: np.ndarray, cols: int, q: Quantization,
               minimum: np.ndarray | None = None) -> np.ndarray:
    """The inverse of `quantize`, float32[rows, cols] (`minimum`: an affine scheme's q_min)."""
    rows = packed.shape[0]
    if q.bits == 8:
        ints = packed[:, :cols].astype(np.float32)
    else:
        shifts = (np.arange(q.per_word, dtype=np.uint32) * q.bits)[None, None, :]
        mask = np.uint32((1 << q.bits) - 1)
        ints = ((packed[:, :, None] >> shifts) & mask).reshape(rows, -1)[:, :cols].astype(np.float32)
        if q.kind == "affine":
            step, low = (np.repeat(x.astype(np.float32), q.group_size, axis=1)[:, :cols] for x in (scale, minimum))
            return ints * step + low
        ints -= q.max_int
    s = np.repeat(scale.astype(np.float32), q.group_size, axis=1)[:, :cols]
    return ints * s
