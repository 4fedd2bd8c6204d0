"""`gptbc serve`: the OpenAI client against a live server on 127.0.0.1, error answers, disconnects, load."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest

from gptbc.runtime.engine import Engine
from gptbc.serve.app import build_app
from gptbc.serve.core import Server

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):\n    "


@contextlib.contextmanager
def live_server(engine: Engine, **options):
    """The real ASGI app under uvicorn in a thread, on a free loopback port."""
    import uvicorn

    server = Server(engine, "tiny", **options)
    http_server = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=http_server.run, daemon=True)
    thread.start()
    while not http_server.started:
        assert thread.is_alive(), "server thread died"
        time.sleep(0.02)
    port = http_server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        http_server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tiny_model):
    """(base URL, Server, reference Engine) for the mqa64 tiny model (it has FIM tokens)."""
    m = tiny_model("mqa64")
    with live_server(Engine(m.out_dir, m.lib)) as (base, server):
        yield base, server, Engine(m.out_dir, m.lib, prefix_cache_size=0)


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def call(base: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, resp.headers, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, resp.headers, text


def metrics(base: str) -> dict[str, float]:
    _, _, text = call(base, "GET", "/metrics")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def settle(base: str) -> dict[str, float]:
    """Metrics once nothing runs or waits (cancellations land between engine steps)."""
    for _ in range(200):
        m = metrics(base)
        if m["gptbc_requests_running"] == 0 and m["gptbc_requests_waiting"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"requests still running: {m}")


def reference_text(engine: Engine, n: int, **kw) -> tuple[str, list[int]]:
    ids = engine.generate(max_new_tokens=n, **kw)
    return engine.decode_text(ids), ids


# ---- the OpenAI client ----

def test_plain_completion_equals_engine_generate(served, client):
    _, _, engine = served
    want, ids = reference_text(engine, 12, prompt_ids=PROMPT)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
    assert r.usage.prompt_tokens == len(engine.encode(PROMPT))
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + len(ids)
    as_ids = client.completions.create(model="tiny", prompt=engine.encode(PROMPT), max_tokens=12, temperature=0)
    assert as_ids.choices[0].text == want


def test_fim_via_suffix(served, client):
    _, _, engine = served
    want, _ = reference_text(engine, 10, prefix="def add(a, b):\n    ", suffix="\n    return c\n")
    r = client.completions.create(model="tiny", prompt="def add(a, b):\n    ", suffix="\n    return c\n",
                                  max_tokens=10, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(engine.fim_prompt("def add(a, b):\n    ", "\n    return c\n"))


def test_streaming_with_usage(served, client):
    _, _, engine = served
    want, ids = reference_text(engine, 16, prompt_ids=PROMPT)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 3 and "".join(texts) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_and_prompt_lists(served, client):
    _, _, engine = served
    want, _ = reference_text(engine, 8, prompt_ids=PROMPT)
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert all(c.text == want for c in greedy.choices)
    sampled = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.5, n=4, seed=7)
    again = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.5, n=4, seed=7)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded
    assert len({c.text for c in sampled.choices}) > 1  # each choice its own sample
    other, _ = reference_text(engine, 8, prompt_ids="class A:")
    two = client.completions.create(model="tiny", prompt=[PROMPT, "class A:"], max_tokens=8, temperature=0, n=2)
    assert [c.text for c in two.choices] == [want, want, other, other]
    assert two.usage.prompt_tokens == len(engine.encode(PROMPT)) + len(engine.encode("class A:"))


def test_stop_strings(served, client):
    _, _, engine = served
    full, _ = reference_text(engine, 24, prompt_ids=PROMPT, ignore_eos=True)
    stop = full[6:9]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_logprobs_and_echo(served, client):
    _, _, engine = served
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 3 and abs(max(top.values()) - chosen) < 1e-6  # greedy: the best
    assert "".join(lp.tokens) == r.choices[0].text
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1,
                                       echo=True, extra_body={"ignore_eos": True})
    n_prompt = len(engine.encode(PROMPT))
    e = echoed.choices[0]
    assert e.text == PROMPT + r.choices[0].text
    assert e.logprobs.token_logprobs[0] is None and len(e.logprobs.tokens) == n_prompt + 6
    assert all(x <= 0 for x in e.logprobs.token_logprobs[1:])
    assert e.logprobs.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_infill_like_llama_cpp(served):
    base, _, engine = served
    want, ids = reference_text(engine, 7, prefix="x = ", suffix="\nprint(x)")
    status, _, body = call(base, "POST", "/infill", {"input_prefix": "x = ", "input_suffix": "\nprint(x)",
                                                     "n_predict": 7, "temperature": 0})
    assert status == 200 and body["content"] == want and body["tokens"] == ids
    assert body["tokens_predicted"] == len(ids) and body["stop"] is True


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    card = call(served[0], "GET", "/v1/models")[2]["data"][0]
    assert (card["quantization"], card["activations"]) == ("q0f32", "float")
    assert call(served[0], "GET", "/health")[:3:2] == (200, {"status": "ok", "model": "tiny"})


# ---- errors ----

@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "stop": 3}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": {"text": "x"}}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"prompt": "x " * 200, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 500}, 400, "prompt"),
    ({"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
])
def test_bad_fields_get_openai_errors(served, body, status, param):
    base = served[0]
    got, _, answer = call(base, "POST", "/v1/completions", body)
    assert got == status, answer
    err = answer["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    assert call(base, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200  # still serving


def test_malformed_bodies_and_routes(served):
    base = served[0]
    status, _, answer = call(base, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and answer["error"]["code"] == "invalid_json"
    status, _, answer = call(base, "POST", "/v1/completions", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in answer["error"]["message"]
    status, _, answer = call(base, "POST", "/v1/chat/nothing", {})
    assert status == 404 and "error" in answer
    status, _, answer = call(base, "GET", "/v1/completions")
    assert status == 405 and "error" in answer
    assert call(base, "GET", "/health")[0] == 200


def test_api_key_and_body_limit(tiny_model):
    m = tiny_model("mqa64")
    with live_server(Engine(m.out_dir, m.lib), api_key="s3cret", max_body_bytes=2000) as (base, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, _, answer = call(base, "POST", "/v1/completions", {"prompt": "x"}, headers)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert call(base, "GET", "/v1/models")[0] == 401
        assert call(base, "GET", "/health")[0] == 200  # liveness stays open
        ok = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).completions.create(
                model="tiny", prompt="x", max_tokens=2)
        auth = {"Authorization": "Bearer s3cret"}
        status, _, answer = call(base, "POST", "/v1/completions", {"prompt": "y" * 5000}, auth)
        assert status == 413 and answer["error"]["code"] == "request_too_large"
        status, _, answer = call(base, "POST", "/v1/completions", headers=auth | {"Transfer-Encoding": "chunked"},
                                 raw=b"\r\n".join([b"%x" % 3000, b"z" * 3000, b"0", b"", b""]))
        assert status == 413  # no Content-Length: counted while reading
        assert call(base, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}, auth)[0] == 200


def test_full_queue_answers_503(tiny_model):
    m = tiny_model("mqa64")
    engine = Engine(m.out_dir, m.lib, max_batch_size=1)
    gate = threading.Event()
    step = engine.step
    engine.step = lambda: (gate.wait(30), step())[1]  # hold the engine loop until the test lets it go
    with live_server(engine, max_queue=1) as (base, _):
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            call(base, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3}))) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)  # both admitted: one batch slot + one queue slot
            status, headers, answer = call(base, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})
        finally:
            gate.set()
        assert status == 503 and headers["Retry-After"] == "1"
        assert answer["error"]["code"] == "server_overloaded"
        for t in threads:
            t.join(timeout=30)
        assert [r[0] for r in results] == [200, 200]
        assert call(base, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})[0] == 200


# ---- disconnects and load ----

def test_disconnect_mid_stream_frees_kv_pages(served):
    base, server, _ = served
    before = settle(base)
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 100, "stream": True,
                                                        "ignore_eos": True, "temperature": 0}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")
    conn.close()  # the client goes away after the first chunk
    after = settle(base)
    assert after["gptbc_sequences_cancelled_total"] == before["gptbc_sequences_cancelled_total"] + 1
    assert after["gptbc_kv_sequences"] == after["gptbc_prefix_cache_sequences"]  # nothing leaked
    assert after["gptbc_kv_pages_in_use"] <= after["gptbc_kv_pages_prefix_cache"]
    assert after["gptbc_generation_tokens_total"] < before["gptbc_generation_tokens_total"] + 100


def test_load_32_streaming_clients_5_disconnecting(tiny_model):
    m = tiny_model("mqa64")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_server.py"), str(m.out_dir), "--lib",
                          str(m.lib), "--clients", "32", "--disconnect", "5", "--max-tokens", "24", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout)
    assert r["failures"] == [] and r["cancelled"] >= 5 and r["health_checks"] > 0
    assert r["kv_sequences_after"] == r["prefix_cache_sequences_after"]


def test_load_mixed_editors_with_hostile_requests(tiny_model, tmp_path):
    import shutil

    m = tiny_model("mqa64")
    out = tmp_path / "chat"
    shutil.copytree(m.out_dir, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg_path.write_text(json.dumps(cfg | {"chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"}))
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_server.py"), str(out), "--lib", str(m.lib),
                          "--mix", "--clients", "16", "--disconnect", "2", "--max-tokens", "12", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(run.stdout)
    assert r["failures"] == [] and r["chat_template"] and r["hostile_answered"] > 0
    assert set(r["kinds"]) == {"plain", "fim", "infill", "chat"} and r["ttft_p99_s"] >= r["ttft_p50_s"]


def test_cli_serve_starts_and_stops(tiny_model):
    m = tiny_model("mqa64")
    proc = subprocess.Popen(["gptbc", "serve", str(m.out_dir), "--lib", str(m.lib), "--port", "0",
                             "--model-name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert " on http://127.0.0.1:" in line, proc.stderr.read()
        base = line.split(" on ", 1)[1].split()[0]
        assert call(base, "GET", "/health")[0] == 200
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=3).choices[0].finish_reason
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_cli_serve_bad_input_is_one_line(tiny_model, tmp_path):
    m = tiny_model("mqa64")
    run = subprocess.run(["gptbc", "serve", str(m.out_dir), "--lib", str(tmp_path / "none.so")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0 and "none.so" in run.stderr
    run = subprocess.run(["gptbc", "serve", str(m.out_dir), "--lib", str(m.lib), "--max-batch", "999"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "999" in run.stderr and run.stderr.strip().count("\n") == 0
    busy = subprocess.run(["gptbc", "serve", str(m.out_dir), "--lib", str(m.lib), "--host", "192.0.2.1",
                           "--api-key", "k"], capture_output=True, text=True, timeout=120, env=os.environ)
    assert busy.returncode == 1 and "192.0.2.1" in busy.stderr.splitlines()[-1]
