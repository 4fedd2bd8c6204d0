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

    # 3. checks
    for i, r in enumerate(results):
        if i in leaving:
            continue
        want = reference[i % len(prompts)]
        if not r["finished"]:
            failures.append(f"client {i}: did not finish ({r.get('error')})")
        elif (r["text"], r["tokens"]) != (want.get("text"), want.get("tokens")) or len(r["tokens"]) != args.max_tokens:
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
    args = p.parse_args()
    proc, base = start_server(args.out_dir, args.lib, shlex.split(args.serve_args))
    try:
        result = run(base, args)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"| clients | tokens/s | vs one client |\n|---|---|---|\n"
              f"| 1 (sequential) | {result['single_client_tokens_per_s']:.1f} | 1.00× |\n"
              f"| {args.clients} concurrent ({args.disconnect} leave early) | "
              f"{result['concurrent_tokens_per_s']:.1f} | {result['speedup']:.2f}× |")
        print(f"health checks {result['health_checks']} (worst {result['health_worst_s'] * 1e3:.0f} ms); after: "
              f"{result['kv_sequences_after']:.0f} KV sequences ({result['prefix_cache_sequences_after']:.0f} in the "
              f"prefix cache), {result['kv_pages_in_use_after']:.0f} pages in use; "
              f"{result['cancelled']:.0f} sequences cancelled")
    for f in result["failures"]:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
