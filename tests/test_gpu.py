"""Parity on a CUDA GPU: runs where one is present; elsewhere skipped with the reason printed, or failed under
GPTBC_REQUIRE_GPU=1 (cuda_tools.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_models import load_hf


pytestmark = pytest.mark.gpu  # conftest: skipped without a GPU, failed under GPTBC_REQUIRE_GPU=1 (cuda_tools.py)


@pytest.mark.parametrize("name", ["mqa64", "mha32"])
@pytest.mark.parametrize("quant, rtol", [("q0f32", 1e-3), ("q4f16_1", None)])
def test_cuda_matches_hf_and_cpu(name, quant, rtol, tiny_model, tmp_path):
    from gptbc.compile.compiler import compile_model
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.runtime.engine import Engine

    m = tiny_model(name)
    out = m.out_dir if quant == "q0f32" else convert_weight(m.hf_dir, quant, tmp_path / quant, progress=False)
    lib = compile_model(resolve_model(str(out)), "cuda", quant, tmp_path / "cuda.so", log=lambda _m: None)
    gpu = Engine(out, lib, device="cuda:0")
    cpu_lib = compile_model(resolve_model(str(out)), "cpu", quant, tmp_path / "cpu.so", log=lambda _m: None)
    cpu = Engine(out, cpu_lib)
    ids = np.random.default_rng(0).integers(0, gpu.config.vocab_size, 17).tolist()
    assert gpu.generate(ids, 16) == cpu.generate(ids, 16)
    if rtol is not None:
        seq = gpu.add_sequence()
        got = gpu.verify(seq, ids)
        gpu.remove_sequence(seq)
        with torch.no_grad():
            want = load_hf(m.hf_dir)(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(got - want).max() <= rtol * np.abs(want).max()
