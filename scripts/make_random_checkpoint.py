"""Write a seeded random GPTBigCode checkpoint of any preset's shape as sharded safetensors, tensor by tensor.

For measuring the converter on real sizes without downloading: no torch, and at most one tensor in memory
(the writer streams each shard). Example (the starcoderbase-3b shape, bf16, 2 GB shards, ~6.1 GB):

    python scripts/make_random_checkpoint.py --preset starcoderbase-3b --dtype bfloat16 --shard-gb 2 -o /tmp/sc3b

`--preset` also takes a model directory (or Hub id): its config.json gives the shape, e.g. a tiny one for tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from gptbc.artifact.config import resolve_model
from gptbc.artifact.params import hf_shapes
from gptbc.artifact.safetensors_io import write_safetensors
from gptbc.errors import GptbcError

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", "--model", required=True, dest="preset",
                    help="the shape: a preset name, or a model directory / Hub id whose config.json gives it")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size limit in GiB (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True, help="directory to create (must not exist)")
    args = ap.parse_args(argv)
    if not args.shard_gb > 0:
        raise SystemExit(f"error: --shard-gb {args.shard_gb}: must be positive")
    try:
        cfg = resolve_model(args.preset).config
    except GptbcError as err:
        raise SystemExit(f"error: {err}") from None
    dtype, out = DTYPES[args.dtype], Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=False)
    except OSError as err:
        raise SystemExit(f"error: -o {out}: {err.strerror}") from None
    specs = hf_shapes(cfg)
    shards, size, limit = [[]], 0, int(args.shard_gb * (1 << 30))
    for name, shape in specs:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    rng = np.random.default_rng(args.seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"

        def arrays(shard=shard):
            for name, shape in shard:
                if len(shape) == 1:
                    x = np.ones(shape, np.float32) if name.endswith(".weight") else np.zeros(shape, np.float32)
                else:
                    x = rng.standard_normal(shape, dtype=np.float32)
                    x *= 0.02
                yield x.astype(dtype)

        write_safetensors(out / fname, [(n, s, dtype) for n, s in shard], arrays(), metadata={"format": "pt"})
        weight_map.update({n: fname for n, _ in shard})
        total += sum(int(np.prod(s)) * dtype.itemsize for _, s in shard)
        print(f"{fname}: {len(shard)} tensors", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    hf_cfg = {k: v for k, v in cfg.to_dict().items()
              if k not in ("context_window_size", "prefill_chunk_size", "max_batch_size")}
    hf_cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    hf_cfg["torch_dtype"] = args.dtype
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
