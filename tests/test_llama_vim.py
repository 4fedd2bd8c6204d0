"""llama.vim replayed against `gptbc serve`: every request is the one autoload/llama.vim builds
(ggml-org/llama.vim @ a1c8e6e, its default g:llama_config: `"model": ""` and an empty `Authorization: Bearer `
on every request), and every answer is read the way the plugin reads it. docs/llama-cpp-protocol.md has the
plugin's and llama.cpp's source lines.

The model is scripted (hf_models.make_scripted_checkpoint): its greedy output is SCRIPT's tokens round and
round, so the stop rules meet lines the test wrote: indented ones, a blank one, and tokens that hold a newline
with other text.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
from urllib.parse import urlparse

import pytest

from gptbc.runtime.engine import Engine
from gptbc.serve import llamacpp
from gptbc.serve import schema as S
from gptbc.serve.core import Server
from gptbc.serve.stops import IndentStop, past_time_limit
from hf_models import make_scripted_checkpoint, make_tokenizer
from llama_cpp_reference import cut_at_indent, ends_on_newline_token, infill_prompt
from test_server import live_server, settle

SCRIPT = "    total = a + b\n    print(total)\n\n    return total\n"
EMPTY_BEARER = {"Authorization": "Bearer "}  # llama.vim's guard tests a string literal: always sent
EXTRA = [{"text": "def sub(a, b):\n    return a - b\n", "time": [1733000000, 123456], "filename": "util.py"},
         {"text": "import math\n", "time": [1733000001, 5], "filename": "main.py"}]
PREFIX = "def add(a, b):\n"
SUFFIX = "\n"
FIM_FIELDS = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
              "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
              "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"]
SYSTEM = ("You are a text-editing assistant. Respond ONLY with the result of applying INSTRUCTION to SELECTION "
          "given the CONTEXT. Maintain the existing text indentation. Do not add extra code blocks. Respond only "
          "with the modified block. If the INSTRUCTION is a question, answer it directly. Do not output any extra "
          "separators. Consider the local context before (PREFIX) and after (SUFFIX) the SELECTION.\n")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """(base URL, reference Engine) of a served scripted model (window 1024)."""
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.compile.compiler import compile_model

    root = tmp_path_factory.mktemp("scripted")
    hf_dir = make_scripted_checkpoint(root / "hf", SCRIPT)
    out = convert_weight(hf_dir, "q0f32", root / "out", progress=False)
    lib = compile_model(resolve_model(str(out)), "cpu", "q0f32", root / "lib.so", log=lambda _m: None)
    with live_server(Engine(out, lib)) as (base, _server):
        yield base, Engine(out, lib, prefix_cache_size=0)


def post(base: str, path: str, body: dict) -> tuple[int, str]:
    """(status, raw body) of a request sent as llama.vim's curl sends it."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **EMPTY_BEARER})
    resp = conn.getresponse()
    raw = resp.read().decode()
    conn.close()
    return resp.status, raw


def fim_reply(raw: str) -> dict | None:
    """What s:fim_on_response keeps: one line (classic Vim reads line by line) starting with '{' and holding
    `"content":"` with no space after the colon; anything else is dropped without a word."""
    if "\n" in raw.strip() or not re.match(r"\s*\{", raw) or not re.search(r'"content"\s*:"', raw):
        return None
    return json.loads(raw)


