"""Attention kernels for batch-invariant GPU libraries (`gptbc compile --batch-invariant` for Vulkan,
WebGPU, Metal or CUDA): the CPU kernels' computation (kernels.py) with one GPU thread per (query, head).

TVM's GPU attention kernels tile queries and keys by their own rules (a ragged prefill walks its rows in
16 persistent blocks, a decode splits a sequence's keys across threads and sums their partial states in a
tree): where a row's keys are split, and so the bits of its result, depend on the call's other rows and
on whether the keys came from this chunk or from the cache. These compute each row exactly as the CPU
kernels do: one online-softmax pass over the keys of its own grain [G*floor(t/G), t] and one over the
keys before it, merged by `kernels._merge`, whose formula the race-free merge kernel
(`kernels.merge_state_inplace`, the one the KV cache calls on GPUs) computes per lane too. A thread
reads only its own row, so nothing depends on the number of rows or their order.

The cost is parallelism: a (query, head) pair is one thread walking its keys and the head dimension
serially, where TVM's kernels spread a pair over up to 128 threads. Prefill has rows x heads threads
(8192 at 512 tokens on santacoder), enough to fill a GPU; decode has batch x heads, far too few at batch 1
(BENCHMARKS.md, "Batch invariance"). Hence a mode, not the default.
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T

from gptbc.compile.kernels import _rows

THREADS = 64  # threads per block: (query, head) pairs side by side


@T.macro
def _find_sequence(indptr, row, batch_size, found):
    """found[0] <- the sequence whose rows [indptr[b], indptr[b+1]) hold `row` (a linear scan: batches are small)."""
    found[0] = 0
    for i in T.serial(batch_size):
        if indptr[i + 1] <= row:
            found[0] = i + 1


@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; libraries share shapes
def ragged_prefill_gpu(h_kv: int, h_q: int, d: int, dtype: str):
    """kernels.ragged_prefill_cpu on a GPU (TVM's `batch_prefill_ragged_kv` signature)."""
    row_attention = _rows(h_kv, h_q, d, dtype, gpu=True)[0]

    @T.prim_func(s_tir=True)
    def ragged_prefill(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
        var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_offset = T.int32()
        kv_indptr_offset = T.int32()
        q_rope_offset = T.int32()
        k_rope_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        for bx in T.thread_binding(T.ceildiv(qo_len * h_q, THREADS), thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    acc = T.sblock_alloc_buffer((d,), "float32", scope="local")
                    part = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    state = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    before = T.sblock_alloc_buffer((1, 1, d), dtype, scope="local")
                    before_lse = T.sblock_alloc_buffer((1, 1), "float32", scope="local")
                    scratch = T.sblock_alloc_buffer((5,), "float32", scope="local")
                    found = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    if bx * THREADS + tx < qo_len * h_q:
                        row: T.let[T.int32] = (bx * THREADS + tx) // h_q
                        h: T.let[T.int32] = (bx * THREADS + tx) % h_q
                        _find_sequence(q_indptr, row, batch_size, found)
                        b: T.let[T.int32] = found[0]
                        qi: T.let[T.int32] = row - q_indptr[b]
                        row_attention(acc, part, state, before, before_lse, scratch, q, k, v, q_indptr, kv_indptr,
                                      k_rope_pos_offset, output, lse, b, qi, row, h, causal, sm_scale)

    return ragged_prefill


@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; libraries share shapes
def paged_prefill_gpu(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = 16):
    """kernels.paged_prefill_cpu on a GPU (TVM's `batch_prefill_paged_kv` signature, no sliding window)."""
    row_attention = _rows(h_kv, h_q, d, dtype, page_size, gpu=True)[1]

    @T.prim_func(s_tir=True)
    def paged_prefill(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        pages_offset = T.int32()
        q_indptr_offset = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_info_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype, elem_offset=pages_offset)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")

        for bx in T.thread_binding(T.ceildiv(total_len * h_q, THREADS), thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    acc = T.sblock_alloc_buffer((d,), "float32", scope="local")
                    part = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    state = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    found = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    if bx * THREADS + tx < total_len * h_q:
                        row: T.let[T.int32] = (bx * THREADS + tx) // h_q
                        h: T.let[T.int32] = (bx * THREADS + tx) % h_q
                        _find_sequence(q_indptr, row, batch_size, found)
                        b: T.let[T.int32] = found[0]
                        qi: T.let[T.int32] = row - q_indptr[b]
                        row_attention(acc, part, state, q, q_indptr, pages, page_indptr, page_values, last_page_len,
                                      output, lse, b, qi, row, h, causal, sm_scale)

    return paged_prefill


@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; libraries share shapes
def paged_decode_gpu(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = 16):
    """kernels.paged_decode_cpu on a GPU (TVM's `batch_decode_paged_kv` signature, no sliding window)."""
    row_attention = _rows(h_kv, h_q, d, dtype, page_size, gpu=True)[2]

    @T.prim_func(s_tir=True)
    def paged_decode(
        var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle, var_page_values: T.handle,
        var_length_info: T.handle, var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
        var_output: T.handle, var_lse: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        pages_offset = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_info_offset = T.int32()
        q = T.match_buffer(var_q, (batch_size, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype, elem_offset=pages_offset)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (batch_size,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (batch_size, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, h_q), "float32")

        for bx in T.thread_binding(T.ceildiv(batch_size * h_q, THREADS), thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    acc = T.sblock_alloc_buffer((d,), "float32", scope="local")
                    part = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    state = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    before = T.sblock_alloc_buffer((1, 1, d), dtype, scope="local")
                    before_lse = T.sblock_alloc_buffer((1, 1), "float32", scope="local")
                    scratch = T.sblock_alloc_buffer((5,), "float32", scope="local")
                    if bx * THREADS + tx < batch_size * h_q:
                        b: T.let[T.int32] = (bx * THREADS + tx) // h_q
                        h: T.let[T.int32] = (bx * THREADS + tx) % h_q
                        row_attention(acc, part, state, before, before_lse, scratch, q, pages, page_indptr,
                                      page_values, last_page_len, k_rope_pos_offset, output, lse, b, h, sm_scale)

    return paged_decode


# TVM's GPU attention kernels, by their names in the module (the paged KV cache adds them for GPU targets)
RAGGED_PREFILL_GPU = "batch_prefill_ragged_kv"
PAGED_PREFILL_GPU = "batch_prefill_paged_kv"
PAGED_DECODE_GPU = "batch_decode_paged_kv"


def use_invariant_gpu_attention(mod, h_kv: int, h_q: int, d: int, dtype: str):
    """`mod` with the kernels above in place of TVM's GPU prefill/decode attention (where `mod` has them)."""
    import tvm

    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)  # a copy: the caller's module stays as it was
    names = [g.name_hint for g in mod.get_global_vars()]
    for name, make in ((RAGGED_PREFILL_GPU, ragged_prefill_gpu), (PAGED_PREFILL_GPU, paged_prefill_gpu),
                       (PAGED_DECODE_GPU, paged_decode_gpu)):
        if name in names:
            gv = mod.get_global_var(name)
            new = make(h_kv, h_q, d, dtype)
            symbol = (mod[gv].attrs or {}).get("global_symbol")
            mod[gv] = new.with_attr("global_symbol", symbol) if symbol is not None else new
    return mod
