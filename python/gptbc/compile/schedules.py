"""Schedules: how each fused kernel's loops are laid out on the target.

CPU: TVM's CPU pipeline schedules nothing (single-threaded naive loops). `CPUMatmul` handles every
kernel with one inner-product reduction — all linear layers, quantized or not, with their fused
bias/GELU/residual epilogues — and `CPUParallel` gives every other kernel parallel outer loops.

GPU: dlight's rules, with dlight's Matmul kept off its tensorize paths (see `gpu_rules`).
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

VECTOR_LANES = 16  # float32 lanes of a 512-bit register; LLVM splits it for 256-bit machines
ROWS_PER_TASK = 16  # output features per parallel task: 16 weight rows stay in L1/L2 while rows of x stream
ROWS_PER_TILE = 8  # rows of x that share each loaded weight vector (row tiles); accumulators stay in L1
# Register tile of the GEMM layout: 7 rows of x by 32 output features = 14 accumulator registers, 2 weight
# loads and 7 broadcasts per 14 FMAs. On Zen 5 (one thread, m=128, kernels built alone): 8x32 160 GFLOP/s,
# 12x32 151-157, 6x64 146-152, 16x16 96, 7x32 the same as 8x32. 7 rather than 8 rows because the tile
# must stay under TVM's 1024-byte limit for a stack buffer (7*32*4 = 896): a heap workspace tile, in the
# model library (where LLVM gets no per-buffer alias info), was stored to memory on every k
# (q4 2048x8192 kernel, 128 rows: 66 → 39 ms with the stack tile).
GEMM_ROWS = 7
GEMM_COLS = 32
# Fewer rows than this run the row-tile layout: packing a weight panel costs about as much as reading the
# weight, which only pays off over enough rows (one thread, 2048x2048 weight: 4 rows 0.66 vs 1.61 ms,
# 8 rows 1.65 vs 2.23 ms, 16 rows 2.47 vs 2.22 ms, 32 rows 5.1 vs 3.0 ms for row tiles vs GEMM).
GEMM_MIN_ROWS = 16


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


class CPUMatmul(dl.ScheduleRule):
    """y[..., n] = sum_k x[..., k] * w(n, k) (+ injective epilogue), the weight stored [n, k].

    Three layouts, all parallel over blocks of output features, epilogues run as soon as an output is done:
    - one row of x (decode): `_one_row`, the k loop split into VECTOR_LANES partial sums (rfactor) so the
      inner loop is a vector multiply-add over contiguous k, one horizontal sum per output;
    - a few rows (batched decode, short prompts): `_row_tiles`, the same with ROWS_PER_TILE rows of x
      sharing each loaded weight vector;
    - many rows (prefill): `_gemm`, a register-blocked GEMM over a transposed copy of a weight panel
      (dequantized once per panel for grouped-int weights).
    With a symbolic row count the kernel holds both of the last two and picks one at run time.
    """

    def __init__(self, one_order: bool = False):
        """`one_order`: every row count sums k in the same order (batch-invariant libraries): no GEMM layout,
        whose register tiles sum k in another order than the row layouts' VECTOR_LANES partial sums."""
        self.one_order = one_order

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        sch = _cpu_schedule(func, target)
        if sch is None:
            return None
        try:
            found = _find_matmul(sch)
            if found is None:
                return None
            rows = found[1]
            if isinstance(rows, tirx.IntImm) and int(rows) == 1:
                return self._dots(sch, one_row=True)
            dots = self._dots(s_tir.Schedule(func), one_row=False)
        except s_tir.ScheduleError:  # a shape this rule does not fit: leave the kernel to the next rule
            return None
        if self.one_order:
            return dots
        try:
            gemm = self._gemm(s_tir.Schedule(func))
            if gemm is None or dots is None:
                return gemm or dots
            if isinstance(rows, tirx.IntImm):
                return gemm if int(rows) >= GEMM_MIN_ROWS else dots
            return _either(rows >= GEMM_MIN_ROWS, gemm, dots)
        except Exception:  # noqa: BLE001 - no GEMM layout for this kernel (pad_einsum wants a plain x * w
            return dots    # sum); row tiles are still correct. tests/test_schedules.py checks the usual ones.


    def _dots(self, sch: s_tir.Schedule, one_row: bool):
        """The rfactor layouts: producers (a cast, a dequantization) are inlined into the sum."""
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        red, _ = _find_matmul(sch)
        index = _index(sch, blocks, red)
        hoist = None
        for b in blocks[:index]:
            if not one_row and sch.get(b).name_hint == "dequantize":
                hoist = b  # row tiles: dequantized once per weight vector, not once per row (see _row_tiles)
                continue
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001 - not inlinable: leave this kernel to other rules
                return None
        *lead, n, k = sch.get_loops(red)
        n_ext, k_ext = _extent(sch, n), _extent(sch, k)
        if n_ext is None or k_ext is None or k_ext < 2 * VECTOR_LANES or k_ext % VECTOR_LANES:
            return None
        ko, ki = sch.split(k, [None, VECTOR_LANES])
        rf = sch.rfactor(ki, len(lead) + 1)
        rows = ROWS_PER_TASK if n_ext % ROWS_PER_TASK == 0 else 1
        out_loop = self._one_row(sch, red, rf, rows) if one_row else self._row_tiles(sch, red, rf, rows, hoist)
        # Epilogues (bias, GELU, residual, casts): fold the intermediate ones into the last, then run it
        # right after each output is summed. Moving independent blocks (a bias cast) under the loop
        # one by one instead miscomputed (tests/test_schedules.py caught it).
        epilogue = blocks[index + 1:]
        for b in epilogue[:-1]:
            sch.compute_inline(b)
        if epilogue:
            sch.reverse_compute_at(epilogue[-1], out_loop)
        return sch

    @staticmethod
    def _one_row(sch: s_tir.Schedule, red, rf, rows: int):
        """Decode: one row of x. Each output's partial sums are computed right where they are summed."""
        *f_lead, f_n, _f_ki = sch.get_loops(red)  # the final block sums VECTOR_LANES partials
        n_o, n_i = sch.split(f_n, [None, rows])
        sch.reorder(n_o, *f_lead, n_i)
        sch.parallel(n_o)
        sch.compute_at(rf, n_i)
        *_, r_ki, r_ko = sch.get_loops(rf)  # compute_at puts the (spatial) lane loop first
        sch.reorder(r_ko, r_ki)
        sch.vectorize(r_ki)
        sch.decompose_reduction(rf, r_ko)
        return n_i

    @staticmethod
    def _row_tiles(sch: s_tir.Schedule, red, rf, rows: int, dequantize=None):
        """A few rows: tiles of ROWS_PER_TILE rows of x share each loaded weight vector.

        Measured on santacoder q4f32_1: a 64-token prefill 4.6 s → 3.2 s; for a single row this layout
        is 14% slower than `_one_row`, hence two layouts.
        """
        *f_lead, f_n, _f_ki = sch.get_loops(red)
        m = sch.fuse(*f_lead) if len(f_lead) > 1 else f_lead[0]
        m_o, m_i = sch.split(m, [None, ROWS_PER_TILE])
        n_o, n_i = sch.split(f_n, [None, rows])
        sch.reorder(n_o, m_o, n_i, m_i)
        sch.parallel(n_o)
        sch.compute_at(rf, m_o, preserve_unit_loops=True)
        # compute_at regenerates the tile's loops in block-iter order: the lane loop first, then the
        # row loops and the output loop, the k chunks last. Reorder to (k chunk, output, rows, lanes):
        # the weight vector of (output, k chunk) is then invariant over the row loop.
        inner = sch.get_loops(rf)[2:]
        r_ki, rows_and_n, r_ko = inner[0], inner[1:-1], inner[-1]
        sch.reorder(r_ko, rows_and_n[-1], *rows_and_n[:-1], r_ki)
        if dequantize is not None:
            # One vector of dequantized weights per (output, k chunk), shared by the tile's rows: inlined,
            # the int4/int8 unpacking ran once per row (santacoder q4f32_1 batch_decode, batch 4: 147 → 120 ms).
            sch.compute_at(dequantize, rows_and_n[-1])
            sch.vectorize(sch.get_loops(dequantize)[-1])
        sch.vectorize(r_ki)
        sch.decompose_reduction(rf, r_ko)
        return m_i

    @staticmethod
    def _gemm(sch: s_tir.Schedule):
        """Many rows: for each panel of GEMM_COLS output features (one parallel task), copy the weight
        panel transposed (k-major, dequantized) into a local buffer, then sweep all rows of x in tiles of
        GEMM_ROWS: accumulators hold a GEMM_ROWS x GEMM_COLS tile in registers while k runs, each step
        broadcasting one x per row against two contiguous weight vectors. No horizontal sums.

        Rows (and output features) are padded to whole tiles (`pad_einsum`): with the symbolic row count
        of prefill, a guarded tile instead spilled its accumulators to memory on every k (56 → 160
        GFLOP/s when padded). Only the copy of x into the padded buffer and the final store are guarded.
        """
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        red, _ = _find_matmul(sch)
        index = _index(sch, blocks, red)
        epilogue = blocks[index + 1:]
        *lead, n, _k = sch.get_loops(red)
        rows_at = [i for i, loop in enumerate(lead) if _extent(sch, loop) != 1]
        if len(rows_at) != 1:
            return None
        weight_at = _weight_read(sch, red)
        if weight_at is None:
            return None
        padding = [1] * (len(lead) + 2)
        padding[rows_at[0]], padding[-2] = GEMM_ROWS, GEMM_COLS
        sch.pad_einsum(red, padding)  # raises unless the body is a plain x * w sum
        panel = sch.cache_read(red, weight_at, "local")
        *lead, n, k = sch.get_loops(red)
        m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        n_o, n_i = sch.split(n, [None, GEMM_COLS])
        m_o, m_i = sch.split(m, [None, GEMM_ROWS])
        sch.reorder(n_o, m_o, k, m_i, n_i)
        sch.compute_at(panel, n_o)
        sch.transform_layout(red, ("read", weight_at), lambda i, j: (j, i))
        while sch.get_producers(panel):  # the weight padding and the dequantization compute the panel
            sch.compute_inline(sch.get_producers(panel)[0])
        for p in sch.get_producers(red):  # the padded copy of x: one pass over x, parallel over rows
            if not sch.get(p).same_as(sch.get(panel)):
                sch.parallel(sch.fuse(*sch.get_loops(p)[:-1]))
        # The padded sum lives only in the register tile (compacted to GEMM_ROWS x GEMM_COLS; left in
        # "global" scope, as "local" buffers always get a heap workspace, see GEMM_ROWS); the copy out of
        # it and the epilogue (bias, GELU, residual, casts) become one block that runs after each tile.
        out = sch.get_consumers(red) + epilogue
        for b in out[:-1]:
            sch.compute_inline(b)
        sch.reverse_compute_at(out[-1], m_o)
        sch.vectorize(sch.get_loops(out[-1])[-1])
        sch.parallel(n_o)
        sch.unroll(m_i)
        sch.vectorize(n_i)
        sch.decompose_reduction(red, k)
        return sch


