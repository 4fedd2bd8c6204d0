"""GPTBigCode (SantaCoder, StarCoder) as a Relax `nn.Module`, read top to bottom like the HF model.

Differences from HF that are layout only:
- attention runs through the paged KV cache (`attention_with_fused_qkv`), which wants the fused
  c_attn output as [all q heads, all k heads, all v heads]. MQA checkpoints are already laid out
  that way; MHA checkpoints are per-head (q, k, v) and the loader reorders them (`loader.py`).
- positions come from the KV cache, so a decode step gets the position of its sequence.
- with tied embeddings there is no `lm_head` parameter: logits reuse `wte` (as HF does).
"""

from __future__ import annotations

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from .config import ACTIVATIONS, GPTBigCodeConfig


class Attention(nn.Module):
    def __init__(self, cfg: GPTBigCodeConfig, dtype: str):
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.sm_scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv_dim, bias=True, dtype=dtype)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=True, dtype=dtype)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.c_attn(x), (b, s, self.n_head + 2 * self.n_kv_head, self.head_dim))
        out = kv_cache.attention_with_fused_qkv(layer_id, qkv, self.n_head, sm_scale=self.sm_scale)
        return self.c_proj(op.reshape(out, (b, s, self.n_head * self.head_dim)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTBigCodeConfig, dtype: str):
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_inner, bias=True, dtype=dtype)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd, bias=True, dtype=dtype)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.act == "gelu_tanh":
            h = op.gelu(h, approximate="tanh")  # HF "gelu_pytorch_tanh"; nn.op.gelu defaults to erf
        elif self.act == "gelu_erf":
            h = op.gelu(h)
        else:
            h = op.relu(h)
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTBigCodeConfig, dtype: str):
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, dtype=dtype)
        self.attn = Attention(cfg, dtype)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, dtype=dtype)
        self.mlp = MLP(cfg, dtype)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer_id)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: GPTBigCodeConfig, dtype: str):
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd, dtype=dtype)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd, dtype=dtype)
        self.h = nn.ModuleList([Block(cfg, dtype) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, dtype=dtype)

    def forward(self, embeds: Tensor, kv_cache: PagedKVCache) -> Tensor:
        """Hidden states before ln_f (callers pick the rows they need logits for, then apply ln_f)."""
        b, s, d = embeds.shape
        positions = kv_cache.get_query_positions(b * s)
        x = embeds + op.reshape(take_rows(self.wpe.weight, positions), (b, s, d))
        for layer_id, block in enumerate(self.h):
            x = block(x, kv_cache, layer_id)
        return x


def take_rows(table: Tensor, index: Tensor, axis: int = 0) -> Tensor:
    """table[index] along `axis`, out-of-range indices clamped rather than read out of bounds.

    The runtime rejects bad token ids before calling us; clamping is the second line of defence
    (TVM's default "fast" take would read arbitrary memory, and warns about it at every compile).
    """
    return nn.wrap_nested(relax.op.take(table._expr, index._expr, axis=axis, mode="clip"), name="take_rows")


def _last_row(x: Tensor) -> Tensor:
    """(b, s, d) → (b, 1, d): the last position, whose logits predict the next token."""

    def compute(x: te.Tensor):
        b, s, d = x.shape
        return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="last_row")

    return op.tensor_expr_op(compute, "last_row", [x])


class GPTBigCodeForCausalLM(nn.Module):
    def __init__(self, cfg: GPTBigCodeConfig, target: Target, dtype: str = "float32"):
        self.cfg, self.target, self.dtype = cfg, target, dtype
        self.transformer = Transformer(cfg, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False,
                                                                       dtype=dtype)

    def logits(self, hidden: Tensor) -> Tensor:
        hidden = self.transformer.ln_f(hidden)
        if self.lm_head is None:
            out = op.matmul(hidden, op.permute_dims(self.transformer.wte.weight))
        else:
            out = self.lm_head(hidden)
        return out if out.dtype == "float32" else out.astype("float32")

    # ---- exported functions (see get_default_spec for their signatures) ----
    def embed(self, input_ids: Tensor) -> Tensor:
        return take_rows(self.transformer.wte.weight, input_ids)

    def prefill(self, input_embed: Tensor, kv_cache: PagedKVCache):
        return self.logits(_last_row(self.transformer(input_embed, kv_cache))), kv_cache

    def decode(self, input_embed: Tensor, kv_cache: PagedKVCache):
        return self.logits(self.transformer(input_embed, kv_cache)), kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, kv_cache: PagedKVCache):
        hidden = self.transformer(input_embeds, kv_cache)
        return self.logits(take_rows(hidden, logit_positions, axis=1)), kv_cache

    def batch_decode(self, input_embeds: Tensor, kv_cache: PagedKVCache):
        return self.logits(self.transformer(input_embeds, kv_cache)), kv_cache

    def batch_verify(self, input_embeds: Tensor, kv_cache: PagedKVCache):
        return self.logits(self.transformer(input_embeds, kv_cache)), kv_cache

    def create_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                              prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                              support_sliding_window: tirx.Var) -> PagedKVCache:
        cfg = self.cfg
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=_relax_shape([0, cfg.n_layer]),
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head,
            qk_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE,  # GPTBigCode has learned absolute positions (wpe), no RoPE
            rope_scale=1,
            rope_theta=10000,
            rope_scaling={},
            rope_ext_factors=_relax_shape([]),
            rotary_dim=cfg.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    def get_default_spec(self) -> dict:
        e, dt = self.cfg.n_embd, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        return {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", e], dt), "kv_cache": kv, "$": packed},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, e], dt), "kv_cache": kv, "$": packed},
            "batch_prefill": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", e], dt),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "kv_cache": kv,
                "$": packed,
            },
            "batch_decode": {"input_embeds": nn.spec.Tensor(["batch_size", 1, e], dt), "kv_cache": kv, "$": packed},
            "batch_verify": {"input_embeds": nn.spec.Tensor([1, "seq_len", e], dt), "kv_cache": kv, "$": packed},
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }


def _relax_shape(values: list[int]):
    from tvm import relax

    return relax.ShapeExpr(values)
