"""The artifact's file names and the one JSON reader of the artifact's files (config.json, generation_config.json, tokenizer files): a bad
file is a one-line error that names it. Imports nothing of gptbc but errors, so every phase can use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptbc.errors import GptbcError

HF_CONFIG = "config.json"
# What the converter copies beside the weights (those present) and the runtime reads: tokenizer and generation defaults.
TOKENIZER_FILES = [
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json",
]


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise GptbcError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GptbcError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise GptbcError(f"{path}: expected a JSON object")
    return data