def _find_matmul(sch: s_tir.Schedule):
    """(the one reduction block, its row count) if it sums over its last loop only, else None."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if len(reductions) != 1:
        return None
    red = reductions[0]
    loops = sch.get_loops(red)
    iters = sch.get(red).iter_vars
    if len(iters) != len(loops) or any(int(v.iter_type) not in (0, 2) for v in iters):
        return None
    kinds = [int(v.iter_type) for v in iters]  # 0 = spatial, 2 = reduction
    if kinds.count(2) != 1 or kinds[-1] != 2 or len(loops) < 2:
        return None
    rows = None
    for loop in loops[:-2]:
        ext = sch.get(loop).extent
        if not (isinstance(ext, tirx.IntImm) and int(ext) == 1):
            rows = ext if rows is None else rows * ext
    return red, tirx.const(1, "int64") if rows is None else rows


def _index(sch: s_tir.Schedule, blocks, block) -> int:
    return [sch.get(b).same_as(sch.get(block)) for b in blocks].index(True)


def _weight_read(sch: s_tir.Schedule, red) -> int | None:
    """Index of the read of `red` indexed by the output feature (the weight), if there is exactly one."""
    block = sch.get(red)
    n_var = block.iter_vars[-2].var
    hits = [i for i, r in enumerate(block.reads)
            if any(v.same_as(n_var) for rng in r.region for v in tirx.analysis.undefined_vars(rng.min, []))]
    return hits[0] if len(hits) == 1 else None


def _either(cond, gemm: s_tir.Schedule, row_tiles: s_tir.Schedule) -> s_tir.Schedule:
    """One kernel running the `gemm` layout where `cond` holds (checked once per call), else `row_tiles`."""
    a, b = gemm.mod["main"], row_tiles.mod["main"]
    body = tirx.IfThenElse(cond, _renamed_root(a.body, "gemm"), _renamed_root(b.body, "row_tiles"))
    root = s_tir.SBlock([], [], [], "root", body)
    both = a.with_body(s_tir.SBlockRealize([], True, root))
    # Both layouts came from one function, so they share loop and block variables, which TIR allows
    # to be defined once only: a round trip through TVMScript gives each definition its own variable.
    return s_tir.Schedule(tvm.script.from_source(both.script()))


def _renamed_root(realize, name: str):
    block = realize.block
    return s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], name, block.body, alloc_buffers=block.alloc_buffers))


class CPUParallel(dl.ScheduleRule):
    """Any other kernel: each block's leading spatial loops, fused, run in parallel; its last loop stays inside, for
    LLVM to vectorize (elementwise) or to reduce over (LayerNorm's sums). Fused, because the leading loop of a
    [batch, tokens, ...] tensor is the batch, 1 in a prefill: parallel over it alone left LayerNorm, the residual adds
    and the casts on one core (LayerNorm took 4% of a 2000-token prefill)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        sch = _cpu_schedule(func, target)
        if sch is None:
            return None
        changed = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(block)
            iters = sch.get(block).iter_vars
            if not loops or len(iters) != len(loops) or int(iters[0].iter_type) != 0:
                continue
            spatial = next((i for i, v in enumerate(iters) if int(v.iter_type) != 0), len(iters))
            outer = loops[:max(1, min(spatial, len(loops) - 1))]
            extents = [sch.get(lp).extent for lp in loops]
            if all(isinstance(e, tirx.IntImm) and int(e) == 1 for e in extents[:len(outer)]) and (
                    spatial == len(loops) and not isinstance(extents[-1], tirx.IntImm)):
                outer = loops  # [1, tokens]: the tokens are the last loop, and the parallel one
            if all(isinstance(e, tirx.IntImm) for e in extents[:len(outer)]) and math.prod(
                    int(e) for e in extents[:len(outer)]) == 1:
                continue  # one row (a decode step's [1, 1, n]): a parallel launch would cost more than the row
            try:
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
                changed = True
            except Exception:  # noqa: BLE001 - a loop that cannot be parallel stays serial
                continue
        return sch if changed else None


def _cpu_schedule(func, target: Target) -> s_tir.Schedule | None:
    """A schedule of `func` if it is a CPU kernel with a root block (hand-written kernels have none)."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    return sch if _has_root(sch) else None


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - hand-written kernels (attention) have no root block
        return False


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(int(v.iter_type) == 2 for v in sch.get(block).iter_vars)


def cpu_rules(batch_invariant: bool = False) -> list:
    return [CPUMatmul(one_order=batch_invariant), CPUParallel()]


def gpu_rules(batch_invariant: bool = False) -> list:
    """dlight rules for GPU targets, most specific first; Fallback makes every kernel valid GPU code.
    `batch_invariant`: no GEMV rules, so a one-row matmul (a prefill's last-token logits) runs dlight's
    Matmul schedule like the many-row ones, whose threads each sum k in order whatever the row count;
    GEMV's split-k tree sums it in another order."""

    class Matmul(dl.gpu.Matmul):
        """dl.gpu.Matmul without tensorization.

        In the apache-tvm 0.27.0.post1 wheel `Schedule.tensorize` segfaults for every call (seen even on
        a textbook x86 VNNI case), and dlight's Matmul tensorizes f16 matmuls on CUDA >= sm_70
        (MatmulTensorization) and every matmul on Metal (MetalMatmul, simdgroup intrinsics): those are
        the crashes behind "Metal segfaults in Tensorize". The crash happens in C++, so dlight's own
        try/except around it cannot catch it. We keep dlight's tiled shared-memory matmul schedule and
        only skip the tensorize paths: CUDA via the `dlight.do_not_tensorize` attribute that rule
        honours; Metal by scheduling with a generic-GPU target (same default config Metal gets).
        Cost: no tensor-core / simdgroup-matrix MMA for prefill matmuls (decode GEMVs never used them).
        """

        def apply(self, func, target, tunable):
            if isinstance(func, tirx.PrimFunc):
                func = func.with_attr("dlight.do_not_tensorize", True)
            if target.kind.name == "metal":
                target = tvm.target.Target({"kind": "opencl"})
            return super().apply(func, target, tunable)

    gemv = [OneOrderMatmul()] if batch_invariant else [dl.gpu.GEMV(), dl.gpu.LowBatchGEMV()]
    return [Matmul(), *gemv, dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


class OneOrderMatmul(dl.ScheduleRule):
    """A matmul dlight's Matmul declined (one static row: a prefill's last-token logits) scheduled as
    Fallback does: a thread per output summing k in order, the order each thread of Matmul's tiles sums
    in, so the row gets the bits it gets among many rows (batch-invariant GPU libraries)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        if not _has_root(sch) or _find_matmul(sch) is None:
            return None
        return dl.gpu.Fallback().apply(func, target, tunable)
