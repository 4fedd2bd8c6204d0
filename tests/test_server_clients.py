"""Editor clients replayed against `gptbc serve`: each request is the one the client's source builds (field
for field; only values like n_predict are small and the temperature greedy where the check needs exact text),
and each answer is checked for the shape the client parses and for the greedy text."""

from __future__ import annotations

import http.client
import json
import shutil
from urllib.parse import urlparse

import pytest

from gptbc.serve import schema as S
from gptbc.runtime.engine import Engine
from gptbc.runtime.sampling import RANGES
from llama_cpp_reference import infill_prompt
from test_server import call, live_server

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    return c\n"
EXTRA = [{"text": "def sub(a, b):\n    return a - b\n", "time": [1733000000, 123456], "filename": "util.py"},
         {"text": "import math\n", "time": [1733000001, 5], "filename": "main.py"}]


@pytest.fixture(scope="module")
def served(tiny_model):
    m = tiny_model("mqa64")
    with live_server(Engine(m.out_dir, m.lib)) as (base, server):
        yield base, server, Engine(m.out_dir, m.lib, prefix_cache_size=0)


def sse(base: str, path: str, body: dict) -> list[dict]:
    """The data events of a streamed answer ([DONE] excluded)."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", "Accept": "text/event-stream"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in resp.read().decode().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    conn.close()
    return events


def greedy(engine: Engine, ids: list[int], n: int) -> tuple[str, list[int]]:
    out = engine.generate(ids, max_new_tokens=n)
    return engine.decode_text(out), out


# llama.vim: tests/test_llama_vim.py replays every request it sends.


# ---- llama.vscode (src/llama-server.ts: getFIMCompletion) ----

def test_llama_vscode_infill(served):
    base, _, engine = served
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": EXTRA, "prompt": "",
            "n_predict": 16, "top_k": 40, "top_p": 0.99, "stream": False, "n_indent": 0,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 2500, "model": "ignored-by-llama.cpp"}
    status, _, answer = call(base, "POST", "/infill", body)
    assert status == 200, answer
    want, ids = greedy(engine, infill_prompt(engine, PREFIX, SUFFIX, "", EXTRA), 16)
    assert answer["content"] == want and answer["tokens"] == ids
    assert answer["stop"] is True and answer["stop_type"] in ("eos", "limit") and answer["id_slot"] == -1
    assert answer["tokens_evaluated"] == len(infill_prompt(engine, PREFIX, SUFFIX, "", EXTRA))
    S.LlamaResponse.model_validate(answer)  # exactly the declared shape


# ---- Tabby (crates/http-api-bindings/src/completion/llama.rs and openai.rs) ----

def test_tabby_llama_cpp_binding(served):
    base, _, engine = served
    body = {"seed": 0, "prompt": PREFIX, "n_predict": 12, "temperature": 0.0, "stream": True, "penalty_last_n": 0,
            "presence_penalty": 0.0}
    events = sse(base, "/completion", body)
    assert all(isinstance(e["content"], str) and isinstance(e["stop"], bool) for e in events)
    assert events[-1]["stop"] is True and all(not e["stop"] for e in events[:-1])
    want, _ = greedy(engine, engine.encode(PREFIX), 12)
    assert "".join(e["content"] for e in events) == want
    status, _, answer = call(base, "POST", "/completion", body | {"stream": False})  # next_edit_suggestion mode
    assert status == 200 and answer["content"] == want
    S.LlamaResponse.model_validate(answer)
    S.LlamaResponse.model_validate(events[-1])  # the last streamed event carries the whole answer


def test_tabby_openai_binding(served):
    base, _, engine = served
    body = {"model": "tiny", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12, "temperature": 0.0,
            "stream": True, "presence_penalty": 0.0}
    events = sse(base, "/v1/completions", body)
    want, _ = greedy(engine, engine.fim_prompt(PREFIX, SUFFIX), 12)
    assert "".join(e["choices"][0]["text"] for e in events) == want


# ---- Continue (core/llm/llms/OpenAI.ts _streamFim, LlamaCpp.ts _streamComplete) ----

def test_continue_openai_fim_provider(served):
    base, _, engine = served
    body = {"model": "tiny", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12, "temperature": 0.0,
            "top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "stop": ["\n\n\n"], "stream": True}
    events = sse(base, "/v1/fim/completions", body)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"]["content"] for e in events)  # what Continue reads, chunk by chunk
    want, _ = greedy(engine, engine.fim_prompt(PREFIX, SUFFIX), 12)
    assert text == want.split("\n\n\n")[0]
    status, _, answer = call(base, "POST", "/v1/fim/completions", body | {"stream": False})
    assert status == 200 and answer["choices"][0]["message"]["content"] == text
    S.ChatResponse.model_validate(answer)


def test_continue_llama_cpp_provider(served):
    base, _, engine = served
    body = {"prompt": PREFIX, "stream": True, "n_predict": 10, "temperature": 0.0, "top_k": 40, "top_p": 0.95,
            "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "stop": ["\n\n"],
            "mirostat": 0, "typical_p": 1.0}  # llama.cpp-only samplers: accepted and ignored
    events = sse(base, "/completion", body)
    want, _ = greedy(engine, engine.encode(PREFIX), 10)
    assert "".join(e["content"] for e in events) == want.split("\n\n")[0]


# ---- twinny (src/extension/provider-options.ts: llama.cpp FIM with the template in the prompt text) ----

def test_twinny_llama_cpp_fim(served):
    base, _, engine = served
    f = engine.fim
    prompt = f"{f['prefix']['text']}{PREFIX}{f['suffix']['text']}{SUFFIX}{f['middle']['text']}"
    body = {"prompt": prompt, "stream": True, "temperature": 0.0, "n_predict": 12}
    events = sse(base, "/completion", body)
    want, _ = greedy(engine, engine.fim_prompt(PREFIX, SUFFIX), 12)  # the FIM markers tokenize as FIM tokens
    assert "".join(e["content"] for e in events) == want


def test_completion_with_ids_n_probs_and_unknown_fields(served):
    base, _, engine = served
    ids = engine.encode(PREFIX)
    status, _, answer = call(base, "POST", "/completion", {"prompt": ids, "n_predict": 6, "n_probs": 3,
                                                           "temperature": 0, "ignore_eos": True, "id_slot": 2,
                                                           "dry_multiplier": 0.8, "grammar": ""})
    assert status == 200 and answer["id_slot"] == 2
    want, out = greedy(engine, ids, 6)
    assert (answer["content"], answer["tokens"]) == (want, out)  # the text is the ids detokenized
    S.LlamaResponse.model_validate(answer)
    probs = answer["completion_probabilities"]
    assert [p["id"] for p in probs] == answer["tokens"]
    assert all(len(p["top_logprobs"]) == 3 and p["top_logprobs"][0]["id"] == p["id"] for p in probs)  # greedy


# ---- chat ----

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_without_a_template_uses_chatml(served):
    """As llama.cpp's server does: an answer the editor can show, not a 400 it swallows."""
    base, _, engine = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    status, _, body = call(base, "POST", "/v1/chat/completions",
                           {"model": "", "messages": messages, "max_tokens": 6, "temperature": 0})
    assert status == 200, body
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    want, _ = greedy(engine, engine.encode(chatml), 6)
    assert body["choices"][0]["message"]["content"] == want.split("<|im_end|>")[0]


