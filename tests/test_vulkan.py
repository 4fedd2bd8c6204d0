"""`--target vulkan` executed: WGSL kernels on gptbc's WebGPU runtime (wgpu-native) on a Vulkan adapter.

In CI that adapter is Mesa's lavapipe (a CPU Vulkan driver, `apt-get install mesa-vulkan-drivers`), so every
run executes our GPU schedules and TVM's GPU kernels (dlight rules, paged-KV-cache attention) and checks them
against HF transformers and the CPU build. Without an adapter (or without the `vulkan` extra) the tests skip
with the reason printed; GPTBC_REQUIRE_VULKAN=1 (set by .ci/run) turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_models import load_hf, make_checkpoint
from vulkan_device import REQUIRED, why_no_vulkan

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
# 35 tokens: the prompt fills two 16-token KV pages and starts a third; decoding crosses the next boundary.
PROMPT = list(range(5, 40))

WHY_NOT = why_no_vulkan()
if WHY_NOT and REQUIRED:
    raise RuntimeError(f"GPTBC_REQUIRE_VULKAN=1 but no Vulkan device: {WHY_NOT}")
pytestmark = [pytest.mark.vulkan, pytest.mark.skipif(WHY_NOT is not None, reason=f"no Vulkan device: {WHY_NOT}")]


def _compile(out_dir, target, quant, path, **overrides):
    from gptbc.compile.compiler import compile_model
    from gptbc.artifact.config import resolve_model

    if not path.exists():  # float activations on the CPU too: the GPU kernels are compared with that network
        compile_model(resolve_model(str(out_dir), **overrides), target, quant, path, log=lambda _m: None,
                      activations="float")
    return path


@pytest.fixture(scope="module")
def vulkan_lib(tiny_model, tmp_path_factory):
    """vulkan_lib(name, quant="q0f32") → (converted dir, vulkan library, cpu library) for a tiny model."""
    from conftest import VARIANTS
    from gptbc.artifact.convert import convert_weight

    root = tmp_path_factory.mktemp("vulkan")
    built = {}

    def get(name, quant="q0f32"):
        if (name, quant) not in built:
            m = tiny_model(name)
            overrides = VARIANTS[name][1]
            out = m.out_dir if quant == "q0f32" else convert_weight(m.hf_dir, quant, root / f"{name}-{quant}",
                                                                    progress=False)
            vk = _compile(out, "vulkan", quant, root / f"{name}-{quant}-vulkan.so", **overrides)
            cpu = m.lib if quant == "q0f32" else _compile(out, "cpu", quant, root / f"{name}-{quant}-cpu.so",
                                                          **overrides)
            built[name, quant] = (out, vk, cpu)
        return built[name, quant]

    return get


@pytest.fixture(scope="module")
def engines(vulkan_lib):
    from gptbc.runtime.engine import Engine

    made = {}

    def get(name, quant="q0f32"):
        if (name, quant) not in made:
            out, vk, cpu = vulkan_lib(name, quant)
            made[name, quant] = (Engine(out, vk, device="vulkan"), Engine(out, cpu))
        return made[name, quant]

    return get


def hf_greedy(hf_dir, ids, steps=STEPS):
    with torch.no_grad():
        out = load_hf(hf_dir).generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                                       attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def close(got, want, rtol):
    return float(np.abs(got - want).max()) <= rtol * float(np.abs(want).max())


@pytest.mark.parametrize("name", ["mqa64", "mha32"])
def test_q0f32_logits_and_greedy_match_hf(name, tiny_model, engines):
    gpu, _cpu = engines(name)
    m = tiny_model(name)
    assert gpu.runner.meta["device"] == "vulkan" and gpu.runner.dev.dlpack_device_type() == 15
    seq = gpu.runner.add_sequence()
    got = gpu.runner.verify(seq, PROMPT)  # logits after every prompt token, across the page boundaries
    gpu.runner.remove_sequence(seq)
    with torch.no_grad():
        want = load_hf(m.hf_dir)(torch.tensor([PROMPT])).logits[0].numpy()
    assert close(got, want, 1e-4), float(np.abs(got - want).max())
    # Prefill + 24 single-token decodes (the decode kernels, not verify's), then HF's greedy ids.
    seq = gpu.runner.add_sequence()
    logits = gpu.runner.prefill(seq, PROMPT)
    ids = []
    for _ in range(STEPS):
        ids.append(int(np.argmax(logits)))
        logits = gpu.runner.decode(seq, ids[-1])
    gpu.runner.remove_sequence(seq)
    assert ids == hf_greedy(m.hf_dir, PROMPT)
    assert gpu.generate(PROMPT, STEPS) == ids


@pytest.mark.parametrize("name, quant", [("mqa64", "q4f16_1"), ("mha32", "q0f16"), ("mha64", "q4f32_1"), ("mqa64", "q4f32_a"),
                                        ("mqa64", "qkf32_a")])
def test_quantized_matches_cpu_build(name, quant, engines):
    gpu, cpu = engines(name, quant)
    seq_g, seq_c = gpu.runner.add_sequence(), cpu.runner.add_sequence()
    got, want = gpu.runner.verify(seq_g, PROMPT), cpu.runner.verify(seq_c, PROMPT)
    gpu.runner.remove_sequence(seq_g)
    cpu.runner.remove_sequence(seq_c)
    # Same weights, same scheme: only float rounding (float16 accumulation orders) separates them.
    rtol = 1e-4 if quant.endswith("f32_1") else 2e-2
    assert close(got, want, rtol), float(np.abs(got - want).max())
    assert gpu.generate(PROMPT, STEPS) == cpu.generate(PROMPT, STEPS)


def test_batch_prefill_decode_verify(engines):
    gpu, cpu = engines("mha64")
    prompts = [PROMPT[:7], PROMPT[:19], PROMPT[3:36]]
    results = []
    for eng in (gpu, cpu):
        seqs = [eng.runner.add_sequence() for _ in prompts]
        first = eng.runner.prefill_batch(seqs, prompts)
        tokens = [int(t) for t in np.argmax(first, axis=-1)]
        steps = [eng.runner.decode_batch(seqs, tokens)]
        greedy = eng.runner.decode_batch_greedy(seqs, [int(t) for t in np.argmax(steps[0], axis=-1)])
        for s in seqs:
            eng.runner.remove_sequence(s)
        seqs = [eng.runner.add_sequence()]
        verified = eng.runner.verify(seqs[0], PROMPT[:21])  # batch_verify on a fresh sequence
        for s in seqs:
            eng.runner.remove_sequence(s)
        results.append((first, steps[0], greedy, verified))
    (g_first, g_step, g_greedy, g_ver), (c_first, c_step, c_greedy, c_ver) = results
    assert close(g_first, c_first, 1e-4) and close(g_step, c_step, 1e-4) and close(g_ver, c_ver, 1e-4)
    assert g_greedy == c_greedy


def test_prefill_onto_existing_history(tiny_model, engines):
    """Several tokens onto a sequence holding KV entries: TVM's paged prefill kernel over the cached pages, then
    the attention-state merge with the new tokens' own attention (docs/targets.md, Problem 3, fixed)."""
    gpu, _cpu = engines("mha64")
    with torch.no_grad():
        want = load_hf(tiny_model("mha64").hf_dir)(torch.tensor([PROMPT])).logits[0].numpy()
    seq = gpu.runner.add_sequence()
    gpu.runner.prefill(seq, PROMPT[:17])
    got = gpu.runner.verify(seq, PROMPT[17:21])  # verify after a prefill
    last = gpu.runner.prefill(seq, PROMPT[21:])  # a second prefill, onto 21 entries, across a page boundary
    gpu.runner.remove_sequence(seq)
    assert close(got, want[17:21], 1e-4), float(np.abs(got - want[17:21]).max())
    assert close(last, want[-1], 1e-4), float(np.abs(last - want[-1]).max())


