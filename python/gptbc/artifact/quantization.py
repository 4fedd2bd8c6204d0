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

5- and 6-bit values (GGUF Q5_0, Q5_1, Q5_K, Q6_K) are the same affine design with wider values: an affine
layout is (bits, group, zero), and a weight of it is
    q_weight uint32[out, ceil(in / 8)]   the low 4 bits of each value, packed as above (nibbles)
    q_scale  float32[out, ceil(in / group)]
    q_min    float32[out, ceil(in / group)]          where zero is 0:  w' = q * scale + min
    q_high   uint32[out, ceil(in * (bits - 4) / 32)] bits > 4: the bits above the nibble, little-end-first,
                                                     32 / (bits - 4) values per word
and where zero is not 0 there is no min: w' = (q - zero) * scale. The layouts (AFFINE_LAYOUTS):
    4 bits, group 32, min    Q4_0 (min -8 d), Q4_1, Q4_K
    5 bits, group 32, min    Q5_0 (min -16 d), Q5_1 (d, m), Q5_K (d sc, -dmin m)
    6 bits, group 16, zero 32  Q6_K: (d sc) (q - 32), sc a signed int8, one per 16 values
Each is exact for the same reason as above: q * scale is exact in float32 (a 5-bit q times a 17-bit d sc; Q6_K's
q - 32 is at most 6 bits and d sc at most 18), so the kernel's one rounding (of the sum; FMA or not) is the one
gguf's numpy dequantize makes, and Q6_K's product is gguf's own product. Q6_K carries no min because a float32
min per 16 values would cost 2 more bits a weight (10 bits against the file's 6.56: over 1.5x); its offset is
the constant zero instead. Bytes per weight: 4-bit 6 (Q4_K 4.5: 1.33x), 5-bit 7 (Q5_K 5.5: 1.27x), 6-bit 8
(Q6_K 6.5625: 1.22x). One design with the 4-bit layout (same nibble plane, same scale/min, one formula), rather
than a 6-bit container for everything, because llama.cpp mixes widths within one file (Q4_K_M: Q4_K and Q6_K):
a uniform 6-bit layout with a min per 16 would store a Q4_K_M file at ~2x its bytes.

So the width can differ per tensor: the `qk*_a` schemes hold, for each packed module, the width its source
tensor has (`Quantization.widths`, {module: bits}, recorded in the converted manifest's quantization field and
read back by the compiler, which builds each layer for its own layout; `layout(module)`). A module without a
recorded width (an HF checkpoint quantized with --quantization qkf16_a, a GGUF tensor of another type) gets
6 bits, group 16, zero 32, quantized round-to-nearest here.
`layers.py` holds the matching nn.Modules, which dequantize inside the matmul / lookup kernel.
"""

from __future__ import annotations

import dataclasses
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
    # affine only: without a min, w' = (q - zero) * scale (Q6_K's 6-bit layout); 0: q * scale + min
    zero: int = 0
    # per-tensor schemes (qk*_a) only: ((module, bits), ...), the affine layout of each packed module whose width
    # its source fixed (AFFINE_LAYOUTS); the others take the scheme's own bits, group and zero
    widths: tuple[tuple[str, int], ...] = ()
    per_tensor: bool = False

    @property
    def has_min(self) -> bool:
        """Whether a packed weight has q_min (the affine layouts with zero 0)."""
        return self.kind == "affine" and self.zero == 0

    @property
    def high_bits(self) -> int:
        """Bits of a value stored in q_high, above the nibble in q_weight (affine 5- and 6-bit layouts)."""
        return self.bits - 4 if self.kind == "affine" and self.bits > 4 else 0

    @property
    def high_per_word(self) -> int:
        return 32 // self.high_bits

    def layout(self, module: str) -> "Quantization":
        """The scheme as it applies to packed module `module` (e.g. "transformer.h.0.attn.c_attn"): for a
        per-tensor scheme, its recorded width's layout; any other scheme is the same for every module."""
        if not self.per_tensor:
            return self
        bits, group, zero = AFFINE_LAYOUTS[dict(self.widths).get(module, self.bits)]
        return dataclasses.replace(self, bits=bits, group_size=group, zero=zero, widths=())

    @property
    def max_group(self) -> int:
        """The largest group any module of the scheme uses (tensor parallelism must not split one)."""
        return max([self.group_size] + [AFFINE_LAYOUTS[b][1] for _, b in self.widths])

    def parts(self, shape: tuple[int, int]) -> list[tuple[str, tuple[int, int], str]]:
        """(part, shape, dtype) of the parameters a packed weight of `shape` becomes, in the model's order (the
        order `quantize` returns them): q_weight, q_scale, then q_min and q_high where the layout has them."""
        wshape, sshape = self.packed_shape(shape)
        out = [("q_weight", wshape, self.storage_dtype), ("q_scale", sshape, self.scale_dtype)]
        if self.has_min:
            out.append(("q_min", sshape, "float32"))
        if self.high_bits:
            out.append(("q_high", (shape[0], -(-shape[1] // self.high_per_word)), "uint32"))
        return out

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
        """Values per stored element: 8 int4 (or low nibbles of wider affine values) per uint32 word; int8 is
        stored unpacked."""
        return 1 if self.bits == 8 else 8

    @property
    def storage_dtype(self) -> str:
        return "int8" if self.bits == 8 else "uint32"

    @property
    def max_int(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "model_dtype": self.model_dtype, "bits": self.bits,
                "group_size": self.group_size, "quantize_lm_head": self.quantize_lm_head,
                **({"widths": dict(self.widths)} if self.widths else {})}

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
        # per-tensor widths (GGUF K-quant mixes); 6 bits where the source records none
        Quantization("qkf16_a", "affine", "float16", bits=6, group_size=16, zero=32, per_tensor=True),
        Quantization("qkf32_a", "affine", "float32", bits=6, group_size=16, zero=32, per_tensor=True),
    ]
}

# bits → (bits, group, zero) of the affine layouts (module docstring)
AFFINE_LAYOUTS = {4: (4, 32, 0), 5: (5, 32, 0), 6: (6, 16, 32)}


def get_quantization(name: str, quantize_lm_head: bool = True) -> Quantization:
    try:
        q = QUANTIZATIONS[name]
    except KeyError:
        raise GptbcError(f"--quantization {name}: unknown scheme (choose from {', '.join(QUANTIZATIONS)})") from None
    if q.packed and not quantize_lm_head:
        q = dataclasses.replace(q, quantize_lm_head=False)
    return q


def quantization_of(described: dict, where: str = "the manifest") -> Quantization:
    """The scheme a manifest's `quantization` field (Quantization.describe()) names, per-tensor widths included."""
    q = get_quantization(described["name"], described.get("quantize_lm_head", True))
    widths = described.get("widths") or {}
    if not isinstance(widths, dict) or any(not isinstance(b, int) or b not in AFFINE_LAYOUTS
                                           for b in widths.values()):
        raise GptbcError(f"{where}: quantization.widths must map modules to bits "
                         f"({', '.join(map(str, AFFINE_LAYOUTS))}), got {widths!r}")
    if widths and not q.per_tensor:
        raise GptbcError(f"{where}: quantization {q.name} has no per-tensor widths, but the manifest lists some")
    return dataclasses.replace(q, widths=tuple(sorted(widths.items())))


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
    parts = [np.empty(shape, numpy_dtype(dtype)) for _, shape, dtype in q.parts((rows, cols))]
    # NaN, infinities and scales past the scale dtype's range are the converter's to refuse (it counts the
    # non-finite values of the input and of what is written), not numpy warnings
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
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


def _affine_rows(groups: np.ndarray, q: Quantization) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round to nearest: with a min, on each group's [min, max] in 2^bits - 1 steps (q, float32 scale, float32
    min); with a zero, symmetric about it (q - zero in -zero..zero - 1; q, float32 scale, None)."""
    if not q.has_min:
        amax = np.abs(groups).max(axis=-1)
        step = (amax / (q.zero - 1)).astype(np.float32)
        ints = np.clip(np.rint(groups / np.where(step == 0, 1, step)[..., None]), -q.zero, q.zero - 1) + q.zero
        return ints, step, None
    top = (1 << q.bits) - 1
    lo, hi = groups.min(axis=-1), groups.max(axis=-1)
    step = ((hi - lo) / top).astype(np.float32)
    ints = np.clip(np.rint((groups - lo[..., None]) / np.where(step == 0, 1, step)[..., None]), 0, top)
    return ints, step, lo.astype(np.float32)


def pack_bits(ints: np.ndarray, bits: int = 4) -> np.ndarray:
    """uint [rows, nk] values below 2^bits → uint32 [rows, k] (n = 32 / bits), value j at bits
    `bits` (j % n) of word j // n."""
    n = 32 // bits
    ints = ints.astype(np.uint32).reshape(ints.shape[0], -1, n)
    return np.bitwise_or.reduce(ints << (np.arange(n, dtype=np.uint32) * bits), axis=-1).astype(np.uint32)


def pack_nibbles(ints: np.ndarray) -> np.ndarray:
    """uint [rows, 8k] values 0..15 → uint32 [rows, k], value j at bits 4 (j % 8) of word j // 8."""
    return pack_bits(ints, 4)


def pack_affine(ints: np.ndarray, q: Quantization) -> tuple[np.ndarray, np.ndarray | None]:
    """Unsigned values [rows, cols] (cols a multiple of q's words) → (q_weight nibbles, q_high or None)."""
    ints = ints.astype(np.uint32)
    if not q.high_bits:
        return pack_bits(ints, 4), None
    return pack_bits(ints & 15, 4), pack_bits(ints >> 4, q.high_bits)


def unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of pack_bits: uint32 [rows, k] → uint32 [rows, k * 32 / bits]."""
    shifts = (np.arange(32 // bits, dtype=np.uint32) * bits)[None, None, :]
    return ((words[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)).reshape(words.shape[0], -1)


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
        ints, step, low = _affine_rows(groups, q)
        nibbles, high = pack_affine(ints.reshape(rows, padded), q)
        return tuple(x for x in (nibbles[:, :packed_shape[1]], step, low, high) if x is not None)
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
               minimum: np.ndarray | None = None, high: np.ndarray | None = None) -> np.ndarray:
    """The inverse of `quantize`, float32[rows, cols] (`minimum`, `high`: an affine layout's q_min, q_high)."""
    if q.bits == 8:
        ints = packed[:, :cols].astype(np.float32)
    else:
        ints = unpack_bits(packed, 4)[:, :cols]
        if q.high_bits:
            ints = ints | (unpack_bits(high, q.high_bits)[:, :cols] << np.uint32(4))
        ints = ints.astype(np.float32)
        if q.kind == "affine":
            step = np.repeat(scale.astype(np.float32), q.group_size, axis=1)[:, :cols]
            if not q.has_min:
                return (ints - np.float32(q.zero)) * step  # gguf's Q6_K: (d sc) (q - 32)
            return ints * step + np.repeat(minimum.astype(np.float32), q.group_size, axis=1)[:, :cols]
        ints -= q.max_int
    s = np.repeat(scale.astype(np.float32), q.group_size, axis=1)[:, :cols]
    return ints * s


def dequantize_parts(parts: dict[str, np.ndarray], cols: int, q: Quantization) -> np.ndarray:
    """`dequantize` of a packed weight given as {part: array} (q_weight, q_scale, q_min, q_high as it has them)."""
    return dequantize(parts["q_weight"], parts["q_scale"], cols, q, parts.get("q_min"), parts.get("q_high"))
