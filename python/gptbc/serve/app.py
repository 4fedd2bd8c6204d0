"""`gptbc serve`: OpenAI- and llama.cpp-compatible endpoints over one engine loop (FastAPI on uvicorn).

Two threads share the work. Uvicorn's event loop parses HTTP and streams responses; request bodies are
parsed, validated (api_schema's pydantic models) and tokenized in worker threads, never on the event loop.
One engine thread (async_engine.AsyncEngine) owns the Engine and runs `Engine.step()` while any request is
queued or running, so all clients share continuous batching. Each request reads only the immutable events
the engine thread hands back, never the engine's own lists.

Failures: a request whose sampling or scoring fails ends alone (500 `generation_failed`); a failed engine step
fails the requests it was running (500 `engine_step_failed`) and the engine goes on; an engine that cannot go
on answers every request 503 `engine_dead`, turns /health to 503 and stops the process with exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from pydantic import BaseModel, ValidationError
from starlette.requests import Request as HttpRequest  # module level: FastAPI resolves the annotations

from gptbc.serve import schema as S
from gptbc.runtime.async_engine import AsyncEngine, EngineDead, EngineStepError
from gptbc.errors import ContextWindowError, GptbcError
from gptbc.runtime.sampling import SamplingError, SamplingParams
from gptbc.runtime.scheduler import Event, Request

log = logging.getLogger("gptbc.serve")

DEFAULT_MAX_BODY = 4 << 20  # bytes: a long source file as text or token ids fits easily

CHAT_DEFAULT_MAX_TOKENS = 256
# Extra repository context for a tokenizer without StarCoder's <repo_name>/<file_sep> tokens: each chunk of
# input_extra becomes this header and its text, at the start of the FIM prefix.
PLAIN_EXTRA_HEADER = "# file: {filename}\n"
# SamplingParams' names → what each API calls them (for error messages).
API_NAMES = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs"}


# ---------------------------------------------------------------------------------------------
# errors in the OpenAI shape
# ---------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


UNION_HELP = {"prompt": "must be a string, a list of strings, a list of token ids or a list of such lists",
              "stop": f"must be a string or a list of at most {S.MAX_STOPS} strings"}


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's errors as one 400 naming the first field at fault."""
    first = errors[0]
    loc = [x for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"request body: not valid JSON ({first.get('ctx', {}).get('error', '')})",
                        code="invalid_json")
    if not loc:
        return ApiError(400, "request body: must be a JSON object", code="invalid_json")
    param = str(loc[0])
    if len([e for e in errors if [x for x in e.get("loc", ()) if x != "body"][:1] == loc[:1]]) > 1:
        message = UNION_HELP.get(param, "has the wrong type")
    elif first.get("type") == "missing":
        message = "is required"
    else:
        inner = ".".join(str(x) for x in loc[1:] if not (isinstance(x, str) and "[" in x))
        message = (f"{inner}: " if inner else "") + first.get("msg", "is not valid")
        given = first.get("input")
        if isinstance(given, (int, float, bool)) or (isinstance(given, str) and len(given) < 40):
            message += f" (got {json.dumps(given)[:60]})"
    return bad(param, message)


