"""The family presets, `gptbc models`, and the memory plan (compile report, generate/serve refusal)."""

from __future__ import annotations

import json
import math
import re
from importlib import resources

import pytest

from gptbc.cli import main
from gptbc.artifact.config import GPTBigCodeConfig, preset_names, resolve_model
from gptbc.artifact.memory_plan import (activation_bytes, default_kv_tokens, engine_kv_tokens, kv_bytes_per_token,
                                        parameter_count, weight_bytes)
from gptbc.artifact.quantization import QUANTIZATIONS, get_quantization, numpy_dtype

FAMILY = {"tiny_starcoder_py", "starcoderbase-1b", "starcoderbase-3b", "starcoderbase-7b", "starcoder",
          "starcoderbase", "starcoderplus", "wizardcoder-15b", "octocoder", "sqlcoder", "santacoder",
          "santacoder-original"}


def raw_preset(name: str) -> dict:
    return json.loads(resources.files("gptbc.presets").joinpath(f"{name}.json").read_text("utf-8"))


def test_every_family_preset_resolves_and_cites_its_source():
    assert FAMILY <= set(preset_names())
    for name in preset_names():
        raw = raw_preset(name)
        assert raw.get("_source") and raw.get("_hub_id") and raw.get("_card_params") and raw.get("_card_source"), name
        cfg = resolve_model(name).config
        assert cfg.multi_query and cfg.n_positions in (2048, 8192), name


def card_figure_matches(count: int, figure: str) -> bool:
    """'15.5B' / '164M': the count, in the figure's unit, rounds or truncates to the figure at its precision.

    Model cards quote sizes rounded (santacoder 1.118B → "1.1B") or truncated (starcoderbase-7b 7.33B → "7B").
    """
    m = re.fullmatch(r"(\d+(?:\.(\d+))?)([MB])", figure)
    assert m, figure
    value, decimals = float(m.group(1)), len(m.group(2) or "")
    scaled = count / (1e9 if m.group(3) == "B" else 1e6)
    step = 10 ** -decimals
    return math.isclose(round(scaled, decimals), value) or math.isclose(math.floor(scaled / step) * step, value)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_parameter_count_matches_the_model_card(name):
    """Figures from each model card, cited in the preset's _card_source (e.g. tiny_starcoder_py: "This is a
    164M parameters model"; starcoder: "15.5B parameter models"; santacoder: "1.1B parameter models")."""
    count = parameter_count(resolve_model(name).config)
    assert card_figure_matches(count, raw_preset(name)["_card_params"]), (name, count)


def test_card_check_can_fail():
    assert not card_figure_matches(2_400_000_000, "3B") and not card_figure_matches(170_000_000, "164M")
    assert card_figure_matches(15_517_456_384, "15.5B") and card_figure_matches(7_327_505_408, "7B")


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_equal_the_compiled_parameter_list(tied):
    """memory_plan.weight_bytes (pure arithmetic) and the artifact's tensor list (what the converter writes)
    against the parameter list the Relax model really takes, name by name and in order."""
    from gptbc.artifact.params import converted_params
    from gptbc.compile.model import GPTBigCodeForCausalLM, param_list

    cfg = GPTBigCodeConfig(n_embd=96, n_head=3, n_layer=2, n_positions=64, vocab_size=301, n_inner=200,
                           multi_query=not tied, tie_word_embeddings=tied)
    for name in QUANTIZATIONS:
        for keep_head in (False, True):
            q = get_quantization(name, quantize_lm_head=not keep_head)
            model = param_list(GPTBigCodeForCausalLM(cfg, target=None, quant=q).named_parameters())
            assert converted_params(cfg, q) == model, (name, keep_head)
            real = sum(math.prod(s) * numpy_dtype(d).itemsize for _, s, d in model)
            assert weight_bytes(cfg, q) == real, (name, keep_head)
    # a per-tensor scheme with a width per module (a GGUF Q4_K_M-like mix): each layer built for its own layout
    import dataclasses

    mixed = dataclasses.replace(get_quantization("qkf32_a"), widths=(
        ("transformer.h.0.attn.c_attn", 4), ("transformer.h.0.mlp.c_fc", 5), ("transformer.h.1.mlp.c_proj", 4),
        ("transformer.wte", 5)))
    model = param_list(GPTBigCodeForCausalLM(cfg, target=None, quant=mixed).named_parameters())
    assert converted_params(cfg, mixed) == model
    assert weight_bytes(cfg, mixed) == sum(math.prod(s) * numpy_dtype(d).itemsize for _, s, d in model)


def test_mqa_kv_cache_is_n_head_times_smaller():
    cfg = resolve_model("starcoder").config
    f16 = QUANTIZATIONS["q4f16_1"]
    assert kv_bytes_per_token(cfg, f16) == 2 * 40 * 1 * 128 * 2  # 20 KiB
    assert kv_bytes_per_token(cfg, f16, n_kv_head=cfg.n_head) == 48 * kv_bytes_per_token(cfg, f16)


