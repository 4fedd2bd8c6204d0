"""`tokenizer.json` rebuilt from a GGUF's vocabulary, so a GGUF file converts with nothing beside it.

A StarCoder-family GGUF carries `tokenizer.ggml.model = "gpt2"` (byte-level BPE): `tokens` (the byte-level
strings HF's vocab holds, id = position), `merges` ("a b", in rank order), `token_type` (1 normal, 3 control,
4 user-defined: llama.cpp's converter writes HF's special added tokens as control and its other added tokens as
user-defined), bos/eos ids, and `tokenizer.ggml.pre`, llama.cpp's name for the pre-tokenizer. StarCoder's
("starcoder", also "refact") splits every digit on its own before GPT-2's byte-level regex, as HF's
Digits(individual_digits) + ByteLevel does; "gpt-2" / "default" is the byte-level regex alone. FIM tokens need no
special handling: they are added tokens found by their text (runtime/tokenizer.find_fim_tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptbc.errors import GptbcError

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
DIGITS_FIRST = ("starcoder", "refact")  # llama.cpp pre-tokenizer names: \p{N} alone, then the GPT-2 regex
BYTE_LEVEL_ONLY = ("gpt-2", "default")


def _pre_tokenizer(pre: str, path: Path) -> dict[str, Any]:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in DIGITS_FIRST:
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    if pre in BYTE_LEVEL_ONLY:
        return byte_level
    raise GptbcError(f"{path}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer gptbc can rebuild "
                     f"({', '.join(DIGITS_FIRST + BYTE_LEVEL_ONLY)})")


def tokenizer_json(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """HF `tokenizer.json` content for the GGUF metadata `meta` of file `path`."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GptbcError(f"{path}: tokenizer.ggml.model is {model!r}; gptbc rebuilds only the byte-level BPE "
                         f"('gpt2') that StarCoder-family models use")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    merges = list(meta.get("tokenizer.ggml.merges") or [])
    types = [int(t) for t in (meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))]
    if not tokens or len(types) != len(tokens):
        raise GptbcError(f"{path}: tokenizer.ggml.tokens is empty or its token_type list differs in length")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": k == CONTROL}
             for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")), path),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }


def write_tokenizer(meta: dict[str, Any], path: Path, out_dir: Path) -> None:
    """Write tokenizer.json (and generation_config.json with the bos/eos ids) into `out_dir`; nothing for a file
    without a tokenizer (weights alone convert, as an HF directory without tokenizer files does)."""
    if "tokenizer.ggml.model" not in meta:
        return
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(meta, path), ensure_ascii=False), "utf-8")
    gen = {k: int(meta[f"tokenizer.ggml.{k}"]) for k in ("bos_token_id", "eos_token_id")
           if f"tokenizer.ggml.{k}" in meta}
    (out_dir / "generation_config.json").write_text(json.dumps(gen) + "\n")
