#!/usr/bin/env python3
"""Side-by-side CPU benchmark on one seeded random santacoder-shaped checkpoint.

    python scripts/bench_peers.py --work /tmp/gptbc-peers            # everything
    python scripts/bench_peers.py --work /tmp/gptbc-peers --peers gptbc:q4f32_1,hf:fp32 --threads 2

Workload (the same for every peer, greedy, random prompt ids): prefill of a 512-token prompt; decode of
63 single-token steps after a 32-token prompt; best of 3. Each peer runs in its own process with the
same thread count (TVM_NUM_THREADS / torch.set_num_threads), so RSS and threads are its own. The read
bandwidth of this machine is measured in the same run (a parallel TVM reduction over 1 GiB), and each
decode rate is compared with the limit it implies: bandwidth / bytes of weights read per token.

Peers here: gptbc (q0f32, q8f32_1, q4f32_1) and transformers on torch CPU (fp32, `pip install -e .[test]`).
llama.cpp and CTranslate2 are not wired in yet (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PREFILL, PROMPT, STEPS, REPEAT = 512, 32, 63, 3
SHAPES = {
    "santacoder": dict(n_embd=2048, n_layer=24, n_head=16, n_inner=8192, n_positions=2048, vocab_size=49280,
                       multi_query=True, activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-5,
                       bos_token_id=49152, eos_token_id=49152),
    # a few seconds end to end: for checking the script itself (tests/test_bench.py)
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=500, multi_query=True,
                 bos_token_id=0, eos_token_id=0),
}
VOCAB = SHAPES["santacoder"]["vocab_size"]


def ids(n: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def make_checkpoint(path: Path, shape: str) -> None:
    if (path / "model.safetensors").is_file():
        return
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(0)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**SHAPES[shape])).eval()
    model.save_pretrained(path, safe_serialization=True)


def read_bandwidth(threads: int) -> float:
    """GB/s of reading 1 GiB of float32 with `threads` threads, best of 3.

    The kernel is a max-reduction: SIMD and memory-bound, where np.sum's pairwise float sum is
    compute-bound. numpy releases the GIL inside it, so the threads run in parallel.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    parts = np.array_split(np.ones(1 << 28, np.float32), threads)
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            t = time.perf_counter()
            list(pool.map(np.maximum.reduce, parts))
            times.append(time.perf_counter() - t)
    return (1 << 30) / min(times) / 1e9


def best(times: list[float], tokens: int) -> float:
    return tokens / min(times)


def worker_gptbc(work: Path, scheme: str) -> dict:
    from gptbc.bench import weight_bytes
    from gptbc.compiler import compile_model
    from gptbc.config import resolve_model
    from gptbc.loader import convert_weight
    from gptbc.runtime import Engine

    out = work / f"gptbc-{scheme}"
    if not (out / "gptbc-config.json").is_file():
        convert_weight(work / "hf", scheme, out, progress=False)
    lib = work / f"gptbc-{scheme}.so"
    t = time.perf_counter()
    compile_model(resolve_model(str(out)), "cpu", scheme, lib, log=lambda _m: None)
    compile_s = time.perf_counter() - t
    engine = Engine(out, lib, max_total_seq_len=PREFILL + 128, max_batch_size=1, prefix_cache_size=0)
    pre, dec = [], []
    for r in range(REPEAT):
        seq = engine.add_sequence()
        t = time.perf_counter()
        engine.prefill(seq, ids(PREFILL, r))
        pre.append(time.perf_counter() - t)
        engine.remove_sequence(seq)
        seq = engine.add_sequence()
        token = int(engine.prefill(seq, ids(PROMPT, 100 + r)).argmax())
        t = time.perf_counter()
        for _ in range(STEPS):
            token = int(engine.decode(seq, token).argmax())
        dec.append(time.perf_counter() - t)
        engine.remove_sequence(seq)
    return {"prefill": best(pre, PREFILL), "decode": best(dec, STEPS), "weight_bytes": weight_bytes(out),
            "compile_s": compile_s}


def worker_hf(work: Path, _precision: str) -> dict:
    import torch
    from transformers import GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    pre, dec = [], []
    with torch.inference_mode():
        for r in range(REPEAT):
            t = time.perf_counter()
            model(torch.tensor([ids(PREFILL, r)]), use_cache=True, logits_to_keep=1)
            pre.append(time.perf_counter() - t)
            out = model(torch.tensor([ids(PROMPT, 100 + r)]), use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(STEPS):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            dec.append(time.perf_counter() - t)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"prefill": best(pre, PREFILL), "decode": best(dec, STEPS), "weight_bytes": nbytes}


WORKERS = {"gptbc": worker_gptbc, "hf": worker_hf}


def run_worker(args: argparse.Namespace) -> None:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    peer, precision = args.worker.split(":")
    result = WORKERS[peer](Path(args.work), precision)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    global REPEAT, VOCAB
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the checkpoint and converted files")
    ap.add_argument("--peers", default="gptbc:q0f32,gptbc:q8f32_1,gptbc:q4f32_1,hf:fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=REPEAT, help="runs per measurement; the best is reported")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="santacoder")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    REPEAT, VOCAB = args.repeat, SHAPES[args.shape]["vocab_size"]
    if args.worker:
        run_worker(args)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    make_checkpoint(args.work / "hf", args.shape)
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    bw = float(subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                                                     f"import bench_peers as b; print(b.read_bandwidth({args.threads}))"],
                              env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
    print(f"read bandwidth ({args.threads} threads): {bw:.1f} GB/s")
    rows = []
    for peer in args.peers.split(","):
        run = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--threads", str(args.threads),
                              "--repeat", str(args.repeat), "--shape", args.shape, "--worker", peer],
                             env=env, capture_output=True, text=True)
        line = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
        if run.returncode or not line:
            print(f"{peer}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(line[-1][7:])
        limit = bw * 1e9 / r["weight_bytes"]
        rows.append((peer, r, limit))
        print(f"{peer:<16} prefill {r['prefill']:7.1f} tok/s   decode {r['decode']:6.2f} tok/s "
              f"({100 * r['decode'] / limit:4.0f}% of the {limit:5.1f} tok/s bandwidth limit)   "
              f"peak RSS {r['peak_rss_gb']:.2f} GB" + (f"   compile {r['compile_s']:.0f}s" if "compile_s" in r else ""),
              flush=True)
    print("\n| peer | prefill tok/s | decode tok/s | % of bandwidth limit | peak RSS GB |\n|---|---|---|---|---|")
    for peer, r, limit in rows:
        print(f"| {peer} | {r['prefill']:.1f} | {r['decode']:.2f} | {100 * r['decode'] / limit:.0f}% | "
              f"{r['peak_rss_gb']:.2f} |")
    return 0 if len(rows) == len(args.peers.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