def test_gptbc_models_lists_every_preset(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert re.search(rf"^{re.escape(name)}\s+{re.escape(raw_preset(name)['_hub_id'])}\s", out, re.M), name
    assert main(["models", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    sc = rows["starcoder"]
    assert sc["kv_bytes_per_token_f16"] * 48 == sc["mha_kv_bytes_per_token_f16"]
    assert sc["weight_bytes"]["q4f16_1"] < sc["weight_bytes"]["q8f16_1"] < sc["weight_bytes"]["q0f16"]
    assert rows["octocoder"]["unverified"] and not rows["starcoder"]["unverified"]


@pytest.mark.parametrize("preset", ["tiny_starcoder_py", "santacoder-original"])
def test_compile_small_presets_offline_reports_memory(preset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lib = tmp_path / "m.so"
    assert main(["compile", "--model", preset, "--target", "cpu", "--context-window-size", "256",
                 "--max-batch-size", "4", "-o", str(lib)]) == 0
    assert lib.is_file()
    err = capsys.readouterr().err
    cfg = resolve_model(preset, context_window_size=256, max_batch_size=4).config
    per_tok = kv_bytes_per_token(cfg, QUANTIZATIONS["q0f32"])
    assert f"KV cache: {per_tok / 1024:.2f} KiB per token" in err
    assert f"{cfg.n_head}x smaller than multi-head" in err
    assert "KV cache for context 256 x batch 4: " + f"{256 * 4 * per_tok / (1 << 20):.2f} MiB" in err
    assert f"the engine's default ({256 * 12} tokens, context x (min(4, batch) + 8)" in err


def test_default_kv_cache_holds_the_prefix_cache_too_within_a_quarter_of_free_memory(monkeypatch):
    """Room for 4 running windows and the prefix cache's 8 kept prompts (four editors evicted each other's prompts
    with 4 windows); less where that is over a quarter of the memory the weights leave; never under 4 windows;
    --max-total-seq-len wins."""
    cfg = resolve_model("santacoder", context_window_size=2048, max_batch_size=16).config
    quant = QUANTIZATIONS["q4f32_1"]
    weights, per_tok = weight_bytes(cfg, quant), kv_bytes_per_token(cfg, quant)
    used = weights + activation_bytes(cfg, quant, cfg.prefill_chunk_size, 16)
    assert engine_kv_tokens(2048, 16) == 2048 * 12 and engine_kv_tokens(2048, 2) == 2048 * 10
    assert engine_kv_tokens(2048, 16, max_total_seq_len=100) == 100
    monkeypatch.setenv("GPTBC_DEVICE_MEMORY", str(1 << 40))
    assert default_kv_tokens(cfg, quant, "cpu", weights) == 2048 * 12
    monkeypatch.setenv("GPTBC_DEVICE_MEMORY", str(used + 4 * per_tok * 2048 * 6 + 123))  # a quarter: 6 windows
    assert default_kv_tokens(cfg, quant, "cpu", weights) == 2048 * 6
    monkeypatch.setenv("GPTBC_DEVICE_MEMORY", str(used))  # no room at all: the running windows (check_fits judges)
    assert default_kv_tokens(cfg, quant, "cpu", weights) == 2048 * 4



def test_a_runner_takes_the_default_kv_cache_its_device_has_room_for(tiny_model, monkeypatch):
    from gptbc.runtime.runner import ModelRunner

    m = tiny_model("mqa64")
    monkeypatch.setenv("GPTBC_DEVICE_MEMORY", str(1 << 40))
    r = ModelRunner(m.out_dir, m.lib)
    window, batch = r.context_window_size, r.max_batch_size
    assert batch >= 4 and r.capacity_tokens == window * (4 + 8)
    assert ModelRunner(m.out_dir, m.lib, max_total_seq_len=100).capacity_tokens == 100
    per_tok, used = r.memory_plan.kv_cache // r.capacity_tokens, r.memory_plan.weights + r.memory_plan.activations
    monkeypatch.setenv("GPTBC_DEVICE_MEMORY", str(used + 4 * per_tok * window * 5))  # a quarter: 5 windows
    assert ModelRunner(m.out_dir, m.lib).capacity_tokens == window * 5

def test_generate_and_serve_refuse_what_cannot_fit_before_allocating(tiny_model, capsys, monkeypatch):
    m = tiny_model("mqa64")
    capsys.readouterr()  # building the fixture prints progress bars
    # 10^9 tokens of KV cache is ~1 TB for this model: allocating it would fail or swap; the check refuses first.
    code = main(["serve", str(m.out_dir), "--lib", str(m.lib), "--max-total-seq-len", "1000000000", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: this configuration needs ") and err.count("\n") == 1
    assert "KV cache" in err and "1000000000 tokens" in err and "available RAM" in err
    monkeypatch.setenv("GPTBC_DEVICE_MEMORY", "1000")
    code = main(["generate", str(m.out_dir), "--lib", str(m.lib), "--prompt-ids", "1,2", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "the device has 1000 B (GPTBC_DEVICE_MEMORY)" in err
    monkeypatch.setenv("GPTBC_DEVICE_MEMORY", str(1 << 40))
    assert main(["generate", str(m.out_dir), "--lib", str(m.lib), "--prompt-ids", "1,2", "--max-new-tokens",
                 "2"]) == 0
