"""`gptbc bench`: prefill and decode speed of a compiled model on its converted weights.

Workloads (token ids drawn at random, greedy, no sampling cost):
  prefill   one P-token prompt (default 512), prefilled in the library's chunks; tokens/s
  decode    a 32-token prompt, then D single-token steps (default 64, batch 1); tokens/s of the steps,
            time to first token, and the weight bandwidth that rate implies
  batched   B sequences decoding together (default B = 4 and 16); total tokens/s
Each is run `repeat` times; min and median are reported. Peak RSS is the process's high-water mark while running
the model (read before the bandwidth probe, whose 1 GiB buffer is reported apart).
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptbc.runtime.engine import Engine
from gptbc.artifact.manifest import read_weights
from gptbc.runtime.speculation import PromptLookup
from gptbc.artifact.safetensors_io import SafetensorsFile


@dataclass
class Timing:
    runs: list[float] = field(default_factory=list)  # seconds

    def rate(self, tokens: int) -> dict:
        return {"tokens_per_s_best": tokens / min(self.runs), "tokens_per_s_median": tokens / statistics.median(self.runs),
                "seconds": self.runs}


def weight_bytes(model_dir: Path) -> int:
    info = read_weights(model_dir)
    total = 0
    for f in sorted({p["file"] for p in info["params"]}):
        with SafetensorsFile(model_dir / f) as st:
            total += sum(int(np.prod(st.info(k)[1])) * st.info(k)[0].itemsize for k in st.keys())
    return total


def run_bench(model_dir: str | Path, lib: str | Path, prefill: int = 512, prompt: int = 32, decode: int = 64,
              batches: tuple[int, ...] = (4, 16), repeat: int = 3, device: str = "cpu", log=print,
              prompt_lookup: PromptLookup | None = None, tensor_parallel: int = 1,
              draft: tuple[str | Path, str | Path] | None = None, max_draft: int = 8, min_draft: int = 1) -> dict:
    """`tensor_parallel` N > 1: the model on N disco workers (weights and peak RSS below are then rank 0's files
    and this process's alone: the workers run in a process of their own)."""
    model_dir = Path(model_dir)
    need = max(prefill, max(batches, default=1) * (prompt + decode), prompt + decode)
    engine = Engine(model_dir, lib, device=device, max_total_seq_len=need + 64,
                    max_batch_size=max((*batches, 1)), prefix_cache_size=0, tensor_parallel=tensor_parallel,
                    draft=draft, max_draft=max_draft, min_draft=min_draft)
    vocab = engine.config.vocab_size
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(0, vocab, n).tolist()  # noqa: E731
    result: dict = {"model_dir": str(model_dir), "lib": str(lib), "quantization": engine.runner.meta["quantization"]["name"],
                    "activations": engine.runner.meta.get("activations", "float"), "weight_bytes": weight_bytes(model_dir),
                    "tensor_parallel": tensor_parallel}
    log(f"{result['quantization']}, {result['activations']} activations, {result['weight_bytes'] / 1e9:.3f} GB of weights")

    if prefill:
        t = Timing()
        for _ in range(repeat):
            seq = engine.runner.add_sequence()
            p = ids(prefill)
            start = time.perf_counter()
            engine.runner.prefill(seq, p)
            t.runs.append(time.perf_counter() - start)
            engine.runner.remove_sequence(seq)
        result["prefill"] = {"tokens": prefill, **t.rate(prefill)}
        log(f"prefill {prefill} tokens: {result['prefill']['tokens_per_s_best']:.1f} tok/s (best)")

    t, ttft = Timing(), []
    for _ in range(repeat):
        seq = engine.runner.add_sequence()
        start = time.perf_counter()
        token = int(np.argmax(engine.runner.prefill(seq, ids(prompt))))
        ttft.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(decode):
            token = int(np.argmax(engine.runner.decode(seq, token)))
        t.runs.append(time.perf_counter() - start)
        engine.runner.remove_sequence(seq)
    rate = t.rate(decode)
    result["decode"] = {"prompt": prompt, "tokens": decode, **rate, "time_to_first_token_s": min(ttft),
                        "weight_GBps_best": result["weight_bytes"] * rate["tokens_per_s_best"] / 1e9}
    log(f"decode {decode} tokens after {prompt}: {rate['tokens_per_s_best']:.2f} tok/s (best), "
        f"{result['decode']['weight_GBps_best']:.1f} GB/s of weights, TTFT {min(ttft) * 1e3:.0f} ms")

    if prompt_lookup is not None:
        result["prompt_lookup"] = bench_prompt_lookup(engine, ids(prompt), decode, repeat, prompt_lookup, log)
    if draft is not None:
        result["draft"] = bench_draft(engine, ids(prompt), decode, repeat, log)

    for b in batches:
        t = Timing()
        for _ in range(repeat):
            seqs = [engine.runner.add_sequence() for _ in range(b)]
            tokens = [int(np.argmax(engine.runner.prefill(s, ids(prompt)))) for s in seqs]
            start = time.perf_counter()
            for _ in range(decode):
                tokens = engine.runner.decode_batch(seqs, tokens).argmax(-1).tolist()
            t.runs.append(time.perf_counter() - start)
            for s in seqs:
                engine.runner.remove_sequence(s)
        result[f"batch{b}"] = {"batch": b, "steps": decode, **t.rate(b * decode)}
        log(f"batch {b} decode: {result[f'batch{b}']['tokens_per_s_best']:.1f} tok/s total (best)")

    # Read before the bandwidth probe: its 1 GiB buffer is the benchmark's memory, not the model's.
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    log(f"peak RSS while running the model {result['peak_rss_bytes'] / 1e9:.2f} GB "
        f"({result['peak_rss_bytes'] / result['weight_bytes']:.2f}x the weights; the process's whole high-water "
        f"mark, before the bandwidth probe)")
    if engine.runner.on_cpu:
        bw = read_bandwidth()
        result["peak_rss_with_probe_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        limit = bw * 1e9 / result["weight_bytes"]
        result["read_GBps"], result["decode_limit_tokens_per_s"] = bw, limit
        log(f"read bandwidth {bw:.1f} GB/s: decode limit {limit:.2f} tok/s, reached "
            f"{100 * result['decode']['tokens_per_s_best'] / limit:.0f}% (process peak RSS with the probe's buffer "
            f"{result['peak_rss_with_probe_bytes'] / 1e9:.2f} GB)")
    return result


def bench_prompt_lookup(engine: Engine, prompt_ids: list[int], decode: int, repeat: int, lookup: PromptLookup,
                        log) -> dict:
    """Greedy generation through the engine loop, plain and with prompt-lookup drafts, on one prompt: the
    workload repeats the prompt (it is the prompt twice, the model continuing the second copy), as an
    edit of a file in the prompt does. On a random-weight model the drafts are mostly rejected: then this
    measures what drafting costs."""
    prompt = prompt_ids + prompt_ids[:len(prompt_ids) // 2]
    out: dict = {}
    for name, spec in (("plain", None), ("prompt_lookup", lookup)):
        engine.speculation = spec
        t, tokens, before, after = timed_generations(engine, prompt, decode, repeat)
        steps = after["decode_steps"] - before["decode_steps"]
        drafted = after["drafted_tokens"] - before["drafted_tokens"]
        out[name] = {**t.rate(len(tokens)), "tokens_per_step": (len(tokens) - 1) / steps if steps else 0.0,
                     "acceptance_rate": (after["accepted_tokens"] - before["accepted_tokens"]) / drafted
                     if drafted else 0.0, "tokens": tokens}
    engine.speculation = None
    same = out["plain"].pop("tokens") == out["prompt_lookup"].pop("tokens")
    out["same_tokens"] = same
    out["speedup"] = out["prompt_lookup"]["tokens_per_s_best"] / out["plain"]["tokens_per_s_best"]
    log(f"prompt lookup ({len(prompt)}-token prompt, {decode} tokens): {out['speedup']:.2f}x plain, "
        f"{out['prompt_lookup']['tokens_per_step']:.2f} tokens/step, acceptance "
        f"{out['prompt_lookup']['acceptance_rate']:.0%}, same tokens: {same}")
    return out


def timed_generations(engine: Engine, prompt: list[int], decode: int,
                      repeat: int) -> tuple[Timing, list[int], dict, dict]:
    """`repeat` greedy generations of `decode` tokens after `prompt`: their timing, the last one's tokens, and the
    engine's status counters before and after that last one."""
    t = Timing()
    for _ in range(repeat):
        before = engine.status()
        start = time.perf_counter()
        tokens = engine.generate(prompt, decode, ignore_eos=True)
        t.runs.append(time.perf_counter() - start)
        after = engine.status()
    return t, tokens, before, after


def bench_draft(engine: Engine, prompt_ids: list[int], decode: int, repeat: int, log) -> dict:
    """Greedy generation through the engine loop, plain and with the engine's draft model, on one prompt (the
    prompt twice, as for prompt lookup). With random weights the draft rarely agrees: then this measures what a
    draft model costs (the cost gate should stop it); acceptance needs trained weights (scripts/bench_draft.py)."""
    prompt = prompt_ids + prompt_ids[:len(prompt_ids) // 2]
    out: dict = {}
    model = engine.draft
    for name, source in (("plain", None), ("draft", model)):
        engine.scheduler.draft = source
        t, tokens, before, after = timed_generations(engine, prompt, decode, repeat)
        verifies = after["verify_steps"] - before["verify_steps"]
        drafted = after["drafted_tokens"] - before["drafted_tokens"]
        out[name] = {**t.rate(len(tokens)),
                     "tokens_per_verify": (after["verify_tokens"] - before["verify_tokens"]) / verifies
                     if verifies else 0.0,
                     "acceptance_rate": (after["accepted_tokens"] - before["accepted_tokens"]) / drafted
                     if drafted else 0.0, "tokens": tokens}
    engine.scheduler.draft = model
    same = out["plain"].pop("tokens") == out["draft"].pop("tokens")
    out["same_tokens"] = same
    out["speedup"] = out["draft"]["tokens_per_s_best"] / out["plain"]["tokens_per_s_best"]
    log(f"draft model ({len(prompt)}-token prompt, {decode} tokens): {out['speedup']:.2f}x plain, "
        f"{out['draft']['tokens_per_verify']:.2f} tokens/verify, acceptance {out['draft']['acceptance_rate']:.0%}, "
        f"same tokens: {same}")
    return out


def read_bandwidth(nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """GB/s of streaming `nbytes` of float32 from memory on TVM's CPU thread pool (best of `repeat`).

    A compiled kernel, not numpy: a max-reduction with 16-lane vectors and 4 independent accumulators
    per task is load-bound, where numpy's reduction was compute-bound on a Zen 5 core (it read
    35 GB/s while our own q0f32 decode streamed weights at 68 GB/s). Same thread count as the model:
    TVM_NUM_THREADS.
    """
    import tvm
    from tvm import s_tir, te

    lanes, acc, tasks = 16, 4, 64
    per = max(nbytes // 4 // (tasks * acc * lanes), 1)
    n = per * tasks * acc * lanes
    a = te.placeholder((n,), "float32", name="a")
    k = te.reduce_axis((0, per), name="k")
    out = te.compute((tasks, acc, lanes), lambda p, j, v: te.max(a[((p * per + k) * acc + j) * lanes + v], axis=k),
                     name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, out]))
    block = sch.get_sblock("out")
    p, j, v, kk = sch.get_loops(block)
    sch.reorder(p, kk, j, v)
    sch.parallel(p)
    sch.unroll(j)
    sch.vectorize(v)
    sch.decompose_reduction(block, kk)
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    kernel = tvm.compile(sch.mod, target=target)
    x = tvm.runtime.tensor(np.ones(n, np.float32))
    y = tvm.runtime.tensor(np.zeros((tasks, acc, lanes), np.float32))
    times = []
    for _ in range(repeat + 1):  # the first run faults the pages in
        start = time.perf_counter()
        kernel(x, y)
        times.append(time.perf_counter() - start)
    return n * 4 / min(times[1:]) / 1e9
