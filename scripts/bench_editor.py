#!/usr/bin/env python3
"""The editor loop, measured as llama.vim sends it: one /infill per keystroke against `gptbc serve MODEL` and,
with --llama-server, llama.cpp's llama-server on a GGUF of the same model.

    python scripts/bench_editor.py santacoder --random-weights --quantization q4f32_1 --threads 2 \\
        --llama-server ~/llama.cpp/build/bin/llama-server --gguf santacoder-q4_0.gguf

Arguments after MODEL that this script does not know go to `gptbc serve` as they are. The cursor sits on a new
line opened at --line of --file (default: the middle of CPython's argparse.py), indented as that line, and
--typed is typed there one character per keystroke. Each request is llama.vim's (autoload/llama.vim llama#fim;
docs/llama-cpp-protocol.md): up to --n-prefix lines before the cursor in `input_prefix`, the cursor line up to
the cursor in `prompt`, a newline and up to --n-suffix lines after it in `input_suffix`, one `input_extra` chunk
(--extra-lines lines of --extra-file), n_predict --n-predict, cache_prompt, greedy, with no time limit
(llama.vim's t_max_predict_ms would cut the decode at 250 ms and hide its cost). --editors N: N editors
type at once, each at its own place in the file.

Each server is started as a user starts it, in this script's own process group (a new session: nothing of it
outlives the run), and stopped with SIGINT. gptbc serve runs once per --fim-order (the request's fim_order
field); llama-server runs as started and, with --llama-spm, again with its --spm-infill (another order, which
BigCode's models were not trained on). Per run: the cold request (nothing cached), the keystroke median and
worst, tokens evaluated and reused per keystroke (median), and the cold time per evaluated prompt token (the
two servers fit a long prompt to the window differently, so that is the fair cold comparison). Prints a table
and, with --json, one JSON object. Timings mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A server process in its own session (its output in a temporary file, so that a chatty server never
    blocks on a full pipe); stopped, the whole group, by stop()."""

    def __init__(self, argv: list[str], base: str | None, timeout: float):
        self.name, self.log = Path(argv[0]).name, tempfile.TemporaryFile("w+")
        announce = subprocess.PIPE if base is None else self.log  # gptbc serve prints its URL on stdout
        self.proc = subprocess.Popen(argv, stdout=announce, stderr=self.log, text=True, start_new_session=True)
        if base is None:
            line = self.proc.stdout.readline()  # "gptbc serve: NAME on http://HOST:PORT (...)"
            if " on http://" not in line:
                self.fail("did not start")
            base = line.split(" on ", 1)[1].split()[0]
        self.base = base
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None:
                self.fail(f"exited ({self.proc.returncode})")
            if time.monotonic() > deadline:
                self.fail(f"not healthy after {timeout:.0f} s")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def fail(self, what: str) -> None:
        self.stop()
        self.log.seek(0)
        lines = self.log.read().strip().splitlines()
        sys.exit(f"error: {self.name} {what}: {lines[-1] if lines else '(no output)'}")


