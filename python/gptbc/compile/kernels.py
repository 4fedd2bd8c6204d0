"""Hand-written TIR kernels that replace TVM's where TVM's are slow (the CPU pipeline in targets.py swaps
them in before lowering).

TVM's CPU kernels for prefill attention — over the new tokens (ragged) and over a sequence's cached
pages (paged) — are serial scalar loop nests that also compute every masked score: at santacoder's
shape the ragged one took 42% of a 512-token prefill (4.2 of 9.9 s, one thread). Ours compute the same
output and log-sum-exp with the rows in parallel, only the causally visible keys visited, in blocks of
16 keys (`_blocked`): a block's 16 scores at once, one online-softmax rescale per block, exp2 over 16
lanes, and 16-lane vector loops over the head dimension. A prefill task runs all query heads of a row
that share a KV head (all of them in the multi-query models), so a block's keys are read from memory
once for them.

They also make a row's result independent of how the KV cache split its keys (docs/determinism.md). The
cache attends a chunk's new tokens (ragged kernel) and the pages cached before it (paged kernel) apart and
merges the two results; a merge is not bit-equal to one pass. So every kernel computes a row at absolute
position t the same way: one pass over the keys of its own grain [G*floor(t/G), t] and one over the keys
before that grain, merged by `merge` (the formula of the CPU merge kernel, which we also replace). A chunk
that starts at position 0 holds both parts; one that starts at a grain boundary and stays in that grain
holds the first, the pages the second, and the cache's merge is then ours: the same bits either way. A
pass walks blocks that start at absolute multiples of G, in every kernel, so its blocks are the same
whichever kernel runs it.
"""

from __future__ import annotations

import functools
import math

from tvm import tirx
from tvm.script import tirx as T

from gptbc.compile import tvmscript

tvmscript.install()  # our kernels parse faster (tvmscript.py)

LANES = 16  # float32 lanes of a 512-bit vector; LLVM splits it on narrower machines
# TVM's CPU kernels we replace, by their names in the module (the paged KV cache adds them for llvm targets)
RAGGED_PREFILL_CPU = "batch_prefill_ragged_kv"
PAGED_PREFILL_CPU = "batch_prefill_paged_kv_cpu"
PAGED_DECODE_CPU = "batch_decode_paged_kv_cpu"
MERGE_STATE_CPU = "merge_state_inplace_cpu"
GRAIN = 16  # keys per grain (one KV page): the boundary between a row's two attention parts
# sm_scale below 0 means "append these keys and values, attend nothing" (model.load_kv: a prefix copied
# into a sequence of its own, runner.copy_prefix); the kernels then write an empty result.
APPEND_ONLY = -1.0


def _at(buf, index: tuple, last):
    """buf[*index, last], built while TVMScript parses (index tuples differ between the kernels)."""
    return buf[(*index, last)]


# 2^f on [0, 1): least-squares polynomial on Chebyshev nodes, highest power first (relative error 3e-9 before
# float32 rounding)
EXP2_POLY = (2.1877504861145066e-04, 1.2387821452037003e-03, 9.684580455198733e-03, 5.548042632448746e-02,
             2.4023050204520563e-01, 6.931469286930263e-01, 1.0000000025868887)


def _exp2(x):
    """2^x for x <= 0 (a score minus the running maximum) in float32, without a call: TVM lowers `exp2` to
    scalar libm calls, two per key, which were most of a prefill's attention time. 2^x = 2^n * 2^f with
    n = floor(x), f in [0, 1); below 2^-126 the result is flushed to that (it multiplies sums that are >= 1)."""
    x = tirx.max(x, tirx.const(-126.0, "float32"))
    n = tirx.floor(x)
    f = x - n
    p = tirx.const(EXP2_POLY[0], "float32")
    for c in EXP2_POLY[1:]:
        p = p * f + tirx.const(c, "float32")
    scale = tirx.reinterpret("float32", (tirx.Cast("int32", n) + 127) << 23)
    return p * scale


def _lane_sum(v):
    """The sum of a 16-lane vector as a tree of vector adds (a serial sum is a 16-add dependency chain)."""
    width = LANES
    while width > 1:
        width //= 2
        v = tirx.Shuffle([v], list(range(width))) + tirx.Shuffle([v], list(range(width, 2 * width)))
    return v


