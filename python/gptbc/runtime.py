"""Runtime: load a model library and converted weights, own the paged KV cache, generate tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import GPTBC_CONFIG, GPTBigCodeConfig, load_gptbc_config
from .errors import GptbcError
from .tensorfile import SafetensorsFile
from .tokenizer import Tokenizer, has_tokenizer

PAGE_SIZE = 16


def parse_device(device: str):
    import tvm

    kind, _, index = device.partition(":")
    if kind not in ("cpu", "llvm"):
        raise GptbcError(f"device {device!r}: only 'cpu' is supported by this build of gptbc")
    return tvm.cpu(int(index or 0))


def load_library(lib: str | Path, dev):
    import tvm
    from tvm import relax

    lib = Path(lib)
    if not lib.is_file():
        raise GptbcError(f"--lib {lib}: file not found")
    try:
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), dev)
        meta = json.loads(str(vm["_metadata"]()))
    except Exception as err:  # TVM raises its own error types for a foreign or broken file
        raise GptbcError(f"--lib {lib}: not a gptbc model library ({str(err).splitlines()[0][:200]})") from None
    return vm, meta


def _scheme(desc: dict) -> str:
    keep = "" if desc.get("quantize_lm_head", True) or desc.get("kind") == "none" else " (lm_head unquantized)"
    return desc["name"] + keep


def check_compatible(lib: Path, meta: dict, model_dir: Path, info: dict) -> None:
    """The library and the weights must describe the same model and scheme; fail before computing."""
    lq, wq = _scheme(meta["quantization"]), _scheme(info["quantization"])
    if lq != wq:
        raise GptbcError(f"--lib {lib} was compiled for quantization {lq}, but the weights in {model_dir} are {wq}; "
                         f"compile and convert with the same --quantization (and --no-quantize-lm-head) settings")
    have = {p["name"]: p for p in info["params"]}
    for p in meta["params"]:
        w = have.get(p["name"])
        if w is None:
            raise GptbcError(f"{model_dir / GPTBC_CONFIG}: no tensor {p['name']}, which --lib {lib} needs "
                             f"(were they built from different configs?)")
        if w["shape"] != p["shape"] or w["dtype"] != p["dtype"]:
            raise GptbcError(f"{model_dir}: tensor {p['name']} is {w['dtype']}{w['shape']}, --lib {lib} expects "
                             f"{p['dtype']}{p['shape']} (were they built from different configs?)")


def load_params(model_dir: Path, info: dict, meta: dict, dev) -> list:
    """Weights in the library's load order, as device tensors."""
    import tvm

    files: dict[str, SafetensorsFile] = {}
    where = {p["name"]: p["file"] for p in info["params"]}
    params = []
    try:
        for p in meta["params"]:
            fname = where[p["name"]]
            if fname not in files:
                files[fname] = SafetensorsFile(model_dir / fname)
            f = files[fname]
            if p["name"] not in f:
                raise GptbcError(f"{f.path}: tensor {p['name']} is missing")
            arr = f.get(p["name"])
            if list(arr.shape) != p["shape"] or str(arr.dtype) != p["dtype"]:
                raise GptbcError(f"{f.path}: tensor {p['name']} is {arr.dtype}{list(arr.shape)}, "
                                 f"expected {p['dtype']}{p['shape']}")
            params.append(tvm.runtime.tensor(arr, dev))
            del arr
    finally:
        for f in files.values():
            f.close()
    return params


