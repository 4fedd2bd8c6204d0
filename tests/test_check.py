"""`gptbc check`: run as a user runs it (a subprocess of the CLI), on the CPU with gptbc-run and on Vulkan
(lavapipe in CI), so the check a GPU user runs first cannot rot; `gptbc check MODEL` on a model named as serve
names it; plus proof that its comparison fails a wrong library, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from native_build import shared_build
from vulkan_device import need_vulkan

FIM_TINY = Path(__file__).parent / "data" / "fim-tiny"  # trained: its greedy steps are decisive


def gptbc(*args, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptbc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def passed(run: subprocess.CompletedProcess, layouts=("mqa", "mha")) -> dict:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["ok"] and {c["layout"] for c in result["cases"]} == set(layouts)
    assert "all checks passed" in run.stderr  # the table goes to stderr with --json
    return result


@pytest.fixture(scope="module")
def gptbc_run() -> Path:
    return shared_build() / "gptbc-run"


def test_check_cpu_with_the_native_runner(gptbc_run):
    result = passed(gptbc("check", "--target", "cpu", "--quantization", "q0f32,q4f32_1", "--tokens", "8",
                          "--runner", gptbc_run, "--json"))
    assert {c["scheme"] for c in result["cases"]} == {"q0f32", "q4f32_1"}
    assert all(c["runner_greedy_equal"] and c["decisive_steps"] > 0 for c in result["cases"])
    q0 = [c for c in result["cases"] if c["scheme"] == "q0f32"]
    assert all(c["logits_error"] < 1e-4 and c["decisive_steps"] == 8 for c in q0)


@pytest.mark.vulkan
def test_check_vulkan():
    need_vulkan()  # lavapipe in CI: the GPU kernels run on the CPU
    result = passed(gptbc("check", "--target", "vulkan", "--device", "vulkan", "--quantization", "q0f32,q4f16_1",
                          "--tokens", "4", "--json"))
    assert [c["precision"] for c in result["cases"]] == ["float32", "float16"] * 2
    from gptbc.check import device_copy_bandwidth

    assert device_copy_bandwidth("vulkan", nbytes=1 << 22, repeat=1) > 0  # --bench's GPU bandwidth probe


def test_bench_part_on_a_small_shape(tmp_path):
    """--bench's code path (santacoder's shape there) on a small one, so it cannot rot before a GPU runs it."""
    from gptbc.check import bench_target, small_config

    lines = []
    r = bench_target(tmp_path, "cpu", "cpu", ".so", "q0f32", lines.append, cfg=small_config(True))
    assert r["prefill"]["tokens"] == 128 and r["batch16"]["tokens_per_s_best"] > 0
    assert r["device_copy_GBps"] > 0 and 0 < r["decode_fraction_of_bandwidth"]
    assert lines[-1].startswith("device copy bandwidth")


def break_a_layer(check, monkeypatch) -> None:
    """The reference's second MLP projection scaled by 1.5, as a wrong kernel would make the library differ."""
    real = check.converted_network

    def broken(out_dir):
        cfg, w = real(out_dir)
        w["transformer.h.1.mlp.c_proj.weight"] = w["transformer.h.1.mlp.c_proj.weight"] * 1.5
        return cfg, w

    monkeypatch.setattr(check, "converted_network", broken)


def test_the_check_fails_a_wrong_network(tmp_path, monkeypatch):
    """The comparison can fail: a reference whose one layer differs (as a wrong kernel would) is caught."""
    from gptbc import check

    break_a_layer(check, monkeypatch)
    monkeypatch.setattr(check, "LAYOUTS", {"mqa": True})
    lines = []
    result = check.run_check("cpu", "cpu", ["q0f32"], 4, tmp_path, log=lines.append)
    assert not result["ok"] and result["cases"][0]["logits_error"] > 1e-2
    assert "FAIL" in lines[-2] and lines[-1].startswith("FAILED")


def test_check_a_model_by_its_name(gptbc_run):
    """`gptbc check MODEL` on an HF directory: converted and compiled through the artifact cache (the library
    test_editor's fim_engine uses), its logits and greedy tokens against the float64 reference, gptbc-run's tokens
    the same, and the completion of a code prompt shown."""
    run = gptbc("check", FIM_TINY, "--quantization", "q0f32", "--tokens", "8", "--runner", gptbc_run, "--json")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["ok"] and result["model"] == "fim-tiny" and result["device"] == "cpu"
    case = result["cases"][0]
    assert case["scheme"] == "q0f32" and case["logits_error"] < 1e-4 and len(case["token_ids"]) == 8
    assert case["decisive_steps"] > 0 and case["greedy_agrees"] and case["runner_greedy_equal"]
    assert "completion: 'def fibonacci(n):" in run.stderr and "all checks passed" in run.stderr


def test_check_model_fails_a_wrong_network(monkeypatch):
    """MODEL's comparison can fail too: a reference whose one layer differs (as a wrong kernel would) is caught."""
    from gptbc import check
    from gptbc.prepare import prepare

    model = prepare(str(FIM_TINY), quantization="q0f32", target="cpu", device="cpu", log=lambda _m: None)
    break_a_layer(check, monkeypatch)
    lines = []
    result = check.check_model(model.name, model.model_dir, model.lib, model.device, 4, log=lines.append)
    assert not result["ok"] and result["cases"][0]["logits_error"] > 1e-2
    assert any(line.endswith("| FAIL |") for line in lines) and lines[-1].startswith("FAILED")


def test_the_reference_reads_back_the_checkpoint(tmp_path):
    """converted_network gives back the checkpoint the reference needs: q0f32 weights exactly, with the
    multi-head c_attn rows the converter fused put back per head."""
    from gptbc.artifact.convert import convert_weight
    from gptbc.check import converted_network, random_checkpoint, small_config

    hf = random_checkpoint(tmp_path / "hf", small_config(False))
    out = convert_weight(hf, "q0f32", tmp_path / "out", progress=False)
    _, w = converted_network(out)
    original = load_file(str(hf / "model.safetensors"))
    for name, value in original.items():
        assert np.array_equal(w[name], value.astype(np.float64)), name


@pytest.mark.parametrize("args, words", [
    (["--target", "webgpu", "--device", "vulkan"], ["--target webgpu", "nothing this machine can load"]),
    (["--target", "vulkan", "--device", "cuda:0"], ["--device cuda:0", "builds for vulkan devices"]),
    (["--target", "cpu", "--tokens", "0"], ["--tokens 0"]),
    (["--target", "cpu", "--quantization", "q3f9"], ["q3f9"]),
    (["--target", "cpu", "--runner", "/nonexistent/gptbc-run"], ["--runner", "no such file"]),
    (["--target", "vulkan", "--device", "vulkan:7"], []),  # no such adapter, or none (or no wgpu) at all
    ([FIM_TINY, "--bench"], ["--bench", "gptbc bench MODEL"]),
    ([FIM_TINY, "--quantization", "q0f32,q4f32_1"], ["--quantization q0f32,q4f32_1", "one scheme"]),
    ([FIM_TINY, "--tokens", "0"], ["--tokens 0"]),
    ([FIM_TINY, "--runner", "/nonexistent/gptbc-run"], ["--runner", "no such file"]),
    (["--lib", "model.so"], ["--lib", "only with MODEL"]),
    (["/nonexistent/model-dir"], ["/nonexistent/model-dir"]),
])
def test_check_bad_options_fail_before_compiling(args, words):
    run = gptbc("check", *args, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert run.stdout == ""  # nothing converted or compiled first