def parse_json(raw: bytes) -> Any:
    """JSON → Python, any failure (bad UTF-8, nesting deeper than the parser's stack, a 5000-digit integer)
    a 400 instead of a 500."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body: not valid JSON ({err})", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body: JSON nested too deeply", code="invalid_json") from None
    except ValueError as err:  # e.g. an integer literal past Python's digit limit
        raise ApiError(400, f"request body: {err}", code="invalid_json") from None


def validate(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, "request body: must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None
    except RecursionError:
        raise ApiError(400, "request body: nested too deeply", code="invalid_json") from None


# ---------------------------------------------------------------------------------------------
# metrics (prometheus_client, one registry per server)
# ---------------------------------------------------------------------------------------------

class Metrics:
    def __init__(self, loop: AsyncEngine):
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        disable_created_metrics()  # no *_created series: one sample per counter
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gptbc_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gptbc_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.generation_tokens = Counter("gptbc_generation_tokens", "Tokens generated.", registry=r)
        self.cancelled = Counter("gptbc_sequences_cancelled", "Sequences cancelled (client gone or stopped early).",
                                 registry=r)
        self.failed = Counter("gptbc_sequences_failed", "Sequences ended by their own error (sampling, scoring).",
                              registry=r)
        self.latency = Histogram("gptbc_request_duration_seconds", "Time from request to last token.",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)

        class Engine:
            def collect(self):
                g, total = loop.gauges, loop.gauges["kv_pages_total"]

                def gauge(name, doc, value):
                    return GaugeMetricFamily(name, doc, value=value)

                yield gauge("gptbc_requests_running", "Sequences in the running batch.", g["running"])
                yield gauge("gptbc_requests_waiting", "Sequences queued for a batch slot.", g["waiting"])
                yield gauge("gptbc_batch_size", "Sequences decoded in the last engine step.", g["batch_size"])
                yield gauge("gptbc_kv_pages_total", "Pages of the paged KV cache.", total)
                yield gauge("gptbc_kv_pages_in_use", "KV pages held by sequences (running or prefix cache).",
                            total - g["kv_pages_free"])
                yield gauge("gptbc_kv_pages_prefix_cache", "KV pages of finished sequences kept for prefix reuse "
                            "(forks share pages, so this is an upper bound).", g["prefix_cache_pages"])
                yield gauge("gptbc_kv_sequences", "Sequences holding KV pages (running or in the prefix cache).",
                            g["kv_sequences"])
                yield gauge("gptbc_prefix_cache_sequences", "Finished sequences kept for prefix reuse.",
                            g["prefix_cache_sequences"])
                yield gauge("gptbc_engine_healthy", "1 while the engine thread runs, 0 once it failed.",
                            1 if loop.healthy else 0)
                yield CounterMetricFamily("gptbc_engine_step_failures", "Engine steps that raised (their batch "
                                          "was failed).", value=loop.step_failures)
                # Prompt-lookup speculation (--prompt-lookup): drafted and kept tokens, and per-request decode
                # steps against tokens generated after the first (tokens per step = their ratio; 1 without it).
                yield CounterMetricFamily("gptbc_draft_tokens", "Prompt-lookup draft tokens proposed.",
                                          value=g["drafted_tokens"])
                yield CounterMetricFamily("gptbc_draft_tokens_accepted", "Prompt-lookup draft tokens the model "
                                          "agreed with.", value=g["accepted_tokens"])
                yield CounterMetricFamily("gptbc_decode_steps", "Per-request decode steps (a verified draft is one).",
                                          value=g["decode_steps"])
                yield CounterMetricFamily("gptbc_decode_tokens", "Tokens generated by decode steps.",
                                          value=g["decode_tokens"])
                yield gauge("gptbc_draft_acceptance_rate", "Accepted / proposed draft tokens so far (0 without drafts).",
                            g["accepted_tokens"] / g["drafted_tokens"] if g["drafted_tokens"] else 0.0)
                yield gauge("gptbc_tokens_per_decode_step", "Decode tokens / decode steps so far (1 without drafts).",
                            g["decode_tokens"] / g["decode_steps"] if g["decode_steps"] else 0.0)

        r.register(Engine())

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------

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


class IndentStop:
    """llama.cpp's n_indent: after the first line, a line indented less than n_indent (and not blank) ends the
    completion; the text is cut at that line's first non-blank character. Text whose indentation is still
    undecided is held back."""

    def __init__(self, n_indent: int):
        self.n_indent, self.pending, self.seen_newline = n_indent, "", False

    def feed(self, text: str) -> tuple[str, bool]:
        out = ""
        for ch in text:
            if not self.seen_newline:
                out += ch
                self.seen_newline = ch == "\n"
                continue
            if self.pending is not None and ch in " \t":
                self.pending += ch
                continue
            if self.pending is not None:
                indent = len(self.pending)
                if ch != "\n" and indent < self.n_indent:
                    return out + self.pending, True
                out += self.pending
                self.pending = None if ch != "\n" else ""
            out += ch
            if ch == "\n":
                self.pending = ""
        return out, False

    def flush(self) -> str:
        out, self.pending = (self.pending or ""), ""
        return out


class Server:
    """The ASGI app's state and handlers."""

    def __init__(self, engine, model_name: str, api_key: str | None = None, max_queue: int = 64,
                 max_body_bytes: int = DEFAULT_MAX_BODY, on_fatal: Callable[[BaseException], None] | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_queue, self.max_body_bytes = max_queue, max_body_bytes
        self.on_fatal = on_fatal
        self.loop = AsyncEngine(engine, on_fatal=self._fatal)
        self.metrics = Metrics(self.loop)
        self.inflight = 0  # choices accepted and not finished (event-loop thread only)
        self.created = int(time.time())
        tok = engine.tokenizer
        self.repo_tokens = None
        if tok is not None and engine.fim is not None:
            from gptbc.runtime.tokenizer import vocabulary

            vocab = vocabulary(engine.model_dir)
            if "<repo_name>" in vocab and "<file_sep>" in vocab:
                self.repo_tokens = (vocab["<repo_name>"], vocab["<file_sep>"])

    def _fatal(self, err: BaseException) -> None:
        log.critical("the engine failed and cannot recover (%s: %s); stopping the server", type(err).__name__, err)
        if self.on_fatal is not None:
            self.on_fatal(err)

    # ---- shared request parts ----
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
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

    def fim_ids(self, prefix: str, suffix: str, param: str, params: SamplingParams | None = None) -> list[int]:
        try:
            return self.engine.fim_prompt(prefix, suffix, params)
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

    # ---- parsing each endpoint (worker threads) ----
    def parse_completion(self, body: Any) -> Job:
        r: S.CompletionRequest = validate(S.CompletionRequest, body)
        self.check_model(r.model)
        if r.best_of is not None and r.best_of != r.n:
            raise bad("best_of", "only best_of == n is supported")
        if r.suffix is not None:
            if not isinstance(r.prompt, str):
                raise bad("prompt", "must be a string when suffix is given (fill-in-the-middle)")
            if r.echo:
                raise bad("echo", "cannot be combined with suffix (fill-in-the-middle)")
            prompts, texts = [self.fim_ids(r.prompt, r.suffix, "suffix")], [r.prompt]
        else:
            items = [r.prompt] if isinstance(r.prompt, str) or (r.prompt and isinstance(r.prompt[0], int)) \
                else r.prompt
            if not items:
                raise bad("prompt", "is empty: give at least one token")
            prompts, texts = [], []
            for item in items:
                if isinstance(item, str):
                    prompts.append(self.text_ids(item, "prompt"))
                    texts.append(item)
                else:
                    prompts.append(self.checked_ids(item, "prompt"))
                    texts.append(self.engine.decode_text(item) if self.engine.tokenizer else "")
        if len(prompts) * r.n > S.MAX_CHOICES:
            raise bad("n", f"{len(prompts)} prompts × n {r.n} exceeds {S.MAX_CHOICES} choices per request")
        params = self.sampling(r, r.max_tokens, r.n, r.logprobs, r.echo)
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        job = Job(prompts, texts, params * len(prompts), r.n, r.stream, include_usage, r.echo, r.logprobs, request=r)
        return self.fit(job)

    def parse_fim(self, body: Any) -> Job:
        r: S.FimRequest = validate(S.FimRequest, body)
        self.check_model(r.model)
        params = self.sampling(r, r.max_tokens)
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        return self.fit(Job([self.fim_ids(r.prompt, r.suffix or "", "suffix")], [r.prompt], params, 1, r.stream,
                            include_usage, request=r))

    def parse_chat(self, body: Any) -> Job:
        r: S.ChatRequest = validate(S.ChatRequest, body)
        self.check_model(r.model)
        template = self.engine.chat_template
        if template is None:
            raise ApiError(400, f"messages: model {self.model_name!r} has no chat template (tokenizer_config.json "
                                f"chat_template); use /v1/completions, /v1/fim/completions or /infill",
                           param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.content if not isinstance(m.content, list)
                     else "".join(p.text for p in m.content)} for m in r.messages]
        try:
            text = template.render(messages)
        except GptbcError as err:
            raise bad("messages", str(err).split(": ", 1)[-1]) from None
        max_tokens = r.max_tokens if r.max_tokens is not None else r.max_completion_tokens
        ids = self.text_ids(text, "messages")
        if max_tokens is None:
            max_tokens = max(min(CHAT_DEFAULT_MAX_TOKENS, self.engine.context_window_size - len(ids)), 1)
        eos = template.special.get("eos_token")
        extra_stop = [i for i in (self.engine.encode(eos) if eos else []) if i in self.engine.special_ids][:1]
        logprobs = (r.top_logprobs or 0) if r.logprobs else None
        params = self.sampling(r, max_tokens, r.n, logprobs, extra={"stop_token_ids": extra_stop},
                               names={"top_logprobs": "top_logprobs"})
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        return self.fit(Job([ids], [text], params, r.n, r.stream, include_usage, logprobs=logprobs, request=r),
                        "messages")

    def llama_params(self, r: S.LlamaFields, n_predict: int, prompt_len: int) -> tuple[list[SamplingParams], bool]:
        """(params, warm-up) of a llama.cpp request: n_predict -1 runs to eos or the window; 0 only evaluates."""
        warm_up = n_predict == 0
        if n_predict < 0:
            n_predict = max(self.engine.context_window_size - prompt_len, 1)
        extra = {"repetition_penalty": r.repeat_penalty} if r.repeat_penalty is not None else {}
        params = self.sampling(r, 1 if warm_up else n_predict, 1, r.n_probs or None, extra=extra,
                               names={"max_new_tokens": "n_predict", "top_logprobs": "n_probs",
                                      "repetition_penalty": "repeat_penalty"})
        return params, warm_up

    def parse_llama_completion(self, body: Any) -> Job:
        r: S.LlamaCompletionRequest = validate(S.LlamaCompletionRequest, body)
        if isinstance(r.prompt, str):
            ids, text = self.text_ids(r.prompt, "prompt"), r.prompt
        else:
            ids, text = self.checked_ids(r.prompt, "prompt"), ""
        if not ids:
            raise bad("prompt", "is empty: give at least one token")
        params, warm_up = self.llama_params(r, r.n_predict, len(ids))
        job = Job([ids], [text], params, 1, r.stream and not warm_up, logprobs=r.n_probs or None,
                  t_max_predict_ms=r.t_max_predict_ms, warm_up=warm_up, request=r)
        return self.fit(job, "prompt", "n_predict")

    def infill_ids(self, r: S.InfillRequest, params: SamplingParams) -> tuple[list[int], bool]:
        """The infill prompt: repository context, then FIM prefix/suffix/middle, then `prompt`. Too long for the
        window: the oldest extra chunks go first, then the far ends of prefix and suffix (truncated=True)."""
        engine, f = self.engine, self.engine.fim
        if engine.tokenizer is None or f is None:
            raise bad("input_prefix", f"{engine.model_dir}: the tokenizer has no fill-in-the-middle tokens")
        middle = engine.encode(r.prompt) if r.prompt else []
        chunks = []
        for c in r.input_extra:
            if self.repo_tokens:
                chunks.append([self.repo_tokens[1], *engine.encode(f"{c.filename}\n{c.text}")])
            else:
                chunks.append(engine.encode(PLAIN_EXTRA_HEADER.format(filename=c.filename) + c.text))
        head = [self.repo_tokens[0], *engine.encode("gptbc\n")] if self.repo_tokens and chunks else []
        budget = engine.context_window_size - params.max_new_tokens
        core = self.fim_ids(r.input_prefix, r.input_suffix, "input_prefix")
        truncated = False
        while chunks and len(head) + sum(map(len, chunks)) + len(core) + len(middle) > budget:
            chunks.pop(0)
            truncated = True
        if not chunks:
            head = []
        if len(core) + len(middle) > budget:
            core = self.fim_ids(r.input_prefix, r.input_suffix, "input_prefix",
                                params.replace(max_new_tokens=params.max_new_tokens + len(middle),
                                               truncate_prompt=True))
            truncated = True
        extra = [t for c in chunks for t in c]
        if self.repo_tokens:  # <repo_name>gptbc\n<file_sep>name\ntext...<fim_prefix>...
            ids = head + extra + core
        else:  # <fim-prefix># file: name\ntext...prefix<fim-suffix>...
            ids = core[:1] + extra + core[1:]
        return ids + middle, truncated

    def parse_infill(self, body: Any) -> Job:
        r: S.InfillRequest = validate(S.InfillRequest, body)
        # n_predict -1: fit as much context as the window holds, then generate into whatever it leaves
        params, warm_up = self.llama_params(r, r.n_predict if r.n_predict >= 0 else 1, 0)
        ids, truncated = self.infill_ids(r, params[0])
        if r.n_predict < 0:
            params = [p.replace(max_new_tokens=max(self.engine.context_window_size - len(ids), 1)) for p in params]
        job = Job([ids], [r.input_prefix], params, 1, r.stream and not warm_up, logprobs=r.n_probs or None,
                  n_indent=r.n_indent, t_max_predict_ms=r.t_max_predict_ms, truncated=truncated, warm_up=warm_up,
                  request=r)
        return self.fit(job, "input_prefix", "n_predict")

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
                    self.loop.cancel(reqs[i])
                elif finished:
                    text += choice.indent.flush()
            if (not finished and job.t_max_predict_ms is not None and choice.first_token_at is not None
                    and (now - choice.first_token_at) * 1000 > job.t_max_predict_ms and "\n" in choice.text + text):
                finished, choice.finish_reason, choice.stop_type = True, "length", "limit"
                self.loop.cancel(reqs[i])
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

    def openai_logprobs(self, job: Job, choice: Choice, tokens, lps, tops, start: int, prompt: bool) -> dict:
        """OpenAI completions logprobs of `tokens` (and the prompt's first, with echo); `start`: the text offset
        of the first token. Every list has one entry per token."""
        def table(pairs):
            return {self.piece(t): lp for t, lp in pairs} if job.logprobs else None

        ids, lp_list, top_list = [], [], []
        if prompt and choice.prompt_logprobs is not None:
            ids += job.prompts[0]
            lp_list += list(choice.prompt_logprobs)
            top_list += [table(p) if p else None for p in choice.prompt_top]
        ids += tokens
        lp_list += lps
        top_list += [table(p) for p in tops]
        pieces = [self.piece(t) for t in ids]
        offsets, pos = [], start
        for p in pieces:
            offsets.append(pos)
            pos += len(p)
        return {"tokens": pieces, "token_logprobs": lp_list, "top_logprobs": top_list if job.logprobs else None,
                "text_offset": offsets}

    def usage(self, job: Job) -> dict:
        prompt = sum(len(job.prompts[i // job.n]) for i in range(0, len(job.params), job.n))
        done = sum(len(c.ids) for c in job.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def llama_probs(self, tokens, lps, tops) -> list[dict]:
        def entry(t, lp):
            piece = self.piece(t)
            return {"id": t, "token": piece, "logprob": lp, "bytes": list(piece.encode())}

        return [entry(t, lp) | {"top_logprobs": [entry(u, v) for u, v in top]} for t, lp, top in zip(tokens, lps, tops)]

    def llama_body(self, job: Job, req: Request) -> dict:
        c = job.choices[0] if job.choices else Choice()
        end = time.perf_counter()
        first = c.first_token_at or end
        prompt_ms, predicted_ms = (first - job.began) * 1000, (end - first) * 1000
        n_out = 0 if job.warm_up else len(c.ids)
        body = {"content": "" if job.warm_up else c.text, "tokens": [] if job.warm_up else list(c.ids),
                "id_slot": job.request.id_slot, "stop": True, "model": self.model_name,
                "tokens_predicted": n_out, "tokens_evaluated": len(job.prompts[0]),
                "tokens_cached": req.reused if req is not None else 0, "truncated": job.truncated,
                "stop_type": "limit" if job.warm_up else c.stop_type,
                "stopping_word": "", "timings": {
                    "prompt_n": len(job.prompts[0]) - (req.reused if req is not None else 0),
                    "prompt_ms": prompt_ms, "prompt_per_token_ms": prompt_ms / max(len(job.prompts[0]), 1),
                    "prompt_per_second": len(job.prompts[0]) / max(prompt_ms / 1000, 1e-9),
                    "predicted_n": n_out, "predicted_ms": predicted_ms,
                    "predicted_per_token_ms": predicted_ms / max(n_out, 1),
                    "predicted_per_second": n_out / max(predicted_ms / 1000, 1e-9)}}
        if job.logprobs and not job.warm_up:
            body["completion_probabilities"] = self.llama_probs(c.ids, c.logprobs, c.top)
        fields = job.request.response_fields
        if fields is not None:
            body = pick_fields(body, fields)
        return body


def pick_fields(body: dict, paths: list[str]) -> dict:
    """llama.cpp's response_fields: {path: value} for each 'a/b' path found (missing ones left out)."""
    out = {}
    for path in paths:
        cur, ok = body, bool(path)
        for key in path.split("/"):
            if ok and isinstance(cur, dict) and key in cur:
                cur = cur[key]
            else:
                ok = False
        if ok:
            out[path] = cur
    return out


def engine_dead() -> ApiError:
    return ApiError(503, "the engine failed and the server is stopping; retry against a restarted server",
                    code="engine_dead")


def engine_error(err: Exception) -> ApiError:
    if isinstance(err, EngineDead):
        return engine_dead()
    if isinstance(err, EngineStepError):
        return ApiError(500, str(err), code="engine_step_failed")
    return ApiError(500, f"{type(err).__name__}: {err}", code="internal_error")


# ---------------------------------------------------------------------------------------------
# the ASGI app
# ---------------------------------------------------------------------------------------------

ENDPOINTS = {  # path → (request model, what it is)
    "/v1/completions": (S.CompletionRequest, "OpenAI completions (prompt, suffix for FIM)"),
    "/completions": (S.CompletionRequest, "alias of /v1/completions"),
    "/v1/fim/completions": (S.FimRequest, "fill-in-the-middle (Continue's OpenAI provider)"),
    "/v1/chat/completions": (S.ChatRequest, "OpenAI chat completions, with the tokenizer's chat template"),
    "/completion": (S.LlamaCompletionRequest, "llama.cpp completion (Tabby, Continue's llama.cpp provider)"),
    "/infill": (S.InfillRequest, "llama.cpp infill (llama.vim, llama.vscode)"),
    "/tokenize": (S.TokenizeRequest, "llama.cpp tokenize"),
    "/detokenize": (S.DetokenizeRequest, "llama.cpp detokenize"),
}


def build_app(server: Server):
    """A FastAPI app over `server`; the engine thread starts and stops with the app's lifespan."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="gptbc serve", version="1", lifespan=lifespan,
                  description="OpenAI- and llama.cpp-compatible completions for GPTBigCode models. Errors are "
                              "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.")

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def request_validation(_request, err: RequestValidationError):
        return error_response(validation_error(list(err.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):
        log.error("internal error", exc_info=exc)
        return error_response(ApiError(500, "internal server error (see the server log)", code="internal_error"))

    known = set(ENDPOINTS) | {"/v1/models", "/health", "/metrics", "/openapi.json", "/docs"}
    open_paths = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"}
    expected = f"Bearer {server.api_key}".encode() if server.api_key is not None else None

    class Gate:
        """Pure ASGI (streams and disconnects pass untouched): the API key, compared in constant time, and
        the request counter by endpoint and status."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            path, status = scope["path"], [500]
            label = path if path in known else "other"

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                if expected is not None and path not in open_paths:
                    given = dict(scope["headers"]).get(b"authorization", b"")
                    if not hmac.compare_digest(given, expected):
                        err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                       code="invalid_api_key")
                        return await error_response(err)(scope, receive, send_status)
                await self.inner(scope, receive, send_status)
            finally:
                server.metrics.requests.labels(label, str(status[0])).inc()

    app.add_middleware(Gate)

    async def read_body(request: HttpRequest) -> Any:
        limit = server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body: {declared} bytes exceeds the limit of {limit} bytes "
                                f"(--max-body-bytes)", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body: exceeds the limit of {limit} bytes (--max-body-bytes)",
                               code="request_too_large")
        return bytes(body)

    async def prepare(request: HttpRequest, parse: Callable[[Any], Any]) -> Any:
        """Read, parse, validate and tokenize a request body; big bodies off the event loop."""
        raw = await read_body(request)

        def work():
            return parse(parse_json(raw))

        return await run_in_threadpool(work)

    def body_doc(path: str, streams: bool = True) -> dict:
        model = ENDPOINTS[path][0]
        content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
        responses = {"400": {"description": "a bad field (named in error.param)",
                             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}},
                     "503": {"description": "busy (Retry-After) or the engine failed"}}
        schema = {"$ref": f"#/components/schemas/{S.RESPONSE_MODELS[path].__name__}"}
        if path in ("/completion", "/infill"):  # with response_fields: only the fields asked for, by path
            schema = {"anyOf": [schema, {"type": "object", "description": "response_fields given: {path: value} "
                                                                          "for each path found"}]}
        answer = {"application/json": {"schema": schema}}
        if streams:
            answer["text/event-stream"] = {"schema": {  # each event; its data is one JSON chunk (or [DONE])
                "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}
        responses["200"] = {"description": "the answer (server-sent events with stream: true)" if streams
                            else "the answer", "content": answer}
        return {"requestBody": {"required": True, "content": content}, "responses": responses}

    def sse_response(job: Job, reqs: list[Request], chunks: AsyncIterator[dict], done_line: str | None):
        async def sse():
            # A client that disconnects cancels this generator at its `await`, and `finally` cancels the
            # sequences, freeing their KV pages.
            try:
                async for item in chunks:
                    yield f"data: {json.dumps(item)}\n\n"
            except ApiError as err:  # headers are sent: report in-band
                yield f"data: {json.dumps(err.body())}\n\n"
            except Exception as err:  # noqa: BLE001
                log.exception("stream failed")
                yield f"data: {json.dumps(ApiError(500, str(err), code='internal_error').body())}\n\n"
            finally:
                server.finish(job, reqs)
            if done_line:
                yield done_line

        # The background task covers a client gone before the stream even started.
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(server.finish, job, reqs))

    async def run_to_end(request: HttpRequest, job: Job, reqs: list[Request], events: asyncio.Queue) -> None:
        async def drain():
            async for _ in server.updates(job, reqs, events):
                pass

        try:
            await wait_unless_disconnected(request, drain())
        finally:
            server.finish(job, reqs)

    async def wait_unless_disconnected(request: HttpRequest, work) -> None:
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise ApiError(499, "client closed the request")
        task.result()

    async def _disconnected(request: HttpRequest) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def ident(prefix: str = "cmpl") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    # ---- OpenAI completions ----
    @app.post("/v1/completions", openapi_extra=body_doc("/v1/completions"), response_model=None,
              summary=ENDPOINTS["/v1/completions"][1])
    async def completions(request: HttpRequest):
        job = await prepare(request, server.parse_completion)
        reqs, events = await server.start(job)
        rid = ident()
        if job.stream:
            return sse_response(job, reqs, openai_chunks(job, reqs, events, rid), "data: [DONE]\n\n")
        await run_to_end(request, job, reqs, events)
        return JSONResponse(openai_body(job, rid))

    app.add_api_route("/completions", completions, methods=["POST"], openapi_extra=body_doc("/completions"),
                      response_model=None, summary=ENDPOINTS["/completions"][1])

    def text_of(job: Job, i: int) -> str:
        return (job.echo_texts[i // job.n] if job.echo else "") + job.choices[i].text

    def openai_body(job: Job, rid: str) -> dict:
        choices = []
        for i, c in enumerate(job.choices):
            lp = None
            if job.logprobs is not None:
                lp = server.openai_logprobs(job, c, c.ids, c.logprobs, c.top, 0, job.echo)
            choices.append({"index": i, "text": text_of(job, i), "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": server.model_name,
                "choices": choices, "usage": server.usage(job)}

    async def openai_chunks(job: Job, reqs: list[Request], events: asyncio.Queue, rid: str):
        def chunk(choices: list, usage: dict | None = None) -> dict:
            out = {"id": rid, "object": "text_completion", "created": int(time.time()),
                   "model": server.model_name, "choices": choices}
            if job.include_usage:
                out["usage"] = usage
            return out

        offsets = [0] * len(reqs)  # text offset of each choice's next token (logprobs)
        echo_scored = [False] * len(reqs)
        if job.echo:
            for i in range(len(reqs)):
                offsets[i] = 0
            yield chunk([{"index": i, "text": job.echo_texts[i // job.n], "logprobs": None, "finish_reason": None}
                         for i in range(len(reqs))])
        async for u in server.updates(job, reqs, events):
            c = job.choices[u.index]
            lp = None
            if job.logprobs is not None:
                with_prompt = job.echo and not echo_scored[u.index]
                lp = server.openai_logprobs(job, c, u.tokens, u.logprobs, u.top, offsets[u.index], with_prompt)
                echo_scored[u.index] = echo_scored[u.index] or with_prompt
                offsets[u.index] = (lp["text_offset"][-1] + len(lp["tokens"][-1])) if lp["tokens"] \
                    else offsets[u.index]
            if u.text or u.finished or (lp and lp["tokens"]):
                yield chunk([{"index": u.index, "text": u.text, "logprobs": lp,
                              "finish_reason": c.finish_reason if u.finished else None}])
        if job.include_usage:
            yield chunk([], server.usage(job))

    # ---- FIM (Continue's OpenAI provider, Mistral's shape) ----
    @app.post("/v1/fim/completions", openapi_extra=body_doc("/v1/fim/completions"), response_model=None,
              summary=ENDPOINTS["/v1/fim/completions"][1])
    async def fim(request: HttpRequest):
        return await chat_shaped(request, server.parse_fim, "fim", role=False)

    async def chat_shaped(request: HttpRequest, parse, id_prefix: str, role: bool):
        """/v1/fim/completions and /v1/chat/completions answer alike: chat.completion (chunks with a delta)."""
        job = await prepare(request, parse)
        reqs, events = await server.start(job)
        rid = ident(id_prefix)
        if job.stream:
            return sse_response(job, reqs, delta_chunks(job, reqs, events, rid, role=role), "data: [DONE]\n\n")
        await run_to_end(request, job, reqs, events)
        return JSONResponse(chat_body(job, rid))

    def chat_body(job: Job, rid: str) -> dict:
        choices = []
        for i, c in enumerate(job.choices):
            choice = {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                      "finish_reason": c.finish_reason}
            if job.logprobs is not None:
                choice["logprobs"] = {"content": chat_logprobs(c.ids, c.logprobs, c.top)}
            choices.append(choice)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": server.model_name,
                "choices": choices, "usage": server.usage(job)}

    def chat_logprobs(tokens, lps, tops) -> list[dict]:
        def entry(t, lp):
            piece = server.piece(t)
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

        return [entry(t, lp) | {"top_logprobs": [entry(u, v) for u, v in top]} for t, lp, top in zip(tokens, lps, tops)]

    async def delta_chunks(job: Job, reqs: list[Request], events: asyncio.Queue, rid: str, role: bool):
        """chat.completion.chunk events: every chunk has choices[0].delta (Continue reads
        choices[0].delta.content of each one)."""
        def chunk(choices: list, usage: dict | None = None) -> dict:
            out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                   "model": server.model_name, "choices": choices}
            if job.include_usage:
                out["usage"] = usage
            return out

        if role:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(reqs))])
        async for u in server.updates(job, reqs, events):
            c = job.choices[u.index]
            if u.text or u.finished or u.tokens and job.logprobs is not None:
                lp = {"content": chat_logprobs(u.tokens, u.logprobs, u.top)} if job.logprobs is not None else None
                yield chunk([{"index": u.index, "delta": {"content": u.text}, "logprobs": lp,
                              "finish_reason": c.finish_reason if u.finished else None}])
        if job.include_usage:
            yield chunk([], server.usage(job))

    # ---- chat ----
    @app.post("/v1/chat/completions", openapi_extra=body_doc("/v1/chat/completions"), response_model=None,
              summary=ENDPOINTS["/v1/chat/completions"][1])
    async def chat(request: HttpRequest):
        return await chat_shaped(request, server.parse_chat, "chatcmpl", role=True)

    # ---- llama.cpp ----
    async def llama(request: HttpRequest, parse):
        job = await prepare(request, parse)
        reqs, events = await server.start(job)
        if job.stream:
            return sse_response(job, reqs, llama_chunks(job, reqs, events), None)  # llama.cpp sends no [DONE]
        await run_to_end(request, job, reqs, events)
        return JSONResponse(server.llama_body(job, reqs[0]))

    async def llama_chunks(job: Job, reqs: list[Request], events: asyncio.Queue):
        async for u in server.updates(job, reqs, events):
            if u.text or (job.logprobs and u.tokens):
                out = {"content": u.text, "stop": False, "id_slot": job.request.id_slot, "tokens": u.tokens}
                if job.logprobs:
                    out["completion_probabilities"] = server.llama_probs(u.tokens, u.logprobs, u.top)
                yield out
        yield server.llama_body(job, reqs[0]) | {"content": "", "tokens": []} \
            if job.request.response_fields is None else server.llama_body(job, reqs[0])

    @app.post("/completion", openapi_extra=body_doc("/completion"), response_model=None,
              summary=ENDPOINTS["/completion"][1])
    async def llama_completion(request: HttpRequest):
        return await llama(request, server.parse_llama_completion)

    @app.post("/infill", openapi_extra=body_doc("/infill"), response_model=None, summary=ENDPOINTS["/infill"][1])
    async def infill(request: HttpRequest):
        return await llama(request, server.parse_infill)

    @app.post("/tokenize", openapi_extra=body_doc("/tokenize", False), response_model=None,
              summary=ENDPOINTS["/tokenize"][1])
    async def tokenize(request: HttpRequest):
        def parse(body):
            r = validate(S.TokenizeRequest, body)
            ids = server.text_ids(r.content, "content")
            return {"tokens": [{"id": t, "piece": server.piece(t)} for t in ids] if r.with_pieces else ids}

        return JSONResponse(await prepare(request, parse))

    @app.post("/detokenize", openapi_extra=body_doc("/detokenize", False), response_model=None,
              summary=ENDPOINTS["/detokenize"][1])
    async def detokenize(request: HttpRequest):
        def parse(body):
            r = validate(S.DetokenizeRequest, body)
            ids = server.checked_ids(r.tokens, "tokens")
            try:
                return {"content": server.engine.decode_text(ids) if ids else ""}
            except GptbcError as err:
                raise bad("tokens", str(err)) from None

        return JSONResponse(await prepare(request, parse))

    # ---- model, health, metrics ----
    @app.get("/v1/models", response_model=S.ModelList)
    async def models():
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.created, "owned_by": "gptbc",
            "context_window": server.engine.context_window_size, "quantization": server.engine.quantization,
            "activations": server.engine.activations}]}

    @app.get("/health", response_model=S.Health, responses={503: {"model": S.Health}})
    async def health():
        if not server.loop.healthy:
            err = server.loop.fatal
            return JSONResponse({"status": "error", "model": server.model_name,
                                 "error": f"engine failed: {type(err).__name__}: {err}" if err else "engine stopped"},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": server.model_name})

    @app.get("/metrics", response_class=Response)
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in [*S.REQUEST_MODELS, *set(S.RESPONSE_MODELS.values()), S.ErrorResponse]:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            vocab, window = server.engine.config.vocab_size, server.engine.context_window_size

            def token_ids(node):  # every integer inside a prompt/tokens field is a token id
                if isinstance(node, dict):
                    if node.get("type") == "integer":
                        node.update(minimum=0, maximum=vocab - 1)
                    for v in node.values():
                        token_ids(v)
                elif isinstance(node, list):
                    for v in node:
                        token_ids(v)

            for js in components.values():  # this server's own limits: its model name, vocabulary, window
                props = js.get("properties", {}) if js.get("title", "").endswith("Request") else {}
                if "model" in props:  # the one name the OpenAI endpoints accept (else 404)
                    props["model"] = {"anyOf": [{"type": "string", "enum": [server.model_name]}, {"type": "null"}],
                                      "description": "the served model (GET /v1/models); another name is a 404"}
                for name in ("prompt", "tokens"):
                    if name in props:
                        token_ids(props[name])
                for name in ("max_tokens", "max_completion_tokens", "n_predict"):
                    for alt in props.get(name, {}).get("anyOf", [props.get(name, {})]):
                        if alt.get("type") == "integer":
                            alt["maximum"] = window  # prompt + new tokens must fit the context window
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def serve(engine, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, max_queue: int = 64, max_body_bytes: int = DEFAULT_MAX_BODY,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run until interrupted. `port` 0 picks a free port; `on_ready` gets the base URL once listening.
    An engine that fails beyond recovery stops the server and raises GptbcError (exit status 1)."""
    import uvicorn

    server = Server(engine, model_name or engine.model_dir.name, api_key, max_queue, max_body_bytes)
    config = uvicorn.Config(build_app(server), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)

    class Uvicorn(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, so the process would die of the
            # signal; a server stopped on purpose should exit 0.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    http = Uvicorn(config)
    server.on_fatal = lambda _err: setattr(http, "should_exit", True)
    sock = listen(host, port)
    base = f"http://{_url_host(sock.getsockname()[0])}:{sock.getsockname()[1]}"

    async def main():
        task = asyncio.create_task(http.serve(sockets=[sock]))
        while not http.started and not task.done():
            await asyncio.sleep(0.05)
        if http.started and on_ready is not None:
            on_ready(base)
        await task

    try:
        asyncio.run(main())
    finally:
        sock.close()
    if server.loop.fatal is not None:
        err = server.loop.fatal
        raise GptbcError(f"serve: the engine failed ({type(err).__name__}: {err}); stopped so that a supervisor "
                         f"can restart it")


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (port 0: a free one); a bad address is a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
        return sock
    except OSError as err:
        raise GptbcError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
