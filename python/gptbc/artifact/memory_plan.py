"""Memory arithmetic: parameter counts, weight bytes per quantization, KV-cache and activation bytes, and the
check that refuses a run that cannot fit the device before anything is allocated.

Everything here is computed from the config alone (no TVM, no weights), so `gptbc models` is instant and
offline; `tests/test_presets.py` checks `weight_bytes` against `params.converted_params`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptbc.artifact.config import GPTBigCodeConfig
from gptbc.errors import GptbcError
from gptbc.artifact.manifest import PAGE_SIZE
from gptbc.artifact.params import converted_params, hf_shapes
from gptbc.artifact.sharding import kv_heads_per_rank
from gptbc.artifact.quantization import Quantization, is_quantized, numpy_dtype



def parameter_count(cfg: GPTBigCodeConfig) -> int:
    return sum(int(np.prod(s)) for _, s in hf_shapes(cfg))


def weight_bytes(cfg: GPTBigCodeConfig, quant: Quantization) -> int:
    """Bytes of the converted weights (packed ints + scales for quantized weights, the rest in model_dtype)."""
    item = numpy_dtype(quant.model_dtype).itemsize
    total = 0
    for name, shape in hf_shapes(cfg):
        if is_quantized(quant, name, cfg.tie_word_embeddings):
            module = name.rpartition(".")[0]
            total += sum(int(np.prod(s)) * numpy_dtype(d).itemsize for _, s, d in quant.layout(module).parts(shape))
        else:
            total += int(np.prod(shape)) * item
    return total


def kv_bytes_per_token(cfg: GPTBigCodeConfig, quant: Quantization, n_kv_head: int | None = None) -> int:
    """K and V of every layer for one token, in the activation dtype."""
    kv = cfg.n_kv_head if n_kv_head is None else n_kv_head
    return 2 * cfg.n_layer * kv * cfg.head_dim * numpy_dtype(quant.model_dtype).itemsize


def kv_cache_bytes(cfg: GPTBigCodeConfig, quant: Quantization, tokens: int) -> int:
    """The paged cache for `tokens` tokens over all sequences (whole pages)."""
    return -(-tokens // PAGE_SIZE) * PAGE_SIZE * kv_bytes_per_token(cfg, quant)


def activation_bytes(cfg: GPTBigCodeConfig, quant: Quantization, prefill_chunk: int, batch: int) -> int:
    """Estimate of the largest intermediates live in one model call: a prefill chunk's hidden state, residual,
    fused qkv, attention output and MLP activation, plus float32 logits for a full decode batch.

    An estimate (TVM's memory planner decides the exact buffers); it is small next to weights and KV cache.
    """
    item = numpy_dtype(quant.model_dtype).itemsize
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    rows = max(prefill_chunk, batch)
    return rows * (3 * cfg.n_embd + qkv + cfg.n_inner) * item + max(batch, 1) * cfg.vocab_size * 4


# The engine's default KV cache holds a context window for each of RUNNING_WINDOWS requests at once and for each
# of the CACHED_WINDOWS finished sequences its prefix cache keeps (runtime.Engine prefix_cache_size). With room for
# the running windows alone, four editors with window-long prompts filled it, and each keystroke evicted the cached
# prompt another editor's next keystroke forks from (a whole prompt read again: BENCHMARKS, issue 35). Multi-query
# KV is small (santacoder: 24 KiB a token in f32, 48 MiB a 2k window), so the 8 extra windows cost little next to
# the weights; where they would not, default_kv_tokens takes less (a quarter of what the weights leave free).
RUNNING_WINDOWS = 4
CACHED_WINDOWS = 8
DEFAULT_KV_RULE = f"context x (min({RUNNING_WINDOWS}, batch) + {CACHED_WINDOWS})"


def engine_kv_tokens(context_window: int, max_batch: int, max_total_seq_len: int | None = None) -> int:
    """Tokens the engine's KV cache holds: `max_total_seq_len` when given, else DEFAULT_KV_RULE (before
    default_kv_tokens bounds it by the device's memory)."""
    return int(max_total_seq_len or context_window * (min(RUNNING_WINDOWS, max_batch) + CACHED_WINDOWS))


def default_kv_tokens(cfg: GPTBigCodeConfig, quant: Quantization, device: str, weights: int) -> int:
    """The engine's KV cache without --max-total-seq-len: DEFAULT_KV_RULE, but at most a quarter of the device
    memory the weights and activations leave (a server's default should not take the machine), and never fewer
    than the running windows alone (context x min(4, batch), the old default; check_fits judges that one)."""
    context, batch = cfg.context_window_size, cfg.max_batch_size
    want, least = engine_kv_tokens(context, batch), context * min(RUNNING_WINDOWS, batch)
    have = device_memory(device)
    if have is None:
        return want
    free = have[0] - weights - activation_bytes(cfg, quant, cfg.prefill_chunk_size, batch)
    room = max(free, 0) // 4 // kv_bytes_per_token(cfg, quant) // PAGE_SIZE * PAGE_SIZE
    return max(least, min(want, room))


@dataclass
class Plan:
    weights: int
    kv_cache: int
    activations: int
    kv_tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def plan(cfg: GPTBigCodeConfig, quant: Quantization, kv_tokens: int, weights: int | None = None) -> Plan:
    return Plan(weight_bytes(cfg, quant) if weights is None else weights, kv_cache_bytes(cfg, quant, kv_tokens),
                activation_bytes(cfg, quant, cfg.prefill_chunk_size, cfg.max_batch_size), kv_tokens)


def fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def rank_weight_bytes(cfg: GPTBigCodeConfig, quant: Quantization, tp: int) -> int:
    """Bytes of one tensor-parallel rank's converted weights (its slices plus the replicated tensors)."""
    return sum(int(np.prod(shape, dtype=np.int64)) * numpy_dtype(dtype).itemsize
               for _, shape, dtype in converted_params(cfg, quant, tp))


def compile_report(cfg: GPTBigCodeConfig, quant: Quantization, tp: int = 1) -> list[str]:
    """What `gptbc compile` prints: the memory a library built for these sizes needs at run time."""
    per_tok = kv_bytes_per_token(cfg, quant)
    mha = kv_bytes_per_token(cfg, quant, n_kv_head=cfg.n_head)
    full = cfg.context_window_size * cfg.max_batch_size
    default = engine_kv_tokens(cfg.context_window_size, cfg.max_batch_size)
    lines = [
        f"weights: {fmt(weight_bytes(cfg, quant))} ({quant.name}, {parameter_count(cfg) / 1e9:.3f}B parameters)",
        f"KV cache: {fmt(per_tok)} per token ({quant.model_dtype}"
        + (f"; multi-query: {cfg.n_head}x smaller than multi-head's {fmt(mha)})" if cfg.multi_query else ")"),
        f"KV cache for context {cfg.context_window_size} x batch {cfg.max_batch_size}: {fmt(kv_cache_bytes(cfg, quant, full))}"
        f"; the engine's default ({default} tokens, {DEFAULT_KV_RULE}; less where over a quarter of the memory "
        f"the weights leave): {fmt(kv_cache_bytes(cfg, quant, default))}",
        f"activations (estimate, prefill chunk {cfg.prefill_chunk_size}, batch {cfg.max_batch_size}): "
        f"{fmt(activation_bytes(cfg, quant, cfg.prefill_chunk_size, cfg.max_batch_size))}",
    ]
    if tp > 1:  # each rank holds its slices, all of wte/wpe/lm_head/LayerNorms, and its heads' KV cache
        rank_kv = kv_bytes_per_token(cfg, quant, n_kv_head=kv_heads_per_rank(cfg, tp))
        lines.append(f"per rank of {tp} (tensor parallel): weights {fmt(rank_weight_bytes(cfg, quant, tp))}, "
                     f"KV cache {fmt(rank_kv)} per token ({fmt(rank_kv * default)} for the engine's default "
                     f"{default} tokens)")
    return lines


def device_memory(device: str) -> tuple[int, str] | None:
    """(bytes usable, what was measured) for a device, or None where it cannot be told.

    GPTBC_DEVICE_MEMORY (bytes) overrides the measurement (for a shared device, or to test the check).
    """
    override = os.environ.get("GPTBC_DEVICE_MEMORY")
    if override:
        try:
            return int(float(override)), "GPTBC_DEVICE_MEMORY"
        except ValueError:
            raise GptbcError(f"GPTBC_DEVICE_MEMORY={override!r}: expected a number of bytes") from None
    kind, _, index = device.partition(":")
    if kind == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM (MemAvailable)"
        except OSError:
            return None
        return None
    if kind in ("cuda", "rocm", "vulkan", "metal"):
        try:
            import tvm

            dev = tvm.device(kind, int(index or 0))
            total = dev.total_global_memory if dev.exist else None
        except Exception:  # noqa: BLE001 - an unknown device attribute means: cannot tell
            return None
        return (int(total), f"{kind} total memory") if total else None
    return None


def check_fits(cfg: GPTBigCodeConfig, quant: Quantization, device: str, kv_tokens: int, weights: int) -> Plan:
    """Raise a one-line error with the numbers if weights + KV cache + activations exceed the device."""
    p = plan(cfg, quant, kv_tokens, weights)
    have = device_memory(device)
    if have is not None and p.total > have[0]:
        raise GptbcError(
            f"this configuration needs {fmt(p.total)} on {device} (weights {fmt(p.weights)} + KV cache "
            f"{fmt(p.kv_cache)} for {p.kv_tokens} tokens + activations ~{fmt(p.activations)}) but the device has "
            f"{fmt(have[0])} ({have[1]}); lower --max-total-seq-len / --max-batch, or use a smaller quantization")
    return p


def models_table(as_json: bool = False) -> str:
    """`gptbc models`: every bundled preset with its size figures (offline: presets only)."""
    import json
    from importlib import resources

    from gptbc.artifact.config import preset_names, resolve_model
    from gptbc.artifact.quantization import QUANTIZATIONS

    rows = []
    for name in preset_names():
        raw = json.loads(resources.files("gptbc.presets").joinpath(f"{name}.json").read_text("utf-8"))
        cfg = resolve_model(name).config
        f16 = QUANTIZATIONS["q0f16"]
        rows.append({
            "preset": name, "hub_id": raw.get("_hub_id"), "parameters": parameter_count(cfg),
            "card_parameters": raw.get("_card_params"), "layout": raw.get("model_type"),
            "attention": "multi-query" if cfg.multi_query else "multi-head",
            "context": cfg.n_positions,
            "weight_bytes": {q: weight_bytes(cfg, QUANTIZATIONS[q]) for q in QUANTIZATIONS},
            "kv_bytes_per_token_f16": kv_bytes_per_token(cfg, f16),
            "mha_kv_bytes_per_token_f16": kv_bytes_per_token(cfg, f16, n_kv_head=cfg.n_head),
            "unverified": raw.get("_unverified", []),
        })
    if as_json:
        return json.dumps(rows, indent=2)
    quants = list(QUANTIZATIONS)
    head = (f"{'preset':<20} {'hub id':<36} {'params':>7} {'ctx':>5} "
            + " ".join(f"{q:>8}" for q in quants) + f" {'KV/token f16':>13} {'MHA would be':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        kv, mha = r["kv_bytes_per_token_f16"], r["mha_kv_bytes_per_token_f16"]
        lines.append(
            f"{r['preset']:<20} {r['hub_id'] or '-':<36} {r['parameters'] / 1e9:6.2f}B {r['context']:>5} "
            + " ".join(f"{r['weight_bytes'][q] / (1 << 30):8.2f}" for q in quants)
            + f" {fmt(kv):>13} {fmt(mha) + f' ({mha // kv}x)':>13}" + (" *" if r["unverified"] else ""))
    lines.append("Columns q0f32..q4f32_1: converted weight bytes (GiB) per quantization, scales included.")
    lines.append("KV/token: K and V of every layer for one token in float16 (double for the f32 schemes); "
                 "'MHA would be': the same model with one K/V head per query head.")
    if any(r["unverified"] for r in rows):
        lines.append("*: some config values could not be read from the model's published config.json; see the "
                     "preset's _source / _unverified fields.")
    return "\n".join(lines)
