"""Tokenizer files of a model directory, through the `tokenizers` library."""

from __future__ import annotations

import json
from pathlib import Path

from gptbc.errors import GptbcError


# SantaCoder spells its FIM tokens with dashes, StarCoder with underscores.
FIM_SPELLINGS = [
    {"prefix": "<fim-prefix>", "suffix": "<fim-suffix>", "middle": "<fim-middle>", "pad": "<fim-pad>"},
    {"prefix": "<fim_prefix>", "suffix": "<fim_suffix>", "middle": "<fim_middle>", "pad": "<fim_pad>"},
]


def vocabulary(directory: Path) -> dict[str, int]:
    """token string → id, from tokenizer.json (model vocab + added tokens) or vocab.json + added_tokens.json."""
    vocab: dict[str, int] = {}
    tj = directory / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text("utf-8"))
        model_vocab = (data.get("model") or {}).get("vocab") or {}
        if isinstance(model_vocab, dict):
            vocab.update(model_vocab)
        for t in data.get("added_tokens") or []:
            vocab[t["content"]] = t["id"]
        return vocab
    for name in ("vocab.json", "added_tokens.json"):
        if (directory / name).is_file():
            vocab.update(json.loads((directory / name).read_text("utf-8")))
    return vocab


def find_fim_tokens(directory: Path) -> dict | None:
    """The FIM token strings and ids the tokenizer has, or None when it has neither spelling."""
    vocab = vocabulary(directory)
    for spelling in FIM_SPELLINGS:
        if all(spelling[k] in vocab for k in ("prefix", "suffix", "middle")):
            return {k: {"text": v, "id": vocab[v]} for k, v in spelling.items() if v in vocab}
    return None


class Tokenizer:
    """Text ↔ ids for a model directory (tokenizer.json, or vocab.json + merges.txt)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            try:
                self.tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as err:  # tokenizers raises a bare Exception on a bad file
                raise GptbcError(f"{directory / 'tokenizer.json'}: cannot load ({err})") from None
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            bpe = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
            self.tok = HFTokenizer(bpe)
            self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self.tok.decoder = decoders.ByteLevel()
        else:
            raise GptbcError(f"{directory}: no tokenizer.json (or vocab.json + merges.txt)")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def special_ids(self) -> set[int]:
        """Ids of the special added tokens (<|endoftext|>, FIM markers, ...), which never appear in output text."""
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file())


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces without ever emitting half a UTF-8 character.

    Byte-level BPE splits multi-byte characters across tokens; decoding such a partial sequence gives
    U+FFFD. We hold text back until the decoded tail is complete, and re-decode from a small window
    (the last emitted token onwards) so each step costs O(1) tokens.
    """

    def __init__(self, tokenizer: Tokenizer, skip_ids: set[int] = frozenset()):
        self.tokenizer, self.skip_ids = tokenizer, skip_ids
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoded text up to read_offset is already emitted
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self.skip_ids])

    def add(self, token: int) -> str:
        """The new complete text after appending `token` ('' while a character is still incomplete)."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (a genuinely broken tail decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
