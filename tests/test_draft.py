"""Draft-model speculative decoding: batched drafting, verification, rollback of both KV caches, the rejection rule
with the draft's probabilities, k from costs and acceptance, the choice against prompt lookup, and refusals
(fake runners: milliseconds; the compiled trained pair at the end: the real verify + both KV caches)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gptbc.errors import GptbcError
from gptbc.runtime.draft import DraftModel, check_same_vocabulary
from gptbc.runtime.sampling import SamplingParams
from gptbc.runtime.scheduler import Scheduler
from gptbc.runtime.speculation import PromptLookup, accept_draft, best_k, expected_tokens, per_token_acceptance
from distribution import assert_follows
from test_scheduler import EOS, VOCAB, FakeRunner, greedy
from test_speculation import periodic, periodic_reference

DATA = Path(__file__).parent / "data"


def sloppy(history: list[int]) -> np.ndarray:
    """A draft that agrees with `periodic` except at every 4th position (and wherever periodic says something
    new), so that some drafts are kept and some rejected."""
    n = len(history)
    if n % 4 == 0:
        row = np.zeros(VOCAB, np.float32)
        row[1 + n * 17 % (VOCAB - 1)] = 10.0
        return row
    return periodic(history)


def make(target=periodic, draft=sloppy, max_draft: int = 4, speculation=None, prefill_chunk_size: int = 32,
         max_batch_size: int = 4, verify_cost: float = 1.5, draft_cost: float = 0.1, prefix_cache_size: int = 0,
         min_draft: int = 1):
    """A scheduler over a fake target and a fake draft runner sharing one fake clock (a decode call costs 1, a
    target verify `verify_cost`, any draft-model call `draft_cost`)."""
    t = FakeRunner(prefill_chunk_size, max_batch_size, model=target, verify_cost=verify_cost)
    d = FakeRunner(prefill_chunk_size, max_batch_size, model=draft)
    d.verify_cost = draft_cost

    def draft_call(original):
        def timed(*args):
            t.time += draft_cost
            return original(*args)
        return timed

    for name in ("decode", "decode_batch", "prefill_chunk", "prefill_batch"):
        setattr(d, name, draft_call(getattr(d, name)))
    s = Scheduler(t, 512, VOCAB, {EOS}, None, prefix_cache_size, speculation, clock=lambda: t.time,
                  draft=DraftModel(d, max_draft, min_draft))
    return s, t, d


PROMPTS = [[3, 1, 4, 1, 5, 3, 1, 4, 1, 5, 3, 1], [2, 7, 1, 8, 2, 8], [9, 9, 8, 7, 6, 5, 4, 3, 2]]


def test_greedy_output_identical_with_a_draft_model():
    s, target, draft = make()
    reqs = [s.submit(p, greedy(40)) for p in PROMPTS]
    s.run_until_done(reqs)
    assert [r.output_ids for r in reqs] == [periodic_reference(p, 40) for p in PROMPTS]
    st = s.stats
    assert 0 < st.model_accepted_tokens < st.model_drafted_tokens  # some kept, some rejected
    assert st.tokens_per_verify() > 1.5
    assert target.seqs == {} and draft.seqs == {} and s.draft.seqs == {}  # both caches freed


def test_every_running_request_drafts_in_one_batched_call_per_position():
    s, target, draft = make(max_draft=3)
    reqs = [s.submit(p, greedy(30)) for p in PROMPTS]
    s.run_until_done(reqs)
    batched = [c for c in draft.calls if c[0] == "decode_batch"]
    assert ("decode_batch", 3) in batched  # the three requests' drafted tokens fed together
    verifies = [c for c in target.calls if c[0] == "verify_batch"]
    assert any(len(c[1]) == 3 for c in verifies)  # and verified in one target call


def test_both_kv_caches_hold_exactly_the_accepted_tokens():
    """After every step the target's KV holds prompt + outputs but the newest (as in plain decoding) and the
    draft's a prefix of prompt + outputs: rejected drafts are popped from both."""
    s, target, draft = make(max_draft=5)
    reqs = [s.submit(p, greedy(35)) for p in PROMPTS[:2]]
    while any(r.finish_reason is None for r in reqs):
        s.step()
        for r in reqs:
            if r.output_ids and r.finish_reason is None:
                tokens = r.prompt_ids + r.output_ids
                assert target.seqs[r.seq_id] == tokens[:-1]
                if r.id in s.draft.seqs:
                    held = draft.seqs[s.draft.seqs[r.id]]
                    assert held == tokens[:len(held)] and len(held) == s.draft.held[r.id]
    assert draft.seqs == {}


