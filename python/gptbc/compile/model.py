"""GPTBigCode (SantaCoder, StarCoder) as a Relax `nn.Module`: the network, read top to bottom like the HF model.

Differences from HF that are layout only:
- attention runs through the paged KV cache (`attention_with_fused_qkv`), which wants the fused
  c_attn output as [all q heads, all k heads, all v heads]. MQA checkpoints are already laid out
  that way; MHA checkpoints are per-head (q, k, v) and the converter reorders them (`artifact/convert.py`).
- positions come from the KV cache, so a decode step gets the position of its sequence.
- with tied embeddings there is no `lm_head` parameter: logits reuse `wte` (as HF does).
- with tensor parallelism (`tp` > 1) each rank builds its slice of the network (artifact/sharding.py): its
  query heads, its share of c_fc; the row-parallel c_proj layers sum their partial products across ranks
  (`ccl_allreduce`, dispatched to the session's collective library at run time) and add their bias once.
- the quantization scheme picks the Linear / Embedding layers (`quantization/layers.py`): with a
  grouped scheme their weights are packed ints plus scales, dequantized inside the kernel.
"""

from __future__ import annotations

from typing import Iterable

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from gptbc.artifact.config import ACTIVATIONS, GPTBigCodeConfig
from gptbc.artifact.quantization import Quantization, is_quantized
from gptbc.artifact.sharding import kv_heads_per_rank
from gptbc.compile.quantized_layers import QuantizedEmbedding, make_linear


class LayerNorm(nn.Module):
    """nn.LayerNorm that normalizes in float32 when the model runs in half precision.

    TVM's layer_norm has no bfloat16 kernel, and float32 statistics are what HF computes on CPU anyway.
    """

    def __init__(self, dim: int, eps: float, dtype: str):
        self.eps, self.dtype = eps, dtype
        self.weight = nn.Parameter((dim,), dtype)
        self.bias = nn.Parameter((dim,), dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.dtype == "float32":
            return op.layer_norm(x, [x.shape[-1]], self.weight, self.bias, eps=self.eps)
        y = op.layer_norm(x.astype("float32"), [x.shape[-1]], self.weight.astype("float32"),
                          self.bias.astype("float32"), eps=self.eps)
        return y.astype(self.dtype)


def row_parallel(layer: nn.Module, x: Tensor, tp: int) -> Tensor:
    """A linear layer whose input features are split over `tp` ranks: the partial products summed across
    ranks, then the bias, once (added on every rank before the sum it would count tp times)."""
    if tp == 1:
        return layer(x)
    y = op.ccl_allreduce(layer(x, add_bias=False), "sum")
    return y + layer.bias if layer.bias is not None else y


class Attention(nn.Module):
    def __init__(self, cfg: GPTBigCodeConfig, q: Quantization, tp: int = 1, prefix: str = ""):
        self.tp, self.head_dim = tp, cfg.head_dim
        self.n_head, self.n_kv_head = cfg.n_head // tp, kv_heads_per_rank(cfg, tp)  # this rank's heads
        self.sm_scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        packed = q.packed
        # q.layout: a per-tensor scheme builds each module for its own width (quantization.py)
        self.c_attn = make_linear(cfg.n_embd, qkv_dim, True, q.layout(prefix + "c_attn"), packed)
        self.c_proj = make_linear(self.n_head * self.head_dim, cfg.n_embd, True, q.layout(prefix + "c_proj"), packed)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.c_attn(x), (b, s, self.n_head + 2 * self.n_kv_head, self.head_dim))
        out = kv_cache.attention_with_fused_qkv(layer_id, qkv, self.n_head, sm_scale=self.sm_scale)
        return row_parallel(self.c_proj, op.reshape(out, (b, s, self.n_head * self.head_dim)), self.tp)


