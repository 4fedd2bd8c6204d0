"""The process that holds a tensor-parallel model: a TVM disco session of N worker threads, one rank each, with
gptbc's CPU collectives (native/ccl/cpu_ccl.cc) between them.

It runs as `python -m gptbc.runtime.disco_host READ_FD WRITE_FD`, started by disco_runner.DiscoRunner, and
answers its calls (`Request`: a method name and arguments) one at a time over that pipe. Why a process of
its own: an error on a disco worker thread calls std::terminate (apache-tvm 0.27), which must end this
process, never the server that uses the model; the runner sees the pipe close and fails the request.

Each call is the single-device ModelRunner's, spread over the workers: token ids copied to worker 0 and
broadcast (a CCL broadcast), the same library function called on every worker with its own weights and KV
cache, and the logits read from worker 0 (every rank computes the same replicated logits).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from gptbc.artifact import manifest
from gptbc.errors import GptbcError
from gptbc.runtime.runner import library_sizes

CCL = "gptbc_cpu"  # the collectives native/ccl/cpu_ccl.cc registers: runtime.disco.gptbc_cpu.*
CCL_LIBRARY = "libgptbc_ccl_cpu.so"
_load_errors: dict[int, str] = {}  # rank → why loading its weights failed (read by the controller)


def open_disco():
    """tvm.runtime.disco, importable, with the CCL registered: the one place the wheel's disco defects are
    worked around (apache-tvm 0.27.0.post1).

    - `tvm.runtime.disco` is None after `import tvm`: its `_ffi_api` was imported before libtvm_runtime_extra
      (which registers the disco types and functions) was loaded, and failed ("Cannot find object type index
      for runtime.disco.DRef"). Dropping the half-made modules and importing again works (process_pool, which
      registers a global function, must stay: importing it twice fails).
    - `Session.init_ccl` accepts only "nccl" and "rccl": `init_ccl` below calls the FFI function it wraps.
    """
    import tvm  # noqa: F401 - loads the runtime libraries

    for name in ("tvm.runtime.disco", "tvm.runtime.disco._ffi_api", "tvm.runtime.disco.session"):
        sys.modules.pop(name, None)
    disco = importlib.import_module("tvm.runtime.disco")
    _load_ccl()
    return disco


def init_ccl(sess, tp: int) -> None:
    """Session.init_ccl for our CCL name (the wheel's Python refuses any but nccl/rccl: see open_disco)."""
    from tvm.runtime.disco import _ffi_api
    from tvm_ffi import Shape

    _ffi_api.SessionInitCCL(sess, CCL, Shape(list(range(tp))))


def _load_ccl() -> None:
    """Load libgptbc_ccl_cpu (GPTBC_CCL_LIBRARY, else built with CMake from the checkout, see ccl_build.py)."""
    import ctypes

    import tvm

    if tvm.get_global_func(f"runtime.disco.{CCL}.init_ccl", allow_missing=True) is not None:
        return
    from gptbc.runtime.ccl_build import ccl_library

    ctypes.CDLL(str(ccl_library()), mode=ctypes.RTLD_GLOBAL)  # its static initializer registers the functions


def _register_loader() -> None:
    """gptbc.tp.load_params, run on every worker thread: that rank's weights, from its own files."""
    import tvm
    import tvm_ffi

    from gptbc.runtime.runner import load_params

    @tvm_ffi.register_global_func("gptbc.tp.load_params", override=True)
    def load(model_dir: str, info_json: str, meta_json: str, vm) -> list:
        rank = int(tvm.get_global_func("runtime.disco.worker_rank")())
        try:
            info = json.loads(info_json)
            info["params"] = [{**p, "file": manifest.rank_file(p["file"], rank)} for p in info["params"]]
            return load_params(Path(model_dir), info, json.loads(meta_json), tvm.cpu(0), vm)[0]
        except Exception as err:  # noqa: BLE001 - an exception here would std::terminate the worker thread
            _load_errors[rank] = str(err).splitlines()[0] if str(err) else type(err).__name__
            return []


class TensorParallelModel:
    """A model library of one rank (compiled with --tensor-parallel N) on N disco workers, with its KV caches."""

    def __init__(self, model_dir: str, lib: str, tp: int, max_total_seq_len: int | None,
                 max_batch_size: int | None):
        import tvm

        disco = open_disco()
        self.model_dir, self.lib, self.tp = Path(model_dir), Path(lib), tp
        self.info = manifest.read_weights(self.model_dir)
        self.meta = _library_meta(self.lib)
        manifest.check_compatible(self.meta, self.info, self.lib, self.model_dir, tp)
        if self.meta.get("device", "cpu") != "cpu":
            raise GptbcError(f"--lib {self.lib} was built for {self.meta.get('device')}; tensor parallelism runs "
                             f"on the CPU here (the NCCL collectives are built, not run: see README)")
        (self.config, self.context_window_size, self.prefill_chunk_size, self.max_batch_size,
         self.capacity_tokens) = library_sizes(self.meta, self.lib, max_batch_size, max_total_seq_len)
        self.page_size = int(self.meta["page_size"])
        self.dtype = self.meta["quantization"]["model_dtype"]

        self.sess = disco.ThreadedSession(tp)
        init_ccl(self.sess, tp)
        self.mod = self.sess.load_vm_module(str(self.lib))
        _register_loader()
        self.params = self.sess.call_packed(self.sess.get_global_func("gptbc.tp.load_params"), str(self.model_dir),
                                            json.dumps(self.info), json.dumps(self.meta), self.mod)
        self.sess._sync_all()
        if _load_errors:
            rank, why = min(_load_errors.items())
            raise GptbcError(f"{self.model_dir}: rank {rank}'s weights: {why}")
        shape = tvm.runtime.ShapeTuple
        self.kv = self.mod["create_paged_kv_cache"](shape([self.max_batch_size]), shape([self.capacity_tokens]),
                                                    shape([self.prefill_chunk_size]), shape([self.page_size]),
                                                    shape([0]))
        func = self.sess.get_global_func
        self._f = {name: func(full) for name, full in (
            ("add", "vm.builtin.kv_state_add_sequence"), ("remove", "vm.builtin.kv_state_remove_sequence"),
            ("fork", "vm.builtin.kv_state_fork_sequence"), ("popn", "vm.builtin.kv_state_popn"),
            ("begin", "vm.builtin.kv_state_begin_forward"), ("end", "vm.builtin.kv_state_end_forward"),
            ("free", "vm.builtin.attention_kv_cache_get_num_available_pages"),
            ("view", "runtime.TVMTensorCreateView"), ("item", "ffi.ArrayGetItem"))}
        self._shape = shape
        self.kv_pages_total = self.kv_pages_free()

    def describe(self) -> dict[str, Any]:
        """What the runner in the serving process needs to know about the model."""
        return {"info": self.info, "meta": self.meta, "context_window_size": self.context_window_size,
                "prefill_chunk_size": self.prefill_chunk_size, "max_batch_size": self.max_batch_size,
                "capacity_tokens": self.capacity_tokens, "page_size": self.page_size,
                "kv_pages_total": self.kv_pages_total}

    # ---- KV cache: the same call on every worker ----
    def add_sequence(self, seq_id: int) -> None:
        self.sess.call_packed(self._f["add"], self.kv, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self.sess.call_packed(self._f["remove"], self.kv, seq_id)

    def fork_sequence(self, parent: int, child: int, length: int) -> None:
        self.sess.call_packed(self._f["fork"], self.kv, parent, child, length)

    def pop_tokens(self, seq_id: int, n: int) -> None:
        self.sess.call_packed(self._f["popn"], self.kv, seq_id, n)

    def kv_pages_free(self) -> int:
        return int(self.sess.call_packed(self._f["free"], self.kv).debug_get_from_remote(0))

    # ---- forward passes: (function, sequences, their new-token counts, the ids, rows of logits wanted) ----
    def forward(self, func: str, seq_ids: Sequence[int], lengths: Sequence[int], ids: Sequence[int],
                greedy: bool = False) -> np.ndarray:
        """Append `ids` (the sequences' new tokens, concatenated) and return float32 logits, or the greedy
        ids with `greedy` (the library's argmax on worker 0's logits)."""
        s, e = self.sess, self.config.n_embd
        s.call_packed(self._f["begin"], self.kv, self._shape(list(seq_ids)), self._shape(list(lengths)))
        try:
            embeds = self.mod["embed"](s.broadcast(np.asarray(ids, dtype=np.int32)), self.params)
            rows = len(seq_ids) if func == "batch_decode" else 1
            embeds = s.call_packed(self._f["view"], embeds, self._shape([rows, len(ids) // rows, e]), self.dtype, 0)
            extra = []
            if func == "batch_prefill":  # the row of each sequence's last token
                extra = [s.broadcast(np.cumsum(lengths).astype(np.int32) - 1)]
            logits = s.call_packed(self._f["item"], self.mod[func](embeds, *extra, self.kv, self.params), 0)
            if greedy:
                logits = s.call_packed(self._f["view"], logits, self._shape([len(seq_ids), self.config.vocab_size]),
                                       "float32", 0)
                return self.mod["argmax"](logits).debug_get_from_remote(0).numpy()
            return logits.debug_get_from_remote(0).numpy()
        finally:
            s.call_packed(self._f["end"], self.kv)

    def close(self) -> None:
        self.sess.shutdown()


def _library_meta(lib: Path) -> dict[str, Any]:
    """The library's `_metadata`, read on this (controller) thread before any worker loads it."""
    from gptbc.runtime.runner import load_library
    import tvm

    return load_library(lib, tvm.cpu(0))[1]


def serve(conn: Connection | SimpleNamespace) -> None:
    """Answer (method, args) calls until "close" or the pipe closes. The first call is "open"."""
    model: TensorParallelModel | None = None
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            return
        try:
            if method == "open":
                model = TensorParallelModel(*args)
                result: Any = model.describe()
            elif method == "close":
                if model is not None:
                    model.close()
                conn.send(("ok", None))
                return
            else:
                result = getattr(model, method)(*args)
            conn.send(("ok", result))
        except GptbcError as err:
            conn.send(("error", str(err)))
        except Exception as err:  # noqa: BLE001 - reported to the runner, which fails the request
            traceback.print_exc()
            conn.send(("error", f"tensor-parallel {method}: {type(err).__name__}: {str(err).splitlines()[0][:300]}"))


def main() -> None:
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    conn_in, conn_out = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    serve(SimpleNamespace(recv=conn_in.recv, send=conn_out.send))  # one pipe each way


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    main()