def test_chunked_prompt_and_prefix_reuse_match_hf(tiny_model, engines):
    gpu, _cpu = engines("mqa32")  # prefill_chunk_size 16: PROMPT (35 tokens) is prefilled in 3 chunks
    m = tiny_model("mqa32")
    assert gpu.runner.prefill_chunk_size == 16 < len(PROMPT)
    with torch.no_grad():
        want = load_hf(m.hf_dir)(torch.tensor([PROMPT])).logits[0, -1].numpy()
    seq = gpu.runner.add_sequence()
    got = gpu.runner.prefill(seq, PROMPT)
    gpu.runner.remove_sequence(seq)
    assert close(got, want, 1e-4), float(np.abs(got - want).max())
    # Through the engine: the long prompt, then one sharing its first 30 tokens, forked from the cached prefix
    # (its remainder is prefilled onto those 30 entries).
    gpu.scheduler.clear_prefix_cache()
    assert gpu.generate(PROMPT, 8) == hf_greedy(m.hf_dir, PROMPT, 8)
    other = PROMPT[:30] + [60, 61, 62, 63]
    reused = gpu.scheduler.stats.reused_prefix_tokens
    assert gpu.generate(other, 8) == hf_greedy(m.hf_dir, other, 8)
    assert gpu.scheduler.stats.reused_prefix_tokens > reused
    gpu.scheduler.clear_prefix_cache()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_merge_state_kernel_is_race_free(dtype, tmp_path):
    """The cause of Problem 3: TVM's `tir_attention_merge_state` has each thread read a head's lse and then
    write it, no barrier between; lavapipe runs a block's threads in 8-lane groups one after another, so later
    groups merged with the already-merged lse. gptbc compiles kernels.merge_state_inplace in its place."""
    import tvm
    from tvm.relax.frontend.nn.llm.kv_cache import _merge_state_inplace

    from gptbc.runtime import webgpu
    from gptbc.errors import GptbcError
    from gptbc.compile.kernels import MERGE_STATE, merge_state_inplace
    from gptbc.compile.targets import host_cpu_target

    webgpu.load_runtime()
    n, h, d = 5, 2, 64
    target = tvm.target.Target({"kind": "webgpu", "host": host_cpu_target()})
    rng = np.random.default_rng(0)
    v, v_other = rng.standard_normal((2, n, h, d)).astype(dtype)
    s, s_other = (3 * rng.standard_normal((2, n, h))).astype("float32")
    top = np.maximum(s, s_other)
    w, w_other = np.exp2(s - top), np.exp2(s_other - top)
    v32, v_other32 = v.astype("float32"), v_other.astype("float32")
    want_v = (v32 * w[..., None] + v_other32 * w_other[..., None]) / (w + w_other)[..., None]
    want_s = np.log2(w + w_other) + top
    errors = {}
    for which, func in (("tvm", _merge_state_inplace(h, d, dtype, target)),
                        ("ours", merge_state_inplace(h, d, dtype, 256))):
        func = func.with_attr("global_symbol", MERGE_STATE)
        path = tmp_path / f"merge-{which}-{dtype}.so"
        tvm.compile(tvm.IRModule({MERGE_STATE: func}), target=target).mod.export_library(str(path))
        kernel = tvm.runtime.load_module(str(path))[MERGE_STATE]
        if which == "tvm":  # the engine refuses a library built with TVM's kernel (before the fix)
            with pytest.raises(GptbcError, match="Problem 3.*rebuild"):
                webgpu.check_merge_kernel(path)
        else:
            webgpu.check_merge_kernel(path)
        dev = tvm.device("webgpu", 0)
        args = [tvm.runtime.tensor(a, dev) for a in (v, s, v_other, s_other)]
        kernel(*args)
        errors[which] = max(float(np.abs(args[0].numpy().astype("float32") - want_v).max()),
                            float(np.abs(args[1].numpy() - want_s).max()))
    assert errors["ours"] < (1e-5 if dtype == "float32" else 5e-3), errors
    # TVM's kernel is right only where a head's 16 threads run in lockstep (one SIMT warp); on lavapipe it is not.
    adapter = webgpu.adapter_of(tvm.device("webgpu", 0))
    if adapter["type"] == "cpu":
        assert errors["tvm"] > 1e-2, errors


