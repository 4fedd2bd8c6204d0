"""Prompt-lookup speculative decoding: drafts, the accept/reject rule, and output identical to plain decoding
(fake runner: every path in milliseconds; the compiled tiny models: the real verify + KV pop)."""

from __future__ import annotations

import numpy as np
import pytest

from gptbc.runtime.sampling import SamplingParams
from gptbc.runtime.speculation import PromptLookup, accept
from distribution import assert_follows
from test_scheduler import VOCAB, greedy, make, reference


def periodic(history: list[int]) -> np.ndarray:
    """A fake model that repeats the sequence with period 5 (so prompt lookup drafts are right), except that
    every 7th position it says something new (so some drafts are rejected)."""
    row = np.zeros(VOCAB, np.float32)
    n = len(history)
    row[history[n - 5] if n >= 5 and n % 7 else 1 + n * 13 % (VOCAB - 1)] = 10.0
    return row


def periodic_reference(prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        t = int(np.argmax(periodic(seq)))
        out.append(t)
        seq.append(t)
    return out


def test_draft_takes_what_followed_the_latest_longest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=1, num_draft=4)
    assert lookup.draft([1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 1, 2, 3], 10) == [7, 7, 1, 2]  # the latest match wins
    assert lookup.draft([5, 6, 1, 2, 8, 2], 10) == [8, 2]  # no 3- or 2-gram match: the 1-gram "2"
    assert lookup.draft([1, 2, 3, 4], 10) == []
    assert lookup.draft([4, 5, 6, 4, 5], 1) == [6]  # limited by the room left
    assert lookup.draft([4, 5, 6, 4, 5], 0) == []
    with pytest.raises(ValueError):
        PromptLookup(min_ngram=0)


def test_accept_rule_keeps_the_output_distribution():
    rng = np.random.default_rng(0)
    probs = np.array([0.1, 0.5, 0.0, 0.3, 0.1])
    for drafted in (1, 2, 4):  # a likely, an impossible and an unlikely draft
        counts = np.zeros(5)
        kept = 0
        for _ in range(20000):
            token, ok = accept(probs, drafted, rng)
            counts[token] += 1
            kept += ok
        assert_follows(counts, probs)  # accepted or resampled, the token follows probs (distribution.py)
        assert_follows([kept, 20000 - kept], [probs[drafted], 1 - probs[drafted]])  # kept as often as drawn


@pytest.mark.parametrize("num_draft", [1, 3, 8])
def test_greedy_output_identical_and_drafts_accepted(num_draft):
    prompt = [3, 1, 4, 1, 5, 3, 1, 4, 1, 5, 3, 1]
    plain, _ = make(model=periodic)
    spec, runner = make(model=periodic, speculation=PromptLookup(num_draft=num_draft), prefill_chunk_size=16)
    a, b = plain.submit(prompt, greedy(40)), spec.submit(prompt, greedy(40))
    plain.run_until_done([a])
    spec.run_until_done([b])
    assert b.output_ids == a.output_ids == periodic_reference(prompt, 40)
    stats = spec.stats
    assert stats.accepted_tokens > 0 and stats.accepted_tokens < stats.drafted_tokens  # some kept, some rejected
    assert stats.decode_steps < plain.stats.decode_steps  # fewer steps for the same tokens
    assert any(c[0] == "verify_batch" for c in runner.calls) and runner.seqs == {}


def test_kv_cache_holds_exactly_the_accepted_tokens():
    """After every step the fake KV holds prompt + outputs but the newest, as after plain decoding."""
    spec, runner = make(model=periodic, speculation=PromptLookup(num_draft=6), prefill_chunk_size=16,
                        prefix_cache_size=1)
    req = spec.submit([2, 7, 1, 8, 2, 2, 7, 1, 8, 2], greedy(30))
    while req.finish_reason is None:
        spec.step()
        if req.output_ids and req.finish_reason is None:
            assert runner.seqs[req.seq_id] == req.prompt_ids + req.output_ids[:-1]
    assert runner.seqs[req.seq_id] == req.prompt_ids + req.output_ids[:-1]  # kept as a prefix: consistent