def ring_update(extra: list[dict]) -> dict:  # s:ring_update: the ring buffer's warm-up
    return {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": extra, "prompt": "",
            "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""], "model": ""}


def fim(prefix: str, typed: str, suffix: str, extra: list[dict], indent: int, n_predict: int = 128,
        t_max_predict_ms: int = 250) -> dict:  # llama#fim
    return {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": extra, "prompt": typed,
            "n_predict": n_predict, "stop": [], "n_indent": indent, "top_k": 40, "top_p": 0.90,
            "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 500, "t_max_predict_ms": t_max_predict_ms, "response_fields": FIM_FIELDS,
            "model": ""}


def inst_messages(extra: list[dict], prefix: list[str], selection: list[str], suffix: list[str],
                  inst: str) -> list[dict]:  # llama#inst_build (each chunk in Vim's string() form)
    def vim_string(chunk):
        return "{" + ", ".join(f"'{k}': " + (f"'{v}'" if isinstance(v, str) else str(v))
                               for k, v in chunk.items()) + "}"

    system = SYSTEM + "\n" + "--- CONTEXT     " + "-" * 40 + "\n" + "\n".join(map(vim_string, extra)) + "\n"
    for name, lines in [("PREFIX", prefix), ("SELECTION", selection), ("SUFFIX", suffix)]:
        system += f"--- {name:<12}" + "-" * 40 + "\n" + "\n".join(lines) + "\n"
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"INSTRUCTION: {inst}" if inst else ""}]


def inst_warm_up(req_id: int, messages: list[dict]) -> dict:  # llama#inst, while input() waits
    return {"id_slot": req_id, "messages": messages, "samplers": [], "n_predict": 0, "stream": False,
            "cache_prompt": True, "response_fields": [""], "model": ""}


def inst_send(req_id: int, messages: list[dict]) -> dict:  # llama#inst_send
    return {"id_slot": req_id, "messages": messages, "min_p": 0.1, "temperature": 0.1,
            "samplers": ["min_p", "temperature"], "stream": True, "cache_prompt": True, "model": ""}


def inst_result(raw: str) -> str:
    """s:inst_on_response over every line: strip 'data: ', skip blanks and non-JSON, append
    choices[0].delta.content (stream) or choices[0].message.content."""
    result = ""
    for line in raw.split("\n"):
        line = line[6:] if line.startswith("data: ") else line
        if not line.strip():
            continue
        try:
            choice = json.loads(line).get("choices", [{}])[0]
        except (json.JSONDecodeError, IndexError, AttributeError):
            continue
        content = choice.get("delta", choice.get("message", {})).get("content")
        result += content if isinstance(content, str) else ""
    return result


def greedy(engine: Engine, ids: list[int], n: int) -> tuple[str, list[int]]:
    out = engine.generate(ids, max_new_tokens=n)
    return engine.decode_text(out), out


def test_fim_after_ring_warm_up_stops_at_the_blank_line(scripted):
    base, engine = scripted
    status, raw = post(base, "/infill", ring_update(EXTRA))
    assert (status, raw) == (200, "{}")  # response_fields [""]: nothing asked for
    settle(base)
    status, raw = post(base, "/infill", fim(PREFIX, "    ", SUFFIX, EXTRA, indent=4, t_max_predict_ms=60_000))
    reply = fim_reply(raw)
    assert status == 200 and reply is not None, raw
    assert set(reply) == set(FIM_FIELDS)
    ids = infill_prompt(engine, PREFIX, SUFFIX, "    ", EXTRA)
    want, _ = greedy(engine, ids, 128)
    assert reply["content"] == cut_at_indent(want, 4)
    # It was the blank line that ended it: every non-empty line of SCRIPT is indented 4.
    assert want[len(reply["content"])] == "\n" and reply["content"].endswith("\n")
    # Timings as llama.cpp counts them: the repository context came from the warm-up's cache.
    assert reply["tokens_cached"] > 0 and reply["timings/prompt_n"] == len(ids) - reply["tokens_cached"]
    assert reply["timings/prompt_per_second"] == pytest.approx(
        1e3 * reply["timings/prompt_n"] / reply["timings/prompt_ms"])
    assert reply["truncated"] is False


