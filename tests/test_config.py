"""Config reading, presets and the four spellings of --model."""

from __future__ import annotations

import pytest

from gptbc.artifact.config import GPTBigCodeConfig, preset_names, resolve_model
from gptbc.errors import GptbcError
from hf_models import make_checkpoint


def test_presets_have_the_published_shapes():
    assert {"santacoder", "starcoder"} <= set(preset_names())
    s = resolve_model("santacoder").config
    assert (s.n_embd, s.n_inner, s.n_head, s.n_layer, s.n_positions, s.vocab_size) == (2048, 8192, 16, 24, 2048, 49280)
    assert s.multi_query and s.layer_norm_epsilon == 1e-5 and s.bos_token_id == 49152 and s.eos_token_id == [49152]
    assert s.activation_function == "gelu_pytorch_tanh" and s.n_kv_head == 1 and s.head_dim == 128
    c = resolve_model("starcoder").config
    assert (c.n_embd, c.n_inner, c.n_head, c.n_layer, c.n_positions, c.vocab_size) == (6144, 24576, 48, 40, 8192, 49152)
    assert c.multi_query


def test_defaults_and_compile_time_fields():
    cfg = GPTBigCodeConfig.from_dict({"model_type": "gpt_bigcode", "n_embd": 64, "n_head": 4, "n_layer": 1,
                                      "n_positions": 256, "vocab_size": 10, "n_inner": None, "multi_query": False})
    assert cfg.n_inner == 256 and cfg.n_kv_head == 4
    assert cfg.context_window_size == 256 and cfg.prefill_chunk_size == 256
    small = resolve_model("santacoder", context_window_size=512, prefill_chunk_size=128, max_batch_size=2).config
    assert (small.context_window_size, small.prefill_chunk_size, small.max_batch_size) == (512, 128, 2)


@pytest.mark.parametrize("bad, fragment", [
    ({"n_head": 3}, "not divisible"),
    ({"activation_function": "swish"}, "activation_function"),
    ({"prefill_chunk_size": 300}, "prefill_chunk_size"),
    ({"eos_token_id": 99}, "eos_token_id 99"),
])
def test_invalid_configs_are_named(bad, fragment):
    raw = {"model_type": "gpt_bigcode", "n_embd": 64, "n_head": 4, "n_layer": 1, "n_positions": 256,
           "vocab_size": 10, **bad}
    with pytest.raises(GptbcError, match=fragment):
        GPTBigCodeConfig.from_dict(raw)


def test_missing_required_field():
    with pytest.raises(GptbcError, match="missing field.*n_embd"):
        GPTBigCodeConfig.from_dict({"model_type": "gpt_bigcode", "n_head": 4, "n_layer": 1, "n_positions": 8,
                                    "vocab_size": 10})


def test_model_spellings(tmp_path, tiny_model):
    hf = make_checkpoint(tmp_path / "my-model", n_embd=32, n_head=2, n_layer=1)
    src = resolve_model(str(hf))
    assert src.name == "my-model" and src.config.n_embd == 32 and src.directory == hf
    m = tiny_model("mqa64")
    out = resolve_model(str(m.out_dir))
    assert out.config.n_embd == 128 and out.directory == m.out_dir


def test_hub_id_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    with pytest.raises(GptbcError) as info:
        resolve_model("bigcode/gpt_bigcode-santacoder")
    msg = str(info.value)
    assert "bigcode/gpt_bigcode-santacoder" in msg and "HF_HUB_OFFLINE" in msg and "local directory" in msg
    assert "\n" not in msg


def test_a_lowered_window_resizes_the_recorded_prefill_chunk(tmp_path):
    """A converted directory records prefill_chunk_size 2048; compiling it for a 512-token window must not fail."""
    recorded = resolve_model("santacoder").config.to_dict()
    cfg = GPTBigCodeConfig.from_dict(recorded, source="x", context_window_size=512)
    assert cfg.context_window_size == 512 and cfg.prefill_chunk_size == 512
    cfg = GPTBigCodeConfig.from_dict(recorded, source="x", context_window_size=512, prefill_chunk_size=128)
    assert cfg.prefill_chunk_size == 128
