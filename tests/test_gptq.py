"""`gptbc convert-weight` on GPTQ and AWQ directories written here in their exact layouts (gptq_files.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import assert_matches_hf
from gptq_files import dequantized, write_quantized
from hf_models import load_hf
from gptbc.artifact.convert import Checkpoint, convert_weight
from gptbc.artifact.gptq_reader import QuantizedCheckpoint, quant_config
from gptbc.artifact.config import load_hf_config
from gptbc.artifact.quantization import dequantize, get_quantization
from gptbc.errors import GptbcError


def reference_model(hf_dir, quantized_dir, converted=None):
    """HF fp32 holding the values the GPTQ / AWQ layers mean; with `converted` (a q4f32_1 output), the token
    embedding (a float tensor of the checkpoint, which the scheme quantizes as it says) as gptbc stored it."""
    hf = load_hf(hf_dir)
    state = {k: torch.from_numpy(v) for k, v in dequantized(quantized_dir).items()}
    if converted is not None:
        got = tensors(converted)
        state["transformer.wte.weight"] = torch.from_numpy(dequantize(
            got["transformer.wte.q_weight"], got["transformer.wte.q_scale"], hf.config.n_embd,
            get_quantization("q4f32_1")))
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    return hf


def tensors(out) -> dict[str, np.ndarray]:
    found = {}
    for f in out.glob("*.safetensors"):
        found.update(load_file(str(f)))
    return found


@pytest.mark.parametrize("group_size, desc_act", [(32, False), (64, False), (-1, True)])
def test_symmetric_gptq_is_carried_into_q4f16_1_bit_for_bit(import_checkpoint, group_size, desc_act, tmp_path,
                                                              capsys):
    src = write_quantized(import_checkpoint, tmp_path / "gptq", group_size=group_size, desc_act=desc_act)
    out = convert_weight(src, None, tmp_path / "w", progress=False, quantize_lm_head=False)
    assert json.loads((out / "gptbc-config.json").read_text())["quantization"]["name"] == "q4f16_1"
    got, q = tensors(out), get_quantization("q4f16_1")
    for name, want in dequantized(src).items():
        module = name[:-len(".weight")]
        values = dequantize(got[module + ".q_weight"], got[module + ".q_scale"], want.shape[1], q)
        assert np.array_equal(values, want), name
    assert "GPTQ" not in capsys.readouterr().err  # no GPTQ layer re-quantized (the float ones' rounding is noted)


def test_gptq_logits_equal_the_dequantized_checkpoint(import_checkpoint, import_lib, tmp_path):
    from gptbc.runtime.engine import Engine

    src = write_quantized(import_checkpoint, tmp_path / "gptq", group_size=64)
    out = convert_weight(src, "q4f32_1", tmp_path / "w", progress=False)
    assert_matches_hf(Engine(out, import_lib), reference_model(import_checkpoint, src, out))


@pytest.mark.parametrize("kind", ["awq", "asym", "desc_act"])
def test_reader_values_equal_the_layout_definition(import_checkpoint, kind, tmp_path):
    """AWQ (with its activation scales), asymmetric GPTQ and desc_act with several groups: read as floats."""
    src = write_quantized(import_checkpoint, tmp_path / kind, method="awq" if kind == "awq" else "gptq",
                          sym=kind != "asym", desc_act=kind == "desc_act")
    ckpt = QuantizedCheckpoint(Checkpoint(src), load_hf_config(src), quant_config(src))
    try:
        for name, want in dequantized(src).items():
            assert np.array_equal(ckpt.get(name), want), name
        assert ckpt.exact_scheme() == {"awq": None, "asym": "q4f16_a", "desc_act": None}[kind]
    finally:
        ckpt.close()


@pytest.mark.parametrize("kind, why", [("awq", "mlp.act.scales"), ("desc_act", "desc_act and several groups")])
def test_inexact_checkpoints_need_a_scheme_and_report_the_error(import_checkpoint, kind, why, tmp_path, capsys):
    src = write_quantized(import_checkpoint, tmp_path / kind, method="awq" if kind == "awq" else "gptq",
                          sym=kind != "asym", desc_act=kind == "desc_act")
    with pytest.raises(GptbcError, match=why) as err:
        convert_weight(src, None, tmp_path / "w", progress=False)
    assert len(str(err.value).splitlines()) == 1 and not (tmp_path / "w").exists()
    out = convert_weight(src, "q4f32_1", tmp_path / "w", progress=False)
    note = capsys.readouterr().err
    assert f"{'AWQ' if kind == 'awq' else 'GPTQ'} tensors" in note and "relative RMS error" in note, note
    # the printed error is the one of the stored values: recompute it for the worst layer it names
    label = "AWQ" if kind == "awq" else "GPTQ"
    worst, printed = re.search(rf"{label} tensors \(worst (\S+): relative RMS error ([0-9.e+-]+)\)", note).groups()
    module, want = worst[:-len(".weight")], dequantized(src)[worst]
    got = tensors(out)
    stored = dequantize(got[module + ".q_weight"], got[module + ".q_scale"], want.shape[1], get_quantization("q4f32_1"))
    assert f"{np.linalg.norm(stored - want) / np.linalg.norm(want):.2e}" == printed


def test_unrepresentable_gptq_config_is_one_line(import_checkpoint, tmp_path):
    src = write_quantized(import_checkpoint, tmp_path / "gptq")
    (src / "quantize_config.json").write_text(json.dumps({"bits": 3, "group_size": 128, "sym": True}))
    with pytest.raises(GptbcError, match="3-bit") as err:
        convert_weight(src, None, tmp_path / "w", progress=False)
    assert len(str(err.value).splitlines()) == 1 and not (tmp_path / "w").exists()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_asymmetric_layers_are_carried_into_q4f32_a(import_checkpoint, import_lib_affine, method, tmp_path, capsys):
    """Asymmetric GPTQ and AWQ (without activation scales): every layer exact in the affine scheme, which is the
    default for them, and the logits those values give."""
    from gptbc.runtime.engine import Engine

    src = write_quantized(import_checkpoint, tmp_path / method, method=method, sym=False, act_scales=False)
    default = convert_weight(src, None, tmp_path / "default", progress=False)
    assert json.loads((default / "gptbc-config.json").read_text())["quantization"]["name"] == "q4f16_a"
    out = convert_weight(src, "q4f32_a", tmp_path / "w", progress=False)
    assert method.upper() not in capsys.readouterr().err  # no layer re-quantized
    got, q = tensors(out), get_quantization("q4f32_a")
    for name, want in dequantized(src).items():
        module = name[:-len(".weight")]
        assert np.array_equal(dequantize(got[module + ".q_weight"], got[module + ".q_scale"], want.shape[1], q,
                                         got[module + ".q_min"]), want), name
    hf = reference_model(import_checkpoint, src)
    hf.transformer.wte.weight.data = torch.from_numpy(dequantize(
        got["transformer.wte.q_weight"], got["transformer.wte.q_scale"], hf.config.n_embd, q,
        got["transformer.wte.q_min"]))
    hf.tie_weights()
    assert_matches_hf(Engine(out, import_lib_affine), hf)
