"""Hostile requests next to honest streaming clients, and schemathesis fuzzing the running server from its own
OpenAPI document: never a 5xx, honest outputs exactly right, healthy afterwards, no KV pages leaked."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from gptbc.runtime.engine import Engine
from test_server import PROMPT, call, live_server, reference_text, settle
from test_server_isolation import PROMPTS, stream

HOSTILE_JSON = [
    {"prompt": PROMPT, "temperature": 1e-308, "max_tokens": 4},
    {"prompt": PROMPT, "temperature": 5e-324, "top_k": 10 ** 30, "max_tokens": 4},
    {"prompt": "x", "max_tokens": 10 ** 30},
    {"prompt": "x", "seed": 10 ** 30},
    {"prompt": [10 ** 30]},
    {"prompt": [1] * 100_000, "max_tokens": 1},
    {"prompt": "x", "n": 10 ** 6},
    {"prompt": "x", "best_of": 10 ** 6},
    {"prompt": "x", "logprobs": 10 ** 6},
    {"prompt": "x", "stop": ["a"] * 10_000},
    {"prompt": "x", "stop": "a" * 100_000, "max_tokens": 4},
    {"prompt": "x", "max_tokens": 4, "n": 16, "stream": True},
    {"prompt": [[1, 2]] * 17, "max_tokens": 1},
    {"prompt": "x", "echo": True, "logprobs": 20, "max_tokens": 2},
    {"prompt": "x", "temperature": 2, "top_p": 1e-300, "min_p": 1, "max_tokens": 4},
    {"prompt": "x", "repetition_penalty": 1e-300, "max_tokens": 4, "temperature": 1},
]
HOSTILE_400 = {2, 3, 4, 5, 6, 7, 8, 9, 12, 15}  # indexes of HOSTILE_JSON refused by the schema or the window
HOSTILE_RAW = [
    b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "x", "temperature": Infinity}',
    b'{"prompt": "x", "top_p": -Infinity}',
    b'{"prompt": "x", "max_tokens": 1e400}',
    b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}",
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"prompt": "x", "extra": ' + b'{"a":' * 20_000 + b"1" + b"}" * 20_000 + b"}",
    b'{"prompt": "\xff\xfe\xfd"}',
    b"\xef\xbb\xbf\xff",
    b"",
    b"[1, 2]",
    b'"just a string"',
    b'{"prompt": "x", "prompt": 3}',
]
HOSTILE_INFILL = [
    {"input_prefix": "x", "input_extra": [{"filename": "f", "text": "y" * 50}] * 1000, "n_predict": 2},
    {"input_prefix": "x" * 20_000, "input_suffix": "y" * 20_000, "n_predict": 4},
    {"input_prefix": "x", "n_indent": 10 ** 12, "n_predict": 4, "t_max_predict_ms": 0},
    {"input_prefix": "x", "input_extra": [{"filename": 3}]},
    {"input_prefix": "x", "n_predict": -2},
]


def raw_post(base: str, path: str, data: bytes) -> int:
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    if resp.status >= 400:
        answer = json.loads(body)
        assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
    return resp.status


def test_hostile_requests_beside_streaming_clients(tiny_model):
    m = tiny_model("mqa64")
    ref = Engine(m.out_dir, m.lib, prefix_cache_size=0)
    wants = [reference_text(ref, 40, prompt_ids=p, ignore_eos=True)[0] for p in PROMPTS]
    with live_server(Engine(m.out_dir, m.lib), max_queue=256) as (base, _):
        results = [None] * len(PROMPTS)

        def honest(i):
            results[i] = stream(base, {"prompt": PROMPTS[i], "max_tokens": 40, "temperature": 0,
                                       "ignore_eos": True, "logprobs": 1})

        threads = [threading.Thread(target=honest, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        statuses = []
        for body in HOSTILE_JSON:
            statuses.append(("json", body if len(json.dumps(body)) < 80 else "(big)",
                             raw_post(base, "/v1/completions", json.dumps(body).encode())))
        for data in HOSTILE_RAW:
            statuses.append(("raw", data[:40], raw_post(base, "/v1/completions", data)))
        for body in HOSTILE_INFILL:
            statuses.append(("infill", str(body)[:60], raw_post(base, "/infill", json.dumps(body).encode())))
        for t in threads:
            t.join(120)
        assert all(s < 500 for *_, s in statuses), [s for s in statuses if s[2] >= 500]
        assert [s for *_, s in statuses[:2]] == [200, 200]  # tiny temperatures: greedy, served
        assert [i for i, (*_, s) in enumerate(statuses[:len(HOSTILE_JSON)]) if s == 400] == sorted(HOSTILE_400)
        assert all(s == 400 for *_, s in statuses[len(HOSTILE_JSON):len(HOSTILE_JSON) + 9])  # NaN ... bad UTF-8
        assert [r["text"] for r in results] == wants  # the honest clients never noticed
        for r in results:
            assert r["error"] is None and r["finish"] == "length"
        assert call(base, "GET", "/health")[0] == 200
        after = settle(base)
        assert after["gptbc_kv_sequences"] == after["gptbc_prefix_cache_sequences"]
        assert after["gptbc_kv_pages_in_use"] <= after["gptbc_kv_pages_prefix_cache"]


def test_schemathesis_fuzzing_from_the_openapi_document(tiny_model, tmp_path):
    m = tiny_model("mqa64")
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis's `st` is missing: pip install -e '.[test]'"
    with live_server(Engine(m.out_dir, m.lib), max_queue=256) as (base, _):
        before = settle(base)
        # One worker: with two, hypothesis's lambda descriptions (ast.parse) raced in CPython 3.11 threads and
        # schemathesis reported its own SystemError.
        run = subprocess.run(
            [st, "run", f"{base}/openapi.json", "--url", base, "--checks", "not_a_server_error,response_schema_conformance",
             "--phases", "examples,coverage,fuzzing", "--max-examples", os.environ.get("GPTBC_FUZZ_EXAMPLES", "25"),
             "--max-time", "90", "--request-timeout", "60", "--workers", "1", "--seed", "15",
             "--generation-database", "none"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert call(base, "GET", "/health")[0] == 200
        after = settle(base)
        assert after["gptbc_kv_sequences"] == after["gptbc_prefix_cache_sequences"]  # no KV page leaked
        assert after["gptbc_kv_pages_in_use"] <= after["gptbc_kv_pages_prefix_cache"]
        assert after["gptbc_engine_healthy"] == 1
        requests = sum(float(line.split()[1]) for line in call(base, "GET", "/metrics")[2].splitlines()
                       if line.startswith("gptbc_requests_total{"))
        assert requests > 100  # it really fuzzed
        assert before["gptbc_engine_healthy"] == 1
