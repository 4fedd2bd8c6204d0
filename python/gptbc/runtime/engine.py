"""Engine: the user-facing facade — text, fill-in-the-middle and truncation into token ids; generate /
complete / stream / generate_batch; submit + step for callers that drive the loop themselves.

It owns a ModelRunner (the model on its device) and a Scheduler (requests over that runner), and is
the only thing the CLI and the server use. Whether a prompt fits the context window is decided here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from gptbc.artifact import manifest
from gptbc.artifact.config import GPTBC_CONFIG
from gptbc.runtime.chat_template import ChatTemplate, load_chat_template
from gptbc.errors import ContextWindowError, GptbcError
from gptbc.runtime.disco_runner import DiscoRunner
from gptbc.runtime.draft import DraftModel, check_same_vocabulary
from gptbc.runtime.runner import ModelRunner
from gptbc.runtime.sampling import SamplingParams, generation_defaults
from gptbc.runtime.scheduler import Request, Scheduler
from gptbc.runtime.speculation import PromptLookup
from gptbc.runtime.tokenizer import IncrementalDetokenizer, Tokenizer, find_fim_tokens, has_tokenizer

# A prompt cut to fit the window loses its start in whole blocks of this many tokens (at most an eighth of the
# window): a prompt that only grows at its end (an editor's request per keystroke) then keeps the same start
# until the next block must go, and the prefix cache matches it. Cut to the token, the start moved with every
# keystroke and the whole prompt was evaluated again each time. llama.cpp's server cuts in blocks too.
FIT_BLOCK = 64


def cut_start(n: int, keep: int, block: int) -> int:
    """How many of `n` tokens to drop from the start so that at most `keep` remain: whole `block`s from the
    start, unless that would leave nothing where `keep` allows some (then exactly the excess)."""
    if n <= keep:
        return 0
    if keep <= 0:
        return n
    drop = -(-(n - keep) // block) * block
    return drop if drop < n else n - keep


# Fill-in-the-middle orders. "psm": <fim-prefix> P <fim-suffix> S <fim-middle>. "spm": BigCode's "SPM variant 2"
# (their Megatron-LM fork's FIM `permute`, taken with probability fim_spm_rate): <fim-prefix> <fim-suffix> S
# <fim-middle> P. In SPM the prefix comes last, so text typed at the cursor only appends to the prompt and
# every keystroke reuses the cached rest. llama.cpp's --spm-infill writes another order
# (<fim-suffix> S <fim-prefix> P <fim-middle>), which the BigCode models were not trained on; gptbc has no such
# order. BENCHMARKS.md "FIM orders each preset was trained with" has the sources.
FIM_ORDERS = ("psm", "spm")


def check_fim_order(order: str) -> None:
    if order not in FIM_ORDERS:
        raise GptbcError(f"fim_order {order!r}: must be one of {', '.join(FIM_ORDERS)}")


def resolve_fim_order(choice: str, trained: list[str] | None) -> str:
    """`--fim-order` of serve and generate: "psm" or "spm" as given; "auto" SPM where the model was trained with
    it (`trained`: its preset's orders; SPM lets each keystroke reuse the whole cached prompt), else PSM, the
    order llama.cpp writes and every FIM model saw."""
    if choice == "auto":
        return "spm" if trained and "spm" in trained else "psm"
    check_fim_order(choice)
    return choice


def fim_layout(fim: dict, prefix: Sequence[int], suffix: Sequence[int], order: str) -> list[int]:
    """The FIM prompt of prefix/suffix token ids in `order`, with the ids of find_fim_tokens' `fim`."""
    p, s, m = fim["prefix"]["id"], fim["suffix"]["id"], fim["middle"]["id"]
    if order == "spm":
        return [p, s, *suffix, m, *prefix]
    return [p, *prefix, s, *suffix, m]


def fit_fim(n_pre: int, n_suf: int, room: int, suffix_share: int, block: int, order: str) -> tuple[int, int]:
    """(prefix tokens kept from its end, suffix tokens kept from its start) so that both fit `room`: the
    suffix keeps at least `suffix_share` where it needs it, the prefix the rest, cut in whole `block`s.

    In PSM the suffix follows the cursor, so it may take whatever the prefix's block cut left over (it is
    evaluated again at every keystroke anyway). In SPM the suffix comes first and the prefix grows at the end
    of the prompt: the suffix's length must not move with each typed token, or the whole prefix after it is
    evaluated again. So in SPM the suffix keeps a whole number of blocks (or `suffix_share`, when the share
    is under a block): its length changes only when the prefix grows across a block, and what the prefix's
    cut leaves over stays unused."""
    if n_pre + n_suf <= room:
        return n_pre, n_suf
    allowed = max(suffix_share, room - n_pre, 0)
    if order == "spm":
        keep_suf = min(n_suf, allowed - allowed % block if allowed >= block else allowed)
    else:
        keep_suf = min(n_suf, allowed)
    keep_pre = n_pre - cut_start(n_pre, room - keep_suf, block)
    if order == "psm":
        keep_suf = min(n_suf, room - keep_pre)  # with what the prefix's block cut left over
    return keep_pre, keep_suf


class Engine:
    """A loaded model and its request loop."""

    def __init__(self, model_dir: str | Path, lib: str | Path, device: str = "cpu",
                 max_total_seq_len: int | None = None, max_batch_size: int | None = None,
                 prefix_cache_size: int = 8, speculation: PromptLookup | None = None,
                 batch_invariant: bool = False, tensor_parallel: int = 1,
                 draft: tuple[str | Path, str | Path] | None = None, max_draft: int = 8, min_draft: int = 1,
                 prefill_budget: int | None = None):
        """`max_total_seq_len`: tokens the KV cache holds over all sequences (default: context window ×
        (min(4, max_batch_size) + 8), less where the device's memory is short: memory_plan.default_kv_tokens);
        `prefix_cache_size`: finished sequences kept for prefix reuse;
        `speculation`: prompt-lookup drafts verified in one multi-row call (same output, fewer steps when
        the text repeats the prompt, e.g. code editing); `batch_invariant`: the same request gives the same
        token ids and logprobs, bit for bit, whatever else is being served (see `guarantee`);
        `tensor_parallel` N > 1: a library compiled and weights converted for N ranks, run by N disco workers
        (disco_runner.py); `draft`: (converted directory, library) of a smaller model with the same tokenizer
        that drafts `min_draft`..`max_draft` tokens a step for every running request (draft.py), verified by this
        model (same greedy output; sampling keeps this model's distribution); `prefill_budget`: prompt tokens a
        step prefills while other requests decode (scheduler.py; default 16 on the CPU, a chunk elsewhere)."""
        if batch_invariant:
            if tensor_parallel > 1:
                raise GptbcError(f"--batch-invariant with --tensor-parallel {tensor_parallel}: not supported together")
            if draft is not None:
                raise GptbcError("--batch-invariant with --draft: not supported together (the bit-for-bit "
                                 "guarantee is checked with prompt lookup only, not with a draft model's verifies)")
        if draft is not None and tensor_parallel > 1:
            raise GptbcError(f"--draft with --tensor-parallel {tensor_parallel}: not supported together")
        self.batch_invariant, self.device = batch_invariant, device
        if tensor_parallel > 1:
            self.runner = DiscoRunner(model_dir, lib, tensor_parallel, device, max_total_seq_len, max_batch_size)
        else:
            self.runner = ModelRunner(model_dir, lib, device, max_total_seq_len, max_batch_size)
        r = self.runner
        if batch_invariant:
            check_invariant_library(r)
        self.model_dir, self.lib, self.config = r.model_dir, r.lib, r.config
        self.context_window_size, self.max_batch_size = r.context_window_size, r.max_batch_size
        self.quantization = r.info["quantization"]["name"]
        self.activations = r.meta.get("activations", "float")  # "int8": linear layers round their inputs to int8
        self.defaults, generation_eos = generation_defaults(self.model_dir)
        eos_ids = set(r.info.get("eos_token_id") or self.config.eos_token_id) | generation_eos
        self.tokenizer = Tokenizer(self.model_dir) if has_tokenizer(self.model_dir) else None
        self.fim = find_fim_tokens(self.model_dir) if self.tokenizer else None
        self.chat_template: ChatTemplate | None = load_chat_template(self.model_dir) if self.tokenizer else None
        self.special_ids = eos_ids | (self.tokenizer.special_ids() if self.tokenizer else set())
        detok = (lambda: IncrementalDetokenizer(self.tokenizer, self.special_ids)) if self.tokenizer else None
        self.draft = self._load_draft(draft, max_draft, min_draft) if draft is not None else None
        self.scheduler = Scheduler(r, r.capacity_tokens, self.config.vocab_size, eos_ids, detok,
                                   prefix_cache_size, speculation,
                                   grain=r.attention_grain if batch_invariant else None, draft=self.draft,
                                   prefill_budget=prefill_budget)

    def _load_draft(self, draft: tuple[str | Path, str | Path], max_draft: int, min_draft: int) -> DraftModel:
        """The draft model on this engine's device, with a KV cache for every sequence the target can run."""
        draft_dir, draft_lib = Path(draft[0]), Path(draft[1])
        r = self.runner
        if not 1 <= min_draft <= max_draft:
            raise GptbcError(f"--draft-min {min_draft}, --draft-max {max_draft}: need 1 <= min <= max")
        if not (draft_dir / GPTBC_CONFIG).is_file():
            raise GptbcError(f"--draft {draft_dir}: no {GPTBC_CONFIG} (a converted weights directory is needed)")
        draft_vocab = int(manifest.read_weights(draft_dir)["model_config"]["vocab_size"])
        check_same_vocabulary(self.model_dir, self.config.vocab_size, draft_dir, draft_vocab)  # before loading it
        runner = ModelRunner(draft_dir, draft_lib, self.device, max_batch_size=r.max_batch_size,
                             max_total_seq_len=r.capacity_tokens + r.max_batch_size * r.page_size)
        if runner.context_window_size < self.context_window_size:
            raise GptbcError(f"--draft {draft_dir}: its library's context window is {runner.context_window_size} "
                             f"tokens, the target's {self.context_window_size} (compile the draft with "
                             f"--context-window-size {self.context_window_size})")
        return DraftModel(runner, max_draft, min_draft)

    def guarantee(self) -> dict:
        """What this engine promises about reproducibility (served in /v1/models)."""
        if self.batch_invariant:
            return {"batch_invariant": True, "scope": BATCH_INVARIANT_SCOPE}
        return {"batch_invariant": False, "scope": "answers may differ in the last bits with server load "
                                                   "(batching, prefix reuse, prompt lookup), and seeded sampling "
                                                   "with a draft model with the k it chose from timed costs; see "
                                                   "--batch-invariant"}

    @property
    def speculation(self) -> PromptLookup | None:
        """Prompt-lookup drafting for requests from now on (None: off)."""
        return self.scheduler.speculation

    @speculation.setter
    def speculation(self, lookup: PromptLookup | None) -> None:
        self.scheduler.speculation = lookup

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end generation (the model's, plus generation_config.json's); the scheduler applies them."""
        return self.scheduler.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: set[int]) -> None:
        self.scheduler.eos_ids = set(ids)

    def check_ids(self, ids: Sequence[int]) -> None:
        self.runner.check_ids(ids)

    def sampling(self, greedy: bool | None = None, **overrides) -> SamplingParams:
        """Sampling parameters: the model's generation_config.json defaults, then `overrides`.

        greedy=True forces temperature 0; greedy=False samples (temperature 1 unless given).
        """
        params = self.defaults.replace(**overrides)
        if greedy is True:
            params = params.replace(temperature=0.0)
        elif greedy is False and "temperature" not in overrides and params.temperature == 0:
            params = params.replace(temperature=1.0)
        params.validate()
        return params

    def prompt_ids(self, prompt: str | Sequence[int] | None = None, prefix: str | None = None,
                   suffix: str | None = None, params: SamplingParams | None = None,
                   fim_order: str = "psm") -> list[int]:
        """Token ids of a plain prompt (text or ids) or of a fill-in-the-middle request (in `fim_order`)."""
        if prefix is not None or suffix is not None:
            if prompt is not None:
                raise GptbcError("give either a prompt or prefix/suffix (fill-in-the-middle), not both")
            return self.fim_prompt(prefix or "", suffix or "", params, fim_order)
        if prompt is None:
            raise GptbcError("prompt is empty: give at least one token")
        return self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def fim_prompt(self, prefix: str, suffix: str, params: SamplingParams | None = None,
                   order: str = "psm") -> list[int]:
        """A fill-in-the-middle prompt with the tokenizer's own spelling of the FIM tokens, in `order`:
        "psm" <fim-prefix> prefix <fim-suffix> suffix <fim-middle>, or "spm" (BigCode's "SPM variant 2")
        <fim-prefix> <fim-suffix> suffix <fim-middle> prefix (see fim_layout).

        With truncate_prompt, a prefix/suffix too long for the window loses its far ends: the start of
        the prefix and the end of the suffix, keeping the text around the cursor.
        """
        check_fim_order(order)
        if self.tokenizer is None or self.fim is None:
            raise GptbcError(f"{self.model_dir}: the tokenizer has no fill-in-the-middle tokens "
                             f"(<fim-prefix>/<fim-suffix>/<fim-middle> or <fim_prefix>/<fim_suffix>/<fim_middle>)")
        pre, suf = self.encode(prefix), self.encode(suffix)
        if params is not None and params.truncate_prompt:
            budget = self.context_window_size - params.max_new_tokens - 3
            if budget < 0:
                raise GptbcError(f"max_new_tokens {params.max_new_tokens} leaves no room for a FIM prompt in the "
                                 f"context window of {self.context_window_size} tokens")
            keep_pre, keep_suf = fit_fim(len(pre), len(suf), budget, budget // 2, self.fit_block, order)
            pre, suf = pre[len(pre) - keep_pre:], suf[:keep_suf]
        return fim_layout(self.fim, pre, suf, order)

    @property
    def fit_block(self) -> int:
        """The block a prompt too long for the window is cut in (FIT_BLOCK)."""
        return max(1, min(FIT_BLOCK, self.context_window_size // 8))

    def fit_prompt(self, ids: list[int], params: SamplingParams) -> list[int]:
        """Check a prompt against the vocabulary and the context window (truncating it only if asked)."""
        if len(ids) == 0:
            raise GptbcError("prompt is empty: give at least one token")
        self.check_ids(ids)
        need = len(ids) + params.max_new_tokens
        if need > self.context_window_size:
            room = self.context_window_size - params.max_new_tokens
            if params.truncate_prompt and room > 0:
                return ids[cut_start(len(ids), room, self.fit_block):]
            raise ContextWindowError(len(ids), params.max_new_tokens, self.context_window_size)
        return ids

    def submit(self, prompt: str | Sequence[int] | None = None, *, prefix: str | None = None,
               suffix: str | None = None, params: SamplingParams | None = None, fim_order: str = "psm"):
        """Queue a request for the engine loop (`step`); bad input raises here and nothing is queued."""
        params = params or self.sampling()
        ids = self.prompt_ids(prompt, prefix, suffix, params, fim_order)
        return self.scheduler.submit(self.fit_prompt(ids, params), params)

    def step(self):
        """One engine-loop step over every queued and running request; returns the per-request events."""
        return self.scheduler.step()

    def cancel(self, req: Request, keep: bool = False) -> None:
        """Stop a request now and free its KV pages (`keep`: ended by the caller's stop rule, its sequence stays
        in the prefix cache: Scheduler.cancel)."""
        self.scheduler.cancel(req, keep)

    def cancel_all(self) -> list[Request]:
        """Cancel every running and waiting request; returns them."""
        reqs = list(self.scheduler.active) + list(self.scheduler.waiting)
        for req in reqs:
            self.scheduler.cancel(req)
        return reqs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def status(self) -> dict:
        """Gauges for metrics and leak checks: requests, batch, KV pages, sequences, prefix cache."""
        s, r = self.scheduler, self.runner
        return {"running": len(s.active), "waiting": len(s.waiting),
                "batch_size": sum(1 for q in s.active if q.output_ids and q.finish_reason is None),
                "kv_pages_total": r.kv_pages_total, "kv_pages_free": r.kv_pages_free(),
                "kv_sequences": r.sequence_count(), "prefix_cache_sequences": len(s.cached),
                "prefix_cache_pages": s.prefix_cache_pages(), "reused_prefix_tokens": s.stats.reused_prefix_tokens,
                "prefill_tokens": s.stats.prefill_tokens, "decode_tokens": s.stats.decode_tokens,
                "decode_steps": s.stats.decode_steps, "drafted_tokens": s.stats.drafted_tokens,
                "accepted_tokens": s.stats.accepted_tokens, "verify_steps": s.stats.verify_steps,
                "verify_tokens": s.stats.verify_tokens, "model_drafted_tokens": s.stats.model_drafted_tokens,
                "model_accepted_tokens": s.stats.model_accepted_tokens,
                "draft_sequences": self.draft.sequence_count() if self.draft is not None else 0}

    def complete(self, prompt: str | Sequence[int] | None = None, *, prefix: str | None = None,
                 suffix: str | None = None, greedy: bool | None = None, fim_order: str = "psm",
                 **sampling) -> "Completion":
        req = self.submit(prompt, prefix=prefix, suffix=suffix, params=self.sampling(greedy, **sampling),
                          fim_order=fim_order)
        self.scheduler.run_until_done([req])
        _raise_if_failed(req)
        return Completion.of(req)

    def generate(self, prompt_ids: str | Sequence[int] | None = None, max_new_tokens: int | None = None,
                 greedy: bool | None = True, *, prefix: str | None = None, suffix: str | None = None,
                 fim_order: str = "psm", **sampling) -> list[int]:
        """New token ids (an eos that ended generation is included, as HF does). Greedy by default."""
        return self.complete(prompt_ids, prefix=prefix, suffix=suffix, greedy=greedy, fim_order=fim_order,
                             max_new_tokens=max_new_tokens, **sampling).token_ids

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int | None = None,
                       greedy: bool | None = True, **sampling) -> list[list[int]]:
        """Several prompts decoded together (continuous batching); same ids as one at a time."""
        params = self.sampling(greedy, max_new_tokens=max_new_tokens, **sampling)
        reqs = [self.submit(p, params=params) for p in prompts]
        self.scheduler.run_until_done(reqs)
        for req in reqs:
            _raise_if_failed(req)
        return [r.output_ids for r in reqs]

    def stream(self, prompt: str | Sequence[int] | None = None, *, prefix: str | None = None,
               suffix: str | None = None, greedy: bool | None = None, fim_order: str = "psm", **sampling):
        """Yield text pieces as they are decoded (never half a UTF-8 character, never part of a stop string)."""
        if self.tokenizer is None:
            raise GptbcError(f"{self.model_dir}: no tokenizer files; streaming text needs one")
        req = self.submit(prompt, prefix=prefix, suffix=suffix, params=self.sampling(greedy, **sampling),
                          fim_order=fim_order)
        try:
            while req.finish_reason is None:
                for event in self.step():
                    if event.request is req and event.error is not None:
                        raise event.error
                    if event.request is req and event.text:
                        yield event.text
        finally:
            self.scheduler.cancel(req)  # a consumer that stops early frees the sequence

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise GptbcError(f"{self.model_dir}: no tokenizer files; pass token ids instead of text")
        return self.tokenizer.encode(text)

    def decode_text(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise GptbcError(f"{self.model_dir}: no tokenizer files; cannot turn ids into text")
        return self.tokenizer.decode([t for t in ids if t not in self.special_ids])


# docs/determinism.md: TVM's paged KV cache attends a chunk's new tokens and its cached pages apart and
# merges the results, and a sequence forked from a cached prefix attends the shared pages and its own apart.
# A batch-invariant library (compile --batch-invariant) splits every row's keys at the same place whatever
# the call (kernels.py, kernels_gpu.py), sums every matmul row in one order whatever the row count
# (schedules.py); this mode makes the cache's splits fall there: prefixes copied, not shared, at multiples
# of the grain, a prompt's later chunks cut at grain boundaries, and prompt-lookup verify calls start at a
# grain boundary (the tokens since it fed again) and end inside that grain (Scheduler.grain); only greedy
# requests draft.
BATCH_INVARIANT_SCOPE = ("the same request (prompt, sampling parameters and seed) gives the same token ids and "
                         "logprobs, bit for bit, alone or in any batch, with or without a reused prefix, prefilled "
                         "whole or in chunks, with or without prompt lookup, on this library's device (CPU and "
                         "GPU libraries each compute their own bits)")


def check_invariant_library(runner: ModelRunner) -> None:
    """The library must be a batch-invariant build whose prefill chunks end on attention grains."""
    grain = runner.attention_grain
    if not grain:
        raise GptbcError(f"--lib {runner.lib} was compiled without --batch-invariant "
                         "(recompile it with `gptbc compile --batch-invariant`)")
    if runner.prefill_chunk_size % grain:
        raise GptbcError(f"--lib {runner.lib}: prefill_chunk_size {runner.prefill_chunk_size} is not a multiple of "
                         f"the attention grain {grain}; recompile with such a --prefill-chunk-size")


def _raise_if_failed(req: Request) -> None:
    """A request the scheduler ended with its own error (e.g. sampling failed) raises that error here."""
    if req.error is not None:
        raise req.error


@dataclasses.dataclass
class Completion:
    """The result of one request."""

    token_ids: list[int]
    text: str | None
    logprobs: list[float] | None
    finish_reason: str
    prompt_tokens: int
    reused_prefix_tokens: int

    @classmethod
    def of(cls, req) -> "Completion":
        return cls(list(req.output_ids), req.text if req.detok is not None else None,
                   list(req.logprobs) if req.params.logprobs else None, req.finish_reason or "length",
                   len(req.prompt_ids), req.reused)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

