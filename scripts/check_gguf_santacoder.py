"""Check a llama.cpp-quantized santacoder-shaped GGUF end to end: convert, compile, and compare logits with HF.

A seeded random GPTBigCode checkpoint of the santacoder shape (n_embd 2048, 16 heads multi-query, n_inner 8192,
vocabulary 49280; `--layers` of its 24 layers) is written as an F16 GGUF (tests/gguf_files.write_gguf, as
llama.cpp's convert_hf_to_gguf.py lays a `starcoder` model out), quantized by llama.cpp's `llama-quantize`
(`--type`, default Q4_K_M: Q4_K, Q5_K and Q6_K tensors mixed), converted by `gptbc convert-weight` into qkf32_a
(every tensor in its own affine width, exactly the values `gguf.quants.dequantize` gives), compiled for each
`--targets` entry (float activations), and run on a short prompt plus greedy decode steps. The reference is an HF
model holding the file's dequantized values. Prints one line per target: the largest logit difference relative to
the largest logit, and whether the greedy tokens are HF's; exits 1 if any target is off (above `--rtol`, or other
tokens).

    python scripts/check_gguf_santacoder.py --layers 2 --targets cpu,vulkan \\
        --llama-quantize /tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-quantize

All 24 layers (`--layers 24`) take about 6 minutes and 10 GB of memory on 2 cores (BENCHMARKS.md).
`--shape tiny` (n_embd 256, 1 layer, vocabulary 320) and `--llama-quantize gguf` (no llama.cpp: gguf-py's own
quantizer writes a Q5_0/Q5_1/Q4_1 mix) are the smallest mode, which the test suite runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the suite's seeded checkpoints and GGUF writer (hf_models, gguf_files)
SHAPES = {"santacoder": dict(n_embd=2048, n_head=16, n_inner=8192, n_positions=2048, vocab_size=49280),
          "tiny": dict(n_embd=256, n_head=8, n_inner=256, n_positions=64, vocab_size=320)}
# --llama-quantize gguf: the legacy 5-bit types gguf-py quantizes itself, mixed per tensor as llama.cpp mixes
LEGACY = {"attn_qkv": "Q5_0", "attn_output": "Q5_1", "ffn_up": "Q4_1", "ffn_down": "Q5_1"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_gguf(work: Path, shape: str, layers: int, seed: int, qtype: str, quantizer: str) -> tuple[Path, Path]:
    """(the HF checkpoint directory, the quantized GGUF)."""
    from gguf_files import write_gguf
    from hf_models import make_checkpoint

    t = time.perf_counter()
    hf = make_checkpoint(work / "hf", seed=seed, tokenizer="underscore", n_layer=layers, weight_std=0.05,
                         **SHAPES[shape])
    log(f"random {shape}-shaped checkpoint, {layers} layer(s): {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    if quantizer == "gguf":
        types = {f"blk.{i}.{m}.weight": k for i in range(layers) for m, k in LEGACY.items()}
        path = write_gguf(hf, work / "model-legacy-mix.gguf", "F16", types={**types, "token_embd.weight": "Q5_0"})
        log(f"GGUF with gguf-py's Q5_0/Q5_1/Q4_1 mix: {time.perf_counter() - t:.1f}s")
        return hf, path
    f16 = write_gguf(hf, work / "model-F16.gguf", "F16")
    path = work / f"model-{qtype}.gguf"
    run = subprocess.run([quantizer, str(f16), str(path), qtype], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"error: {quantizer} failed ({run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
    f16.unlink()
    log(f"F16 GGUF quantized to {qtype} by llama.cpp: {time.perf_counter() - t:.1f}s")
    return hf, path


def greedy_logits(engine, ids: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    runner = engine.runner
    seq = runner.add_sequence()
    try:
        got = [runner.prefill(seq, ids)]
        tokens = [int(np.argmax(got[-1]))]
        for _ in range(steps):
            got.append(runner.decode(seq, tokens[-1]))
            tokens.append(int(np.argmax(got[-1])))
    finally:
        runner.remove_sequence(seq)
    return np.stack([np.asarray(g).reshape(-1) for g in got]), tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="santacoder")
    ap.add_argument("--layers", type=int, default=2, help="layers of the model (santacoder has 24; default 2)")
    ap.add_argument("--type", default="Q4_K_M", help="llama-quantize's file type (default Q4_K_M)")
    ap.add_argument("--llama-quantize", default="/tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/"
                    "llama-quantize", help="llama.cpp's quantizer, or `gguf` for gguf-py's legacy types")
    ap.add_argument("--targets", default="cpu", help="comma-separated gptbc targets (cpu, vulkan, ...)")
    ap.add_argument("--prompt", type=int, default=12, help="prompt tokens (default 12)")
    ap.add_argument("--steps", type=int, default=8, help="greedy decode steps (default 8)")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.llama_quantize != "gguf" and not Path(args.llama_quantize).is_file():
        print(f"error: --llama-quantize {args.llama_quantize}: no such file (build llama.cpp's llama-quantize, or "
              f"pass gguf)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="gguf-check-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        return check(args, work)


def check(args: argparse.Namespace, work: Path) -> int:
    import torch

    from gguf_files import dequantized_model
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.compile.compiler import compile_model
    from gptbc.runtime.engine import Engine

    hf_dir, path = make_gguf(work, args.shape, args.layers, args.seed, args.type, args.llama_quantize)
    t = time.perf_counter()
    out = convert_weight(path, "qkf32_a", work / "converted", progress=False)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    log(f"converted into qkf32_a: {time.perf_counter() - t:.1f}s, {size} bytes ({size / path.stat().st_size:.2f}x "
        f"the file)")
    ids = np.random.default_rng(args.seed).integers(0, SHAPES[args.shape]["vocab_size"], args.prompt).tolist()
    hf = dequantized_model(hf_dir, path)
    failed = False
    for target in args.targets.split(","):
        t = time.perf_counter()
        lib = compile_model(resolve_model(str(out)), target, "qkf32_a", work / f"lib-{target}.so", log=lambda _m: None,
                            activations="float")
        log(f"compiled for {target}: {time.perf_counter() - t:.1f}s")
        engine = Engine(out, lib, **({} if target == "cpu" else {"device": target.split(":")[0]}))
        got, tokens = greedy_logits(engine, ids, args.steps)
        with torch.no_grad():
            want = hf(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:].numpy()
        err = float(np.abs(got - want).max() / np.abs(want).max())
        same = want.argmax(-1).tolist() == tokens
        print(f"{target}: {path.name}, {args.layers} layer(s): relative logit error {err:.2e}, greedy tokens "
              f"{'identical' if same else 'DIFFERENT'} ({args.prompt}-token prompt, {args.steps} steps)")
        failed |= err > args.rtol or not same
        del engine
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