def _online_softmax(d: int, gpu: bool = False):
    """Macros shared by the kernels: `start` resets one (query, head)'s state; `visit` folds in one key
    (its row of `k`/`v` given by index expressions); `finish` writes the output and lse. `gpu`: one thread
    runs a (query, head) pair, its loops over the head dimension serial (kernels_gpu.py)."""
    chunks = d // LANES
    log2e = math.log2(math.e)
    vec = T.serial if gpu else T.vectorized

    @T.macro
    def start(acc, state):
        state[0] = T.float32(-5e4)  # running max score (log2 domain)
        state[1] = T.float32(0)  # running sum of exp2(score - max)
        for i in vec(d):
            acc[i] = T.float32(0)

    @T.macro
    def fold(acc, state, v, v_at):
        """Fold the key whose score is in state[2] into the running max, sum and output."""
        state[3] = _exp2(state[0] - T.max(state[0], state[2]))  # rescale of what was summed so far
        state[0] = T.max(state[0], state[2])
        state[2] = _exp2(state[2] - state[0])
        state[1] = state[1] * state[3] + state[2]
        for i in vec(d):
            acc[i] = acc[i] * state[3] + state[2] * T.Cast("float32", _at(v, v_at, i))

    @T.macro
    def visit_gpu(acc, part, state, q, q_at, k, k_at, v, v_at, sm_scale):
        part[0] = T.float32(0)
        for i in T.serial(d):
            part[0] = part[0] + T.Cast("float32", _at(q, q_at, i)) * T.Cast("float32", _at(k, k_at, i))
        state[2] = part[0] * sm_scale * T.float32(log2e)  # this key's score
        fold(acc, state, v, v_at)

    @T.macro
    def visit(acc, part, state, q, q_at, k, k_at, v, v_at, sm_scale):
        for lane in T.vectorized(LANES):
            part[lane] = T.float32(0)
        for c in T.serial(chunks):
            for lane in T.vectorized(LANES):
                part[lane] = part[lane] + T.Cast("float32", _at(q, q_at, c * LANES + lane)) * T.Cast(
                    "float32", _at(k, k_at, c * LANES + lane))
        state[2] = _lane_sum(part[T.ramp(0, 1, LANES)]) * sm_scale * T.float32(log2e)  # this key's score
        fold(acc, state, v, v_at)

    @T.macro
    def finish(acc, state, output, lse, row, h, dtype):
        for i in vec(d):
            output[row, h, i] = T.Cast(dtype, T.if_then_else(state[1] > 0, acc[i] / state[1], T.float32(0)))
        lse[row, h] = T.if_then_else(state[1] > 0, state[0] + T.log2(state[1]), T.float32(-5e4))

    return start, visit_gpu if gpu else visit, finish


def _merge(d: int, gpu: bool = False):
    """(output, lse)[row, h] <- its merge with (other at `other_at`, other_lse): the one formula every
    kernel here merges two attention results with (TVM's CPU merge kernel's, vectorized over d; serial
    in one thread on a GPU, where `merge_state_inplace` computes the same per lane)."""
    vec = T.serial if gpu else T.vectorized

    @T.macro
    def merge(output, lse, row, h, other, other_at, other_lse, scratch, dtype):
        scratch[0] = T.max(lse[row, h], other_lse)
        scratch[1] = T.exp2(lse[row, h] - scratch[0])
        scratch[2] = T.exp2(other_lse - scratch[0])
        scratch[3] = scratch[1] / (scratch[1] + scratch[2])
        scratch[4] = scratch[2] / (scratch[1] + scratch[2])
        for i in vec(d):
            output[row, h, i] = T.Cast(dtype, T.Cast("float32", output[row, h, i]) * scratch[3]
                                       + T.Cast("float32", _at(other, other_at, i)) * scratch[4])
        lse[row, h] = T.log2(scratch[1] + scratch[2]) + scratch[0]

    return merge


def _grain_split(t, first):
    """How many of a row's keys (the first at absolute position `first`) lie before the grain of its own
    position `t`: those go to the second pass."""
    return T.max(T.floordiv(t, GRAIN) * GRAIN - first, 0)


def _lane_max(v):
    """The largest lane of a 16-lane vector, as a tree of vector maxima (a max is exact in any order)."""
    width = LANES
    while width > 1:
        width //= 2
        v = tirx.max(tirx.Shuffle([v], list(range(width))), tirx.Shuffle([v], list(range(width, 2 * width))))
    return v