def test_t_max_predict_ms_ends_on_a_token_holding_a_newline(scripted):
    base, engine = scripted
    # A prefix after which the answer starts with a newline and goes on with a long line: a rule that stops on
    # any token once the time is up and some newline came (gptbc's old one) would cut that line in half.
    for pad in range(40):
        prefix = "#" + "x" * pad + "\n"
        _, want_ids = greedy(engine, infill_prompt(engine, prefix, SUFFIX, "", []), 120)
        pieces = [engine.decode_text([t]) for t in want_ids]
        if pieces[0].startswith("\n") and not any("\n" in p for p in pieces[1:6]):
            break
    else:
        pytest.fail("no prefix starts the scripted answer on a newline")
    status, raw = post(base, "/infill", fim(prefix, "", SUFFIX, [], indent=0, n_predict=120, t_max_predict_ms=1)
                       | {"response_fields": ["content", "tokens"]})
    reply = fim_reply(raw)
    assert status == 200 and reply is not None, raw
    assert reply["tokens"] == want_ids[:len(reply["tokens"])]
    k = ends_on_newline_token(engine, reply["content"], want_ids)
    assert k is not None and 1 < k < len(want_ids), reply["content"]  # stopped early, at a line's end


def test_time_limit_rule():
    """llama.cpp's rule against pieces and times (ms since the first token): the first piece with a newline
    once the time is up; an earlier newline does not count."""
    pieces = [("x", 0), ("\n", 0.5), ("    y", 2), (" =", 3), (" 1\n", 4), ("z", 5)]
    stops = [past_time_limit(p, t, 1) for p, t in pieces]
    assert stops == [False, False, False, False, True, False]
    assert not any(past_time_limit(p, t, 0) or past_time_limit(p, t, None) for p, t in pieces)  # off


def test_instruct_mode_with_the_default_config(scripted):
    base, engine = scripted
    messages = inst_messages(EXTRA[:1], ["def add(a, b):"], ["    return a + b"], [""], "")
    status, raw = post(base, "/v1/chat/completions", inst_warm_up(0, messages))
    assert status == 200, raw
    warm = json.loads(raw)
    assert warm["choices"][0]["message"]["content"] == "" and warm["usage"]["completion_tokens"] == 0

    messages = inst_messages(EXTRA[:1], ["def add(a, b):"], ["    return a + b"], [""], "use a temporary")
    status, raw = post(base, "/v1/chat/completions", inst_send(1, messages))
    assert status == 200, raw
    # The model has no chat template: ChatML, as llama.cpp's server falls back to.
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    ids = engine.encode(chatml + "<|im_start|>assistant\n")
    want, _ = greedy(engine, ids, engine.context_window_size - len(ids))  # no max_tokens: eos or the window
    assert inst_result(raw) == want and want


def test_chat_without_max_tokens_runs_to_the_window(scripted):
    """No max_tokens: as llama.cpp (n_predict -1), the answer ends at the end of text or of the window, not at a
    fixed cap (256 cut llama.vim's instruct answers short). The scripted model never writes eos or <|im_end|>."""
    base, engine = scripted
    body = {"messages": [{"role": "user", "content": "add"}], "temperature": 0, "model": ""}
    status, raw = post(base, "/v1/chat/completions", body)
    assert status == 200, raw
    reply = json.loads(raw)
    room = engine.context_window_size - reply["usage"]["prompt_tokens"]
    assert room > 256
    assert reply["usage"]["completion_tokens"] == room and reply["choices"][0]["finish_reason"] == "length"


def test_small_window_keeps_the_request(tiny_model):
    """A 128-token window and llama.vim's n_predict 128 with long context: fitted, not refused."""
    m = tiny_model("mqa64")
    prefix = "".join(f"x{i} = {i}\n" for i in range(80))
    suffix = "".join(f"print(x{i})\n" for i in range(80))
    with live_server(Engine(m.out_dir, m.lib)) as (base, _server):
        status, raw = post(base, "/infill", fim(prefix, "y = ", suffix, EXTRA * 4, indent=0)
                           | {"response_fields": []})
    reply = fim_reply(raw)
    assert status == 200 and reply is not None, raw
    assert reply["truncated"] is True
    assert reply["tokens_evaluated"] <= 128 - 128 // 4
    assert reply["tokens_evaluated"] + reply["tokens_predicted"] <= 128


