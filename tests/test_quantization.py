"""Quantization schemes: packing, error bounds, fused dequantization, accuracy against HF fp32."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from gptbc.artifact.config import resolve_model
from gptbc.artifact.quantization import QUANTIZATIONS, dequantize, get_quantization, numpy_dtype, quantize

GROUPED = [q for q in QUANTIZATIONS.values() if q.kind == "group"]


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    w[0, :5] = 0.0  # an all-zero group tail
    w[1, :32] = 0.0  # an all-zero group: scale 0 must not divide by zero
    w[2, 3] = 9.0  # an outlier
    return w


@pytest.mark.parametrize("q", GROUPED, ids=lambda q: q.name)
@pytest.mark.parametrize("cols", [64, 200, 37])  # whole groups, a partial last group, a partial word
def test_round_trip_error_within_scheme_bound(q, cols):
    w = weights(9, cols)
    packed, scale = quantize(w, q)
    assert packed.dtype == np.dtype(q.storage_dtype) and packed.shape == (9, -(-cols // q.per_word))
    assert scale.dtype == numpy_dtype(q.model_dtype) and scale.shape == (9, -(-cols // 32))
    back = dequantize(packed, scale, cols, q)
    s = np.repeat(scale.astype(np.float32), 32, axis=1)[:, :cols]
    top = q.max_int * s
    # Each weight is off by at most half a step, or, if it lay beyond the (clipped) top level, by its excess.
    bound = np.maximum(s / 2, np.abs(w) - top) * (1 + 1e-6) + 1e-7
    assert np.all(np.abs(back - w) <= bound)
    # And the step itself is at most max|group| / max_int (rounded to the scale dtype).
    amax = np.abs(np.pad(w, ((0, 0), (0, -cols % 32)))).reshape(9, -1, 32).max(-1)
    assert np.all(scale.astype(np.float32) <= (amax / q.max_int) * (1 + 2**-8) + 1e-12)
    assert np.all(back[1, :32] == 0.0)
    if q.bits == 8:  # no clipping search for int8: the whole group's range is kept
        assert np.abs(back - w).max() <= (s / 2).max() * (1 + 1e-6)


@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("cols", [64, 200, 37])
def test_affine_layouts_round_trip(bits, cols):
    """The affine layouts of 4, 5 and 6 bits (quantization.py) from float weights: every part in its documented
    shape, values within half a step, the planes holding the values' low and high bits."""
    import dataclasses

    from gptbc.artifact.quantization import dequantize_parts, unpack_bits

    q = dataclasses.replace(get_quantization("qkf32_a"), widths=(("m", bits),)).layout("m")
    assert q.bits == bits and q.has_min == (bits < 6) and q.group_size == (16 if bits == 6 else 32)
    w = weights(9, cols)
    layout = q.parts((9, cols))
    parts = dict(zip([n for n, _, _ in layout], quantize(w, q)))
    for name, shape, dtype in layout:
        assert parts[name].shape == shape and parts[name].dtype == np.dtype(dtype), name
    back = dequantize_parts(parts, cols, q)
    step = np.repeat(parts["q_scale"], q.group_size, axis=1)[:, :cols]
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5) + 1e-6)
    assert np.all(back[1, :32] == 0.0)
    ints = unpack_bits(parts["q_weight"], 4)[:, :cols]
    if bits > 4:
        ints = ints | unpack_bits(parts["q_high"], bits - 4)[:, :cols] << 4
        assert ints.max() >= 16  # the high plane is used
    assert ints.max() < 2 ** bits
    np.testing.assert_array_equal(parts["q_weight"][:, :cols // 8], pack_reference(ints[:, :cols // 8 * 8] & 15, 4))


def pack_reference(ints: np.ndarray, bits: int) -> np.ndarray:
    """Plain loops: value j of a row goes to word j // per_word at bit offset bits * (j % per_word)."""
    per_word = 32 // bits
    rows, cols = ints.shape
    out = np.zeros((rows, -(-cols // per_word)), np.uint32)
    for r in range(rows):
        for j in range(cols):
            out[r, j // per_word] |= np.uint32(int(ints[r, j]) << (bits * (j % per_word)))
    return out


@pytest.mark.parametrize("q", GROUPED, ids=lambda q: q.name)
def test_packing_is_bit_exact_against_reference(q):
    w = weights(5, 70, seed=3)
    packed, scale = quantize(w, q)
    s = np.repeat(scale.astype(np.float32), 32, axis=1)[:, :70]
    ints = np.clip(np.rint(w / np.where(s == 0, 1, s)), -q.max_int, q.max_int).astype(np.int64)
    if q.bits == 8:  # stored unpacked, signed
        np.testing.assert_array_equal(packed, ints.astype(np.int8))
        return
    ints = np.pad(ints + q.max_int, ((0, 0), (0, -70 % q.per_word)), constant_values=q.max_int)  # pad: zeros
    np.testing.assert_array_equal(packed, pack_reference(ints, q.bits))


def test_int4_clip_search_beats_plain_max_scaling():
    q = get_quantization("q4f32_1")
    w = weights(64, 256, seed=5)
    packed, scale = quantize(w, q)
    err = np.square(dequantize(packed, scale, 256, q) - w).sum()
    plain_scale = np.abs(w.reshape(64, 8, 32)).max(-1) / 7
    plain = np.clip(np.rint(w / np.repeat(np.where(plain_scale == 0, 1, plain_scale), 32, 1)), -7, 7)
    plain_err = np.square(plain * np.repeat(plain_scale, 32, 1) - w).sum()
    assert err < 0.9 * plain_err


def test_unquantized_half_schemes_round_to_their_dtype():
    assert numpy_dtype(QUANTIZATIONS["q0bf16"].model_dtype) == np.dtype(ml_dtypes.bfloat16)
    assert numpy_dtype(QUANTIZATIONS["q0f16"].model_dtype) == np.dtype(np.float16)


def test_keep_lm_head_flag_changes_only_the_head():
    from gptbc.artifact.params import converted_params

    cfg = resolve_model("santacoder").config
    packed = {n: d for n, _, d in converted_params(cfg, get_quantization("q4f16_1"))}
    kept = {n: d for n, _, d in converted_params(cfg, get_quantization("q4f16_1", quantize_lm_head=False))}
    assert "transformer.wte.q_weight" in packed and "transformer.wte.weight" not in packed
    assert kept["transformer.wte.weight"] == "float16"  # tied: wte is the head
    assert {n for n in packed if "transformer.h." in n} == {n for n in kept if "transformer.h." in n}
    assert packed["transformer.wpe.weight"] == "float16" and packed["transformer.h.0.ln_1.weight"] == "float16"
    assert packed["transformer.h.0.attn.c_attn.bias"] == "float16"


def converted_bytes(name: str, cfg) -> int:
    from gptbc.artifact.params import converted_params

    return sum(int(np.prod(s)) * numpy_dtype(d).itemsize for _, s, d in converted_params(cfg, get_quantization(name)))


def test_santacoder_converted_sizes():
    """Bytes of converted weights for the santacoder shape, relative to fp32 (reported in BENCHMARKS.md)."""
    cfg = resolve_model("santacoder").config
    fp32 = converted_bytes("q0f32", cfg)
    ratio = {name: converted_bytes(name, cfg) / fp32 for name in QUANTIZATIONS}
    assert 4.4e9 < fp32 < 4.6e9
    assert ratio["q0f16"] == pytest.approx(0.5) and ratio["q0bf16"] == pytest.approx(0.5)
    # int8 + a 16-bit scale per 32 weights; int4 likewise. 32-bit scales add 1 bit per weight on top.
    assert ratio["q8f16_1"] <= 0.27 and ratio["q4f16_1"] <= 0.15
    assert ratio["q8f32_1"] <= 0.285 and ratio["q4f32_1"] <= 0.16


# ---- the compiled model: dequantization inside the matmul, and accuracy against HF ----

def full_weight_shapes(cfg) -> set[tuple[int, int]]:
    e, qkv = cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    return {(qkv, e), (e, e), (cfg.n_inner, e), (e, cfg.n_inner), (cfg.vocab_size, e)}


def float_buffers_of_shape(mod, shapes: set[tuple[int, int]]) -> list[str]:
    """Every float tensor in the fused module (Relax values, TIR params and allocations) with one of `shapes`."""
    shapes = shapes | {(b, a) for a, b in shapes}  # a transposed copy counts too
    found = []
    for gv, func in mod.functions.items():
        text = re.sub(r"T\.int64\((\d+)\)", r"\1", func.script())
        for m in re.finditer(r"(?:alloc_buffer|Buffer|Tensor)\(\((\d+), (\d+)\),(?: dtype=)? ?\"(float\w*|bfloat16)", text):
            if (int(m.group(1)), int(m.group(2))) in shapes:
                found.append(f"{gv.name_hint}: {m.group(0)}")
    return found


def lowered(cfg, quant_name: str):
    import tvm

    from gptbc.compile.compiler import export_relax, fusion_passes

    target = tvm.target.Target({"kind": "llvm"})
    mod, _, _ = export_relax(cfg, get_quantization(quant_name), target)
    with target:
        return tvm.transform.Sequential(fusion_passes(target))(mod)


@pytest.mark.parametrize("name", ["q4f32_1", "q8f16_1", "qkf32_a"])
def test_no_full_size_dequantized_weight_in_compiled_module(name):
    cfg = resolve_model("santacoder", context_window_size=256).config
    cfg.n_layer, cfg.n_positions = 1, 1024  # wpe (n_positions, n_embd) is float by design: keep its shape apart
    shapes = full_weight_shapes(cfg)
    assert float_buffers_of_shape(lowered(cfg, name), shapes) == []
    # The check does see full-size float weights: the unquantized model has them as parameters.
    assert float_buffers_of_shape(lowered(cfg, "q0f32"), shapes)


# The briefly trained tiny model is shipped in tests/data/trained-tiny (1.6 MB), not trained at test time:
# training is chaotic in floating point (300 AdamW steps from the same seed end with weights up to 1e-2
# apart when only the thread count or the CPU's GEMM kernels change, even in float64), so a model trained
# on an Intel CPU and one trained on a Zen 5 CPU are different models with different quantization error
# (q4 KL 0.0120 against 0.0046). Shipped, every CPU measures the same network. Made with
# `python tests/hf_models.py trained tests/data/trained-tiny` (hf_models.make_trained_checkpoint).
TRAINED = Path(__file__).parent / "data" / "trained-tiny"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shipped trained tiny model, its HF fp32 greedy continuations and their logits."""
    from hf_models import load_hf

    hf_dir = tmp_path_factory.mktemp("trained") / "hf"
    shutil.copytree(TRAINED, hf_dir)
    hf = load_hf(hf_dir)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, hf.config.vocab_size, 8).tolist() for _ in range(4)]
    refs = []
    with torch.no_grad():
        for p in prompts:
            seq = hf.generate(torch.tensor([p]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0].tolist()
            refs.append((seq, hf(torch.tensor([seq])).logits[0].numpy()))
    return hf_dir, refs


def run_scheme(trained, name: str, tmp_path, activations: str = "auto"):
    """Convert + compile the trained model for `name` (and --activations); teacher-forced logits of ours and
    HF fp32's, and the converted directory."""
    from gptbc.compile.compiler import compile_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.runtime.engine import Engine

    hf_dir, refs = trained
    out = convert_weight(hf_dir, name, tmp_path / name, progress=False)
    lib = compile_model(resolve_model(str(out)), "cpu", name, tmp_path / f"{name}-{activations}.so",
                        log=lambda _m: None, activations=activations)
    engine = Engine(out, lib)
    results = []
    for seq, ref in refs:
        s = engine.runner.add_sequence()
        got = engine.runner.verify(s, seq)  # logits after every token, teacher-forced on HF's greedy tokens
        engine.runner.remove_sequence(s)
        results.append((got[7:71], ref[7:71]))  # the 64 generated steps
    return results, out


def dequantized_hf(out, name: str, hf_dir):
    """HF fp32 with the weights gptbc converted, dequantized in numpy: the network our kernels must compute."""
    from safetensors.numpy import load_file

    from hf_models import load_hf

    q = get_quantization(name)
    hf = load_hf(hf_dir)
    shapes = {k: v.shape for k, v in hf.state_dict().items()}
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    state = {}
    for key, value in tensors.items():
        if key.endswith(".q_scale"):
            continue
        if key.endswith(".q_weight"):
            base = key[:-len(".q_weight")]
            cols = shapes[base + ".weight"][1]
            state[base + ".weight"] = torch.from_numpy(dequantize(value, tensors[base + ".q_scale"], cols, q))
        else:
            state[key] = torch.from_numpy(value.astype(np.float32))
    hf.load_state_dict(state, strict=False)
    if "lm_head.weight" not in state:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("name", ["q8f32_1", "q4f32_1"])
def test_quantized_kernels_compute_the_dequantized_network(trained, name, tmp_path):
    """Our fused dequantize-in-the-matmul kernels against the same weights dequantized in numpy and run
    in HF fp32. Both sides compute in float32 on the same numbers, so they differ only by summation
    order (measured <= 8e-7 relative); 1e-4 holds on any CPU and still fails on a wrong scale,
    a wrong nibble or a dropped group, which move logits by far more. (With int8 activations the network
    is a different one; tests/test_int8.py checks those kernels against their integer reference.)"""
    results, out = run_scheme(trained, name, tmp_path, activations="float")
    hf_dir, refs = trained
    hf = dequantized_hf(out, name, hf_dir)
    for (got, _), (seq, _) in zip(results, refs):
        with torch.no_grad():
            want = hf(torch.tensor([seq])).logits[0].numpy()[7:71]
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-4, f"{name}: relative logit error against the dequantized network {err:.2e}"


@pytest.mark.parametrize("name", ["q0f16", "q0bf16"])
def test_half_precision_logits_within_1e_2(trained, name, tmp_path):
    results, _ = run_scheme(trained, name, tmp_path)
    for got, ref in results:
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= 1e-2, f"{name}: relative logit error {err:.2e}"


# Accuracy of each scheme on the shipped model (measured values in BENCHMARKS.md, the same again on Zen 4,
# 2026-12-07). The bounds are ~1.25x what was measured: KL at 1.25x (rounded up), top-1 at one miss in 256 more
# than measured where that is 0 or 1 miss (q8) and 6 misses where 5 were measured (q4), so a 2x regression fails.
# Since the model is shipped and the kernels compute the dequantized network to ~1e-7 (test above), the only thing
# that varies between CPUs is float32 summation order in HF and in our kernels, which moves KL by ~1e-6 (a
# third of the q8 margin). int8 activations (issue 14) run on every CPU (a generic kernel where there is no
# VNNI computes the same integers).
@pytest.mark.parametrize("name, activations, min_top1, max_kl", [
    ("q8f32_1", "float", 0.996, 1.5e-5), ("q8f16_1", "float", 0.996, 1.4e-5),
    ("q4f32_1", "float", 0.976, 5.7e-3), ("q4f16_1", "float", 0.976, 5.9e-3),
    ("q8f32_1", "int8", 0.996, 2.3e-5), ("q4f32_1", "int8", 0.976, 5.7e-3), ("q4f16_1", "int8", 0.976, 5.9e-3)])
def test_quantized_greedy_agreement(trained, name, activations, min_top1, max_kl, tmp_path, record_property):
    results, _ = run_scheme(trained, name, tmp_path, activations)
    top1 = np.mean([np.mean(g.argmax(-1) == r.argmax(-1)) for g, r in results])
    divergence = np.mean([kl(r, g) for g, r in results])
    record_property("top1", float(top1))  # plain floats: xdist sends them between processes
    record_property("kl", float(divergence))
    print(f"{name} ({activations} activations): top-1 agreement {top1:.3f} over 4x64 steps, "
          f"KL(hf || ours) {divergence:.2e} nats")
    assert top1 >= min_top1
    assert divergence < max_kl


def kl(ref: np.ndarray, got: np.ndarray) -> float:
    lp, lq = torch.log_softmax(torch.tensor(ref), -1), torch.log_softmax(torch.tensor(got), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_library_and_weights_of_different_schemes(trained, tmp_path, capsys):
    from gptbc.cli import main
    from gptbc.compile.compiler import compile_model
    from gptbc.artifact.convert import convert_weight

    hf_dir, _ = trained
    out = convert_weight(hf_dir, "q4f32_1", tmp_path / "w", progress=False)
    # Built from the HF directory: compiling the q4 directory for q8 is refused earlier (test_errors.py).
    lib = compile_model(resolve_model(str(hf_dir)), "cpu", "q8f32_1", tmp_path / "q8.so", log=lambda _m: None)
    capsys.readouterr()
    assert main(["generate", str(out), "--lib", str(lib), "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "q8f32_1" in err and "q4f32_1" in err and len(err.splitlines()) == 1
