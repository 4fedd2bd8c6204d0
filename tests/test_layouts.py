"""The original SantaCoder layout (model_type gpt2, GPT2LMHeadCustomModel, q_attn/kv_attn, Conv1D weights).

The checkpoints here are made from HF GPTBigCodeForCausalLM weights by applying the original layout's transposes
and splits (the inverse of what gptbc reads; see gptbc/artifact/checkpoint_layouts.py for where that layout comes from), so the HF
model on the source weights is the reference for the converted one.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from gptbc.cli import main
from gptbc.artifact.config import load_hf_config, resolve_model
from gptbc.errors import GptbcError
from gptbc.artifact.checkpoint_layouts import normalize_config
from gptbc.artifact.convert import convert_weight
from hf_models import load_hf

CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_original_layout(hf_dir, out_dir, drop=(), reshape=None):
    """Write hf_dir's gpt_bigcode checkpoint as the original SantaCoder checkpoint would store it."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    e, h = cfg["n_embd"], cfg["n_head"]
    d = e // h
    mq = cfg["multi_query"]
    src = load_file(str(hf_dir / "model.safetensors"))
    out = {}
    for name, x in src.items():
        if ".attn.c_attn." in name:
            base = name.replace("c_attn.", "")
            part = name.rsplit(".", 1)[1]
            if mq:  # rows [q (e); k (d); v (d)] → q_attn [e, e] + kv_attn [e, 2d] (Conv1D: [in, out])
                q, kv = x[:e], x[e:]
                out[base.replace(f"attn.{part}", f"attn.q_attn.{part}")] = q.T.copy() if part == "weight" else q
                out[base.replace(f"attn.{part}", f"attn.kv_attn.{part}")] = kv.T.copy() if part == "weight" else kv
            else:  # gpt_bigcode rows per head (h, 3, d) → GPT-2 columns [all q | all k | all v]
                rest = x.shape[1:]
                blocks = x.reshape(h, 3, d, *rest).swapaxes(0, 1).reshape(3 * e, *rest)
                out[name] = blocks.T.copy() if part == "weight" else blocks
        elif name.endswith(CONV1D):
            out[name] = x.T.copy()
        else:
            out[name] = x
        if name.endswith("attn.c_proj.bias"):  # the causal-mask buffer old checkpoints carry: ignored
            out[name.replace("c_proj.bias", "masked_bias")] = np.array(-1e4, dtype=np.float32)
    for name in drop:
        del out[name]
    for name, shape in (reshape or {}).items():
        out[name] = np.zeros(shape, np.float32)
    out_dir.mkdir(parents=True)
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    original = {
        "architectures": ["GPT2LMHeadCustomModel"], "model_type": "gpt2",
        "attention_head_type": "multiquery" if mq else "multihead",
        "auto_map": {"AutoConfig": "configuration_gpt2_mq.GPT2CustomConfig",
                     "AutoModelForCausalLM": "modeling_gpt2_mq.GPT2LMHeadCustomModel"},
        "reorder_and_upcast_attn": False, "scale_attn_by_inverse_layer_idx": False,
        **{k: cfg[k] for k in ("n_embd", "n_head", "n_inner", "n_layer", "n_positions", "vocab_size",
                               "layer_norm_epsilon", "activation_function", "scale_attn_weights", "bos_token_id",
                               "eos_token_id")},
    }
    if "tie_word_embeddings" in cfg:
        original["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    (out_dir / "config.json").write_text(json.dumps(original))
    if (hf_dir / "tokenizer.json").is_file():
        shutil.copyfile(hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
    return out_dir


def tensors(out_dir):
    got = {}
    for f in sorted(out_dir.glob("params-*.safetensors")):
        got.update(load_file(str(f)))
    return got


@pytest.mark.parametrize("name", ["mqa64", "mha32"])
def test_original_layout_converts_to_the_same_weights_and_hf_greedy_tokens(name, tiny_model, tmp_path):
    from gptbc.runtime.engine import Engine

    m = tiny_model(name)
    orig = to_original_layout(m.hf_dir, tmp_path / "orig")
    out = convert_weight(orig, "q0f32", tmp_path / "out", progress=False)
    ref = tensors(m.out_dir)
    got = tensors(out)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    meta = json.loads((out / "gptbc-config.json").read_text())
    assert meta["model_config"] == json.loads((m.out_dir / "gptbc-config.json").read_text())["model_config"]

    engine = Engine(out, m.lib)  # the library compiled for the gpt_bigcode checkpoint takes these weights
    ids = np.random.default_rng(5).integers(0, engine.config.vocab_size, size=11).tolist()
    ours = engine.generate(ids, max_new_tokens=10)
    with torch.no_grad():
        want = load_hf(m.hf_dir).generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
    assert ours == want[0, len(ids):].tolist()


def test_quantized_conversion_of_original_layout(tiny_model, tmp_path):
    m = tiny_model("mha64")
    orig = to_original_layout(m.hf_dir, tmp_path / "orig")
    a = tensors(convert_weight(orig, "q4f32_1", tmp_path / "a", progress=False))
    b = tensors(convert_weight(m.hf_dir, "q4f32_1", tmp_path / "b", progress=False))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("drop, reshape, fragment", [
    (["transformer.h.1.attn.kv_attn.weight"], None, "tensor transformer.h.1.attn.kv_attn.weight is missing"),
    (["transformer.h.0.attn.q_attn.bias"], None, "tensor transformer.h.0.attn.q_attn.bias is missing"),
    ([], {"transformer.h.0.attn.kv_attn.weight": (256, 128)}, "transformer.h.0.attn.kv_attn.weight has shape [256, 128]"),
    ([], {"transformer.h.1.mlp.c_fc.weight": (512, 128)}, "transformer.h.1.mlp.c_fc.weight has shape [512, 128]"),
])
def test_malformed_original_checkpoint_is_one_line_naming_the_tensor(drop, reshape, fragment, tiny_model,
                                                                      tmp_path, capsys):
    orig = to_original_layout(tiny_model("mqa64").hf_dir, tmp_path / "orig", drop=drop, reshape=reshape)
    code, err = run_cli(["convert-weight", str(orig), "--quantization", "q0f32", "-o", str(tmp_path / "out"),
                         "--quiet"], capsys)
    assert code == 1 and err.startswith("error: ") and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_mha_c_attn_wrong_width_is_named(tiny_model, tmp_path, capsys):
    orig = to_original_layout(tiny_model("mha64").hf_dir, tmp_path / "orig",
                              reshape={"transformer.h.0.attn.c_attn.weight": (128, 128 + 2 * 64)})
    code, err = run_cli(["convert-weight", str(orig), "--quantization", "q0f32", "-o", str(tmp_path / "o")], capsys)
    assert code == 1 and "transformer.h.0.attn.c_attn.weight has shape [128, 256]" in err and "[128, 384]" in err


SANTACODER_CONFIG = {  # bigcode/santacoder config.json, as its fine-tunes copy it (see configs/santacoder-original.json)
    "activation_function": "gelu_fast", "architectures": ["GPT2LMHeadCustomModel"],
    "attention_head_type": "multiquery", "auto_map": {
        "AutoConfig": "configuration_gpt2_mq.GPT2CustomConfig",
        "AutoModelForCausalLM": "modeling_gpt2_mq.GPT2LMHeadCustomModel"},
    "bos_token_id": 49152, "eos_token_id": 49152, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
    "n_embd": 2048, "n_head": 16, "n_inner": 8192, "n_layer": 24, "n_positions": 2048,
    "reorder_and_upcast_attn": False, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
    "vocab_size": 49280,
}


def test_santacoder_config_reads_as_gpt_bigcode(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SANTACODER_CONFIG))
    cfg = load_hf_config(tmp_path)
    assert cfg.multi_query and cfg.activation_function == "gelu_fast" and cfg.tie_word_embeddings
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size, cfg.eos_token_id) == (2048, 16, 24, 49280, [49152])
    mha = normalize_config({**SANTACODER_CONFIG, "attention_head_type": "multihead"}, "x")
    assert mha["multi_query"] is False
    assert resolve_model(str(tmp_path)).config.n_positions == 2048  # compile --model DIR takes it too


@pytest.mark.parametrize("change, fragment", [
    ({"attention_head_type": "grouped"}, "attention_head_type 'grouped'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx is true"),
    ({"model_type": "codegen", "architectures": ["CodeGenForCausalLM"], "attention_head_type": None,
      "auto_map": None}, "codegen"),
    ({"architectures": ["GPT2LMHeadCustomModel"], "auto_map": {"AutoModel": "modeling_gpt2_mq.GPT2CustomModel"},
      "model_type": "gpt2_custom"}, "is not a layout gptbc understands"),
    ({"model_type": "mystery", "architectures": ["MysteryLM"], "auto_map": {"AutoModel": "modeling_x.X"},
      "attention_head_type": None}, "remote code AutoModel → modeling_x.X"),
])
def test_configs_it_does_not_understand_are_one_line(change, fragment, tmp_path, capsys):
    raw = {**SANTACODER_CONFIG, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(GptbcError, match="config.json") as e:
        load_hf_config(tmp_path)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    code, err = run_cli(["compile", "--model", str(tmp_path), "--target", "cpu", "-o", str(tmp_path / "x.so")],
                        capsys)
    assert code == 1 and fragment in err and err.count("\n") == 1
