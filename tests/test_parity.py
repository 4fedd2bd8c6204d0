"""Logits and greedy tokens equal HF transformers' GPTBigCodeForCausalLM on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import VARIANTS
from hf_models import load_hf

PROMPT_LENGTHS = [1, 15, 16, 17, 40]  # around the 16-token page boundary, and past a few pages
DECODE_STEPS = 24
RTOL = 1e-4  # max |ours - hf| relative to max |hf| at each step


def prompt(length: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=length).tolist()


@pytest.fixture(scope="module")
def hf_models(tiny_model):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_hf(tiny_model(name).hf_dir)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_logits_and_greedy_tokens_match_hf(name, length, engine_of, hf_models):
    engine, hf = engine_of(name), hf_models(name)
    ids = prompt(length, engine.config.vocab_size, seed=length)
    seq = engine.runner.add_sequence()
    try:
        steps = [engine.runner.prefill(seq, ids)]
        tokens = [int(np.argmax(steps[-1]))]
        for _ in range(DECODE_STEPS):
            steps.append(engine.runner.decode(seq, tokens[-1]))
            tokens.append(int(np.argmax(steps[-1])))
    finally:
        engine.runner.remove_sequence(seq)

    with torch.no_grad():
        full = torch.tensor([ids + tokens[:-1]])
        ref = hf(full).logits[0, length - 1:].numpy()
    assert ref.shape == (len(steps), engine.config.vocab_size)
    for step, (ours, want) in enumerate(zip(steps, ref)):
        err = np.abs(ours - want).max() / np.abs(want).max()
        assert err <= RTOL, f"{name} prompt {length}: step {step} relative error {err:.2e}"
    # HF's greedy choice at every position equals ours, so HF greedy generation yields the same tokens.
    assert ref.argmax(-1).tolist() == tokens


def test_generate_equals_hf_generate(engine_of, hf_models):
    engine, hf = engine_of("mqa64"), hf_models("mqa64")
    ids = prompt(9, engine.config.vocab_size, seed=7)
    ours = engine.generate(ids, max_new_tokens=12)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


def test_sequences_are_independent(engine_of):
    """Two interleaved sequences in one KV cache give the same tokens as each alone."""
    engine = engine_of("mha64")
    a, b = prompt(5, engine.config.vocab_size, 1), prompt(21, engine.config.vocab_size, 2)
    alone = [engine.generate(a, 6), engine.generate(b, 6)]
    sa, sb = engine.runner.add_sequence(), engine.runner.add_sequence()
    la, lb = engine.runner.prefill(sa, a), engine.runner.prefill(sb, b)
    got = [[], []]
    for _ in range(6):
        got[0].append(int(np.argmax(la)))
        got[1].append(int(np.argmax(lb)))
        la, lb = engine.runner.decode(sa, got[0][-1]), engine.runner.decode(sb, got[1][-1])
    engine.runner.remove_sequence(sa)
    engine.runner.remove_sequence(sb)
    assert got == alone


def test_batch_functions_equal_single_sequence(engine_of, hf_models):
    """batch_prefill / batch_decode over 3 sequences, and batch_verify's per-position logits, equal HF."""
    engine, hf = engine_of("mqa32"), hf_models("mqa32")
    vocab = engine.config.vocab_size
    prompts = [prompt(n, vocab, 10 + n) for n in (3, 1, 9)]  # 13 tokens: fits the 16-token prefill chunk
    seqs = [engine.runner.add_sequence() for _ in prompts]
    try:
        logits = engine.runner.prefill_batch(seqs, prompts)
        for _ in range(3):
            tokens = logits.argmax(-1).tolist()
            for p, t in zip(prompts, tokens):
                p.append(t)
            logits = engine.runner.decode_batch(seqs, tokens)
    finally:
        for s in seqs:
            engine.runner.remove_sequence(s)
    with torch.no_grad():
        for p, got in zip(prompts, logits):
            want = hf(torch.tensor([p])).logits[0, -1].numpy()
            assert np.abs(got - want).max() <= RTOL * np.abs(want).max()

    ids = prompt(12, vocab, 99)
    seq = engine.runner.add_sequence()
    try:
        got = engine.runner.verify(seq, ids)
    finally:
        engine.runner.remove_sequence(seq)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= RTOL * np.abs(want).max()
