"""Our CPU prefill attention kernels: the ragged one against TVM's, the paged one against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu
from tvm.script import tirx as T

from gptbc.compile.kernels import paged_decode_cpu, ragged_prefill_cpu

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def run(func, q, q_indptr, k, v, kv_indptr, causal, sm_scale):
    kernel = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros_like(q), dev)
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32), dev)
    zeros_q = tvm.runtime.tensor(np.zeros(q.shape[0], np.int32), dev)
    zeros_b = tvm.runtime.tensor(np.zeros(len(q_indptr) - 1, np.int32), dev)
    t = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    kernel(t(q), t(q_indptr), t(k), t(v), t(kv_indptr), zeros_q, zeros_b, out, lse, causal, 0, 1.0, 1e4, sm_scale)
    return out.numpy().astype(np.float32), lse.numpy()


@pytest.mark.parametrize("h_q, h_kv, d, dtype", [(4, 1, 32, "float32"), (4, 2, 48, "float32"), (3, 3, 16, "float16")])
@pytest.mark.parametrize("causal", [1, 0])
def test_ragged_prefill_matches_tvm(h_q, h_kv, d, dtype, causal):
    rng = np.random.default_rng(d + causal)
    q_lens, kv_lens = [5, 1, 19], [5, 3, 19]  # the middle sequence attends to 2 earlier tokens too
    q = rng.standard_normal((sum(q_lens), h_q, d)).astype(dtype)
    k = rng.standard_normal((sum(kv_lens), h_kv, d)).astype(dtype)
    v = rng.standard_normal((sum(kv_lens), h_kv, d)).astype(dtype)
    q_indptr = np.cumsum([0, *q_lens]).astype(np.int32)
    kv_indptr = np.cumsum([0, *kv_lens]).astype(np.int32)
    theirs = _attention_prefill_ragged_cpu(h_kv, h_q, d, d, dtype, {})
    ours = ragged_prefill_cpu(h_kv, h_q, d, dtype)
    want_out, want_lse = run(theirs, q, q_indptr, k, v, kv_indptr, causal, d ** -0.5)
    got_out, got_lse = run(ours, q, q_indptr, k, v, kv_indptr, causal, d ** -0.5)
    tol = 2e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(got_out, want_out, atol=tol, rtol=tol)
    np.testing.assert_allclose(got_lse, want_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("spelling", ["cpu", "aarch64-linux"])
def test_compiled_cpu_model_uses_our_kernel(spelling):
    """The target table's CPU pipeline swaps our kernels in (the compile driver applies that hook)."""
    from gptbc.compile.compiler import export_relax
    from gptbc.artifact.config import GPTBigCodeConfig
    from gptbc.artifact.quantization import get_quantization
    from gptbc.compile.targets import get_target

    cfg = GPTBigCodeConfig(n_embd=64, n_head=2, n_layer=1, n_positions=32, vocab_size=50)
    q = get_quantization("q0f32")
    mod, _, _ = export_relax(cfg, q, TARGET)
    swapped = get_target(spelling)[0].pipeline.replace_kernels(mod, cfg, q, TARGET)
    for name in ("batch_prefill_ragged_kv", "batch_prefill_paged_kv_cpu", "batch_decode_paged_kv_cpu"):
        assert "T.parallel" not in mod[name].script()  # TVM's kernels: serial loops
        assert "T.parallel" in swapped[name].script()


