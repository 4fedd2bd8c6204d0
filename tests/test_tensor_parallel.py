"""Tensor parallelism on the CPU (--tensor-parallel N): disco workers with gptbc's CCL (native/ccl/cpu_ccl.cc).

Tiny models (n_embd 128, 4 heads, so 4 ranks split a group of 32 nowhere), each library built once per session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_models import load_hf, make_checkpoint
from native_build import build, shared_build

from gptbc.artifact.config import resolve_model
from gptbc.artifact.convert import convert_weight
from gptbc.compile.compiler import compile_model
from gptbc.errors import GptbcError
from gptbc.runtime.engine import Engine
from gptbc.runtime.speculation import PromptLookup

SHAPE = dict(n_embd=128, n_head=4, n_layer=2)
PROMPTS = [[5, 9, 14, 3, 7, 22, 1], [40, 41, 42], [7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="session", autouse=True)
def ccl_library():
    """libgptbc_ccl_cpu built with the README's CMake commands, for every TP run of the session."""
    lib = shared_build() / "libgptbc_ccl_cpu.so"
    assert lib.is_file()
    os.environ["GPTBC_CCL_LIBRARY"] = str(lib)  # the worker host processes inherit it
    yield lib


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """mqa / mha → a seeded random HF checkpoint of SHAPE."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            root = tmp_path_factory.mktemp(f"tp-{kind}")
            made[kind] = make_checkpoint(root / "hf", multi_query=kind == "mqa", seed=7, tokenizer="dash", **SHAPE)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def tp_build(hf_dir, tmp_path_factory):
    """(kind, scheme, N) → (weights dir, library), converted and compiled for N ranks (cached)."""
    built: dict[tuple, tuple[Path, Path]] = {}

    def get(kind: str, scheme: str, tp: int) -> tuple[Path, Path]:
        key = (kind, scheme, tp)
        if key not in built:
            root = tmp_path_factory.mktemp(f"tp-{kind}-{scheme}-{tp}")
            out = convert_weight(hf_dir(kind), scheme, root / "out", progress=False, tensor_parallel=tp)
            lib = compile_model(resolve_model(str(out)), "cpu", scheme, root / "lib.so", log=lambda _m: None,
                                tensor_parallel=tp)
            built[key] = (out, lib)
        return built[key]

    return get


def hf_last_logits(hf: Path, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return load_hf(hf)(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(hf: Path, ids: list[int], n: int) -> list[int]:
    import torch

    out = load_hf(hf).generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def run_calls(runner) -> dict[str, np.ndarray]:
    """Prefill, batched prefill, batched decode and verify rows through a runner (fresh sequences)."""
    a, b = runner.add_sequence(), runner.add_sequence()
    out = {"prefill": runner.prefill(a, PROMPTS[0]),
           "prefill_batch": runner.prefill_batch([b], [PROMPTS[1]])[0]}
    out["decode_batch"] = runner.decode_batch([a, b], [11, 12])
    out["verify"] = runner.verify(a, [3, 4, 5])
    for s in (a, b):
        runner.remove_sequence(s)
    return out


@pytest.mark.parametrize("kind,tp", [("mqa", 2), ("mqa", 4), ("mha", 2)])
def test_logits_match_hf(tp_build, hf_dir, kind, tp):
    out, lib = tp_build(kind, "q0f32", tp)
    engine = Engine(out, lib, tensor_parallel=tp)
    try:
        got = run_calls(engine.runner)
    finally:
        engine.runner.close()
    hf = hf_dir(kind)
    a, b = PROMPTS[0], PROMPTS[1]
    np.testing.assert_allclose(got["prefill"], hf_last_logits(hf, a)[-1], atol=2e-4)
    np.testing.assert_allclose(got["prefill_batch"], hf_last_logits(hf, b)[-1], atol=2e-4)
    np.testing.assert_allclose(got["decode_batch"][0], hf_last_logits(hf, a + [11])[-1], atol=2e-4)
    np.testing.assert_allclose(got["decode_batch"][1], hf_last_logits(hf, b + [12])[-1], atol=2e-4)
    np.testing.assert_allclose(got["verify"], hf_last_logits(hf, a + [11, 3, 4, 5])[-3:], atol=2e-4)


@pytest.mark.parametrize("scheme", ["q4f32_1", "q8f32_1", "qkf32_a"])
def test_quantized_matches_one_device_build(tp_build, scheme):
    """Each rank quantizes its slice as the whole weight is quantized: TP=2 gives TP=1's logits."""
    out1, lib1 = tp_build("mqa", scheme, 1)
    out2, lib2 = tp_build("mqa", scheme, 2)
    one = run_calls(Engine(out1, lib1).runner)
    engine = Engine(out2, lib2, tensor_parallel=2)
    try:
        two = run_calls(engine.runner)
    finally:
        engine.runner.close()
    for call in one:
        np.testing.assert_allclose(two[call], one[call], atol=2e-4, err_msg=call)


