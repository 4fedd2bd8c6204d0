"""`gptbc bench` and scripts/bench_peers.py run end to end (on tiny models: speed is not asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gptbc_bench_json(tiny_model):
    m = tiny_model("mqa64")
    run = subprocess.run(["gptbc", "bench", str(m.out_dir), "--lib", str(m.lib), "--prefill-tokens", "40", "--prompt-tokens", "8",
                          "--decode", "6", "--batch", "2,3", "--repeat", "2", "--prompt-lookup", "4", "--json"],
                         capture_output=True, text=True, check=True)
    r = json.loads(run.stdout)
    assert r["quantization"] == "q0f32" and r["activations"] == "float" and r["weight_bytes"] > 0
    assert r["prefill"]["tokens"] == 40 and len(r["prefill"]["seconds"]) == 2
    assert r["decode"]["tokens_per_s_best"] >= r["decode"]["tokens_per_s_median"] > 0
    assert r["decode"]["time_to_first_token_s"] > 0 and r["decode"]["weight_GBps_best"] > 0
    assert r["batch2"]["batch"] == 2 and r["batch3"]["tokens_per_s_best"] > 0
    assert r["peak_rss_bytes"] > r["weight_bytes"]
    assert r["read_GBps"] > 0 and r["decode_limit_tokens_per_s"] == r["read_GBps"] * 1e9 / r["weight_bytes"]
    assert "decode 6 tokens" in run.stderr  # progress goes to stderr with --json
    lookup = r["prompt_lookup"]
    assert lookup["same_tokens"] and lookup["speedup"] > 0 and 0 <= lookup["prompt_lookup"]["acceptance_rate"] <= 1
    assert lookup["plain"]["tokens_per_step"] == 1.0 and lookup["prompt_lookup"]["tokens_per_step"] >= 1.0


def bench_peers(work: Path, peers: str, env: dict | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_peers.py"), "--work", str(work),
                           "--shape", "tiny", "--repeat", "1", "--peers", peers, *extra],
                          capture_output=True, text=True, timeout=900, env=env)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """peer -> cells of its row in the Markdown table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and ":" in cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def test_bench_peers_script_end_to_end(tmp_path):
    run = bench_peers(tmp_path, "gptbc:q0f32,hf:fp32")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "read bandwidth" in run.stdout
    rows = table_rows(run.stdout)
    assert set(rows) == {"gptbc:q0f32", "hf:fp32"}
    # gptbc at full precision writes HF's greedy tokens: the column compares two runtimes, not hf with itself
    assert rows["gptbc:q0f32"][-1] == "8/8", rows


def test_bench_peers_names_a_missing_optional_package(tmp_path):
    # a ctranslate2 that fails to import stands in for one that isn't installed
    fake = tmp_path / "fake"
    (fake / "ctranslate2").mkdir(parents=True)
    (fake / "ctranslate2" / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    run = bench_peers(tmp_path / "work", "ct2:float32,hf:fp32", env)
    assert run.returncode == 1  # named in --peers, so missing is a failure; the others still run
    assert "ctranslate2 is not installed" in run.stderr and "scripts/requirements-peers.txt" in run.stderr
    assert "hf:fp32" in table_rows(run.stdout)


def test_bench_peers_llamacpp_and_ctranslate2(tmp_path):
    # optional peers (scripts/requirements-peers.txt): absent from the test extra, so skipped there.
    # Needs the llama-cpp-python sdist: $GPTBC_LLAMA_SDIST, else the script runs `pip download`.
    pytest.importorskip("ctranslate2", reason="optional peer: pip install -r scripts/requirements-peers.txt")
    peers = ["ct2:float32", "hf:fp32"]
    if importlib.util.find_spec("llama_cpp"):
        peers.insert(0, "llamacpp:f32")
    else:
        print("llama-cpp-python is not installed: llama.cpp is left out of this test")
    sdist = os.environ.get("GPTBC_LLAMA_SDIST")
    run = bench_peers(tmp_path, ",".join(peers), extra=("--llama-sdist", sdist) if sdist else ())
    assert run.returncode == 0, run.stderr[-3000:]
    rows = table_rows(run.stdout)
    assert set(rows) == set(peers)
    for peer in peers:
        assert float(rows[peer][1]) > 0 and float(rows[peer][2]) > 0  # prefill and decode tok/s
        assert rows[peer][-1] == "8/8", (peer, rows[peer])  # full precision: same greedy tokens as hf fp32
    if "llamacpp:f32" in rows:
        assert rows["ct2:float32"][-3].endswith("x")  # ratio to llama.cpp f32


def test_profile_kernels_script(tiny_model):
    m = tiny_model("mqa64")
    for tokens in ("1", "20"):
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_kernels.py"), str(m.out_dir), "--lib",
                              str(m.lib), "--tokens", tokens, "--repeat", "1"], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        lines = run.stdout.splitlines()
        assert lines[0].startswith("decode step" if tokens == "1" else "prefill of 20 tokens")
        assert any("attention_with_fused_qkv" in line for line in lines[1:])
        assert any("matmul" in line for line in lines[1:])
