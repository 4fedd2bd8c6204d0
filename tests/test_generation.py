"""Generation: streaming text, sampling options, stop rules, FIM, continuous batching, prefix reuse."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import gptbc.runtime.scheduler as scheduler
from gptbc.errors import GptbcError
from gptbc.runtime.engine import Engine
from gptbc.runtime.sampling import SamplingParams, apply_penalties, log_softmax, sample
from gptbc.runtime.tokenizer import IncrementalDetokenizer
from distribution import assert_follows
from hf_models import make_tokenizer

TEXT = "def fibonacci(n):\n    return fibonacci(n - 1) + fibonacci(n - 2)  # héllo 你好 🚀\n"


def ids_of(n: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, vocab, size=n).tolist()


@pytest.fixture()
def scripted(monkeypatch):
    """Make the engine 'generate' given tokens, to test the text path with known output."""

    def script(tokens: list[int]):
        it = iter(tokens)
        monkeypatch.setattr(scheduler, "sample", lambda *a, **k: next(it))

    return script


# ---- text ----

def test_incremental_detokenizer_never_splits_a_character(engine_of):
    tok = engine_of("mqa64").tokenizer
    ids = tok.encode(TEXT)
    split = [t for t in ids if "\ufffd" in tok.decode([t])]
    assert split, "the test text must have characters split across tokens"
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT


def test_stream_yields_whole_characters(engine_of, scripted):
    engine = engine_of("mqa64")
    ids = engine.encode(TEXT)
    scripted(ids)
    pieces = list(engine.stream([1, 2, 3], max_new_tokens=len(ids)))
    assert len(pieces) > 5 and all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT


def test_stop_string_across_token_boundaries(engine_of, scripted):
    engine = engine_of("mqa64")
    ids = engine.encode(TEXT)
    stop = "fibonacci(n - 1"
    assert not any(stop in engine.tokenizer.decode([t]) for t in ids)  # spans several tokens
    scripted(ids)
    pieces = list(engine.stream([1, 2, 3], max_new_tokens=len(ids), stop=[stop, "never"]))
    assert "".join(pieces) == TEXT[:TEXT.index(stop)]  # so no piece carried part of the stop string
    scripted(ids)
    done = engine.complete([1, 2, 3], max_new_tokens=len(ids), stop=[stop])
    assert done.finish_reason == "stop" and done.text == TEXT[:TEXT.index(stop)]
    assert len(done.token_ids) < len(ids)


def test_stop_at_eos_and_length(engine_of, scripted):
    engine = engine_of("mqa64")
    words = engine.encode("x = 1\n")
    scripted(words + [0] + words)  # 0 is <|endoftext|>, the eos
    done = engine.complete([5], max_new_tokens=20)
    assert done.token_ids == words + [0] and done.finish_reason == "stop" and done.text == "x = 1\n"
    scripted(words * 3)
    done = engine.complete([5], max_new_tokens=4)
    assert len(done.token_ids) == 4 and done.finish_reason == "length"


# ---- sampling ----

def test_seeded_sampling_is_reproducible(engine_of):
    engine = engine_of("mqa64")
    p = ids_of(6, engine.config.vocab_size, 1)
    a = engine.generate(p, 16, greedy=False, temperature=1.5, seed=7)
    b = engine.generate(p, 16, greedy=False, temperature=1.5, seed=7)
    c = engine.generate(p, 16, greedy=False, temperature=1.5, seed=8)
    assert a == b and a != c


@pytest.mark.parametrize("options", [dict(top_k=1, temperature=1.0), dict(temperature=1e-6),
                                     dict(top_p=1e-9, temperature=1.0), dict(min_p=1.0, temperature=1.0)])
def test_degenerate_sampling_equals_greedy(engine_of, options):
    engine = engine_of("mqa64")
    p = ids_of(6, engine.config.vocab_size, 2)
    assert engine.generate(p, 12, greedy=False, seed=3, **options) == engine.generate(p, 12)


def test_sampling_follows_the_distribution():
    """Each rule's distribution, checked with a chi-square bound (distribution.py) that a sampler off by a point
    fails: full softmax, its temperature powers, and top-k / top-p / min-p renormalized over what they keep."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    rng = np.random.default_rng(0)

    def counts(**kw):
        p = SamplingParams(**kw)
        return np.bincount([sample(logits, p, rng) for _ in range(20000)], minlength=4)

    assert_follows(counts(temperature=1.0), probs)
    assert_follows(counts(temperature=2.0), probs ** 0.5)  # softmax(log p / T) is p^(1/T), renormalized
    assert_follows(counts(temperature=0.5), probs ** 2)
    assert_follows(counts(temperature=1.0, top_k=2), [0.5, 0.3, 0, 0])
    assert_follows(counts(temperature=1.0, top_p=0.7), [0.5, 0.3, 0, 0])  # 0.5 + 0.3 reaches 0.7
    assert_follows(counts(temperature=1.0, top_p=0.85), [0.5, 0.3, 0.15, 0])
    assert_follows(counts(temperature=1.0, min_p=0.5), [0.5, 0.3, 0, 0])  # 0.15 < 0.5 * 0.5


