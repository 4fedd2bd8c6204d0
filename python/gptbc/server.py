"""`gptbc serve`: OpenAI-compatible completions and llama.cpp-style `/infill` over one engine loop.

Two threads share the work. Uvicorn's event loop parses HTTP, validates requests and streams
responses; one engine thread owns the Engine (every TVM call, the KV cache, the scheduler) and runs
`Engine.step()` while any request is queued or running, so all clients share continuous batching.
The event loop sends the engine thread closures (submit, cancel) through a queue; the engine thread
hands each step's events back through the event loop's `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import GptbcError
from .async_engine import AsyncEngine
from .errors import ContextWindowError
from .scheduler import Request
from .sampling import MAX_TOP_LOGPROBS, SamplingParams

log = logging.getLogger("gptbc.serve")

MAX_CHOICES = 16  # n × number of prompts in one request
DEFAULT_MAX_BODY = 4 << 20  # bytes: a long source file as text or token ids fits easily


# ---------------------------------------------------------------------------------------------
# errors in the OpenAI shape
# ---------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error",
             500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


class Fields:
    """Typed access to a JSON request body; a wrong type or range is a 400 naming the field."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise ApiError(400, "request body: must be a JSON object", code="invalid_json")
        self.body = body

    def get(self, name: str, default: Any = None) -> Any:
        value = self.body.get(name)
        return default if value is None else value

    def integer(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        v = self.get(name, default)
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(name, f"must be an integer, got {json.dumps(v)[:40]}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise bad(name, f"{v} is out of range [{lo if lo is not None else '-inf'}, "
                            f"{hi if hi is not None else 'inf'}]")
        return v

    def number(self, name: str, default: float | None, lo: float, hi: float) -> float | None:
        v = self.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(name, f"must be a number, got {json.dumps(v)[:40]}")
        if not lo <= v <= hi:
            raise bad(name, f"{v} is out of range [{lo}, {hi}]")
        return float(v)

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise bad(name, f"must be true or false, got {json.dumps(v)[:40]}")
        return v

    def text(self, name: str, default: str | None = None) -> str | None:
        v = self.get(name, default)
        if v is not None and not isinstance(v, str):
            raise bad(name, f"must be a string, got {json.dumps(v)[:40]}")
        return v

    def stops(self, name: str = "stop") -> list[str]:
        v = self.get(name, [])
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > 16:
            raise bad(name, "must be a string or a list of at most 16 strings")
        return [s for s in v if s]


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (endpoint, status) → count
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cancelled: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def count(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def observe(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
        self.latency_counts[i] += 1
        self.latency_sum += seconds

    def render(self, loop: AsyncEngine) -> str:
        g, total = loop.gauges, loop.gauges["kv_pages_total"]
        lines = ["# HELP gptbc_requests_total HTTP requests answered, by endpoint and status.",
                 "# TYPE gptbc_requests_total counter"]
        lines += [f'gptbc_requests_total{{endpoint="{ep}",status="{st}"}} {n}'
                  for (ep, st), n in sorted(self.requests.items())]

        def one(name: str, kind: str, help_: str, value: float) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"])

        one("gptbc_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", self.prompt_tokens)
        one("gptbc_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
        one("gptbc_sequences_cancelled_total", "counter", "Sequences cancelled (client gone).", self.cancelled)
        one("gptbc_requests_running", "gauge", "Sequences in the running batch.", g["running"])
        one("gptbc_requests_waiting", "gauge", "Sequences queued for a batch slot.", g["waiting"])
        one("gptbc_batch_size", "gauge", "Sequences decoded in the last engine step.", g["batch_size"])
        one("gptbc_kv_pages_total", "gauge", "Pages of the paged KV cache.", total)
        one("gptbc_kv_pages_in_use", "gauge", "KV pages held by sequences (running or prefix cache).",
            total - g["kv_pages_free"])
        one("gptbc_kv_pages_prefix_cache", "gauge", "KV pages of finished sequences kept for prefix reuse "
            "(forks share pages, so this is an upper bound).", g["prefix_cache_pages"])
        one("gptbc_kv_sequences", "gauge", "Sequences holding KV pages (running or in the prefix cache).",
            g["kv_sequences"])
        one("gptbc_prefix_cache_sequences", "gauge", "Finished sequences kept for prefix reuse.",
            g["prefix_cache_sequences"])
        lines += ["# HELP gptbc_request_duration_seconds Time from request to last token.",
                  "# TYPE gptbc_request_duration_seconds histogram"]
        cumulative = 0
        for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], self.latency_counts):
            cumulative += n
            lines.append(f'gptbc_request_duration_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"gptbc_request_duration_seconds_sum {self.latency_sum:.6f}",
                  f"gptbc_request_duration_seconds_count {cumulative}"]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One API request: its prompts (token ids), one SamplingParams per choice, and how to answer."""

    prompts: list[list[int]]
    echo_texts: list[str]
    params: list[SamplingParams]  # len(prompts) × n, choice-major within each prompt
    n: int
    stream: bool
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    finished: bool = False  # Server.finish ran


class Server:
    """The ASGI app's state and handlers."""

    def __init__(self, engine, model_name: str, api_key: str | None = None, max_queue: int = 64,
                 max_body_bytes: int = DEFAULT_MAX_BODY):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_queue, self.max_body_bytes = max_queue, max_body_bytes
        self.loop = AsyncEngine(engine)
        self.metrics = Metrics()
        self.inflight = 0  # choices accepted and not finished (event-loop thread only)
        self.created = int(time.time())

    # ---- request parsing ----
    def sampling(self, f: Fields, max_tokens: int, n_choices: int, seed: int | None, logprobs: int | None,
                 echo: bool) -> list[SamplingParams]:
        fields = dict(
            max_new_tokens=max_tokens, temperature=f.number("temperature", None, 0, 2),
            top_p=f.number("top_p", None, 0, 1), top_k=f.integer("top_k", None, 0),
            min_p=f.number("min_p", None, 0, 1),
            repetition_penalty=f.number("repetition_penalty", None, 0.01, 10),
            presence_penalty=f.number("presence_penalty", None, -2, 2),
            frequency_penalty=f.number("frequency_penalty", None, -2, 2),
            ignore_eos=f.boolean("ignore_eos"), stop=f.stops(),
            logprobs=logprobs is not None, top_logprobs=logprobs or 0, prompt_logprobs=echo and logprobs is not None)
        try:
            base = self.engine.defaults.replace(**fields)  # validates: e.g. top_p 0 passes the range above
        except GptbcError as err:
            name = str(err).split(" ", 1)[0]
            raise bad(name, str(err).split(": ", 1)[-1]) from None
        return [base.replace(seed=None if seed is None else seed + i) for i in range(n_choices)]

    def prompts(self, value: Any, param: str = "prompt") -> tuple[list[list[int]], list[str]]:
        """OpenAI's four prompt forms: a string, strings, token ids, lists of token ids."""
        def is_ids(x):
            return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(value, str):
            items = [value]
        elif is_ids(value):
            items = [value]
        elif isinstance(value, list) and value and all(isinstance(x, str) or is_ids(x) for x in value):
            items = value
        else:
            raise bad(param, "must be a string, a list of strings, a list of token ids or a list of such lists")
        ids, texts = [], []
        for item in items:
            try:
                if isinstance(item, str):
                    ids.append(self.engine.encode(item))
                    texts.append(item)
                else:
                    self.engine.check_ids(item)
                    ids.append(list(item))
                    texts.append(self.engine.decode_text(item) if self.engine.tokenizer else "")
            except GptbcError as err:
                raise bad(param, str(err)) from None
        return ids, texts

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

    def parse_completion(self, body: Any) -> Job:
        f = Fields(body)
        model = f.text("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if "prompt" not in f.body:
            raise bad("prompt", "is required")
        n = f.integer("n", 1, 1, MAX_CHOICES)
        best_of = f.integer("best_of", None, 1)
        if best_of is not None and best_of != n:
            raise bad("best_of", "only best_of == n is supported")
        suffix = f.text("suffix")
        echo = f.boolean("echo")
        logprobs = f.integer("logprobs", None, 0, MAX_TOP_LOGPROBS)
        stream = f.boolean("stream")
        options = f.get("stream_options", {})
        if not isinstance(options, dict):
            raise bad("stream_options", "must be an object")
        include_usage = Fields(options).boolean("include_usage")
        if suffix is not None:
            prompt = f.text("prompt", "")
            if echo:
                raise bad("echo", "cannot be combined with suffix (fill-in-the-middle)")
            prompts, texts = [self.fim_ids(prompt, suffix, None, "suffix")], [prompt]
        else:
            prompts, texts = self.prompts(f.body["prompt"])
        if len(prompts) * n > MAX_CHOICES:
            raise bad("n", f"{len(prompts)} prompts × n {n} exceeds {MAX_CHOICES} choices per request")
        params = self.sampling(f, f.integer("max_tokens", 16, 0), n, f.integer("seed", None, 0), logprobs, echo)
        job = Job(prompts, texts, params * len(prompts), n, stream, include_usage, echo, logprobs)
        return self.fit(job)

    def fim_ids(self, prefix: str, suffix: str, after: str | None, param: str) -> list[int]:
        try:
            ids = self.engine.fim_prompt(prefix, suffix)
            return ids + (self.engine.encode(after) if after else [])
        except GptbcError as err:
            raise bad(param, str(err)) from None

    def parse_infill(self, body: Any) -> Job:
        f = Fields(body)
        prefix, suffix = f.text("input_prefix", ""), f.text("input_suffix", "")
        ids = self.fim_ids(prefix, suffix, f.text("prompt"), "input_prefix")
        n_predict = f.integer("n_predict", -1, -1)
        if n_predict == -1:  # llama.cpp's default: until eos or the end of the context window
            n_predict = max(self.engine.context_window_size - len(ids), 0)
        params = self.sampling(f, n_predict, 1, f.integer("seed", None, 0), None, False)
        return self.fit(Job([ids], [prefix], params, 1, f.boolean("stream")), "input_prefix", "n_predict")

    # ---- running a job ----
    async def start(self, job: Job) -> tuple[list[Request], asyncio.Queue]:
        """Submit every choice; events arrive on one queue as (choice index, Event | Exception)."""
        n_choices = len(job.params)
        if self.inflight + n_choices > self.engine.max_batch_size + self.max_queue:
            raise ApiError(503, f"server busy: {self.inflight} sequences running or queued "
                                f"(--max-batch {self.engine.max_batch_size} + --max-queue {self.max_queue}); "
                                f"retry shortly", code="server_overloaded", headers={"Retry-After": "1"})
        aio = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        futures = []
        for i, params in enumerate(job.params):
            def deliver(item, i=i):
                aio.call_soon_threadsafe(events.put_nowait, (i, item))

            futures.append(asyncio.wrap_future(self.loop.submit(job.prompts[i // job.n], params, deliver)))
        self.inflight += n_choices
        results = await asyncio.gather(*futures, return_exceptions=True)
        reqs = [r for r in results if isinstance(r, Request)]
        failed = [r for r in results if not isinstance(r, Request)]
        if failed:
            self.inflight -= n_choices
            for req in reqs:
                self.loop.cancel(req)
            err = failed[0]
            if isinstance(err, GptbcError):
                raise ApiError(400, f"prompt: {err}", param="prompt", code="invalid_value")
            raise err
        self.metrics.prompt_tokens += sum(len(p) for p in job.prompts)
        return reqs, events

    def finish(self, job: Job, reqs: list[Request], began: float) -> None:
        """Bookkeeping once a job is over (normally or not): cancel what still runs. Runs once per job."""
        if job.finished:
            return
        job.finished = True
        for req in reqs:
            if req.finish_reason is None or req.finish_reason == "cancelled":
                self.metrics.cancelled += 1
                self.loop.cancel(req)
            self.metrics.generation_tokens += len(req.output_ids)
        self.inflight -= len(reqs)
        self.metrics.observe(time.perf_counter() - began)

    def logprobs_of(self, req: Request, job: Job, text_start: int, upto: int | None = None,
                    frm: int = 0) -> dict:
        """OpenAI completions logprobs for output tokens [frm, upto) (and the prompt's, with echo)."""
        tok = self.engine.tokenizer

        def piece(t: int) -> str:
            return tok.decode([t]) if tok is not None else str(t)

        def tops(pairs):
            return {piece(t): lp for t, lp in pairs} if job.logprobs else None

        ids, lps, top = [], [], []
        if job.echo and frm == 0:
            ids += req.prompt_ids
            lps += req.prompt_logprobs
            top += [tops(p) if p else None for p in req.prompt_top_logprobs]
        out = slice(frm, upto)
        ids += req.output_ids[out]
        lps += req.logprobs[out]
        top += [tops(p) for p in req.top_logprobs[out]] if req.top_logprobs else [None] * len(req.output_ids[out])
        tokens = [piece(t) for t in ids]
        offsets, pos = [], text_start
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top if job.logprobs else None,
                "text_offset": offsets}

    def usage(self, job: Job, reqs: list[Request]) -> dict:
        prompt = sum(len(p) for p in job.prompts)
        done = sum(len(r.output_ids) for r in reqs)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _finish_reason(req: Request) -> str:
    return "length" if req.finish_reason in (None, "length") else "stop"


# ---------------------------------------------------------------------------------------------
# the ASGI app
# ---------------------------------------------------------------------------------------------

def build_app(server: Server):
    """A Starlette app over `server`; the engine thread starts and stops with the app's lifespan."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def read_json(request: HttpRequest) -> Any:
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
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"request body: not valid JSON ({err})", code="invalid_json") from None

    def endpoint(path: str, handler, methods: list[str], auth: bool = True) -> Route:
        """Auth, the OpenAI error shape and request counting around `handler`."""
        async def wrapped(request: HttpRequest):
            try:
                if auth and server.api_key is not None:
                    given = request.headers.get("authorization", "")
                    if given != f"Bearer {server.api_key}":
                        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                       code="invalid_api_key")
                response = await handler(request)
            except ApiError as err:
                response = error_response(err)
            except Exception:  # noqa: BLE001 - one bad request must never take the server down
                log.exception("internal error on %s", path)
                response = error_response(ApiError(500, "internal server error (see the server log)"))
            server.metrics.count(path, response.status_code)
            return response

        return Route(path, wrapped, methods=methods)

    async def completions(request: HttpRequest):
        job = server.parse_completion(await read_json(request))
        return await respond(request, job, openai_chunks, openai_body, "data: [DONE]\n\n")

    async def infill(request: HttpRequest):
        job = server.parse_infill(await read_json(request))
        return await respond(request, job, infill_chunks, infill_body, "")  # llama.cpp sends no [DONE]

    async def respond(request: HttpRequest, job: Job, chunks, body, done_line: str):
        began = time.perf_counter()
        reqs, events = await server.start(job)
        ident = f"cmpl-{uuid.uuid4().hex[:24]}"
        if job.stream:
            async def sse():
                # A client that disconnects cancels this generator at its `await` (Starlette watches for
                # http.disconnect), and `finally` cancels the sequences, freeing their KV pages.
                try:
                    async for item in chunks(job, reqs, events, ident):
                        yield f"data: {json.dumps(item)}\n\n"
                except Exception as err:  # noqa: BLE001 - headers are sent: report in-band
                    log.exception("stream failed")
                    yield f"data: {json.dumps(ApiError(500, str(err)).body())}\n\n"
                finally:
                    server.finish(job, reqs, began)
                if done_line:
                    yield done_line

            # The background task covers a client gone before the stream even started.
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(server.finish, job, reqs, began))
        try:
            await wait_unless_disconnected(request, drain(reqs, events))
        finally:
            server.finish(job, reqs, began)
        return JSONResponse(body(job, reqs, ident))

    async def drain(reqs: list[Request], events: asyncio.Queue) -> None:
        done = 0
        while done < len(reqs):
            _, item = await events.get()
            if isinstance(item, Exception):
                raise item
            done += item.finished

    async def wait_unless_disconnected(request: HttpRequest, work) -> None:
        """Await `work`, cancelling it if the client disconnects first."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not task.done():
            task.cancel()
            raise ApiError(499, "client closed the request")
        task.result()

    async def _disconnected(request: HttpRequest) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def text_of(job: Job, i: int, req: Request) -> str:
        return (job.echo_texts[i // job.n] if job.echo else "") + req.text

    def openai_body(job: Job, reqs: list[Request], ident: str) -> dict:
        choices = []
        for i, req in enumerate(reqs):
            lp = None
            if job.logprobs is not None:
                lp = server.logprobs_of(req, job, 0)
            choices.append({"index": i, "text": text_of(job, i, req), "logprobs": lp,
                            "finish_reason": _finish_reason(req)})
        return {"id": ident, "object": "text_completion", "created": int(time.time()), "model": server.model_name,
                "choices": choices, "usage": server.usage(job, reqs)}

    async def openai_chunks(job: Job, reqs: list[Request], events: asyncio.Queue, ident: str):
        def chunk(choices: list, usage: dict | None = None) -> dict:
            out = {"id": ident, "object": "text_completion", "created": int(time.time()),
                   "model": server.model_name, "choices": choices}
            if job.include_usage:
                out["usage"] = usage
            return out

        emitted = [0] * len(reqs)  # output tokens already reported per choice (for logprobs)
        if job.echo:
            yield chunk([{"index": i, "text": job.echo_texts[i // job.n], "logprobs": None, "finish_reason": None}
                         for i in range(len(reqs))])
        done = 0
        while done < len(reqs):
            i, item = await events.get()
            if isinstance(item, Exception):
                raise item
            req = reqs[i]
            lp = None
            if job.logprobs is not None:
                lp = server.logprobs_of(req, job, 0, len(req.output_ids), emitted[i])
                emitted[i] = len(req.output_ids)
            if item.text or item.finished or lp:
                yield chunk([{"index": i, "text": item.text, "logprobs": lp,
                              "finish_reason": _finish_reason(req) if item.finished else None}])
            done += item.finished
        if job.include_usage:
            yield chunk([], server.usage(job, reqs))

    def infill_body(job: Job, reqs: list[Request], _ident: str) -> dict:
        req = reqs[0]
        return {"content": req.text, "stop": True, "model": server.model_name, "tokens_predicted": len(req.output_ids),
                "tokens_evaluated": len(req.prompt_ids), "stop_type": "limit" if _finish_reason(req) == "length"
                else ("eos" if req.output_ids and req.output_ids[-1] in server.engine.eos_ids else "word"),
                "tokens": req.output_ids}

    async def infill_chunks(job: Job, reqs: list[Request], events: asyncio.Queue, ident: str):
        while True:
            _, item = await events.get()
            if isinstance(item, Exception):
                raise item
            if item.finished:
                if item.text:
                    yield {"content": item.text, "stop": False}
                yield infill_body(job, reqs, ident) | {"content": ""}
                return
            if item.text:
                yield {"content": item.text, "stop": False}

    async def models(_request: HttpRequest):
        return JSONResponse({"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.created, "owned_by": "gptbc",
            "context_window": server.engine.context_window_size,
            "quantization": server.engine.quantization}]})

    async def health(_request: HttpRequest):
        return JSONResponse({"status": "ok", "model": server.model_name})

    async def metrics(_request: HttpRequest):
        return PlainTextResponse(server.metrics.render(server.loop),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(_request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    routes = [endpoint("/v1/completions", completions, ["POST"]), endpoint("/completions", completions, ["POST"]),
              endpoint("/infill", infill, ["POST"]), endpoint("/v1/models", models, ["GET"]),
              endpoint("/health", health, ["GET"], auth=False), endpoint("/metrics", metrics, ["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


def serve(engine, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, max_queue: int = 64, max_body_bytes: int = DEFAULT_MAX_BODY,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run until interrupted. `port` 0 picks a free port; `on_ready` gets the base URL once listening."""
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
