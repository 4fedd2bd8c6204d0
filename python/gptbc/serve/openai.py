"""The OpenAI protocol: /v1/completions (and /completions), /v1/fim/completions and /v1/chat/completions.
Each body is parsed into a core.Job; answers are text_completion objects or chat.completion ones (FIM answers
in the chat shape, as Mistral's API and Continue's OpenAI provider expect), streamed as SSE chunks ending in
`data: [DONE]`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.requests import Request as HttpRequest

from gptbc.errors import GptbcError
from gptbc.runtime.chat_template import CHATML, CHATML_STOP
from gptbc.runtime.scheduler import Request
from gptbc.serve import schema as S
from gptbc.serve.core import Choice, Job, Server
from gptbc.serve.errors import bad, validate
from gptbc.serve.openapi import route_doc
from gptbc.serve.transport import ident, prepare, run_to_end, server_of, sse_response

DONE = "data: [DONE]\n\n"

router = APIRouter()


# ---- parsing (worker threads) ----

def parse_completion(server: Server, body: Any) -> Job:
    r: S.CompletionRequest = validate(S.CompletionRequest, body)
    server.check_model(r.model)
    if r.best_of is not None and r.best_of != r.n:
        raise bad("best_of", "only best_of == n is supported")
    if r.suffix is not None:
        if not isinstance(r.prompt, str):
            raise bad("prompt", "must be a string when suffix is given (fill-in-the-middle)")
        if r.echo:
            raise bad("echo", "cannot be combined with suffix (fill-in-the-middle)")
        prompts, texts = [server.fim_ids(r.prompt, r.suffix, "suffix")], [r.prompt]
    else:
        prompts, texts = prompt_items(server, r.prompt)
    if len(prompts) * r.n > S.MAX_CHOICES:
        raise bad("n", f"{len(prompts)} prompts × n {r.n} exceeds {S.MAX_CHOICES} choices per request")
    params = server.sampling(r, r.max_tokens, r.n, r.logprobs, r.echo)
    include_usage = bool(r.stream_options and r.stream_options.include_usage)
    job = Job(prompts, texts, params * len(prompts), r.n, r.stream, include_usage, r.echo, r.logprobs, request=r)
    return server.fit(job)


def prompt_items(server: Server, prompt) -> tuple[list[list[int]], list[str]]:
    """A completions `prompt` (a string, token ids, or a list of either) → token ids and text of each."""
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not items:
        raise bad("prompt", "is empty: give at least one token")
    prompts, texts = [], []
    for item in items:
        if isinstance(item, str):
            prompts.append(server.text_ids(item, "prompt"))
            texts.append(item)
        else:
            prompts.append(server.checked_ids(item, "prompt"))
            texts.append(server.engine.decode_text(item) if server.engine.tokenizer else "")
    return prompts, texts


def parse_fim(server: Server, body: Any) -> Job:
    r: S.FimRequest = validate(S.FimRequest, body)
    server.check_model(r.model)
    params = server.sampling(r, r.max_tokens)
    include_usage = bool(r.stream_options and r.stream_options.include_usage)
    return server.fit(Job([server.fim_ids(r.prompt, r.suffix or "", "suffix")], [r.prompt], params, 1, r.stream,
                          include_usage, request=r))


def parse_chat(server: Server, body: Any) -> Job:
    r: S.ChatRequest = validate(S.ChatRequest, body)
    server.check_model(r.model)
    messages = [{"role": m.role, "content": m.content if not isinstance(m.content, list)
                 else "".join(p.text for p in m.content)} for m in r.messages]
    try:
        text = server.chat_template.render(messages)
    except GptbcError as err:
        raise bad("messages", str(err).split(": ", 1)[-1]) from None
    ids = server.text_ids(text, "messages")
    max_tokens, warm_up = chat_max_tokens(server, r, len(ids))
    eos = server.chat_template.special.get("eos_token")
    extra_stop = [i for i in (server.engine.encode(eos) if eos else []) if i in server.engine.special_ids][:1]
    logprobs = (r.top_logprobs or 0) if r.logprobs else None
    params = server.sampling(r, max_tokens, r.n, logprobs, extra={"stop_token_ids": extra_stop},
                             names={"top_logprobs": "top_logprobs"})
    if server.chat_template.source == CHATML:  # the default template's end of turn is no token of the model
        params = [p.replace(stop=[*p.stop, CHATML_STOP]) for p in params]
    include_usage = bool(r.stream_options and r.stream_options.include_usage)
    return server.fit(Job([ids], [text], params, r.n, r.stream and not warm_up, include_usage, logprobs=logprobs,
                          warm_up=warm_up, request=r), "messages")


def chat_max_tokens(server: Server, r: S.ChatRequest, prompt_len: int) -> tuple[int, bool]:
    """(max tokens, warm-up): llama.cpp's n_predict first (0: only evaluate the prompt, as llama.vim's
    instruct warm-up asks; -1: the whole window), then max_tokens / max_completion_tokens, else, as llama.cpp
    (n_predict -1) and OpenAI do, until the end of text or the room the window leaves: a fixed cap cut
    llama.vim's instruct answers short, and it inserted the cut block as if complete."""
    room = max(server.engine.context_window_size - prompt_len, 1)
    if r.n_predict is not None:
        return (1, True) if r.n_predict == 0 else (room if r.n_predict < 0 else r.n_predict, False)
    asked = r.max_tokens if r.max_tokens is not None else r.max_completion_tokens
    return (asked if asked is not None else room), False


