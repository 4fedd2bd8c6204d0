"""Write a seeded random GPTBigCode model of any preset's shape as an F16 GGUF (architecture `starcoder`), tensor by
tensor, as llama.cpp's convert_hf_to_gguf.py lays one out (weights F16, 1-D tensors F32).

For measuring `gptbc convert-weight` on GGUF files of real sizes without downloading; llama.cpp's quantizer then
makes the K-quant files (e.g. `llama-quantize OUT.gguf OUT-Q4_K_M.gguf Q4_K_M`). At most one tensor is in memory.
`--vocab-from` copies the tokenizer metadata of another GGUF (e.g. llama.cpp's models/ggml-vocab-starcoder.gguf);
without it the file has no tokenizer. Example (the starcoderbase-3b shape, ~6.1 GB):

    python scripts/make_random_gguf.py --preset starcoderbase-3b -o /tmp/sc3b-f16.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from gptbc.artifact.config import resolve_model
from gptbc.artifact.params import hf_shapes
from gptbc.errors import GptbcError

MODULES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
           "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TOP = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
       "lm_head": "output"}


def gguf_name(hf: str) -> str:
    module, _, part = hf.rpartition(".")
    if module in TOP:
        return f"{TOP[module]}.{part}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{MODULES[rest]}.{part}"


def _copy_vocab(writer, path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, vtype, sub_type=sub)


def main(argv: list[str] | None = None) -> int:
    import gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", "--model", required=True, dest="preset",
                    help="the shape: a preset name, or a model directory whose config.json gives it")
    ap.add_argument("--vocab-from", type=Path, help="a GGUF whose tokenizer metadata to copy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True, type=Path, help="the .gguf file to create (must not exist)")
    args = ap.parse_args(argv)
    try:
        cfg = resolve_model(args.preset).config
    except GptbcError as err:
        raise SystemExit(f"error: {err}") from None
    if args.output.exists():
        raise SystemExit(f"error: -o {args.output}: exists")
    if args.vocab_from is not None and not args.vocab_from.is_file():
        raise SystemExit(f"error: --vocab-from {args.vocab_from}: no such file")
    w = gguf.GGUFWriter(str(args.output), "starcoder")
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_inner)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    if args.vocab_from is not None:
        _copy_vocab(w, args.vocab_from)
    specs = [(gguf_name(n), s, np.dtype(np.float16 if len(s) == 2 else np.float32)) for n, s in hf_shapes(cfg)]
    for name, shape, dtype in specs:
        w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    for name, shape, dtype in specs:
        x = rng.standard_normal(shape, dtype=np.float32) * 0.02 if len(shape) == 2 else \
            np.ones(shape, np.float32) if name.endswith("norm.weight") else np.zeros(shape, np.float32)
        w.write_tensor_data(x.astype(dtype))
    w.close()
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
