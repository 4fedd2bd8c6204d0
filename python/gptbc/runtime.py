"""Runtime: load a model library and converted weights, own the paged KV cache, generate tokens.

`Engine` has two layers: model calls on KV-cache sequences (`add_sequence`, `prefill`, `decode`,
`decode_batch`, ...) and generation on top of them (`generate`, `stream`, `generate_batch`,
`complete`, `submit` + `step`), which goes through the continuous-batching loop in generation.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import GPTBC_CONFIG, GPTBigCodeConfig, load_gptbc_config
from .errors import GptbcError
from .sampling import SamplingParams, generation_defaults
from .tensorfile import SafetensorsFile
from .tokenizer import Tokenizer, find_fim_tokens, has_tokenizer

PAGE_SIZE = 16


DEVICE_KINDS = {"cpu": "cpu", "llvm": "cpu", "cuda": "cuda", "metal": "metal", "vulkan": "vulkan", "rocm": "rocm",
                "opencl": "opencl"}


def parse_device(device: str):
    """'cpu', 'cuda:0', 'metal', 'vulkan:1' → a TVM device that exists on this machine."""
    import tvm

    kind, _, index = device.partition(":")
    if kind not in DEVICE_KINDS or (index and not index.isdigit()):
        raise GptbcError(f"device {device!r}: expected one of {', '.join(sorted(set(DEVICE_KINDS)))}, "
                         f"optionally with :INDEX")
    if kind == "vulkan" and tvm.get_global_func("device_api.vulkan", allow_missing=True) is None:
        # No TVM Vulkan runtime (the PyPI wheel): Vulkan runs WGSL libraries on gptbc's WebGPU runtime.
        from . import webgpu

        return webgpu.device(int(index or 0))
    try:
        dev = tvm.device(DEVICE_KINDS[kind], int(index or 0))
        exists = dev.exist
    except Exception:  # this TVM build has no runtime for that kind
        exists = False
    if not exists:
        raise GptbcError(f"device {device!r}: no such device on this machine (or this TVM has no runtime for it)")
    return dev


def physical_cores() -> int:
    """Cores (not SMT siblings) among the CPUs this process may run on."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:  # no sysfs topology (not Linux): count CPUs
            cores.add(("", str(cpu)))
    return max(len(cores), 1)