def infill(base: str, body: dict) -> tuple[float, dict]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(base + "/infill", data, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        reply = json.loads(r.read())
    return time.perf_counter() - start, reply


def requests_of(lines: list[str], line: int, typed: str, extra: dict, args) -> list[dict]:
    """llama.vim's /infill bodies for a new line opened above `line` (indented as it is): the cold request
    (the empty line), then one per typed character."""
    cur = lines[line]
    indent = len(cur) - len(cur.lstrip())
    prefix = "".join(f"{x}\n" for x in lines[max(0, line - args.n_prefix):line])
    suffix_lines = lines[line:line + args.n_suffix]
    bodies = []
    for k in range(len(typed) + 1):
        text = cur[:indent] + typed[:k]
        body = {"id_slot": -1, "input_prefix": prefix, "prompt": text,
                "input_suffix": "\n" + "".join(f"{x}\n" for x in suffix_lines), "input_extra": [extra],
                "n_predict": args.n_predict, "n_indent": indent, "temperature": 0.0, "top_k": 1,
                "stream": False, "cache_prompt": True}
        bodies.append(body)
    return bodies[:args.keystrokes + 1]


def one_editor(base: str, bodies: list[dict], fields: dict, out: list, start: threading.Barrier) -> None:
    start.wait()
    for body in bodies:
        seconds, reply = infill(base, body | fields)
        t = reply.get("timings") or {}
        out.append({"s": seconds, "evaluated": int(t.get("prompt_n", reply.get("tokens_evaluated", 0))),
                    "reused": int(t.get("cache_n", reply.get("tokens_cached", 0))),
                    "predicted": int(reply.get("tokens_predicted", t.get("predicted_n", 0)))})


def replay(base: str, editors: list[list[dict]], fields: dict) -> dict:
    """Every editor's requests, the editors at once; the cold request of each, then its keystrokes."""
    results: list[list[dict]] = [[] for _ in editors]
    barrier = threading.Barrier(len(editors))
    threads = [threading.Thread(target=one_editor, args=(base, bodies, fields, out, barrier))
               for bodies, out in zip(editors, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cold = [r[0] for r in results]
    keys = [k for r in results for k in r[1:]]
    seconds = [k["s"] for k in keys]
    return {"cold_s": statistics.median(c["s"] for c in cold),
            "cold_evaluated": int(statistics.median(c["evaluated"] for c in cold)),
            "cold_ms_per_token": statistics.median(1e3 * c["s"] / max(c["evaluated"], 1) for c in cold),
            "keystrokes": len(keys), "keystroke_median_s": statistics.median(seconds) if keys else None,
            "keystroke_worst_s": max(seconds) if keys else None,
            "evaluated_median": statistics.median(k["evaluated"] for k in keys) if keys else None,
            "reused_median": statistics.median(k["reused"] for k in keys) if keys else None,
            "predicted_median": statistics.median(k["predicted"] for k in keys) if keys else None,
            "per_keystroke": [[{x: k[x] for x in ("evaluated", "reused", "predicted")} | {"s": round(k["s"], 4)}
                               for k in r[1:]] for r in results]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="MODEL as `gptbc serve` takes it")
    p.add_argument("--file", default=argparse.__file__, help="the file typed in (default: argparse.py)")
    p.add_argument("--line", type=int, help="cursor line, 0-based (default: the middle of --file)")
    p.add_argument("--typed", default="result = self._get_values(action, arg_strings)",
                   help="text typed at the cursor, one keystroke per character")
    p.add_argument("--keystrokes", type=int, default=12, help="keystrokes replayed after the cold request")
    p.add_argument("--n-prefix", type=int, default=256, help="lines before the cursor (llama.vim: 256)")
    p.add_argument("--n-suffix", type=int, default=64, help="lines after the cursor (llama.vim: 64)")
    p.add_argument("--extra-file", default=shlex.__file__, help="the input_extra chunk's file (default: shlex.py)")
    p.add_argument("--extra-lines", type=int, default=64, help="lines of --extra-file in the chunk")
    p.add_argument("--n-predict", type=int, default=32)
    p.add_argument("--editors", type=int, default=1, help="editors typing at once, each at its own place")
    p.add_argument("--fim-order", choices=["psm", "spm", "both"], default="both",
                   help="gptbc serve's order(s): one run each (the requests' fim_order field)")
    p.add_argument("--threads", type=int, help="threads of each server (gptbc --threads, llama-server -t)")
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary: also measure it")
    p.add_argument("--gguf", help="the GGUF llama-server loads (the same model and bits)")
    p.add_argument("--llama-args", default="", help="more llama-server arguments (e.g. '-c 2048')")
    p.add_argument("--llama-spm", action="store_true", help="also run llama-server with its --spm-infill")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a server may take to become healthy")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args, serve_args = p.parse_known_args()
    if args.llama_server and not args.gguf:
        p.error("--llama-server needs --gguf (the same model as a GGUF file)")
    if args.keystrokes < 0 or args.editors < 1:
        p.error("--keystrokes must be >= 0 and --editors >= 1")
    try:
        lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        extra_text = "".join(f"{x}\n" for x in Path(args.extra_file).read_text(encoding="utf-8")
                             .splitlines()[:args.extra_lines])
    except (OSError, UnicodeDecodeError) as err:
        sys.exit(f"error: {err.filename or args.file}: cannot read ({err.strerror or err})")
    if not lines:
        sys.exit(f"error: --file {args.file}: empty")
    line = len(lines) // 2 if args.line is None else args.line
    if not 0 <= line < len(lines):
        sys.exit(f"error: --line {line}: {args.file} has {len(lines)} lines")
    if len(args.typed) < args.keystrokes:
        p.error(f"--typed has {len(args.typed)} characters, fewer than --keystrokes {args.keystrokes}")
    extra = {"text": extra_text, "filename": Path(args.extra_file).name}
    # Editor i types at its own line, spread through the file (editor 0 at --line).
    places = [(line + i * max(len(lines) // args.editors, 1)) % len(lines) for i in range(args.editors)]
    editors = [requests_of(lines, at, args.typed, extra, args) for at in places]

    runs = []
    threads = ["--threads", str(args.threads)] if args.threads else []
    for order in (["psm", "spm"] if args.fim_order == "both" else [args.fim_order]):
        server = Served(["gptbc", "serve", args.model, *serve_args, *threads, "--port", "0"], None, args.timeout)
        try:
            runs.append({"server": "gptbc serve", "order": order} | replay(server.base, editors, {"fim_order": order}))
        finally:
            server.stop()
    if args.llama_server:
        for spm in ([False, True] if args.llama_spm else [False]):
            port = free_port()
            argv = [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port),
                    *(["-t", str(args.threads)] if args.threads else []), *shlex.split(args.llama_args),
                    *(["--spm-infill"] if spm else [])]
            server = Served(argv, f"http://127.0.0.1:{port}", args.timeout)
            try:
                runs.append({"server": "llama-server", "order": "--spm-infill" if spm else "psm"}
                            | replay(server.base, editors, {}))
            finally:
                server.stop()
    setup = {"model": args.model, "serve_args": serve_args, "file": args.file, "line": line, "editors": args.editors,
             "keystrokes": args.keystrokes, "n_predict": args.n_predict, "n_prefix": args.n_prefix,
             "n_suffix": args.n_suffix, "extra_file": args.extra_file, "extra_lines": args.extra_lines}
    if args.json:
        print(json.dumps({"setup": setup, "runs": runs}, indent=2))
        return 0
    print(f"{args.editors} editor(s), {args.keystrokes} keystrokes each at {Path(args.file).name}:{line + 1}, "
          f"n_predict {args.n_predict}")
    print("| server | order | cold s (tokens evaluated) | cold ms / evaluated token | keystroke median s | "
          "worst s | evaluated / reused per keystroke |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        key = (f"{r['keystroke_median_s']:.3f} | {r['keystroke_worst_s']:.3f} | "
               f"{r['evaluated_median']:g} / {r['reused_median']:g}") if r["keystrokes"] else "- | - | -"
        print(f"| {r['server']} | {r['order']} | {r['cold_s']:.3f} ({r['cold_evaluated']}) | "
              f"{r['cold_ms_per_token']:.2f} | {key} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
