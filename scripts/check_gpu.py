#!/usr/bin/env python3
"""Check a GPU install end to end: build a small random GPTBigCode checkpoint, convert it, compile it for
the CPU and for your GPU, and check both give the same greedy tokens and nearly the same logits.

    python scripts/check_gpu.py --target cuda --device cuda:0
    python scripts/check_gpu.py --target metal --device metal   # on a Mac
    python scripts/check_gpu.py --target vulkan --device vulkan --tokens 8   # e.g. on lavapipe (slow)

Needs only gptbc (no torch): the checkpoint is written with numpy in Hugging Face's safetensors layout.
Exit status 0 when everything matches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from gptbc.compile.compiler import compile_model
from gptbc.artifact.config import resolve_model
from gptbc.errors import GptbcError
from gptbc.artifact.convert import convert_weight
from gptbc.runtime.engine import Engine
from gptbc.compile.targets import plan_build
from gptbc.artifact.quantization import get_quantization
from gptbc.runtime.devices import parse_device, parse_device_kind


def random_checkpoint(directory: Path, n_embd=256, n_head=4, n_layer=2, vocab=1000, n_positions=256) -> Path:
    rng = np.random.default_rng(0)
    inner, kv = 4 * n_embd, n_embd // n_head
    shapes = {"transformer.wte.weight": (vocab, n_embd), "transformer.wpe.weight": (n_positions, n_embd),
              "transformer.ln_f.weight": (n_embd,), "transformer.ln_f.bias": (n_embd,)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (n_embd,), p + "ln_1.bias": (n_embd,), p + "ln_2.weight": (n_embd,),
                       p + "ln_2.bias": (n_embd,), p + "attn.c_attn.weight": (n_embd + 2 * kv, n_embd),
                       p + "attn.c_attn.bias": (n_embd + 2 * kv,), p + "attn.c_proj.weight": (n_embd, n_embd),
                       p + "attn.c_proj.bias": (n_embd,), p + "mlp.c_fc.weight": (inner, n_embd),
                       p + "mlp.c_fc.bias": (inner,), p + "mlp.c_proj.weight": (n_embd, inner),
                       p + "mlp.c_proj.bias": (n_embd,)})
    tensors = {k: (1.0 + 0.1 * rng.standard_normal(s) if "ln_" in k and k.endswith("weight")
                   else 0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "model_type": "gpt_bigcode", "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer, "vocab_size": vocab,
        "n_positions": n_positions, "multi_query": True, "activation_function": "gelu_pytorch_tanh",
        "bos_token_id": 0, "eos_token_id": 0}))
    return directory


def check_options(target: str, device: str, quantization: str, tokens: int) -> str:
    """One-line errors for what cannot work, before anything is compiled; returns the library suffix."""
    spec, build = plan_build(target)
    if spec.device == "cpu":
        raise GptbcError(f"--target {target}: a CPU target; this script checks a GPU target against the CPU "
                         f"build (name one: cuda, metal, vulkan)")
    if build.system_lib:
        raise GptbcError(f"--target {target}: builds objects ({build.suffix}) for an app to link here, "
                         f"nothing this machine can load and run")
    kind = parse_device_kind(device)[0]
    if kind != spec.device:
        raise GptbcError(f"--device {device}: --target {target} builds for {spec.device} devices "
                         f"(try --device {spec.device})")
    get_quantization(quantization)
    if tokens < 1:
        raise GptbcError(f"--tokens {tokens}: must be at least 1")
    parse_device(device)  # it exists here (a driver, an adapter, a TVM runtime for it)
    return build.suffix


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="cuda", help="the GPU target to check (cuda, metal, vulkan, ...)")
    ap.add_argument("--device", default="cuda:0", help="the device it runs on (cuda:0, metal, vulkan, ...)")
    ap.add_argument("--quantization", default="q0f32")
    ap.add_argument("--tokens", type=int, default=32,
                    help="greedy tokens generated and compared after the 39-token prompt (default 32; fewer is "
                         "quicker on slow devices such as lavapipe)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            suffix = check_options(args.target, args.device, args.quantization, args.tokens)
            out = convert_weight(random_checkpoint(root / "hf"), args.quantization, root / "out", progress=False)
            source = resolve_model(str(out))
            t = time.perf_counter()
            gpu_lib = compile_model(source, args.target, args.quantization, root / f"gpu{suffix}", log=print)
            print(f"compiled for {args.target} in {time.perf_counter() - t:.1f}s")
            # float activations on the CPU too (a grouped scheme would default to int8 there): the same network
            cpu_lib = compile_model(source, "cpu", args.quantization, root / "cpu.so", log=lambda _m: None,
                                    activations="float")
            gpu, cpu = Engine(out, gpu_lib, device=args.device), Engine(out, cpu_lib)
        except GptbcError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        ids = list(range(1, 40))
        seq_g, seq_c = gpu.runner.add_sequence(), cpu.runner.add_sequence()
        lg, lc = gpu.runner.verify(seq_g, ids), cpu.runner.verify(seq_c, ids)  # logits after every prompt token
        gpu.runner.remove_sequence(seq_g)
        cpu.runner.remove_sequence(seq_c)
        err = float(np.abs(lg - lc).max() / np.abs(lc).max())
        t = time.perf_counter()
        tokens_gpu = gpu.generate(ids, args.tokens, ignore_eos=True)
        rate = args.tokens / (time.perf_counter() - t)
        same = tokens_gpu == cpu.generate(ids, args.tokens, ignore_eos=True)
        print(f"logits: max error relative to CPU {err:.2e}; {args.tokens} greedy tokens "
              f"{'equal' if same else 'DIFFER'}; {rate:.1f} tokens/s on {args.device}")
        return 0 if same and err < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