def test_continuous_batching_and_submits(engines):
    from gptbc.runtime import webgpu

    gpu, cpu = engines("mqa64")
    prompts = [PROMPT[:5], PROMPT, PROMPT[10:27], PROMPT[:16]]
    assert gpu.generate_batch(prompts, max_new_tokens=12) == cpu.generate_batch(prompts, max_new_tokens=12)
    # One decode call: its dispatches go out together; only the logits readback makes a submission.
    seq = gpu.runner.add_sequence()
    gpu.runner.prefill(seq, PROMPT[:8])
    before = webgpu.stats(gpu.runner.dev)
    gpu.runner.decode(seq, 7)
    after = webgpu.stats(gpu.runner.dev)
    gpu.runner.remove_sequence(seq)
    dispatches, submits = after["dispatches"] - before["dispatches"], after["submits"] - before["submits"]
    assert dispatches >= 10 and submits <= 3, (dispatches, submits)


def test_server_answers_on_vulkan(vulkan_lib):
    import openai

    from gptbc.runtime.engine import Engine
    from test_server import live_server

    out, vk, cpu = vulkan_lib("mqa64")
    with live_server(Engine(out, vk, device="vulkan")) as (base, _server):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    want = Engine(out, cpu).generate(PROMPT, 8)
    assert got.choices[0].text == Engine(out, cpu).tokenizer.decode(want)
    assert got.usage.completion_tokens == 8