def test_penalties():
    logits = np.array([2.0, -1.0, 0.5, 0.0])
    seen = np.array([True, True, False, False])
    counts = np.array([0, 0, 3, 0])
    out = apply_penalties(logits.copy(), SamplingParams(repetition_penalty=2.0), seen, counts)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 0.0])
    out = apply_penalties(logits.copy(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), seen, counts)
    np.testing.assert_allclose(out, [2.0, -1.0, 0.5 - 0.5 - 0.75, 0.0])


def test_repetition_penalty_changes_greedy_output(engine_of):
    engine = engine_of("mqa64")
    p = ids_of(4, engine.config.vocab_size, 5)
    plain = engine.generate(p, 24)
    penalized = engine.generate(p, 24, repetition_penalty=5.0)
    assert plain != penalized
    assert len(set(penalized)) >= len(set(plain))


def test_logprobs_are_the_models(engine_of):
    engine = engine_of("mqa64")
    p = ids_of(5, engine.config.vocab_size, 9)
    done = engine.complete(p, max_new_tokens=6, logprobs=True, greedy=False, temperature=0.8, seed=1)
    seq = engine.runner.add_sequence()
    logits = engine.runner.verify(seq, p + done.token_ids[:-1])
    engine.runner.remove_sequence(seq)
    want = [log_softmax(row)[t] for row, t in zip(logits[len(p) - 1:], done.token_ids)]
    np.testing.assert_allclose(done.logprobs, want, rtol=1e-4, atol=1e-5)


def test_generation_config_supplies_defaults(tiny_model, tmp_path):
    m = tiny_model("mqa64")
    out = tmp_path / "out"
    shutil.copytree(m.out_dir, out)
    (out / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "max_new_tokens": 7, "eos_token_id": [0, 3]}))
    engine = Engine(out, m.lib)
    d = engine.defaults
    assert (d.temperature, d.top_k, d.top_p, d.max_new_tokens) == (0.7, 5, 0.9, 7)
    assert engine.eos_ids == {0, 3}
    assert engine.sampling(temperature=0.0).greedy and not engine.sampling().greedy


# ---- fill-in-the-middle ----

@pytest.mark.parametrize("name, spelling", [("mqa64", "<fim-{}>"), ("mha32", "<fim_{}>")])
def test_fim_prompt_layout(engine_of, name, spelling):
    engine = engine_of(name)
    vocab = engine.tokenizer.tok.get_vocab()
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    ids = engine.prompt_ids(prefix=prefix, suffix=suffix)
    assert ids == [vocab[spelling.format("prefix")], *engine.encode(prefix), vocab[spelling.format("suffix")],
                   *engine.encode(suffix), vocab[spelling.format("middle")]]
    assert engine.generate(prefix=prefix, suffix=suffix, max_new_tokens=8) == engine.generate(ids, 8)


