"""Batch-invariant mode (Engine(batch_invariant=True), serve --batch-invariant): the same request gives the
same token ids and logprobs, bit for bit, whatever else is being served. Compared exactly, no tolerance:
one request alone against the same request at random places in batches of 2 to 16 requests of mixed
lengths, greedy and seeded sampling, float and int8 activations, prompts prefilled in chunks, through the
Engine and through the server under concurrent load. And a test that the comparison catches a break: with
the mode off, a prefix reused from the cache changes the logprobs."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest

from gptbc.errors import GptbcError
from gptbc.runtime.engine import Engine
from gptbc.runtime.speculation import PromptLookup

VOCAB_TOP = 250  # prompt ids below the tiny models' vocabularies


def run_together(engine: Engine, prompts: list[list[int]], params: list) -> list[tuple[list[int], list[float]]]:
    """All requests submitted at once and run to the end (continuous batching): per request (ids, logprobs)."""
    reqs = [engine.submit(p, params=q) for p, q in zip(prompts, params)]
    engine.scheduler.run_until_done(reqs)
    for r in reqs:
        assert r.error is None, r.error
    return [(list(r.output_ids), list(r.logprobs)) for r in reqs]


def check_alone_equals_batched(engine: Engine, case: int, **sampling) -> None:
    """The target request alone, then at a random position in batches of 2..16 requests of mixed lengths
    and lengths of answer (so requests join and leave while the target decodes)."""
    rng = np.random.default_rng(case)
    target = rng.integers(0, VOCAB_TOP, 37).tolist()
    params = engine.sampling(max_new_tokens=12, logprobs=True, **sampling)
    alone = run_together(engine, [target], [params])[0]
    for size in (2, 9, 16):
        others = [rng.integers(0, VOCAB_TOP, int(rng.integers(1, 60))).tolist() for _ in range(size - 1)]
        other_params = [engine.sampling(max_new_tokens=int(rng.integers(1, 20)), logprobs=True, **sampling)
                        for _ in others]
        at = int(rng.integers(0, size))
        prompts = others[:at] + [target] + others[at:]
        answers = run_together(engine, prompts, other_params[:at] + [params] + other_params[at:])
        assert answers[at] == alone, f"batch of {size}, target at {at}: {answers[at]} != {alone}"


@pytest.fixture(scope="module")
def int8_engines(tiny_model, tmp_path_factory):
    """Batch-invariant engines over int8-activation libraries of the mqa64 tiny model (q8f32_1, q4f32_1)."""
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.compile.compiler import compile_model

    m, root = tiny_model("mqa64"), tmp_path_factory.mktemp("invariant-int8")
    engines = {}
    for scheme in ("q8f32_1", "q4f32_1"):
        out = convert_weight(m.hf_dir, scheme, root / scheme, progress=False)
        lib = compile_model(resolve_model(str(out)), "cpu", scheme, root / f"{scheme}.so", log=lambda _m: None,
                            activations="int8")
        engines[scheme] = Engine(out, lib, batch_invariant=True)
    return engines


@pytest.mark.parametrize("name", ["mqa64", "mha32", "mqa32"])  # mqa32 prefills in chunks of 16 tokens
def test_float_greedy_alone_equals_batched(tiny_model, name):
    m = tiny_model(name)
    check_alone_equals_batched(Engine(m.out_dir, m.lib, batch_invariant=True), case=1)


def test_float_seeded_sampling_alone_equals_batched(tiny_model):
    m = tiny_model("mqa64")
    check_alone_equals_batched(Engine(m.out_dir, m.lib, batch_invariant=True), case=2,
                               greedy=False, temperature=0.9, top_p=0.9, seed=7)


@pytest.mark.parametrize("scheme", ["q8f32_1", "q4f32_1"])
def test_int8_activations_alone_equals_batched(int8_engines, scheme):
    engine = int8_engines[scheme]
    assert engine.activations == "int8"
    check_alone_equals_batched(engine, case=3)
    check_alone_equals_batched(engine, case=4, greedy=False, temperature=0.8, top_p=0.95, seed=11)


def test_the_check_catches_a_prefix_reused_from_the_cache(tiny_model):
    """With the mode off, a request whose prompt starts like a cached one reuses that prefix's KV, and its
    attention is merged from two parts: the logprobs move in the last bits. The mode gives the lone answer."""
    m = tiny_model("mqa64")
    rng = np.random.default_rng(5)
    shared = rng.integers(0, VOCAB_TOP, 40).tolist()
    first, second = shared + [3, 4, 5], shared + [7, 8]

    def answers(engine: Engine) -> tuple:
        params = engine.sampling(max_new_tokens=10, logprobs=True)
        run_together(engine, [first], [params])
        req = engine.submit(second, params=params)
        engine.scheduler.run_until_done([req])
        return req.reused, (list(req.output_ids), list(req.logprobs))

    lone = run_together(Engine(m.out_dir, m.lib, batch_invariant=True), [second],
                        [Engine(m.out_dir, m.lib).sampling(max_new_tokens=10, logprobs=True)])[0]
    reused, reused_answer = answers(Engine(m.out_dir, m.lib))
    assert reused > 0 and reused_answer[1] != lone[1], "the exact comparison must see the reused prefix"
    reused, invariant_answer = answers(Engine(m.out_dir, m.lib, batch_invariant=True))
    assert reused == 0 and invariant_answer == lone


def test_n_choices_each_equal_a_lone_run_with_its_seed(tiny_model):
    """A request for n choices (the server gives choice i the seed seed + i) against each choice alone."""
    m = tiny_model("mqa64")
    engine = Engine(m.out_dir, m.lib, batch_invariant=True)
    prompt = np.random.default_rng(6).integers(0, VOCAB_TOP, 21).tolist()
    params = [engine.sampling(greedy=False, temperature=1.0, max_new_tokens=10, logprobs=True, seed=40 + i)
              for i in range(4)]
    together = run_together(engine, [prompt] * 4, params)
    assert together == [run_together(engine, [prompt], [p])[0] for p in params]
    assert len({tuple(ids) for ids, _ in together}) > 1, "different seeds should sample different answers"


def test_mode_refuses_what_it_cannot_promise(tiny_model):
    m = tiny_model("mqa64")
    with pytest.raises(GptbcError, match="prompt lookup"):
        Engine(m.out_dir, m.lib, batch_invariant=True, speculation=PromptLookup(num_draft=4))
    with pytest.raises(GptbcError, match="CPU only, not on vulkan"):
        Engine(m.out_dir, m.lib, device="vulkan", batch_invariant=True)
    engine = Engine(m.out_dir, m.lib, batch_invariant=True)
    with pytest.raises(GptbcError, match="prompt lookup"):
        engine.speculation = PromptLookup(num_draft=4)
    assert engine.guarantee()["batch_invariant"] and engine.scheduler.prefix_cache_size == 0


def post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_server_under_concurrent_load_answers_as_alone(tiny_model):
    """16 concurrent clients with mixed prompts; the target prompt, sent by 4 of them, gets the lone answer
    (text and logprobs) every time. /v1/models states the guarantee."""
    from test_server import live_server

    m = tiny_model("mqa64")
    rng = np.random.default_rng(8)
    target = {"prompt": rng.integers(0, VOCAB_TOP, 30).tolist(), "max_tokens": 12, "logprobs": 1,
              "temperature": 0}
    with live_server(Engine(m.out_dir, m.lib, batch_invariant=True)) as (base, _server):
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
