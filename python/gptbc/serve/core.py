"""The request and stream core every protocol shares: a `Job` (one API request as prompts and per-choice
sampling), the `Server` state (engine loop, metrics, in-flight count), the request parts common to all
protocols (model check, sampling fields, tokenizing, fitting the window), and running a job: submitting its
choices, turning the engine's events into per-choice `Update`s, and the bookkeeping when it ends.

Protocol modules (openai.py, llamacpp.py) parse their bodies into a Job and shape Updates into answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from gptbc.errors import ContextWindowError, GptbcError
from gptbc.runtime.async_engine import AsyncEngine, EngineDead
from gptbc.runtime.chat_template import CHATML, ChatTemplate
from gptbc.runtime.engine import resolve_fim_order
from gptbc.runtime.sampling import SamplingError, SamplingParams
from gptbc.runtime.scheduler import Request
from gptbc.serve import schema as S
from gptbc.serve.errors import UNION_HELP, ApiError, bad, engine_dead, engine_error
from gptbc.serve.metrics import Metrics
from gptbc.serve.stops import IndentStop, past_time_limit

log = logging.getLogger("gptbc.serve")

DEFAULT_MAX_BODY = 4 << 20  # bytes: a long source file as text or token ids fits easily
# SamplingParams' names → what each API calls them (for error messages).
API_NAMES = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs"}


@dataclass
class Choice:
    """What one choice produced so far, built on the event loop from the engine's immutable events only."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top: list[tuple] = field(default_factory=list)
    prompt_logprobs: tuple | None = None
    prompt_top: tuple | None = None
    finish_reason: str | None = None  # "stop" | "length"
    stop_type: str = "none"  # llama.cpp: "eos" | "limit" | "word"
    first_token_at: float | None = None
    indent: "IndentStop | None" = None


