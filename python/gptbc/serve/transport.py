"""HTTP plumbing every route shares: reading a body under the size limit and parsing it off the event loop,
SSE framing (an error after the headers are sent is reported in-band), and running a non-streamed job to its
end unless the client leaves first. Whatever way a job ends, `Server.finish` runs once and frees its
sequences."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest

from gptbc.runtime.scheduler import Request
from gptbc.serve.core import Job, Server
from gptbc.serve.errors import ApiError, parse_json

log = logging.getLogger("gptbc.serve")


def server_of(request: HttpRequest) -> Server:
    return request.app.state.server


async def read_body(request: HttpRequest, limit: int) -> bytes:
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


async def prepare(request: HttpRequest, parse: Callable[[Server, Any], Any]) -> Any:
    """Read, parse, validate and tokenize a request body; big bodies off the event loop."""
    server = server_of(request)
    raw = await read_body(request, server.max_body_bytes)

    def work():
        return parse(server, parse_json(raw))

    parsed = await run_in_threadpool(work)
    if isinstance(parsed, Job):  # for the request's log line (app.Gate), which counts its tokens when it ends
        request.state.job = parsed
    return parsed


def sse_response(server: Server, job: Job, reqs: list[Request], chunks: AsyncIterator[dict],
                 done_line: str | None) -> StreamingResponse:
    async def sse():
        # A client that disconnects cancels this generator at its `await`, and `finally` cancels the
        # sequences, freeing their KV pages.
        try:
            async for item in chunks:
                yield f"data: {json.dumps(item, separators=(',', ':'))}\n\n"
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
    server = server_of(request)

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
