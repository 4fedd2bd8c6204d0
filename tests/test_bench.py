"""`gptbc bench` and scripts/bench_peers.py run end to end (on tiny models: speed is not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gptbc_bench_json(tiny_model):
    m = tiny_model("mqa64")
    run = subprocess.run(["gptbc", "bench", str(m.out_dir), "--lib", str(m.lib), "--prefill", "40", "--prompt", "8",
                          "--decode", "6", "--batch", "2,3", "--repeat", "2", "--json"],
                         capture_output=True, text=True, check=True)
    r = json.loads(run.stdout)
    assert r["quantization"] == "q0f32" and r["weight_bytes"] > 0
    assert r["prefill"]["tokens"] == 40 and len(r["prefill"]["seconds"]) == 2
    assert r["decode"]["tokens_per_s_best"] >= r["decode"]["tokens_per_s_median"] > 0
    assert r["decode"]["time_to_first_token_s"] > 0 and r["decode"]["weight_GBps_best"] > 0
    assert r["batch2"]["batch"] == 2 and r["batch3"]["tokens_per_s_best"] > 0
    assert r["peak_rss_bytes"] > r["weight_bytes"]
    assert "decode 6 tokens" in run.stderr  # progress goes to stderr with --json


def test_bench_peers_script_end_to_end(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_peers.py"), "--work", str(tmp_path),
                          "--shape", "tiny", "--repeat", "1", "--peers", "gptbc:q4f32_1,hf:fp32"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "read bandwidth" in run.stdout
    table = [line for line in run.stdout.splitlines() if line.startswith("| gptbc:q4f32_1") or line.startswith("| hf:")]
    assert len(table) == 2