def use_all_cores() -> None:
    """One TVM worker thread per physical core, unless TVM_NUM_THREADS says otherwise.

    TVM's pool assumes two hardware threads per core on x86 and starts half as many workers as CPUs:
    on a 2-vCPU machine with one thread per core every kernel ran on 1 thread (santacoder q4f32_1 decode
    82 ms/token, 41 ms with 2). The pool reads the variable when it starts, at the first parallel kernel.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))


def serve_prebuilt_cuda_kernels(lib: Path) -> None:
    """Answer TVM's load-time CUDA compile hook with the fatbin `gptbc compile` made, when it matches.

    Other sources (another library, or a mismatch) go to TVM's own compiler (NVRTC, or nvcc with
    TVM_CUDA_COMPILE_MODE=nvcc).
    """
    import hashlib

    import tvm_ffi
    from tvm.support import nvcc

    fat = lib.with_name(lib.name + ".fatbin")
    info_path = fat.with_name(fat.name + ".json")
    prebuilt = {}
    if fat.is_file() and info_path.is_file():
        prebuilt[json.loads(info_path.read_text())["source_sha256"]] = fat.read_bytes()
    previous = nvcc.tvm_callback_cuda_compile

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def compile_hook(code):
        return prebuilt.get(hashlib.sha256(code.encode()).hexdigest()) or previous(code)


def load_library(lib: str | Path, dev):
    import tvm
    from tvm import relax

    lib = Path(lib)
    if not lib.is_file():
        raise GptbcError(f"--lib {lib}: file not found")
    if dev.dlpack_device_type() == tvm.cuda(0).dlpack_device_type():
        serve_prebuilt_cuda_kernels(lib)
    try:
        try:
            module = tvm.runtime.load_module(str(lib))
        except Exception as err:
            if "load_from_bytes.webgpu" not in str(err):
                raise
            from . import webgpu  # a WGSL library (--target vulkan): load the runtime it needs, then retry

            webgpu.load_runtime()
            module = tvm.runtime.load_module(str(lib))
        vm = relax.VirtualMachine(module, dev)
        meta = json.loads(str(vm["_metadata"]()))
    except GptbcError:
        raise
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


def load_params(model_dir: Path, info: dict, meta: dict, dev) -> tuple[list, int]:
    """Weights in the library's load order, as device tensors; and how many bytes are mapped, not copied.

    On the CPU a tensor stored at a 64-byte aligned offset (gptbc writes them so) is handed to TVM as
    a view of the memory-mapped file: no copy, no load time, and processes serving the same weights
    share the page cache. Anything else is copied to the device.
    """
    import tvm

    on_cpu = dev.dlpack_device_type() == tvm.cpu(0).dlpack_device_type()
    files: dict[str, SafetensorsFile] = {}
    where = {p["name"]: p["file"] for p in info["params"]}
    params, mapped = [], 0
    try:
        for p in meta["params"]:
            fname = where[p["name"]]
            if fname not in files:
                files[fname] = SafetensorsFile(model_dir / fname, private=on_cpu)
            f = files[fname]
            if p["name"] not in f:
                raise GptbcError(f"{f.path}: tensor {p['name']} is missing")
            arr = f.get(p["name"])
            if list(arr.shape) != p["shape"] or str(arr.dtype) != p["dtype"]:
                raise GptbcError(f"{f.path}: tensor {p['name']} is {arr.dtype}{list(arr.shape)}, "
                                 f"expected {p['dtype']}{p['shape']}")
            view = _mapped_tensor(arr) if on_cpu else None
            if view is not None:
                params.append(view)
                mapped += arr.nbytes
                continue
            params.append(tvm.runtime.tensor(arr, dev))
            del arr
            f.release(p["name"])  # copied: the mapped file pages need not stay resident too
    finally:
        for f in files.values():
            f.close()  # the mapping itself lives on while tensors view it
    return params, mapped


def _mapped_tensor(arr: np.ndarray):
    """A TVM tensor viewing `arr` (no copy), or None where TVM cannot take it (misaligned, bfloat16)."""
    import tvm

    if arr.size == 0 or arr.ctypes.data % 64:
        return None
    try:
        return tvm.runtime.from_dlpack(arr)
    except Exception:  # noqa: BLE001 - e.g. a dtype numpy cannot export through DLPack: copy instead
        return None


class Engine:
    """A loaded model: `generate` for one sequence; the KV-cache methods are the building blocks."""

    def __init__(self, model_dir: str | Path, lib: str | Path, device: str = "cpu",
                 max_total_seq_len: int | None = None, max_batch_size: int | None = None,
                 prefix_cache_size: int = 8):
        """`max_total_seq_len`: tokens the KV cache holds over all sequences (default: context window ×
        min(4, max_batch_size)); `prefix_cache_size`: finished sequences kept for prefix reuse."""
        import tvm

        self.model_dir, self.lib = Path(model_dir), Path(lib)
        if not (self.model_dir / GPTBC_CONFIG).is_file():
            raise GptbcError(f"{self.model_dir}: no {GPTBC_CONFIG} (convert weights with `gptbc convert-weight`)")
        self.info = load_gptbc_config(self.model_dir)
        self.dev = parse_device(device)
        self.vm, self.meta = load_library(self.lib, self.dev)
        kind = DEVICE_KINDS[device.partition(":")[0]]
        if self.meta.get("device", "cpu") != kind:
            raise GptbcError(f"--lib {self.lib} was built for {self.meta.get('device')} "
                             f"(--target {self.meta.get('target')}), not for device {device!r}")
        self.on_cpu = kind == "cpu"
        self.webgpu = self.dev.dlpack_device_type() == 15
        self._with_history: set[int] = set()  # sequences holding KV entries (WebGPU: see _forward)
        if self.on_cpu:
            use_all_cores()
        check_compatible(self.lib, self.meta, self.model_dir, self.info)
        if self.dev.dlpack_device_type() == 15:  # WebGPU runtime (Vulkan): binding limits, shader-f16
            from . import webgpu

            webgpu.check_model(self.meta, self.dev, self.lib)
            # Reusing a cached prefix prefills onto existing KV history, which is wrong on this path
            # (docs/targets.md, Problem 3): never fork cached prefixes here.
            prefix_cache_size = 0
        self.config = GPTBigCodeConfig.from_dict(self.meta["model_config"], source=f"--lib {self.lib}")
        self.context_window_size = int(self.meta["context_window_size"])
        self.prefill_chunk_size = int(self.meta["prefill_chunk_size"])
        self.max_batch_size = int(max_batch_size or self.meta["max_batch_size"])
        if not 0 < self.max_batch_size <= int(self.meta["max_batch_size"]):
            raise GptbcError(f"max batch size {self.max_batch_size}: --lib {self.lib} was compiled for 1.."
                             f"{self.meta['max_batch_size']} (compile with a larger --max-batch-size)")
        self.defaults, generation_eos = generation_defaults(self.model_dir)
        self.eos_ids = set(self.info.get("eos_token_id") or self.config.eos_token_id) | generation_eos
        self.params, self.mapped_bytes = load_params(self.model_dir, self.info, self.meta, self.dev)
        self.tokenizer = Tokenizer(self.model_dir) if has_tokenizer(self.model_dir) else None
        self.fim = find_fim_tokens(self.model_dir) if self.tokenizer else None
        self.special_ids = set(self.eos_ids) | (self.tokenizer.special_ids() if self.tokenizer else set())
        self.page_size = PAGE_SIZE

        shape = tvm.runtime.ShapeTuple
        total = int(max_total_seq_len or self.context_window_size * min(4, self.max_batch_size))
        self.kv_cache = self.vm["create_paged_kv_cache"](
            shape([self.max_batch_size]), shape([total]), shape([self.prefill_chunk_size]), shape([PAGE_SIZE]),
            shape([0]))
        get = tvm.get_global_func
        self._add = get("vm.builtin.kv_state_add_sequence")
        self._remove = get("vm.builtin.kv_state_remove_sequence")
        self._fork = get("vm.builtin.kv_state_fork_sequence")
        self._begin = get("vm.builtin.kv_state_begin_forward")
        self._end = get("vm.builtin.kv_state_end_forward")
        self._free_pages = get("vm.builtin.attention_kv_cache_get_num_available_pages")
        self.kv_pages_total = self.kv_pages_free()
        self._shape = shape
        self._next_seq_id = 0
        self._live: set[int] = set()
        from .generation import Scheduler

        self.scheduler = Scheduler(self, total, prefix_cache_size)

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
            self._with_history.discard(seq_id)

    def fork_sequence(self, parent: int, length: int) -> int:
        """A new sequence sharing the first `length` tokens of `parent` (pages shared, not recomputed)."""
        child = self._next_seq_id
        self._next_seq_id += 1
        self._fork(self.kv_cache, parent, child, length)
        self._live.add(child)
        if length > 0:
            self._with_history.add(child)
        return child

    def sequence_count(self) -> int:
        return len(self._live)

    def kv_pages_free(self) -> int:
        """KV-cache pages not held by any sequence (the cache's own count, for leak checks and metrics)."""
        return int(self._free_pages(self.kv_cache))

    # ---- forward passes ----
    def _embed(self, ids: Sequence[int]):
        import tvm

        return self.vm["embed"](tvm.runtime.tensor(np.asarray(ids, dtype=np.int32), self.dev), self.params)

    def prefill(self, seq_id: int, ids: Sequence[int]) -> np.ndarray:
        """Append `ids` to the sequence (in prefill_chunk_size chunks); logits of the last one, float32[vocab]."""
        self.check_ids(ids)
        logits = None
        for start in range(0, len(ids), self.prefill_chunk_size):
            logits = self.prefill_chunk(seq_id, ids[start:start + self.prefill_chunk_size])
        return logits

    def prefill_chunk(self, seq_id: int, chunk: Sequence[int]) -> np.ndarray:
        """One prefill call (len(chunk) <= prefill_chunk_size, ids already checked)."""
        chunk = list(chunk)
        embeds = self._embed(chunk)._create_view((1, len(chunk), self.config.n_embd))
        return self._forward("prefill", seq_id, len(chunk), embeds)

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
        return self._decode_batch(seq_ids, tokens).numpy().reshape(len(seq_ids), -1)

    def decode_batch_greedy(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """decode_batch + argmax on the device: only the chosen ids come back to the host."""
        logits = self._decode_batch(seq_ids, tokens)
        return self.vm["argmax"](logits._create_view((len(seq_ids), self.config.vocab_size))).numpy().tolist()

    def _decode_batch(self, seq_ids: Sequence[int], tokens: Sequence[int]):
        self.check_ids(tokens)
        embeds = self._embed(tokens)._create_view((len(tokens), 1, self.config.n_embd))
        return self._forward("batch_decode", seq_ids, [1] * len(tokens), embeds, to_host=False)

    def verify(self, seq_id: int, ids: Sequence[int]) -> np.ndarray:
        """Append `ids` and return the logits after every one of them, float32[len(ids), vocab]."""
        self.check_ids(ids)
        embeds = self._embed(ids)._create_view((1, len(ids), self.config.n_embd))
        return self._forward("batch_verify", [seq_id], [len(ids)], embeds).reshape(len(ids), -1)

    def _forward(self, func: str, seq_ids, lengths, embeds, *extra, to_host: bool = True):
        seq_ids = [seq_ids] if isinstance(seq_ids, int) else list(seq_ids)
        lengths = [lengths] if isinstance(lengths, int) else list(lengths)
        if self.webgpu:  # refuse the one path known to compute wrong attention there (docs/targets.md, Problem 3)
            for sid, n in zip(seq_ids, lengths):
                if n > 1 and sid in self._with_history:
                    raise GptbcError(f"{func} of {n} tokens onto sequence {sid}, which already holds KV entries, "
                                     f"computes wrong attention on the Vulkan (WebGPU) runtime (docs/targets.md, "
                                     f"Problem 3); prompts must fit one prefill chunk (compile with a larger "
                                     f"--prefill-chunk-size)")
            self._with_history.update(seq_ids)
        self._begin(self.kv_cache, self._shape(seq_ids), self._shape(lengths))
        try:
            logits, self.kv_cache = self.vm[func](embeds, *extra, self.kv_cache, self.params)
        finally:
            self._end(self.kv_cache)
        return logits.numpy().reshape(-1) if to_host else logits

    def check_ids(self, ids: Sequence[int]) -> None:
        vocab = self.config.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= int(t) < vocab:
                raise GptbcError(f"token id {int(t)} at position {i} is outside the vocabulary (0..{vocab - 1})")

    # ---- generation ----
    def sampling(self, greedy: bool | None = None, **overrides) -> SamplingParams:
        """Sampling parameters: the model's generation_config.json defaults, then `overrides`.

        greedy=True forces temperature 0; greedy=False samples (temperature 1 unless given).
        """
        params = self.defaults.replace(**overrides)
        if greedy is True:
            params = params.replace(temperature=0.0)
        elif greedy is False and "temperature" not in overrides and params.temperature == 0:
            params = params.replace(temperature=1.0)
        params.validate()
        return params

    def prompt_ids(self, prompt: str | Sequence[int] | None = None, prefix: str | None = None,
                   suffix: str | None = None, params: SamplingParams | None = None) -> list[int]:
        """Token ids of a plain prompt (text or ids) or of a fill-in-the-middle request."""
        if prefix is not None or suffix is not None:
            if prompt is not None:
                raise GptbcError("give either a prompt or prefix/suffix (fill-in-the-middle), not both")
            return self.fim_prompt(prefix or "", suffix or "", params)
        if prompt is None:
            raise GptbcError("prompt is empty: give at least one token")
        return self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def fim_prompt(self, prefix: str, suffix: str, params: SamplingParams | None = None) -> list[int]:
        """<fim-prefix> prefix <fim-suffix> suffix <fim-middle> (PSM order, with the tokenizer's own spelling).

        With truncate_prompt, a prefix/suffix too long for the window loses its far ends: the start of
        the prefix and the end of the suffix, keeping the text around the cursor.
        """
        if self.tokenizer is None or self.fim is None:
            raise GptbcError(f"{self.model_dir}: the tokenizer has no fill-in-the-middle tokens "
                             f"(<fim-prefix>/<fim-suffix>/<fim-middle> or <fim_prefix>/<fim_suffix>/<fim_middle>)")
        pre, suf = self.encode(prefix), self.encode(suffix)
        if params is not None and params.truncate_prompt:
            budget = self.context_window_size - params.max_new_tokens - 3
            if budget < 0:
                raise GptbcError(f"max_new_tokens {params.max_new_tokens} leaves no room for a FIM prompt in the "
                                 f"context window of {self.context_window_size} tokens")
            keep_suf = min(len(suf), max(budget // 2, budget - len(pre)))
            suf = suf[:keep_suf]
            pre = pre[max(0, len(pre) - (budget - keep_suf)):]
        f = self.fim
        return [f["prefix"]["id"], *pre, f["suffix"]["id"], *suf, f["middle"]["id"]]

    def fit_prompt(self, ids: list[int], params: SamplingParams) -> list[int]:
        """Check a prompt against the vocabulary and the context window (truncating it only if asked)."""
        if len(ids) == 0:
            raise GptbcError("prompt is empty: give at least one token")
        self.check_ids(ids)
        need = len(ids) + params.max_new_tokens
        if need > self.context_window_size:
            room = self.context_window_size - params.max_new_tokens
            if params.truncate_prompt and room > 0:
                return ids[-room:]
            raise GptbcError(f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} = {need} exceeds "
                             f"the context window of {self.context_window_size} tokens "
                             f"(lower max_new_tokens, or set truncate_prompt to drop the oldest prompt tokens)")
        return ids

    def submit(self, prompt: str | Sequence[int] | None = None, *, prefix: str | None = None,
               suffix: str | None = None, params: SamplingParams | None = None):
        """Queue a request for the engine loop (`step`); bad input raises here and nothing is queued."""
        params = params or self.sampling()
        return self.scheduler.submit(self.prompt_ids(prompt, prefix, suffix, params), params)

    def step(self):
        """One engine-loop step over every queued and running request; returns the per-request events."""
        return self.scheduler.step()

    def complete(self, prompt: str | Sequence[int] | None = None, *, prefix: str | None = None,
                 suffix: str | None = None, greedy: bool | None = None, **sampling) -> "Completion":
        req = self.submit(prompt, prefix=prefix, suffix=suffix, params=self.sampling(greedy, **sampling))
        self.scheduler.run_until_done([req])
        return Completion.of(req)

    def generate(self, prompt_ids: str | Sequence[int] | None = None, max_new_tokens: int | None = None,
                 greedy: bool | None = True, *, prefix: str | None = None, suffix: str | None = None,
                 **sampling) -> list[int]:
        """New token ids (an eos that ended generation is included, as HF does). Greedy by default."""
        return self.complete(prompt_ids, prefix=prefix, suffix=suffix, greedy=greedy,
                             max_new_tokens=max_new_tokens, **sampling).token_ids

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int | None = None,
                       greedy: bool | None = True, **sampling) -> list[list[int]]:
        """Several prompts decoded together (continuous batching); same ids as one at a time."""
        params = self.sampling(greedy, max_new_tokens=max_new_tokens, **sampling)
        reqs = [self.submit(p, params=params) for p in prompts]
        self.scheduler.run_until_done(reqs)
        return [r.output_ids for r in reqs]

    def stream(self, prompt: str | Sequence[int] | None = None, *, prefix: str | None = None,
               suffix: str | None = None, greedy: bool | None = None, **sampling):
        """Yield text pieces as they are decoded (never half a UTF-8 character, never part of a stop string)."""
        if self.tokenizer is None:
            raise GptbcError(f"{self.model_dir}: no tokenizer files; streaming text needs one")
        req = self.submit(prompt, prefix=prefix, suffix=suffix, params=self.sampling(greedy, **sampling))
        try:
            while req.finish_reason is None:
                for event in self.step():
                    if event.request is req and event.text:
                        yield event.text
        finally:
            self.scheduler.cancel(req)  # a consumer that stops early frees the sequence

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise GptbcError(f"{self.model_dir}: no tokenizer files; pass token ids instead of text")
        return self.tokenizer.encode(text)

    def decode_text(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise GptbcError(f"{self.model_dir}: no tokenizer files; cannot turn ids into text")
        return self.tokenizer.decode([t for t in ids if t not in self.special_ids])


@dataclasses.dataclass
class Completion:
    """The result of one request."""

    token_ids: list[int]
    text: str | None
    logprobs: list[float] | None
    finish_reason: str
    prompt_tokens: int
    reused_prefix_tokens: int

    @classmethod
    def of(cls, req) -> "Completion":
        return cls(list(req.output_ids), req.text if req.detok is not None else None,
                   list(req.logprobs) if req.params.logprobs else None, req.finish_reason or "length",
                   len(req.prompt_ids), req.reused)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

