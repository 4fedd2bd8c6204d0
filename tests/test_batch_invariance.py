"""Batch-invariant mode (Engine(batch_invariant=True), serve --batch-invariant): the same request gives the
same token ids and logprobs, bit for bit, whatever else is being served. Compared exactly, no tolerance:
one request alone against the same request at random places in batches of 2 to 16 requests of mixed
lengths, greedy and seeded sampling, float and int8 activations (q0f32, q8f32_1, q4f32_1), MQA and MHA, a
prompt prefilled in chunks against whole, a prefix-cache hit against a miss, n choices against each alone,
through the Engine and through the server under concurrent load. And tests that the comparison catches a
break: a plain library and engine fail the same checks."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest

from gptbc.errors import GptbcError
from gptbc.runtime.engine import Engine
from gptbc.runtime.speculation import PromptLookup
from vulkan_device import need_vulkan

VOCAB_TOP = 250  # prompt ids below the tiny models' vocabularies


def run_together(engine: Engine, prompts: list[list[int]], params: list) -> list[tuple[list[int], list[float]]]:
    """All requests submitted at once and run to the end (continuous batching): per request (ids, logprobs)."""
    reqs = [engine.submit(p, params=q) for p, q in zip(prompts, params)]
    engine.scheduler.run_until_done(reqs)
    for r in reqs:
        assert r.error is None, r.error
    return [(list(r.output_ids), list(r.logprobs)) for r in reqs]


def check_alone_equals_batched(engine: Engine, case: int, target_len: int = 37, sizes: tuple[int, ...] = (2, 9, 16),
                               **sampling) -> None:
    """The target request alone, then at a random position in batches of 2..16 requests of mixed lengths
    and lengths of answer (so requests join and leave while the target decodes, and calls have from 1 to
    over 16 rows, where the matmuls of a plain library change layout)."""
    rng = np.random.default_rng(case)
    target = rng.integers(0, VOCAB_TOP, target_len).tolist()
    params = engine.sampling(max_new_tokens=12, logprobs=True, **sampling)
    alone = run_together(engine, [target], [params])[0]
    for size in sizes:
        others = [rng.integers(0, VOCAB_TOP, int(rng.integers(1, 60))).tolist() for _ in range(size - 1)]
        other_params = [engine.sampling(max_new_tokens=int(rng.integers(1, 20)), logprobs=True, **sampling)
                        for _ in others]
        at = int(rng.integers(0, size))
        prompts = others[:at] + [target] + others[at:]
        answers = run_together(engine, prompts, other_params[:at] + [params] + other_params[at:])
        assert answers[at] == alone, f"batch of {size}, target at {at}: {answers[at]} != {alone}"


RECIPES = {  # name: (tiny model, scheme, activations on the CPU, prefill chunk)
    "mqa64": ("mqa64", "q0f32", "float", None), "mqa64-chunk16": ("mqa64", "q0f32", "float", 16),
    "mha32": ("mha32", "q0f32", "float", 16), "mqa64-q8": ("mqa64", "q8f32_1", "int8", None),
    "mqa64-q4": ("mqa64", "q4f32_1", "int8", None), "mqa64-q4f": ("mqa64", "q4f32_1", "float", None)}
DEVICES = ["cpu", pytest.param("vulkan", marks=pytest.mark.vulkan)]


@pytest.fixture(scope="module")
def invariant(tiny_model, tmp_path_factory):
    """invariant(name, device="cpu") → an Engine(batch_invariant=True) over a `--batch-invariant` library
    (built once) of RECIPES[name]: "mqa64" (q0f32), "mqa64-chunk16" (the same with 16-token prefill
    chunks), "mha32" (q0f32, chunks of 16), "mqa64-q8" and "mqa64-q4" (q8f32_1 / q4f32_1 with int8
    activations on the CPU, float ones on a GPU, which has no int8 kernels), "mqa64-q4f" (float
    activations). On "vulkan" it first skips (or fails, in CI) where there is no Vulkan adapter."""
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.compile.compiler import compile_model

    root, engines, converted = tmp_path_factory.mktemp("invariant"), {}, {}

    def get(name: str, device: str = "cpu") -> Engine:
        if device == "vulkan":
            need_vulkan()
        if (name, device) not in engines:
            base, scheme, activations, chunk = RECIPES[name]
            m = tiny_model(base)
            if (base, scheme) not in converted:
                converted[base, scheme] = m.out_dir if scheme == "q0f32" else \
                    convert_weight(m.hf_dir, scheme, root / f"{base}-{scheme}", progress=False)
            out = converted[base, scheme]
            lib = compile_model(resolve_model(str(out), prefill_chunk_size=chunk), device, scheme,
                                root / f"{name}-{device}.so", log=lambda _m: None,
                                activations=activations if device == "cpu" else "float", batch_invariant=True)
            engines[name, device] = Engine(out, lib, device=device, batch_invariant=True)
        return engines[name, device]

    return get


# q8f32_1 does not run on Vulkan: WGSL has no 8-bit type (webgpu.check_model refuses it)
@pytest.mark.parametrize("name,device", [(n, "cpu") for n in ("mqa64", "mha32", "mqa64-q8", "mqa64-q4", "mqa64-q4f")]
                         + [pytest.param(n, "vulkan", marks=pytest.mark.vulkan) for n in ("mqa64", "mha32", "mqa64-q4")])
def test_alone_equals_batched(invariant, name, device):
    engine = invariant(name, device)
    int8 = device == "cpu" and name in ("mqa64-q8", "mqa64-q4")
    assert engine.activations == ("int8" if int8 else "float")
    check_alone_equals_batched(engine, case=1)
    check_alone_equals_batched(engine, case=2, target_len=5, sizes=(16,))  # fewer rows than the GEMM minimum


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mqa64", "mqa64-q4"])
def test_seeded_sampling_alone_equals_batched(invariant, name, device):
    check_alone_equals_batched(invariant(name, device), case=3, greedy=False, temperature=0.9, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def plain(tiny_model, tmp_path_factory):
    """plain(device) → a new Engine (the mode off) over a plain mqa64 q0f32 library for that device."""
    from gptbc.artifact.config import resolve_model
    from gptbc.compile.compiler import compile_model

    libs = {}

    def get(device: str = "cpu") -> Engine:
        m = tiny_model("mqa64")
        if device == "vulkan":
            need_vulkan()
            if device not in libs:
                libs[device] = compile_model(resolve_model(str(m.out_dir)), device, "q0f32",
                                             tmp_path_factory.mktemp("plain") / "vk.so", log=lambda _m: None)
        return Engine(m.out_dir, libs.get(device, m.lib), device=device)

    return get


@pytest.mark.parametrize("device", DEVICES)
def test_the_check_catches_a_plain_library(plain, device):
    """The same comparison on a plain library and engine (the mode off) fails: the target's prompt is then
    reused from the prefix cache and its attention merged from two parts; on the CPU batches of 16 rows run
    another matmul layout, on a GPU a lone prompt's logits a GEMV. The check sees last-bit differences."""
    with pytest.raises(AssertionError, match="batch of"):
        check_alone_equals_batched(plain(device), case=1)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_equals_whole(invariant, device):
    """A 70-token prompt prefilled in chunks of 16 (a library built so) against in one call."""
    prompt = np.random.default_rng(4).integers(0, VOCAB_TOP, 70).tolist()
    whole, chunked = invariant("mqa64", device), invariant("mqa64-chunk16", device)
    assert whole.runner.prefill_chunk_size >= 70 > chunked.runner.prefill_chunk_size
    answers = [run_together(e, [prompt], [e.sampling(max_new_tokens=10, logprobs=True)])[0] for e in (whole, chunked)]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mqa64", "mqa64-chunk16", "mqa64-q4"])
