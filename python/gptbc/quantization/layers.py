"""The Linear and Embedding layers a quantization scheme gives the model, as Relax `nn.Module`s.

A grouped scheme's weight is two parameters, `q_weight` (packed ints) and `q_scale`, laid out as
`quantization/__init__.py` describes; `QuantizedLinear` and `QuantizedEmbedding` dequantize inside the
matmul / row-lookup kernel itself, so no full-size float copy of a weight ever exists. An unquantized
scheme gets `Linear`, whose half-precision matmul accumulates in float32.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from . import Quantization


def _dequant(w: te.Tensor, s: te.Tensor, row, col, q: Quantization):
    """float32 value of weight (row, col): unpack the int (int4), remove the offset, scale its group."""
    scale = tirx.Cast("float32", s[row, col // q.group_size])
    if q.bits == 8:
        return tirx.Cast("float32", w[row, col]) * scale
    word = w[row, col // q.per_word]
    shift = tirx.Cast("uint32", (col % q.per_word) * q.bits)
    bits = (word >> shift) & tirx.const((1 << q.bits) - 1, "uint32")
    return (tirx.Cast("float32", bits) - float(q.max_int)) * scale


def dequant_matmul(x: Tensor, q_weight: Tensor, q_scale: Tensor, in_features: int, q: Quantization,
                   out_dtype: str) -> Tensor:
    """x @ dequantize(q_weight, q_scale).T in one kernel, accumulating in float32."""

    def compute(x: te.Tensor, w: te.Tensor, s: te.Tensor):
        *lead, _ = x.shape
        k = te.reduce_axis((0, in_features), name="k")
        # A block of its own, so a schedule can either inline it into the matmul (decode: each weight is
        # read once anyway) or dequantize a panel once and reuse it for many rows of x (prefill).
        weight = te.compute((w.shape[0], in_features), lambda n, j: _dequant(w, s, n, j, q), name="dequantize")

        def dot(*idx):
            return te.sum(tirx.Cast("float32", x[(*idx[:-1], k)]) * weight[idx[-1], k], axis=k)

        acc = te.compute((*lead, w.shape[0]), dot, name="dequant_matmul")
        if out_dtype == "float32":
            return acc
        return te.compute(acc.shape, lambda *i: tirx.Cast(out_dtype, acc(*i)), name="dequant_matmul_cast")

    return op.tensor_expr_op(compute, "dequant_matmul", [x, q_weight, q_scale])


class QuantizedLinear(nn.Module):
    """nn.Linear with a grouped-int weight: parameters q_weight, q_scale (and bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, q: Quantization):
        self.in_features, self.q = in_features, q
        wshape, sshape = q.packed_shape((out_features, in_features))
        self.q_weight = nn.Parameter(wshape, q.storage_dtype)
        self.q_scale = nn.Parameter(sshape, q.model_dtype)
        self.bias = nn.Parameter((out_features,), q.model_dtype) if bias else None

    def forward(self, x: Tensor, out_dtype: str | None = None) -> Tensor:
        y = dequant_matmul(x, self.q_weight, self.q_scale, self.in_features, self.q, out_dtype or self.q.model_dtype)
        return y + self.bias if self.bias is not None else y


class QuantizedEmbedding(nn.Module):
    """nn.Embedding with grouped-int rows; `weight_matmul` serves a tied lm_head."""

    def __init__(self, num: int, dim: int, q: Quantization):
        self.dim, self.q = dim, q
        wshape, sshape = q.packed_shape((num, dim))
        self.q_weight = nn.Parameter(wshape, q.storage_dtype)
        self.q_scale = nn.Parameter(sshape, q.model_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        q, dim = self.q, self.dim

        def compute(ids: te.Tensor, w: te.Tensor, s: te.Tensor):
            last = w.shape[0] - 1

            def row(i):  # out-of-range ids clamped, as model.take_rows does for a float table
                return tirx.max(tirx.min(ids[i], tirx.Cast(ids.dtype, last)), tirx.const(0, ids.dtype))

            return te.compute((ids.shape[0], dim),
                              lambda i, k: tirx.Cast(q.model_dtype, _dequant(w, s, row(i), k, q)), name="dequant_take")

        return op.tensor_expr_op(compute, "dequant_take", [ids, self.q_weight, self.q_scale])

    def weight_matmul(self, x: Tensor) -> Tensor:
        return dequant_matmul(x, self.q_weight, self.q_scale, self.dim, self.q, "float32")


class Linear(nn.Module):
    """nn.Linear whose half-precision matmul accumulates in float32 (a K=8192 bf16 sum loses digits)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str):
        self.dtype = dtype
        self.weight = nn.Parameter((out_features, in_features), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor, out_dtype: str | None = None) -> Tensor:
        out_dtype = out_dtype or self.dtype
        y = op.matmul(x, op.permute_dims(self.weight), out_dtype="float32" if self.dtype != "float32" else None)
        if self.bias is not None:
            y = y + (self.bias if self.dtype == "float32" else self.bias.astype("float32"))
        return y if y.dtype == out_dtype else y.astype(out_dtype)


def make_linear(in_features: int, out_features: int, bias: bool, q: Quantization, quantized: bool) -> nn.Module:
    """The linear layer for weight `quantized` (see `is_quantized`) under scheme `q`."""
    if quantized:
        return QuantizedLinear(in_features, out_features, bias, q)
    return Linear(in_features, out_features, bias, q.model_dtype)
