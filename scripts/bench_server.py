"""Load test and throughput of `gptbc serve`: one client at a time vs many concurrent streaming clients.

    python scripts/bench_server.py OUT_DIR --lib LIB [--clients 32] [--disconnect 5] [--max-tokens 32]

Starts `gptbc serve` on 127.0.0.1 (a free port), then:
  1. sequential: each prompt once, one streaming client at a time (the reference text and the
     single-client throughput);
  2. concurrent: --clients streaming clients at once over the same prompts, --disconnect of them
     closing their connection after a few chunks, while another thread polls /health;
  3. checks: every finished concurrent response equals its sequential one (greedy; same text and tokens), /health answered
     throughout, and afterwards no sequence runs and the KV pages in use are exactly those of the prefix
     cache (none leaked by the disconnected clients), per /metrics.
With --mix, the clients are editors of four kinds in turn: plain completions (/v1/completions), FIM
(/v1/fim/completions, Continue), llama.cpp infill with repository context (/infill, llama.vim) and chat
(/v1/chat/completions, where the server chats: a model with a tokenizer, in its template or ChatML;
otherwise that share goes to plain), while
another thread keeps sending hostile requests (tiny temperatures, NaN, nested JSON, huge integers, bad
UTF-8, 100k-id prompts, huge n/logprobs/stop) that must all be answered below 500. Reports throughput and
the p50/p99 time to first token.
Prints a table (or --json) and exits 1 if any check fails. Loopback only; ends by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shlex
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse


def stream_completion(base: str, body: dict, stop_after: int | None = None, timeout: float = 300) -> dict:
    """POST a streaming completion; returns text, chunk count, whether it finished, timings."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    began = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        out = {"status": resp.status, "error": resp.read().decode()[:300], "finished": False}
        conn.close()
        return out
    text, tokens, chunks, finished, first = "", [], 0, False, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            finished = True
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return {"status": 500, "error": chunk["error"], "finished": False}
        first = first or time.perf_counter()
        chunks += 1
        for choice in chunk["choices"]:
            text += choice["text"]
            tokens += (choice.get("logprobs") or {}).get("tokens") or []
        if stop_after is not None and chunks >= stop_after:
            break  # disconnect mid-stream
    conn.close()
    return {"status": 200, "text": text, "tokens": tokens, "chunks": chunks, "finished": finished,
            "ttft": (first or time.perf_counter()) - began, "seconds": time.perf_counter() - began}


SNIPPETS = ["def fibonacci(n):\n    ", "class Stack:\n    def push(self, x):\n        ", "import os\n\ndef main():\n",
            "for i in range(10):\n    ", "def parse(line):\n    parts = ", "# read a file\nwith open(path) as f:\n"]
KINDS = ["plain", "fim", "infill", "chat"]


def mixed_request(kind: str, i: int, max_tokens: int) -> tuple[str, dict]:
    """(path, body) of client i of a kind; the same i always asks the same thing (greedy: same answer)."""
    prefix, suffix = SNIPPETS[i % len(SNIPPETS)], f"\n    return x{i % 3}\n"
    common = {"temperature": 0, "ignore_eos": True, "stream": True}
    if kind == "plain":
        return "/v1/completions", common | {"prompt": prefix, "max_tokens": max_tokens}
    if kind == "fim":
        return "/v1/fim/completions", common | {"prompt": prefix, "suffix": suffix, "max_tokens": max_tokens}
    if kind == "infill":
        extra = [{"filename": f"mod{j}.py", "text": SNIPPETS[(i + j) % len(SNIPPETS)], "time": [0, j]}
                 for j in range(2)]
        return "/infill", common | {"input_prefix": prefix, "input_suffix": suffix, "input_extra": extra,
                                    "prompt": "", "n_predict": max_tokens, "cache_prompt": True}
    return "/v1/chat/completions", common | {"messages": [{"role": "user", "content": prefix}],
                                             "max_tokens": max_tokens}


