"""DiscoRunner: a tensor-parallel model (--tensor-parallel N) behind the scheduler's Runner protocol.

The model runs in a process of its own (disco_host.py: a disco session of N worker threads and gptbc's CPU
collectives); this runner, in the serving process, forwards each call over a pipe and returns worker 0's
logits. So the scheduler, prefix cache, prompt-lookup speculation, server and metrics use it exactly as they
use the single-device ModelRunner.

Faults: a worker that fails inside TVM ends its process (TVM calls std::terminate on a worker thread), not
this one. The call in flight then raises a one-line GptbcError (the scheduler fails the requests of that step,
the async engine stops serving with that message once it keeps failing), and every later call raises the
same error: the KV caches died with the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptbc.artifact.config import GPTBigCodeConfig
from gptbc.errors import GptbcError
from gptbc.runtime.runner import physical_cores, prefill_in_chunks

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the gptbc package


class DiscoRunner:
    """A model compiled for N tensor-parallel ranks, run by N disco workers in a child process."""

    def __init__(self, model_dir: str | Path, lib: str | Path, tensor_parallel: int, device: str = "cpu",
                 max_total_seq_len: int | None = None, max_batch_size: int | None = None):
        if device != "cpu":
            raise GptbcError(f"--device {device} with --tensor-parallel {tensor_parallel}: tensor-parallel runs are "
                             f"CPU-only in this gptbc (the NCCL collectives are built, not run; see README)")
        self.model_dir, self.lib, self.tensor_parallel = Path(model_dir), Path(lib), tensor_parallel
        self.dead: str | None = None
        self._start(tensor_parallel)
        d = self._call("open", str(self.model_dir), str(self.lib), tensor_parallel, max_total_seq_len, max_batch_size)
        self.info, self.meta = d["info"], d["meta"]
        self.config = GPTBigCodeConfig.from_dict(self.meta["model_config"], source=f"--lib {self.lib}")
        self.context_window_size, self.prefill_chunk_size = d["context_window_size"], d["prefill_chunk_size"]
        self.max_batch_size, self.capacity_tokens = d["max_batch_size"], d["capacity_tokens"]
        self.page_size, self.kv_pages_total = d["page_size"], d["kv_pages_total"]
        self.on_cpu = True
        self.samples_on_device = False  # CPU: logits come back anyway
        self.single_row_decode = False  # one library function (batch_decode) for every decode: fewer paths
        self._next_seq_id = 0
        self._live: set[int] = set()

    def _start(self, tp: int) -> None:
        """The host process, its threads split between the N workers (TVM_NUM_THREADS each)."""
        threads = int(os.environ.get("TVM_NUM_THREADS") or physical_cores())
        env = {**os.environ, "TVM_NUM_THREADS": str(max(1, threads // tp)),
               "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        to_host_r, to_host_w = os.pipe()
        from_host_r, from_host_w = os.pipe()
        self.process = subprocess.Popen([sys.executable, "-m", "gptbc.runtime.disco_host", str(to_host_r),
                                         str(from_host_w)], pass_fds=(to_host_r, from_host_w), env=env,
                                        stdin=subprocess.DEVNULL)
        os.close(to_host_r)
        os.close(from_host_w)
        self._send_conn = Connection(to_host_w, readable=False)
        self._recv_conn = Connection(from_host_r, writable=False)

    def _call(self, method: str, *args: Any) -> Any:
        if self.dead is not None:
            raise GptbcError(self.dead)
        try:
            self._send_conn.send((method, args))
            status, result = self._recv_conn.recv()
        except (EOFError, OSError):
            self.dead = self._death(method)
            raise GptbcError(self.dead) from None
        if status == "error":
            raise GptbcError(result)
        return result

    def _death(self, method: str) -> str:
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return (f"--tensor-parallel {self.tensor_parallel}: the worker process (pid {self.process.pid}) died "
                f"during {method} ({how}); its KV caches are lost, restart the engine")

    def close(self) -> None:
        """End the host process (its session and weights)."""
        if self.dead is None and self.process.poll() is None:
            try:
                self._call("close")
            except GptbcError:
                pass
        self.dead = self.dead or f"--tensor-parallel {self.tensor_parallel}: the runner is closed"
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __del__(self) -> None:
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.kill()

    # ---- KV cache: sequences (ids are numbered here, as ModelRunner numbers them) ----
    def add_sequence(self) -> int:
        seq_id = self._next_seq_id
        self._call("add_sequence", seq_id)
        self._next_seq_id += 1
        self._live.add(seq_id)
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        if seq_id in self._live:
            self._call("remove_sequence", seq_id)
            self._live.discard(seq_id)

    def fork_sequence(self, parent: int, length: int) -> int:
        child = self._next_seq_id
        self._call("fork_sequence", parent, child, length)
        self._next_seq_id += 1
        self._live.add(child)
        return child

    def copy_prefix(self, parent: int, length: int) -> int:
        """Only batch-invariant serving copies prefixes, and it is single-device (the engine refuses both)."""
        raise GptbcError(f"--tensor-parallel {self.tensor_parallel}: batch-invariant prefix copies are single-device")

    def sequence_count(self) -> int:
        return len(self._live)

    def kv_pages_free(self) -> int:
        return int(self._call("kv_pages_free"))

    def pop_tokens(self, seq_id: int, n: int) -> None:
        self._call("pop_tokens", seq_id, n)

    # ---- forward passes ----
    def prefill(self, seq_id: int, ids: Sequence[int]) -> np.ndarray:
        """Append `ids` to the sequence (in prefill_chunk_size chunks); logits of the last one, float32[vocab]."""
        return prefill_in_chunks(self, seq_id, ids)

    def prefill_chunk(self, seq_id: int, chunk: Sequence[int]) -> np.ndarray:
        chunk = [int(t) for t in chunk]
        return self._call("forward", "prefill", [seq_id], [len(chunk)], chunk).reshape(-1)

    def decode(self, seq_id: int, token: int) -> np.ndarray:
        self.check_ids([token])
        return self._call("forward", "decode", [seq_id], [1], [int(token)]).reshape(-1)

    def prefill_batch(self, seq_ids: Sequence[int], id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        flat = [int(t) for ids in id_lists for t in ids]
        self.check_ids(flat)
        lengths = [len(ids) for ids in id_lists]
        if min(lengths, default=0) == 0 or len(flat) > self.prefill_chunk_size:
            raise GptbcError(f"prefill_batch: each sequence needs >= 1 token and the total ({len(flat)}) must fit "
                             f"prefill_chunk_size {self.prefill_chunk_size}")
        return self._call("forward", "batch_prefill", list(seq_ids), lengths, flat).reshape(len(seq_ids), -1)

    def decode_batch(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        self.check_ids(tokens)
        rows = self._call("forward", "batch_decode", list(seq_ids), [1] * len(tokens), [int(t) for t in tokens])
        return rows.reshape(len(seq_ids), -1)

    def decode_batch_greedy(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> list[int]:
        self.check_ids(tokens)
        return self._call("forward", "batch_decode", list(seq_ids), [1] * len(tokens), [int(t) for t in tokens],
                          True).tolist()

    def verify(self, seq_id: int, ids: Sequence[int]) -> np.ndarray:
        self.check_ids(ids)
        return self._call("forward", "batch_verify", [seq_id], [len(ids)], [int(t) for t in ids]).reshape(len(ids), -1)

    def verify_batch(self, seq_ids: Sequence[int], id_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
        flat = [int(t) for ids in id_lists for t in ids]
        self.check_ids(flat)
        lengths = [len(ids) for ids in id_lists]
        rows = self._call("forward", "batch_verify", list(seq_ids), lengths, flat).reshape(len(flat), -1)
        return np.split(rows, np.cumsum(lengths)[:-1])

    def check_ids(self, ids: Sequence[int]) -> None:
        vocab = self.config.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= int(t) < vocab:
                raise GptbcError(f"token id {int(t)} at position {i} is outside the vocabulary (0..{vocab - 1})")
