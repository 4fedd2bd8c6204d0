"""Every script in scripts/ runs in a test, in its smallest mode, as a subprocess (as a user runs it), so an API
change that breaks one fails here rather than on the next person to run it.

Tested elsewhere: bench_peers.py and profile_kernels.py (test_bench.py), bench_server.py (test_server.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from native_build import shared_build

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(run: subprocess.CompletedProcess, *words: str) -> str:
    """A bad-input run: exit 1, one `error: ...` line on stderr naming `words`, no traceback."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_every_script_is_run_by_a_test():
    # a new script without a test fails here: name it in a test that runs it (ROOT / "scripts" / "NAME.py")
    tests = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    scripts = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))
    assert len(scripts) >= 6
    assert [s for s in scripts if f'"{s}"' not in tests] == []


# ---- bench_native.py: gptbc-run and the Python engine on one model ----

@pytest.fixture(scope="module")
def gptbc_run() -> Path:
    return shared_build() / "gptbc-run"


def test_bench_native(tiny_model, gptbc_run):
    m = tiny_model("mqa64")
    # two rounds: the order of the runners flips in the second
    run = run_script("bench_native.py", m.out_dir, "--lib", m.lib, "--runner", gptbc_run, "--prompt", 8,
                     "--decode", 4, "--repeat", 2)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "8-token prompt, 4 greedy decode steps, batch 1, 2 alternating rounds" in run.stdout
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    assert {"gptbc-run (C++)", "Engine (Python)"} <= set(rows)
    assert run.stdout.rstrip().endswith("same greedy tokens: yes")


def test_bench_native_bad_input(tiny_model, tmp_path):
    m = tiny_model("mqa64")
    one_line_error(run_script("bench_native.py", m.out_dir, "--lib", m.lib, "--runner", tmp_path / "gptbc-run"),
                   "--runner", "no such file", "cmake")
    one_line_error(run_script("bench_native.py", m.hf_dir, "--lib", m.lib, "--runner", sys.executable),
                   "gptbc-config.json")


# ---- bench_prompt_lookup.py: plain greedy and prompt lookup on an editing workload ----

def test_bench_prompt_lookup(tiny_model, tmp_path):
    m = tiny_model("mqa64")
    source = tmp_path / "edit.py"
    source.write_text("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n")
    run = run_script("bench_prompt_lookup.py", m.out_dir, "--lib", m.lib, "--file", source, "--new-tokens", 12,
                     "--draft", 4, "--repeat", 1)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    r = json.loads(run.stdout)
    assert r["new_tokens"] == 12 and r["prompt_tokens"] > 0 and r["same_tokens"] is True
    assert r["plain"]["tokens_per_step"] == 1.0 and r["prompt_lookup"]["tokens_per_step"] >= 1.0
    assert 0 <= r["prompt_lookup"]["acceptance_rate"] <= 1 and r["speedup"] > 0


def test_bench_prompt_lookup_bad_file(tiny_model, tmp_path):
    m = tiny_model("mqa64")
    empty, long = tmp_path / "empty.py", tmp_path / "long.py"
    empty.write_text("")
    long.write_text("x = 1 - 2 - 3\n" * 200)  # far past the tiny model's 128-token context window
    for path, words in ((tmp_path / "missing.py", ["missing.py", "No such file"]), (empty, ["is empty"]),
                        (long, ["context window holds 128", "no room"])):
        one_line_error(run_script("bench_prompt_lookup.py", m.out_dir, "--lib", m.lib, "--file", path), *words)


# ---- bench_draft.py: the trained pair's tokens per verify and speedup; step costs and a projection ----

def test_bench_draft_trained(trained_tiny, draft_tiny):
    run = run_script("bench_draft.py", "trained", "--target", trained_tiny.out_dir, "--target-lib", trained_tiny.lib,
                     "--draft", draft_tiny.out_dir, "--draft-lib", draft_tiny.lib, "--new-tokens", 12, "--repeat", 1,
                     "--json")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    r = json.loads(run.stdout)
    assert r["same_tokens"] is True and r["prompts"] == 5 and r["new_tokens"] > 0
    assert r["tokens_per_verify"] > 1 and 0 < r["acceptance_rate"] <= 1 and r["speedup"] > 0
    assert r["target_steps"]["draft"] < r["target_steps"]["plain"]


def test_bench_draft_shapes(trained_tiny, draft_tiny):
    run = run_script("bench_draft.py", "shapes", "--target", trained_tiny.out_dir, "--target-lib", trained_tiny.lib,
                     "--draft", draft_tiny.out_dir, "--draft-lib", draft_tiny.lib, "--steps", 2, "--max-k", 2,
                     "--json")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    r = json.loads(run.stdout)
    assert r["cost_ratio"] > 0 and set(r["target_verify_s"]) == {"1", "2"}
    assert [row["acceptance"] for row in r["projection"]] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert all(row["k"] in (1, 2) and row["speedup"] > 0 for row in r["projection"])
    assert "PROJECTED at acceptance 70%" in run.stderr
    one_line_error(run_script("bench_draft.py", "shapes", "--target", trained_tiny.out_dir, "--draft",
                              draft_tiny.out_dir, "--layers", "2,4"), "--layers", "needs a preset")


