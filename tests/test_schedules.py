"""The CPU schedules compute what the unscheduled kernels compute, on shapes that do not divide evenly."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import tirx

from gptbc.compile.compiler import export_relax, fusion_passes
from gptbc.artifact.config import GPTBigCodeConfig
from gptbc.artifact.quantization import get_quantization
from gptbc.compile.schedules import CPUMatmul, CPUParallel
from kernel_build import built

TARGET = {"kind": "llvm", "num-cores": 2}
# Odd, and not multiples of any tile. FEW rows run the row-tile layout of a multi-row matmul, MANY its GEMM
# layout (the kernel picks at run time, at GEMM_MIN_ROWS rows), with a partial last tile of GEMM_ROWS.
FEW = {"seq_len": 7, "batch_size": 3, "total_seq_len": 7}
MANY = {"seq_len": 37, "batch_size": 19, "total_seq_len": 37}


def kernels(quant: str, **shape):
    """The fused PrimFuncs of a small model whose sizes are not multiples of the vector width or tile."""
    cfg = GPTBigCodeConfig(**{**dict(n_embd=80, n_head=5, n_layer=1, n_positions=64, vocab_size=97, n_inner=176),
                              **shape})
    target = tvm.target.Target(TARGET)
    mod, _, _ = export_relax(cfg, get_quantization(quant), target)
    with target:
        mod = tvm.transform.Sequential(fusion_passes(target))(mod)
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def concrete(shape, symbols=FEW) -> tuple[int, ...]:
    out = []
    for d in shape:
        if isinstance(d, tirx.IntImm):
            out.append(int(d))
        else:
            out.append(symbols[str(d)])
    return tuple(out)


def run(func: tirx.PrimFunc, inputs: list[np.ndarray]) -> list[np.ndarray]:
    lib = built(func.with_attr("global_symbol", "main"), TARGET)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in inputs]
    lib["main"](*args)
    return [a.numpy() for a in args]


def random_inputs(func: tirx.PrimFunc, seed: int, symbols=FEW) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for p in func.params:
        buf = p
        shape, dtype = concrete(buf.shape, symbols), str(buf.dtype)
        if dtype == "uint32":
            arrays.append(rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32))
        elif dtype.startswith("int"):
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            from gptbc.artifact.quantization import numpy_dtype

            arrays.append((0.5 * rng.standard_normal(shape)).astype(numpy_dtype(dtype)))
    return arrays


def schedulable(quant: str, rule):
    target = tvm.target.Target(TARGET)
    out = []
    for name, func in kernels(quant).items():
        if not all(isinstance(p.ty, tirx.buffer.BufferType) for p in func.params) or any(
                not isinstance(d, tirx.IntImm) and str(d) not in FEW for p in func.params for d in p.shape):
            continue  # scalar parameters or shape expressions: not fed by this harness
        with target:
            sch = rule.apply(func, target, False)
        if sch is not None:
            out.append((name, func, sch.mod["main"]))
    return out


@pytest.mark.parametrize("symbols", [FEW, MANY], ids=["few_rows", "many_rows"])
@pytest.mark.parametrize("quant", ["q0f32", "q0f16", "q4f32_1", "q8f16_1"])
def test_scheduled_matmuls_equal_unscheduled(quant, symbols):
    cases = schedulable(quant, CPUMatmul())
    assert len(cases) >= 5  # c_attn, c_proj, c_fc, mlp c_proj, lm_head — in decode and prefill forms
    for name, plain, scheduled in cases:
        inputs = random_inputs(plain, seed=len(name), symbols=symbols)
        want, got = run(plain, [a.copy() for a in inputs]), run(scheduled, [a.copy() for a in inputs])
        out = want[-1].astype(np.float32)
        np.testing.assert_allclose(got[-1].astype(np.float32), out, rtol=2e-3 if "16" in quant else 1e-5,
                                   atol=1e-3 * np.abs(out).max(), err_msg=name)


@pytest.mark.parametrize("quant", ["q0f32", "q4f32_1", "q8f32_1", "q0f16"])
def test_multi_row_matmuls_have_gemm_layout(quant):
    """Otherwise a GEMM layout that stopped applying (ScheduleError → row tiles only) would go unnoticed."""
    cases = schedulable(quant, CPUMatmul())
    multi_row = [(name, s) for name, plain, s in cases if any(str(d) in ("seq_len", "batch_size")
                                                               for d in plain.params[0].shape)]
    assert len(multi_row) >= 5
    for name, scheduled in multi_row:
        assert 'sblock("gemm")' in scheduled.script() and 'sblock("row_tiles")' in scheduled.script(), name


@pytest.mark.parametrize("quant", ["q0f32", "q0f16"])
def test_parallel_kernels_equal_serial(quant):
    cases = schedulable(quant, CPUParallel())
    assert cases
    for name, plain, scheduled in cases:
        inputs = random_inputs(plain, seed=len(name))
        want, got = run(plain, [a.copy() for a in inputs]), run(scheduled, [a.copy() for a in inputs])
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=1e-5, atol=1e-6,
                                       err_msg=name)


def test_parallel_loops_span_the_tokens_not_the_batch_of_one():
    """A prefill's tensors are [1, tokens, ...]: LayerNorm and the residual add run their fused leading spatial
    loops in parallel (the tokens, a symbolic extent), not the batch of 1 alone (they ran on one core so)."""
    import re

    checked = []
    for name, _plain, scheduled in schedulable("q0f32", CPUParallel()):
        symbolic = any(not isinstance(d, tirx.IntImm) for p in scheduled.params for d in p.shape)
        if not symbolic or ("layer_norm" not in name and not name.startswith("add")):
            continue  # decode's [1, 1, n] ones have nothing to spread over the cores but their last loop
        extents = re.findall(r"T\.parallel\(([^:]*?)\):", scheduled.script())
        assert extents and all(not re.fullmatch(r"(T\.int64\()?\d+\)?", e.strip()) for e in extents), (name, extents)
        checked.append(name)
    assert any("layer_norm" in n for n in checked) and any(n.startswith("add") for n in checked), checked