def test_fim_truncation_keeps_the_text_around_the_cursor(engine_of):
    engine = engine_of("mqa64")  # context 128
    prefix, suffix = "a = 1\n" * 60, "b = 2\n" * 60
    with pytest.raises(GptbcError, match="context window"):
        engine.generate(prefix=prefix, suffix=suffix, max_new_tokens=8)
    ids = engine.prompt_ids(prefix=prefix, suffix=suffix, params=SamplingParams(max_new_tokens=8,
                                                                               truncate_prompt=True))
    assert len(ids) + 8 <= 128
    pre = engine.encode(prefix)
    assert ids[1:1 + 10] == pre[-(ids.index(engine.fim["suffix"]["id"]) - 1):][:10]  # the prefix's end is kept
    assert ids[ids.index(engine.fim["suffix"]["id"]) + 1] == engine.encode(suffix)[0]  # the suffix's start is kept


def test_fim_cli(tiny_model, capsys):
    from gptbc.cli import main

    m = tiny_model("mha32")
    assert main(["generate", str(m.out_dir), "--lib", str(m.lib), "--prefix", "def f(", "--suffix", "):\n",
                 "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    engine = Engine(m.out_dir, m.lib)
    assert out["token_ids"] == engine.generate(prefix="def f(", suffix="):\n", max_new_tokens=5)
    assert out["prompt_tokens"] == len(engine.prompt_ids(prefix="def f(", suffix="):\n"))


@pytest.fixture()
def no_fim_engine(tiny_model, tmp_path):
    m = tiny_model("mqa64")
    out = tmp_path / "out"
    shutil.copytree(m.out_dir, out)
    make_tokenizer(out, fim=None)
    return Engine(out, m.lib)


def test_fim_without_fim_tokens(no_fim_engine):
    with pytest.raises(GptbcError, match="no fill-in-the-middle tokens"):
        no_fim_engine.generate(prefix="a", suffix="b", max_new_tokens=2)
    assert len(no_fim_engine.generate([1, 2], 2)) == 2


# ---- continuous batching ----

def test_batch_of_four_equals_single_runs(engine_of):
    engine = engine_of("mqa32")  # prefill chunk 16: the 40-token prompt is prefilled in 3 chunks
    vocab = engine.config.vocab_size
    prompts = [ids_of(n, vocab, n) for n in (3, 17, 40, 9)]
    engine.scheduler.clear_prefix_cache()
    single = [engine.generate(p, 10) for p in prompts]
    engine.scheduler.clear_prefix_cache()
    assert engine.generate_batch(prompts, 10) == single
    assert engine.scheduler.stats.max_batch >= 3


def test_request_joins_mid_batch_and_long_prompt_is_chunked(engine_of):
    engine = engine_of("mqa32")
    vocab = engine.config.vocab_size
    a, b, c = ids_of(5, vocab, 21), ids_of(8, vocab, 22), ids_of(40, vocab, 23)
    engine.scheduler.clear_prefix_cache()
    want = [engine.generate(p, 12) for p in (a, b, c)]
    engine.scheduler.clear_prefix_cache()
    params = engine.sampling(max_new_tokens=12)
    ra, rb = engine.submit(a, params=params), engine.submit(b, params=params)
    for _ in range(4):
        engine.step()
    assert 0 < len(ra.output_ids) < 12
    rc = engine.submit(c, params=params)
    steps_to_first = 0
    while not rc.output_ids:
        engine.step()
        steps_to_first += 1
    assert steps_to_first == 3  # 40 tokens in chunks of 16, one chunk per step, while a and b keep decoding
    engine.scheduler.run_until_done([ra, rb, rc])
    assert [ra.output_ids, rb.output_ids, rc.output_ids] == want


def test_kv_pages_are_freed(engine_of):
    engine = engine_of("mha64")
    engine.scheduler.clear_prefix_cache()
    before = engine.runner.sequence_count()
    engine.generate_batch([[1, 2, 3], [4, 5], [6]], 5)
    assert engine.runner.sequence_count() == before + 3  # finished sequences stay as reusable prefixes...
    engine.scheduler.clear_prefix_cache()
    assert engine.runner.sequence_count() == before == 0  # ...until evicted
    # A consumer that stops streaming early cancels its request and frees its sequence.
    stream = engine.scheduler.submit([1, 2, 3], engine.sampling(max_new_tokens=50))
    engine.step()
    engine.scheduler.cancel(stream)
    assert stream.finish_reason == "cancelled" and engine.runner.sequence_count() == 0


def test_prefix_reuse_skips_the_shared_prefill(engine_of):
    engine = engine_of("mqa32")
    vocab = engine.config.vocab_size
    shared = ids_of(40, vocab, 31)
    first, second = shared + ids_of(3, vocab, 32), shared + ids_of(9, vocab, 33)
    engine.scheduler.clear_prefix_cache()
    want = engine.generate(second, 8)
    engine.scheduler.clear_prefix_cache()
    cached = first + engine.generate(first, 8)[:-1]  # what the finished sequence holds in the KV cache
    common = next(i for i, (x, y) in enumerate(zip(cached, second)) if x != y)
    assert common >= 40
    stats = engine.scheduler.stats
    prefilled, reused = stats.prefill_tokens, stats.reused_prefix_tokens
    done = engine.complete(second, max_new_tokens=8, greedy=True)
    assert stats.reused_prefix_tokens - reused == common == done.reused_prefix_tokens
    assert stats.prefill_tokens - prefilled == len(second) - common  # only the new tail ran through the model
    assert done.token_ids == want
    # Resubmitting the exact same prompt reuses all but its last token.
    again = engine.complete(second, max_new_tokens=8, greedy=True)
    assert again.reused_prefix_tokens == len(second) - 1 and again.token_ids == want


# ---- bad input, and the engine keeps serving ----

@pytest.mark.parametrize("call, message", [
    (lambda e: e.generate([], 4), "prompt is empty"),
    (lambda e: e.generate("", 4), "prompt is empty"),
    (lambda e: e.generate([1, 2], 4, greedy=False, temperature=-1.0), "temperature -1.0"),
    (lambda e: e.generate([1, 2], 4, top_p=1.5), "top_p 1.5"),
    (lambda e: e.generate([1, 2], 4, top_k=-2), "top_k -2"),
    (lambda e: e.generate([1, 2], 4, temperature=float("nan")), "temperature nan"),
    (lambda e: e.generate([1] * 120, 20), "context window of 128"),
    (lambda e: e.generate([1, 2], -1), "max_new_tokens -1"),
    (lambda e: e.generate([1, 99999], 4), "token id 99999"),
])
def test_bad_requests_fail_alone(engine_of, call, message):
    engine = engine_of("mqa64")
    engine.scheduler.clear_prefix_cache()
    good = ids_of(6, engine.config.vocab_size, 41)
    want = engine.generate(good, 10)
    running = engine.submit(good, params=engine.sampling(max_new_tokens=10, greedy=True))
    engine.step()
    with pytest.raises(GptbcError, match=message.replace("(", r"\(")):
        call(engine)
    engine.scheduler.run_until_done([running])
    assert running.output_ids == want
    assert engine.generate(good, 10) == want


def test_truncate_prompt_keeps_the_newest_tokens(engine_of):
    engine = engine_of("mqa64")
    long = ids_of(200, engine.config.vocab_size, 51)
    done = engine.complete(long, max_new_tokens=8, truncate_prompt=True)
    assert done.prompt_tokens == 120
    assert done.token_ids == engine.generate(long[-120:], 8)


def test_evicting_a_prefix_while_its_fork_runs(engine_of):
    engine = engine_of("mqa32")
    vocab = engine.config.vocab_size
    shared = ids_of(35, vocab, 61)
    second = shared + ids_of(6, vocab, 62)
    engine.scheduler.clear_prefix_cache()
    want = engine.generate(second, 10)
    engine.scheduler.clear_prefix_cache()
    engine.generate(shared, 4)
    req = engine.submit(second, params=engine.sampling(max_new_tokens=10, greedy=True))
    engine.step()
    assert req.reused >= 35
    engine.scheduler.clear_prefix_cache()  # the parent goes; the child's shared pages must stay
    engine.scheduler.run_until_done([req])
    assert req.output_ids == want
