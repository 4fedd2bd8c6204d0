"""`gptbc serve` isolation and supervision: a failure stays with its request; a failing engine is answered,
recovered or stopped loudly; the bugs of issue 15 (each test here failed before the fix)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from gptbc.runtime.async_engine import AsyncEngine, EngineDead
from gptbc.runtime.engine import Engine
from gptbc.runtime.sampling import SamplingParams
from gptbc.runtime.scheduler import Scheduler
from gptbc.serve import openai
from gptbc.serve.core import Server
from test_scheduler import EOS, VOCAB, FakeRunner, reference
from test_server import PROMPT, call, live_server, reference_text, settle

PROMPTS = [PROMPT, "class Stack:\n    def push(self, x):\n", "import os\n", "for i in range(10):\n"]


def stream(base: str, body: dict) -> dict:
    """A streaming /v1/completions: text, the chunks' logprobs, finish reason, or the in-band error."""
    import http.client
    from urllib.parse import urlparse

    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = {"status": resp.status, "text": "", "chunks": [], "finish": None, "error": None}
    if resp.status != 200:
        out["error"] = json.loads(resp.read())
        return out
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            out["error"] = chunk
            break
        out["chunks"].append(chunk)
        for c in chunk["choices"]:
            out["text"] += c["text"]
            out["finish"] = c["finish_reason"] or out["finish"]
    conn.close()
    return out


def in_threads(fns):
    results = [None] * len(fns)

    def run(i, fn):
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    return threads, results


@pytest.fixture(scope="module")
def model(tiny_model):
    m = tiny_model("mqa64")
    return m, Engine(m.out_dir, m.lib, prefix_cache_size=0)


def test_tiny_temperature_is_greedy_and_harms_no_one(model):
    m, ref = model
    with live_server(Engine(m.out_dir, m.lib)) as (base, _):
        wants = [reference_text(ref, 20, prompt_ids=p, ignore_eos=True)[0] for p in PROMPTS]
        threads, results = in_threads(
            [lambda p=p: stream(base, {"prompt": p, "max_tokens": 20, "temperature": 0, "ignore_eos": True})
             for p in PROMPTS]
            + [lambda t=t: call(base, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "temperature": t,
                                                               "ignore_eos": True})
               for t in (1e-308, 5e-324, 1e-10)])
        for t in threads:
            t.join(120)
        assert [r["text"] for r in results[:4]] == wants
        for status, _, body in results[4:]:
            assert status == 200 and body["choices"][0]["text"] == wants[0]  # behaves as greedy
        assert call(base, "GET", "/health")[0] == 200