def test_chat_completions_with_a_template(tiny_model, tmp_path):
    m = tiny_model("mqa64")
    out = tmp_path / "chat"
    shutil.copytree(m.out_dir, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg_path.write_text(json.dumps(cfg | {"chat_template": TEMPLATE, "eos_token": "<|endoftext|>"}))
    engine = Engine(out, m.lib, prefix_cache_size=0)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "add two numbers"}]
    rendered = engine.chat_template.render(messages)
    assert rendered.endswith("<|assistant|>\n") and "<|endoftext|>" in rendered
    want, ids = greedy(engine, engine.encode(rendered), 10)
    with live_server(Engine(out, m.lib)) as (base, _):
        status, _, body = call(base, "POST", "/v1/chat/completions", {"model": "tiny", "messages": messages,
                                                                     "max_tokens": 10, "temperature": 0})
        assert status == 200, body
        assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant",
                                                                                        "content": want}
        S.ChatResponse.model_validate(body)
        events = sse(base, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 10,
                                                    "temperature": 0, "stream": True})
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want
        import openai

        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
        assert r.choices[0].message.content == want
        status, _, body = call(base, "POST", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                "max_tokens": 2})
        assert status == 200


@pytest.mark.parametrize("template, kind, attribute", [
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "list", "__class__"),  # every Python class
    ("{{ ''.__class__.__base__ }}", "str", "__class__"),
    ("{% for m in messages %}{{ m.update({'role': 'system'}) }}{% endfor %}", "dict", "update"),  # immutable
])
def test_sandboxed_template_cannot_reach_python(template, kind, attribute):
    """The sandbox (jinja2's ImmutableSandboxedEnvironment) refuses each escape, and the server's message says
    so: a plain jinja2 Environment renders the first two and runs the third."""
    from gptbc.runtime.chat_template import ChatTemplate
    from gptbc.errors import GptbcError

    with pytest.raises(GptbcError) as err:
        ChatTemplate(template, {}).render([{"role": "user", "content": "x"}])
    assert str(err.value) == (f"messages: the chat template refused them (access to attribute '{attribute}' of "
                              f"'{kind}' object is unsafe.)")


