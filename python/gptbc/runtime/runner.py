"""ModelRunner: a model library, its converted weights and the paged KV cache on one device.

Model calls on KV-cache sequences (add / fork / remove a sequence, prefill a chunk, decode, decode a
batch, verify) and nothing else: no text, no requests, no sampling. The scheduler drives it.
"""

from __future__ import annotations

import os
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from gptbc.artifact import manifest
from gptbc.artifact.config import GPTBC_CONFIG, GPTBigCodeConfig
from gptbc.errors import GptbcError
from gptbc.artifact.memory_plan import check_fits, default_kv_tokens, engine_kv_tokens
from gptbc.artifact.quantization import get_quantization, numpy_dtype
from gptbc.runtime import hugepages
from gptbc.runtime.devices import (WEBGPU_DEVICE_TYPE, check_library_arch, check_library_intact, parse_device,
                                   parse_device_kind)
from gptbc.artifact.safetensors_io import SafetensorsFile



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


def load_library(lib: str | Path, dev):
    """The library's Relax VM on `dev`, its manifest, and the loaded module (its compiled functions by name)."""
    import tvm
    from tvm import relax

    lib = Path(lib)
    if not lib.is_file():
        raise GptbcError(f"--lib {lib}: file not found")
    check_library_arch(lib)
    check_library_intact(lib)
    try:
        try:
            module = tvm.runtime.load_module(str(lib))
        except Exception as err:
            if "load_from_bytes.cuda" in str(err):  # TVM loads libtvm_runtime_cuda.so only where libcuda.so.1 is
                raise GptbcError(f"--lib {lib}: a CUDA library, and this TVM has no CUDA runtime (its "
                                 f"libtvm_runtime_cuda.so needs the NVIDIA driver's libcuda.so.1)") from None
            if "load_from_bytes.webgpu" not in str(err):
                raise
            from gptbc.runtime import webgpu  # a WGSL library (--target vulkan): load the runtime it needs, then retry

            webgpu.load_runtime()
            module = tvm.runtime.load_module(str(lib))
        vm = relax.VirtualMachine(module, dev)
        text = str(vm["_metadata"]())
    except GptbcError:
        raise
    except Exception as err:  # TVM raises its own error types for a foreign or broken file
        raise GptbcError(f"--lib {lib}: not a gptbc model library ({str(err).splitlines()[0][:200]})") from None
    meta = manifest.parse_library(text, lib)
    if dev.dlpack_device_type() == tvm.cuda(0).dlpack_device_type():
        from gptbc.runtime.cuda import check_runnable, local_sm

        check_runnable(meta, lib, local_sm())
    return vm, meta, module


def param_bytes(p: dict) -> int:
    """Bytes of one tensor a manifest lists ({"shape", "dtype"})."""
    return int(np.prod(p["shape"], dtype=np.int64)) * numpy_dtype(p["dtype"]).itemsize


def weight_bytes(info: dict) -> int:
    """Bytes of the converted weights, from their manifest."""
    return sum(param_bytes(p) for p in info["params"])


def load_params(model_dir: Path, info: dict, meta: dict, dev, vm=None, library=None) -> tuple[list, int]:
    """Weights in the library's load order, as device tensors; and how many bytes are mapped, not copied.

    On the CPU a tensor stored at the library's alignment (64 bytes; gptbc writes them so) is handed to TVM as
    a view of the memory-mapped file: no copy, no load time, and processes serving the same weights
    share the page cache. Anything else is copied to the device. A weight the library lists with a `repack`
    function (int8 activations: the tiled layout of kernels_int8.py) is replaced by that function's output,
    and its file pages are dropped; on the CPU that output lies in memory advised for huge pages (hugepages.py):
    the function's kernel (in `library`, the loaded module) writes it there, or else it is copied there.
    """
    import tvm

    on_cpu = dev.dlpack_device_type() == tvm.cpu(0).dlpack_device_type()
    arena = hugepages.arena_for([param_bytes(p) for p in meta["params"] if p.get("repack")]) if on_cpu else None
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
            view = _mapped_tensor(arr, int(meta["alignment"])) if on_cpu else None
            if p.get("repack"):
                src = view if view is not None else tvm.runtime.tensor(arr, dev)
                kernel = _repack_kernel(library, p["repack"]) if arena is not None else None
                if kernel is not None:
                    params.append(arena.empty(p["shape"], p["dtype"]))
                    kernel(src, params[-1])
                else:
                    out = vm[p["repack"]](src)
                    params.append(arena.place(out) if arena is not None else out)
                del src, view, arr
                f.release(p["name"])
                continue
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


