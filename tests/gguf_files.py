"""GGUF files written here from the seeded HF checkpoints of hf_models.py, as llama.cpp's convert_hf_to_gguf.py
writes a GPTBigCode model (architecture `starcoder`), with the `gguf` package's writer and quantizer.

What the reference model of a test is: an HF model holding the values `gguf.quants.dequantize` gives for the
file (`dequantized_model`), so a test compares gptbc against what the file means, not against the checkpoint it
was made from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GGUF_NAMES = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "ln_1": "attn_norm",
              "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up",
              "mlp.c_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    """gpt_bigcode tensor name → the GGUF name llama.cpp gives it."""
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.removeprefix("transformer.").split(".")
    if parts[0] == "h":
        module = ".".join(parts[2:-1])
        return f"blk.{parts[1]}.{GGUF_NAMES[module]}.{parts[-1]}"
    return f"{GGUF_NAMES[parts[0]]}.{parts[-1]}"


def _tokenizer_metadata(writer, hf_dir: Path) -> None:
    data = json.loads((hf_dir / "tokenizer.json").read_text("utf-8"))
    vocab = dict(data["model"]["vocab"])
    special = set()
    for t in data["added_tokens"]:
        vocab[t["content"]] = t["id"]
        if t["special"]:
            special.add(t["id"])
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("starcoder")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    config = json.loads((hf_dir / "config.json").read_text())
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])


def write_gguf(hf_dir: Path, path: Path, qtype: str = "Q8_0", types: dict[str, str] | None = None,
               arch: str = "starcoder", n_kv_heads: int = 1, replace: dict[str, np.ndarray] | None = None,
               split_max_tensors: int = 0) -> Path:
    """A GGUF of checkpoint `hf_dir`: 2-D weights in `qtype` (or `types[gguf name]`), 1-D tensors F32;
    `replace` swaps in other values for some GGUF tensors, `split_max_tensors` writes a split set."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_context_length(config["n_positions"])
    w.add_embedding_length(config["n_embd"])
    w.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    w.add_block_count(config["n_layer"])
    w.add_head_count(config["n_head"])
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_eps(config["layer_norm_epsilon"])
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "Q8_0" else gguf.LlamaFileType.MOSTLY_Q4_0
                        if qtype == "Q4_0" else gguf.LlamaFileType.MOSTLY_F16))
    _tokenizer_metadata(w, hf_dir)
    for hf, value in tensors.items():
        if hf.endswith(".attn.bias") or hf.endswith("masked_bias"):
            continue
        name = gguf_name(hf)
        kind = (types or {}).get(name, qtype if value.ndim == 2 else "F32")
        value = (replace or {}).get(name, value).astype(np.float32)
        if kind == "F32":
            w.add_tensor(name, value)
        elif kind == "F16":
            w.add_tensor(name, value.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(value, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized(path: Path) -> dict[str, np.ndarray]:
    """GGUF tensor name → float32 values the file means (gguf.quants.dequantize)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        out[t.name] = values.reshape(tuple(reversed([int(d) for d in t.shape])))
    return out


def dequantized_model(hf_dir: Path, path: Path):
    """An HF model of `hf_dir`'s config (its weights need not be there) holding the values the GGUF `path`
    stores for every parameter."""
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM(GPTBigCodeConfig.from_pretrained(hf_dir)).eval()
    values = dequantized(path)
    with torch.no_grad():
        for hf, p in model.named_parameters():
            src = values.get(gguf_name(hf))
            if src is None and hf == "lm_head.weight":
                src = values["token_embd.weight"]  # tied
            p.copy_(torch.from_numpy(src.reshape(tuple(p.shape))))
    return model


def retyped(source: Path, path: Path, types: dict[str, str]) -> Path:
    """A copy of GGUF `source` whose tensors named in `types` are re-quantized into those ggml types
    (gguf's dequantize, then quantize); every other tensor and all metadata as stored."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    w = gguf.GGUFWriter(str(path), str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(key, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        if t.name in types:
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
            qt = gguf.GGMLQuantizationType[types[t.name]]
            w.add_tensor(t.name, gguf.quants.quantize(values, qt), raw_dtype=qt)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)  # blocks: uint8 [rows, bytes]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