def test_bench_draft_extrapolates_only_costs_that_grow_with_layers():
    """--layers draws a line through two layer counts; timings where more layers cost less are noise, and a line
    through them projects negative step times: refused in one line instead."""
    import importlib.util

    from gptbc.errors import GptbcError

    spec = importlib.util.spec_from_file_location("bench_draft", Path(__file__).parents[1] / "scripts" / "bench_draft.py")
    bench_draft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_draft)
    four = {"n_layer": 4, "decode": 0.2, "verify": {1: 0.25}}
    full = bench_draft.extrapolate(four, {"n_layer": 8, "decode": 0.4, "verify": {1: 0.45}}, 40)
    assert full["decode"] == pytest.approx(2.0) and full["verify"][1] == pytest.approx(2.05)
    with pytest.raises(GptbcError, match="--layers 4,8: a step at 8 layers took 100.00 ms .* noise"):
        bench_draft.extrapolate(four, {"n_layer": 8, "decode": 0.1, "verify": {1: 0.45}}, 40)


# ---- make_random_checkpoint.py: a sharded random checkpoint of a model's shape ----

def test_make_random_checkpoint_loads_in_transformers(tmp_path):
    from safetensors import safe_open
    from transformers import GPTBigCodeForCausalLM

    from hf_models import make_checkpoint

    # untied lm_head, MHA, n_inner not 4x: every optional tensor and shape rule
    hf = make_checkpoint(tmp_path / "hf", n_embd=96, n_head=3, n_inner=200, n_layer=2, multi_query=False,
                         tie_word_embeddings=False)
    out = tmp_path / "random"
    run = run_script("make_random_checkpoint.py", "--preset", hf, "--dtype", "float16", "--shard-gb", "0.0001",
                     "-o", out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards  # 100 KiB shards

    def tensors(files):
        found = {}
        for f in files:
            with safe_open(str(f), "numpy") as st:
                found.update({k: st.get_slice(k) for k in st.keys()})
        return {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in found.items()}

    got, want = tensors(out / s for s in shards), tensors([hf / "model.safetensors"])
    assert {k: shape for k, (shape, _) in got.items()} == {k: shape for k, (shape, _) in want.items()}
    assert {dtype for _, dtype in got.values()} == {"F16"}
    assert index["metadata"]["total_size"] == sum(2 * math.prod(s) for s, _ in got.values())
    model, info = GPTBigCodeForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == set() and not info["mismatched_keys"]
    assert model.config.n_inner == 200 and not model.config.multi_query


def test_make_random_checkpoint_bad_input(tmp_path):
    one_line_error(run_script("make_random_checkpoint.py", "--preset", "no-such-preset", "-o", tmp_path / "a"),
                   "no-such-preset", "starcoderbase-1b")
    one_line_error(run_script("make_random_checkpoint.py", "--preset", "starcoderbase-1b", "-o", tmp_path),
                   str(tmp_path), "exists")
    one_line_error(run_script("make_random_checkpoint.py", "--preset", "starcoderbase-1b", "--shard-gb", "0",
                              "-o", tmp_path / "b"), "--shard-gb")


# ---- make_random_gguf.py: a random F16 GGUF of a model's shape, for timing GGUF conversion ----

def test_make_random_gguf_converts_with_the_models_shapes(import_checkpoint, tmp_path):
    from safetensors.numpy import load_file

    from gptbc.artifact.convert import convert_weight

    out = tmp_path / "random.gguf"
    run = run_script("make_random_gguf.py", "--preset", import_checkpoint, "-o", out)
    assert run.returncode == 0 and run.stdout.strip() == str(out), run.stderr[-2000:]
    converted = convert_weight(out, None, tmp_path / "w", progress=False)  # F16 → q0f16, as stored
    got = load_file(str(converted / "params-00001-of-00001.safetensors"))
    want = load_file(str(import_checkpoint / "model.safetensors"))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items() if k in got}
    assert set(want) - set(got) <= {"lm_head.weight"} and got["transformer.h.0.ln_1.weight"].min() == 1.0


def test_make_random_gguf_bad_input(tmp_path):
    one_line_error(run_script("make_random_gguf.py", "--preset", "no-such-preset", "-o", tmp_path / "a.gguf"),
                   "no-such-preset")
    one_line_error(run_script("make_random_gguf.py", "--preset", "starcoderbase-1b", "--vocab-from",
                              tmp_path / "none.gguf", "-o", tmp_path / "b.gguf"), "--vocab-from")


# ---- bench_prefix_reuse.py: what batch-invariant mode costs a prompt reusing a cached prefix ----

