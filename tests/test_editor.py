"""The editor loop (issue 35): fill-in-the-middle in both orders the BigCode models were trained with (PSM and
"SPM variant 2"), the served default and its per-request field, SPM prompts fitted to a small window with a
stable start, and a llama.vim typing session whose every keystroke in SPM evaluates only the typed tokens.
The shipped FIM-trained model (tests/data/fim-tiny) completes held-out middles in both orders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gptbc.artifact.config import preset_fim_orders, preset_names
from gptbc.errors import GptbcError
from gptbc.runtime.engine import FIM_ORDERS, Engine, fit_fim, resolve_fim_order
from gptbc.serve import llamacpp
from gptbc.serve import schema as S
from gptbc.serve.core import Server
from test_llama_vim import fim, fim_reply, post
from test_presets import raw_preset
from test_server import call, live_server

sys.path.insert(0, str(Path(__file__).parent))
from hf_models import CORPUS, FIM_HELD_OUT  # noqa: E402

FIM_TINY = Path(__file__).parent / "data" / "fim-tiny"
# A short llama.vim session that fits the tiny model's 128-token window whole: lines before the cursor, the
# cursor line typed one keystroke at a time, lines after it, and one chunk of another file.
PREFIX = "def add(a, b):\n    total = a + b\n"
SUFFIX = "\n    return total\n"
EXTRA = [{"text": "def sub(a, b):\n    return a - b\n", "filename": "util.py"}]
KEYSTROKES = ["    p", "    pr", "    pri", "    prin", "    print", "    print(", "    print(t"]


def test_every_preset_names_the_fim_orders_it_was_trained_with():
    for name in preset_names():
        raw = raw_preset(name)
        orders = raw.get("_fim_orders")
        assert orders and set(orders) <= set(FIM_ORDERS), name
        assert len(raw.get("_fim_source", "")) > 40, name  # where that comes from, in words


def test_auto_order_follows_the_preset():
    both = ["psm", "spm"]
    for spec in ("santacoder", "bigcode/starcoder", "bigcode/starcoderbase-1b@main", "/models/tiny_starcoder_py",
                 "/models/gpt_bigcode-santacoder/"):
        assert preset_fim_orders(spec) == both, spec
    assert preset_fim_orders("/models/my-own-model") is None
    assert resolve_fim_order("auto", both) == "spm"
    assert resolve_fim_order("auto", ["psm"]) == "psm"
    assert resolve_fim_order("auto", None) == "psm"  # not known: the order every FIM model and llama.cpp use
    assert resolve_fim_order("psm", both) == "psm" and resolve_fim_order("spm", None) == "spm"


@pytest.mark.parametrize("name", ["mqa64", "mha32"], ids=["dash spelling", "underscore spelling"])
def test_both_orders_with_the_tokenizers_own_fim_tokens(engine_of, name):
    engine = engine_of(name)
    f, enc = engine.fim, engine.encode
    p, s, m = f["prefix"]["id"], f["suffix"]["id"], f["middle"]["id"]
    pre, suf = "def f(x):\n    ", "\n    return y\n"
    assert engine.fim_prompt(pre, suf, order="psm") == [p, *enc(pre), s, *enc(suf), m]
    assert engine.fim_prompt(pre, suf, order="spm") == [p, s, *enc(suf), m, *enc(pre)]
    assert engine.fim_prompt(pre, suf) == engine.fim_prompt(pre, suf, order="psm")  # the default stays PSM
    got = engine.complete(prefix=pre, suffix=suf, fim_order="spm", greedy=True, max_new_tokens=3, ignore_eos=True)
    assert got.prompt_tokens == len(enc(pre)) + len(enc(suf)) + 3
    with pytest.raises(GptbcError, match=r"^fim_order 'pms': must be one of psm, spm$"):
        engine.complete(prefix=pre, suffix=suf, fim_order="pms")


def test_generate_takes_the_fim_order(tiny_model, engine_of):
    """`gptbc generate --prefix --suffix --fim-order`: the ids the engine gives in that order (the two orders
    give different ids on this random model, so a swapped or ignored order shows)."""
    from test_cli import gptbc

    m, engine = tiny_model("mqa64"), engine_of("mqa64")
    want = {o: engine.generate(prefix=PREFIX, suffix=SUFFIX, fim_order=o, max_new_tokens=6) for o in FIM_ORDERS}
    assert want["psm"] != want["spm"]
    for order in FIM_ORDERS:
        run = gptbc("generate", m.out_dir, "--lib", m.lib, "--prefix", PREFIX, "--suffix", SUFFIX, "--fim-order",
                    order, "--max-new-tokens", 6, "--json")
        assert json.loads(run.stdout)["token_ids"] == want[order], order


def layouts(order: str, n_suf: int, sizes: range, room: int, block: int) -> list[list[int]]:
    """The kept prompt (suffix ids 0.., prefix ids 10000..) as a prefix grows one token per keystroke."""
    out = []
    for n_pre in sizes:
        keep_pre, keep_suf = fit_fim(n_pre, n_suf, room, room // 4, block, order)
        assert keep_pre + keep_suf <= room and keep_suf <= n_suf and keep_pre <= n_pre
        pre, suf = list(range(10000, 10000 + n_pre)), list(range(n_suf))
        kept_pre, kept_suf = pre[n_pre - keep_pre:], suf[:keep_suf]
        out.append(kept_suf + [-1] + kept_pre if order == "spm" else kept_pre + [-1] + kept_suf)
    return out


@pytest.mark.parametrize("n_suf", [30, 400], ids=["short suffix", "long suffix"])
def test_spm_fitting_only_appends_while_typing(n_suf):
    """SPM: typing one token more keeps the whole previous prompt as the new one's start, except when a whole
    block of the prefix (or, while the prefix is short, of the suffix) goes: once per block of typing."""
    block, room = 16, 200
    for start in (20, 150, 600):  # a prefix that fits beside the suffix, one that nearly does, one far too long
        kept = layouts("spm", n_suf, range(start, start + 64), room, block)
        broken = sum(a != b[:len(a)] for a, b in zip(kept, kept[1:]))
        assert broken <= 64 // block + 1, (start, broken)
        assert any(a == b[:len(a)] and len(b) == len(a) + 1 for a, b in zip(kept, kept[1:]))
    # PSM cuts the same prefix blocks but gives the suffix what is left over: its prompt's start (the prefix)
    # is as stable, and everything after the cursor moves with every keystroke anyway.
    psm = layouts("psm", 400, range(600, 664), room, block)
    assert sum(a[:a.index(-1)] != b[:a.index(-1)] for a, b in zip(psm, psm[1:])) <= 64 // block + 1


def infill(server: Server, typed: str, order: str | None, prefix: str = PREFIX, suffix: str = SUFFIX,
           extra: list[dict] = EXTRA, n_predict: int = 4) -> tuple[list[int], bool]:
    body = fim(prefix, typed, suffix, extra, indent=4, n_predict=n_predict)
    return llamacpp.infill_ids(server, S.InfillRequest.model_validate(body | {"fim_order": order} if order else body))


def test_infill_layout_in_each_order(engine_of):
    engine = engine_of("mqa64")
    f, enc = engine.fim, engine.encode
    p, s, m = f["prefix"]["id"], f["suffix"]["id"], f["middle"]["id"]
    extra = [t for c in EXTRA for t in enc(llamacpp.SNIPPET_SEPARATOR) + enc(c["text"])]
    pre, typed, suf = enc(PREFIX), enc("    x"), enc(SUFFIX)
    assert infill(Server(engine, "tiny"), "    x", "spm") == (extra + [p, s, *suf, m, *pre, *typed], False)
    assert infill(Server(engine, "tiny"), "    x", "psm") == (extra + [p, *pre, *typed, s, *suf, m], False)
    assert infill(Server(engine, "tiny", fim_order="spm"), "    x", None)[0][len(extra) + 1] == s
    assert infill(Server(engine, "tiny", fim_order="auto"), "    x", None)[0][len(extra) + 1] != s


def test_spm_infill_on_a_small_window_keeps_its_start_while_typing(engine_of):
    """A prompt far too long for the window: every keystroke's SPM prompt is the last one's plus the typed
    tokens, except once where a whole block of the prefix goes (fewer than a block of tokens is typed here).
    The repository context before it gets only what a whole prefix leaves, here nothing."""
    engine = engine_of("mqa64")
    server = Server(engine, "tiny")
    prefix = "".join(f"x{i} = {i}\n" for i in range(80))
    suffix = "".join(f"print(x{i})\n" for i in range(80))
    prompts = []
    for typed in ["y = ", "y = x1", "y = x1 + x", "y = x1 + x2 * 3"]:
        ids, truncated = infill(server, typed, "spm", prefix, suffix, EXTRA * 8, n_predict=128)
        assert truncated and len(ids) <= 128 - 128 // 4
        typed_ids = engine.encode(typed)
        assert ids[-len(typed_ids):] == typed_ids
        prompts.append(ids[:-len(typed_ids)])
    assert len(engine.encode("y = x1 + x2 * 3")) - len(engine.encode("y = ")) < engine.fit_block
    assert prompts[0] == prompts[1]
    assert sum(a != b for a, b in zip(prompts, prompts[1:])) <= 1


def typing_session(base: str, engine: Engine, order: str) -> list[dict]:
    """llama.vim's requests of KEYSTROKES against a live server: its ring-buffer warm-up of EXTRA, then one
    /infill per keystroke; each reply with the prompt it answered and where the typed text starts in it."""
    server = Server(engine, "tiny")
    status, raw = post(base, "/infill", {"input_prefix": "", "input_suffix": "", "input_extra": EXTRA,
                                         "prompt": "", "n_predict": 0, "fim_order": order, "response_fields": [""]})
    assert status == 200, raw
    session = []
    for typed in KEYSTROKES:
        status, raw = post(base, "/infill", fim(PREFIX, typed, SUFFIX, EXTRA, indent=4, n_predict=4)
                           | {"fim_order": order, "response_fields": []})
        reply = fim_reply(raw)
        assert status == 200 and reply is not None, raw
        ids, truncated = infill(server, typed, order)
        assert not truncated and reply["tokens_evaluated"] == len(ids)
        n_typed = len(engine.encode(typed))
        typed_at = len(ids) - n_typed if order == "spm" else ids.index(engine.fim["suffix"]["id"]) - n_typed
        session.append(reply | {"ids": ids, "typed_at": typed_at, "typed": engine.encode(typed)})
    return session


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_typing_session_reuses_the_cached_prompt(tiny_model):
    """Every keystroke reuses every token before the typed text, in both orders. In SPM that is the whole
    prompt but the typed tokens that changed; PSM evaluates the suffix and <fim-middle> again each time."""
    m = tiny_model("mqa64")
    evaluated = {}
    for order in FIM_ORDERS:
        engine = Engine(m.out_dir, m.lib)
        with live_server(engine) as (base, _):
            session = typing_session(base, engine, order)
            status, _, raw = call(base, "GET", "/v1/models")
            assert status == 200 and raw["data"][0]["fim"] == {"served": "psm", "trained": None}
        first = session[0]
        # The warm-up cached the repository context and <fim-prefix> (and <fim-suffix>, in SPM).
        assert first["tokens_cached"] >= first["ids"].index(engine.fim["prefix"]["id"]) + 1 + (order == "spm")
        for last, now in zip(session, session[1:]):
            before_typed = now["typed_at"] + common(last["typed"], now["typed"])
            assert now["tokens_cached"] >= min(before_typed, len(now["ids"]) - 1), (order, now)
            assert now["timings"]["prompt_n"] == len(now["ids"]) - now["tokens_cached"]
        evaluated[order] = [now["timings"]["prompt_n"] for now in session[1:]]
    n_after = len(session[0]["ids"]) - session[0]["typed_at"] - len(session[0]["typed"])  # suffix + <fim-middle>
    for last, now, spm, psm in zip(session, session[1:], evaluated["spm"], evaluated["psm"]):
        changed = len(now["typed"]) - common(last["typed"], now["typed"])
        assert spm <= max(changed, 1)
        assert psm >= changed + n_after
    print(f"tokens evaluated per keystroke: spm {evaluated['spm']}, psm {evaluated['psm']}")


def test_bad_fim_order_is_a_one_line_400(tiny_model):
    m = tiny_model("mqa64")
    engine = Engine(m.out_dir, m.lib)
    with live_server(engine, fim_order="spm") as (base, server):
        status, _, body = call(base, "GET", "/v1/models")
        assert body["data"][0]["fim"] == {"served": "spm", "trained": None}
        for path, req in [("/infill", fim(PREFIX, "x", SUFFIX, [], indent=0)),
                          ("/v1/completions", {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 2})]:
            status, raw = post(base, path, req | {"fim_order": "middle-first"})
            err = json.loads(raw)["error"]
            assert status == 400 and "fim_order" in err["message"] and "\n" not in err["message"], raw
        body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        want = Engine(m.out_dir, m.lib, prefix_cache_size=0)
        for order in FIM_ORDERS:
            status, _, reply = call(base, "POST", "/v1/completions", body | {"fim_order": order})
            ids = want.generate(prefix=PREFIX, suffix=SUFFIX, fim_order=order, max_new_tokens=3, ignore_eos=True)
            assert status == 200 and reply["choices"][0]["text"] == want.decode_text(ids), order
            assert reply["usage"]["prompt_tokens"] == len(want.fim_prompt(PREFIX, SUFFIX, order=order))
            status, _, reply = call(base, "POST", "/v1/fim/completions", body | {"fim_order": order})
            assert status == 200 and reply["choices"][0]["message"]["content"] == want.decode_text(ids), order


@pytest.fixture(scope="module")
def fim_engine(tmp_path_factory) -> Engine:
    """The shipped FIM-trained tiny model (both orders), converted and compiled (q0f32)."""
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.compile.compiler import compile_model

    root = tmp_path_factory.mktemp("fim-tiny")
    out = convert_weight(FIM_TINY, "q0f32", root / "out", progress=False)
    lib = compile_model(resolve_model(str(out)), "cpu", "q0f32", root / "lib.so", log=lambda _m: None)
    return Engine(out, lib, prefix_cache_size=0)


def test_fim_model_completes_held_out_middles_in_both_orders(fim_engine):
    """Middles the model never saw at those places (hf_models.FIM_HELD_OUT), greedy, to its end-of-text."""
    for doc, start, end in FIM_HELD_OUT:
        text = CORPUS[doc]
        prefix, middle, suffix = text[:start], text[start:end], text[end:]
        got = {order: fim_engine.complete(prefix=prefix, suffix=suffix, fim_order=order, greedy=True,
                                          max_new_tokens=len(fim_engine.encode(middle)) + 4).text
               for order in FIM_ORDERS}
        assert got == {"psm": middle, "spm": middle}, (doc, start, end)
