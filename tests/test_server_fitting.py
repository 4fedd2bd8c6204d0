"""The server as an editor uses it on a small window (issue 36): a prompt too long for the window is cut at its
start in whole blocks, so that the next keystroke's request keeps the same start and the prefix cache serves
it; every request leaves one line on the log (method, path, status, tokens, time). The chat default of
max_tokens (until the end of text or the window) is checked in test_llama_vim.py's instruct-mode test."""

from __future__ import annotations

import logging
import re

import pytest

from gptbc.runtime.engine import Engine
from gptbc.serve import llamacpp
from gptbc.serve import schema as S
from gptbc.serve.core import Server
from test_llama_vim import EXTRA, fim, fim_reply, post
from test_server import call, live_server

PREFIX = "".join(f"x{i} = {i}\n" for i in range(80))  # far more than the 128-token window holds
SUFFIX = "".join(f"print(x{i})\n" for i in range(80))
TYPED = ["y = ", "y = x1", "y = x1 + x", "y = x1 + x2 * 3"]  # one keystroke's request after another


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    m = tiny_model("mqa64")  # a 128-token window
    return Engine(m.out_dir, m.lib)


def kept_start(server: Server, typed: str, extra: list[dict], suffix: str = SUFFIX) -> list[int]:
    """The ids of an infill request up to the end of its kept prefix (before the typed text)."""
    r = S.InfillRequest.model_validate(fim(PREFIX, typed, suffix, extra, indent=0))
    ids, truncated = llamacpp.infill_ids(server, r)
    assert truncated
    typed_ids = server.engine.encode(typed)
    suffix_at = ids.index(server.engine.fim["suffix"]["id"])
    assert ids[suffix_at - len(typed_ids):suffix_at] == typed_ids
    return ids[:suffix_at - len(typed_ids)]


@pytest.mark.parametrize("extra, suffix", [([], SUFFIX), (EXTRA * 8, SUFFIX), (EXTRA * 8, "print(x0)\n")],
                         ids=["prefix cut", "context cut", "context cut, short suffix"])
def test_infill_keeps_its_start_while_typing(engine, extra, suffix):
    """Successive requests that only add typed text start with the same tokens, except where a whole block
    goes (at most once here: the typed text grows by fewer tokens than a block). With a short suffix the
    prefix's block cut leaves room over, which moves with every typed token: the repository context must not
    fill it (its start would then move with every keystroke; santacoder's PSM replay reused nothing)."""
    server = Server(engine, "tiny")
    starts = [kept_start(server, typed, extra, suffix) for typed in TYPED]
    assert len(engine.encode(TYPED[-1])) - len(engine.encode(TYPED[0])) < engine.fit_block
    changed = sum(a != b[:len(a)] for a, b in zip(starts, starts[1:]))  # b may be longer: it lost no block
    assert changed <= 1
    assert starts[0] == starts[1], "the first keystroke after a request must keep its start"


def test_next_keystroke_is_served_from_the_prefix_cache(engine, tiny_model):
    """End to end: the second request's kept start (context and prefix, hundreds of tokens on a real window)
    is reused from the first's, not evaluated again."""
    m = tiny_model("mqa64")
    server = Server(engine, "tiny")
    start = kept_start(server, TYPED[1], [])
    with live_server(Engine(m.out_dir, m.lib)) as (base, _):
        replies = []
        for typed in TYPED[:2]:
            status, raw = post(base, "/infill", fim(PREFIX, typed, SUFFIX, [], indent=0, n_predict=4)
                               | {"response_fields": []})
            assert status == 200, raw
            replies.append(fim_reply(raw))
    assert replies[1]["truncated"] is True
    assert replies[1]["tokens_cached"] >= len(start) >= 2 * engine.fit_block


def test_truncated_prompt_keeps_its_start(engine):
    """--truncate-prompt (Engine.fit_prompt): the same rule for any prompt."""
    ids = [1 + i % 300 for i in range(200)]
    params = engine.sampling(max_new_tokens=16, truncate_prompt=True)
    room = engine.context_window_size - 16
    kept = [engine.fit_prompt(ids + [5] * extra, params) for extra in range(3)]
    assert all(len(k) <= room for k in kept)
    assert len(kept[0]) > room - engine.fit_block
    assert kept[0][:len(kept[0])] == kept[1][:len(kept[0])] == kept[2][:len(kept[0])]


LINE = re.compile(r"^(\S+) (\S+) (\d{3}) prompt_tokens=(\d+) generated_tokens=(\d+) time_ms=(\d+)$")


def test_each_request_logs_one_line(engine, tiny_model, caplog):
    m = tiny_model("mqa64")
    caplog.set_level(logging.INFO, logger="gptbc.serve.access")
    prompt_tokens = len(engine.encode("def f(x):"))
    with live_server(Engine(m.out_dir, m.lib)) as (base, _):
        body = {"prompt": "def f(x):", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        assert call(base, "POST", "/v1/completions", body)[0] == 200
        assert call(base, "POST", "/v1/completions", body | {"stream": True, "max_tokens": 7})[0] == 200
        assert call(base, "POST", "/v1/completions", body | {"max_tokens": -3})[0] == 400
        assert call(base, "GET", "/health")[0] == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "gptbc.serve.access"]
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    got = sorted((p[1], p[2], int(p[3]), int(p[4]), int(p[5])) for p in parsed)  # logged as each ends
    assert got == sorted([("POST", "/v1/completions", 200, prompt_tokens, 5),
                          ("POST", "/v1/completions", 200, prompt_tokens, 7),
                          ("POST", "/v1/completions", 400, 0, 0), ("GET", "/health", 200, 0, 0)])
