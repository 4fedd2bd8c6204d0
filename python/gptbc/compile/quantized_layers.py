"""The Linear and Embedding layers a quantization scheme gives the model, as Relax `nn.Module`s.

A grouped scheme's weight is two parameters, `q_weight` (packed ints) and `q_scale`, laid out as
`quantization/__init__.py` describes; `QuantizedLinear` and `QuantizedEmbedding` dequantize inside the
matmul / row-lookup kernel itself, so no full-size float copy of a weight ever exists. An unquantized
scheme gets `Linear`, whose half-precision matmul accumulates in float32.

With int8 activations (`Quantization.int8_activations`, CPU targets) a grouped or affine (q4*_a, qk*_a: its
q_min and q_high tiled too) layer whose shape allows it
reads its weight in the tiled layout of kernels_int8.py (the runner repacks it when loading) and computes
`int8_matmul`: the input rows rounded to int8 per group of 32, integer products per group.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from gptbc.compile import kernels_int8
from gptbc.artifact.quantization import Quantization


def _dequant(w: te.Tensor, s: te.Tensor, row, col, q: Quantization, *rest: te.Tensor):
    """float32 value of weight (row, col): unpack the int (int4), remove the offset, scale its group; an affine
    layout adds its group's min instead (q * scale + min), or subtracts its zero ((q - zero) * scale), its bits
    above the nibble read from q_high. `rest`: the layout's q_min and q_high, those it has (quantization.py);
    the float operations are gguf's numpy dequantize's, in its order, so the values are the file's exactly."""
    if q.bits == 8:
        return tirx.Cast("float32", w[row, col]) * tirx.Cast("float32", s[row, col // q.group_size])
    word = w[row, col // q.per_word]
    shift = tirx.Cast("uint32", (col % q.per_word) * 4)
    ints = (word >> shift) & tirx.const(15, "uint32")
    if q.high_bits:
        high, per = rest[-1], q.high_per_word
        hshift = tirx.Cast("uint32", (col % per) * q.high_bits)
        upper = (high[row, col // per] >> hshift) & tirx.const((1 << q.high_bits) - 1, "uint32")
        ints = ints | (upper << tirx.const(4, "uint32"))
    bits = tirx.Cast("float32", ints)
    if q.kind == "affine":
        if q.has_min:
            return bits * s[row, col // q.group_size] + rest[0][row, col // q.group_size]
        return (bits - float(q.zero)) * s[row, col // q.group_size]
    return (bits - float(q.max_int)) * tirx.Cast("float32", s[row, col // q.group_size])


def dequant_matmul(x: Tensor, q_weight: Tensor, q_scale: Tensor, in_features: int, q: Quantization,
                   out_dtype: str, extra: list[Tensor] | None = None) -> Tensor:
    """x @ dequantize(q_weight, q_scale (, q_min, q_high: `extra`)).T in one kernel, accumulating in float32."""

    def compute(x: te.Tensor, w: te.Tensor, s: te.Tensor, *m: te.Tensor):
        *lead, _ = x.shape
        k = te.reduce_axis((0, in_features), name="k")
        # A block of its own, so a schedule can either inline it into the matmul (decode: each weight is
        # read once anyway) or dequantize a panel once and reuse it for many rows of x (prefill).
        weight = te.compute((w.shape[0], in_features), lambda n, j: _dequant(w, s, n, j, q, *m), name="dequantize")

        def dot(*idx):
            return te.sum(tirx.Cast("float32", x[(*idx[:-1], k)]) * weight[idx[-1], k], axis=k)

        acc = te.compute((*lead, w.shape[0]), dot, name="dequant_matmul")
        if out_dtype == "float32":
            return acc
        return te.compute(acc.shape, lambda *i: tirx.Cast(out_dtype, acc(*i)), name="dequant_matmul_cast")

    return op.tensor_expr_op(compute, "dequant_matmul", [x, q_weight, q_scale] + list(extra or []))


def int8_able(q: Quantization) -> bool:
    """Whether a layer of layout `q` has an int8-activation kernel: the grouped schemes and every affine layout
    (4- and 5-bit with a scale and min per 32, 6-bit with a scale per 16 and a zero: kernels_int8's `affine`
    and `zero`)."""
    return q.kind == "group" or (q.kind == "affine" and (
        (q.has_min and q.group_size == kernels_int8.GROUP) or (q.zero and 2 * q.group_size == kernels_int8.GROUP)))


def tiled(q: Quantization, out_features: int, in_features: int) -> bool:
    """Whether a grouped weight of this shape is used through int8 activations (and so stored tiled)."""
    return q.int8_activations and int8_able(q) and kernels_int8.tileable(out_features, in_features)


def int8_matmul(x: Tensor, q_weight: Tensor, q_scale: Tensor, in_features: int, q: Quantization,
                out_dtype: str, bias: Tensor | None = None, activation: str | None = None,
                q_min: Tensor | None = None, q_high: Tensor | None = None) -> Tensor:
    """activation(x @ W.T + bias) with x rounded to int8 per group of 32 (sx = max|x| / 127,
    xq = round(x / sx)) and W tiled; `activation` one of kernels_int8.EPILOGUES or None; `q_min` and `q_high`
    an affine weight's, those it has (tiled; the op's attributes `gptbc_affine`, `gptbc_high` (bits per value)
    and `gptbc_zero` say what the kernel reads).

    This TE body is the reference semantics: sum over k of xq * sx * dequantized weight, which equals the
    per-group integer sums times sw * sx up to float rounding. On CPUs the pipeline swaps in the integer
    kernel (kernels_int8.int8_matmul_cpu), which applies the bias and activation before storing. Opaque, so
    that fusion leaves that function alone; its attribute `gptbc_epilogue` names the activation."""
    group = kernels_int8.GROUP

    affine = q_min is not None
    high = q.high_bits if q_high is not None else 0

    def compute(x: te.Tensor, w: te.Tensor, s: te.Tensor, *rest: te.Tensor):
        m = rest[0] if affine else None
        h = rest[int(affine)] if high else None
        b = rest[int(affine) + int(bool(high)):]
        *lead, _ = x.shape
        j = te.reduce_axis((0, group), name="j")
        amax = te.compute((*lead, in_features // group), lambda *i: te.max(
            tirx.abs(tirx.Cast("float32", x[(*i[:-1], i[-1] * group + j)])), axis=j), name="act_absmax")

        def rounded(*i):  # xq * sx: x on its group's int8 grid
            m = amax[(*i[:-1], i[-1] // group)]
            inv = tirx.Select(m > 0.0, tirx.const(127.0, "float32") / m, tirx.const(0.0, "float32"))
            return tirx.nearbyint(tirx.Cast("float32", x[i]) * inv) * (m / tirx.const(127.0, "float32"))

        xr = te.compute(x.shape, rounded, name="act_quant")
        weight = te.compute((w.shape[0], in_features), lambda n, kk: kernels_int8.tiled_dequant(
            w, s, n, kk, in_features, q.bits, q.int8_layout, m, h, q.zero), name="dequantize")
        k = te.reduce_axis((0, in_features), name="k")
        acc = te.compute((*lead, w.shape[0]), lambda *i: te.sum(xr[(*i[:-1], k)] * weight[i[-1], k], axis=k),
                         name="int8_matmul")

        def finish(*i):
            v = acc(*i) + (tirx.Cast("float32", b[0][i[-1]]) if b else 0.0)
            if activation == "gelu_tanh":
                v = 0.5 * v * (1.0 + tirx.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
            elif activation == "gelu_erf":
                v = 0.5 * v * (1.0 + tirx.erf(v * 0.7071067811865476))
            elif activation == "relu":
                v = tirx.max(v, 0.0)
            return tirx.Cast(out_dtype, v)

        return te.compute(acc.shape, finish, name="int8_matmul_out")

    assert activation in (None, *kernels_int8.EPILOGUES)
    args = [x, q_weight, q_scale] + [t for t in (q_min, q_high, bias) if t is not None]
    return op.tensor_expr_op(compute, "int8_matmul", args,
                             attrs={"op_pattern": 8, "gptbc_epilogue": activation or "", "gptbc_affine": int(affine),
                                    "gptbc_high": high, "gptbc_zero": q.zero})


def activate(y: Tensor, activation: str | None) -> Tensor:
    """The MLP's activation as its own op (`config.ACTIVATIONS` values)."""
    if activation == "gelu_tanh":
        return op.gelu(y, approximate="tanh")  # HF "gelu_pytorch_tanh"; nn.op.gelu defaults to erf
    if activation == "gelu_erf":
        return op.gelu(y)
    if activation == "relu":
        return op.relu(y)
    return y


# attribute of a parameter the runner repacks when loading: "int4", "int8" (+ "_mmla" in that layout), "high1" or
# "high2" (a q_high) or "scale"
REPACK = "gptbc_repack"


def _mark_tiled(layer: nn.Module, q: Quantization) -> None:
    setattr(layer.q_weight, REPACK, kernels_int8.weight_repack(q.bits, q.int8_layout))
    setattr(layer.q_scale, REPACK, "scale")
    if layer.q_min is not None:  # tiled as the scales
        setattr(layer.q_min, REPACK, "scale")
    if layer.q_high is not None:
        setattr(layer.q_high, REPACK, f"high{q.high_bits}")


def repack_plan(named: list[tuple[str, nn.Parameter]]) -> dict[str, str]:
    """{parameter name: what its repacking is} for the tiled parameters among `named` (export_tvm's list)."""
    return {name: getattr(p, REPACK) for name, p in named if getattr(p, REPACK, None)}


def _high(q: Quantization, rows: int, cols: int) -> nn.Parameter | None:
    """q_high of an affine layout wider than 4 bits (quantization.Quantization.parts), else None."""
    return nn.Parameter(dict((n, s) for n, s, _ in q.parts((rows, cols)))["q_high"], "uint32") if q.high_bits else None


def _extra(layer: nn.Module) -> list[Tensor]:
    """The layer's q_min and q_high, those it has, in the order _dequant takes them."""
    return [p for p in (layer.q_min, layer.q_high) if p is not None]


class QuantizedLinear(nn.Module):
    """nn.Linear with a grouped-int weight: parameters q_weight, q_scale (and bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, q: Quantization):
        self.in_features, self.q = in_features, q
        self.tiled = tiled(q, out_features, in_features)
        wshape, sshape = q.packed_shape((out_features, in_features))
        self.q_weight = nn.Parameter(wshape, q.storage_dtype)
        self.q_scale = nn.Parameter(sshape, q.scale_dtype)
        self.q_min = nn.Parameter(sshape, "float32") if q.has_min else None
        self.q_high = _high(q, out_features, in_features)
        self.bias = nn.Parameter((out_features,), q.model_dtype) if bias else None
        if self.tiled:
            _mark_tiled(self, q)

    def forward(self, x: Tensor, out_dtype: str | None = None, activation: str | None = None,
                add_bias: bool = True) -> Tensor:
        """`add_bias=False`: the caller adds the bias itself (row-parallel layers add it after the allreduce)."""
        out_dtype = out_dtype or self.q.model_dtype
        bias = self.bias if add_bias else None
        if self.tiled and activation in (None, *kernels_int8.EPILOGUES):  # bias and activation in the kernel
            return int8_matmul(x, self.q_weight, self.q_scale, self.in_features, self.q, out_dtype, bias, activation,
                               self.q_min, self.q_high)
        if self.tiled:
            y = int8_matmul(x, self.q_weight, self.q_scale, self.in_features, self.q, out_dtype, q_min=self.q_min,
                            q_high=self.q_high)
        else:
            y = dequant_matmul(x, self.q_weight, self.q_scale, self.in_features, self.q, out_dtype, _extra(self))
        return activate(y + bias if bias is not None else y, activation)


class QuantizedEmbedding(nn.Module):
    """nn.Embedding with grouped-int rows; `weight_matmul` serves a tied lm_head."""

    def __init__(self, num: int, dim: int, q: Quantization):
        self.dim, self.q = dim, q
        self.tiled = tiled(q, num, dim)
        wshape, sshape = q.packed_shape((num, dim))
        self.q_weight = nn.Parameter(wshape, q.storage_dtype)
        self.q_scale = nn.Parameter(sshape, q.scale_dtype)
        self.q_min = nn.Parameter(sshape, "float32") if q.has_min else None
        self.q_high = _high(q, num, dim)
        if self.tiled:
            _mark_tiled(self, q)

    def forward(self, ids: Tensor) -> Tensor:
        q, dim, tiled_rows = self.q, self.dim, self.tiled

        def compute(ids: te.Tensor, w: te.Tensor, s: te.Tensor, *m: te.Tensor):
            last = w.shape[0] - 1

            def row(i):  # out-of-range ids clamped, as model.take_rows does for a float table
                return tirx.max(tirx.min(ids[i], tirx.Cast(ids.dtype, last)), tirx.const(0, ids.dtype))

            def value(i, k):
                if tiled_rows:
                    mins, highs = (m[0] if q.has_min else None), (m[-1] if q.high_bits else None)
                    return kernels_int8.tiled_dequant(w, s, row(i), k, dim, q.bits, q.int8_layout, mins, highs, q.zero)
                return _dequant(w, s, row(i), k, q, *m)

            return te.compute((ids.shape[0], dim), lambda i, k: tirx.Cast(q.model_dtype, value(i, k)),
                              name="dequant_take")

        return op.tensor_expr_op(compute, "dequant_take", [ids, self.q_weight, self.q_scale] + _extra(self))

    def weight_matmul(self, x: Tensor) -> Tensor:
        if self.tiled:
            return int8_matmul(x, self.q_weight, self.q_scale, self.dim, self.q, "float32", q_min=self.q_min,
                               q_high=self.q_high)
        return dequant_matmul(x, self.q_weight, self.q_scale, self.dim, self.q, "float32", _extra(self))


class Linear(nn.Module):
    """nn.Linear whose half-precision matmul accumulates in float32 (a K=8192 bf16 sum loses digits)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str):
        self.dtype = dtype
        self.weight = nn.Parameter((out_features, in_features), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor, out_dtype: str | None = None, activation: str | None = None,
                add_bias: bool = True) -> Tensor:
        out_dtype = out_dtype or self.dtype
        y = op.matmul(x, op.permute_dims(self.weight), out_dtype="float32" if self.dtype != "float32" else None)
        if self.bias is not None and add_bias:
            y = y + (self.bias if self.dtype == "float32" else self.bias.astype("float32"))
        return activate(y if y.dtype == out_dtype else y.astype(out_dtype), activation)


def make_linear(in_features: int, out_features: int, bias: bool, q: Quantization, quantized: bool) -> nn.Module:
    """The linear layer for weight `quantized` (see `is_quantized`) under scheme `q`."""
    if quantized:
        return QuantizedLinear(in_features, out_features, bias, q)
    return Linear(in_features, out_features, bias, q.model_dtype)