def test_stops_inside_a_draft_and_max_new_tokens():
    prompt = [3, 1, 4, 1, 5, 3, 1, 4, 1, 5]
    ref = periodic_reference(prompt, 30)
    spec, runner = make(model=periodic, speculation=PromptLookup(num_draft=8), prefill_chunk_size=16)
    req = spec.submit(prompt, greedy(30, stop_token_ids=[ref[11]]))
    spec.run_until_done([req])
    assert req.output_ids == ref[:ref.index(ref[11]) + 1] and req.finish_reason == "stop"
    req = spec.submit(prompt, greedy(7))
    spec.run_until_done([req])
    assert req.output_ids == ref[:7] and req.finish_reason == "length" and runner.seqs == {}


def test_sampling_with_drafts_is_reproducible_and_mixed_batches_work():
    prompt = [3, 1, 4, 1, 5, 3, 1, 4, 1, 5]
    sampled = SamplingParams(max_new_tokens=20, temperature=0.7, seed=5)
    runs = []
    for _ in range(2):
        spec, _ = make(model=periodic, speculation=PromptLookup(), prefill_chunk_size=32)
        reqs = [spec.submit(prompt, sampled), spec.submit(prompt[:6], greedy(20)),
                spec.submit(prompt, greedy(20, repetition_penalty=1.3))]  # penalties: decoded plainly
        spec.run_until_done(reqs)
        runs.append([r.output_ids for r in reqs])
    assert runs[0] == runs[1]
    assert runs[0][1] == periodic_reference(prompt[:6], 20)


def test_backoff_after_rejected_drafts():
    """A model that never repeats: drafts fail, and drafting backs off instead of verifying every step."""
    spec, runner = make(speculation=PromptLookup(num_draft=4, max_backoff=8), prefill_chunk_size=16)
    prompt = [1, 2, 1, 2, 1, 2]
    req = spec.submit(prompt, greedy(40))
    spec.run_until_done([req])
    assert req.output_ids == reference(prompt, 40)
    verifies = sum(1 for c in runner.calls if c[0] == "verify_batch")
    assert 0 < verifies < 12


# ---- the compiled tiny models ----

TRAINED_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


@pytest.fixture(scope="module")
def trained_engines(trained_tiny):
    """The shipped trained model (it learned tests/hf_models.CORPUS, so its greedy text repeats the code in
    its prompt), with and without prompt lookup; prefill chunks of 16 put drafts across page boundaries."""
    from gptbc.runtime.engine import Engine

    out, lib = trained_tiny.out_dir, trained_tiny.lib
    return Engine(out, lib, prefix_cache_size=0), {
        n: Engine(out, lib, prefix_cache_size=0, speculation=PromptLookup(num_draft=n)) for n in (2, 5)}


@pytest.mark.parametrize("num_draft", [2, 5])
def test_compiled_model_same_greedy_tokens_with_prompt_lookup(trained_engines, num_draft):
    plain, spec = trained_engines[0], trained_engines[1][num_draft]
    prompts = [plain.encode(TRAINED_TEXT * 2)[:n] for n in (15, 16, 17, 31)]  # across 16-token pages
    for prompt in prompts:
        assert spec.generate(prompt, 24) == plain.generate(prompt, 24)
    stats = spec.scheduler.stats
    assert stats.accepted_tokens > 0 and stats.tokens_per_step() > 1.0
    assert spec.runner.sequence_count() == 0


def test_int8_activation_model_same_greedy_tokens_with_prompt_lookup(tmp_path):
    """Verification rows go through the same integer kernel as decode rows (each row computed alike in a tile
    of 4 rows or alone), so drafting changes no token with int8 activations either."""
    import shutil
    from pathlib import Path

    from gptbc.compile.compiler import compile_model
    from gptbc.artifact.config import resolve_model
    from gptbc.runtime.engine import Engine
    from gptbc.artifact.convert import convert_weight

    shutil.copytree(Path(__file__).parent / "data" / "trained-tiny", tmp_path / "hf")
    out = convert_weight(tmp_path / "hf", "q4f32_1", tmp_path / "out", progress=False)
    lib = compile_model(resolve_model(str(out), prefill_chunk_size=32), "cpu", "q4f32_1", tmp_path / "lib.so",
                        log=lambda _m: None, activations="int8")
    plain = Engine(out, lib, prefix_cache_size=0)
    spec = Engine(out, lib, prefix_cache_size=0, speculation=PromptLookup(num_draft=5))
    for prompt in [plain.encode(TRAINED_TEXT * 2)[:n] for n in (15, 17, 31)]:
        assert spec.generate(prompt, 24) == plain.generate(prompt, 24)
    assert spec.scheduler.stats.accepted_tokens > 0


