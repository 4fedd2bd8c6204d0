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

from gptbc.artifact.files import clip
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
    raise GptbcError(f"{path}: tokenizer.ggml.pre {clip(pre)} is not a pre-tokenizer gptbc can rebuild "
                     f"({', '.join(DIGITS_FIRST + BYTE_LEVEL_ONLY)})")


def tokenizer_json(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """HF `tokenizer.json` content for the GGUF metadata `meta` of file `path`."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GptbcError(f"{path}: tokenizer.ggml.model is {clip(model)}; gptbc rebuilds only the byte-level BPE "
                         f"('gpt2') that StarCoder-family models use")
    tokens = _strings(meta, "tokenizer.ggml.tokens", path)
    merges = _strings(meta, "tokenizer.ggml.merges", path)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not tokens or not isinstance(types, list) or len(types) != len(tokens) or \
            not all(type(t) is int for t in types):
        raise GptbcError(f"{path}: tokenizer.ggml.tokens is empty or its token_type list differs in length")
    _check_merges(tokens, merges, path)
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


def _strings(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    values = meta.get(key) or []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise GptbcError(f"{path}: {key} must be a list of strings")
    return values


def _check_merges(tokens: list[str], merges: list[str], path: Path) -> None:
    """Each merge is "a b" with a, b and ab in the vocabulary, as the BPE that loads it requires: a bad one is
    refused here, at convert time, not when the first prompt is tokenized."""
    vocab = set(tokens)
    for i, m in enumerate(merges):
        a, space, b = m.partition(" ")
        if not (space and a and b and " " not in b) or not {a, b, a + b} <= vocab:
            raise GptbcError(f"{path}: tokenizer.ggml.merges[{i}] {clip(m)} is not two tokens of the vocabulary "
                             f"that merge into a third")


def tokenizer_files(meta: dict[str, Any], path: Path) -> dict[str, str]:
    """tokenizer.json (and generation_config.json with the bos/eos ids), name → text; none for a file without a
    tokenizer (weights alone convert, as an HF directory without tokenizer files does). Built (and so checked)
    before any tensor is converted."""
    if "tokenizer.ggml.model" not in meta:
        return {}
    gen = {k: meta[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id") if f"tokenizer.ggml.{k}" in meta}
    if not all(type(v) is int for v in gen.values()):
        raise GptbcError(f"{path}: tokenizer.ggml.bos_token_id / eos_token_id must be integers")
    return {"tokenizer.json": json.dumps(tokenizer_json(meta, path), ensure_ascii=False),
            "generation_config.json": json.dumps(gen) + "\n"}


def write_tokenizer(files: dict[str, str], out_dir: Path) -> None:
    for name, text in files.items():
        (out_dir / name).write_text(text, "utf-8")
