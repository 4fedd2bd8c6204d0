"""Scheduler: requests over a model runner — continuous batching, prefix reuse, sampling, stop rules.

Each `Scheduler.step()`:
  1. admits waiting requests while batch slots and KV-cache room allow (forking a cached sequence
     that shares the longest prefix with the prompt, so those tokens are not prefilled again);
  2. prefills prompt chunks, shortest remaining prompt first, up to one chunk (prefill_chunk_size) in all, and
     while requests decode at most `prefill_budget` tokens — several requests' chunks in one `prefill_batch`
     call when they fit in prefill_chunk_size together;
  3. decodes one token for every running request in a single `decode_batch` call;
  4. samples, applies stop rules, emits text deltas, and frees (or keeps as a reusable prefix) the
     KV pages of finished requests.
A failure that belongs to one request (its sampling, its prompt scoring, its detokenizing, starting its
sequence) finishes that request alone with finish_reason "error" and the exception in its last event; every
other request continues unchanged. A runner call failing for a whole batch raises out of `step()`: the
caller (async_engine.AsyncEngine) decides what that means for the requests concerned.
Requests join and leave between steps. The runner is anything with the `Runner` methods (runner.py's
ModelRunner, or a fake in tests): this module imports no TVM. Prompts arrive as checked token ids
(the engine turns text, FIM and truncation into ids).

About 500 lines, kept in one file on purpose: admission, prefill, decode and stop rules share the request
state, and tests/test_scheduler.py drives them together on a fake runner.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from gptbc.errors import GptbcError
from gptbc.runtime.draft import DraftModel
from gptbc.runtime.sampling import SamplingParams, log_softmax, probabilities, sample, top_tokens
from gptbc.runtime.speculation import CostGate, DraftState, PromptLookup, accept, accept_draft, best_k, expected_tokens
from gptbc.runtime.tokenizer import IncrementalDetokenizer


class Runner(Protocol):
    """What the scheduler needs from a model runner (runner.ModelRunner implements it)."""

    page_size: int  # tokens per KV-cache page
    prefill_chunk_size: int  # most tokens one prefill call takes
    max_batch_size: int  # most sequences in one call
    samples_on_device: bool  # decode_batch_greedy is cheaper than copying logits (GPU)
    single_row_decode: bool  # a lone sequence is faster through decode than decode_batch (CPU)

    def add_sequence(self) -> int: ...
    def fork_sequence(self, parent: int, length: int) -> int: ...
    def copy_prefix(self, parent: int, length: int) -> int: ...
    def remove_sequence(self, seq_id: int) -> None: ...
    def prefill_chunk(self, seq_id: int, chunk: Sequence[int]) -> np.ndarray: ...
    def prefill_batch(self, seq_ids: Sequence[int], id_lists: Sequence[Sequence[int]]) -> np.ndarray: ...
    def decode(self, seq_id: int, token: int) -> np.ndarray: ...
    def decode_batch(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> np.ndarray: ...
    def decode_batch_greedy(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> list[int]: ...
    def verify(self, seq_id: int, ids: Sequence[int]) -> np.ndarray: ...
    def verify_batch(self, seq_ids: Sequence[int], id_lists: Sequence[Sequence[int]]) -> list[np.ndarray]: ...
    def pop_tokens(self, seq_id: int, n: int) -> None: ...


class StopMatcher:
    """Finds stop strings in streamed text, even when one spans several tokens.

    Text that could still be the start of a stop string is held back, so a stop string is never
    partly emitted; the match itself and anything after it are dropped.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was found)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:  # the longest tail of pending that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    rng: np.random.Generator
    detok: IncrementalDetokenizer | None
    stop: StopMatcher
    seq_id: int = -1
    prefilled: int = 0  # prompt tokens already in the KV cache
    reused: int = 0  # of those, tokens forked from a cached prefix
    parent: int | None = None  # the cached sequence they were forked from
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per output token
    prompt_logprobs: list[float | None] = field(default_factory=list)  # per prompt token (the first has none)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    last_logits: np.ndarray | None = None  # of the last prompt token scored so far (prompt_logprobs)
    text: str = ""
    finish_reason: str | None = None  # "stop" (eos or stop string), "length", "cancelled", "error"
    error: Exception | None = None  # why it ended, when finish_reason is "error"
    seen: np.ndarray | None = None
    counts: np.ndarray | None = None
    reserved: int = 0  # KV pages booked for this request (those it shares with a cached parent not counted)
    shared: int = 0  # KV pages shared with its cached parent (fork_sequence), counted under the parent's entry
    drafts: DraftState = field(default_factory=DraftState)  # prompt-lookup speculation (when enabled)