def test_what_a_small_window_keeps(tiny_model):
    """The near-cursor text stays: the prefix's end, the typed text, the suffix's start; the repository
    context gets what they leave, its oldest part cut first."""
    m = tiny_model("mqa64")
    engine = Engine(m.out_dir, m.lib)
    server, f, enc = Server(engine, "tiny"), engine.fim, engine.encode
    budget = 128 - 128 // 4  # the window less the answer's reserve (n_predict 128, at most a quarter)

    def parts(prefix: str, suffix: str, extra: list[dict]) -> tuple[list[int], list[int], list[int], list[int]]:
        r = S.InfillRequest.model_validate(fim(prefix, "y = ", suffix, extra, indent=0))
        ids, truncated = llamacpp.infill_ids(server, r)
        assert truncated and len(ids) <= budget
        pre_at, suf_at, mid_at = (ids.index(f[k]["id"]) for k in ("prefix", "suffix", "middle"))
        assert mid_at == len(ids) - 1
        return ids[:pre_at], ids[pre_at + 1:suf_at], ids[suf_at + 1:mid_at], ids

    prefix = "".join(f"x{i} = {i}\n" for i in range(80))
    suffix = "".join(f"print(x{i})\n" for i in range(80))
    typed = enc("y = ")
    extra, kept_prefix, kept_suffix, ids = parts(prefix, suffix, EXTRA)
    assert extra == [] and len(ids) == budget  # prefix and suffix fill it
    assert kept_prefix[-len(typed):] == typed
    assert enc(prefix)[-(len(kept_prefix) - len(typed)):] == kept_prefix[:-len(typed)]
    assert kept_suffix and enc(suffix)[:len(kept_suffix)] == kept_suffix
    assert len(kept_suffix) >= (budget - 3 - len(typed)) // 4  # llama.cpp's 3:1 split where both are long

    chunks = EXTRA * 8
    extra, kept_prefix, kept_suffix, _ = parts(PREFIX, SUFFIX, chunks)
    assert kept_prefix == enc(PREFIX) + typed and kept_suffix == enc(SUFFIX)
    every = [t for c in chunks for t in enc("\n\n--- snippet ---\n\n") + enc(c["text"])]
    assert extra and extra == every[len(every) - len(extra):]


def test_repository_context_layout(tiny_model, tmp_path):
    """A tokenizer with StarCoder 2's <repo_name>/<file_sep>: llama.cpp's repository-level layout, exactly."""
    m = tiny_model("mqa64")
    out = tmp_path / "repo"
    shutil.copytree(m.out_dir, out)
    assert make_tokenizer(out, fim="repo", vocab_size=320) <= 320
    engine = Engine(out, m.lib)
    server = Server(engine, "tiny")
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    r = S.InfillRequest.model_validate(fim(PREFIX, "    ", SUFFIX, EXTRA, indent=4))
    ids, truncated = llamacpp.infill_ids(server, r)
    assert not truncated
    assert ids == infill_prompt(engine, PREFIX, SUFFIX, "    ", EXTRA, vocab["<repo_name>"], vocab["<file_sep>"])


def test_n_indent_cuts_like_llama_cpp():
    cases = [("x = 1\n    y = 2\nz = 3\n", 4), ("a\n\n  \n    b\n  c", 3), ("one line only", 8),
             ("a\n\tb\n\t\tc\nd", 2), ("a\n    b\n", 1), ("    a\n\n    b\n", 4), ("a\n        \n    b", 4),
             ("\n\nx", 1)]
    for text, n in cases:
        stop = IndentStop(n)
        out, cut = "", False
        for i in range(0, len(text), 3):  # fed in pieces, as tokens arrive
            piece, cut = stop.feed(text[i:i + 3])
            out += piece
            if cut:
                break
        if not cut:
            out += stop.flush()
        assert out == cut_at_indent(text, n), (text, n)
    assert cut_at_indent("    a\n\n    b\n", 4) == "    a\n"  # the blank line, not "    b", ends it