def reference(q, k, v, causal, sm_scale):
    """One sequence: softmax attention of q [n, h_q, d] over k, v [m, h_kv, d]; (output, lse in log2 units)."""
    n, h_q, _ = q.shape
    m, h_kv, _ = k.shape
    kk, vv = np.repeat(k.astype(np.float64), h_q // h_kv, 1), np.repeat(v.astype(np.float64), h_q // h_kv, 1)
    s = np.einsum("nhd,mhd->hnm", q.astype(np.float64), kk) * sm_scale
    if causal:
        s = np.where(np.arange(m)[None, :] <= m - n + np.arange(n)[:, None], s, -np.inf)
    top = s.max(-1, keepdims=True)
    p = np.exp(s - top)
    out = np.einsum("hnm,mhd->nhd", p / p.sum(-1, keepdims=True), vv)
    lse = (np.log(p.sum(-1)) + top[..., 0]) / np.log(2)
    return out, lse.T


@pytest.mark.parametrize("h_q, h_kv, d, dtype", [(4, 1, 32, "float32"), (2, 2, 16, "float32"), (4, 2, 16, "float16")])
@pytest.mark.parametrize("causal", [1, 0])
def test_paged_prefill_matches_reference(h_q, h_kv, d, dtype, causal):
    from gptbc.compile.kernels import paged_prefill_cpu

    rng = np.random.default_rng(d + causal)
    page = 16
    q_lens, kv_lens = [3, 7, 1], [37, 7, 16]  # kv holds the q tokens too (last), as the KV cache calls it
    n_pages = [-(-n // page) for n in kv_lens]
    pages = rng.standard_normal((sum(n_pages) + 2, 2, h_kv, page, d)).astype(dtype)
    order = rng.permutation(len(pages))[:sum(n_pages)].astype(np.int32)  # pages scattered in the pool
    q = rng.standard_normal((sum(q_lens), h_q, d)).astype(dtype)
    q_indptr = np.cumsum([0, *q_lens]).astype(np.int32)
    page_indptr = np.cumsum([0, *n_pages]).astype(np.int32)
    last_len = np.array([n - (p - 1) * page for n, p in zip(kv_lens, n_pages)], np.int32)
    kernel = tvm.compile(tvm.IRModule({"main": paged_prefill_cpu(h_kv, h_q, d, dtype)}), target=TARGET)
    t = lambda a: tvm.runtime.tensor(a, tvm.cpu())  # noqa: E731
    out, lse = t(np.zeros_like(q)), t(np.zeros(q.shape[:2], np.float32))
    kernel(t(q), t(q_indptr), t(pages), t(page_indptr), t(order), t(last_len), t(np.zeros(3, np.int32)),
           t(np.zeros(len(q), np.int32)), out, lse, causal, 0, 1.0, 1e4, d ** -0.5)
    tol = 3e-3 if dtype == "float16" else 1e-5
    for b in range(3):
        rows = order[page_indptr[b]:page_indptr[b + 1]]
        k = pages[rows, 0].transpose(0, 2, 1, 3).reshape(-1, h_kv, d)[:kv_lens[b]]
        v = pages[rows, 1].transpose(0, 2, 1, 3).reshape(-1, h_kv, d)[:kv_lens[b]]
        want_out, want_lse = reference(q[q_indptr[b]:q_indptr[b + 1]], k, v, causal, d ** -0.5)
        sl = slice(q_indptr[b], q_indptr[b + 1])
        np.testing.assert_allclose(out.numpy()[sl].astype(np.float32), want_out, atol=tol, rtol=tol)
        np.testing.assert_allclose(lse.numpy()[sl], want_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("h_q, h_kv, d, dtype", [(4, 1, 32, "float32"), (2, 2, 16, "float32"), (4, 2, 16, "float16")])
def test_paged_decode_matches_reference_and_tvm(h_q, h_kv, d, dtype):
    """One new token per sequence over its scattered pages (1 to 3 pages, a full last page, a one-token one); each
    task walks all the query heads of a key head (heads_per_task = the group)."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    from gptbc.compile.kernels import paged_decode_cpu

    rng = np.random.default_rng(d)
    page = 16
    kv_lens = [37, 16, 1, 20]
    n_pages = [-(-n // page) for n in kv_lens]
    pages = rng.standard_normal((sum(n_pages) + 2, 2, h_kv, page, d)).astype(dtype)
    order = rng.permutation(len(pages))[:sum(n_pages)].astype(np.int32)
    q = rng.standard_normal((len(kv_lens), h_q, d)).astype(dtype)
    page_indptr = np.cumsum([0, *n_pages]).astype(np.int32)
    last_len = np.array([n - (p - 1) * page for n, p in zip(kv_lens, n_pages)], np.int32)
    t = lambda a: tvm.runtime.tensor(a, tvm.cpu())  # noqa: E731
    outs = []
    for func in (paged_decode_cpu(h_kv, h_q, d, dtype, heads_per_task=h_q // h_kv),
                 _attention_decode_cpu(h_kv, h_q, d, dtype, False, {})):
        kernel = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
        out, lse = t(np.zeros_like(q)), t(np.zeros(q.shape[:2], np.float32))
        zeros = t(np.zeros(len(kv_lens), np.int32))
        kernel(t(q), t(pages), t(page_indptr), t(order), t(last_len), zeros, zeros, out, lse, 0, 1.0, 1e4, d ** -0.5)
        outs.append((out.numpy().astype(np.float32), lse.numpy()))
    tol = 3e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=tol, rtol=tol)  # TVM's (it leaves lse unwritten)
    for b in range(len(kv_lens)):
        rows = order[page_indptr[b]:page_indptr[b + 1]]
        k = pages[rows, 0].transpose(0, 2, 1, 3).reshape(-1, h_kv, d)[:kv_lens[b]]
        v = pages[rows, 1].transpose(0, 2, 1, 3).reshape(-1, h_kv, d)[:kv_lens[b]]
        want_out, want_lse = reference(q[b:b + 1], k, v, 0, d ** -0.5)
        np.testing.assert_allclose(outs[0][0][b:b + 1], want_out, atol=tol, rtol=tol)
        np.testing.assert_allclose(outs[0][1][b:b + 1], want_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("spelling, target", [("vulkan", {"kind": "webgpu"}), ("webgpu", {"kind": "webgpu"}),
                                              ("cuda", {"kind": "cuda", "arch": "sm_80"})])
def test_gpu_targets_compile_the_race_free_merge(spelling, target):
    """GPUs get kernels.merge_state_inplace for TVM's attention-state merge (docs/targets.md, Problem 3): a
    barrier between every thread's read of the lse and its one write. Every other kernel stays TVM's."""
    from gptbc.compile.compiler import export_relax
    from gptbc.artifact.config import GPTBigCodeConfig
    from gptbc.compile.kernels import MERGE_STATE
    from gptbc.artifact.quantization import get_quantization
    from gptbc.compile.targets import get_target

    cfg = GPTBigCodeConfig(n_embd=64, n_head=2, n_layer=1, n_positions=32, vocab_size=50)
    q = get_quantization("q0f32")
    target = tvm.target.Target({**target, "host": TARGET})
    mod, _, _ = export_relax(cfg, q, target)
    swapped = get_target(spelling)[0].pipeline.replace_kernels(mod, cfg, q, target)
    assert "tvm_storage_sync" not in mod[MERGE_STATE].script()
    assert "tvm_storage_sync" in swapped[MERGE_STATE].script()
    kept = [gv for gv in mod.functions if gv.name_hint != MERGE_STATE]
    assert kept and all(swapped[gv.name_hint].same_as(mod[gv]) for gv in kept)


@pytest.mark.parametrize("spelling, target", [("vulkan", {"kind": "webgpu"}), ("cuda", {"kind": "cuda", "arch": "sm_80"}),
                                              ("metal", {"kind": "metal"})])
def test_gpu_batch_invariant_builds_swap_attention_and_drop_gemv(spelling, target):
    """A --batch-invariant GPU library gets kernels_gpu's attention (one thread per row and head, the CPU's
    fixed grain) and schedule rules without GEMV; a plain one keeps TVM's attention and dlight's GEMV."""
    from gptbc.artifact.config import GPTBigCodeConfig
    from gptbc.artifact.quantization import get_quantization
    from gptbc.compile import kernels_gpu
    from gptbc.compile.compiler import export_relax
    from gptbc.compile.schedules import OneOrderMatmul, gpu_rules
    from gptbc.compile.targets import get_target
    from tvm.s_tir import dlight as dl

    cfg = GPTBigCodeConfig(n_embd=96, n_head=3, n_layer=1, n_positions=32, vocab_size=50)
    q = get_quantization("q0f32")
    target = tvm.target.Target({**target, "host": TARGET})
    mod, _, _ = export_relax(cfg, q, target, batch_invariant=True)
    pipeline = get_target(spelling)[0].pipeline
    plain, invariant = pipeline.replace_kernels(mod, cfg, q, target), pipeline.replace_kernels(mod, cfg, q, target, True)
    for name in (kernels_gpu.RAGGED_PREFILL_GPU, kernels_gpu.PAGED_PREFILL_GPU, kernels_gpu.PAGED_DECODE_GPU):
        assert plain[name].same_as(mod[name]) and not invariant[name].same_as(mod[name])
        assert "blockIdx.x" in invariant[name].script() and "threadIdx.y" not in invariant[name].script()
    kinds = lambda rules: {type(r) for r in rules}  # noqa: E731
    assert dl.gpu.GEMV in kinds(gpu_rules()) and OneOrderMatmul not in kinds(gpu_rules())
    assert dl.gpu.GEMV not in kinds(gpu_rules(True)) and dl.gpu.LowBatchGEMV not in kinds(gpu_rules(True))
    assert OneOrderMatmul in kinds(gpu_rules(True))


def compiled(func):
    """`func` built for the CPU, callable on numpy arrays (int and float scalars passed through)."""
    kernel = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    dev = tvm.cpu()

    def call(*args):
        tensors = [tvm.runtime.tensor(a, dev) if isinstance(a, np.ndarray) else a for a in args]
        kernel(*tensors)
        return [t.numpy() for t in tensors if isinstance(t, tvm.runtime.Tensor)]

    return call


def paged(k, v, page=16):
    """k, v [n, h_kv, d] as KV pages [pages, 2, h_kv, page, d] in a scrambled pool, and the pool's page order."""
    n, h_kv, d = k.shape
    count = -(-n // page)
    pool = np.zeros((count + 1, 2, h_kv, page, d), k.dtype)
    order = np.random.default_rng(n).permutation(count + 1)[:count].astype(np.int32)
    for i, at in enumerate(order):
        keys = slice(i * page, min(n, (i + 1) * page))
        pool[at, 0, :, :keys.stop - keys.start] = k[keys].transpose(1, 0, 2)
        pool[at, 1, :, :keys.stop - keys.start] = v[keys].transpose(1, 0, 2)
    return pool, order


@pytest.mark.parametrize("h_q, h_kv, d, dtype", [(4, 1, 32, "float32"), (4, 2, 16, "float16")])
@pytest.mark.parametrize("causal", [1, 0])
def test_ragged_prefill_over_many_blocks_matches_reference(h_q, h_kv, d, dtype, causal):
    """Sequences long enough for several 16-key blocks per row, one of them a chunk that starts at position
    21 (its blocks start at 32, 48, ..., not at the chunk's start) and one with 3 earlier keys."""
    rng = np.random.default_rng(7 + causal)
    q_lens, kv_lens, starts = [70, 45, 38], [70, 45, 41], [0, 21, 37]
    q = rng.standard_normal((sum(q_lens), h_q, d)).astype(dtype)
    k = rng.standard_normal((sum(kv_lens), h_kv, d)).astype(dtype)
    v = rng.standard_normal((sum(kv_lens), h_kv, d)).astype(dtype)
    q_indptr = np.cumsum([0, *q_lens]).astype(np.int32)
    kv_indptr = np.cumsum([0, *kv_lens]).astype(np.int32)
    ragged = compiled(ragged_prefill_cpu(h_kv, h_q, d, dtype))
    out, lse = ragged(q, q_indptr, k, v, kv_indptr, np.zeros(len(q), np.int32), np.array(starts, np.int32),
                      np.zeros_like(q), np.zeros(q.shape[:2], np.float32), causal, 0, 1.0, 1e4, d ** -0.5)[-2:]
    tol = 3e-3 if dtype == "float16" else 1e-5
    for b in range(len(q_lens)):
        rows, keys = slice(q_indptr[b], q_indptr[b + 1]), slice(kv_indptr[b], kv_indptr[b + 1])
        want_out, want_lse = reference(q[rows], k[keys], v[keys], causal, d ** -0.5)
        np.testing.assert_allclose(out[rows].astype(np.float32), want_out, atol=tol, rtol=tol)
        np.testing.assert_allclose(lse[rows], want_lse, atol=tol, rtol=tol)


def test_a_row_gets_the_same_bits_however_its_keys_arrive():
    """The determinism the kernels are built for (docs/determinism.md), over several blocks of keys: rows of a
    75-token prompt computed (a) in one ragged call from position 0, (b) as a chunk starting at the grain
    boundary 64 (ragged) plus the cached pages [0, 64) (paged prefill), merged as the KV cache merges, and
    (c) one by one by the decode kernel over their pages. Bit for bit equal."""
    from gptbc.compile.kernels import merge_state_cpu, paged_decode_cpu, paged_prefill_cpu

    h_q, h_kv, d, n, g = 4, 1, 32, 75, 64
    rng = np.random.default_rng(3)
    q = rng.standard_normal((n, h_q, d)).astype(np.float32)
    k = rng.standard_normal((n, h_kv, d)).astype(np.float32)
    v = rng.standard_normal((n, h_kv, d)).astype(np.float32)
    scale, i32 = d ** -0.5, lambda x: np.array(x, np.int32)  # noqa: E731
    ragged = compiled(ragged_prefill_cpu(h_kv, h_q, d, "float32"))
    empty = lambda rows: (np.zeros((rows, h_q, d), np.float32), np.zeros((rows, h_q), np.float32))  # noqa: E731
    zeros = lambda rows: i32(np.zeros(rows))  # noqa: E731
    whole, whole_lse = ragged(q, i32([0, n]), k, v, i32([0, n]), zeros(n), i32([0]), *empty(n), 1, 0, 1.0, 1e4,
                              scale)[-2:]

    new, new_lse = ragged(q[g:], i32([0, n - g]), k[g:], v[g:], i32([0, n - g]), zeros(n - g), i32([g]),
                          *empty(n - g), 1, 0, 1.0, 1e4, scale)[-2:]
    pool, order = paged(k[:g], v[:g])
    old, old_lse = compiled(paged_prefill_cpu(h_kv, h_q, d, "float32"))(
        q[g:], i32([0, n - g]), pool, i32([0, len(order)]), order, i32([16]), i32([0]), zeros(n - g),
        *empty(n - g), 0, 0, 1.0, 1e4, scale)[-2:]
    merged, merged_lse = compiled(merge_state_cpu(h_q, d, "float32"))(new, new_lse, old, old_lse)[:2]
    np.testing.assert_array_equal(merged, whole[g:])
    np.testing.assert_array_equal(merged_lse, whole_lse[g:])

    rows = [15, 16, 33, 47, 63, 64, 70, 74]  # last keys at, before and after block boundaries
    pool, order = paged(k, v)
    n_pages = [t // 16 + 1 for t in rows]
    for heads_per_task in (1, 2, 4):  # query heads walking the shared key head together: the same bits
        decoded, decoded_lse = compiled(paged_decode_cpu(h_kv, h_q, d, "float32", heads_per_task=heads_per_task))(
            q[rows], pool, i32(np.cumsum([0, *n_pages])), i32(np.concatenate([order[:p] for p in n_pages])),
            i32([t % 16 + 1 for t in rows]), zeros(len(rows)), zeros(len(rows)), *empty(len(rows)),
            0, 1.0, 1e4, scale)[-2:]
        np.testing.assert_array_equal(decoded, whole[rows])
        np.testing.assert_array_equal(decoded_lse, whole_lse[rows])


def test_compaction_runs_on_block_kernels_only():
    """Inside the build, S-TIR's CompactBufferAllocation still shrinks a block's oversized buffer, and leaves
    a plain-TIR kernel (ours: nothing to compact, and the pass's analysis of them cost seconds) as it was."""
    from tvm import s_tir

    from gptbc.compile.compiler import compact_block_kernels

    @T.prim_func(s_tir=True)
    def blocks(a: T.Buffer((8,), "float32"), b: T.Buffer((8,), "float32")):
        for i in range(8):
            with T.sblock("copy"):  # opaque (no block iterators), as the pass expects them
                tmp = T.sblock_alloc_buffer((64,), "float32")  # one element is used
                tmp[0] = a[i]
                b[i] = tmp[0]

    plain = paged_decode_cpu(1, 4, 32, "float32")
    with compact_block_kernels():
        compact = s_tir.transform.CompactBufferAllocation()
        out = compact(tvm.IRModule({"blocks": blocks, "plain": plain}))
    assert out["plain"].same_as(plain)
    assert "(1,)" in out["blocks"].script() and "(64,)" not in out["blocks"].script()


def test_decode_heads_per_task_keeps_a_task_per_core():
    from gptbc.compile.kernels import decode_heads_per_task

    assert decode_heads_per_task(1, 16, 2) == 8  # santacoder on 2 cores: 2 tasks of 8 heads
    assert decode_heads_per_task(1, 16, 16) == 1 and decode_heads_per_task(1, 48, 2) == 8
    assert decode_heads_per_task(16, 16, 2) == 1 and decode_heads_per_task(2, 4, 1) == 2  # multi-head: its group


def test_kernels_parse_to_the_same_tir_with_the_light_stack_walks():
    """tvmscript.install() (macro calls and T.prim_func without inspect's full stacks) is in place on this TVM, and
    the kernels it parses (macros, closures, nested prim_funcs) are the TIR that TVM's own lookups give."""
    from gptbc.compile import kernels_int8 as ki
    from gptbc.compile import tvmscript

    assert tvmscript.installed(), "TVM's parser is not the one tvmscript.py was written against: check it"
    makers = [lambda: ki.int8_matmul_cpu.__wrapped__(96, 40, 4, "vnni512", "float32", "float32", "float32", True,
                                                     "gelu_tanh"),
              lambda: ki.int8_matmul_cpu.__wrapped__(64, 16, 6, "generic", "float32", "float32", "float32", False,
                                                     None, False, 32),
              lambda: paged_decode_cpu.__wrapped__(1, 4, 32, "float32")]
    light = [make().script() for make in makers]
    tvmscript.uninstall()
    try:
        assert not tvmscript.installed()
        assert [make().script() for make in makers] == light
    finally:
        tvmscript.install()
    assert tvmscript.installed()