def test_stop_inside_a_draft_and_max_new_tokens():
    prompt = PROMPTS[0]
    ref = periodic_reference(prompt, 30)
    s, target, draft = make(max_draft=6)
    req = s.submit(prompt, greedy(30, stop_token_ids=[ref[11]]))
    s.run_until_done([req])
    assert req.output_ids == ref[:ref.index(ref[11]) + 1] and req.finish_reason == "stop"
    req = s.submit(prompt, greedy(7))
    s.run_until_done([req])
    assert req.output_ids == ref[:7] and target.seqs == {} and draft.seqs == {}


def test_cancel_frees_the_draft_sequence():
    s, target, draft = make()
    req = s.submit(PROMPTS[0], greedy(30))
    for _ in range(4):
        s.step()
    assert draft.seqs
    s.cancel(req)
    assert target.seqs == {} and draft.seqs == {}


# ---- sampling: the rejection rule with the draft's probabilities ----

def test_accept_draft_rule_gives_the_target_distribution():
    rng = np.random.default_rng(0)
    p = np.array([0.1, 0.5, 0.0, 0.3, 0.1])
    q = np.array([0.4, 0.1, 0.3, 0.1, 0.1])  # mass where p has none (token 2), too little where p has much
    counts, kept = np.zeros(5), 0
    for _ in range(30000):
        drafted = int(rng.choice(5, p=q))
        token, ok = accept_draft(p, q, drafted, rng)
        counts[token] += 1
        kept += ok
    assert_follows(counts, p)
    rate = float(np.minimum(p, q).sum())  # the rule keeps a draft with probability sum(min(p, q))
    assert_follows([kept, 30000 - kept], [rate, 1 - rate])


P_TARGET = np.array([0.1, 0.4, 0.2, 0.3, 0.0])  # over tokens 1..5 (0 is eos)
Q_DRAFT = np.array([0.4, 0.1, 0.3, 0.1, 0.1])


def fixed(probs: np.ndarray):
    def model(_history: list[int]) -> np.ndarray:
        row = np.full(VOCAB, -1e9, np.float32)
        with np.errstate(divide="ignore"):
            row[1:1 + probs.size] = np.log(probs)
        return np.maximum(row, -1e9)
    return model


def test_sampled_output_follows_the_target_distribution():
    """A seeded sampler on five tokens: the target draws every token from P_TARGET, the draft from Q_DRAFT; every
    output position (drafted and verified, or the target's own) must follow P_TARGET."""
    s, _, _ = make(target=fixed(P_TARGET), draft=fixed(Q_DRAFT), max_draft=3, max_batch_size=16)
    reqs = [s.submit([1, 2], SamplingParams(max_new_tokens=4, temperature=1.0, seed=i)) for i in range(4000)]
    s.run_until_done(reqs)
    assert s.stats.model_drafted_tokens > 4000 and 0 < s.stats.model_accepted_tokens < s.stats.model_drafted_tokens
    outputs = np.array([r.output_ids for r in reqs])
    for position in range(4):
        assert_follows(np.bincount(outputs[:, position] - 1, minlength=5), P_TARGET)
    # one drafted token a verify: it is kept with probability sum(min(p, q)), the standard rule's rate (a rule that
    # ignores q, keeping d with probability p(d), also gives p, but keeps fewer: sum(p q))
    s, _, _ = make(target=fixed(P_TARGET), draft=fixed(Q_DRAFT), max_draft=1, max_batch_size=16, verify_cost=0.5)
    reqs = [s.submit([1, 2], SamplingParams(max_new_tokens=3, temperature=1.0, seed=i)) for i in range(3000)]
    s.run_until_done(reqs)
    drafted, kept = s.stats.model_drafted_tokens, s.stats.model_accepted_tokens
    rate = float(np.minimum(P_TARGET, Q_DRAFT).sum())
    assert drafted > 2000
    assert_follows([kept, drafted - kept], [rate, 1 - rate])


# ---- k from measured costs and acceptance; the draft model against prompt lookup ----

def test_best_k_follows_acceptance_and_costs():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12
    assert best_k(0.9, 0.02, 1.0, 8)[0] == 8  # cheap, good draft: as many as allowed
    assert best_k(0.9, 0.02, 1.0, 3)[0] == 3
    assert best_k(0.3, 0.02, 1.0, 8)[0] < best_k(0.8, 0.02, 1.0, 8)[0]  # worse acceptance: fewer tokens
    assert best_k(0.8, 0.5, 1.0, 8)[0] < best_k(0.8, 0.05, 1.0, 8)[0]  # dearer draft: fewer tokens
    k, gain = best_k(0.7, 0.05, 1.0, 8)
    assert gain == max(expected_tokens(0.7, j) / (j * 0.05 + 1.0) for j in range(1, 9))
    assert per_token_acceptance(4, 0) == 0.0 and per_token_acceptance(4, 2) == 2 / 3
    assert 0.85 < per_token_acceptance(4, 4) < 1.0