def test_a_request_whose_sampling_fails_ends_alone(model, monkeypatch):
    """The one request whose sampling raises gets its own 500; concurrent streams finish exactly."""
    import gptbc.runtime.scheduler as sched

    real = sched.sample

    def flaky(logits, p, *a, **kw):
        if p.seed == 666:
            raise FloatingPointError("injected sampling failure")
        return real(logits, p, *a, **kw)

    monkeypatch.setattr(sched, "sample", flaky)
    m, ref = model
    with live_server(Engine(m.out_dir, m.lib)) as (base, _):
        wants = [reference_text(ref, 24, prompt_ids=p, ignore_eos=True)[0] for p in PROMPTS]
        threads, results = in_threads(
            [lambda p=p: stream(base, {"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True})
             for p in PROMPTS]
            + [lambda: call(base, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "seed": 666,
                                                             "temperature": 0.8}),
               lambda: stream(base, {"prompt": PROMPT, "max_tokens": 24, "seed": 666, "temperature": 0.8})])
        for t in threads:
            t.join(120)
        assert [r["text"] for r in results[:4]] == wants
        status, _, body = results[4]
        assert status == 500 and body["error"]["code"] == "generation_failed"
        assert "injected sampling failure" in body["error"]["message"]
        assert results[5]["error"]["error"]["code"] == "generation_failed"  # in-band for a stream
        after = settle(base)
        assert after["gptbc_kv_sequences"] == after["gptbc_prefix_cache_sequences"]  # nothing leaked
        assert after["gptbc_sequences_failed_total"] == 2
        assert call(base, "GET", "/health")[0] == 200


def test_a_failed_engine_step_fails_its_batch_and_the_engine_recovers(model):
    m, ref = model
    engine = Engine(m.out_dir, m.lib)
    real, fail = engine.runner.prefill_chunk, threading.Event()

    def prefill_chunk(seq_id, chunk):  # the runner fails once, for the batch being prefilled
        if fail.is_set():
            fail.clear()
            raise RuntimeError("injected runner failure")
        return real(seq_id, chunk)

    engine.runner.prefill_chunk = prefill_chunk
    with live_server(engine) as (base, server):
        fail.set()
        status, _, body = call(base, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
        assert status == 500 and body["error"]["code"] == "engine_step_failed"
        assert "injected runner failure" in body["error"]["message"]
        want, _ = reference_text(ref, 8, prompt_ids=PROMPT)
        status, _, body = call(base, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
        assert status == 200 and body["choices"][0]["text"] == want  # recovered
        assert call(base, "GET", "/health")[0] == 200
        after = settle(base)
        assert after["gptbc_kv_sequences"] == after["gptbc_prefix_cache_sequences"]
        assert after["gptbc_engine_step_failures_total"] == 1 and after["gptbc_engine_healthy"] == 1


def test_an_engine_that_keeps_failing_is_dead_loudly(model):
    """Steps failing max_consecutive_failures times: every request answered, /health 503, on_fatal called."""
    m, _ = model
    engine = Engine(m.out_dir, m.lib)

    def broken():
        raise RuntimeError("device lost")

    engine.step = broken
    fatal = []
    with live_server(engine, on_fatal=fatal.append) as (base, server):
        # A step that fails before admitting anything leaves the request waiting (untouched), so the loop
        # steps again at once: three failures in a row, and the waiting request hears that the engine died.
        status, _, body = call(base, "POST", "/v1/completions", {"prompt": PROMPT})
        assert (status, body["error"]["code"]) == (503, "engine_dead"), body
        # the engine answers its clients first, then calls on_fatal (which may stop the process): a moment later
        for _ in range(100):
            if fatal:
                break
            time.sleep(0.02)
        assert len(fatal) == 1 and isinstance(fatal[0], EngineDead)
        status, _, body = call(base, "GET", "/health")
        assert status == 503 and body["status"] == "error" and "device lost" in body["error"]
        status, _, body = call(base, "POST", "/v1/completions", {"prompt": PROMPT})
        assert status == 503 and body["error"]["code"] == "engine_dead"  # answered at once, never a hang


def test_dead_engine_stops_the_process_with_exit_status_1(tiny_model):
    m = tiny_model("mqa64")
    script = textwrap.dedent(f"""
        import sys
        from gptbc.runtime.engine import Engine
        from gptbc.errors import GptbcError
        from gptbc.serve.app import serve
        engine = Engine({str(m.out_dir)!r}, {str(m.lib)!r})
        def broken():
            raise RuntimeError("device lost")
        engine.step = broken
        try:
            serve(engine, port=0, on_ready=lambda url: print(url, flush=True))
        except GptbcError as err:
            print("error:", err, file=sys.stderr)
            sys.exit(1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = proc.stdout.readline().strip()
        assert base.startswith("http://"), proc.stderr.read()
        status, _, body = call(base, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert (status, body["error"]["code"]) == (503, "engine_dead"), body  # as in the test above
        assert proc.wait(timeout=60) == 1
        assert "device lost" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


class FakeEngine:
    """What AsyncEngine needs of an Engine, over the scheduler and a fake runner (no TVM)."""

    def __init__(self):
        self.runner = FakeRunner()
        self.scheduler = Scheduler(self.runner, 256, VOCAB, {EOS}, None, 0)

    def submit(self, ids, params):
        return self.scheduler.submit(ids, params)

    def step(self):
        return self.scheduler.step()

    def cancel(self, req, keep=False):
        self.scheduler.cancel(req, keep)

    def has_work(self):
        return self.scheduler.has_work()

    def status(self):
        return {"running": len(self.scheduler.active)}


def test_async_engine_survives_what_escapes_its_loop():
    """A failure outside a step (here: freeing a cancelled sequence raises) kills the loop: answered, not silent."""
    fake = FakeEngine()
    fatal = []
    loop = AsyncEngine(fake, on_fatal=fatal.append)
    decode = fake.runner.decode
    fake.runner.decode = lambda seq_id, token: (time.sleep(0.01), decode(seq_id, token))[1]  # keep it running
    loop.start()
    try:
        got = []
        req = loop.submit([1, 2, 3], SamplingParams(max_new_tokens=200), got.append).result(10)
        other = []
        loop.submit([4, 5], SamplingParams(max_new_tokens=200), other.append).result(10)
        fake.runner.remove_sequence = lambda seq_id: (_ for _ in ()).throw(RuntimeError("KV state corrupt"))
        loop.cancel(req)
        loop.thread.join(10)
        assert not loop.thread.is_alive() and not loop.healthy and len(fatal) == 1
        assert isinstance(other[-1], EngineDead)  # the other request is answered, not left waiting
        with pytest.raises(EngineDead):
            loop.submit([1, 2], SamplingParams(max_new_tokens=2), got.append).result(1)
    finally:
        loop.stop()


def test_a_step_that_fails_after_finishing_a_request_still_answers_it():
    fake = FakeEngine()
    loop = AsyncEngine(fake)
    remove = fake.runner.remove_sequence
    failures = iter([True])
    fake.runner.remove_sequence = lambda seq_id: (next(failures, False) and (_ for _ in ()).throw(
        RuntimeError("free failed"))) or remove(seq_id)
    loop.start()
    try:
        got, done = [], threading.Event()
        loop.submit([1, 2, 3], SamplingParams(max_new_tokens=2), lambda e: (got.append(e), (isinstance(e, Exception) or e.finished) and done.set())).result(10)
        assert done.wait(10)  # retiring it raised inside the step, after its last event was made
        assert any(isinstance(e, Exception) and "free failed" in str(e) for e in got)
        assert loop.healthy
    finally:
        loop.stop()


def test_async_engine_answers_a_waiting_request_after_a_start_failure():
    fake = FakeEngine()
    loop = AsyncEngine(fake)
    loop.start()
    try:
        events, done = [], threading.Event()

        def deliver(item):
            events.append(item)
            if not hasattr(item, "finished") or item.finished:
                done.set()

        fake.runner.fail_add = True
        loop.submit([4, 5], SamplingParams(max_new_tokens=3), deliver).result(10)
        assert done.wait(10) and events[-1].finish_reason == "error"
        fake.runner.fail_add = False
        got, ok = [], threading.Event()
        loop.submit([4, 5], SamplingParams(max_new_tokens=3),
                    lambda e: (got.append(e.token), e.finished and ok.set())).result(10)
        assert ok.wait(10) and got == reference([4, 5], 3)
    finally:
        loop.stop()


def test_inflight_count_survives_a_client_gone_during_start_up(model):
    m, _ = model
    server = Server(Engine(m.out_dir, m.lib), "tiny")
    server.loop.start()
    gate = threading.Event()
    try:
        server.loop.call(lambda: gate.wait(30))  # hold the engine thread: submissions wait in its queue

        async def scenario():
            job = openai.parse_completion(server, {"prompt": PROMPT, "max_tokens": 30})
            task = asyncio.ensure_future(server.start(job))
            await asyncio.sleep(0.2)
            task.cancel()  # the client went away while its request was being accepted
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(scenario())
        assert server.inflight == 0
        gate.set()
        for _ in range(100):
            if server.loop.gauges["running"] == 0 and server.loop.gauges["waiting"] == 0 and not server.loop.sinks:
                break
            time.sleep(0.05)
        assert server.loop.gauges["running"] == 0 and server.loop.gauges["waiting"] == 0
    finally:
        gate.set()
        server.loop.stop()


def test_streamed_logprobs_are_consistent_across_chunks(model):
    m, _ = model
    with live_server(Engine(m.out_dir, m.lib)) as (base, _):
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "logprobs": 2, "ignore_eos": True}
        whole = call(base, "POST", "/v1/completions", body)[2]["choices"][0]
        for echo in (False, True):
            s = stream(base, body | {"echo": echo})
            tokens, lps, offsets, text = [], [], [], ""
            for chunk in s["chunks"]:
                for c in chunk["choices"]:
                    lp = c["logprobs"]
                    if lp is None:  # the echoed prompt text comes first, before any token
                        text += c["text"]
                        continue
                    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) \
                        == len(lp["text_offset"])
                    tokens += lp["tokens"]
                    lps += lp["token_logprobs"]
                    offsets += lp["text_offset"]
                    text += c["text"]
            assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]  # one running offset
            assert "".join(tokens) == text
            assert lps[len(lps) - 16:] == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-4)  # echo scores via verify


def test_tokenization_runs_off_the_event_loop_and_the_key_is_compared_in_constant_time(model, monkeypatch):
    import asyncio as aio
    import hmac

    import gptbc.serve.app as srv

    m, _ = model
    engine = Engine(m.out_dir, m.lib)
    where, real_encode = [], engine.encode

    def encode(text):
        try:
            aio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker")
        return real_encode(text)

    engine.encode = encode
    compared, real_compare = [], hmac.compare_digest
    monkeypatch.setattr(srv.hmac, "compare_digest", lambda a, b: (compared.append((a, b)), real_compare(a, b))[1])
    with live_server(engine, api_key="k3y") as (base, _):
        auth = {"Authorization": "Bearer k3y"}
        for path, body in [("/v1/completions", {"prompt": "x" * 100_000, "max_tokens": 2}),
                           ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
                           ("/infill", {"input_prefix": "a", "input_suffix": "b", "n_predict": 2}),
                           ("/tokenize", {"content": PROMPT})]:
            assert call(base, "POST", path, body, auth)[0] in (200, 400)
        assert where and set(where) == {"worker"}
        assert call(base, "POST", "/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer nope"})[0] == 401
        assert (b"Bearer nope", b"Bearer k3y") in compared