def _pair_sum(a, b, width: int):
    """One level of the transposed lane sum: `a` and `b` hold 16 / width keys' partial sums, `width` lanes
    each; the result holds both vectors' keys (a's first), width / 2 lanes each, lane i of a key plus its
    lane i + width / 2. Four levels from width 16 sum 16 vectors' lanes, each by `_lane_sum`'s tree."""
    half = width // 2
    low = [seg * width + i for seg in range(LANES // width) for i in range(half)]
    low += [LANES + i for i in low]  # the second vector's segments, after the first's
    return tirx.Shuffle([a, b], low) + tirx.Shuffle([a, b], [i + half for i in low])


def _inside(pos, lo, hi):
    """`pos` moved into [lo, hi): the key a masked lane of a block reads (any valid one does)."""
    return tirx.min(tirx.max(pos, lo), hi - 1)


def _block_count(lo, hi):
    """How many blocks of 16 keys, starting at multiples of 16, hold the keys [lo, hi)."""
    return tirx.if_then_else(hi > lo, tirx.floordiv(hi - tirx.floordiv(lo, GRAIN) * GRAIN + GRAIN - 1, GRAIN), 0)


def _blocked(d: int, page_size: int | None = None):
    """The CPU kernels' attention pass in blocks of keys (flash-attention style): `attend` runs one pass
    over the keys at absolute positions [lo, hi) for `heads` query heads of one row, and writes each head's
    normalized output and lse. A pass walks blocks of 16 keys that start at multiples of 16 (the grain: one
    KV page), whoever calls it, so a row's floating-point operations depend on lo, hi and the keys only,
    never on the chunk or batch around it. Per block and head: the 16 scores at once (`_pair_sum`),
    their maximum, one rescale of the running sum and output, exp2 over the 16 lanes, then the values
    folded in key order (vectorized over d). Keys outside [lo, hi) in a block are read from a valid row,
    masked to probability 0 and skipped when values are folded. The heads of a row share each block's keys
    in cache, which is why a task runs a row's heads together.

    Keys come from `k`/`v` rows `base + position` (ragged: page_size None) or from KV pages, the page of a
    position at `kv_map[base + position // page_size]`."""
    chunks = d // LANES
    log2e = math.log2(math.e)

    def key_at(kv_map, base, kh, pos, which: int):
        if page_size is None:
            return (base + pos, kh)
        return (kv_map[base + pos // page_size], which, kh, pos % page_size)

    @T.macro
    def block(acc, st, pair, part, sc, prob, reg, tmp, q, row, h, hh, k, v, kv_map, base, kh, s, lo, hi, sm_scale):
        """Fold keys [max(lo, s), min(hi, s + 16)) into head h's state (slot hh of acc and st)."""
        # per key, 16-lane partial products summed over d in order (a key outside [lo, hi) reads a valid one),
        # two keys at a time, their lanes then summed pairwise (part: 8 rows of 512 bytes stay on the stack)
        for j in T.unroll(LANES // 2):
            for i in T.vectorized(LANES):
                pair[0, i] = T.float32(0)
                pair[1, i] = T.float32(0)
            for c in T.unroll(chunks):
                for i in T.vectorized(LANES):
                    pair[0, i] = pair[0, i] + T.Cast("float32", q[row, h, c * LANES + i]) * T.Cast(
                        "float32", _at(k, key_at(kv_map, base, kh, _inside(s + 2 * j, lo, hi), 0), c * LANES + i))
                    pair[1, i] = pair[1, i] + T.Cast("float32", q[row, h, c * LANES + i]) * T.Cast(
                        "float32", _at(k, key_at(kv_map, base, kh, _inside(s + 2 * j + 1, lo, hi), 0), c * LANES + i))
            part[j, T.ramp(0, 1, LANES)] = _pair_sum(pair[0, T.ramp(0, 1, LANES)], pair[1, T.ramp(0, 1, LANES)], 16)
        # then the other levels of the lane sums, all 16 keys at once: part[0] <- the 16 sums, key j in lane j
        for j in T.unroll(4):
            part[j, T.ramp(0, 1, LANES)] = _pair_sum(part[2 * j, T.ramp(0, 1, LANES)],
                                                     part[2 * j + 1, T.ramp(0, 1, LANES)], 8)
        for j in T.unroll(2):
            part[j, T.ramp(0, 1, LANES)] = _pair_sum(part[2 * j, T.ramp(0, 1, LANES)],
                                                     part[2 * j + 1, T.ramp(0, 1, LANES)], 4)
        part[0, T.ramp(0, 1, LANES)] = _pair_sum(part[0, T.ramp(0, 1, LANES)], part[1, T.ramp(0, 1, LANES)], 2)
        for j in T.vectorized(LANES):
            sc[j] = part[0, j] * sm_scale * T.float32(log2e)  # this block's scores (log2 domain)
        for j in T.vectorized(LANES):
            sc[j] = T.if_then_else(s + j >= lo and s + j < hi, sc[j], T.float32(-3e38))
        tmp[0] = T.max(st[hh, 0], _lane_max(sc[T.ramp(0, 1, LANES)]))  # the new running max
        tmp[1] = _exp2(st[hh, 0] - tmp[0])  # rescale of what was summed so far
        for j in T.vectorized(LANES):
            prob[j] = T.if_then_else(s + j >= lo and s + j < hi, _exp2(sc[j] - tmp[0]), T.float32(0))
        st[hh, 1] = st[hh, 1] * tmp[1] + _lane_sum(prob[T.ramp(0, 1, LANES)])
        st[hh, 0] = tmp[0]
        # the output accumulates in `reg` (constant indices: registers), not in acc's row of the heads' array
        for c in T.unroll(chunks):
            for i in T.vectorized(LANES):
                reg[c * LANES + i] = acc[hh, c * LANES + i] * tmp[1]
        for j in T.serial(T.max(lo - s, 0), T.min(hi - s, LANES)):
            for c in T.unroll(chunks):
                for i in T.vectorized(LANES):
                    reg[c * LANES + i] = reg[c * LANES + i] + prob[j] * T.Cast(
                        "float32", _at(v, key_at(kv_map, base, kh, s + j, 1), c * LANES + i))
        for c in T.unroll(chunks):
            for i in T.vectorized(LANES):
                acc[hh, c * LANES + i] = reg[c * LANES + i]

    @T.macro
    def attend(acc, st, pair, part, sc, prob, reg, tmp, q, row, h0, heads, k, v, kv_map, base, kh, lo, hi, sm_scale,
               out, out_lse, out_row, out_h0, dtype):
        """One pass of heads h0 .. h0 + heads - 1 of `row` over keys [lo, hi); out[out_row, out_h0 + i] and
        out_lse[out_row, out_h0 + i] <- head h0 + i's output and lse."""
        for hh in T.serial(heads):
            st[hh, 0] = T.float32(-5e4)  # running max score (log2 domain)
            st[hh, 1] = T.float32(0)  # running sum of exp2(score - max)
            for i in T.vectorized(d):
                acc[hh, i] = T.float32(0)
        for blk in T.serial(_block_count(lo, hi)):
            for hh in T.serial(heads):
                block(acc, st, pair, part, sc, prob, reg, tmp, q, row, h0 + hh, hh, k, v, kv_map, base, kh,
                      (T.floordiv(lo, GRAIN) + blk) * GRAIN, lo, hi, sm_scale)
        for hh in T.serial(heads):
            for i in T.vectorized(d):
                out[out_row, out_h0 + hh, i] = T.Cast(
                    dtype, T.if_then_else(st[hh, 1] > 0, acc[hh, i] / st[hh, 1], T.float32(0)))
            out_lse[out_row, out_h0 + hh] = T.if_then_else(
                st[hh, 1] > 0, st[hh, 0] + T.log2(st[hh, 1]), T.float32(-5e4))

    return attend


def _rows(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = 16, gpu: bool = False):
    """The per-(query, head) computation of each kernel, one key at a time, as macros the GPU kernels
    (kernels_gpu.py) run inside their own loops: (ragged, paged prefill, paged decode). A row's buffers
    (acc, part, state, before, before_lse, scratch) are allocated by the caller. (The CPU kernels below
    compute the same split in blocks of keys, `_blocked`; `gpu=False` is these macros' vectorized form.)"""
    group = h_q // h_kv
    start, visit, finish = _online_softmax(d, gpu)
    merge = _merge(d, gpu)

    @T.macro
    def ragged(acc, part, state, before, before_lse, scratch, q, k, v, q_indptr, kv_indptr, k_rope_pos_offset,
               output, lse, b, qi, row, h, causal, sm_scale):
        kv_n: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
        # keys this query may see: all of them, or (causal) up to its own position, the new tokens being the
        # last qo_n of the kv_n
        visible: T.let[T.int32] = T.if_then_else(
            causal > 0, T.min(kv_n - (q_indptr[b + 1] - q_indptr[b]) + qi + 1, kv_n), kv_n)
        # this row's absolute position, and how many of its keys lie before its grain
        split: T.let[T.int32] = T.min(_grain_split(
            k_rope_pos_offset[b] + visible - 1, k_rope_pos_offset[b]), T.max(visible, 0))
        start(acc, state)
        for j in T.serial(split, T.if_then_else(sm_scale < 0, split, T.max(visible, 0))):
            at = (kv_indptr[b] + j, h // group)
            visit(acc, part, state, q, (row, h), k, at, v, at, sm_scale)
        finish(acc, state, output, lse, row, h, dtype)
        if split > 0 and sm_scale >= 0:
            start(acc, state)
            for j in T.serial(split):
                at = (kv_indptr[b] + j, h // group)
                visit(acc, part, state, q, (row, h), k, at, v, at, sm_scale)
            finish(acc, state, before, before_lse, 0, 0, dtype)
            merge(output, lse, row, h, before, (0, 0), before_lse[0, 0], scratch, dtype)

    @T.macro
    def paged_prefill(acc, part, state, q, q_indptr, pages, page_indptr, page_values, last_page_len, output, lse,
                      b, qi, row, h, causal, sm_scale):
        n_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
        kv_n: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
        visible: T.let[T.int32] = T.if_then_else(
            causal > 0, T.min(kv_n - (q_indptr[b + 1] - q_indptr[b]) + qi + 1, kv_n), kv_n)
        start(acc, state)
        for j in T.serial(T.if_then_else(sm_scale < 0, 0, T.max(visible, 0))):
            page: T.let[T.int32] = page_values[page_indptr[b] + j // page_size]
            visit(acc, part, state, q, (row, h), pages, (page, 0, h // group, j % page_size),
                  pages, (page, 1, h // group, j % page_size), sm_scale)
        finish(acc, state, output, lse, row, h, dtype)

    @T.macro
    def decode(acc, part, state, before, before_lse, scratch, q, pages, page_indptr, page_values, last_page_len,
               k_rope_pos_offset, output, lse, b, h, sm_scale):
        n_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
        kv_n: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
        split: T.let[T.int32] = T.min(_grain_split(k_rope_pos_offset[b] + kv_n - 1, k_rope_pos_offset[b]), kv_n)
        start(acc, state)
        for j in T.serial(split, T.if_then_else(sm_scale < 0, split, kv_n)):
            page: T.let[T.int32] = page_values[page_indptr[b] + j // page_size]
            visit(acc, part, state, q, (b, h), pages, (page, 0, h // group, j % page_size),
                  pages, (page, 1, h // group, j % page_size), sm_scale)
        finish(acc, state, output, lse, b, h, dtype)
        if split > 0 and sm_scale >= 0:
            start(acc, state)
            for j in T.serial(split):
                page: T.let[T.int32] = page_values[page_indptr[b] + j // page_size]
                visit(acc, part, state, q, (b, h), pages, (page, 0, h // group, j % page_size),
                      pages, (page, 1, h // group, j % page_size), sm_scale)
            finish(acc, state, before, before_lse, 0, 0, dtype)
            merge(output, lse, b, h, before, (0, 0), before_lse[0, 0], scratch, dtype)

    return ragged, paged_prefill, decode


@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; libraries share shapes
def ragged_prefill_cpu(h_kv: int, h_q: int, d: int, dtype: str):
    """Causal self-attention of each sequence's new tokens, TVM's `batch_prefill_ragged_kv` signature.

    Scores are kept in the log2 domain (scaled by log2 e) and `lse` is log2(sum exp2), as TVM's kernels
    do, because the KV cache merges this result with attention over earlier pages through `lse`.
    Rotary embedding is not applied: gptbc's models use learned positions (RopeMode.NONE).
    """
    group = h_q // h_kv
    attend = _blocked(d)
    merge = _merge(d)

    @T.prim_func
    def ragged_prefill(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
        var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})  # plain TIR: no schedule rule applies, no block to lower
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

        for b in T.serial(batch_size):
            for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * h_kv):
                acc = T.alloc_buffer((group, d), "float32")
                st = T.alloc_buffer((group, 2), "float32")  # per head: running max, sum
                pair = T.alloc_buffer((2, LANES), "float32")
                part = T.alloc_buffer((LANES // 2, LANES), "float32")  # the keys' partial sums
                sc = T.alloc_buffer((LANES,), "float32")
                prob = T.alloc_buffer((LANES,), "float32")
                reg = T.alloc_buffer((d,), "float32")
                tmp = T.alloc_buffer((2,), "float32")
                before = T.alloc_buffer((1, group, d), dtype)  # the keys before the row's grain
                before_lse = T.alloc_buffer((1, group), "float32")
                scratch = T.alloc_buffer((5,), "float32")
                q_n: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                kv_n: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                # tasks alternate between the first and last rows: a thread's contiguous share of the
                # tasks then holds short and long rows alike (causal rows grow with their position)
                r: T.let[T.int32] = task // h_kv
                qi: T.let[T.int32] = T.if_then_else(r % 2 == 0, r // 2, q_n - 1 - r // 2)
                kh: T.let[T.int32] = task % h_kv
                row: T.let[T.int32] = q_indptr[b] + qi
                first: T.let[T.int32] = k_rope_pos_offset[b]  # absolute position of the sequence's first key
                # keys this query may see: all of them, or (causal) up to its own position, the new tokens
                # being the last q_n of the kv_n
                visible: T.let[T.int32] = T.max(T.if_then_else(
                    causal > 0, T.min(kv_n - q_n + qi + 1, kv_n), kv_n), 0)
                # how many of its keys lie before the grain of its absolute position
                split: T.let[T.int32] = T.min(_grain_split(first + visible - 1, first), visible)
                end: T.let[T.int32] = T.if_then_else(sm_scale < 0, first + split, first + visible)
                attend(acc, st, pair, part, sc, prob, reg, tmp, q, row, kh * group, group, k, v, k,
                       kv_indptr[b] - first, kh, first + split, end, sm_scale, output, lse, row, kh * group, dtype)
                if split > 0 and sm_scale >= 0:
                    attend(acc, st, pair, part, sc, prob, reg, tmp, q, row, kh * group, group, k, v, k,
                           kv_indptr[b] - first, kh, first, first + split, sm_scale, before, before_lse, 0, 0,
                           dtype)
                    for hh in T.serial(group):
                        merge(output, lse, row, kh * group + hh, before, (0, hh), before_lse[0, hh], scratch,
                              dtype)

    return ragged_prefill


@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; libraries share shapes
def paged_prefill_cpu(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = 16):
    """Attention of new tokens to a sequence's cached pages, TVM's `batch_prefill_paged_kv_cpu` signature
    (no sliding window). The KV cache calls it for tokens whose sequence already holds KV: a prompt
    longer than one prefill chunk, a prompt forked from a cached prefix, speculative verification."""
    group = h_q // h_kv
    attend = _blocked(d, page_size)

    @T.prim_func
    def paged_prefill(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})  # plain TIR: no schedule rule applies, no block to lower
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_offset = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_info_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")

        for b in T.serial(batch_size):
            for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * h_kv):
                acc = T.alloc_buffer((group, d), "float32")
                st = T.alloc_buffer((group, 2), "float32")
                pair = T.alloc_buffer((2, LANES), "float32")
                part = T.alloc_buffer((LANES // 2, LANES), "float32")  # the keys' partial sums
                sc = T.alloc_buffer((LANES,), "float32")
                prob = T.alloc_buffer((LANES,), "float32")
                reg = T.alloc_buffer((d,), "float32")
                tmp = T.alloc_buffer((2,), "float32")
                q_n: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                r: T.let[T.int32] = task // h_kv  # rows alternate first / last, as in the ragged kernel
                qi: T.let[T.int32] = T.if_then_else(r % 2 == 0, r // 2, q_n - 1 - r // 2)
                kh: T.let[T.int32] = task % h_kv
                row: T.let[T.int32] = q_indptr[b] + qi
                n_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
                kv_n: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
                visible: T.let[T.int32] = T.if_then_else(
                    causal > 0, T.min(kv_n - q_n + qi + 1, kv_n), kv_n)
                attend(acc, st, pair, part, sc, prob, reg, tmp, q, row, kh * group, group, pages, pages,
                       page_values, page_indptr[b], kh, 0, T.if_then_else(sm_scale < 0, 0, T.max(visible, 0)),
                       sm_scale, output, lse, row, kh * group, dtype)

    return paged_prefill


@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; libraries share shapes
def paged_decode_cpu(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = 16, heads_per_task: int = 1):
    """One new token per sequence attending to its cached pages, TVM's `batch_decode_paged_kv_cpu` signature
    (no sliding window). TVM's loops over sequences and heads serially with scalar code and libm exp2: at
    batch 16 it was 29% of a santacoder decode step. Here (sequence, group of query heads) pairs run in
    parallel: `heads_per_task` query heads sharing one key head walk its blocks of keys together, so a block
    is read once for all of them (santacoder's 16 query heads share one), each head's arithmetic the same as
    alone (the same bits whatever the grouping). decode_heads_per_task picks it."""
    group = h_q // h_kv
    hpt = heads_per_task
    assert group % hpt == 0, (group, hpt)
    tasks_per_row = h_q // hpt
    attend = _blocked(d, page_size)
    merge = _merge(d)

    @T.prim_func
    def paged_decode(
        var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle, var_page_values: T.handle,
        var_length_info: T.handle, var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
        var_output: T.handle, var_lse: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})  # plain TIR: no schedule rule applies, no block to lower
        batch_size = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_info_offset = T.int32()
        q = T.match_buffer(var_q, (batch_size, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (batch_size,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (batch_size, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, h_q), "float32")

        for task in T.parallel(batch_size * tasks_per_row):
            acc = T.alloc_buffer((hpt, d), "float32")
            st = T.alloc_buffer((hpt, 2), "float32")
            pair = T.alloc_buffer((2, LANES), "float32")
            part = T.alloc_buffer((LANES // 2, LANES), "float32")
            sc = T.alloc_buffer((LANES,), "float32")
            prob = T.alloc_buffer((LANES,), "float32")
            reg = T.alloc_buffer((d,), "float32")
            tmp = T.alloc_buffer((2,), "float32")
            before = T.alloc_buffer((1, hpt, d), dtype)
            before_lse = T.alloc_buffer((1, hpt), "float32")
            scratch = T.alloc_buffer((5,), "float32")
            b: T.let[T.int32] = task // tasks_per_row
            h: T.let[T.int32] = task % tasks_per_row * hpt  # the task's first query head
            n_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
            kv_n: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
            split: T.let[T.int32] = T.min(_grain_split(k_rope_pos_offset[b] + kv_n - 1, k_rope_pos_offset[b]), kv_n)
            attend(acc, st, pair, part, sc, prob, reg, tmp, q, b, h, hpt, pages, pages, page_values, page_indptr[b],
                   h // group, split, T.if_then_else(sm_scale < 0, split, kv_n), sm_scale, output, lse, b, h,
                   dtype)
            if split > 0 and sm_scale >= 0:
                attend(acc, st, pair, part, sc, prob, reg, tmp, q, b, h, hpt, pages, pages, page_values,
                       page_indptr[b], h // group, 0, split, sm_scale, before, before_lse, 0, 0, dtype)
                for hh in T.serial(hpt):
                    merge(output, lse, b, h + hh, before, (0, hh), before_lse[0, hh], scratch, dtype)

    return paged_decode


def decode_heads_per_task(h_kv: int, h_q: int, cores: int) -> int:
    """Query heads per decode task: as many of a key head's as share it (at most 8, a divisor of the group),
    while one sequence still makes a task per core (a batch of one keeps every core busy). Santacoder on 2
    cores: 8 (its 16 heads in 2 tasks); on 16 cores: 1."""
    group = h_q // h_kv
    return max(n for n in range(1, min(group, 8) + 1) if group % n == 0 and (n == 1 or h_q // n >= cores))


@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; libraries share shapes
def merge_state_cpu(h_q: int, d: int, dtype: str):
    """The CPU merge of two attention results, TVM's `merge_state_inplace_cpu` signature, with `_merge`'s
    formula: the one the kernels above merge a row's two parts with, so a merge done by the KV cache
    gives the bits a merge inside a kernel gives."""
    merge = _merge(d)

    @T.prim_func
    def merge_state(v: T.handle, s: T.handle, v_other: T.handle, s_other: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        n = T.int32()
        V = T.match_buffer(v, (n, h_q, d), dtype)
        S = T.match_buffer(s, (n, h_q), "float32")
        V_other = T.match_buffer(v_other, (n, h_q, d), dtype)
        S_other = T.match_buffer(s_other, (n, h_q), "float32")
        for task in T.parallel(n * h_q):
            scratch = T.alloc_buffer((5,), "float32")
            row: T.let[T.int32] = task // h_q
            h: T.let[T.int32] = task % h_q
            merge(V, S, row, h, V_other, (row, h), S_other[row, h], scratch, dtype)

    return merge_state


def use_fast_cpu_attention(mod, h_kv: int, h_q: int, d: int, dtype: str, cores: int = 1):
    """`mod` with our prefill attention kernels in place of TVM's CPU ones (where `mod` has them); `cores`: the
    target's, for the decode kernel's heads per task."""
    import tvm

    if d % LANES:
        return mod
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)  # a copy: the caller's module stays as it was
    names = [g.name_hint for g in mod.get_global_vars()]
    decode = functools.partial(paged_decode_cpu, heads_per_task=decode_heads_per_task(h_kv, h_q, cores))
    for name, make in ((RAGGED_PREFILL_CPU, ragged_prefill_cpu), (PAGED_PREFILL_CPU, paged_prefill_cpu),
                       (PAGED_DECODE_CPU, decode), (MERGE_STATE_CPU, None)):
        if name in names:
            gv = mod.get_global_var(name)
            new = merge_state_cpu(h_q, d, dtype) if make is None else make(h_kv, h_q, d, dtype)
            symbol = (mod[gv].attrs or {}).get("global_symbol")
            mod[gv] = new.with_attr("global_symbol", symbol) if symbol is not None else new
    return mod


# TVM's state-merge kernel, by its name in the module (the paged KV cache adds it for GPU targets).
MERGE_STATE = "tir_attention_merge_state"


@functools.lru_cache(maxsize=None)  # parsing TVMScript takes a while; libraries share shapes
def merge_state_inplace(num_heads: int, head_dim: int, dtype: str, max_threads: int):
    """TVM's `_merge_state_inplace` (kv_cache's `tir_attention_merge_state`) without its data race.

    It merges two attention results (V, S) ← (V, S) ⊕ (V_other, S_other) in place: each of a block's
    `head_dim / 4` threads per head reads the head's log-sum-exp S[n, h], merges its 4 lanes of V, and
    writes S[n, h]. TVM's version has every thread write S[n, h] with no barrier after the reads, so it
    is right only where all threads of a head run in lockstep (one 32-wide warp on CUDA). Where they do
    not (lavapipe runs 8-lane subgroups one after the other), later threads read the already merged S
    and merge their lanes with the wrong weights: a prefill onto KV history was wrong (docs/targets.md,
    Problem 3). Here every thread reads, a barrier, then one thread per head writes S.
    """
    vec = min(max(8 // 2, head_dim // 32), 4)  # TVM's lane count (it assumes 2-byte values)
    bdx, bdy = head_dim // vec, num_heads
    while bdx * bdy > max_threads and bdy > 1:
        bdy //= 2
    gdy = num_heads // bdy

    @T.prim_func(s_tir=True)
    def merge_state_inplace(v: T.handle, s: T.handle, v_other: T.handle, s_other: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        N = T.int32()
        H = T.int32()
        D = T.int32()
        V = T.match_buffer(v, (N, H, D), dtype)
        S = T.match_buffer(s, (N, H), "float32")
        V_other = T.match_buffer(v_other, (N, H, D), dtype)
        S_other = T.match_buffer(s_other, (N, H), "float32")
        for bx in T.thread_binding(N, thread="blockIdx.x"):
            for by in T.thread_binding(gdy, thread="blockIdx.y"):
                for ty in T.thread_binding(bdy, thread="threadIdx.y"):
                    for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                        with T.sblock("merge"):
                            T.reads()
                            T.writes()
                            state = T.sblock_alloc_buffer((5,), "float32", scope="local")
                            v_vec = T.sblock_alloc_buffer((vec,), dtype, scope="local")
                            v_other_vec = T.sblock_alloc_buffer((vec,), dtype, scope="local")
                            state[0] = S[bx, ty + by * bdy]
                            state[1] = S_other[bx, ty + by * bdy]
                            # Every thread of the block has read S before any thread writes it.
                            T.tvm_storage_sync("shared")
                            state[2] = T.max(state[0], state[1])
                            state[0] = T.exp2(state[0] - state[2])
                            state[1] = T.exp2(state[1] - state[2])
                            state[3] = state[0] / (state[0] + state[1])
                            state[4] = state[1] / (state[0] + state[1])
                            for i in T.vectorized(vec):
                                v_vec[i] = V[bx, ty + by * bdy, tx * vec + i]
                            for i in T.vectorized(vec):
                                v_other_vec[i] = V_other[bx, ty + by * bdy, tx * vec + i]
                            for i in T.serial(vec):
                                v_vec[i] = T.Cast(dtype, T.Cast("float32", v_vec[i]) * state[3]
                                                  + T.Cast("float32", v_other_vec[i]) * state[4])
                            for i in T.vectorized(vec):
                                V[bx, ty + by * bdy, tx * vec + i] = v_vec[i]
                            if tx == 0:
                                S[bx, ty + by * bdy] = T.log2(state[0] + state[1]) + state[2]

    return merge_state_inplace


def use_race_free_merge(mod, n_head: int, head_dim: int, dtype: str, max_threads: int):
    """`mod` with `merge_state_inplace` in place of TVM's `tir_attention_merge_state` (where `mod` has it)."""
    import tvm

    if MERGE_STATE not in [g.name_hint for g in mod.get_global_vars()]:
        return mod
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)  # a copy: the caller's module stays as it was
    gv = mod.get_global_var(MERGE_STATE)
    new = merge_state_inplace(n_head, head_dim, dtype, max_threads)
    symbol = (mod[gv].attrs or {}).get("global_symbol")
    mod[gv] = new.with_attr("global_symbol", symbol) if symbol is not None else new
    return mod
