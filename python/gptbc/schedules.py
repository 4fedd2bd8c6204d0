"""Schedules: how each fused kernel's loops are laid out on the target.

CPU: TVM's CPU pipeline schedules nothing (single-threaded naive loops). `CPUMatmul` handles every
kernel with one inner-product reduction — all linear layers, quantized or not, with their fused
bias/GELU/residual epilogues — and `CPUParallel` gives every other kernel parallel outer loops.

GPU: dlight's rules, with dlight's Matmul kept off its tensorize paths (see `gpu_rules`).
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

VECTOR_LANES = 16  # float32 lanes of a 512-bit register; LLVM splits it for 256-bit machines
ROWS_PER_TASK = 16  # output features per parallel task: 16 weight rows stay in L1/L2 while rows of x stream
ROWS_PER_TILE = 8  # rows of x that share each loaded weight vector (prefill); accumulators stay in L1


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


class CPUMatmul(dl.ScheduleRule):
    """y[..., n] = sum_k x[..., k] * w(n, k) (+ injective epilogue), the weight read contiguously along k.

    Loop nest: parallel over blocks of ROWS_PER_TASK output features; the k loop split into
    VECTOR_LANES partial sums (rfactor) so the inner loop is a vector multiply-add over contiguous k,
    then one horizontal sum per output; epilogues run right after each output is finished. A single
    row of x (decode) and many rows (prefill, batched decode) get different tilings, see below.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        sch = _cpu_schedule(func, target)
        if sch is None:
            return None
        try:
            return self._schedule(sch)
        except s_tir.ScheduleError:  # a shape this rule does not fit: leave the kernel to the next rule
            return None

    def _schedule(self, sch: s_tir.Schedule):
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if len(reductions) != 1:
            return None
        red = reductions[0]
        index = blocks.index(red)
        for b in blocks[:index]:  # producers (e.g. a cast) go into the reduction
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001 - not inlinable: leave this kernel to other rules
                return None
        loops = sch.get_loops(red)
        iters = sch.get(red).iter_vars
        if len(iters) != len(loops) or any(int(v.iter_type) not in (0, 2) for v in iters):
            return None
        kinds = [int(v.iter_type) for v in iters]  # 0 = spatial, 2 = reduction
        if kinds.count(2) != 1 or kinds[-1] != 2 or len(loops) < 2:
            return None
        *lead, n, k = loops
        n_ext, k_ext = _extent(sch, n), _extent(sch, k)
        if n_ext is None or k_ext is None or k_ext < 2 * VECTOR_LANES or k_ext % VECTOR_LANES:
            return None
        ko, ki = sch.split(k, [None, VECTOR_LANES])
        rf = sch.rfactor(ki, len(lead) + 1)
        rows = ROWS_PER_TASK if n_ext % ROWS_PER_TASK == 0 else 1
        single_row = all(_extent(sch, loop) == 1 for loop in lead)
        out_loop = self._one_row(sch, red, rf, rows) if single_row else self._row_tiles(sch, red, rf, rows)
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
    def _row_tiles(sch: s_tir.Schedule, red, rf, rows: int):
        """Prefill / batched decode: tiles of ROWS_PER_TILE rows of x share each loaded weight vector.

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
        sch.vectorize(r_ki)
        sch.decompose_reduction(rf, r_ko)
        return m_i


class CPUParallel(dl.ScheduleRule):
    """Any other kernel: its first block's outermost spatial loops run in parallel."""

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
            try:
                sch.parallel(loops[0])
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


def cpu_rules() -> list:
    return [CPUMatmul(), CPUParallel()]


def gpu_rules() -> list:
    """dlight rules for GPU targets, most specific first; Fallback makes every kernel valid GPU code."""

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

    return [Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback()]