def test_bench_prefix_reuse(tiny_model, tmp_path):
    from gptbc.artifact.config import resolve_model
    from gptbc.compile.compiler import compile_model

    m = tiny_model("mqa64")
    inv = compile_model(resolve_model(str(m.out_dir)), "cpu", "q0f32", tmp_path / "inv.so", log=lambda _m: None,
                        batch_invariant=True)
    run = run_script("bench_prefix_reuse.py", m.out_dir, "--lib", m.lib, "--invariant-lib", inv, "--shared", 40,
                     "--new", 20, "--repeat", 1)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    r = json.loads(run.stdout)
    # the plain engine forks all 40 shared tokens, the mode copies the 32 of whole grains
    assert r["runs"]["plain"][0]["reused_tokens"] == 40 and r["runs"]["invariant"][0]["reused_tokens"] == 32
    assert r["reuse_invariant_over_plain"] > 0
    one_line_error(run_script("bench_prefix_reuse.py", m.out_dir, "--lib", m.lib, "--invariant-lib", m.lib),
                   "--invariant-lib", "without --batch-invariant")
    one_line_error(run_script("bench_prefix_reuse.py", m.out_dir, "--lib", m.lib, "--invariant-lib", inv,
                              "--shared", 120, "--new", 20), "--shared 120", "context window")


# ---- check_gguf_santacoder.py: a quantized GGUF converted, compiled and compared with HF ----

def test_check_gguf_santacoder_smallest_mode(tmp_path):
    """The tiny shape with gguf-py's Q5_0/Q5_1/Q4_1 mix (the suite never runs llama.cpp), on the CPU."""
    run = run_script("check_gguf_santacoder.py", "--shape", "tiny", "--layers", 1, "--llama-quantize", "gguf",
                     "--steps", 3, "--workdir", tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "cpu: model-legacy-mix.gguf, 1 layer(s): relative logit error" in run.stdout
    assert "greedy tokens identical" in run.stdout
    missing = run_script("check_gguf_santacoder.py", "--llama-quantize", tmp_path / "nope")
    one_line_error(missing, "--llama-quantize", "no such file")


# ---- bench_start.py: `gptbc serve MODEL` to a healthy /health, first start and after ----

def test_bench_start(tiny_model):
    """Its smallest mode: an HF directory, two starts with the suite's cache (the library is the one the fixture
    built; the weights are converted on the first start unless another test did); the second builds nothing."""
    m = tiny_model("mqa64")
    run = run_script("bench_start.py", m.hf_dir, "--quantization", "q0f32", "--starts", 2, "--json", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    starts = json.loads(run.stdout)["starts"]
    assert len(starts) == 2 and all(s["to_health_s"] > 0 for s in starts)
    assert starts[1]["built"] == [] and len(starts[1]["cached"]) == 2
    assert not any("library" in b for b in starts[0]["built"])


# ---- bench_editor.py: one /infill per keystroke, as llama.vim sends them ----

def test_bench_editor(tiny_model, tmp_path):
    """Its smallest mode: the tiny model (a 128-token window, so the prompt is cut to fit), 3 keystrokes,
    gptbc serve only, in both FIM orders. In SPM a keystroke evaluates only the typed token(s) and reuses the
    rest; in PSM the text after the cursor is evaluated again each time."""
    m = tiny_model("mqa64")
    run = run_script("bench_editor.py", m.hf_dir, "--quantization", "q0f32", "--keystrokes", 3, "--n-predict", 4,
                     "--n-prefix", 8, "--n-suffix", 4, "--extra-lines", 4, "--json", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    runs = {r["order"]: r for r in json.loads(run.stdout)["runs"]}
    assert set(runs) == {"psm", "spm"}
    assert all(r["server"] == "gptbc serve" and r["keystrokes"] == 3 and r["cold_evaluated"] > 100
               for r in runs.values())
    # A typed character may re-merge the last few BPE tokens of the cursor line: a few tokens, not the rest.
    for spm, psm in zip(runs["spm"]["per_keystroke"][0], runs["psm"]["per_keystroke"][0]):
        assert spm["evaluated"] <= 4 and spm["reused"] >= runs["spm"]["cold_evaluated"] - 4, spm
        assert psm["evaluated"] > spm["evaluated"] + 4, (psm, spm)
    missing = run_script("bench_editor.py", m.hf_dir, "--file", tmp_path / "nope.py")
    one_line_error(missing, "nope.py", "cannot read")


# ---- cpu_limits.py: the int8 dot-product peak and the read bandwidth of this CPU ----

def test_cpu_limits_smallest_mode():
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("cpu_limits.py probes x86 CPUs only")
    run = run_script("cpu_limits.py", "--threads", 2, "--seconds", 0.05, "--mib", 64, "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout)
    assert r["threads"] == 2 and r["read_gbs_1"] > 0 and r["read_gbs_n"] > 0
    if r["avx512vnni"]:
        assert min(r["gmac_512_1"], r["gmac_512_n"], r["gmac_256_1"], r["gmac_256_n"]) > 0
    one_line_error(run_script("cpu_limits.py", "--seconds", 0), "--seconds")
