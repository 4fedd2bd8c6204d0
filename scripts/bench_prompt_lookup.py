"""Prompt-lookup speculation on a code-editing workload: the model rewrites a file that is in its prompt.

    python scripts/bench_prompt_lookup.py OUT_DIR --lib LIB --file FILE [--new-tokens 200] [--draft 8]

The prompt is the file, a separator and the file's first line, so greedy decoding continues by copying the
rest of the file (as an edit does, except where the edit is). Plain greedy decoding and prompt lookup run on
the same engine, one after the other, `--repeat` times; printed: tokens/s of each (best), the speedup,
tokens per decode step, the acceptance rate, and whether both produced the same tokens (they must).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from gptbc.errors import GptbcError
from gptbc.runtime.engine import Engine
from gptbc.runtime.speculation import PromptLookup


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="converted weights directory (with a tokenizer)")
    ap.add_argument("--lib", required=True, help="CPU model library")
    ap.add_argument("--file", required=True, help="the text being edited (it goes into the prompt)")
    ap.add_argument("--new-tokens", type=int, default=200,
                    help="tokens generated (default 200; fewer if the context window has less room)")
    ap.add_argument("--draft", type=int, default=8, help="draft tokens per prompt-lookup step (default 8)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, the best timed (default 3)")
    args = ap.parse_args()
    for flag, value in (("--new-tokens", args.new_tokens), ("--draft", args.draft), ("--repeat", args.repeat)):
        if value < 1:
            raise SystemExit(f"error: {flag} {value}: must be at least 1")
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"error: --file {args.file}: cannot read it as UTF-8 text "
                         f"({getattr(err, 'strerror', None) or err})") from None
    if not text.strip():
        raise SystemExit(f"error: --file {args.file}: is empty (nothing to rewrite)")
    try:
        engine = Engine(args.out_dir, args.lib, prefix_cache_size=0)
        prompt = engine.encode(text + "\n\n" + text.splitlines()[0] + "\n")
    except GptbcError as err:
        raise SystemExit(f"error: {err}") from None
    room = engine.context_window_size - len(prompt)
    if room < 1:
        raise SystemExit(f"error: --file {args.file}: the prompt is {len(prompt)} tokens and the context window "
                         f"holds {engine.context_window_size}: no room to generate (use a shorter file)")
    new = min(args.new_tokens, room)
    result = {"prompt_tokens": len(prompt), "new_tokens": new}
    outputs = {}
    for name, lookup in (("plain", None), ("prompt_lookup", PromptLookup(num_draft=args.draft))):
        engine.speculation = lookup
        best, stats = float("inf"), None
        for _ in range(args.repeat):
            before = engine.status()
            start = time.perf_counter()
            outputs[name] = engine.generate(prompt, new, ignore_eos=True)
            best = min(best, time.perf_counter() - start)
            after = engine.status()
            stats = {k: after[k] - before[k] for k in ("decode_steps", "decode_tokens", "drafted_tokens",
                                                       "accepted_tokens")}
        result[name] = {"tokens_per_s": new / best,
                        "tokens_per_step": stats["decode_tokens"] / stats["decode_steps"],
                        "acceptance_rate": stats["accepted_tokens"] / stats["drafted_tokens"]
                        if stats["drafted_tokens"] else 0.0}
    result["speedup"] = result["prompt_lookup"]["tokens_per_s"] / result["plain"]["tokens_per_s"]
    result["same_tokens"] = outputs["plain"] == outputs["prompt_lookup"]
    print(json.dumps(result, indent=2))
    return 0 if result["same_tokens"] else 1  # prompt lookup must not change greedy output


if __name__ == "__main__":
    sys.exit(main())