def _repack_kernel(library, function: str):
    """The compiled kernel of a repack function (kernels_int8.add_repack_functions names it FUNCTION_kernel), which
    writes into a tensor the caller gives it; None where `library` is not at hand or lacks it."""
    if library is None:
        return None
    try:
        return library.get_function(f"{function}_kernel", query_imports=True)
    except Exception:  # noqa: BLE001 - TVM raises its own error type for a missing function
        return None


def _mapped_tensor(arr: np.ndarray, alignment: int):
    """A TVM tensor viewing `arr` (no copy), or None where TVM cannot take it (misaligned, bfloat16)."""
    import tvm

    if arr.size == 0 or arr.ctypes.data % alignment:
        return None
    try:
        return tvm.runtime.from_dlpack(arr)
    except Exception:  # noqa: BLE001 - e.g. a dtype numpy cannot export through DLPack: copy instead
        return None


def library_sizes(meta: dict, lib: Path, max_batch_size: int | None, max_total_seq_len: int | None
                  ) -> tuple[GPTBigCodeConfig, int, int, int, int]:
    """(config, context window, prefill chunk, max batch, KV-cache tokens) a runner of library `lib` works with:
    the library's own sizes, a smaller batch if asked (a larger one refused), the cache `max_total_seq_len` or
    by default memory_plan.DEFAULT_KV_RULE (ModelRunner bounds that default by the device's memory)."""
    config = GPTBigCodeConfig.from_dict(meta["model_config"], source=f"--lib {lib}")
    context, chunk = int(meta["context_window_size"]), int(meta["prefill_chunk_size"])
    batch = int(max_batch_size or meta["max_batch_size"])
    if not 0 < batch <= int(meta["max_batch_size"]):
        raise GptbcError(f"max batch size {batch}: --lib {lib} was compiled for 1..{meta['max_batch_size']} "
                         "(compile with a larger --max-batch-size)")
    return config, context, chunk, batch, engine_kv_tokens(context, batch, max_total_seq_len)


def prefill_in_chunks(runner, seq_id: int, ids: Sequence[int]) -> np.ndarray:
    """`runner.prefill`: `ids` appended in prefill_chunk_size calls; the logits of the last, float32[vocab]."""
    runner.check_ids(ids)
    logits = None
    for start in range(0, len(ids), runner.prefill_chunk_size):
        logits = runner.prefill_chunk(seq_id, ids[start:start + runner.prefill_chunk_size])
    return logits


