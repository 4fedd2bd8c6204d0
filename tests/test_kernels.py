"""Our CPU prefill attention kernel against TVM's (the one it replaces) on ragged batches."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

from gptbc.kernels import ragged_prefill_cpu, use_fast_cpu_attention

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


def test_compiled_cpu_model_uses_our_kernel():
    from gptbc.compiler import export_relax
    from gptbc.config import GPTBigCodeConfig
    from gptbc.quantization import get_quantization

    cfg = GPTBigCodeConfig(n_embd=64, n_head=2, n_layer=1, n_positions=32, vocab_size=50)
    q = get_quantization("q0f32")
    mod = export_relax(cfg, q, TARGET)
    swapped = use_fast_cpu_attention(mod, cfg.n_kv_head, cfg.n_head, cfg.head_dim, q.model_dtype)
    name = "batch_prefill_ragged_kv"
    assert "T.parallel" not in mod[name].script()  # TVM's kernel: serial loops
    assert "T.parallel" in swapped[name].script()