def test_compiled_model_request_joining_mid_batch(trained_engines):
    plain, spec = trained_engines[0], trained_engines[1][5]
    a_ids, b_ids = plain.encode(TRAINED_TEXT)[:20], plain.encode(TRAINED_TEXT)[5:12]
    want = [plain.generate(a_ids, 30), plain.generate(b_ids, 12)]
    params = spec.sampling(max_new_tokens=30)
    a = spec.submit(a_ids, params=params)
    for _ in range(3):
        spec.step()
    b = spec.submit(b_ids, params=spec.sampling(max_new_tokens=12))
    spec.scheduler.run_until_done([a, b])
    assert [a.output_ids, b.output_ids] == want


def test_generate_flag(trained_engines):
    import json
    import subprocess

    plain = trained_engines[0]
    ids = ",".join(map(str, plain.encode(TRAINED_TEXT)[:20]))
    run = [subprocess.run(["gptbc", "generate", str(plain.model_dir), "--lib", str(plain.lib), "--prompt-ids", ids,
                           "--max-new-tokens", "20", "--json", *flag], capture_output=True, text=True, check=True)
           for flag in ((), ("--prompt-lookup", "4"))]
    assert json.loads(run[0].stdout)["token_ids"] == json.loads(run[1].stdout)["token_ids"]


def test_a_failing_drafted_request_ends_alone():
    """Sampling on broken logits inside a verified draft fails that request only; the other keeps its tokens."""
    def model(history: list[int]) -> np.ndarray:
        row = periodic(history)
        if history[0] == 9 and len(history) > 12:
            row[:] = np.nan
        return row

    prompt = [3, 1, 4, 1, 5, 3, 1, 4, 1, 5]
    spec, runner = make(model=model, speculation=PromptLookup(num_draft=4), prefill_chunk_size=32)
    bad = spec.submit([9, *prompt], SamplingParams(max_new_tokens=20, temperature=0.5, seed=1))
    good = spec.submit(prompt, greedy(20))
    spec.run_until_done([bad, good])
    assert bad.finish_reason == "error" and good.output_ids == periodic_reference(prompt, 20)
    assert runner.seqs == {}


def test_server_with_prompt_lookup_streams_the_plain_tokens_and_reports_drafts(trained_engines):
    """The server's engine with drafts on: a streamed completion (several tokens may arrive per engine step)
    equals plain greedy decoding, and /metrics counts the drafts."""
    import json
    import urllib.request

    from test_server import live_server

    plain, spec = trained_engines[0], trained_engines[1][5]
    ids = plain.encode(TRAINED_TEXT)[:20]
    want = plain.generate(ids, 24)
    with live_server(spec) as (base, _server):
        body = json.dumps({"prompt": ids, "max_tokens": 24, "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            chunks = [json.loads(line[6:]) for line in resp.read().decode().splitlines()
                      if line.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        metrics = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    assert text == plain.decode_text(want)
    drafted = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("gptbc_draft_tokens_total")]
    assert drafted and drafted[0] > 0 and "gptbc_tokens_per_decode_step" in metrics


def test_drafting_stops_where_verifying_costs_more_than_it_wins():
    """A verify call that costs as much as 8 decode steps (CPU kernels whose cost grows with rows): after the
    first verifies show it, drafting pauses and is probed again only every 32 steps; output unchanged."""
    prompt = [3, 1, 4, 1, 5, 3, 1, 4, 1, 5]
    cheap, cheap_runner = make(model=periodic, speculation=PromptLookup(num_draft=4), prefill_chunk_size=16)
    dear, dear_runner = make(model=periodic, speculation=PromptLookup(num_draft=4), prefill_chunk_size=16,
                             verify_cost=8.0)
    a, b = cheap.submit(prompt, greedy(120)), dear.submit(prompt, greedy(120))
    cheap.run_until_done([a])
    dear.run_until_done([b])
    assert a.output_ids == b.output_ids == periodic_reference(prompt, 120)
    verifies = lambda r: sum(1 for c in r.calls if c[0] == "verify_batch")  # noqa: E731
    assert verifies(cheap_runner) > 20 and verifies(dear_runner) <= 6
    assert not dear.costs.pays() and cheap.costs.pays()
