"""What batch-invariant mode costs a prompt that reuses a cached prefix (docs/determinism.md).

A plain engine forks the cached prefix and prefills the rest in one call; `Engine(batch_invariant=True)` copies
the prefix (cut to a multiple of the attention grain) and prefills the rest in grain-sized calls. This times the
first token of a cold prompt of SHARED + NEW tokens, then of another that shares its first SHARED tokens, on
both engines, alternating, one request at a time; prints JSON.

    python scripts/bench_prefix_reuse.py DIR --lib PLAIN.so --invariant-lib INVARIANT.so --shared 1024 --new 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def first_token_seconds(engine, prompt: list[int]) -> tuple[float, int]:
    """Seconds to the first token of `prompt`, alone, and how many of its tokens came from the prefix cache."""
    req = engine.submit(prompt, params=engine.sampling(max_new_tokens=1))
    start = time.perf_counter()
    engine.scheduler.run_until_done([req])
    if req.error is not None:
        raise req.error
    return time.perf_counter() - start, req.reused


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--lib", required=True, help="a plain library")
    ap.add_argument("--invariant-lib", required=True, help="the same model compiled with --batch-invariant")
    ap.add_argument("--shared", type=int, default=1024, help="prompt tokens the second prompt reuses")
    ap.add_argument("--new", type=int, default=512, help="prompt tokens after them")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)

    from gptbc.errors import GptbcError
    from gptbc.runtime.engine import Engine

    try:
        engines = {"plain": Engine(args.model_dir, args.lib)}
        try:
            engines["invariant"] = Engine(args.model_dir, args.invariant_lib, batch_invariant=True)
        except GptbcError as err:
            raise GptbcError(f"--invariant-lib: {err}") from None
        window = engines["plain"].runner.context_window_size
        if args.shared < 1 or args.new < 1 or args.shared + args.new >= window:
            raise GptbcError(f"--shared {args.shared} --new {args.new}: each must be >= 1 and together below the "
                             f"context window ({window} tokens)")
    except GptbcError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    vocab = engines["plain"].config.vocab_size
    rng = np.random.default_rng(0)
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for _ in range(args.repeat):
        for name, engine in engines.items():
            shared = rng.integers(0, vocab, args.shared).tolist()
            cold, _ = first_token_seconds(engine, shared + rng.integers(0, vocab, args.new).tolist())
            hit, reused = first_token_seconds(engine, shared + rng.integers(0, vocab, args.new).tolist())
            runs[name].append({"cold_s": round(cold, 4), "reuse_s": round(hit, 4), "reused_tokens": reused})
    best = {name: min(r["reuse_s"] for r in rs) for name, rs in runs.items()}
    print(json.dumps({"shared": args.shared, "new": args.new, "runs": runs,
                      "reuse_invariant_over_plain": round(best["invariant"] / best["plain"], 3)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
