"""Speculative decoding: drafts copied from the text so far (prompt lookup) or proposed by a smaller model with
the same vocabulary (draft.py), verified in one multi-row call.

Code editing repeats what the prompt holds (the file being rewritten), so the tokens that followed the
last occurrence of the newest n-gram are a good guess for what comes next. The scheduler appends the
last token plus the draft to the sequence in one `verify` call and keeps the longest prefix the model
agrees with, plus one token of its own: greedy output is identical to plain decoding, and sampling
follows the standard accept/reject rule (a draft token d is kept with probability p(d), otherwise the
next token is drawn from p with d removed), so the output distribution is unchanged too. A request whose
drafts keep failing drafts less often (exponential back-off), so open-ended text costs little. A draft model's
tokens are sampled from its own distribution q and kept with probability min(1, p/q) (`accept_draft`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class PromptLookup:
    """`max_ngram`..`min_ngram`: the suffix lengths matched (longest first); `num_draft`: tokens proposed."""

    max_ngram: int = 3
    min_ngram: int = 1
    num_draft: int = 8
    max_backoff: int = 16  # steps without drafting, at most, after drafts that were all rejected

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram or self.num_draft < 1 or self.max_backoff < 0:
            raise ValueError(f"prompt lookup: need 1 <= min_ngram <= max_ngram and num_draft >= 1, got {self}")

    def draft(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Up to min(num_draft, limit) tokens that followed the latest earlier occurrence of the longest
        matching suffix of `tokens`; [] when nothing matches."""
        limit = min(limit, self.num_draft)
        if limit <= 0:
            return []
        seq = np.asarray(tokens)
        n_tokens = seq.size
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            tail = seq[n_tokens - n:]
            # candidate starts whose first token matches, latest first; the suffix itself is excluded
            starts = np.flatnonzero(seq[:n_tokens - n] == tail[0])[::-1]
            for i in starts:
                if np.array_equal(seq[i:i + n], tail):
                    follow = seq[i + n:i + n + limit]
                    if follow.size:
                        return [int(t) for t in follow]
        return []


@dataclass
class DraftState:
    """Per request: back-off after rejected drafts, and what was drafted / accepted (for metrics)."""

    skip: int = 0  # steps left without drafting
    backoff: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_calls: int = 0
    # per-token acceptance of each source (moving averages; None: not measured for this request yet)
    lookup_rate: float | None = None
    model_rate: float | None = None

    def update(self, proposed: int, kept: int, max_backoff: int, source: str = "lookup") -> None:
        self.drafted += proposed
        self.accepted += kept
        self.verify_calls += 1
        name = f"{source}_rate"
        rate, old = per_token_acceptance(proposed, kept), getattr(self, name)
        setattr(self, name, rate if old is None else 0.5 * old + 0.5 * rate)
        if source == "model":
            return  # the model's k shrinks with its acceptance instead of backing off
        if kept == 0:
            self.backoff = min(max(1, 2 * self.backoff), max_backoff)
            self.skip = self.backoff
        else:
            self.backoff = 0


