"""Draft-model speculative decoding, measured two ways.

    python scripts/bench_draft.py trained [--target DIR] [--draft DIR] [--new-tokens 48] [--repeat 3] [--json]
    python scripts/bench_draft.py shapes --target MODEL [--target-lib LIB] --draft MODEL [--draft-lib LIB]
                                  [--quantization q4f16_1] [--layers 2,4] [--steps 16] [--max-k 8] [--json]

`trained`: acceptance needs weights that have learned something. The trained pair is tests/data/trained-tiny (the
target) and tests/data/draft-tiny (a smaller model trained the same way on the same data, tests/data/draft-tiny/
README.md). Code completion prompts (the start of each training document) are completed greedily, plain and with
the draft, alternating, on the same engine (the draft switched on and off), `--repeat` rounds; printed: target
tokens per verify step, acceptance, the wall-clock speedup of the best rounds, and whether the tokens are the
same (they must be). Both models are converted (q0f32 unless --quantization) and compiled through the artifact
cache.

`shapes`: costs come from random weights at real shapes (a preset name: seeded random weights in the artifact
cache; anything `gptbc generate MODEL` accepts otherwise). Measured on one sequence after a 32-token prompt: the
target's decode step, its verify call of k+1 rows for k = 1..max-k, and the draft's decode step (medians of
--steps). From them, a PROJECTION: the speedup at per-token acceptance rates 0.5-0.9, best k each, as
E(a, k) * decode / (k * draft_step + verify(k)) with E(a, k) = (1 - a^(k+1)) / (1 - a) tokens per verify. With
--layers L1,L2 (a preset target too large to convert or run here) the target is measured at those layer counts
and each cost extrapolated linearly to the preset's own layer count (labelled as such in the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from gptbc.errors import GptbcError

ROOT = Path(__file__).resolve().parents[1]
RATES = (0.5, 0.6, 0.7, 0.8, 0.9)
# Code completion prompts: the start of each document the trained pair learned (tests/hf_models.py CORPUS).
COMPLETION_PROMPTS = ["def fibonacci(n):\n", "import numpy as np\n\nclass Model:\n", "for (int i = 0; i < 10;",
                      "// héllo wörld — ünïcode ✓ 你好 🚀\nconst x", "def fibonacci(n):\n    if n < 2:\n"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepared(model: str, lib: str | None, quantization: str | None) -> tuple[Path, Path]:
    from gptbc.artifact.config import preset_names
    from gptbc.prepare import prepare

    random = model in preset_names() and not Path(model).exists()
    p = prepare(model, lib=lib, quantization=quantization, device="cpu", random_weights=random, log=log)
    return p.model_dir, p.lib


# ---- trained: tokens per verify and wall-clock speedup ----

def bench_trained(args) -> dict:
    from gptbc.runtime.engine import Engine

    target = prepared(args.target, args.target_lib, args.quantization or "q0f32")
    draft = prepared(args.draft, args.draft_lib, args.quantization or "q0f32")
    engine = Engine(*target, prefix_cache_size=0, draft=draft, max_draft=args.draft_max, min_draft=args.draft_min)
    model = engine.draft
    prompts = [engine.encode(p) for p in COMPLETION_PROMPTS]
    new = [min(args.new_tokens, engine.context_window_size - len(p)) for p in prompts]
    times: dict[str, list[float]] = {"plain": [], "draft": []}
    outputs: dict[str, list] = {}
    counts = {}
    for _ in range(args.repeat):
        for name, source in (("plain", None), ("draft", model)):
            engine.scheduler.draft = source
            before = engine.status()
            start = time.perf_counter()
            outputs[name] = [engine.generate(p, n) for p, n in zip(prompts, new)]
            times[name].append(time.perf_counter() - start)
            after = engine.status()
            counts[name] = {k: after[k] - before[k] for k in ("verify_steps", "verify_tokens", "drafted_tokens",
                                                               "accepted_tokens", "decode_steps")}
    engine.scheduler.draft = model
    tokens = sum(len(o) for o in outputs["draft"])
    c = counts["draft"]
    result = {
        "mode": "trained", "target": str(target[0]), "draft": str(draft[0]), "prompts": len(prompts),
        "new_tokens": tokens, "repeat": args.repeat,
        "same_tokens": outputs["plain"] == outputs["draft"],
        "tokens_per_verify": c["verify_tokens"] / c["verify_steps"] if c["verify_steps"] else 0.0,
        "acceptance_rate": c["accepted_tokens"] / c["drafted_tokens"] if c["drafted_tokens"] else 0.0,
        "target_steps": {"plain": counts["plain"]["decode_steps"], "draft": c["decode_steps"]},
        "seconds_best": {k: min(v) for k, v in times.items()},
        "speedup": min(times["plain"]) / min(times["draft"]),
    }
    log(f"trained pair, {len(prompts)} completion prompts, {tokens} new tokens: {result['tokens_per_verify']:.2f} "
        f"target tokens per verify, acceptance {result['acceptance_rate']:.0%}, wall-clock {result['speedup']:.2f}x "
        f"plain (best of {args.repeat}), same tokens: {result['same_tokens']}")
    return result


# ---- shapes: measured step costs and a projected speedup ----

def reduced(preset: str, layers: int, quantization: str) -> tuple[Path, Path]:
    """Random weights and a library of `preset` cut to `layers` layers (artifact cache)."""
    from gptbc.artifact import cache
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.quantization import get_quantization
    from gptbc.artifact.random_weights import write_random_weights
    from gptbc.compile.compiler import cached_library, plan_library
    from gptbc.prepare import RANDOM_SEED, converter_sources

    cfg = dataclasses.replace(resolve_model(preset).config, n_layer=layers)
    quant = get_quantization(quantization)
    parts = {"preset": cfg.to_dict(), "quantization": quant.name, "seed": RANDOM_SEED,
             "converter": converter_sources()}
    name = f"{preset}-{layers}layers"
    entry = cache.get_or_build("weights", parts, lambda d: write_random_weights(d / "model", name, cfg, quant,
                                                                                  RANDOM_SEED),
                               describe=f"{name} {quant.name} (random weights)", log=log)
    model_dir = entry.path / "model"
    plan = plan_library(resolve_model(str(model_dir)), "cpu", quant.name)
    return model_dir, cached_library(plan, log)


def step_costs(model_dir: Path, lib: Path, steps: int, max_k: int) -> dict:
    """Median seconds of a decode step and of verify calls of k+1 rows, one sequence after a 32-token prompt.
    The calls are interleaved (each round: a decode step, then one verify of each size), so that all of them
    see the same machine: timed one kind after the other, a neighbour's burst on the host moved one kind only
    and the projection with it (three runs of the StarCoder shape projected 1.6x to 3.1x)."""
    from gptbc.runtime.runner import ModelRunner

    runner = ModelRunner(model_dir, lib, max_batch_size=1)
    rng = np.random.default_rng(0)
    vocab = runner.config.vocab_size
    seq = runner.add_sequence()
    token = int(np.argmax(runner.prefill(seq, rng.integers(0, vocab, 32).tolist())))
    for _ in range(2):  # warm-up
        token = int(np.argmax(runner.decode(seq, token)))
    decode: list[float] = []
    verify: dict[int, list[float]] = {k: [] for k in range(1, max_k + 1)}
    for _ in range(steps):
        start = time.perf_counter()
        token = int(np.argmax(runner.decode(seq, token)))
        decode.append(time.perf_counter() - start)
        for k in verify:
            ids = rng.integers(0, vocab, k + 1).tolist()
            start = time.perf_counter()
            runner.verify(seq, ids)
            verify[k].append(time.perf_counter() - start)
            runner.pop_tokens(seq, k + 1)
    runner.remove_sequence(seq)
    return {"n_layer": runner.config.n_layer, "decode": statistics.median(decode),
            "verify": {k: statistics.median(runs) for k, runs in verify.items()}}


def extrapolate(a: dict, b: dict, layers: int) -> dict:
    """Each cost as fixed + per-layer x layers, through the two measurements a and b. More layers must cost more:
    where they did not, the timings were noise (a busy machine, too few --steps) and a line through them would
    project nonsense (negative step times), so that is refused."""
    def line(x: float, y: float) -> float:
        if (y - x) * (b["n_layer"] - a["n_layer"]) <= 0:
            raise GptbcError(f"--layers {a['n_layer']},{b['n_layer']}: a step at {b['n_layer']} layers took "
                             f"{y * 1e3:.2f} ms against {x * 1e3:.2f} ms at {a['n_layer']}; the timings are noise "
                             f"(measure on a quiet machine, with more --steps)")
        per = (y - x) / (b["n_layer"] - a["n_layer"])
        return x + per * (layers - a["n_layer"])

    return {"n_layer": layers, "decode": line(a["decode"], b["decode"]),
            "verify": {k: line(a["verify"][k], b["verify"][k]) for k in a["verify"]}}


def project(target: dict, draft_step: float) -> list[dict]:
    rows = []
    for rate in RATES:
        best = None
        for k, verify in target["verify"].items():
            tokens = (1 - rate ** (k + 1)) / (1 - rate)
            speedup = tokens * target["decode"] / (k * draft_step + verify)
            if best is None or speedup > best["speedup"]:
                best = {"acceptance": rate, "k": k, "tokens_per_verify": tokens, "speedup": speedup}
        rows.append(best)
    return rows


def bench_shapes(args) -> dict:
    from gptbc.artifact.config import preset_names, resolve_model

    try:
        layers = [int(n) for n in args.layers.split(",")] if args.layers else []
    except ValueError:
        raise GptbcError(f"--layers {args.layers}: give two layer counts, e.g. 2,4") from None
    if layers:
        if args.target not in preset_names() or args.target_lib:
            raise GptbcError(f"--layers: needs a preset --target without --target-lib, got {args.target}")
        if len(layers) != 2 or layers[0] == layers[1] or min(layers) < 1:
            raise GptbcError(f"--layers {args.layers}: give two different layer counts, e.g. 2,4")
    draft = step_costs(*prepared(args.draft, args.draft_lib, args.quantization), args.steps, 1)
    if layers:
        full = resolve_model(args.target).config.n_layer
        measured = [step_costs(*reduced(args.target, n, args.quantization or "q4f16_1"), args.steps, args.max_k)
                    for n in layers]
        target = extrapolate(*measured, full)
        how = f"measured at {layers[0]} and {layers[1]} layers, extrapolated linearly to {full}"
    else:
        measured = []
        target = step_costs(*prepared(args.target, args.target_lib, args.quantization), args.steps, args.max_k)
        how = f"measured at its {target['n_layer']} layers"
    ratio = draft["decode"] / target["decode"]
    result = {"mode": "shapes", "target": args.target, "draft": args.draft, "quantization": args.quantization,
              "target_costs": how, "draft_step_s": draft["decode"], "target_step_s": target["decode"],
              "target_verify_s": target["verify"], "cost_ratio": ratio, "measured": measured,
              "projection": project(target, draft["decode"])}
    log(f"{args.draft} draft step {draft['decode'] * 1e3:.2f} ms, {args.target} step {target['decode'] * 1e3:.2f} ms "
        f"({how}): cost ratio {ratio:.3f}")
    for row in result["projection"]:
        log(f"  PROJECTED at acceptance {row['acceptance']:.0%}: k={row['k']}, {row['tokens_per_verify']:.2f} tokens "
            f"per verify, {row['speedup']:.2f}x plain decoding")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("trained", "shapes"))
    ap.add_argument("--target", help="target MODEL (trained: default tests/data/trained-tiny)")
    ap.add_argument("--target-lib", help="the target's library (default: compiled, cached)")
    ap.add_argument("--draft", help="draft MODEL (trained: default tests/data/draft-tiny)")
    ap.add_argument("--draft-lib", help="the draft's library (default: compiled, cached)")
    ap.add_argument("--quantization", help="scheme to convert into (trained: q0f32; shapes: as prepare chooses, "
                                           "q4f16_1 for presets)")
    ap.add_argument("--new-tokens", type=int, default=48, help="trained: tokens per completion at most")
    ap.add_argument("--repeat", type=int, default=3, help="trained: alternating rounds, the best timed")
    ap.add_argument("--draft-max", type=int, default=8, help="trained: most tokens drafted a step")
    ap.add_argument("--draft-min", type=int, default=1, help="trained: fewest tokens drafted a step (= --draft-max: "
                                                             "a fixed k, to measure acceptance)")
    ap.add_argument("--layers", help="shapes: two layer counts to measure a preset target at, e.g. 2,4")
    ap.add_argument("--steps", type=int, default=16, help="shapes: timed calls of each kind (medians)")
    ap.add_argument("--max-k", type=int, default=8, help="shapes: verify calls timed for k = 1..max-k")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args()
    for flag in ("new_tokens", "repeat", "draft_max", "draft_min", "steps", "max_k"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.mode == "trained":
        args.target = args.target or str(ROOT / "tests" / "data" / "trained-tiny")
        args.draft = args.draft or str(ROOT / "tests" / "data" / "draft-tiny")
    elif not args.target or not args.draft:
        raise SystemExit("error: shapes: give --target and --draft")
    try:
        result = bench_trained(args) if args.mode == "trained" else bench_shapes(args)
    except GptbcError as err:
        raise SystemExit(f"error: {err}") from None
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