@dataclass(frozen=True)
class Event:
    """What one step produced for one request: an immutable snapshot, safe to read on another thread while
    the scheduler goes on mutating the Request (read `request` itself only for its identity).

    `token`, `logprob` and `top_logprobs` describe the same new token; `position` is its index in the
    output. The first event of a request with prompt_logprobs also carries the prompt's scores."""

    request: Request
    token: int | None  # the new token (None when the step only finished or failed)
    text: str  # new text, possibly ''
    finished: bool
    finish_reason: str | None = None  # set when finished
    logprob: float | None = None  # of `token`, with params.logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()  # with params.top_logprobs
    position: int = -1  # index of `token` in the output ids
    prompt_logprobs: tuple[float | None, ...] | None = None  # first event only, with params.prompt_logprobs
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    error: Exception | None = None  # finish_reason "error": what failed


@dataclass
class Stats:
    prefill_tokens: int = 0  # prompt tokens run through the model
    reused_prefix_tokens: int = 0  # prompt tokens taken from a cached prefix instead
    decode_tokens: int = 0  # tokens generated after each request's first
    decode_steps: int = 0  # per-request decode steps (one verify of a draft counts one)
    drafted_tokens: int = 0  # draft tokens proposed (prompt lookup and draft model)
    accepted_tokens: int = 0  # of those, kept
    verify_steps: int = 0  # per-request verifies of a draft
    verify_tokens: int = 0  # tokens those verifies produced (accepted + the target's own)
    model_drafted_tokens: int = 0  # of drafted_tokens, those the draft model proposed
    model_accepted_tokens: int = 0
    max_batch: int = 0

    def tokens_per_verify(self) -> float:
        return self.verify_tokens / self.verify_steps if self.verify_steps else 0.0

    def tokens_per_step(self) -> float:
        return self.decode_tokens / self.decode_steps if self.decode_steps else 0.0

    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


# Prompt tokens a CPU step prefills while other requests decode. On 2 Zen 4 cores santacoder q4f32_1 decodes a
# token in ~40 ms and prefills ~6 ms a token: 16 prompt tokens make a decode step ~2.5x as long (a keystroke's
# completion stays within a second while another editor's 2k-token prompt is read), and that prompt still gets
# ~70% of the machine. A GPU prefills a chunk in a few decode steps' time: there the budget is a whole chunk.
CPU_PREFILL_BUDGET = 16
# The budget also holds for RECENT_DECODE_S after the last decode step: an editor that just got its completion sends
# the next keystroke moments later, and a whole chunk of another editor's prompt started in that gap (13 s for 2k
# tokens on 2 cores) is what the keystroke would wait for.
RECENT_DECODE_S = 0.5


