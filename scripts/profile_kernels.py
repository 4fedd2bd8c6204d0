"""Where one forward pass spends its time, kernel by kernel (the Relax VM's instrument hook).

    python scripts/profile_kernels.py OUT_DIR --lib LIB [--tokens N] [--repeat R] [--top K]

--tokens 1 profiles a decode step (after an 8-token prompt); more profiles one prefill of that many tokens.
Times are wall clock around each kernel call, summed over the layers; the last of --repeat runs is printed
(the first warms caches and the thread pool up).
"""

from __future__ import annotations

import argparse
import collections
import time

from gptbc.runtime.engine import Engine


def profile(engine: Engine, tokens: int) -> tuple[float, dict[str, float], dict[str, int]]:
    times: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    started: list[float] = []

    def instrument(_func, name, before, _ret, *_args):
        if before:
            started.append(time.perf_counter())
        else:
            times[name] += time.perf_counter() - started.pop()
            calls[name] += 1
        return 0  # 0: keep running the call as usual

    seq = engine.runner.add_sequence()
    if tokens == 1:
        engine.runner.prefill(seq, list(range(1, 9)))
    ids = list(range(1, tokens + 1))
    embeds = engine.runner._embed(ids)._create_view((1, tokens, engine.config.n_embd))
    engine.runner.vm.set_instrument(instrument)
    engine.runner._begin(engine.runner.kv_cache, engine.runner._shape([seq]), engine.runner._shape([tokens]))
    start = time.perf_counter()
    try:
        engine.runner.vm["decode" if tokens == 1 else "prefill"](embeds, engine.runner.kv_cache, engine.runner.params)
    finally:
        total = time.perf_counter() - start
        engine.runner._end(engine.runner.kv_cache)
        engine.runner.vm.set_instrument(None)
        engine.runner.remove_sequence(seq)
    return total, times, calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--lib", required=True)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    engine = Engine(args.out_dir, args.lib, max_total_seq_len=args.tokens + 64, max_batch_size=1,
                    prefix_cache_size=0)
    for _ in range(args.repeat):
        total, times, calls = profile(engine, args.tokens)
    print(f"{'decode step' if args.tokens == 1 else f'prefill of {args.tokens} tokens'}: {total * 1e3:.1f} ms "
          f"({args.tokens / total:.1f} tok/s)")
    for name, seconds in sorted(times.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{seconds * 1e3:10.2f} ms {calls[name]:4d}x  {name}")


if __name__ == "__main__":
    main()