def test_k_shrinks_for_a_draft_that_is_always_wrong_and_drafting_stops():
    """A draft that never agrees: its acceptance falls, k falls to 1, and the cost gate stops drafting (the draft's
    calls and the verifies cost more than they win); output unchanged."""
    def wrong(history):
        row = np.zeros(VOCAB, np.float32)
        row[(int(np.argmax(periodic(history))) + 1) % VOCAB] = 10.0
        return row

    s, target, draft = make(draft=wrong, max_draft=6)
    req = s.submit(PROMPTS[0], greedy(120))
    s.run_until_done([req])
    assert req.output_ids == periodic_reference(PROMPTS[0], 120)
    sizes = [sum(c[1]) for c in target.calls if c[0] == "verify_batch"]
    assert sizes[0] > 2 and sizes[-1] == 2  # k from the prior, then 1
    assert len(sizes) <= 12 and not s.costs.pays()


def test_good_cheap_draft_drafts_many_tokens():
    s, target, _ = make(draft=periodic, max_draft=6)  # the draft is the target: every token accepted
    req = s.submit(PROMPTS[1], greedy(60))
    s.run_until_done([req])
    assert req.output_ids == periodic_reference(PROMPTS[1], 60)
    sizes = [sum(c[1]) for c in target.calls if c[0] == "verify_batch"]
    assert max(sizes) == 7 and s.stats.tokens_per_verify() > 4


def test_prompt_lookup_or_the_draft_model_per_step():
    """With both on, each request takes the source with more expected tokens per cost: a repeating prompt with a
    useless draft model goes to prompt lookup, a non-repeating one with a perfect draft to the model."""
    def useless(history):
        row = np.zeros(VOCAB, np.float32)
        row[(int(np.argmax(periodic(history))) + 1) % VOCAB] = 10.0
        return row

    s, _, _ = make(draft=useless, speculation=PromptLookup(num_draft=4), verify_cost=0.5)  # a verify that pays
    req = s.submit(PROMPTS[0], greedy(60))
    s.run_until_done([req])
    assert req.output_ids == periodic_reference(PROMPTS[0], 60)
    lookup = s.stats.drafted_tokens - s.stats.model_drafted_tokens
    assert lookup > 3 * s.stats.model_drafted_tokens

    from test_scheduler import logits_for, reference

    s, _, _ = make(target=logits_for, draft=logits_for, speculation=PromptLookup(num_draft=4), verify_cost=0.5)
    req = s.submit([1, 2, 1, 2, 1, 2], greedy(60))
    s.run_until_done([req])
    assert req.output_ids == reference([1, 2, 1, 2, 1, 2], 60)
    assert s.stats.model_accepted_tokens > 3 * (s.stats.accepted_tokens - s.stats.model_accepted_tokens)


# ---- refusals ----

def tokenizer_dir(tmp_path: Path, name: str, vocab: dict[str, int]) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    return d


def test_vocabularies_must_match(tmp_path):
    a = tokenizer_dir(tmp_path, "target", {"a": 0, "b": 1, "c": 2})
    b = tokenizer_dir(tmp_path, "draft", {"a": 0, "x": 1, "c": 2})
    check_same_vocabulary(a, 3, tokenizer_dir(tmp_path, "same", {"a": 0, "b": 1, "c": 2}), 3)
    with pytest.raises(GptbcError, match=r"token 1 is 'x' there but 'b' in the target") as err:
        check_same_vocabulary(a, 3, b, 3)
    assert "\n" not in str(err.value)
    with pytest.raises(GptbcError, match="vocabulary of 4 tokens, the target .* has 3"):
        check_same_vocabulary(a, 3, b, 4)
    with pytest.raises(GptbcError, match="no tokenizer files"):
        check_same_vocabulary(a, 3, tmp_path, 3)
    check_same_vocabulary(DATA / "trained-tiny", 320, DATA / "draft-tiny", 320)  # the shipped pair


def test_batch_invariant_with_a_draft_is_refused():
    from gptbc.runtime.engine import Engine

    with pytest.raises(GptbcError, match="--batch-invariant with --draft: not supported together"):
        Engine("nowhere", "nowhere.so", batch_invariant=True, draft=("nowhere", "nowhere.so"))


# ---- the compiled trained pair: tests/data/trained-tiny verified, tests/data/draft-tiny drafting ----

CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


