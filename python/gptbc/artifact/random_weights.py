"""Seeded random converted weights of a config's shape (`--random-weights`): the plumbing tried offline.

The tensors are written straight in the converted layout (artifact.params), so a santacoder-sized q4 model takes
seconds, not a 4.5 GB float checkpoint converted; packed weights get random codes and small scales, layer norms
ones, biases zeros, the rest N(0, 0.02). The tokenizer is a byte-level stand-in (each byte one token, no merges)
with the family's special and fill-in-the-middle tokens at the ids the config names, so text, FIM and /infill
work; the model's own tokenizer is not available offline, and its text would be noise from random weights anyway.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from gptbc.artifact.config import GPTBC_CONFIG, GPTBigCodeConfig
from gptbc.artifact.manifest import weights_manifest
from gptbc.artifact.params import converted_params
from gptbc.artifact.quantization import Quantization, numpy_dtype
from gptbc.artifact.safetensors_io import aligned_order, write_safetensors

SPECIALS = {"dash": ["<|endoftext|>", "<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>"],
            "underscore": ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]}


def _values(name: str, shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    np_dtype = numpy_dtype(dtype)
    if name.endswith((".q_weight", ".q_high")):
        return rng.integers(0, np.iinfo(np_dtype).max, shape, dtype=np_dtype, endpoint=True)
    if name.endswith(".q_scale"):  # codes of 4 bits centred on 8 give weights of about 0.02 std
        return (0.004 + 0.002 * rng.random(shape, dtype=np.float32)).astype(np_dtype)
    if name.endswith(".q_min"):
        return np.full(shape, -0.03, np_dtype)
    if "ln_" in name and name.endswith(".weight"):
        return np.ones(shape, np_dtype)
    if name.endswith(".bias"):
        return np.zeros(shape, np_dtype)
    return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np_dtype)


def write_random_weights(out: Path, name: str, cfg: GPTBigCodeConfig, quant: Quantization, seed: int = 0) -> Path:
    """Fill the (new, empty) folder `out` with a converted weights directory of random values and a stand-in
    tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    params = converted_params(cfg, quant)
    sizes = [int(np.prod(s, dtype=np.int64)) * numpy_dtype(d).itemsize for _n, s, d in params]
    order = [params[i] for i in aligned_order(sizes)]
    rng = np.random.default_rng(seed)
    file = "params-00001-of-00001.safetensors"

    def arrays() -> Iterator[np.ndarray]:
        for n, s, d in order:
            yield _values(n, s, d, rng)

    write_safetensors(out / file, [(n, s, numpy_dtype(d)) for n, s, d in order], arrays())
    index = [{"name": n, "shape": list(s), "dtype": d, "file": file} for n, s, d in params]
    (out / GPTBC_CONFIG).write_text(json.dumps(weights_manifest(name, cfg, quant, index), indent=2) + "\n")
    write_byte_tokenizer(out, cfg)
    return out


def write_byte_tokenizer(out: Path, cfg: GPTBigCodeConfig) -> None:
    """tokenizer.json: 256 byte tokens, and the special tokens where the config's eos id says the family puts
    them (StarCoder: <|endoftext|> 0, FIM tokens 1-4, underscores; SantaCoder: from its eos id up, dashes)."""
    eos = cfg.eos_token_id[0] if cfg.eos_token_id else cfg.vocab_size - len(SPECIALS["dash"])
    specials = SPECIALS["underscore" if eos == 0 else "dash"]
    special_ids = list(range(eos, eos + len(specials)))
    if special_ids[-1] >= cfg.vocab_size or cfg.vocab_size < 256 + len(specials):
        return  # too small a vocabulary for a byte tokenizer: ids only
    from tokenizers import pre_tokenizers

    byte_ids = [i for i in range(cfg.vocab_size) if i not in special_ids][:256]
    vocab = dict(zip(pre_tokenizers.ByteLevel.alphabet(), byte_ids))
    vocab.update(zip(specials, special_ids))
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in zip(specials, special_ids)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": []},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer) + "\n")