def stream_mixed(base: str, path: str, body: dict, stop_after: int | None = None, timeout: float = 300) -> dict:
    """POST a streaming request of any kind; text, whether it finished, time to first text."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    began = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        out = {"status": resp.status, "error": resp.read().decode()[:300], "finished": False}
        conn.close()
        return out
    text, chunks, finished, first = "", 0, False, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            finished = True
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return {"status": 500, "error": chunk["error"], "finished": False}
        first = first or time.perf_counter()
        chunks += 1
        if path == "/infill":
            text += chunk.get("content", "")
            if chunk.get("stop"):
                finished = True
                break
        else:
            for choice in chunk["choices"]:
                text += choice["text"] if "text" in choice else choice["delta"].get("content", "")
        if stop_after is not None and chunks >= stop_after:
            break
    conn.close()
    return {"status": 200, "text": text, "finished": finished, "ttft": (first or time.perf_counter()) - began,
            "seconds": time.perf_counter() - began}


def hostile_requests() -> list[tuple[str, bytes]]:
    big = json.dumps({"prompt": [1] * 100_000, "max_tokens": 1}).encode()
    return [("/v1/completions", json.dumps({"prompt": "x", "temperature": 1e-308, "max_tokens": 2}).encode()),
            ("/v1/completions", b'{"prompt": "x", "temperature": NaN}'),
            ("/v1/completions", b'{"prompt": "x", "top_p": Infinity}'),
            ("/v1/completions", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
            ("/v1/completions", b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}"),
            ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10 ** 30}).encode()),
            ("/v1/completions", b'{"prompt": "\xff\xfe"}'),  # not UTF-8
            ("/v1/completions", big),
            ("/v1/completions", json.dumps({"prompt": "x", "n": 10 ** 6, "logprobs": 10 ** 6}).encode()),
            ("/v1/completions", json.dumps({"prompt": "x", "stop": ["a"] * 10_000}).encode()),
            ("/infill", json.dumps({"input_prefix": "x", "n_indent": 10 ** 12, "n_predict": 2}).encode()),
            ("/v1/fim/completions", json.dumps({"prompt": "x", "suffix": None, "max_tokens": -5}).encode())]


def post_raw(base: str, path: str, data: bytes, timeout: float = 60) -> int:
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def run_mix(base: str, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    kinds = list(KINDS)
    probe = post_raw(base, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                                               "max_tokens": 1}).encode())
    chat = probe == 200
    if not chat:
        kinds = ["plain", "fim", "infill", "plain"]  # no chat (no tokenizer): that share goes to plain
    jobs = [(kinds[i % 4], i % args.prompts) for i in range(args.clients)]
    failures: list[str] = []
    reference = {}
    for kind, i in sorted(set(jobs)):
        r = stream_mixed(base, *mixed_request(kind, i, args.max_tokens))
        if not r["finished"]:
            failures.append(f"sequential {kind} {i}: {r.get('error')}")
        reference[(kind, i)] = r

    hostile, stop = {"answered": 0, "5xx": []}, threading.Event()

    def attack():
        requests = hostile_requests()
        k = 0
        while not stop.is_set():
            path, data = requests[k % len(requests)]
            status = post_raw(base, path, data)
            hostile["answered"] += 1
            if status >= 500:
                hostile["5xx"].append((path, data[:60], status))
            k += 1

    leaving = set(rng.sample(range(args.clients), args.disconnect))
    results: list[dict | None] = [None] * args.clients

    def client(n: int):
        kind, i = jobs[n]
        results[n] = stream_mixed(base, *mixed_request(kind, i, args.max_tokens),
                                  stop_after=2 if n in leaving else None)

    attacker = threading.Thread(target=attack)
    attacker.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    stop.set()
    attacker.join()
    exact = answers_must_match(base)  # see run()
    for n, r in enumerate(results):
        if n in leaving:
            continue
        want = reference[jobs[n]]
        if not r["finished"]:
            failures.append(f"client {n} ({jobs[n][0]}): did not finish ({r.get('error')})")
        elif r["text"] != want.get("text") and exact:
            failures.append(f"client {n} ({jobs[n][0]}): answer differs from the single-client one")
    if hostile["5xx"]:
        failures.append(f"hostile requests answered 5xx: {hostile['5xx'][:3]}")
    deadline = time.time() + 30
    while True:
        _, text = get(base, "/metrics")
        settled = metric(text, "gptbc_requests_running") == 0 and metric(text, "gptbc_requests_waiting") == 0
        if settled or time.time() > deadline:
            break
        time.sleep(0.1)
    sequences, kept = metric(text, "gptbc_kv_sequences"), metric(text, "gptbc_prefix_cache_sequences")
    in_use, cached = metric(text, "gptbc_kv_pages_in_use"), metric(text, "gptbc_kv_pages_prefix_cache")
    if sequences != kept or in_use > cached:
        failures.append(f"KV leaked: {sequences:.0f} sequences / {in_use:.0f} pages held after the run")
    if get(base, "/health")[0] != 200:
        failures.append("/health is not 200 after the run")
    finished = [r for n, r in enumerate(results) if n not in leaving and r["finished"]]
    ttfts = sorted(r["ttft"] for r in finished)

    def pct(q):
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None

    return {"mode": "mix", "clients": args.clients, "disconnected": args.disconnect, "max_tokens": args.max_tokens,
            "kinds": {k: sum(1 for j in jobs if j[0] == k) for k in set(kinds)}, "chat_template": chat,
            "tokens_per_s": len(finished) * args.max_tokens / seconds, "seconds": seconds,
            "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99), "hostile_answered": hostile["answered"],
            "kv_sequences_after": sequences, "prefix_cache_sequences_after": kept, "failures": failures}


def answers_must_match(base: str) -> bool:
    """Whether every concurrent answer must equal the single-client one: a server that states the
    batch-invariant guarantee (serve --batch-invariant on a --batch-invariant library), or float activations
    (where a last-bit difference leaves greedy choices alone on these prompts)."""
    card = json.loads(get(base, "/v1/models")[1])["data"][0]
    return card.get("guarantee", {}).get("batch_invariant", False) or card.get("activations", "float") == "float"


def get(base: str, path: str, timeout: float = 10) -> tuple[int, str]:
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def start_server(out_dir: str, lib: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(["gptbc", "serve", out_dir, "--lib", lib, "--port", "0", *extra],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"error: gptbc serve did not start (exit {proc.wait()})")
    return proc, line.split(" on ", 1)[1].split()[0]


def run(base: str, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1, args.vocab_hint) for _ in range(args.prompt_tokens + i % 5)]
               for i in range(args.prompts)]

    def body(i: int) -> dict:
        # logprobs 0: each chunk names its tokens, so answers compare even for a model without a tokenizer
        return {"prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens, "temperature": 0,
                "ignore_eos": True, "logprobs": 0}

    # 1. one client at a time
    began = time.perf_counter()
    reference = [stream_completion(base, body(i)) for i in range(len(prompts))]
    seq_seconds = time.perf_counter() - began
    failures = [f"sequential prompt {i}: {r.get('error')}" for i, r in enumerate(reference) if not r["finished"]]

    # 2. many at once, some leaving early, /health polled throughout
    health = {"ok": 0, "bad": 0, "worst": 0.0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            t = time.perf_counter()
            try:
                ok = get(base, "/health", timeout=5)[0] == 200
            except OSError:
                ok = False
            health["ok" if ok else "bad"] += 1
            health["worst"] = max(health["worst"], time.perf_counter() - t)
            time.sleep(0.05)

    results: list[dict | None] = [None] * args.clients
    leaving = set(rng.sample(range(args.clients), args.disconnect))

    def client(i: int):
        results[i] = stream_completion(base, body(i), stop_after=2 if i in leaving else None)

    poller = threading.Thread(target=poll)
    poller.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    con_seconds = time.perf_counter() - began

    # 3. checks. With float activations a batched step computes each row as a lone one up to float rounding
    # (~1e-7), and greedy answers are equal; with int8 activations such a difference moves some activation
    # across an int8 rounding boundary, which moves the logits by ~1e-3, so near-tied greedy choices (every
    # step of a random-weight model) can differ: then answers are counted, not required equal.
    exact = answers_must_match(base)
    same = 0
    for i, r in enumerate(results):
        if i in leaving:
            continue
        want = reference[i % len(prompts)]
        if not r["finished"] or len(r["tokens"]) != args.max_tokens:
            failures.append(f"client {i}: did not finish ({r.get('error')})")
        elif (r["text"], r["tokens"]) == (want.get("text"), want.get("tokens")):
            same += 1
        elif exact:
            failures.append(f"client {i}: answer differs from the single-client one")
    deadline = time.time() + 30
    while True:  # the cancellations of the departed clients land within a step or two
        status, text = get(base, "/metrics")
        settled = metric(text, "gptbc_requests_running") == 0 and metric(text, "gptbc_requests_waiting") == 0
        if settled or time.time() > deadline:
            break
        time.sleep(0.1)
    stop.set()
    poller.join()
    in_use, cached = metric(text, "gptbc_kv_pages_in_use"), metric(text, "gptbc_kv_pages_prefix_cache")
    sequences, kept = metric(text, "gptbc_kv_sequences"), metric(text, "gptbc_prefix_cache_sequences")
    if not settled:
        failures.append("sequences still running 30 s after every client finished")
    # Only the prefix cache may hold KV now; its sequences can share pages (forks), so pages ≤ its total.
    if sequences != kept or in_use > cached:
        failures.append(f"KV leaked: {sequences:.0f} sequences / {in_use:.0f} pages held, the prefix cache "
                        f"accounts for {kept:.0f} / at most {cached:.0f}")
    if health["bad"] or health["ok"] == 0:
        failures.append(f"/health failed {health['bad']} times (answered {health['ok']})")
    cancelled = metric(text, "gptbc_sequences_cancelled_total")
    if cancelled < args.disconnect:
        failures.append(f"only {cancelled:.0f} sequences cancelled for {args.disconnect} disconnected clients")

    finished = [r for i, r in enumerate(results) if i not in leaving and r["finished"]]
    seq_tokens = len(prompts) * args.max_tokens
    con_tokens = len(finished) * args.max_tokens  # departed clients' partial tokens are not counted
    return {
        "clients": args.clients, "disconnected": args.disconnect, "max_tokens": args.max_tokens,
        "single_client_tokens_per_s": seq_tokens / seq_seconds,
        "concurrent_tokens_per_s": con_tokens / con_seconds,
        "speedup": (con_tokens / con_seconds) / (seq_tokens / seq_seconds),
        "concurrent_ttft_median_s": sorted(r["ttft"] for r in finished)[len(finished) // 2] if finished else None,
        "health_checks": health["ok"], "health_worst_s": health["worst"],
        "kv_pages_in_use_after": in_use, "kv_pages_prefix_cache_after": cached, "kv_sequences_after": sequences,
        "prefix_cache_sequences_after": kept, "cancelled": cancelled,
        "answers_equal_to_single_client": same, "answers_checked": args.clients - len(leaving), "exact": exact,
        "failures": failures,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--lib", required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--disconnect", type=int, default=5)
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts (clients cycle through them)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--vocab-hint", type=int, default=256, help="prompt token ids are drawn from [1, this)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--serve-args", default="", help="extra `gptbc serve` flags, e.g. '--max-batch 8'")
    p.add_argument("--mix", action="store_true", help="plain, FIM, infill and chat clients plus hostile requests")
    args = p.parse_args()
    proc, base = start_server(args.out_dir, args.lib, shlex.split(args.serve_args))
    try:
        result = run_mix(base, args) if args.mix else run(base, args)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.mix:
        print(f"| clients (kinds) | leave early | tokens/s | TTFT p50 | TTFT p99 | hostile answered |\n"
              f"|---|---|---|---|---|---|\n| {args.clients} ({', '.join(f'{k} {n}' for k, n in result['kinds'].items())})"
              f" | {args.disconnect} | {result['tokens_per_s']:.1f} | {result['ttft_p50_s'] * 1e3:.0f} ms | "
              f"{result['ttft_p99_s'] * 1e3:.0f} ms | {result['hostile_answered']} |")
    else:
        print(f"| clients | tokens/s | vs one client |\n|---|---|---|\n"
              f"| 1 (sequential) | {result['single_client_tokens_per_s']:.1f} | 1.00× |\n"
              f"| {args.clients} concurrent ({args.disconnect} leave early) | "
              f"{result['concurrent_tokens_per_s']:.1f} | {result['speedup']:.2f}× |")
        print(f"answers equal to the single-client ones: {result['answers_equal_to_single_client']}/"
              f"{result['answers_checked']} ({'required' if result['exact'] else 'int8 activations without --batch-invariant: counted'})")
        print(f"health checks {result['health_checks']} (worst {result['health_worst_s'] * 1e3:.0f} ms); after: "
              f"{result['kv_sequences_after']:.0f} KV sequences ({result['prefix_cache_sequences_after']:.0f} in the "
              f"prefix cache), {result['kv_pages_in_use_after']:.0f} pages in use; "
              f"{result['cancelled']:.0f} sequences cancelled")
    for f in result["failures"]:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