class Scheduler:
    def __init__(self, runner: Runner, capacity_tokens: int, vocab_size: int, eos_ids: set[int],
                 make_detokenizer: Callable[[], IncrementalDetokenizer] | None = None, prefix_cache_size: int = 8,
                 speculation: PromptLookup | None = None, clock: Callable[[], float] = time.perf_counter,
                 grain: int | None = None, draft: DraftModel | None = None, prefill_budget: int | None = None):
        """`capacity_tokens`: KV-cache tokens over all sequences; `make_detokenizer`: a new incremental
        detokenizer per request (None: ids only, no text or stop strings); `speculation`: prompt-lookup
        drafting (speculation.py), verified in one multi-row call, kept only while it pays (`clock` times the
        model calls for that); `grain`: batch-invariant mode (a batch-invariant library's attention grain):
        a reused prefix is copied, never shared, and cut to a multiple of the grain, and a prompt's later
        chunks end at grain boundaries, so every row's attention splits where a lone request's would;
        `draft`: a draft model (draft.py) proposing tokens for every running request in batched calls, its k
        per request chosen from the measured costs and that request's acceptance; with prompt lookup on too,
        each request takes whichever of the two promises more tokens per second this step; `prefill_budget`:
        prompt tokens a step prefills while other requests decode (default: CPU_PREFILL_BUDGET on the CPU, a
        whole chunk elsewhere)."""
        if prefill_budget is not None and prefill_budget < 1:
            raise GptbcError(f"--prefill-budget {prefill_budget}: must be at least 1")
        self.prefill_budget = prefill_budget or (CPU_PREFILL_BUDGET if runner.single_row_decode
                                                 else runner.prefill_chunk_size)
        self.speculation = speculation
        self.draft = draft
        self.model_rate = 0.7  # per-token acceptance of the draft model over all requests (moving average)
        self.grain = grain
        self.costs, self.clock = CostGate(), clock
        self.runner = runner
        self.capacity = capacity_tokens
        self.eos_ids = eos_ids
        self.make_detokenizer = make_detokenizer
        self.vocab_size = vocab_size
        self.prefix_cache_size = prefix_cache_size
        self.waiting: list[Request] = []
        self.active: list[Request] = []
        self.cached: OrderedDict[int, list[int]] = OrderedDict()  # seq_id → its tokens, LRU order
        self.cached_prompt_len: dict[int, int] = {}  # seq_id → how many of its tokens were the prompt
        self.stats = Stats()
        self._ids = itertools.count()
        self.decoded_at: float | None = None  # clock() after the last decode step

    # ---- submission ----
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> Request:
        """Queue a request (ids already checked against the vocabulary and the context window)."""
        ids = list(prompt_ids)
        vocab = self.vocab_size
        req = Request(
            id=next(self._ids), prompt_ids=ids, params=params,
            rng=np.random.default_rng(params.seed),
            detok=self.make_detokenizer() if self.make_detokenizer else None,
            stop=StopMatcher(params.stop),
        )
        if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            req.seen = np.zeros(vocab, bool)
            req.seen[ids] = True
            req.counts = np.zeros(vocab, np.int64)
        req.reserved = self._pages(len(ids) + params.max_new_tokens)
        if req.reserved > self._pages(self.capacity):
            raise GptbcError(f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds the KV "
                             f"cache capacity of {self.capacity} tokens (Engine max_total_seq_len)")
        if params.max_new_tokens == 0:
            req.finish_reason = "length"
            return req
        self.waiting.append(req)
        return req

    def cancel(self, req: Request, keep: bool = False) -> None:
        """Stop a request now (e.g. its client went away) and free its KV pages. `keep`: the caller ended it by a
        stop rule of its own (llama.cpp's n_indent, t_max_predict_ms): a running request's sequence then stays in
        the prefix cache as a finished one's does, for the next request to fork (an editor's next keystroke read
        its whole 2k-token prompt again when the one before had stopped at n_indent)."""
        if req in self.waiting:
            self.waiting.remove(req)
        if keep and req in self.active and req.finish_reason is None and req.output_ids:
            req.finish_reason = "stop"
            self._retire(req)
            return
        if req.finish_reason is None:
            req.finish_reason = "cancelled"
        if req in self.active:
            self.active.remove(req)
            self.runner.remove_sequence(req.seq_id)
        if self.draft is not None:
            self.draft.release(req.id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    def prefix_cache_pages(self) -> int:
        return sum(self._pages(len(t)) for t in self.cached.values())

    # ---- KV room ----
    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.runner.page_size)

    def _used_pages(self) -> int:
        return sum(r.reserved for r in self.active) + sum(self._pages(len(t)) for t in self.cached.values())

    def _evict_one(self, keep: int | None = None) -> bool:
        """Drop the least recently used cached sequence other than `keep`. Pages it shared with a running request
        forked from it now belong to that request alone, so they are booked to it."""
        victim = next((seq_id for seq_id in self.cached if seq_id != keep), None)
        if victim is None:
            return False
        self._drop_cached(victim)
        return True

    def _drop_cached(self, seq_id: int) -> None:
        del self.cached[seq_id]
        del self.cached_prompt_len[seq_id]
        self.runner.remove_sequence(seq_id)
        for req in self.active:
            if req.parent == seq_id and req.shared:
                req.reserved, req.shared = req.reserved + req.shared, 0

    def _fits(self, req: Request, shared: int = 0) -> bool:
        return self._used_pages() + req.reserved - shared <= self._pages(self.capacity)

    def _match(self, req: Request) -> tuple[int | None, int]:
        """The cached sequence sharing the longest start with `req`'s prompt, and how many tokens of it to reuse."""
        best, best_len = None, 0
        for seq_id, tokens in self.cached.items():
            n = _common_prefix(tokens, req.prompt_ids)
            if n > best_len:
                best, best_len = seq_id, n
        best_len = min(best_len, len(req.prompt_ids) - 1)  # the last prompt token must run: it gives the logits
        if self.grain:
            best_len -= best_len % self.grain
        if best is None or best_len <= 0 or req.params.prompt_logprobs:
            return None, 0
        return best, best_len

    def _shared_pages(self, parent: int | None, length: int) -> int:
        """Pages a fork of `parent`'s first `length` tokens shares with it (whole pages; a batch-invariant
        library copies the prefix instead, sharing none)."""
        return 0 if parent is None or self.grain else length // self.runner.page_size

    def _admit(self) -> list[Event]:
        """Move waiting requests into the batch. One whose sequence cannot be started ends with its error
        (it is never in neither list without an answer); the next in line is then tried.

        Room is made by evicting cached sequences least recently used first, but never the one the request
        will fork from while others can go: editors typing in turn each extend their own cached prompt, and
        plain LRU evicted exactly that one (the oldest) at every keystroke once the cache was full."""
        events = []
        while self.waiting and len(self.active) < self.runner.max_batch_size:
            req = self.waiting[0]
            parent, length = self._match(req)
            shared = self._shared_pages(parent, length)
            while not self._fits(req, shared) and self._evict_one(keep=parent):
                pass
            if (parent is not None and not self._fits(req, shared) and self._used_pages() + req.reserved
                    - self._pages(len(self.cached[parent])) <= self._pages(self.capacity)):
                self._drop_cached(parent)  # only without it does the request fit: start afresh
                parent, length, shared = None, 0, 0
            if not self._fits(req, shared):
                break  # wait for running requests to finish
            try:
                self._start(req, parent, length)
            except Exception as err:  # noqa: BLE001 - this request's failure, answered to it alone
                self.waiting.pop(0)
                events.append(self._fail(req, err))
                continue
            self.waiting.pop(0)
            self.active.append(req)
        return events

    def _fail(self, req: Request, err: Exception) -> Event:
        """End one request with an error; its sequence is freed when it retires (or now, if not running)."""
        req.finish_reason, req.error = "error", err
        return Event(req, None, "", True, "error", error=err)

    def _start(self, req: Request, parent: int | None, length: int) -> None:
        if parent is not None:
            reuse = self.runner.copy_prefix if self.grain else self.runner.fork_sequence
            req.seq_id = reuse(parent, length)
            self.cached.move_to_end(parent)
            req.prefilled = req.reused = length
            req.parent = parent
            req.shared = self._shared_pages(parent, length)
            req.reserved -= req.shared
            self.stats.reused_prefix_tokens += length
        else:
            req.seq_id = self.runner.add_sequence()

    # ---- the loop ----
    def step(self) -> list[Event]:
        events = self._admit()
        events += self._prefill()
        running = [r for r in self.active if r.prefilled == len(r.prompt_ids) and r.output_ids
                   and r.finish_reason is None]
        if running:
            events += self._decode(running)
            self.decoded_at = self.clock()
        for req in [r for r in self.active if r.finish_reason is not None]:
            self._retire(req)
        return events

    def _prefill(self) -> list[Event]:
        """This step's prompt chunks; chunks that fit together share one call.

        Shortest remaining prompt first: a keystroke's few tokens after prefix reuse go before another editor's
        cold prompt, and of several long prompts one finishes first instead of all late. Up to one chunk in all,
        so a request arriving waits for at most one chunk; while requests decode, at most `prefill_budget`
        tokens, so each of their steps costs little more than a decode while a long prompt still advances (and
        for RECENT_DECODE_S after, until the client that was answered sends its next request)."""
        runner, events = self.runner, []
        reading = sorted((r for r in self.active if r.prefilled < len(r.prompt_ids)),
                         key=lambda r: len(r.prompt_ids) - r.prefilled)
        decoding = any(r.prefilled == len(r.prompt_ids) and r.output_ids and r.finish_reason is None
                       for r in self.active)
        decoding = decoding or (self.decoded_at is not None and self.clock() - self.decoded_at < RECENT_DECODE_S)
        budget = self.prefill_budget if decoding else runner.prefill_chunk_size
        batch, room, taken = [], runner.prefill_chunk_size, 0
        for req in reading:
            n = self._piece(req, budget - taken, first=taken == 0)
            if n == 0:
                continue
            taken += n
            chunk = req.prompt_ids[req.prefilled:req.prefilled + n]
            if req.params.prompt_logprobs:
                try:
                    logits = self._score_prompt(req, chunk)
                except Exception as err:  # noqa: BLE001 - scoring this prompt failed: this request alone
                    events.append(self._fail(req, err))
                    continue
            elif len(chunk) <= room and len(batch) < runner.max_batch_size:
                batch.append((req, chunk))
                room -= len(chunk)
                continue
            else:
                logits = runner.prefill_chunk(req.seq_id, chunk)
            events += self._prefilled(req, chunk, logits)
        if len(batch) == 1:
            req, chunk = batch[0]
            events += self._prefilled(req, chunk, runner.prefill_chunk(req.seq_id, chunk))
        elif batch:
            rows = runner.prefill_batch([r.seq_id for r, _ in batch], [c for _, c in batch])
            for (req, chunk), logits in zip(batch, rows):
                events += self._prefilled(req, chunk, logits)
        return events

    def _piece(self, req: Request, left: int, first: bool) -> int:
        """Prompt tokens `req` takes this step with `left` tokens of the step's budget: its next chunk, cut to
        the budget (in batch-invariant mode only at a grain boundary, or not at all); the step's first request
        takes at least one piece, so a long prompt advances every step."""
        n = min(self._chunk_size(req), len(req.prompt_ids) - req.prefilled)
        if n <= left:
            return n
        cut = left - (req.prefilled + left) % self.grain if self.grain else left
        if cut > 0:
            return cut
        return min(n, self.grain - req.prefilled % self.grain) if first else 0

    def _chunk_size(self, req: Request) -> int:
        """Prompt tokens the next prefill call takes for `req`. In batch-invariant mode a chunk after the
        first ends at the next grain boundary: the attention kernels then compute each of its rows as they
        would in one whole prefill (kernels.py, docs/determinism.md)."""
        size = self.runner.prefill_chunk_size
        if self.grain and req.prefilled > 0:
            size = min(size, self.grain - req.prefilled % self.grain)
        return size

    def _prefilled(self, req: Request, chunk: list[int], logits: np.ndarray) -> list[Event]:
        req.prefilled += len(chunk)
        self.stats.prefill_tokens += len(chunk)
        return [self._accept(req, logits)] if req.prefilled == len(req.prompt_ids) else []

    def _decode(self, running: list[Request]) -> list[Event]:
        self.stats.max_batch = max(self.stats.max_batch, len(running))
        start = self.clock()
        # A draft model's k fixed by the user (--draft-min = --draft-max) drafts every step: the timed cost gate
        # would decide otherwise from run to run, and with it which random numbers a seeded request draws.
        fixed = self.draft is not None and self.speculation is None and self.draft.min_draft == self.draft.max_draft
        drafting = (self.speculation is not None or self.draft is not None) and (fixed or self.costs.allow())
        drafts, dists = self._drafts(running) if drafting else ({}, {})
        events = self._verify_drafts([r for r in running if r.id in drafts], drafts, dists, start) if drafts else []
        running = [r for r in running if r.id not in drafts]
        if not running:
            return events
        self.stats.decode_tokens += len(running)
        self.stats.decode_steps += len(running)
        start = self.clock()
        events += self._decode_plain(running)
        self.costs.note("decode", self.clock() - start, len(running))
        self.costs.note_call("decode_call", self.clock() - start)
        return events

    def _decode_plain(self, running: list[Request]) -> list[Event]:
        runner = self.runner
        seq_ids, last = [r.seq_id for r in running], [r.output_ids[-1] for r in running]
        if runner.samples_on_device and all(_plain_greedy(r.params) for r in running):
            tokens = runner.decode_batch_greedy(seq_ids, last)
            return [self._accept(r, None, t) for r, t in zip(running, tokens)]
        if len(running) == 1 and runner.single_row_decode:
            # One sequence: the single-row kernels (santacoder q4f32_1 on 2 cores: 41 ms a step,
            # against 107 ms through batch_decode's multi-row layout at batch 1).
            return [self._accept(running[0], runner.decode(seq_ids[0], last[0]))]
        logits = runner.decode_batch(seq_ids, last)
        return [self._accept(r, row) for r, row in zip(running, logits)]

    def _drafts(self, running: list[Request]) -> tuple[dict[int, list[int]], dict[int, list]]:
        """Drafts for this step within one verify call's token budget: request id → tokens, and request id →
        the draft model's distribution of each token (absent for prompt-lookup drafts)."""
        spec, budget, drafts, wanted = self.speculation, self.runner.prefill_chunk_size, {}, {}
        for r in running:
            p = r.params
            if r.seen is not None or p.prompt_logprobs:  # penalties depend on each token in turn: decode plainly
                continue
            lookup = spec
            if r.drafts.skip > 0:  # prompt lookup backs off after rejected drafts (the draft model shrinks k)
                r.drafts.skip -= 1
                lookup = None
            if lookup is None and self.draft is None:
                continue
            if self.grain and not p.greedy:  # sampling against a draft draws other random numbers than decoding
                continue
            redo = self._redo(r)
            # Room: the bonus token after the draft must still fit max_new_tokens (and so the booked KV pages);
            # in batch-invariant mode the call must also end in the grain it starts at.
            room = min(p.max_new_tokens - len(r.output_ids) - 1, budget - 1 - redo)
            if self.grain:
                room = min(room, self.grain - 1 - redo)
            draft = lookup.draft(r.prompt_ids + r.output_ids, room) if lookup is not None and room > 0 else []
            k = self._model_k(r, room) if self.draft is not None and room > 0 else 0
            if draft and self._lookup_wins(r, len(draft), k):
                drafts[r.id] = draft
                budget -= redo + len(draft) + 1
            elif k:
                wanted[r.id] = (r, k)
                budget -= redo + k + 1
        dists = {}
        if wanted:
            reqs = [r for r, _ in wanted.values()]
            start = self.clock()
            proposed = self.draft.propose([r.id for r in reqs], [r.prompt_ids + r.output_ids for r in reqs],
                                          [k for _, k in wanted.values()], [r.params for r in reqs],
                                          [r.rng for r in reqs])
            self.costs.note_call("draft_call", (self.clock() - start) / max(k for _, k in wanted.values()))
            for r, (tokens, qs) in zip(reqs, proposed):
                drafts[r.id], dists[r.id] = tokens, qs
        return drafts, dists

    def _model_k(self, r: Request, room: int) -> int:
        """Tokens the draft model drafts for `r` this step: the k with the best expected speedup from the measured
        cost of a draft step and a verify call (against a plain decode step) and r's acceptance so far (the
        running average over all requests until r has its own)."""
        draft_cost, verify_cost = self.costs.draft_ratio()
        rate = r.drafts.model_rate if r.drafts.model_rate is not None else self.model_rate
        limit = min(room, self.draft.max_draft)
        return max(best_k(rate, draft_cost, verify_cost, limit)[0], min(self.draft.min_draft, limit))

    def _lookup_wins(self, r: Request, n_lookup: int, k: int) -> bool:
        """With both sources on: prompt lookup's draft (free to make) against the draft model's k tokens (k draft
        steps), by expected tokens per cost in decode steps."""
        if k == 0:
            return True
        draft_cost, verify_cost = self.costs.draft_ratio()
        lookup_rate = r.drafts.lookup_rate if r.drafts.lookup_rate is not None else 0.5
        model_rate = r.drafts.model_rate if r.drafts.model_rate is not None else self.model_rate
        return (expected_tokens(lookup_rate, n_lookup) / verify_cost
                >= expected_tokens(model_rate, k) / (k * draft_cost + verify_cost))

    def _redo(self, r: Request) -> int:
        """Batch-invariant mode: how many tokens before the last one a verify call feeds again, so that it
        starts at a grain boundary (their KV is recomputed to the same bits; kernels.py)."""
        return (len(r.prompt_ids) + len(r.output_ids) - 1) % self.grain if self.grain else 0

    def _verify_drafts(self, reqs: list[Request], drafts: dict[int, list[int]], dists: dict[int, list],
                       start: float) -> list[Event]:
        """Feed each request's last token + draft in one multi-row call; keep what the model agrees with.
        `start`: when drafting began (the draft model's calls count against what drafting wins)."""
        produced = self.stats.decode_tokens
        redo = {r.id: self._redo(r) for r in reqs}
        for r in reqs:
            if redo[r.id]:
                self.runner.pop_tokens(r.seq_id, redo[r.id])
        feed = [(r.prompt_ids + r.output_ids)[-1 - redo[r.id]:] + drafts[r.id] for r in reqs]
        verify_start = self.clock()
        rows_of = self.runner.verify_batch([r.seq_id for r in reqs], feed)
        self.costs.note_call("verify_call", self.clock() - verify_start)
        events = []
        for r, rows in zip(reqs, rows_of):
            rows = rows[redo[r.id]:]
            try:
                events += self._take_drafted(r, drafts[r.id], rows, dists.get(r.id))
            except Exception as err:  # noqa: BLE001 - this request's failure alone (its KV goes when it retires)
                events.append(self._fail(r, err))
        self.costs.note("verify", self.clock() - start, self.stats.decode_tokens - produced)
        return events

    def _take_drafted(self, r: Request, draft: list[int], rows: np.ndarray, dists: list | None) -> list[Event]:
        """`dists`: the draft model's distribution of each drafted token (None entries: greedy); None for a
        prompt-lookup draft."""
        events, before, kept = [], len(r.output_ids), 0
        for i, row in enumerate(rows):
            # The last row (every draft token kept) gives a bonus token, sampled as in plain decoding.
            q = dists[i] if dists is not None and i < len(draft) else None
            token, agreed = (None, False) if i == len(draft) else self._against_draft(r, row, draft[i], q)
            events.append(self._accept(r, row, token))
            kept += agreed
            if r.finish_reason is not None or not agreed:
                break
        new = len(r.output_ids) - before
        # The KV cache now holds the last token and the whole draft; keep only what was accepted
        # (prompt + outputs but the newest, exactly as after plain decoding).
        if len(draft) + 1 - new:
            self.runner.pop_tokens(r.seq_id, len(draft) + 1 - new)
        if dists is not None:  # the draft model's: its KV keeps the accepted tokens only
            self.draft.settle(r.id, draft, r.output_ids[before:])
            r.drafts.update(len(draft), kept, 0, "model")
            self.model_rate = 0.9 * self.model_rate + 0.1 * r.drafts.model_rate
            self.stats.model_drafted_tokens += len(draft)
            self.stats.model_accepted_tokens += kept
        else:
            r.drafts.update(len(draft), kept, self.speculation.max_backoff)
        self.stats.decode_tokens += new
        self.stats.decode_steps += 1
        self.stats.verify_steps += 1
        self.stats.verify_tokens += new
        self.stats.drafted_tokens += len(draft)
        self.stats.accepted_tokens += kept
        return events

    def _against_draft(self, req: Request, logits: np.ndarray, drafted: int,
                       q: np.ndarray | None = None) -> tuple[int, bool]:
        """The token this row gives, and whether it is the drafted one (greedy: the argmax; sampling: the
        accept/reject rule against the draft's distribution `q`, or against a sure draft for prompt lookup;
        either leaves the output distribution unchanged)."""
        if req.params.greedy:
            token = int(np.argmax(logits))
            return token, token == drafted
        if q is not None:
            return accept_draft(probabilities(logits, req.params), q, drafted, req.rng)
        return accept(probabilities(logits, req.params), drafted, req.rng)

    def _score_prompt(self, req: Request, chunk: list[int]) -> np.ndarray:
        """Prefill a chunk keeping the logits of every position, to score each prompt token."""
        rows = self.runner.verify(req.seq_id, chunk)
        if req.prefilled == 0:
            req.prompt_logprobs.append(None)
            req.prompt_top_logprobs.append([])
        before = rows[:-1] if req.last_logits is None else [req.last_logits, *rows[:-1]]
        for logits, token in zip(before, chunk[1:] if req.last_logits is None else chunk):
            lp = log_softmax(logits)
            req.prompt_logprobs.append(float(lp[token]))
            req.prompt_top_logprobs.append(top_tokens(lp, req.params.top_logprobs))
        req.last_logits = rows[-1]
        return rows[-1]

    def _accept(self, req: Request, logits: np.ndarray | None, token: int | None = None) -> Event:
        """Take one new token for `req` (sampled from `logits` unless given); any failure here is this
        request's alone."""
        try:
            return self._take(req, logits, token)
        except Exception as err:  # noqa: BLE001 - e.g. sampling on NaN logits: fail this request, not the batch
            return self._fail(req, err)

    def _take(self, req: Request, logits: np.ndarray | None, token: int | None) -> Event:
        p = req.params
        if token is None:
            token = sample(logits, p, req.rng, req.seen, req.counts)
        logprob, top = None, ()
        if p.logprobs:
            lp = log_softmax(logits)
            logprob = float(lp[token])
            if p.top_logprobs:
                top = tuple(top_tokens(lp, p.top_logprobs))
        first = not req.output_ids
        req.output_ids.append(token)
        if p.logprobs:
            req.logprobs.append(logprob)
            if p.top_logprobs:
                req.top_logprobs.append(list(top))
        if req.seen is not None:
            req.seen[token] = True
            req.counts[token] += 1
        is_eos = token in self.eos_ids and not p.ignore_eos
        text = ""
        if req.detok is not None and not is_eos:
            text = req.detok.add(token)
        stopped = token in p.stop_token_ids or is_eos
        if not stopped and len(req.output_ids) >= p.max_new_tokens:
            req.finish_reason = "length"
        if stopped:
            req.finish_reason = "stop"
        if req.finish_reason is not None and req.detok is not None:
            text += req.detok.flush()
        text, hit = req.stop.feed(text)
        if hit:
            req.finish_reason = "stop"
        elif req.finish_reason is not None:
            text += req.stop.flush()
        req.text += text
        prompt_lps = prompt_tops = None
        if first and p.prompt_logprobs:
            prompt_lps = tuple(req.prompt_logprobs)
            prompt_tops = tuple(tuple(t) for t in req.prompt_top_logprobs)
        return Event(req, token, text, req.finish_reason is not None, req.finish_reason, logprob, top,
                     len(req.output_ids) - 1, prompt_lps, prompt_tops)

    def _retire(self, req: Request) -> None:
        self.active.remove(req)
        if self.draft is not None:
            self.draft.release(req.id)
        if self.prefix_cache_size > 0 and req.finish_reason not in ("cancelled", "error"):
            # The KV holds the prompt and every output token but the last (sampled, never fed back).
            self.cached[req.seq_id] = req.prompt_ids + req.output_ids[:-1]
            self.cached_prompt_len[req.seq_id] = len(req.prompt_ids)
            if self._superseded(req):
                # An editor's next keystroke extends the last one's prompt: keep one sequence per place it
                # types in, so that the few places an editor cycles through (files, FIM orders, llama.vim's
                # context warm-ups) stay cached, where each keystroke's own entry pushed them out.
                self._drop_cached(req.parent)
            while len(self.cached) > self.prefix_cache_size:
                self._evict_one()
        else:
            self.runner.remove_sequence(req.seq_id)

    def _superseded(self, req: Request) -> bool:
        """Whether `req`'s parent serves no prompt better than `req`'s sequence does, but for at most its last
        prompt token and its answer: `req` reused all of the parent's prompt but (at most) that token."""
        parent = req.parent
        return (parent is not None and parent in self.cached and parent != req.seq_id
                and req.reused >= self.cached_prompt_len[parent] - 1)

    def clear_prefix_cache(self) -> None:
        while self._evict_one():
            pass

    def run_until_done(self, requests: Sequence[Request]) -> None:
        while any(r.finish_reason is None for r in requests):
            self.step()


def _plain_greedy(p: SamplingParams) -> bool:
    return p.greedy and not p.logprobs and p.repetition_penalty == 1.0 and not p.presence_penalty \
        and not p.frequency_penalty


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