# ---- answer shapes ----

def completion_logprobs(server: Server, job: Job, choice: Choice, tokens, lps, tops, start: int,
                        prompt: bool) -> dict:
    """Completions logprobs of `tokens` (and the prompt's first, with echo); `start`: the text offset of the
    first token. Every list has one entry per token."""
    def table(pairs):
        return {server.piece(t): lp for t, lp in pairs} if job.logprobs else None

    ids, lp_list, top_list = [], [], []
    if prompt and choice.prompt_logprobs is not None:
        ids += job.prompts[0]
        lp_list += list(choice.prompt_logprobs)
        top_list += [table(p) if p else None for p in choice.prompt_top]
    ids += tokens
    lp_list += lps
    top_list += [table(p) for p in tops]
    pieces = [server.piece(t) for t in ids]
    offsets, pos = [], start
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    return {"tokens": pieces, "token_logprobs": lp_list, "top_logprobs": top_list if job.logprobs else None,
            "text_offset": offsets}


def text_of(job: Job, i: int) -> str:
    return (job.echo_texts[i // job.n] if job.echo else "") + job.choices[i].text


def completion_body(server: Server, job: Job, rid: str) -> dict:
    choices = []
    for i, c in enumerate(job.choices):
        lp = None
        if job.logprobs is not None:
            lp = completion_logprobs(server, job, c, c.ids, c.logprobs, c.top, 0, job.echo)
        choices.append({"index": i, "text": text_of(job, i), "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": server.model_name,
            "choices": choices, "usage": server.usage(job)}


def chunk_of(server: Server, job: Job, rid: str, kind: str, choices: list, usage: dict | None = None) -> dict:
    out = {"id": rid, "object": kind, "created": int(time.time()), "model": server.model_name, "choices": choices}
    if job.include_usage:
        out["usage"] = usage
    return out


async def completion_chunks(server: Server, job: Job, reqs: list[Request], events: asyncio.Queue, rid: str):
    offsets = [0] * len(reqs)  # text offset of each choice's next token (logprobs)
    echo_scored = [False] * len(reqs)
    if job.echo:
        yield chunk_of(server, job, rid, "text_completion", [
            {"index": i, "text": job.echo_texts[i // job.n], "logprobs": None, "finish_reason": None}
            for i in range(len(reqs))])
    async for u in server.updates(job, reqs, events):
        c = job.choices[u.index]
        lp = None
        if job.logprobs is not None:
            with_prompt = job.echo and not echo_scored[u.index]
            lp = completion_logprobs(server, job, c, u.tokens, u.logprobs, u.top, offsets[u.index], with_prompt)
            echo_scored[u.index] = echo_scored[u.index] or with_prompt
            offsets[u.index] = (lp["text_offset"][-1] + len(lp["tokens"][-1])) if lp["tokens"] else offsets[u.index]
        if u.text or u.finished or (lp and lp["tokens"]):
            yield chunk_of(server, job, rid, "text_completion", [
                {"index": u.index, "text": u.text, "logprobs": lp,
                 "finish_reason": c.finish_reason if u.finished else None}])
    if job.include_usage:
        yield chunk_of(server, job, rid, "text_completion", [], server.usage(job))


def chat_logprobs(server: Server, tokens, lps, tops) -> list[dict]:
    def entry(t, lp):
        piece = server.piece(t)
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

    return [entry(t, lp) | {"top_logprobs": [entry(u, v) for u, v in top]} for t, lp, top in zip(tokens, lps, tops)]


def chat_body(server: Server, job: Job, rid: str) -> dict:
    choices = []
    for i, c in enumerate(job.choices):
        choice = {"index": i, "message": {"role": "assistant", "content": "" if job.warm_up else c.text},
                  "logprobs": None, "finish_reason": "length" if job.warm_up else c.finish_reason}
        if job.logprobs is not None:
            choice["logprobs"] = {"content": chat_logprobs(server, c.ids, c.logprobs, c.top)}
        choices.append(choice)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": server.model_name,
            "choices": choices, "usage": server.usage(job)}


async def delta_chunks(server: Server, job: Job, reqs: list[Request], events: asyncio.Queue, rid: str, role: bool):
    """chat.completion.chunk events: every chunk has choices[0].delta (Continue reads
    choices[0].delta.content of each one)."""
    kind = "chat.completion.chunk"
    if role:
        yield chunk_of(server, job, rid, kind, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None} for i in range(len(reqs))])
    async for u in server.updates(job, reqs, events):
        c = job.choices[u.index]
        if u.text or u.finished or u.tokens and job.logprobs is not None:
            lp = {"content": chat_logprobs(server, u.tokens, u.logprobs, u.top)} if job.logprobs is not None else None
            yield chunk_of(server, job, rid, kind, [{"index": u.index, "delta": {"content": u.text}, "logprobs": lp,
                                                     "finish_reason": c.finish_reason if u.finished else None}])
    if job.include_usage:
        yield chunk_of(server, job, rid, kind, [], server.usage(job))


# ---- routes ----

@router.post("/v1/completions", **route_doc("/v1/completions"))
async def completions(request: HttpRequest):
    server = server_of(request)
    job = await prepare(request, parse_completion)
    reqs, events = await server.start(job)
    rid = ident()
    if job.stream:
        return sse_response(server, job, reqs, completion_chunks(server, job, reqs, events, rid), DONE)
    await run_to_end(request, job, reqs, events)
    return JSONResponse(completion_body(server, job, rid))


router.add_api_route("/completions", completions, methods=["POST"], **route_doc("/completions"))


async def chat_shaped(request: HttpRequest, parse, id_prefix: str, role: bool):
    """/v1/fim/completions and /v1/chat/completions answer alike: chat.completion (chunks with a delta)."""
    server = server_of(request)
    job = await prepare(request, parse)
    reqs, events = await server.start(job)
    rid = ident(id_prefix)
    if job.stream:
        return sse_response(server, job, reqs, delta_chunks(server, job, reqs, events, rid, role=role), DONE)
    await run_to_end(request, job, reqs, events)
    return JSONResponse(chat_body(server, job, rid))


@router.post("/v1/fim/completions", **route_doc("/v1/fim/completions"))
async def fim(request: HttpRequest):
    return await chat_shaped(request, parse_fim, "fim", role=False)


@router.post("/v1/chat/completions", **route_doc("/v1/chat/completions"))
async def chat(request: HttpRequest):
    return await chat_shaped(request, parse_chat, "chatcmpl", role=True)