def test_prefix_hit_equals_miss(invariant, name, device):
    """A prompt that starts like a cached one (40 shared tokens: 32 copied, the rest prefilled from the
    grain boundary) against the same prompt on an empty cache; the plain engine's fork differs."""
    engine = invariant(name, device)
    rng = np.random.default_rng(5)
    shared = rng.integers(0, VOCAB_TOP, 40).tolist()
    first, second = shared + [3, 4, 5], shared + [7, 8, 9, 10, 11]
    params = engine.sampling(max_new_tokens=10, logprobs=True)
    miss = Engine(engine.model_dir, engine.lib, device=device, batch_invariant=True)
    lone = run_together(miss, [second], [params])[0]
    run_together(engine, [first], [params])
    req = engine.submit(second, params=params)
    engine.scheduler.run_until_done([req])
    assert req.reused == 32 and (list(req.output_ids), list(req.logprobs)) == lone


@pytest.mark.parametrize("device", DEVICES)
def test_plain_fork_differs_from_a_miss(plain, device):
    """The break the mode prevents: a plain engine forks the cached prefix, and the logprobs move."""
    rng = np.random.default_rng(5)
    shared = rng.integers(0, VOCAB_TOP, 40).tolist()
    engine = plain(device)
    params = engine.sampling(max_new_tokens=10, logprobs=True)
    lone = run_together(plain(device), [shared + [7, 8]], [params])[0]
    run_together(engine, [shared + [3, 4, 5]], [params])
    req = engine.submit(shared + [7, 8], params=params)
    engine.scheduler.run_until_done([req])
    assert req.reused > 0 and list(req.logprobs) != lone[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mqa64", "mqa64-q4"])
def test_prompt_lookup_on_equals_off(invariant, name, device):
    """Greedy requests whose prompts repeat themselves (so drafts are found and verified), alone without
    prompt lookup against together with it. A verify call starts at a grain boundary (the tokens since it
    fed again) and ends in that grain, so its rows get the bits decoding them one by one gives."""
    engine = invariant(name, device)
    rng = np.random.default_rng(9)
    prompts = [(rng.integers(0, VOCAB_TOP, n).tolist() * 4)[:50] for n in (5, 7, 11)]
    params = engine.sampling(max_new_tokens=24, logprobs=True)
    engine.speculation = None
    off = [run_together(engine, [p], [params])[0] for p in prompts]
    engine.speculation = PromptLookup(num_draft=6)
    engine.scheduler.costs = type(engine.scheduler.costs)()  # a fresh cost gate: drafting allowed
    drafted = engine.scheduler.stats.drafted_tokens
    try:
        on = run_together(engine, prompts, [params] * len(prompts))
    finally:
        engine.speculation = None
    assert engine.scheduler.stats.drafted_tokens > drafted, "no draft was verified: the test proves nothing"
    assert on == off


@pytest.mark.parametrize("device", DEVICES)
def test_n_choices_each_equal_a_lone_run_with_its_seed(invariant, device):
    """A request for n choices (the server gives choice i the seed seed + i) against each choice alone."""
    engine = invariant("mqa64", device)
    prompt = np.random.default_rng(6).integers(0, VOCAB_TOP, 21).tolist()
    params = [engine.sampling(greedy=False, temperature=1.0, max_new_tokens=10, logprobs=True, seed=40 + i)
              for i in range(4)]
    together = run_together(engine, [prompt] * 4, params)
    assert together == [run_together(engine, [prompt], [p])[0] for p in params]
    assert len({tuple(ids) for ids, _ in together}) > 1, "different seeds should sample different answers"


@pytest.mark.vulkan
@pytest.mark.parametrize("name,cpu_name", [("mqa64", "mqa64"), ("mha32", "mha32"), ("mqa64-q4", "mqa64-q4f")])
def test_invariant_gpu_library_computes_what_the_cpu_one_does(invariant, name, cpu_name):
    """The GPU attention kernels (kernels_gpu.py) and matmul schedules are another computation than the
    CPU's, not another answer: the same greedy ids, logprobs within float32 rounding (both with float
    activations)."""
    prompt = np.random.default_rng(10).integers(0, VOCAB_TOP, 45).tolist()
    cpu, gpu = (run_together(e, [prompt], [e.sampling(max_new_tokens=12, logprobs=True)])[0]
                for e in (invariant(cpu_name), invariant(name, "vulkan")))
    assert cpu[0] == gpu[0]
    np.testing.assert_allclose(gpu[1], cpu[1], atol=1e-4)


def test_mode_refuses_a_plain_library(tiny_model, invariant):
    m = tiny_model("mqa64")
    with pytest.raises(GptbcError, match="compiled without --batch-invariant"):
        Engine(m.out_dir, m.lib, batch_invariant=True)
    assert invariant("mqa64").guarantee()["batch_invariant"]
    assert not Engine(m.out_dir, m.lib).guarantee()["batch_invariant"]


def post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("device", DEVICES)
def test_server_under_concurrent_load_answers_as_alone(invariant, device):
    """16 concurrent clients with mixed prompts; the target prompt, sent by 4 of them, gets the lone answer
    (text and logprobs) every time. /v1/models states the guarantee."""
    from test_server import live_server

    engine = invariant("mqa64", device)
    rng = np.random.default_rng(8)
    target = {"prompt": rng.integers(0, VOCAB_TOP, 30).tolist(), "max_tokens": 12, "logprobs": 1,
              "temperature": 0}
    with live_server(Engine(engine.model_dir, engine.lib, device=device, batch_invariant=True)) as (base, _server):
        card = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=10).read())["data"][0]
        assert card["guarantee"]["batch_invariant"] is True
        alone = post(base, "/v1/completions", target)["choices"][0]
        bodies = [target if i % 4 == 0 else {"prompt": rng.integers(0, VOCAB_TOP, int(rng.integers(2, 50))).tolist(),
                                             "max_tokens": int(rng.integers(1, 16)), "temperature": 0}
                  for i in range(16)]
        answers: list = [None] * len(bodies)

        def client(i: int) -> None:
            answers[i] = post(base, "/v1/completions", bodies[i])["choices"][0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(0, len(bodies), 4):
        assert (answers[i]["text"], answers[i]["logprobs"]) == (alone["text"], alone["logprobs"])
