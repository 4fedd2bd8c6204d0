"""GPTQ and AWQ checkpoints (AutoGPTQ / optimum / AutoAWQ safetensors, as vLLM and TGI load them) as a checkpoint
the converter reads: each quantized linear layer under its gpt_bigcode `.weight` name.

Layouts (4-bit; a layer with `in` inputs, `out` outputs and groups of `g` inputs, g = in when group_size is -1):
  GPTQ  qweight int32 [in / 8, out]   8 inputs per word, input 8r + j in bits 4j..4j+3
        qzeros  int32 [in / g, out / 8] 8 outputs per word in order, stored as zero - 1 (the "gptq" checkpoint
                                         format; "gptq_v2" stores the zero itself)
        scales  fp16  [in / g, out], g_idx int32 [in]: the group of each input
        weight[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])
  AWQ   qweight int32 [in, out / 8]   8 outputs per word, nibble k holding output 8c + (0, 2, 4, 6, 1, 3, 5, 7)[k]
        qzeros  int32 [in / g, out / 8] same packing, the zero itself; scales fp16 [in / g, out]
        weight[o, i] = scales[i // g, o] * (q[i, o] - zero[i // g, o])
        gpt_bigcode AWQ checkpoints also carry `mlp.act.scales` [n_inner]: the GELU output is divided by them
        before mlp.c_proj, which is the same as dividing c_proj's input columns by them (folded here).
A symmetric GPTQ layer (every zero 8) whose groups are runs of inputs is exactly q4*_1: nibble 15 - q and scale
-s give (15 - q - 7) * -s = s * (q - 8), each scale repeated over the groups of 32 it covers. An asymmetric one
(and AWQ without activation scales) is exactly q4*_a: q * s + (-z * s). A layer neither holds (desc_act with
several groups; AWQ's c_proj with activation scales folded in) is dequantized to float32 here and re-quantized by
the converter, which prints the error it measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gptbc.artifact.config import GPTBigCodeConfig
from gptbc.artifact.files import HF_CONFIG, clip, read_json, reading
from gptbc.artifact.params import hf_shapes
from gptbc.artifact.quantization import Quantization, numpy_dtype, pack_nibbles
from gptbc.errors import GptbcError

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
AWQ_ORDER = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # nibble k of a word → output 8c + ... read back: AWQ_ORDER[o % 8]
SHIFTS = np.arange(8, dtype=np.uint32) * 4


def quant_config(directory: Path) -> dict[str, Any] | None:
    """The GPTQ / AWQ settings of an HF directory (quantize_config.json or config.json's quantization_config),
    with `quant_method`; None for a float checkpoint."""
    with reading(directory / HF_CONFIG, "quantization settings"):
        return _quant_config(directory)


def _quant_config(directory: Path) -> dict[str, Any] | None:
    raw = read_json(directory / HF_CONFIG).get("quantization_config")
    if (directory / "quantize_config.json").is_file():
        raw = {"quant_method": "gptq", **read_json(directory / "quantize_config.json")}
    elif (directory / "quant_config.json").is_file():
        raw = {"quant_method": "awq", **read_json(directory / "quant_config.json")}
    if not raw:
        return None
    method = str(raw.get("quant_method", "")).lower()
    where = directory / HF_CONFIG
    if method not in ("gptq", "awq"):
        raise GptbcError(f"{where}: quantization_config quant_method {clip(method)} is not one gptbc reads "
                         f"(gptq, awq)")
    def number(key: str, value: Any) -> int:
        if type(value) is not int:
            raise GptbcError(f"{where}: {method} {key} must be an integer, got {clip(value)}")
        return value

    bits = number("bits", raw.get("bits", raw.get("w_bit", 4)))
    if bits != 4:
        raise GptbcError(f"{where}: {method} with {bits}-bit weights; gptbc reads 4-bit GPTQ/AWQ checkpoints only")
    version = str(raw.get("version", "gemm")).lower()
    if method == "awq" and version != "gemm":
        raise GptbcError(f"{where}: AWQ version {clip(version)}; gptbc reads the GEMM layout only")
    fmt = str(raw.get("checkpoint_format", "gptq")).lower()
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        raise GptbcError(f"{where}: GPTQ checkpoint_format {clip(fmt)} is not one gptbc reads (gptq, gptq_v2)")
    group = number("group_size", raw.get("group_size", raw.get("q_group_size", 128)))
    if group != -1 and not 0 < group <= 1 << 20:
        raise GptbcError(f"{where}: {method} group_size must be -1 or positive, got {group}")
    return {"method": method, "group_size": group, "desc_act": bool(raw.get("desc_act", False)),
            "zero_offset": 1 if method == "gptq" and fmt == "gptq" else 0}


def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 [..., n] → uint8 [..., n, 8]: nibble k of each word (bits 4k..4k+3)."""
    return ((words.view(np.uint32)[..., None] >> SHIFTS) & 15).astype(np.uint8)


class QuantizedCheckpoint:
    """A GPTQ / AWQ checkpoint under gpt_bigcode names (the `convert.Checkpoint` interface plus `carried` and
    `type_of`); unquantized tensors pass through from `ckpt`."""

    def __init__(self, ckpt, cfg: GPTBigCodeConfig, settings: dict[str, Any]):
        self.ckpt, self.cfg, self.s = ckpt, cfg, settings
        self.directory = ckpt.directory
        self.method = settings["method"].upper()
        for name, shape in hf_shapes(cfg):
            module = self._module(name)
            if module is not None:
                self._check_layout(module, shape)

    def _check_layout(self, module: str, shape: tuple[int, ...]) -> None:
        """The packed tensors of a [out, in] layer have the shapes and dtypes its method and group_size give:
        checked before any of them is read (a mis-shaped qzeros would otherwise be unpacked into garbage)."""
        out, n_in = shape
        size = self.s["group_size"]
        group = n_in if size == -1 else size
        where = self.ckpt.source_of(f"{module}.qweight")
        if n_in % group or out % 8 or n_in % 8:
            raise GptbcError(f"{where}: {module} is a [{out}, {n_in}] layer, which {self.method} group_size "
                             f"{size} does not divide into whole groups (of 8-value words)")
        groups = n_in // group
        want = {"qweight": ((n_in // 8, out) if self.method == "GPTQ" else (n_in, out // 8), "int32"),
                "qzeros": ((groups, out // 8), "int32"), "scales": ((groups, out), "float16")}
        if self.method == "GPTQ" and f"{module}.g_idx" in self.ckpt:
            want["g_idx"] = ((n_in,), "int32")
        for part, (shape_, dtype) in want.items():
            name = f"{module}.{part}"
            if name not in self.ckpt:
                raise GptbcError(f"{where}: tensor {name} is missing")
            have_dtype, have_shape = self.ckpt.info(name)
            kind_ok = {"scales": have_dtype.kind == "f" or str(have_dtype) == "bfloat16",
                       "g_idx": have_dtype.kind in "iu"}.get(part, str(have_dtype) == dtype)
            if tuple(have_shape) != shape_ or not kind_ok:
                raise GptbcError(f"{self.ckpt.source_of(name)}: tensor {name} is {have_dtype}{list(have_shape)}, "
                                 f"a {self.method} [{out}, {n_in}] layer with group_size {size} has "
                                 f"{dtype}{list(shape_)}")

    def _module(self, name: str) -> str | None:
        """The quantized module a `.weight` name stands for, if it is one."""
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.endswith(tuple("." + m for m in LINEARS)) \
                and f"{module}.qweight" in self.ckpt:
            return module
        return None

    def __contains__(self, name: str) -> bool:
        return self._module(name) is not None or name in self.ckpt

    def type_of(self, name: str) -> str:
        return self.method if self._module(name) else str(self.ckpt.info(name)[0]).upper()

    def _shape(self, module: str) -> tuple[int, int]:
        _, qshape = self.ckpt.info(f"{module}.qweight")
        _, sshape = self.ckpt.info(f"{module}.scales")
        n_in = qshape[0] * (8 if self.method == "GPTQ" else 1)
        return int(sshape[1]), int(n_in)

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        module = self._module(name)
        return (np.dtype("float32"), self._shape(module)) if module else self.ckpt.info(name)

    def _parts(self, module: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(q [out, in], zero [out, groups], scale float32 [out, groups], group of each input [in])."""
        out, n_in = self._shape(module)
        qweight, qzeros = self.ckpt.get(f"{module}.qweight"), self.ckpt.get(f"{module}.qzeros")
        scales = self.ckpt.get(f"{module}.scales")
        groups = scales.shape[0]
        if self.method == "GPTQ":
            q = _nibbles(qweight).transpose(1, 0, 2).reshape(out, n_in)  # [in/8, out, 8] → [out, in]
            zero = _nibbles(qzeros).reshape(groups, out).T + np.uint8(self.s["zero_offset"])
            key = f"{module}.g_idx"
            g_idx = self.ckpt.get(key).astype(np.int64) if key in self.ckpt else np.arange(n_in) // (n_in // groups)
        else:
            q = _nibbles(qweight)[:, :, AWQ_ORDER].reshape(n_in, out).T
            zero = _nibbles(qzeros)[:, :, AWQ_ORDER].reshape(groups, out).T
            g_idx = np.arange(n_in) // (n_in // groups)
        if g_idx.shape != (n_in,) or g_idx.min() < 0 or g_idx.max() >= groups:
            raise GptbcError(f"{self.ckpt.source_of(module + '.qweight')}: {module}.g_idx does not name one of its "
                             f"{groups} groups for each of its {n_in} inputs")
        return q, zero, np.asarray(scales, np.float32).T, g_idx

    def get(self, name: str) -> np.ndarray:
        module = self._module(name)
        if module is None:
            return self.ckpt.get(name)
        q, zero, scale, g_idx = self._parts(module)
        w = (q.astype(np.float32) - zero[:, g_idx]) * scale[:, g_idx]
        act = self._act_scales(module)
        if act is not None:  # AWQ's ScaledActivation: gelu(x) / s feeds c_proj
            w /= np.asarray(self.ckpt.get(act), np.float32)[None, :]
        return w

    def _carryable(self, module: str) -> bool:
        """Symmetric (every zero 8) with each 32 inputs of a gptbc group inside one GPTQ group: read from the
        zeros and g_idx alone, without unpacking the weight."""
        if self.method != "GPTQ" or f"{module}.qweight" not in self.ckpt:
            return False
        out, n_in = self._shape(module)
        if n_in % 32:
            return False
        qzeros = self.ckpt.get(f"{module}.qzeros")
        groups = qzeros.shape[0]
        key = f"{module}.g_idx"
        g_idx = self.ckpt.get(key).astype(np.int64) if key in self.ckpt else np.arange(n_in) // (n_in // groups)
        zero = _nibbles(qzeros) + np.uint8(self.s["zero_offset"])
        return bool(np.all(zero == 8) and g_idx.shape == (n_in,) and np.all(g_idx[::32] == g_idx.reshape(-1, 32).T))

    def carried(self, name: str, quant: Quantization) -> tuple[np.ndarray, ...] | None:
        """(q_weight, q_scale) holding the layer exactly: a symmetric GPTQ layer in q4*_1 (`_carryable`), any
        layer whose groups are runs of 32 inputs in q4*_a (q * s + (-z * s), both terms exact), except AWQ layers
        whose activation scales were folded in (that division leaves the grid)."""
        module = self._module(name)
        if module is None or quant.bits != 4:
            return None
        if quant.kind == "group" and self._carryable(module):
            q, _, _, g_idx = self._parts(module)
            s16 = self.ckpt.get(f"{module}.scales").T  # fp16, as stored
            return pack_nibbles(15 - q), (-s16[:, g_idx[::32]]).astype(numpy_dtype(quant.model_dtype))
        if quant.kind != "affine" or self._act_scales(module) is not None:
            return None
        q, zero, scale, g_idx = self._parts(module)
        if q.shape[1] % 32 or np.any(g_idx[::32] != g_idx.reshape(-1, 32).T):
            return None
        step, first = scale[:, g_idx[::32]], g_idx[::32]
        low = -(zero[:, first].astype(np.float32) * step)
        return pack_nibbles(q), step, low

    def _act_scales(self, module: str) -> str | None:
        """The name of the AWQ activation scales that divide this layer's input, if any."""
        act = module.replace("mlp.c_proj", "mlp.act") + ".scales"
        return act if module.endswith("mlp.c_proj") and act in self.ckpt else None

    def exact_scheme(self) -> str | None:
        """q4f16_1 when every quantized layer can be carried into it, q4f16_a when every one can be carried into
        that (asymmetric layers), else None."""
        modules = [f"transformer.h.{i}.{m}" for i in range(self.cfg.n_layer) for m in LINEARS]
        if all(self._carryable(m) for m in modules):
            return "q4f16_1"
        affine = Quantization("q4f16_a", "affine", "float16", bits=4, group_size=32)
        return "q4f16_a" if all(self.carried(m + ".weight", affine) is not None for m in modules) else None

    def why_not_exact(self) -> str:
        if self.s["desc_act"] and self.s["group_size"] != -1:
            return ("it was quantized with desc_act and several groups, so a group is not a run of inputs "
                    "(g_idx), which gptbc's groups of 32 must be")
        return ("its mlp.act.scales divide the GELU output before mlp.c_proj, which no gptbc scheme computes "
                "(folded into the weight, the values leave the 4-bit grid)")

    def release(self, name: str) -> None:
        module = self._module(name)
        for n in ([f"{module}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")] if module else [name]):
            if n in self.ckpt:
                self.ckpt.release(n)

    def source_of(self, name: str) -> Path:
        module = self._module(name)
        return self.ckpt.source_of(f"{module}.qweight" if module else name)

    def close(self) -> None:
        self.ckpt.close()