class Engine:
    """A loaded model: `generate` for one sequence; the KV-cache methods are the building blocks."""

    def __init__(self, model_dir: str | Path, lib: str | Path, device: str = "cpu",
                 max_total_seq_len: int | None = None, max_batch_size: int | None = None):
        import tvm

        self.model_dir, self.lib = Path(model_dir), Path(lib)
        if not (self.model_dir / GPTBC_CONFIG).is_file():
            raise GptbcError(f"{self.model_dir}: no {GPTBC_CONFIG} (convert weights with `gptbc convert-weight`)")
        self.info = load_gptbc_config(self.model_dir)
        self.dev = parse_device(device)
        self.vm, self.meta = load_library(self.lib, self.dev)
        check_compatible(self.lib, self.meta, self.model_dir, self.info)
        self.config = GPTBigCodeConfig.from_dict(self.meta["model_config"], source=f"--lib {self.lib}")
        self.context_window_size = int(self.meta["context_window_size"])
        self.prefill_chunk_size = int(self.meta["prefill_chunk_size"])
        self.max_batch_size = int(max_batch_size or self.meta["max_batch_size"])
        self.eos_ids = set(self.info.get("eos_token_id") or self.config.eos_token_id)
        self.params = load_params(self.model_dir, self.info, self.meta, self.dev)
        self.tokenizer = Tokenizer(self.model_dir) if has_tokenizer(self.model_dir) else None

        shape = tvm.runtime.ShapeTuple
        total = int(max_total_seq_len or self.context_window_size)
        self.kv_cache = self.vm["create_paged_kv_cache"](
            shape([self.max_batch_size]), shape([total]), shape([self.prefill_chunk_size]), shape([PAGE_SIZE]),
            shape([0]))
        get = tvm.get_global_func
        self._add = get("vm.builtin.kv_state_add_sequence")
        self._remove = get("vm.builtin.kv_state_remove_sequence")
        self._fork = get("vm.builtin.kv_state_fork_sequence")
        self._begin = get("vm.builtin.kv_state_begin_forward")
        self._end = get("vm.builtin.kv_state_end_forward")
        self._seq_len = get("vm.builtin.attention_kv_cache_get_total_sequence_length")
        self._shape = shape
        self._next_seq_id = 0
        self._live: set[int] = set()

    # ---- KV cache: sequences ----
    def add_sequence(self) -> int:
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        self._add(self.kv_cache, seq_id)
        self._live.add(seq_id)
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        if seq_id in self._live:
            self._remove(self.kv_cache, seq_id)
            self._live.discard(seq_id)

    # ---- forward passes ----
    def _embed(self, ids: Sequence[int]):
        import tvm

        return self.vm["embed"](tvm.runtime.tensor(np.asarray(ids, dtype=np.int32), self.dev), self.params)

    def prefill(self, seq_id: int, ids: Sequence[int]) -> np.ndarray:
        """Append `ids` to the sequence (in prefill_chunk_size chunks); logits of the last one, float32[vocab]."""
        self.check_ids(ids)
        logits = None
        for start in range(0, len(ids), self.prefill_chunk_size):
            chunk = list(ids[start:start + self.prefill_chunk_size])
            embeds = self._embed(chunk)._create_view((1, len(chunk), self.config.n_embd))
            logits = self._forward("prefill", seq_id, len(chunk), embeds)
        return logits

    def decode(self, seq_id: int, token: int) -> np.ndarray:
        """Append one token; logits for the next, float32[vocab]."""
        self.check_ids([token])
        embeds = self._embed([token])._create_view((1, 1, self.config.n_embd))
        return self._forward("decode", seq_id, 1, embeds)

    def prefill_batch(self, seq_ids: Sequence[int], id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """One forward over several sequences' new tokens (no chunking); float32[batch, vocab] of their last tokens."""
        flat = [int(t) for ids in id_lists for t in ids]
        self.check_ids(flat)
        lengths = [len(ids) for ids in id_lists]
        if min(lengths, default=0) == 0 or len(flat) > self.prefill_chunk_size:
            raise GptbcError(f"prefill_batch: each sequence needs >= 1 token and the total ({len(flat)}) must fit "
                             f"prefill_chunk_size {self.prefill_chunk_size}")
        import tvm

        embeds = self._embed(flat)._create_view((1, len(flat), self.config.n_embd))
        last = tvm.runtime.tensor(np.cumsum(lengths).astype(np.int32) - 1, self.dev)
        return self._forward("batch_prefill", seq_ids, lengths, embeds, last).reshape(len(seq_ids), -1)

    def decode_batch(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One new token for each sequence; float32[batch, vocab]."""
        self.check_ids(tokens)
        embeds = self._embed(tokens)._create_view((len(tokens), 1, self.config.n_embd))
        return self._forward("batch_decode", seq_ids, [1] * len(tokens), embeds).reshape(len(seq_ids), -1)

    def verify(self, seq_id: int, ids: Sequence[int]) -> np.ndarray:
        """Append `ids` and return the logits after every one of them, float32[len(ids), vocab]."""
        self.check_ids(ids)
        embeds = self._embed(ids)._create_view((1, len(ids), self.config.n_embd))
        return self._forward("batch_verify", [seq_id], [len(ids)], embeds).reshape(len(ids), -1)

    def _forward(self, func: str, seq_ids, lengths, embeds, *extra) -> np.ndarray:
        seq_ids = [seq_ids] if isinstance(seq_ids, int) else list(seq_ids)
        lengths = [lengths] if isinstance(lengths, int) else list(lengths)
        self._begin(self.kv_cache, self._shape(seq_ids), self._shape(lengths))
        try:
            logits, self.kv_cache = self.vm[func](embeds, *extra, self.kv_cache, self.params)
        finally:
            self._end(self.kv_cache)
        return logits.numpy().reshape(-1)

    def check_ids(self, ids: Sequence[int]) -> None:
        vocab = self.config.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= int(t) < vocab:
                raise GptbcError(f"token id {int(t)} at position {i} is outside the vocabulary (0..{vocab - 1})")

    # ---- generation ----
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, greedy: bool = True) -> list[int]:
        """New token ids after the prompt; stops after an eos token (which is returned, as HF does)."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not greedy:
            raise GptbcError("only greedy decoding is available in this version (greedy=True)")
        self.check_request(prompt_ids, max_new_tokens)
        out: list[int] = []
        if max_new_tokens == 0:
            return out
        seq_id = self.add_sequence()
        try:
            logits = self.prefill(seq_id, prompt_ids)
            while True:
                token = int(np.argmax(logits))
                out.append(token)
                if token in self.eos_ids or len(out) >= max_new_tokens:
                    return out
                logits = self.decode(seq_id, token)
        finally:
            self.remove_sequence(seq_id)

    def check_request(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        if len(prompt_ids) == 0:
            raise GptbcError("prompt is empty: give at least one token")
        if max_new_tokens < 0:
            raise GptbcError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.check_ids(prompt_ids)
        need = len(prompt_ids) + max_new_tokens
        if need > self.context_window_size:
            raise GptbcError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} = {need} exceeds "
                             f"the context window of {self.context_window_size} tokens")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise GptbcError(f"{self.model_dir}: no tokenizer files; pass token ids instead of text")
        return self.tokenizer.encode(text)

    def decode_text(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise GptbcError(f"{self.model_dir}: no tokenizer files; cannot turn ids into text")
        return self.tokenizer.decode([t for t in ids if t not in self.eos_ids])