class ModelRunner:
    """One loaded model on one device, with its KV cache."""

    def __init__(self, model_dir: str | Path, lib: str | Path, device: str = "cpu",
                 max_total_seq_len: int | None = None, max_batch_size: int | None = None):
        """`max_total_seq_len`: tokens the KV cache holds over all sequences (default: memory_plan.default_kv_tokens,
        context window x (min(4, max_batch_size) + 8) where the device's memory has room)."""
        import tvm

        self.model_dir, self.lib = Path(model_dir), Path(lib)
        if not (self.model_dir / GPTBC_CONFIG).is_file():
            raise GptbcError(f"{self.model_dir}: no {GPTBC_CONFIG} (convert weights with `gptbc convert-weight`)")
        self.info = manifest.read_weights(self.model_dir)
        self.dev = parse_device(device)
        self.vm, self.meta, library = load_library(self.lib, self.dev)
        kind = parse_device_kind(device)[0]
        if self.meta.get("device", "cpu") != kind:
            raise GptbcError(f"--lib {self.lib} was built for {self.meta.get('device')} "
                             f"(--target {self.meta.get('target')}), not for device {device!r}")
        self.on_cpu = kind == "cpu"
        if self.on_cpu:
            use_all_cores()
        manifest.check_compatible(self.meta, self.info, self.lib, self.model_dir)
        self.webgpu = self.dev.dlpack_device_type() == WEBGPU_DEVICE_TYPE
        if self.webgpu:  # binding limits, shader-f16, WGSL-addressable dtypes: before any weight is copied
            from gptbc.runtime import webgpu

            webgpu.check_model(self.meta, self.dev, self.lib)
        (self.config, self.context_window_size, self.prefill_chunk_size, self.max_batch_size,
         self.capacity_tokens) = library_sizes(self.meta, self.lib, max_batch_size, max_total_seq_len)
        sized = dataclasses.replace(self.config, max_batch_size=self.max_batch_size)
        scheme, weights = self.info["quantization"], weight_bytes(self.info)
        quant = get_quantization(scheme["name"], scheme.get("quantize_lm_head", True))
        if not max_total_seq_len:
            self.capacity_tokens = default_kv_tokens(sized, quant, device, weights)
        self.memory_plan = check_fits(sized, quant, device, self.capacity_tokens, weights)  # before allocating
        self.params, self.mapped_bytes = load_params(self.model_dir, self.info, self.meta, self.dev, self.vm,
                                                      library)
        self.page_size = int(self.meta["page_size"])  # the paged-attention kernels are built for it
        # On a GPU, greedy tokens are picked on the device (decode_batch_greedy) instead of copying
        # batch x vocab logits back; on the CPU a lone sequence decodes through the single-row kernels.
        self.samples_on_device = not self.on_cpu
        self.single_row_decode = self.on_cpu

        shape = tvm.runtime.ShapeTuple
        self.kv_cache = self.vm["create_paged_kv_cache"](
            shape([self.max_batch_size]), shape([self.capacity_tokens]), shape([self.prefill_chunk_size]),
            shape([self.page_size]), shape([0]))
        get = tvm.get_global_func
        self._add = get("vm.builtin.kv_state_add_sequence")
        self._remove = get("vm.builtin.kv_state_remove_sequence")
        self._fork = get("vm.builtin.kv_state_fork_sequence")
        self._popn = get("vm.builtin.kv_state_popn")
        self._begin = get("vm.builtin.kv_state_begin_forward")
        self._end = get("vm.builtin.kv_state_end_forward")
        self._free_pages = get("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._get_kv = get("vm.builtin.attention_kv_cache_debug_get_kv")
        self.kv_dtype = get_quantization(self.info["quantization"]["name"]).model_dtype
        # batch-invariant libraries: a row's attention splits at multiples of this (docs/determinism.md)
        self.attention_grain = self.meta.get("attention_grain")
        self.kv_pages_total = self.kv_pages_free()
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

    def fork_sequence(self, parent: int, length: int) -> int:
        """A new sequence sharing the first `length` tokens of `parent` (pages shared, not recomputed)."""
        child = self._next_seq_id
        self._next_seq_id += 1
        self._fork(self.kv_cache, parent, child, length)
        self._live.add(child)
        return child

    def copy_prefix(self, parent: int, length: int) -> int:
        """A new sequence holding a copy of the first `length` tokens' KV of `parent` in pages of its own
        (batch-invariant libraries). Unlike `fork_sequence`, which shares the pages, its later tokens attend
        all their keys in one sequence, so they get the bits a lone sequence gets."""
        import tvm

        if not self.attention_grain:
            raise GptbcError(f"--lib {self.lib}: compiled without --batch-invariant, it cannot copy a prefix")
        cfg = self.config
        shape = (cfg.n_layer, length, cfg.n_kv_head, cfg.head_dim)
        k, v = tvm.runtime.empty(shape, self.kv_dtype, self.dev), tvm.runtime.empty(shape, self.kv_dtype, self.dev)
        self._get_kv(self.kv_cache, parent, 0, length, k, v)
        k, v = k.numpy(), v.numpy()
        child = self.add_sequence()
        for start in range(0, length, self.prefill_chunk_size):
            end = min(start + self.prefill_chunk_size, length)
            rows = [tvm.runtime.tensor(np.ascontiguousarray(a[:, None, start:end]), self.dev) for a in (k, v)]
            self._begin(self.kv_cache, self._shape([child]), self._shape([end - start]))
            try:
                _out, self.kv_cache = self.vm["load_kv"](*rows, self.kv_cache)
            finally:
                self._end(self.kv_cache)
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
        return prefill_in_chunks(self, seq_id, ids)

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

    def verify_batch(self, seq_ids: Sequence[int], id_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """`verify` for several sequences in one call: per sequence, float32[len(ids), vocab]."""
        flat = [int(t) for ids in id_lists for t in ids]
        self.check_ids(flat)
        lengths = [len(ids) for ids in id_lists]
        embeds = self._embed(flat)._create_view((1, len(flat), self.config.n_embd))
        rows = self._forward("batch_verify", seq_ids, lengths, embeds).reshape(len(flat), -1)
        return np.split(rows, np.cumsum(lengths)[:-1])

    def pop_tokens(self, seq_id: int, n: int) -> None:
        """Drop the newest `n` tokens of a sequence from the KV cache (rejected speculative drafts)."""
        self._popn(self.kv_cache, seq_id, n)

    def _forward(self, func: str, seq_ids, lengths, embeds, *extra, to_host: bool = True):
        seq_ids = [seq_ids] if isinstance(seq_ids, int) else list(seq_ids)
        lengths = [lengths] if isinstance(lengths, int) else list(lengths)
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
