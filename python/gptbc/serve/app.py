"""`gptbc serve`: OpenAI- and llama.cpp-compatible endpoints over one engine loop (FastAPI on uvicorn).

Two threads share the work. Uvicorn's event loop parses HTTP and streams responses; request bodies are
parsed, validated (schema.py's pydantic models) and tokenized in worker threads, never on the event loop.
One engine thread (runtime.async_engine.AsyncEngine) owns the Engine and runs `Engine.step()` while any
request is queued or running, so all clients share continuous batching. Each request reads only the
immutable events the engine thread hands back, never the engine's own lists.

This module is the app: its error handlers, the API-key gate, the routes of each protocol (openai.py,
llamacpp.py) and the informational ones (models, health, metrics), the OpenAPI document, and `serve`.

Failures: a request whose sampling or scoring fails ends alone (500 `generation_failed`); a failed engine step
fails the requests it was running (500 `engine_step_failed`) and the engine goes on; an engine that cannot go
on answers every request 503 `engine_dead`, turns /health to 503 and stops the process with exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import sys
import time
from typing import Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from gptbc.errors import GptbcError
from gptbc.serve import llamacpp, openai
from gptbc.serve import schema as S
from gptbc.serve.core import DEFAULT_MAX_BODY, Server
from gptbc.serve.errors import ApiError, validation_error
from gptbc.serve.openapi import ENDPOINTS, document

log = logging.getLogger("gptbc.serve")
# One line per request, as llama-server and uvicorn print them: method, path, status, tokens, time (`serve` sends
# it to stderr).
access_log = logging.getLogger("gptbc.serve.access")

OPEN_PATHS = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"}  # no API key needed
KNOWN_PATHS = set(ENDPOINTS) | {"/v1/models", "/health", "/metrics", "/openapi.json", "/docs"}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def access_line(method: str, path: str, status: int, server: Server, job, began: float) -> str:
    """`POST /v1/chat/completions 200 prompt_tokens=12 generated_tokens=34 time_ms=123`; the tokens of the job
    the request ran (0 for one that ran none: /health, a refused body)."""
    usage = server.usage(job) if job is not None and job.choices else {"prompt_tokens": 0, "completion_tokens": 0}
    return (f"{method} {path} {status} prompt_tokens={usage['prompt_tokens']} "
            f"generated_tokens={usage['completion_tokens']} time_ms={(time.perf_counter() - began) * 1000:.0f}")


class Gate:
    """Pure ASGI middleware (streams and disconnects pass untouched): the API key, compared in constant time,
    the request counter by endpoint and status, and the request's log line once its response has ended (a
    stream included: the inner app returns when the last chunk is sent)."""

    def __init__(self, inner, server: Server):
        self.inner, self.server = inner, server
        self.expected = f"Bearer {server.api_key}".encode() if server.api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        path, status, began = scope["path"], [500], time.perf_counter()
        label = path if path in KNOWN_PATHS else "other"
        state = scope.setdefault("state", {})  # the routes' request.state: transport.prepare puts the job there

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and path not in OPEN_PATHS:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                   code="invalid_api_key")
                    return await error_response(err)(scope, receive, send_status)
            await self.inner(scope, receive, send_status)
        finally:
            self.server.metrics.requests.labels(label, str(status[0])).inc()
            access_log.info(access_line(scope["method"], path, status[0], self.server, state.get("job"), began))


def add_error_handlers(app: FastAPI) -> None:
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


def add_info_routes(app: FastAPI, server: Server) -> None:
    @app.get("/v1/models", response_model=S.ModelList)
    async def models():
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.created, "owned_by": "gptbc",
            "context_window": server.engine.context_window_size, "quantization": server.engine.quantization,
            "activations": server.engine.activations, "guarantee": server.engine.guarantee()}]}

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


def build_app(server: Server) -> FastAPI:
    """A FastAPI app over `server`; the engine thread starts and stops with the app's lifespan."""
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
    app.state.server = server
    add_error_handlers(app)
    app.add_middleware(Gate, server=server)
    app.include_router(openai.router)
    app.include_router(llamacpp.router)
    add_info_routes(app, server)

    def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = document(app, server.model_name, server.engine.config.vocab_size,
                                          server.engine.context_window_size)
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
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
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
