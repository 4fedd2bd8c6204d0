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
from gptbc.runtime.engine import cut_start, fim_layout, fit_fim
from gptbc.runtime.sampling import SamplingParams
from gptbc.runtime.scheduler import Request
from gptbc.serve import schema as S
from gptbc.serve.core import Choice, Job, Server
from gptbc.serve.errors import bad, validate
from gptbc.serve.openapi import route_doc
from gptbc.serve.transport import prepare, run_to_end, server_of, sse_response

# The repository-context layout of llama.cpp's format_prompt_infill, which StarCoder 2-style models were trained
# on: <repo_name>PROJECT\n, then <file_sep>FILENAME\n + text per chunk, then <file_sep> + a line for the current
# file, then the FIM prompt. llama.cpp writes these two names literally (its requests carry neither); so do we,
# so that a model sees the same prompt from gptbc as from llama.cpp. A tokenizer without a file separator
# (SantaCoder, StarCoder 1) gets SNIPPET_SEPARATOR before each chunk instead, and no file lines.
PROJECT_LINE = "myproject\n"
CURRENT_FILE_LINE = "filename\n"
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"

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


def generation_reserve(window: int, n_predict: int) -> int:
    """Tokens of the window an infill keeps free for its answer: n_predict, but at most a quarter of the
    window, so that on a small window (an edge build's) the context is cut to fit rather than the request
    refused; the answer may then still use all the room the prompt leaves."""
    if n_predict == 0:
        return 1
    return min(n_predict, window // 4) if n_predict > 0 else window // 4


def repository_context(server: Server, chunks: list[S.ExtraChunk]) -> list[int]:
    """input_extra as tokens, in llama.cpp's layout (see PROJECT_LINE)."""
    engine = server.engine
    ids = [server.repo_token, *engine.encode(PROJECT_LINE)] if server.repo_token is not None else []
    for c in chunks:
        if server.file_sep_token is not None:
            ids += [server.file_sep_token, *engine.encode(c.filename + "\n")]
        else:
            ids += engine.encode(SNIPPET_SEPARATOR)
        ids += engine.encode(c.text)
    if server.file_sep_token is not None:
        ids += [server.file_sep_token, *engine.encode(CURRENT_FILE_LINE)]
    return ids


def infill_ids(server: Server, r: S.InfillRequest) -> tuple[list[int], bool]:
    """The infill prompt, laid out as llama.cpp does: repository context, then the FIM prompt of prefix + prompt
    and suffix (`prompt`, the text typed on the cursor's line, ends the prefix) in the request's fim_order (or
    the server's): PSM <fim-prefix> prefix <fim-suffix> suffix <fim-middle>, or SPM <fim-prefix> <fim-suffix>
    suffix <fim-middle> prefix, where each keystroke only appends to the prompt. It always fits the window
    less generation_reserve: the text around the cursor first (the prefix's end, the typed text, the suffix's
    start), then the repository context in what is left, its oldest part cut first; truncated=True when
    anything was cut."""
    engine, f = server.engine, server.engine.fim
    if engine.tokenizer is None or f is None:
        raise bad("input_prefix", f"{engine.model_dir}: the tokenizer has no fill-in-the-middle tokens")
    order = server.fim_order_of(r.fim_order)
    window = engine.context_window_size
    budget = window - generation_reserve(window, r.n_predict) - 3  # the three FIM tokens
    typed = server.text_ids(r.prompt, "prompt") if r.prompt else []
    n_typed = len(typed)
    keep_typed = min(n_typed, max(budget, 0))  # a cursor line longer than the window keeps its end
    typed = typed[n_typed - keep_typed:]
    pre, suf = server.text_ids(r.input_prefix, "input_prefix"), server.text_ids(r.input_suffix, "input_suffix")
    # The suffix gets what the prefix leaves, and at least a share of the room where it needs that (a quarter:
    # llama.cpp splits prefix:suffix 3:1). What is cut from a part's far end goes in whole blocks
    # (engine.fit_fim), so that the next keystroke's request starts with the same tokens and the prefix cache
    # holds them.
    if order == "spm":
        # The typed text ends the prompt: it and the prefix are one part, fitted against a share that does not
        # move while typing. The repository context gets only what a whole prefix leaves: were it given the
        # slack of the prefix's block cut, that slack (which moves with each keystroke) would cut it anew.
        whole = pre + typed
        keep_whole, keep_suf = fit_fim(len(whole), len(suf), budget, budget // 4, engine.fit_block, order)
        keep_pre, keep_typed = max(keep_whole - keep_typed, 0), min(keep_typed, keep_whole)
        core = fim_layout(f, whole[len(whole) - keep_whole:], suf[:keep_suf], order)
        extra_room = budget + 3 - len(core) if keep_whole == len(whole) else 0
    else:
        room = max(budget - keep_typed, 0)
        keep_pre, keep_suf = fit_fim(len(pre), len(suf), room, room // 4, engine.fit_block, order)
        core = fim_layout(f, pre[len(pre) - keep_pre:] + typed, suf[:keep_suf], order)
        # As in SPM, the context gets only what a whole prefix leaves: when the prefix was cut, the room its block
        # cut left over (a short suffix does not take it all) shrinks with every typed token, and context fitted
        # into it would start somewhere else at every keystroke, leaving the prefix cache nothing to match.
        extra_room = budget + 3 - len(core) if keep_pre == len(pre) else 0
    extra = repository_context(server, r.input_extra) if r.input_extra else []
    keep_extra = len(extra) - cut_start(len(extra), extra_room, engine.fit_block)
    truncated = (keep_typed, keep_pre, keep_suf, keep_extra) != (n_typed, len(pre), len(suf), len(extra))
    return extra[len(extra) - keep_extra:] + core, truncated


def parse_infill(server: Server, body: Any) -> Job:
    r: S.InfillRequest = validate(S.InfillRequest, body)
    ids, truncated = infill_ids(server, r)
    # The answer gets n_predict tokens or the room the prompt leaves, whichever is less (-1: all that room).
    room = server.engine.context_window_size - len(ids)
    params, warm_up = llama_params(server, r, min(r.n_predict, room) if r.n_predict >= 0 else room, 0)
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


def timings(job: Job, c: Choice, reused: int) -> dict:
    """llama.cpp's timings: the prompt rates count only the prompt tokens evaluated (prompt_n, not the
    cache_n reused), and the generation rates the steps after the first token, which the prompt paid for."""
    end = time.perf_counter()
    first = c.first_token_at or end
    prompt_ms, predicted_ms = (first - job.began) * 1000, (end - first) * 1000
    prompt_n, predicted_n = len(job.prompts[0]) - reused, 0 if job.warm_up else len(c.ids)
    steps = max(predicted_n - 1, 0)

    def per(a: float, b: float) -> float:
        return a / b if b > 0 else 0.0

    return {"cache_n": reused, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": per(prompt_ms, prompt_n), "prompt_per_second": per(1e3 * prompt_n, prompt_ms),
            "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": per(predicted_ms, steps), "predicted_per_second": per(1e3 * steps, predicted_ms)}


def body_of(server: Server, job: Job, req: Request) -> dict:
    c = job.choices[0] if job.choices else Choice()
    reused = req.reused if req is not None else 0
    n_out = 0 if job.warm_up else len(c.ids)
    body = {"content": "" if job.warm_up else c.text, "tokens": [] if job.warm_up else list(c.ids),
            "id_slot": job.request.id_slot, "stop": True, "model": server.model_name,
            "tokens_predicted": n_out, "tokens_evaluated": len(job.prompts[0]), "tokens_cached": reused,
            "truncated": job.truncated, "stop_type": "limit" if job.warm_up else c.stop_type,
            "stopping_word": "", "timings": timings(job, c, reused)}
    if job.logprobs and not job.warm_up:
        body["completion_probabilities"] = probs(server, c.ids, c.logprobs, c.top)
    fields = job.request.response_fields
    if fields:  # llama.cpp: an empty list is the whole body
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
    yield last if job.request.response_fields else last | {"content": "", "tokens": []}


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
