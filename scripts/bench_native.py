"""Decode speed of the native runner (gptbc-run) and the Python engine, side by side on one model.

Both run the same workload as `gptbc bench`'s decode test: a 32-token prompt (seeded random ids), then 64
greedy single-token decode steps at batch 1, timed over the steps only. Rounds alternate the two runners
(the order flips every round) so a noisy, shared machine slows both alike; best and median of the rounds
are reported, and the greedy tokens of the two are compared.

    cmake -S . -B build && cmake --build build -j2
    python scripts/bench_native.py /tmp/models/santa-q4f32 --lib /tmp/models/santa-q4f32.so
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from gptbc.errors import GptbcError
from gptbc.runtime.engine import Engine


def python_round(engine: Engine, ids: list[int], decode: int) -> tuple[float, list[int]]:
    """Decode tokens/s of the Python engine (as gptbc bench measures it) and the tokens it chose."""
    seq = engine.runner.add_sequence()
    try:
        tokens = [int(np.argmax(engine.runner.prefill(seq, ids)))]
        start = time.perf_counter()
        for _ in range(decode):
            tokens.append(int(np.argmax(engine.runner.decode(seq, tokens[-1]))))
        return decode / (time.perf_counter() - start), tokens
    finally:
        engine.runner.remove_sequence(seq)


def native_round(runner: Path, model: Path, lib: Path, ids: list[int], decode: int) -> tuple[float, list[int], float]:
    """Decode tokens/s gptbc-run reports, its tokens, and its load time (library, weights, KV cache)."""
    done = subprocess.run([str(runner), "--model", str(model), "--lib", str(lib), "--prompt-ids",
                           ",".join(map(str, ids)), "--max-new-tokens", str(decode + 1), "--ignore-eos", "--json"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gptbc-run failed: {done.stderr.strip()}")
    out = json.loads(done.stdout)
    assert out["decode_steps"] == decode
    return out["decode_tokens_per_s"], out["token_ids"], out["load_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="converted weights directory")
    p.add_argument("--lib", type=Path, required=True, help="CPU model library")
    p.add_argument("--runner", type=Path, default=Path("build/gptbc-run"), help="the gptbc-run executable")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (seeded random ids; default 32)")
    p.add_argument("--decode", type=int, default=64, help="greedy decode steps timed (default 64)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of each runner (default 3)")
    args = p.parse_args()
    for flag, value in (("--prompt", args.prompt), ("--decode", args.decode), ("--repeat", args.repeat)):
        if value < 1:
            raise SystemExit(f"error: {flag} {value}: must be at least 1")
    if not args.runner.is_file():
        raise SystemExit(f"error: --runner {args.runner}: no such file (build it: cmake -S . -B build && "
                         f"cmake --build build -j2)")

    import tvm  # noqa: F401  (not counted in the Python engine's load time)

    start = time.perf_counter()
    try:
        engine = Engine(args.model, args.lib, max_total_seq_len=args.prompt + args.decode + 64,
                        prefix_cache_size=0)
    except GptbcError as err:
        raise SystemExit(f"error: {err}") from None
    python_load = time.perf_counter() - start
    ids = np.random.default_rng(0).integers(0, engine.config.vocab_size, args.prompt).tolist()
    rates: dict[str, list[float]] = {"gptbc-run (C++)": [], "Engine (Python)": []}
    loads, same = [], True
    for r in range(args.repeat):
        for who in (("native", "python") if r % 2 == 0 else ("python", "native")):
            if who == "native":
                rate, native_tokens, load = native_round(args.runner, args.model, args.lib, ids, args.decode)
                rates["gptbc-run (C++)"].append(rate)
                loads.append(load)
            else:
                rate, python_tokens = python_round(engine, ids, args.decode)
                rates["Engine (Python)"].append(rate)
        same = same and native_tokens == python_tokens
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} tok/s" for k, v in rates.items()), flush=True)

    print(f"\n{args.model} with {args.lib.name}: {args.prompt}-token prompt, {args.decode} greedy decode steps, "
          f"batch 1, {args.repeat} alternating rounds")
    print("| runner | decode tok/s (best) | decode tok/s (median) | load s (best) |\n|---|---|---|---|")
    for (name, v), load in zip(rates.items(), (min(loads), python_load)):
        print(f"| {name} | {max(v):.2f} | {statistics.median(v):.2f} | {load:.2f} |")
    print(f"\nload: library + weights + KV cache (Python: Engine(), with TVM already imported); "
          f"same greedy tokens: {'yes' if same else 'NO'}")
    if not same:  # the two runners did not run the same computation: the speeds compare nothing
        raise SystemExit(1)


if __name__ == "__main__":
    main()
