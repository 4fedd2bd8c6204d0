"""Tensor parallelism (`--tensor-parallel N`): how each weight of GPTBigCode is split over N ranks.

The split follows the Megatron recipe with the multi-query KV head replicated (as vLLM's QKVParallelLinear with
KV-head replicas and TGI's _load_multi_mqa do; MLC LLM refuses gpt_bigcode with more than one shard):
- attn.c_attn (column-parallel): each rank holds [its n_head/N query heads | its KV heads | its KV heads]; with
  one KV head (multi-query) every rank holds all of it, with n_head KV heads (MHA) each holds its n_head/N.
- attn.c_proj and mlp.c_proj (row-parallel): each rank holds its slice of the input features; the partial
  products are summed across ranks (an allreduce) and the bias is added once, after the sum.
- mlp.c_fc (column-parallel): each rank holds n_inner/N output features (and their bias).
- LayerNorms, wte, wpe, lm_head: replicated.
So every rank holds the same shapes, and a grouped scheme quantizes each rank's slice exactly as it quantizes
the whole weight, provided no group of 32 input features straddles two ranks (`check_tensor_parallel`).

Imports no TVM: the converter slices with it, the compiler sizes the model with it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from gptbc.artifact.config import GPTBigCodeConfig
from gptbc.artifact.quantization import Quantization
from gptbc.errors import GptbcError


def kv_heads_per_rank(cfg: GPTBigCodeConfig, tp: int) -> int:
    """KV heads each rank attends with: the single multi-query head replicated, MHA heads split."""
    return cfg.n_kv_head if cfg.n_kv_head == 1 else cfg.n_kv_head // tp


def check_tensor_parallel(cfg: GPTBigCodeConfig, quant: Quantization, tp: int) -> None:
    """Refuse, in one line, an N the model's shapes or the scheme's groups cannot be split by."""
    if tp < 1:
        raise GptbcError(f"--tensor-parallel {tp}: must be at least 1")
    if tp == 1:
        return
    for what, n in (("n_head", cfg.n_head), ("n_inner", cfg.n_inner)):
        if n % tp:
            raise GptbcError(f"--tensor-parallel {tp}: the model's {what} ({n}) is not divisible by {tp}")
    if cfg.n_kv_head > 1 and cfg.n_kv_head % tp:
        raise GptbcError(f"--tensor-parallel {tp}: the model's {cfg.n_kv_head} KV heads are not divisible by {tp}")
    if quant.packed:  # grouped and affine schemes: groups of group_size input features (a per-tensor scheme: its
        # largest; a group's q_high words never span more than its group)
        group = quant.max_group
        for what, n in (("attn.c_proj", cfg.n_embd), ("mlp.c_proj", cfg.n_inner)):
            if (n // tp) % group:
                raise GptbcError(f"--tensor-parallel {tp}: {quant.name} groups {group} input features, "
                                 f"and {what}'s {n} split {tp} ways ({n // tp} per rank) would split a group "
                                 f"between ranks")


def split_kind(name: str) -> str:
    """How HF tensor `name` is split: "qkv", "rows" (output features), "cols" (input features) or "" (replicated)."""
    if ".attn.c_attn." in name:
        return "qkv"
    if ".mlp.c_fc." in name:
        return "rows"
    if name.endswith(".weight") and (".attn.c_proj." in name or ".mlp.c_proj." in name):
        return "cols"
    return ""  # LayerNorms, embeddings, lm_head, and the row-parallel biases (added once, after the allreduce)


def rank_shape(cfg: GPTBigCodeConfig, name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape of one rank's slice of HF tensor `name` (of full `shape`)."""
    kind = split_kind(name)
    if tp == 1 or not kind:
        return shape
    if kind == "qkv":
        rows = (cfg.n_head // tp + 2 * kv_heads_per_rank(cfg, tp)) * cfg.head_dim
        return (rows, *shape[1:])
    if kind == "rows":
        return (shape[0] // tp, *shape[1:])
    return (shape[0], shape[1] // tp)


def rank_slicer(cfg: GPTBigCodeConfig, name: str, tp: int, rank: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """rank's slice of HF tensor `name` (c_attn already fused as [all q | all k | all v]); None: whole tensor."""
    kind = split_kind(name)
    if tp == 1 or not kind:
        return None
    if kind == "qkv":
        d, hq, kv = cfg.head_dim, cfg.n_head // tp, kv_heads_per_rank(cfg, tp)
        k0, v0 = cfg.n_head * d, (cfg.n_head + cfg.n_kv_head) * d
        first = 0 if cfg.n_kv_head == 1 else rank * kv * d  # the multi-query head: every rank takes it whole
        spans = [(rank * hq * d, hq * d), (k0 + first, kv * d), (v0 + first, kv * d)]
        return lambda x: np.concatenate([x[s:s + n] for s, n in spans], axis=0)
    if kind == "rows":
        return lambda x: x[rank * x.shape[0] // tp:(rank + 1) * x.shape[0] // tp]
    return lambda x: x[:, rank * x.shape[1] // tp:(rank + 1) * x.shape[1] // tp]


def rank_view(cfg: GPTBigCodeConfig, tp: int) -> GPTBigCodeConfig:
    """A config whose attention sizes are one rank's (n_head/N query heads, the rank's KV heads, same head_dim):
    what the attention kernels and the KV cache of a rank are built for."""
    import dataclasses

    if tp == 1:
        return cfg
    return dataclasses.replace(cfg, n_head=cfg.n_head // tp, n_embd=cfg.n_embd // tp, n_inner=cfg.n_inner // tp)
