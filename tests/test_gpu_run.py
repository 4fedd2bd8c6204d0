"""scripts/gpu_prepare.py + scripts/gpu_run.py (issue 37), in their smallest mode, on the CPU and on lavapipe:
the same code path the one call on a lent GPU machine runs (there with --target cuda:sm_90a), so it cannot rot
before a GPU is lent. Also gptbc-run's features that path needs: several prompts decoded together and
--bench, through the folder's own gptbc-run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vulkan_device import need_vulkan

ROOT = Path(__file__).resolve().parents[1]
PREPARE, RUN = ROOT / "scripts" / "gpu_prepare.py", ROOT / "scripts" / "gpu_run.py"


def prepare(out: Path, target: str) -> Path:
    # converted weights, libraries and gptbc-run come from the artifact cache: the CPU and Vulkan folders share
    # one CPU reference build, and a warm run compiles nothing
    done = subprocess.run([sys.executable, str(PREPARE), "-o", str(out), "--target", target, "--smallest"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def gpu_run(carry: Path, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    done = subprocess.run([sys.executable, str(carry / "gpu_run.py"), "--carry", str(carry), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600)
    result = out / "gpu_run.json"
    return done, json.loads(result.read_text()) if result.is_file() else None


@pytest.fixture(scope="module")
def carry_cpu(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory.mktemp("carry") / "cpu", "cpu")


def check_full_run(done: subprocess.CompletedProcess, result: dict, device: str) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert result["ok"] and result["failures"] == [] and result["skipped"] == [] and result["device_used"] == device
    assert result["device"]["copy_bandwidth"]["read_plus_write_GBps"] > 0
    steps = result["steps"]
    [tiny] = steps["tiny"]
    assert tiny["name"] == "mqa-q0f32" and tiny["equal_cpu"] and len(tiny["per_prompt"]) == 2
    [hf] = steps["hf_reference"]["cases"]
    assert hf["hf_equal_cpu"] == [True, True] and hf["hf_equal_device"] == [True, True]
    assert steps["batch_invariance"]["batch_invariant"]["alone_equals_batch"] == [True, True]
    [speed] = steps["speed"]
    assert [r["batch"] for r in speed["gptbc"]] == [1, 4] and [r["batch"] for r in speed["hf"]["runs"]] == [1, 4]
    for row in speed["gptbc"] + speed["hf"]["runs"]:
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["implied_weight_GBps"] > 0
        assert row["share_of_copy_bandwidth"] > 0
    assert speed["gptbc"][0]["weight_bytes"] == speed["weight_bytes"] == speed["hf"]["weight_bytes"]
    assert (Path(done.args[-1]) / "gpu_run.log").read_text().rstrip().endswith(": ok")


def test_gpu_run_on_the_cpu(carry_cpu, tmp_path):
    plan = json.loads((carry_cpu / "plan.json").read_text())
    assert plan["device"] == "cpu" and plan["smallest"]
    assert not (carry_cpu / "bin" / "libtvm_runtime_cuda.so").exists()  # a CUDA folder only
    done, result = gpu_run(carry_cpu, tmp_path / "out")
    check_full_run(done, result, "cpu")


def test_gpu_run_on_vulkan(tmp_path):
    need_vulkan()
    carry = prepare(tmp_path / "carry", "vulkan")
    done, result = gpu_run(carry, tmp_path / "out")
    check_full_run(done, result, "vulkan")


def test_gpu_run_reports_ids_that_differ_from_the_cpu_build(carry_cpu, tmp_path):
    carry = tmp_path / "carry"
    shutil.copytree(carry_cpu, carry)
    plan = json.loads((carry / "plan.json").read_text())
    plan["tiny"][0]["cpu_ids"][1][3] += 1  # as if the device had computed another token there
    (carry / "plan.json").write_text(json.dumps(plan))
    done, result = gpu_run(carry, tmp_path / "out", "--skip", "hf,batch,speed")
    assert done.returncode == 1 and not result["ok"]
    assert result["failures"] == ["tiny mqa-q0f32: ids differ from the CPU build's at position 3"]
    assert [p["equal_cpu"] for p in result["steps"]["tiny"][0]["per_prompt"]] == [True, False]


def test_gpu_run_skips_what_does_not_fit_its_time_and_says_so(carry_cpu, tmp_path):
    done, result = gpu_run(carry_cpu, tmp_path / "out", "--budget-s", "18", "--skip", "device")
    assert done.returncode == 0 and result["ok"], done.stderr[-2000:]
    skipped = [s["step"] for s in result["skipped"]]
    assert skipped == ["device", "tiny mqa-q0f32", "hf mqa", "batch invariance", "tiny-mqa-q0f32: write random weights"]
    assert "SKIP tiny mqa-q0f32" in (tmp_path / "out" / "gpu_run.log").read_text()


def test_gpu_run_without_a_prepared_folder_is_a_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, str(RUN), "--carry", str(tmp_path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: --carry {tmp_path}: no plan.json (make the folder with scripts/gpu_prepare.py)"]


def test_random_weights_follow_the_manifest(carry_cpu, tmp_path):
    from safetensors.numpy import load_file

    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_run

    manifest = carry_cpu / "shapes" / "tiny-mqa-q0f32" / "gptbc-config.json"
    info = json.loads(manifest.read_text())
    gpu_run.write_random_weights(manifest, tmp_path / "w")
    [file] = {p["file"] for p in info["params"]}
    tensors = load_file(str(tmp_path / "w" / file))
    assert list(tensors) and sorted(tensors) == sorted(p["name"] for p in info["params"])
    header_len = int.from_bytes((tmp_path / "w" / file).read_bytes()[:8], "little")
    assert (8 + header_len) % 64 == 0
    for p in info["params"]:
        x = tensors[p["name"]]
        assert list(x.shape) == p["shape"] and str(x.dtype) == p["dtype"] and np.isfinite(x).all()
        if ".ln_" in p["name"] and p["name"].endswith(".weight"):
            assert 0.5 < x.mean() < 1.5  # LayerNorm gains near 1, other floats small
        else:
            assert np.abs(x).max() < 0.5


# ---- gptbc-run: batches and --bench ----

def gptbc_run(carry: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(carry / "bin" / "gptbc-run"), "--model", str(carry / "tiny" / "mqa" / "q0f32"),
                           "--lib", str(carry / "libs" / "mqa-q0f32.so"), *args], capture_output=True, text=True,
                          timeout=120)


def test_gptbc_run_decodes_several_prompts_together_as_the_engine_does(carry_cpu):
    from gptbc.runtime.engine import Engine

    prompts = [[5, 6, 7, 8, 9], [40, 41], [100, 7, 30, 1, 2, 3, 4, 90]]
    done = gptbc_run(carry_cpu, "--prompt-ids", ";".join(",".join(map(str, p)) for p in prompts),
                     "--max-new-tokens", "10", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    engine = Engine(carry_cpu / "tiny" / "mqa" / "q0f32", carry_cpu / "libs" / "mqa-q0f32.so")
    want = engine.generate_batch(prompts, max_new_tokens=10)
    assert [o["token_ids"] for o in got["outputs"]] == [list(w) for w in want]
    assert [o["prompt_tokens"] for o in got["outputs"]] == [5, 2, 8]
    assert got["outputs"][0]["text"] == engine.decode_text(want[0])
    lines = gptbc_run(carry_cpu, "--prompt-ids", ";".join(",".join(map(str, p)) for p in prompts),
                      "--max-new-tokens", "10").stdout.splitlines()
    assert [json.loads(line) for line in lines] == [o["text"] for o in got["outputs"]]  # one line each, quoted


def test_gptbc_run_bench_prints_its_timings(carry_cpu):
    done = gptbc_run(carry_cpu, "--bench", "--batch", "3", "--prompt-len", "6", "--max-new-tokens", "4",
                     "--warmup", "1", "--repeats", "2")
    assert done.returncode == 0, done.stderr
    b = json.loads(done.stdout)["bench"]
    assert (b["device"], b["batch"], b["prompt_tokens"], b["decode_steps"], b["warmup"], b["repeats"]) == \
        ("cpu", 3, 6, 3, 1, 2)
    assert len(b["prefill_s"]) == len(b["decode_s"]) == 2 and min(b["prefill_s"] + b["decode_s"]) > 0
    median = float(np.median(b["decode_s"]))
    assert b["decode_tokens_per_s"] == pytest.approx(3 * 3 / median, rel=1e-3)
    assert b["decode_steps_per_s"] == pytest.approx(3 / median, rel=1e-3)
    assert b["weight_bytes"] == sum(int(np.prod(p["shape"])) * 4 for p in json.loads(
        (carry_cpu / "tiny" / "mqa" / "q0f32" / "gptbc-config.json").read_text())["params"])


@pytest.mark.parametrize("args, message", [
    (["--bench", "--prompt-ids", "1,2"], "--bench makes its own prompts (--prompt-len); drop --prompt/--prompt-ids"),
    (["--bench", "--temperature", "0.5"], "--bench decodes greedily: --temperature does not apply"),
    (["--bench", "--batch", "99"], "--batch 99 is over the library's max_batch_size 16 (compile with --max-batch-size)"),
    (["--bench", "--repeats", "0"], "--repeats must be at least 1"),
    (["--bench", "--max-new-tokens", "1"], "--bench needs --max-new-tokens of at least 2 (one decode step)"),
    (["--prompt-ids", "1,2", "--batch", "2"], "--batch is a --bench option"),
    (["--prompt-ids", "1,2;;3"], "prompt is empty: give at least one token (an empty prompt between ';'?)"),
    (["--prompt-ids", "1;x"], "--prompt-ids '1;x': expected comma-separated integers like 1,2,3 (prompts separated by ;)"),
])
def test_gptbc_run_batch_and_bench_bad_input_is_one_line(carry_cpu, args, message):
    done = gptbc_run(carry_cpu, *args)
    assert done.returncode == 1 and done.stderr.splitlines() == [f"error: {message}"]