@dataclass
class CostGate:
    """Drafting must pay for itself: seconds per generated token through verify calls against plain decode
    calls (moving averages, timed by the scheduler). Where a multi-row verify costs more than the tokens it
    wins (e.g. CPU kernels whose cost grows with rows x weights), drafting stops, and one verify is tried again
    every `probe_every` steps in case the text became more repetitive."""

    probe_every: int = 32
    decode: float | None = None  # seconds per token, plain decode calls
    verify: float | None = None  # seconds per token, verify calls (rejected drafts and drafting included)
    wait: int = 0  # steps before the next probe while drafting does not pay
    # seconds per call, for choosing a draft model's k: a plain decode step, a verify call, one draft-model step
    decode_call: float | None = None
    verify_call: float | None = None
    draft_call: float | None = None

    def note(self, kind: str, seconds: float, tokens: int) -> None:
        per = seconds / max(tokens, 1)
        old = getattr(self, kind)
        setattr(self, kind, per if old is None else 0.7 * old + 0.3 * per)
        if kind == "verify" and not self.pays():
            self.wait = self.probe_every

    def note_call(self, kind: str, seconds: float) -> None:
        """`kind`: "decode_call", "verify_call" or "draft_call"."""
        old = getattr(self, kind)
        setattr(self, kind, seconds if old is None else 0.7 * old + 0.3 * seconds)

    def draft_ratio(self) -> tuple[float, float]:
        """(a draft-model step, a verify call) in plain decode steps; before they are timed, a draft model a
        tenth of the target (tiny_starcoder next to santacoder) and a verify as dear as a decode step (memory
        bound: the weights are read once for all rows)."""
        if self.decode_call:
            draft = self.draft_call / self.decode_call if self.draft_call is not None else 0.1
            verify = self.verify_call / self.decode_call if self.verify_call is not None else 1.0
            return draft, verify
        return 0.1, 1.0

    def pays(self) -> bool:
        return self.decode is None or self.verify is None or self.verify < self.decode

    def allow(self) -> bool:
        """Whether this step may draft (after a verify, one plain step first if decode is not timed yet)."""
        if self.verify is not None and self.decode is None:
            return False
        if self.pays():
            return True
        self.wait -= 1
        return self.wait <= 0


def accept(probs: np.ndarray, drafted: int, rng: np.random.Generator) -> tuple[int, bool]:
    """The standard rule for a deterministic draft (q(drafted) = 1): keep it with probability p(drafted),
    else draw from p without it. Returns (token, kept)."""
    p = float(probs[drafted])
    if p > 0 and rng.random() < p:
        return drafted, True
    rest = probs.copy()
    rest[drafted] = 0.0
    total = rest.sum()
    if total <= 0:  # p(drafted) was 1 within rounding
        return drafted, True
    return int(rng.choice(rest.size, p=rest / total)), False


def per_token_acceptance(proposed: int, kept: int) -> float:
    """The per-token acceptance rate a that explains one verify: kept tokens of `proposed` (a run stopped by
    its first reject). A run of all tokens counts as rate 1 - 1/(2 (k + 1)) rather than 1, so one lucky run
    does not make the estimate certain."""
    if proposed <= 0:
        return 0.0
    if kept >= proposed:
        return 1.0 - 1.0 / (2 * (proposed + 1))
    return kept / (kept + 1)


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a verify of k drafted tokens yields on average (accepted prefix + the target's own token) when
    each is accepted with probability `rate` (Leviathan et al. 2023): (1 - rate^(k+1)) / (1 - rate)."""
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


def best_k(rate: float, draft_cost: float, verify_cost: float, limit: int) -> tuple[int, float]:
    """(k, expected speedup) maximizing expected_tokens(rate, k) / (k * draft_cost + verify_cost) for k in
    1..limit; costs in plain decode steps. (0, 1.0) when limit < 1."""
    best, gain = 0, 1.0
    for k in range(1, limit + 1):
        g = expected_tokens(rate, k) / (k * draft_cost + verify_cost)
        if best == 0 or g > gain:
            best, gain = k, g
    return best, gain


def accept_draft(p: np.ndarray, q: np.ndarray, drafted: int, rng: np.random.Generator) -> tuple[int, bool]:
    """The standard rule for a token drawn from the draft's distribution q where the target's is p: keep it
    with probability min(1, p(d) / q(d)), else draw from normalize(max(p - q, 0)). The token returned then
    follows p exactly (Leviathan et al. 2023, Chen et al. 2023). Returns (token, kept)."""
    pd, qd = float(p[drafted]), float(q[drafted])
    if qd <= 0:  # the draft could not have drawn it: only p decides (not reached with a q it was drawn from)
        return int(rng.choice(p.size, p=p)), False
    if rng.random() < min(1.0, pd / qd):
        return drafted, True
    rest = np.maximum(p - q, 0.0)
    total = rest.sum()
    if total <= 0:  # p == q within rounding: a reject had probability ~0
        return drafted, True
    return int(rng.choice(rest.size, p=rest / total)), False