def gptbc(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gptbc.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(run, *needles):
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr, run.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_generate_on_vulkan_matches_hf(tiny_model, vulkan_lib):
    m = tiny_model("mha32")
    out, vk, _cpu = vulkan_lib("mha32")
    run = gptbc("generate", out, "--lib", vk, "--device", "vulkan:0", "--prompt-ids", ",".join(map(str, PROMPT)),
                "--max-new-tokens", STEPS, "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == hf_greedy(m.hf_dir, PROMPT)


def test_errors_no_adapter_wrong_device_and_f16(tiny_model, vulkan_lib, monkeypatch):
    out, vk, cpu = vulkan_lib("mqa64")
    ids = "1,2,3"
    # No Vulkan driver: the loader finds no ICD.
    run = gptbc("generate", out, "--lib", vk, "--device", "vulkan", "--prompt-ids", ids,
                env={"VK_ICD_FILENAMES": "/nonexistent.json", "VK_DRIVER_FILES": "/nonexistent.json"})
    assert_one_line_error(run, "no Vulkan adapter", "mesa-vulkan-drivers")
    run = gptbc("generate", out, "--lib", vk, "--device", "vulkan:7", "--prompt-ids", ids)
    assert_one_line_error(run, "vulkan:7", "no such adapter")
    # A library for another device, both ways.
    assert_one_line_error(gptbc("generate", out, "--lib", cpu, "--device", "vulkan", "--prompt-ids", ids),
                          "built for cpu", "vulkan")
    assert_one_line_error(gptbc("generate", out, "--lib", vk, "--device", "cpu", "--prompt-ids", ids),
                          "built for vulkan", "cpu")
    # With no --device, the library's own device is the default.
    assert gptbc("generate", out, "--lib", vk, "--prompt-ids", ids, "--max-new-tokens", "2").returncode == 0
    # A float16 model on an adapter without shader-f16 (lavapipe has it: present the adapter without).
    from gptbc.runtime import webgpu
    from gptbc.errors import GptbcError
    from gptbc.runtime.engine import Engine

    f16_out, f16_lib, _ = vulkan_lib("mha32", "q0f16")
    real = webgpu.adapter_of
    monkeypatch.setattr(webgpu, "adapter_of", lambda dev: {**real(dev), "shader_f16": False})
    with pytest.raises(GptbcError, match="float16.*no shader-f16"):
        Engine(f16_out, f16_lib, device="vulkan")


def test_weight_over_binding_limit_is_refused(tmp_path):
    """A real tensor over lavapipe's 128 MiB storage binding: wte of 263000 x 128 float32 (134.7 MB)."""
    from gptbc.runtime import webgpu

    limit = webgpu.adapters()[0]["max_storage_buffer_binding_size"]
    vocab = limit // (128 * 4) + 100
    hf = make_checkpoint(tmp_path / "hf", n_embd=128, n_head=2, n_layer=1, vocab_size=vocab, n_positions=32)
    conv = gptbc("convert-weight", hf, "--quantization", "q0f32", "-o", tmp_path / "out")
    assert conv.returncode == 0, conv.stderr
    lib = tmp_path / "big.so"
    comp = gptbc("compile", "--model", tmp_path / "out", "--target", "vulkan", "-o", lib)
    assert comp.returncode == 0, comp.stderr
    run = gptbc("generate", tmp_path / "out", "--lib", lib, "--device", "vulkan", "--prompt-ids", "1,2")
    assert_one_line_error(run, "tensor transformer.wte.weight", f"{vocab * 128 * 4} bytes", f"{limit} bytes")


def test_gptbc_run_on_vulkan(tiny_model, vulkan_lib):
    """The native runner, built with the README's CMake commands, loads libgptbc_webgpu from beside itself."""
    from native_build import shared_build

    m = tiny_model("mqa64")
    out, vk, cpu = vulkan_lib("mqa64")
    exe = shared_build() / "gptbc-run"
    assert (exe.parent / "libgptbc_webgpu.so").is_file()
    run = subprocess.run([exe, "--model", out, "--lib", vk, "--device", "vulkan", "--prompt-ids",
                          ",".join(map(str, PROMPT)), "--max-new-tokens", str(STEPS), "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == hf_greedy(m.hf_dir, PROMPT)
    # mqa32's prefill chunk is 16 tokens: gptbc-run prefills PROMPT in 3 chunks, each onto the KV of the last.
    out32, vk32, _ = vulkan_lib("mqa32")
    run = subprocess.run([exe, "--model", out32, "--lib", vk32, "--device", "vulkan", "--prompt-ids",
                          ",".join(map(str, PROMPT)), "--max-new-tokens", "8", "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == hf_greedy(tiny_model("mqa32").hf_dir, PROMPT, 8)
    for args, needle in ((["--lib", vk], "run it with --device vulkan"),
                         (["--lib", cpu, "--device", "vulkan"], "built for cpu")):
        bad = subprocess.run([exe, "--model", out, *args, "--prompt-ids", "1,2"], capture_output=True, text=True)
        assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and needle in bad.stderr, bad.stderr


@pytest.mark.parametrize("kind", ["Q4_K_M", "Q5_K_M"])
def test_k_quant_file_on_vulkan_matches_the_dequantized_file(kind, tmp_path):
    """llama.cpp's K-quant mixes (4/5-bit and Q6_K tensors, each layer in its own affine width, qkf32_a): the WGSL
    dequantize-in-the-kernel GEMV/GEMM on lavapipe gives the logits of an HF model holding the file's values."""
    from conftest import assert_matches_hf
    from gguf_files import dequantized_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.runtime.engine import Engine

    kquant = ROOT / "tests" / "data" / "kquant"
    out = convert_weight(kquant / f"model-{kind}.gguf", "qkf32_a", tmp_path / "w", progress=False)
    lib = _compile(out, "vulkan", "qkf32_a", tmp_path / "vk.so")
    assert_matches_hf(Engine(out, lib, device="vulkan"), dequantized_model(kquant, kquant / f"model-{kind}.gguf"))