@dataclass
class Update:
    """One choice's news: the text and tokens it gained (tokens[i] has logprobs[i] and top[i])."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[float]
    top: list[tuple]
    finished: bool


@dataclass
class Job:
    """One API request: its prompts (token ids), one SamplingParams per choice, and how to answer."""

    prompts: list[list[int]]
    echo_texts: list[str]
    params: list[SamplingParams]  # len(prompts) × n, choice-major within each prompt
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    n_indent: int = 0
    t_max_predict_ms: int | None = None
    truncated: bool = False
    warm_up: bool = False  # llama.cpp n_predict 0: evaluate the prompt, answer nothing
    request: Any = None  # the validated pydantic model
    choices: list[Choice] = field(default_factory=list)
    began: float = field(default_factory=time.perf_counter)
    finished: bool = False  # Server.finish ran


# llama.cpp's spellings of the repository-name and file-separator tokens (llama-vocab.cpp's FIM_REP and FIM_SEP
# lists), with StarCoder 2's <repo_name>/<file_sep> added: llama.cpp gets those from the GGUF's metadata.
REPO_TOKENS = ("<repo_name>", "<|repo_name|>", "<|fim_repo|>", "<fim-repo>", "<REPO>", "<reponame>")
FILE_SEP_TOKENS = ("<file_sep>", "<|file_sep|>")


def repository_tokens(engine) -> tuple[int | None, int | None]:
    """(repository-name token, file-separator token) of a FIM-capable tokenizer, None where it has none."""
    if engine.tokenizer is None or engine.fim is None:
        return None, None
    from gptbc.runtime.tokenizer import vocabulary

    vocab = vocabulary(engine.model_dir)
    repo = next((vocab[n] for n in REPO_TOKENS if n in vocab), None)
    sep = next((vocab[n] for n in FILE_SEP_TOKENS if n in vocab), None)
    return repo, sep


class Server:
    """The ASGI app's state and handlers."""

    def __init__(self, engine, model_name: str, api_key: str | None = None, max_queue: int = 64,
                 max_body_bytes: int = DEFAULT_MAX_BODY, on_fatal: Callable[[BaseException], None] | None = None,
                 fim_order: str = "auto", trained_fim_orders: list[str] | None = None):
        """`fim_order`: the FIM order of requests that name none ("auto": SPM where `trained_fim_orders`, the
        orders the model was trained with, has it, else PSM)."""
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.trained_fim_orders = trained_fim_orders
        self.fim_order = resolve_fim_order(fim_order, trained_fim_orders)
        self.max_queue, self.max_body_bytes = max_queue, max_body_bytes
        self.on_fatal = on_fatal
        self.loop = AsyncEngine(engine, on_fatal=self._fatal)
        self.metrics = Metrics(self.loop)
        self.inflight = 0  # choices accepted and not finished (event-loop thread only)
        self.created = int(time.time())
        self.repo_token, self.file_sep_token = repository_tokens(engine)
        # A model without a chat template chats in ChatML, as llama.cpp's server does (see CHATML).
        self.chat_template = engine.chat_template or ChatTemplate(CHATML, {})
        self.chat_template_name = "model" if engine.chat_template is not None else "chatml (default)"
        if engine.chat_template is None and engine.tokenizer is not None:
            log.warning("%s has no chat template: /v1/chat/completions uses ChatML, which a base model was not "
                        "trained on", engine.model_dir)

    def _fatal(self, err: BaseException) -> None:
        log.critical("the engine failed and cannot recover (%s: %s); stopping the server", type(err).__name__, err)
        if self.on_fatal is not None:
            self.on_fatal(err)

    # ---- shared request parts ----
    def check_model(self, model: str | None) -> None:
        """Another model's name is a 404; no name or "" (what llama.vim sends by default) is this one."""
        if model and model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(self, r: S.SamplingFields, max_tokens: int, n_choices: int = 1, logprobs: int | None = None,
                 echo: bool = False, extra: dict | None = None, names: dict | None = None) -> list[SamplingParams]:
        stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if len(stop) > S.MAX_STOPS:
            raise bad("stop", UNION_HELP["stop"])
        fields = dict(max_new_tokens=max_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                      min_p=r.min_p, repetition_penalty=r.repetition_penalty, presence_penalty=r.presence_penalty,
                      frequency_penalty=r.frequency_penalty, ignore_eos=r.ignore_eos, stop=[s for s in stop if s],
                      logprobs=logprobs is not None, top_logprobs=logprobs or 0,
                      prompt_logprobs=echo and logprobs is not None) | (extra or {})
        seed = getattr(r, "seed", None)
        seed = None if seed is None or seed < 0 else seed
        try:
            base = self.engine.defaults.replace(**fields)
            return [base.replace(seed=None if seed is None else (seed + i) % 2**64) for i in range(n_choices)]
        except SamplingError as err:  # a combination the schema's ranges let through (with model defaults)
            name = (names or {}).get(err.field) or API_NAMES.get(err.field, err.field)
            raise bad(name, f"{err.value!r}: must be {err.rule}") from None

    def text_ids(self, text: str, param: str) -> list[int]:
        try:
            return self.engine.encode(text)
        except GptbcError as err:
            raise bad(param, str(err)) from None

    def checked_ids(self, ids: list[int], param: str) -> list[int]:
        try:
            self.engine.check_ids(ids)
        except GptbcError as err:
            raise bad(param, str(err)) from None
        return list(ids)

    def fim_order_of(self, requested: str | None) -> str:
        """The order a request gets: its own fim_order, else the server's (schema.FimOrder checked the value)."""
        return requested or self.fim_order

    def fim_info(self) -> dict | None:
        """/v1/models' `fim`: the order served by default and the orders the model was trained with."""
        if self.engine.fim is None:
            return None
        return {"served": self.fim_order, "trained": self.trained_fim_orders}

    def fim_ids(self, prefix: str, suffix: str, param: str, params: SamplingParams | None = None,
                order: str | None = None) -> list[int]:
        try:
            return self.engine.fim_prompt(prefix, suffix, params, self.fim_order_of(order))
        except GptbcError as err:
            raise bad(param, str(err)) from None

    def fit(self, job: Job, param: str = "prompt", max_tokens: str = "max_tokens") -> Job:
        """Each prompt plus its max_tokens must fit the context window (the engine decides)."""
        for i, ids in enumerate(job.prompts):
            try:
                self.engine.fit_prompt(ids, job.params[i * job.n])
            except ContextWindowError as err:
                raise ApiError(400, f"{param}: {err.render(max_tokens, None)}", param=param,
                               code="context_length_exceeded") from None
            except GptbcError as err:
                raise bad(param, str(err)) from None
        return job

    # ---- running a job (event loop) ----
    async def start(self, job: Job) -> tuple[list[Request], asyncio.Queue]:
        """Submit every choice; events arrive on one queue as (choice index, Event | Exception).

        If the caller is cancelled while the engine thread accepts the choices (its client left), the
        in-flight count is given back and every choice the engine does accept is cancelled there."""
        if not self.loop.healthy:
            raise engine_dead()
        n_choices = len(job.params)
        if self.inflight + n_choices > self.engine.max_batch_size + self.max_queue:
            raise ApiError(503, f"server busy: {self.inflight} sequences running or queued "
                                f"(--max-batch {self.engine.max_batch_size} + --max-queue {self.max_queue}); "
                                f"retry shortly", code="server_overloaded", headers={"Retry-After": "1"})
        aio = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        futures = []
        self.inflight += n_choices
        try:
            for i, params in enumerate(job.params):
                def deliver(item, i=i):
                    aio.call_soon_threadsafe(events.put_nowait, (i, item))

                futures.append(self.loop.submit(job.prompts[i // job.n], params, deliver))
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        except BaseException:
            self.inflight -= n_choices
            def cancel_when_accepted(f):
                if not f.cancelled() and f.exception() is None:
                    self.loop.cancel(f.result())

            for fut in futures:  # accepted after we stopped waiting: cancel it on the engine thread
                fut.add_done_callback(cancel_when_accepted)
            raise
        reqs = [r for r in results if isinstance(r, Request)]
        failed = [r for r in results if not isinstance(r, Request)]
        if failed:
            self.inflight -= n_choices
            for req in reqs:
                self.loop.cancel(req)
            err = failed[0]
            if isinstance(err, EngineDead):
                raise engine_dead()
            if isinstance(err, GptbcError):
                raise ApiError(400, f"prompt: {err}", param="prompt", code="invalid_value")
            raise err
        job.choices = [Choice(indent=IndentStop(job.n_indent) if job.n_indent > 0 else None) for _ in reqs]
        self.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))
        return reqs, events

    async def updates(self, job: Job, reqs: list[Request], events: asyncio.Queue) -> AsyncIterator[Update]:
        """Each choice's progress from the engine's events until every choice finished (or ended early by
        n_indent / t_max_predict_ms); an error raises as an ApiError."""
        done = sum(c.finish_reason is not None for c in job.choices)
        while done < len(reqs):
            i, item = await events.get()
            choice = job.choices[i]
            if choice.finish_reason is not None:
                continue  # ended here early; the engine had not seen the cancel yet
            if isinstance(item, Exception):
                raise engine_error(item)
            if item.error is not None:
                self.metrics.failed.inc()
                raise ApiError(500, f"generation failed for this request: {type(item.error).__name__}: "
                                    f"{item.error}", code="generation_failed")
            now = time.perf_counter()
            if item.prompt_logprobs is not None:
                choice.prompt_logprobs, choice.prompt_top = item.prompt_logprobs, item.prompt_top_logprobs
            tokens, lps, tops = [], [], []
            if item.token is not None:
                choice.first_token_at = choice.first_token_at or now
                choice.ids.append(item.token)
                tokens.append(item.token)
                if item.logprob is not None:
                    choice.logprobs.append(item.logprob)
                    choice.top.append(item.top_logprobs)
                    lps.append(item.logprob)
                    tops.append(item.top_logprobs)
            text, finished = item.text, item.finished
            if finished:
                choice.finish_reason = "length" if item.finish_reason == "length" else "stop"
                choice.stop_type = "limit" if item.finish_reason == "length" else (
                    "eos" if item.token in self.engine.eos_ids else "word")
            if choice.indent is not None:
                text, cut = choice.indent.feed(text)
                if cut and not finished:
                    finished, choice.finish_reason, choice.stop_type = True, "stop", "limit"
                    self.loop.cancel(reqs[i], keep=True)  # a stop, not a failure: the next keystroke forks it
                elif finished:
                    text += choice.indent.flush()
            if (not finished and choice.first_token_at is not None
                    and past_time_limit(text, (now - choice.first_token_at) * 1000, job.t_max_predict_ms)):
                finished, choice.finish_reason, choice.stop_type = True, "length", "limit"
                self.loop.cancel(reqs[i], keep=True)
            choice.text += text
            done += finished
            yield Update(i, text, tokens, lps, tops, finished)

    def finish(self, job: Job, reqs: list[Request]) -> None:
        """Bookkeeping once a job is over (normally or not): cancel what still runs. Runs once per job."""
        if job.finished:
            return
        job.finished = True
        for i, req in enumerate(reqs):
            choice = job.choices[i] if i < len(job.choices) else None
            if choice is None or choice.finish_reason is None:
                self.metrics.cancelled.inc()
                self.loop.cancel(req)
            self.metrics.generation_tokens.inc(len(choice.ids) if choice and not job.warm_up else 0)
        self.inflight -= len(reqs)
        self.metrics.latency.observe(time.perf_counter() - job.began)

    # ---- answer shapes ----
    def piece(self, t: int) -> str:
        tok = self.engine.tokenizer
        return tok.decode([t]) if tok is not None else str(t)

    def usage(self, job: Job) -> dict:
        prompt = sum(len(job.prompts[i // job.n]) for i in range(0, len(job.params), job.n))
        done = 0 if job.warm_up else sum(len(c.ids) for c in job.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
