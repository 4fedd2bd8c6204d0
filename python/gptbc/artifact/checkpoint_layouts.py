"""Checkpoint layouts other than HF `gpt_bigcode`: the original (remote-code) SantaCoder.

`bigcode/santacoder` and its branches (`mha`, `no-fim`, `fim`, `stars`, `fertility`, `comments`, `dedup-alt`,
`final`) predate transformers' `gpt_bigcode`. Their config says `model_type: "gpt2"`, architecture
`GPT2LMHeadCustomModel`, `auto_map` → `configuration_gpt2_mq.GPT2CustomConfig` / `modeling_gpt2_mq
.GPT2LMHeadCustomModel`, and `attention_head_type: "multiquery" | "multihead"`.

The layout below follows that modeling code, read from the copy the bigcode Megatron-LM fork ships
(`tools/hf_transformers/modeling_gpt2_mq.py` and `tools/hf_transformers/convert_checkpoint.py`, the script
that produced these checkpoints; found in NVIDIA/Megatron-LM's history), and TGI's `flash_santacoder_modeling.py`,
which loads the same files with `config.transpose`:

* Every linear layer is a GPT-2 `Conv1D`: `weight` is stored [in, out] and `y = x @ W + b`. gpt_bigcode uses
  `nn.Linear`, [out, in]; so every `attn.*`/`mlp.*` weight is transposed. Biases are the same.
* Multi-query (`GPT2MQAttention`): `q_attn = Conv1D(embed_dim, embed_dim)` and
  `kv_attn = Conv1D(2 * head_dim, embed_dim)`; `key, value = kv_attn(h).split(head_dim, dim=2)`.
  gpt_bigcode's MQA `c_attn` rows are [q (embed_dim); k (head_dim); v (head_dim)] (`split((embed_dim,
  kv_dim, kv_dim))`), so c_attn = concat(q_attn.T, kv_attn.T) along the output axis, biases concatenated.
* Multi-head (`GPT2CustomBlock` keeps GPT-2's own `GPT2Attention`): `c_attn = Conv1D(3 * embed_dim, embed_dim)`
  and `query, key, value = c_attn(h).split(embed_dim, dim=2)`: the output columns are [all q | all k | all v]
  (the Megatron converter reorders Megatron's per-head interleaving into this with
  `fix_query_key_value_ordering`). gpt_bigcode's MHA c_attn is instead per head: its
  `GPTBigCodeAttention` does `c_attn(h).view(b, s, num_heads, 3 * head_dim)` then splits each head's
  3 * head_dim into (q, k, v). This view therefore rewrites the original [q|k|v] blocks into gpt_bigcode's
  per-head order, so that the rest of the converter sees exactly the checkpoint transformers would.
* `lm_head` is `nn.Linear(n_embd, vocab_size, bias=False)` ([vocab, n_embd]) and tied to `wte` (GPT-2's
  `tie_word_embeddings`, default true); `wte`, `wpe`, `ln_1`, `ln_2`, `ln_f` have gpt_bigcode's names and shapes.
  The `attn.bias` / `attn.masked_bias` buffers old checkpoints carry are not parameters and are ignored.
* Activation: the config names it (`gelu_fast` in bigcode/santacoder), one of transformers' ACT2FN names.

Settings the original model has and gpt_bigcode does not (`scale_attn_by_inverse_layer_idx`,
`add_cross_attention`) are refused when set, rather than computed differently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from gptbc.artifact.files import HF_CONFIG, clip, one_line, read_json
from gptbc.errors import GptbcError

SANTACODER_ARCHITECTURES = ("GPT2LMHeadCustomModel", "GPT2CustomModel")
ATTENTION_HEAD_TYPES = {"multiquery": True, "multihead": False}  # → gpt_bigcode multi_query
# GPT2Config / GPT2CustomConfig fields that carry over unchanged to gpt_bigcode.
_SHARED_FIELDS = ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size", "n_inner", "layer_norm_epsilon",
                  "activation_function", "scale_attn_weights", "tie_word_embeddings", "bos_token_id",
                  "eos_token_id")


def layout_of(raw: dict[str, Any], source: str) -> str:
    """'gpt_bigcode' or 'santacoder' (the original remote-code layout); anything else is a one-line error."""
    model_type = raw.get("model_type")
    if model_type == "gpt_bigcode":
        return "gpt_bigcode"
    archs = raw.get("architectures") or []
    auto_map = raw.get("auto_map") or {}
    if model_type == "gpt2" and ("attention_head_type" in raw or any(a in SANTACODER_ARCHITECTURES for a in archs)):
        return "santacoder"
    if auto_map:  # remote code (trust_remote_code) gptbc has no mapping for
        remote = one_line(", ".join(f"{k} → {v}" for k, v in sorted(auto_map.items())), 200)
        raise GptbcError(f"{source}: model_type {clip(model_type)} (architectures {clip(archs) if archs else 'none'}, "
                         f"remote code {remote}) is not a layout gptbc understands; it reads gpt_bigcode checkpoints "
                         f"and the original SantaCoder layout (model_type 'gpt2', GPT2LMHeadCustomModel)")
    return "gpt_bigcode"  # not remote code: the config reader names what is wrong (e.g. another model_type)


def normalize_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """An HF config.json as a gpt_bigcode config dict (unchanged if it already is one)."""
    if layout_of(raw, source) != "santacoder":
        return raw
    head_type = raw.get("attention_head_type", "multihead")  # GPT2CustomConfig's default is MULTI_HEAD
    if head_type not in ATTENTION_HEAD_TYPES:
        raise GptbcError(f"{source}: attention_head_type {clip(head_type)} is not one the original SantaCoder "
                         f"code defines ({', '.join(ATTENTION_HEAD_TYPES)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if raw.get(flag):
            raise GptbcError(f"{source}: {flag} is true; gptbc computes the original SantaCoder layout only "
                             f"with it false (as every published SantaCoder checkpoint has it)")
    out: dict[str, Any] = {k: raw[k] for k in _SHARED_FIELDS if k in raw}
    out["activation_function"] = raw.get("activation_function", "gelu_new")  # GPT2Config's default
    out["model_type"] = "gpt_bigcode"
    out["multi_query"] = ATTENTION_HEAD_TYPES[head_type]
    out["_layout"] = "santacoder"
    return out


class SantaCoderView:
    """A checkpoint in the original SantaCoder layout, seen under gpt_bigcode names, shapes and orders.

    Implements the part of `convert.Checkpoint` the converter uses (`in`, `info`, `get`, `release`,
    `source_of`, `close`). Tensors are made one at a time on `get`, so conversion still streams.
    """

    def __init__(self, ckpt, cfg, head_type: str):
        self.ckpt, self.cfg, self.head_type = ckpt, cfg, head_type
        self.directory = ckpt.directory

    # name → (original tensor names, the original shapes they must have, how to build the gpt_bigcode tensor)
    def _mapping(self, name: str) -> tuple[list[str], list[tuple[int, ...]], Callable] | None:
        if not name.startswith("transformer.h.") or not name.endswith((".weight", ".bias")):
            return None
        prefix, _, rest = name.partition(".attn.") if ".attn." in name else name.partition(".mlp.")
        kind = "attn" if ".attn." in name else "mlp" if ".mlp." in name else None
        if kind is None:
            return None
        module, _, part = rest.rpartition(".")
        cfg = self.cfg
        e, d, h, inner = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_inner
        base = f"{prefix}.{kind}."
        if kind == "attn" and module == "c_attn":
            if cfg.multi_query:  # q_attn [e, e] + kv_attn [e, 2d] → c_attn [e + 2d, e]
                names = [base + f"q_attn.{part}", base + f"kv_attn.{part}"]
                if part == "weight":
                    return names, [(e, e), (e, 2 * d)], lambda q, kv: np.concatenate([q, kv], axis=1).T
                return names, [(e,), (2 * d,)], lambda q, kv: np.concatenate([q, kv])
            # multi-head: c_attn [e, 3e] with output columns [all q | all k | all v] → per head (q, k, v) rows
            names = [base + f"c_attn.{part}"]
            if part == "weight":
                return names, [(e, 3 * e)], lambda w: _qkv_blocks_to_per_head(w.T, h, d)
            return names, [(3 * e,)], lambda b: _qkv_blocks_to_per_head(b, h, d)
        shapes = {("attn", "c_proj"): (e, e), ("mlp", "c_fc"): (e, inner), ("mlp", "c_proj"): (inner, e)}
        if (kind, module) not in shapes:
            return None
        n_in, n_out = shapes[(kind, module)]
        names = [base + f"{module}.{part}"]
        if part == "weight":
            return names, [(n_in, n_out)], lambda w: w.T  # Conv1D [in, out] → Linear [out, in]
        return names, [(n_out,)], lambda b: b

    def _require(self, names: list[str], shapes: list[tuple[int, ...]]) -> np.dtype:
        dtypes = []
        for n, want in zip(names, shapes):
            if n not in self.ckpt:
                raise GptbcError(f"{self.directory}: tensor {n} is missing from the checkpoint (original SantaCoder "
                                 f"layout, attention_head_type {self.head_type})")
            dtype, shape = self.ckpt.info(n)
            if tuple(shape) != want:
                raise GptbcError(f"{self.ckpt.source_of(n)}: tensor {n} has shape {list(shape)}, the config needs "
                                 f"{list(want)} (original SantaCoder layout: GPT-2 Conv1D weights are [in, out])")
            dtypes.append(dtype)
        if len(set(map(str, dtypes))) > 1:
            raise GptbcError(f"{self.directory}: tensors {' and '.join(names)} have different dtypes "
                             f"({', '.join(map(str, dtypes))})")
        return dtypes[0]

    def __contains__(self, name: str) -> bool:
        m = self._mapping(name)
        if m is None:
            return name in self.ckpt
        self._require(m[0], m[1])  # a missing or misshapen part is an error naming that tensor
        return True

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        m = self._mapping(name)
        if m is None:
            return self.ckpt.info(name)
        dtype = self._require(m[0], m[1])
        shapes = m[1]
        if len(shapes[0]) == 1:
            return dtype, (sum(s[0] for s in shapes),)
        return dtype, (sum(s[1] for s in shapes), shapes[0][0])  # transposed: [out, in]

    def get(self, name: str) -> np.ndarray:
        m = self._mapping(name)
        if m is None:
            return self.ckpt.get(name)
        return m[2](*(self.ckpt.get(n) for n in m[0]))

    def release(self, name: str) -> None:
        m = self._mapping(name)
        for n in (m[0] if m is not None else [name]):
            if n in self.ckpt:
                self.ckpt.release(n)

    def source_of(self, name: str) -> Path:
        m = self._mapping(name)
        return self.ckpt.source_of(m[0][0] if m is not None else name)

    def close(self) -> None:
        self.ckpt.close()


def _qkv_blocks_to_per_head(x: np.ndarray, h: int, d: int) -> np.ndarray:
    """Rows [all q; all k; all v] (3, h, d) → gpt_bigcode's per-head (h, 3, d) order."""
    rest = x.shape[1:]
    return x.reshape(3, h, d, *rest).swapaxes(0, 1).reshape(3 * h * d, *rest)


def wrap_checkpoint(ckpt, hf_dir: Path, cfg):
    """The converter's hook: the checkpoint as gpt_bigcode tensors, whatever layout the directory has."""
    path = Path(hf_dir) / HF_CONFIG
    raw = read_json(path)
    if layout_of(raw, str(path)) != "santacoder":
        return ckpt
    return SantaCoderView(ckpt, cfg, raw.get("attention_head_type", "multihead"))