def test_engine_batching_prefix_reuse_and_prompt_lookup(tp_build, hf_dir):
    out, lib = tp_build("mqa", "q0f32", 2)
    engine = Engine(out, lib, tensor_parallel=2)
    try:
        want = [hf_greedy(hf_dir("mqa"), p, 6) for p in PROMPTS]
        assert engine.generate_batch(PROMPTS, max_new_tokens=6) == want
        again = engine.complete(PROMPTS[2] + want[2][:2], max_new_tokens=4, greedy=True)
        assert again.reused_prefix_tokens > 0 and again.token_ids == want[2][2:6]
        engine.speculation = PromptLookup(num_draft=4)
        repeat = PROMPTS[2] * 2
        assert engine.generate(repeat, max_new_tokens=8) == hf_greedy(hf_dir("mqa"), repeat, 8)
        assert engine.status()["drafted_tokens"] > 0
        engine.speculation = None
        assert engine.status()["kv_sequences"] == engine.status()["prefix_cache_sequences"]
    finally:
        engine.runner.close()


def test_cli_generate_gives_hf_greedy_ids(tp_build, hf_dir):
    out, lib = tp_build("mqa", "q0f32", 2)
    run = subprocess.run(["gptbc", "generate", str(out), "--lib", str(lib), "--tensor-parallel", "2",
                          "--prompt-ids", ",".join(map(str, PROMPTS[0])), "--max-new-tokens", "8", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == hf_greedy(hf_dir("mqa"), PROMPTS[0], 8)


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def test_refusals(tp_build, hf_dir, tmp_path):
    out2, lib2 = tp_build("mqa", "q0f32", 2)
    out1 = convert_weight(hf_dir("mqa"), "q0f32", tmp_path / "out1", progress=False)
    with pytest.raises(GptbcError) as err:  # a TP=2 library with single-device weights
        Engine(out1, lib2, tensor_parallel=2)
    assert "--tensor-parallel 2" in one_line(err.value) and "--tensor-parallel 1" in str(err.value)
    with pytest.raises(GptbcError) as err:  # a TP=2 build run on one device
        Engine(out2, lib2)
    assert "run it with --tensor-parallel 2" in one_line(err.value)
    odd = make_checkpoint(tmp_path / "hf96", n_embd=96, n_head=2, n_layer=1)
    with pytest.raises(GptbcError) as err:  # a group of 32 across two ranks: 96 / 2 = 48 features per rank
        convert_weight(odd, "q4f32_1", tmp_path / "q4", progress=False, tensor_parallel=2)
    assert "would split a group" in one_line(err.value)
    with pytest.raises(GptbcError) as err:  # and the compiler refuses it the same way
        compile_model(resolve_model(str(odd)), "cpu", "q8f32_1", tmp_path / "q8.so", log=lambda _m: None,
                      tensor_parallel=2)
    assert "would split a group" in one_line(err.value)
    with pytest.raises(GptbcError) as err:  # 4 heads over 3 ranks
        convert_weight(hf_dir("mqa"), "q0f32", tmp_path / "t3", progress=False, tensor_parallel=3)
    assert "n_head (4) is not divisible by 3" in one_line(err.value)
    with pytest.raises(GptbcError) as err:  # compiling presharded weights for another N
        compile_model(resolve_model(str(out2)), "cpu", "q0f32", tmp_path / "x.so", log=lambda _m: None)
    assert "converted with --tensor-parallel 2" in one_line(err.value)


def test_worker_fault_fails_the_request_not_the_process(tp_build):
    """A worker dying (here as std::terminate ends it: SIGABRT) fails the call in one line; this process lives."""
    out, lib = tp_build("mqa", "q0f32", 2)
    engine = Engine(out, lib, tensor_parallel=2)
    assert len(engine.generate(PROMPTS[1], max_new_tokens=3)) == 3
    os.kill(engine.runner.process.pid, signal.SIGABRT)
    with pytest.raises(GptbcError) as err:
        engine.generate(PROMPTS[1], max_new_tokens=3)
    assert "worker process" in one_line(err.value) and "died" in str(err.value)
    with pytest.raises(GptbcError, match="died"):  # and stays failed, the same way
        engine.generate(PROMPTS[0], max_new_tokens=1)
    assert engine.runner.process.returncode == -signal.SIGABRT


def test_cli_serve_answers_then_exits_in_one_line_when_workers_die(tp_build):
    """`gptbc serve --tensor-parallel 2` answers (completions with logprobs, metrics); when its workers die, the
    request in flight gets an error and the server stops with a one-line message and a non-zero status."""
    from test_server import call

    out, lib = tp_build("mqa", "q0f32", 2)
    proc = subprocess.Popen(["gptbc", "serve", str(out), "--lib", str(lib), "--tensor-parallel", "2", "--port", "0",
                             "--model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "gptbc serve:" in line, proc.stderr.read() if proc.poll() is not None else line
        base = line.split(" on ")[1].split(" ")[0]
        status, _, body = call(base, "POST", "/v1/completions",
                               {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0,
                                "logprobs": 1})
        assert status == 200, body
        assert body["choices"][0]["logprobs"]["tokens"] is not None and body["usage"]["completion_tokens"] == 5
        status, _, text = call(base, "GET", "/metrics")
        assert status == 200 and "gptbc_kv_pages_in_use" in text
        host = [p for p in _children(proc.pid) if "disco_host" in _cmdline(p)]
        assert len(host) == 1
        os.kill(host[0], signal.SIGKILL)

        for _ in range(5):  # the failing step answers its request with an error; then the engine gives up
            try:
                status, _, _ = call(base, "POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2],
                                                                               "max_tokens": 2})
            except OSError:
                break
            assert status >= 500
        assert proc.wait(timeout=60) == 1
        last = proc.stderr.read().strip().splitlines()[-1]
        assert last.startswith("error: serve: the engine failed") and "worker process" in last and "died" in last
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def test_nccl_ccl_builds_with_nvcc_and_registers(tmp_path):
    """The GPU collectives compile (nvcc, PyPI's nvidia-nccl-cu12) and register their functions when loaded (no GPU
    is needed to load them; running them needs two). NCCL_HOME, else the installed nvidia.nccl package."""
    import importlib.util
    import shutil

    from requirement import skip_or_fail

    spec = importlib.util.find_spec("nvidia.nccl") if importlib.util.find_spec("nvidia") else None
    home = os.environ.get("NCCL_HOME") or (spec.submodule_search_locations[0] if spec else None)
    if shutil.which("nvcc") is None or home is None or not (Path(home) / "include" / "nccl.h").is_file():
        skip_or_fail("nvcc or NCCL (NCCL_HOME, or pip's nvidia-nccl-cu12) is missing", "GPTBC_REQUIRE_NCCL")
    lib = build(tmp_path / "build", "-DGPTBC_NCCL=ON", f"-DNCCL_HOME={home}", target="gptbc_ccl_nccl")
    script = ("import ctypes, sys, tvm; ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL); "
              "print(all(tvm.get_global_func('runtime.disco.gptbc_nccl.' + n, allow_missing=True) is not None "
              "for n in ('init_ccl', 'init_ccl_per_worker', 'allreduce', 'allgather', 'broadcast_from_worker0', "
              "'scatter_from_worker0', 'gather_to_worker0', 'sync_worker')))")
    run = subprocess.run([sys.executable, "-c", script, str(lib / "libgptbc_ccl_nccl.so")], capture_output=True,
                         text=True, timeout=120)
    assert run.stdout.strip() == "True", run.stderr
