"""The CLI contract, run as a user runs it (the installed `gptbc` console script)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import torch

from hf_models import load_hf, make_checkpoint

MODEL_FUNCTIONS = ["embed", "prefill", "decode", "batch_prefill", "batch_decode", "batch_verify",
                   "create_paged_kv_cache", "argmax", "_metadata"]


def gptbc(*args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["gptbc", *map(str, args)], capture_output=True, text=True, check=check,
                          env={**os.environ, **(env or {})})


def library_metadata(lib):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    for name in MODEL_FUNCTIONS:
        assert vm[name] is not None
    return json.loads(str(vm["_metadata"]()))


def test_checkpoint_to_text_walkthrough(tmp_path):
    """The README walk-through: HF checkpoint → convert → compile → generate, greedy ids equal HF. The suite's
    one compile without the artifact cache (GPTBC_NO_CACHE): every other library comes from it or goes into it."""
    hf_dir = make_checkpoint(tmp_path / "hf", n_embd=64, n_head=4, n_layer=2, tokenizer="dash", seed=5)
    out_dir, lib = tmp_path / "out", tmp_path / "model.so"
    gptbc("convert-weight", hf_dir, "--quantization", "q0f32", "-o", out_dir)
    build = gptbc("compile", "--model", out_dir, "--target", "cpu", "-o", lib, env={"GPTBC_NO_CACHE": "1"})
    assert build.stdout.strip() == str(lib) and "lower and build" in build.stderr and "cached" not in build.stderr
    run = gptbc("generate", out_dir, "--lib", lib, "--prompt", "def fibonacci(n):", "--max-new-tokens", "10", "--json")
    result = json.loads(run.stdout)

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = tok.encode("def fibonacci(n):").ids
    with torch.no_grad():
        want = load_hf(hf_dir).generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                        eos_token_id=0, pad_token_id=0)[0, len(ids):].tolist()
    assert result["token_ids"] == want
    assert result["text"] == tok.decode([t for t in want if t != 0], skip_special_tokens=False)

    timings = result["timings"]
    assert timings["prompt_tokens"] == len(ids) and timings["generated_tokens"] == 10
    assert timings["prefill_s"] > 0 and timings["decode_tokens_per_s"] > 0

    plain = gptbc("generate", out_dir, "--lib", lib, "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "10",
                  "--threads", "1")
    assert plain.stdout.rstrip("\n") == result["text"]
    assert "tok/s" in plain.stderr.splitlines()[-1]  # the summary goes to stderr, the text alone to stdout


def test_help_shows_defaults_and_describes_every_option():
    import re

    for command in ("compile", "convert-weight", "generate", "bench", "serve"):
        text = gptbc(command, "--help").stdout
        options = re.findall(r"^  (-[-\w]+|-o, --output)(?: [A-Z_]+)?(?:\n {10,}| +)(\S*)", text, re.M)
        assert options, text
        for flag, first_word in options:
            assert first_word, f"gptbc {command} {flag} has no description"
    assert "(default: cpu)" in " ".join(gptbc("compile", "--help").stdout.split())
    assert "q4f16_1" in gptbc("compile", "--help").stdout and "q8f32_1" in gptbc("convert-weight", "--help").stdout
    bench = " ".join(gptbc("bench", "--help").stdout.split())  # argparse wraps lines at the terminal width
    assert "--prompt-tokens" in bench and "(default: 512)" in bench and "(default: 4,16)" in bench


def test_library_exports_every_function_and_metadata(tiny_model):
    m = tiny_model("mqa32")
    meta = library_metadata(m.lib)
    assert meta["quantization"]["name"] == "q0f32" and meta["target"] == "cpu"
    assert meta["context_window_size"] == 128 and meta["prefill_chunk_size"] == 16
    assert meta["model_config"]["n_inner"] == 200 and meta["gptbc_version"]
    names = [p["name"] for p in meta["params"]]
    assert names[0] == "transformer.wte.weight" and names[-1] == "lm_head.weight"  # untied: has its own head
    written = json.loads((m.out_dir / "gptbc-config.json").read_text())["params"]
    assert [(p["name"], p["shape"], p["dtype"]) for p in written] == \
        [(p["name"], p["shape"], p["dtype"]) for p in meta["params"]]


def test_compile_santacoder_preset_default_path(tmp_path):
    """The README's main command, offline: the bundled santacoder preset compiles for the CPU."""
    run = subprocess.run(["gptbc", "compile", "--model", "santacoder", "--target", "cpu"], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    lib = tmp_path / "dist" / "libs" / "santacoder-q0f32-cpu.so"
    assert run.stdout.strip().endswith(str(lib.relative_to(tmp_path))) and lib.is_file()
    meta = library_metadata(lib)
    assert meta["model_config"]["n_layer"] == 24 and len(meta["params"]) == 2 + 24 * 12 + 2  # wte, wpe, blocks, ln_f; tied head
    assert sorted(p.name for p in lib.parent.iterdir()) == ["santacoder-q0f32-cpu.so"]  # no temp files left


def test_max_new_tokens_zero_and_eos_stop(engine_of):
    engine = engine_of("mqa64")
    assert engine.generate([1, 2, 3], 0) == []
    # Make the first greedy token an eos id: generation must stop right after it.
    logits_prompt = [5, 6, 7]
    first = engine.generate(logits_prompt, 1)[0]
    engine.eos_ids = {first}
    try:
        assert engine.generate(logits_prompt, 20) == [first]
    finally:
        engine.eos_ids = set(engine.config.eos_token_id)
    seq = engine.runner.add_sequence()
    assert np.all(np.isfinite(engine.runner.prefill(seq, [1])))
    engine.runner.remove_sequence(seq)