def test_sandboxed_template_hides_function_globals():
    from gptbc.runtime.chat_template import ChatTemplate

    assert ChatTemplate("{{ raise_exception.__globals__ }}", {}).render([{"role": "user", "content": "x"}]) == ""


# ---- tokenize / detokenize / schema ----

def test_tokenize_detokenize(served):
    base, _, engine = served
    status, _, body = call(base, "POST", "/tokenize", {"content": PREFIX})
    assert status == 200 and body["tokens"] == engine.encode(PREFIX)
    S.TokenizeResponse.model_validate(body)
    status, _, body = call(base, "POST", "/tokenize", {"content": "ab", "with_pieces": True})
    assert "".join(t["piece"] for t in body["tokens"]) == "ab"
    status, _, body = call(base, "POST", "/detokenize", {"tokens": engine.encode(PREFIX)})
    assert status == 200 and body["content"] == PREFIX
    status, _, body = call(base, "POST", "/detokenize", {"tokens": [10 ** 9]})
    assert status == 400 and body["error"]["param"] == "tokens"


def test_openapi_declares_every_endpoint_with_the_engine_ranges(served):
    base = served[0]
    status, _, doc = call(base, "GET", "/openapi.json")
    assert status == 200
    for path in ["/v1/completions", "/v1/fim/completions", "/v1/chat/completions", "/completion", "/infill",
                 "/tokenize", "/detokenize", "/v1/models", "/health", "/metrics"]:
        assert path in doc["paths"], path
    schemas = doc["components"]["schemas"]
    temperature = schemas["CompletionRequest"]["properties"]["temperature"]["anyOf"][0]
    assert temperature["maximum"] == RANGES["temperature"].le and temperature["minimum"] == RANGES["temperature"].ge
    assert schemas["InfillRequest"]["properties"]["n_probs"]["maximum"] == RANGES["top_logprobs"].le
    assert call(base, "GET", "/docs")[0] == 200
    answer = doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["$ref"].endswith("/CompletionResponse") and "CompletionResponse" in schemas
    status, _, body = call(base, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3, "logprobs": 2,
                                                             "echo": True})
    S.CompletionResponse.model_validate(body)