class MLP(nn.Module):
    def __init__(self, cfg: GPTBigCodeConfig, q: Quantization, tp: int = 1, prefix: str = ""):
        packed = q.packed
        self.tp = tp
        self.c_fc = make_linear(cfg.n_embd, cfg.n_inner // tp, True, q.layout(prefix + "c_fc"), packed)
        self.c_proj = make_linear(cfg.n_inner // tp, cfg.n_embd, True, q.layout(prefix + "c_proj"), packed)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: Tensor) -> Tensor:
        # the linear layer applies the activation (inside its kernel with int8 activations)
        return row_parallel(self.c_proj, self.c_fc(x, activation=self.act), self.tp)


class Block(nn.Module):
    def __init__(self, cfg: GPTBigCodeConfig, q: Quantization, tp: int = 1, index: int = 0):
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, q.model_dtype)
        self.attn = Attention(cfg, q, tp, f"transformer.h.{index}.attn.")
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, q.model_dtype)
        self.mlp = MLP(cfg, q, tp, f"transformer.h.{index}.mlp.")

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer_id)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: GPTBigCodeConfig, q: Quantization, tp: int = 1):
        if is_quantized(q, "transformer.wte.weight", cfg.tie_word_embeddings):
            self.wte = QuantizedEmbedding(cfg.vocab_size, cfg.n_embd, q.layout("transformer.wte"))
        else:
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd, dtype=q.model_dtype)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd, dtype=q.model_dtype)
        self.h = nn.ModuleList([Block(cfg, q, tp, i) for i in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, q.model_dtype)

    def embed(self, ids: Tensor) -> Tensor:
        if isinstance(self.wte, QuantizedEmbedding):
            return self.wte(ids)
        return take_rows(self.wte.weight, ids)

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
    def __init__(self, cfg: GPTBigCodeConfig, target: Target | None, quant: Quantization,
                 batch_invariant: bool = False, tp: int = 1):
        """`tp`: the tensor-parallel ranks this (per-rank) model is one of (1: the whole model)."""
        self.cfg, self.target, self.quant, self.dtype, self.tp = cfg, target, quant, quant.model_dtype, tp
        self.batch_invariant = batch_invariant  # exports load_kv too
        self.transformer = Transformer(cfg, quant, tp)
        self.lm_head = None
        if not cfg.tie_word_embeddings:
            self.lm_head = make_linear(cfg.n_embd, cfg.vocab_size, False, quant.layout("lm_head"),
                                       is_quantized(quant, "lm_head.weight", tied=False))

    def logits(self, hidden: Tensor) -> Tensor:
        """float32 logits: a packed head accumulates in float32 directly."""
        hidden = self.transformer.ln_f(hidden)
        wte = self.transformer.wte
        if self.lm_head is not None:
            return self.lm_head(hidden, out_dtype="float32")
        if isinstance(wte, QuantizedEmbedding):
            return wte.weight_matmul(hidden)
        return op.matmul(hidden, op.permute_dims(wte.weight), out_dtype="float32" if self.dtype != "float32" else None)

    # ---- exported functions (see get_default_spec for their signatures) ----
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.transformer.embed(input_ids)

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

    def load_kv(self, k: Tensor, v: Tensor, kv_cache: PagedKVCache):
        """Append given keys and values (n_layer, 1, seq_len, n_kv_head, head_dim) to the sequence being run,
        attending nothing: a prefix copied into a sequence of its own (runner.copy_prefix, batch-invariant
        mode). A forked sequence would attend the shared pages and its own apart, which changes the bits.
        Our attention kernels (kernels.py, kernels_gpu.py) read sm_scale APPEND_ONLY as "attend nothing"; the
        outputs are summed into the result only so that no call is dropped as unused."""
        from gptbc.compile.kernels import APPEND_ONLY

        cfg = self.cfg
        n = k.shape[2]
        rows = (1, n, cfg.n_kv_head, cfg.head_dim)
        zeros = op.zeros((1, n, cfg.n_head, cfg.head_dim), self.dtype)
        # op.split into one part returns the tensor itself, not a list of one
        ks, vs = ((op.split(t, cfg.n_layer, axis=0) if cfg.n_layer > 1 else [t]) for t in (k, v))
        total = None
        for layer_id in range(cfg.n_layer):
            qkv = op.concat([zeros, op.reshape(ks[layer_id], rows), op.reshape(vs[layer_id], rows)], dim=2)
            out = kv_cache.attention_with_fused_qkv(layer_id, qkv, cfg.n_head, sm_scale=APPEND_ONLY)
            total = out if total is None else total + out
        return total, kv_cache

    # ---- on the device: a GPU step whose requests are all greedy copies back token ids, not batch × vocab
    # logits (the runtime's decode_batch_greedy); any sampled request still copies the logits ----
    def argmax(self, logits: Tensor) -> Tensor:
        """(batch, vocab) float32 → (batch,) int32 greedy tokens (the first maximum, as numpy does).

        Written as an int32 tuple reduction: relax's argmax indexes in int64, which WebGPU lacks.
        """

        def combine(a, b):
            keep_a = tirx.Or(a[1] > b[1], tirx.And(a[1] == b[1], a[0] <= b[0]))
            return tirx.Select(keep_a, a[0], b[0]), tirx.Select(keep_a, a[1], b[1])

        def identity(t0, t1):
            return tirx.const(-1, t0), tirx.min_value(t1)

        reducer = te.comm_reducer(combine, identity, name="argmax")

        def compute(x: te.Tensor):
            k = te.reduce_axis((0, x.shape[1]), name="k")
            # Both results are kernel outputs: GPUs cannot allocate the max values as a global temporary.
            return list(te.compute((x.shape[0],), lambda i: reducer((tirx.Cast("int32", k), x[i, k]), axis=k),
                                   name="argmax"))

        return op.tensor_expr_op(compute, "argmax", [logits])[0]

    def create_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                              prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                              support_sliding_window: tirx.Var) -> PagedKVCache:
        cfg = self.cfg
        return TIRPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, cfg.n_layer]), num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head // self.tp, num_key_value_heads=kv_heads_per_rank(cfg, self.tp),
            qk_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            # GPTBigCode has learned absolute positions (wpe), no RoPE
            rope_mode=RopeMode.NONE, rope_scale=1, rope_theta=10000, rope_scaling={},
            rope_ext_factors=relax.ShapeExpr([]), rotary_dim=cfg.head_dim,
            enable_disaggregation=False, dtype=self.dtype, target=self.target,
        )

    def get_default_spec(self) -> dict:
        e, dt = self.cfg.n_embd, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        kv_rows = nn.spec.Tensor([self.cfg.n_layer, 1, "seq_len", self.cfg.n_kv_head, self.cfg.head_dim], dt)
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
            "argmax": {"logits": nn.spec.Tensor(["batch_size", self.cfg.vocab_size], "float32"),
                       "$": {"param_mode": "none", "effect_mode": "none"}},
            **({"load_kv": {"k": kv_rows, "v": kv_rows, "kv_cache": kv,
                            "$": {"param_mode": "none", "effect_mode": "none"}}} if self.batch_invariant else {}),
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }


def param_list(named: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of `named` parameters (`export_tvm`'s, or `named_parameters()`, in the same order)."""
    return [(n, tuple(int(d) for d in p.shape), str(p.dtype)) for n, p in named]