@pytest.fixture(scope="module")
def pair(trained_tiny, draft_tiny):
    from gptbc.runtime.engine import Engine

    plain = Engine(trained_tiny.out_dir, trained_tiny.lib, prefix_cache_size=0)
    spec = Engine(trained_tiny.out_dir, trained_tiny.lib, prefix_cache_size=0,
                  draft=(draft_tiny.out_dir, draft_tiny.lib), max_draft=6)
    return plain, spec


def test_compiled_pair_same_greedy_tokens_batched(pair):
    """Prompts ending across 16-token pages, decoded together: the same tokens as plain decoding one at a time,
    most of them from verified drafts; both KV caches empty afterwards."""
    plain, spec = pair
    prompts = [plain.encode(CODE * 2)[:n] for n in (5, 15, 16, 17, 31)]
    want = [plain.generate(p, 40) for p in prompts]
    assert spec.generate_batch(prompts, 40) == want
    stats = spec.scheduler.stats
    assert stats.model_accepted_tokens > 0 and stats.tokens_per_verify() > 1.5
    assert spec.runner.sequence_count() == 0 and spec.draft.runner.sequence_count() == 0


def test_compiled_pair_sampling_with_a_fixed_k_is_seeded_and_frees_both_caches(trained_tiny, draft_tiny):
    """Seeded sampling repeats where k is fixed (a k chosen from timed costs may differ between runs, and with it
    the random numbers drawn)."""
    from gptbc.runtime.engine import Engine

    spec = Engine(trained_tiny.out_dir, trained_tiny.lib, prefix_cache_size=0,
                  draft=(draft_tiny.out_dir, draft_tiny.lib), max_draft=4, min_draft=4)
    ids = spec.encode(CODE)[:10]
    runs = [spec.generate(ids, 30, greedy=False, temperature=0.8, seed=3) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) >= 1 and spec.scheduler.stats.model_drafted_tokens > 0
    assert spec.runner.sequence_count() == 0 and spec.draft.runner.sequence_count() == 0


def test_draft_with_another_vocabulary_is_refused(trained_tiny, draft_tiny, tmp_path):
    import shutil

    from gptbc.runtime.engine import Engine

    other = tmp_path / "other"
    shutil.copytree(draft_tiny.out_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][1]["content"] = "<fim_prefix>"  # the underscore spelling of StarCoder
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(GptbcError, match=r"token 1 is '<fim_prefix>' there but '<fim-prefix>' in the target"):
        Engine(trained_tiny.out_dir, trained_tiny.lib, draft=(other, draft_tiny.lib))


def test_generate_and_serve_with_draft(pair, trained_tiny, draft_tiny):
    """`gptbc generate --draft` prints the plain tokens; the server with a draft streams the plain text."""
    import subprocess
    import urllib.request

    from test_server import live_server

    plain, spec = pair
    ids = plain.encode(CODE)[:12]
    want = plain.generate(ids, 24)
    run = subprocess.run(["gptbc", "generate", str(trained_tiny.out_dir), "--lib", str(trained_tiny.lib),
                          "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "24", "--json",
                          "--draft", str(draft_tiny.out_dir), "--draft-lib", str(draft_tiny.lib)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["token_ids"] == want
    bad = subprocess.run(["gptbc", "generate", str(trained_tiny.out_dir), "--lib", str(trained_tiny.lib),
                          "--prompt-ids", "1,2", "--draft", str(trained_tiny.out_dir / "missing")],
                         capture_output=True, text=True)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: --draft: ") and "missing" in lines[0]
    with live_server(spec) as (base, _server):
        body = json.dumps({"prompt": ids, "max_tokens": 24, "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            chunks = [json.loads(line[6:]) for line in resp.read().decode().splitlines()
                      if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain.decode_text(want)


def test_bench_with_draft(trained_tiny, draft_tiny):
    """`gptbc bench --draft`: greedy generation plain and with the draft on one engine, the same tokens."""
    import subprocess

    run = subprocess.run(["gptbc", "bench", str(trained_tiny.out_dir), "--lib", str(trained_tiny.lib),
                          "--prefill-tokens", "0", "--prompt-tokens", "8", "--decode", "12", "--batch", "",
                          "--repeat", "1", "--draft", str(draft_tiny.out_dir), "--draft-lib", str(draft_tiny.lib),
                          "--draft-min", "3", "--draft-max", "3", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout)["draft"]
    assert r["same_tokens"] is True and r["speedup"] > 0 and 0 <= r["draft"]["acceptance_rate"] <= 1
    assert r["plain"]["tokens_per_verify"] == 0.0 and r["draft"]["tokens_per_verify"] >= 1.0
    assert "draft model (12-token prompt, 12 tokens)" in run.stderr
