#!/usr/bin/env python3
"""How long `gptbc serve MODEL` takes to answer /health: the first start (converting and compiling into the
artifact cache, when it is empty) and the starts after it (loading what the cache holds).

    python scripts/bench_start.py santacoder --random-weights --quantization q4f16_1 --starts 3 --cache /tmp/c --fresh

Arguments after MODEL go to `gptbc serve` as they are. Each start runs `gptbc serve ... --port 0` as a user starts
it, polls GET /health until it answers 200, then stops the server with SIGINT. Prints a table and, with --json,
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def one_start(serve_args: list[str], env: dict, timeout: float) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(["gptbc", "serve", *serve_args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        if " on http://" not in line:
            proc.wait(timeout=30)
            sys.exit(f"error: gptbc serve did not start: {proc.stderr.read().strip().splitlines()[-1:]}")
        base = line.split(" on ", 1)[1].split()[0]
        while time.perf_counter() - start < timeout:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.02)
        healthy = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    built = [ln for ln in err.splitlines() if "built in" in ln]
    return {"to_health_s": round(healthy, 3), "built": built,
            "cached": [ln for ln in err.splitlines() if ": cached, built" in ln]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="MODEL as `gptbc serve` takes it")
    p.add_argument("--starts", type=int, default=2, help="starts to time (the first may build)")
    p.add_argument("--cache", help="GPTBC_CACHE_DIR for the runs (default: the user's cache)")
    p.add_argument("--fresh", action="store_true", help="empty --cache first, so the first start builds")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a start may take")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args, serve_args = p.parse_known_args()
    env = dict(os.environ)
    if args.cache:
        env["GPTBC_CACHE_DIR"] = args.cache
        if args.fresh:
            shutil.rmtree(args.cache, ignore_errors=True)
    elif args.fresh:
        p.error("--fresh needs --cache (it empties that folder)")
    runs = [one_start([args.model, *serve_args], env, args.timeout) for _ in range(args.starts)]
    if args.json:
        print(json.dumps({"model": args.model, "serve_args": serve_args, "starts": runs}, indent=2))
        return 0
    print(f"gptbc serve {args.model} {' '.join(serve_args)}: time from start to a healthy /health")
    print("| start | seconds | built |")
    print("|---|---|---|")
    for i, r in enumerate(runs, 1):
        what = "; ".join(b.split("] ", 1)[-1].split(" (")[0] for b in r["built"]) or "nothing (all cached)"
        print(f"| {i} | {r['to_health_s']:.2f} | {what} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
