"""Make the K-quant GGUF fixtures of this folder ONCE (see README.md beside it); the test suite only reads them.

    python tests/data/kquant/make.py PATH/TO/llama-quantize

Writes: config.json + tokenizer.json (the seeded random HF checkpoint's, the reference for the tokenizer test and
the model's shape), and model-{Q4_K_M,Q5_K_M,Q6_K}.gguf quantized by llama.cpp's own quantizer from an F16 GGUF of
that checkpoint written by tests/gguf_files.py. Every row is 256 long (n_embd = n_inner = 256), so every K-quant
type applies.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/

from gguf_files import write_gguf  # noqa: E402
from hf_models import make_checkpoint  # noqa: E402

TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")


def main() -> None:
    quantize = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_checkpoint(Path(tmp) / "hf", seed=7, tokenizer="underscore", n_embd=256, n_inner=256, n_head=8,
                             n_layer=1, n_positions=32)
        f16 = write_gguf(hf, Path(tmp) / "model-F16.gguf", "F16")
        for name in ("config.json", "tokenizer.json"):
            shutil.copyfile(hf / name, HERE / name)
        for kind in TYPES:
            subprocess.run([quantize, str(f16), str(HERE / f"model-{kind}.gguf"), kind], check=True)


if __name__ == "__main__":
    main()
