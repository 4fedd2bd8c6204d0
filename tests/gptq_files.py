"""GPTQ and AWQ checkpoints written here, in their exact on-disk layouts, from the seeded HF checkpoints of
hf_models.py (round-to-nearest per group: the layout is what matters, not how the values were chosen), and the
HF model holding the values they mean (the reference a test compares gptbc against)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
AWQ_PACK = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble k of a word holds output 8c + AWQ_PACK[k]


def _pack_rows(q: np.ndarray) -> np.ndarray:
    """uint [n, 8m] → int32 [n, m]: element 8j + k in bits 4k of word j."""
    q = q.astype(np.uint32).reshape(q.shape[0], -1, 8)
    return np.bitwise_or.reduce(q << (np.arange(8, dtype=np.uint32) * 4), axis=-1).view(np.int32)


def _quantize(w: np.ndarray, g_idx: np.ndarray, groups: int, sym: bool, rng) -> tuple:
    """w [out, in] → q [out, in] (0..15), zero [groups, out], scale fp16 [groups, out]."""
    out = w.shape[0]
    scale = np.empty((groups, out), np.float16)
    zero = np.empty((groups, out), np.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            scale[g] = (np.abs(cols).max(axis=1) / 7.5).astype(np.float16)
            zero[g] = 8
        else:
            lo, hi = cols.min(axis=1), cols.max(axis=1)
            scale[g] = ((hi - lo) / 15).astype(np.float16)
            zero[g] = np.clip(np.rint(-lo / scale[g].astype(np.float32)), 0, 15)
    s = scale.astype(np.float32)[g_idx].T
    q = np.clip(np.rint(w / s) + zero[g_idx].T, 0, 15).astype(np.int64)
    return q, zero, scale


def write_quantized(hf_dir: Path, out: Path, method: str = "gptq", group_size: int = 32, sym: bool = True,
                    desc_act: bool = False, act_scales: bool = True, seed: int = 0) -> Path:
    """A copy of checkpoint `hf_dir` with every layer linear in GPTQ (AutoGPTQ, checkpoint_format "gptq") or AWQ
    (AutoAWQ GEMM) form; `desc_act` assigns inputs to groups in a random order (g_idx)."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    shutil.copytree(hf_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    for name in [n for n in tensors if n.endswith(".weight") and any(f".{m}." in n for m in LINEARS)]:
        module, w = name[:-len(".weight")], tensors.pop(name).astype(np.float32)
        n_in = w.shape[1]
        g = n_in if group_size == -1 else group_size
        order = rng.permutation(n_in) if desc_act else np.arange(n_in)
        g_idx = np.empty(n_in, np.int32)
        g_idx[order] = np.arange(n_in) // g
        q, zero, scale = _quantize(w, g_idx, n_in // g, sym, rng)
        if method == "gptq":
            tensors[f"{module}.qweight"] = _pack_rows(q.T.reshape(n_in // 8, 8, -1).transpose(0, 2, 1).reshape(-1, 8)) \
                .reshape(n_in // 8, -1)
            tensors[f"{module}.qzeros"] = _pack_rows(zero - 1)
            tensors[f"{module}.g_idx"] = g_idx
        else:
            tensors[f"{module}.qweight"] = _pack_rows(q.T.reshape(n_in, -1, 8)[:, :, AWQ_PACK].reshape(n_in, -1))
            tensors[f"{module}.qzeros"] = _pack_rows(zero.reshape(zero.shape[0], -1, 8)[:, :, AWQ_PACK]
                                                     .reshape(zero.shape[0], -1))
        tensors[f"{module}.scales"] = scale
        if method == "awq" and act_scales and module.endswith("mlp.c_fc"):
            tensors[module.replace("c_fc", "act") + ".scales"] = rng.uniform(0.5, 2.0, w.shape[0]).astype(np.float16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if method == "gptq":
        (out / "quantize_config.json").write_text(json.dumps(
            {"bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": sym, "damp_percent": 0.01}))
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                         "zero_point": True, "version": "gemm"}
        (out / "config.json").write_text(json.dumps(config))
    return out


def dequantized(directory: Path) -> dict[str, np.ndarray]:
    """gpt_bigcode `.weight` name → the float32 [out, in] values a GPTQ / AWQ layer means, computed from the
    file's fields as AutoGPTQ / AutoAWQ define them (independently of gptbc's reader)."""
    from safetensors.numpy import load_file

    t = load_file(str(directory / "model.safetensors"))
    awq = "quantization_config" in json.loads((directory / "config.json").read_text())
    shifts = np.arange(8, dtype=np.uint32) * 4
    out = {}
    for key in [k for k in t if k.endswith(".qweight")]:
        m = key[:-len(".qweight")]
        qw, qz, s = t[key].view(np.uint32), t[f"{m}.qzeros"].view(np.uint32), t[f"{m}.scales"].astype(np.float32)
        if awq:
            q = ((qw[:, :, None] >> shifts) & 15)[:, :, np.argsort(AWQ_PACK)].reshape(qw.shape[0], -1)  # [in, out]
            z = ((qz[:, :, None] >> shifts) & 15)[:, :, np.argsort(AWQ_PACK)].reshape(qz.shape[0], -1)
            g_idx = np.arange(q.shape[0]) // (q.shape[0] // s.shape[0])
        else:
            q = ((qw[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, qw.shape[1])  # [in, out]
            z = ((qz[:, :, None] >> shifts) & 15).reshape(qz.shape[0], -1) + 1
            g_idx = t[f"{m}.g_idx"]
        w = ((q.astype(np.float32) - z[g_idx].astype(np.float32)) * s[g_idx]).T  # float32, as a kernel computes
        act = m.replace("mlp.c_proj", "mlp.act") + ".scales"
        if act in t and m.endswith("mlp.c_proj"):
            w = w / t[act].astype(np.float32)[None, :]
        out[m + ".weight"] = w
    return out
