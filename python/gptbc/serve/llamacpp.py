"""The llama.cpp server protocol: /completion, /infill (llama.vim, llama.vscode, Tabby, Continue's llama.cpp
provider), /tokenize and /detokenize. Each body is parsed into a core.Job; answers carry llama.cpp's fields
(content, tokens, stop_type, tokens_cached, truncated, timings) and stream as SSE chunks with no [DONE]."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.requests import Request as HttpRequest

from gptbc.errors import GptbcError
from gptbc.runtime.sampling import SamplingParams
from gptbc.runtime.scheduler import Request
from gptbc.serve import schema as S
from gptbc.serve.core import Choice, Job, Server
from gptbc.serve.errors import bad, validate
from gptbc.serve.openapi import route_doc
from gptbc.serve.transport import prepare, run_to_end, server_of, sse_response

# Extra repository context for a tokenizer without StarCoder's <repo_name>/<file_sep> tokens: each chunk of
# input_extra becomes this header and its text, at the start of the FIM prefix.
PLAIN_EXTRA_HEADER = "# file: {filename}\n"

router = APIRouter()


# ---- parsing (worker threads) ----

def llama_params(server: Server, r: S.LlamaFields, n_predict: int, prompt_len: int) -> tuple[list[SamplingParams], bool]:
    """(params, warm-up) of a llama.cpp request: n_predict -1 runs to eos or the window; 0 only evaluates."""
    warm_up = n_predict == 0
    if n_predict < 0:
        n_predict = max(server.engine.context_window_size - prompt_len, 1)
    extra = {"repetition_penalty": r.repeat_penalty} if r.repeat_penalty is not None else {}
    params = server.sampling(r, 1 if warm_up else n_predict, 1, r.n_probs or None, extra=extra,
                             names={"max_new_tokens": "n_predict", "top_logprobs": "n_probs",
                                    "repetition_penalty": "repeat_penalty"})
    return params, warm_up


def parse_completion(server: Server, body: Any) -> Job:
    r: S.LlamaCompletionRequest = validate(S.LlamaCompletionRequest, body)
    if isinstance(r.prompt, str):
        ids, text = server.text_ids(r.prompt, "prompt"), r.prompt
    else:
        ids, text = server.checked_ids(r.prompt, "prompt"), ""
    if not ids:
        raise bad("prompt", "is empty: give at least one token")
    params, warm_up = llama_params(server, r, r.n_predict, len(ids))
    job = Job([ids], [text], params, 1, r.stream and not warm_up, logprobs=r.n_probs or None,
              t_max_predict_ms=r.t_max_predict_ms, warm_up=warm_up, request=r)
    return server.fit(job, "prompt", "n_predict")


def infill_ids(server: Server, r: S.InfillRequest, params: SamplingParams) -> tuple[list[int], bool]:
    """The infill prompt: repository context, then FIM prefix/suffix/middle, then `prompt`. Too long for the
    window: the oldest extra chunks go first, then the far ends of prefix and suffix (truncated=True)."""
    engine, f = server.engine, server.engine.fim
    if engine.tokenizer is None or f is None:
        raise bad("input_prefix", f"{engine.model_dir}: the tokenizer has no fill-in-the-middle tokens")
    middle = engine.encode(r.prompt) if r.prompt else []
    chunks = []
    for c in r.input_extra:
        if server.repo_tokens:
            chunks.append([server.repo_tokens[1], *engine.encode(f"{c.filename}\n{c.text}")])
        else:
            chunks.append(engine.encode(PLAIN_EXTRA_HEADER.format(filename=c.filename) + c.text))
    head = [server.repo_tokens[0], *engine.encode("gptbc\n")] if server.repo_tokens and chunks else []
    budget = engine.context_window_size - params.max_new_tokens
    core = server.fim_ids(r.input_prefix, r.input_suffix, "input_prefix")
    truncated = False
    while chunks and len(head) + sum(map(len, chunks)) + len(core) + len(middle) > budget:
        chunks.pop(0)
        truncated = True
    if not chunks:
        head = []
    if len(core) + len(middle) > budget:
        core = server.fim_ids(r.input_prefix, r.input_suffix, "input_prefix",
                              params.replace(max_new_tokens=params.max_new_tokens + len(middle), truncate_prompt=True))
        truncated = True
    extra = [t for c in chunks for t in c]
    if server.repo_tokens:  # <repo_name>gptbc\n<file_sep>name\ntext...<fim_prefix>...
        ids = head + extra + core
    else:  # <fim-prefix># file: name\ntext...prefix<fim-suffix>...
        ids = core[:1] + extra + core[1:]
    return ids + middle, truncated


def parse_infill(server: Server, body: Any) -> Job:
    r: S.InfillRequest = validate(S.InfillRequest, body)
    # n_predict -1: fit as much context as the window holds, then generate into whatever it leaves
    params, warm_up = llama_params(server, r, r.n_predict if r.n_predict >= 0 else 1, 0)
    ids, truncated = infill_ids(server, r, params[0])
    if r.n_predict < 0:
        params = [p.replace(max_new_tokens=max(server.engine.context_window_size - len(ids), 1)) for p in params]
    job = Job([ids], [r.input_prefix], params, 1, r.stream and not warm_up, logprobs=r.n_probs or None,
              n_indent=r.n_indent, t_max_predict_ms=r.t_max_predict_ms, truncated=truncated, warm_up=warm_up,
              request=r)
    return server.fit(job, "input_prefix", "n_predict")


# ---- answer shapes ----

def probs(server: Server, tokens, lps, tops) -> list[dict]:
    def entry(t, lp):
        piece = server.piece(t)
        return {"id": t, "token": piece, "logprob": lp, "bytes": list(piece.encode())}

    return [entry(t, lp) | {"top_logprobs": [entry(u, v) for u, v in top]} for t, lp, top in zip(tokens, lps, tops)]


def body_of(server: Server, job: Job, req: Request) -> dict:
    c = job.choices[0] if job.choices else Choice()
    end = time.perf_counter()
    first = c.first_token_at or end
    prompt_ms, predicted_ms = (first - job.began) * 1000, (end - first) * 1000
    n_out = 0 if job.warm_up else len(c.ids)
    body = {"content": "" if job.warm_up else c.text, "tokens": [] if job.warm_up else list(c.ids),
            "id_slot": job.request.id_slot, "stop": True, "model": server.model_name,
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
        body["completion_probabilities"] = probs(server, c.ids, c.logprobs, c.top)
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


async def chunks(server: Server, job: Job, reqs: list[Request], events: asyncio.Queue):
    async for u in server.updates(job, reqs, events):
        if u.text or (job.logprobs and u.tokens):
            out = {"content": u.text, "stop": False, "id_slot": job.request.id_slot, "tokens": u.tokens}
            if job.logprobs:
                out["completion_probabilities"] = probs(server, u.tokens, u.logprobs, u.top)
            yield out
    last = body_of(server, job, reqs[0])
    yield last | {"content": "", "tokens": []} if job.request.response_fields is None else last


# ---- routes ----

async def generate(request: HttpRequest, parse):
    server = server_of(request)
    job = await prepare(request, parse)
    reqs, events = await server.start(job)
    if job.stream:
        return sse_response(server, job, reqs, chunks(server, job, reqs, events), None)  # llama.cpp sends no [DONE]
    await run_to_end(request, job, reqs, events)
    return JSONResponse(body_of(server, job, reqs[0]))


@router.post("/completion", **route_doc("/completion"))
async def completion(request: HttpRequest):
    return await generate(request, parse_completion)


@router.post("/infill", **route_doc("/infill"))
async def infill(request: HttpRequest):
    return await generate(request, parse_infill)


def parse_tokenize(server: Server, body: Any) -> dict:
    r = validate(S.TokenizeRequest, body)
    ids = server.text_ids(r.content, "content")
    return {"tokens": [{"id": t, "piece": server.piece(t)} for t in ids] if r.with_pieces else ids}


@router.post("/tokenize", **route_doc("/tokenize", False))
async def tokenize(request: HttpRequest):
    return JSONResponse(await prepare(request, parse_tokenize))


def parse_detokenize(server: Server, body: Any) -> dict:
    r = validate(S.DetokenizeRequest, body)
    ids = server.checked_ids(r.tokens, "tokens")
    try:
        return {"content": server.engine.decode_text(ids) if ids else ""}
    except GptbcError as err:
        raise bad("tokens", str(err)) from None


@router.post("/detokenize", **route_doc("/detokenize", False))
async def detokenize(request: HttpRequest):
    return JSONResponse(await prepare(request, parse_detokenize))
