"""Shared fixtures: tiny HF checkpoints, converted and compiled once per test session."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_models import make_checkpoint  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share two cores: an idle TVM pool thread sleeps at once instead of spinning on a core the other
    # worker needs (TVM reads this when its pool starts; subprocesses inherit it).
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")


def pytest_runtest_setup(item) -> None:
    """Tests marked aarch64, nvcc or gpu skip (or fail, under GPTBC_REQUIRE_AARCH64 / _NVCC / _GPU=1) where what
    they need is missing here."""
    if item.get_closest_marker("aarch64") is not None:
        from aarch64_tools import need_aarch64

        need_aarch64()
    if item.get_closest_marker("nvcc") is not None or item.get_closest_marker("gpu") is not None:
        from cuda_tools import need_gpu, need_nvcc

        need_nvcc()  # a gpu test compiles its library first
        if item.get_closest_marker("gpu") is not None:
            need_gpu()

# name → (checkpoint settings, compile overrides). Two shapes (head_dim 64 / 32, n_inner 4x / not),
# MQA and MHA of each; one uses exact-erf GELU; one prefills in chunks of 16 tokens.
VARIANTS = {
    "mqa64": (dict(n_embd=128, n_head=2, n_layer=2, multi_query=True, tokenizer="dash"), {}),
    "mha64": (dict(n_embd=128, n_head=2, n_layer=2, multi_query=False, seed=1), {}),
    "mqa32": (dict(n_embd=96, n_head=3, n_inner=200, n_layer=3, multi_query=True, tie_word_embeddings=False,
                   seed=2), {"prefill_chunk_size": 16}),
    "mha32": (dict(n_embd=96, n_head=3, n_inner=200, n_layer=3, multi_query=False, activation_function="gelu",
                   seed=3, tokenizer="underscore"), {}),
}


@dataclass
class TinyModel:
    name: str
    hf_dir: Path
    out_dir: Path
    lib: Path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) → TinyModel: HF checkpoint, converted q0f32 weights and a CPU library (cached)."""
    from gptbc.compile.compiler import compile_model
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight

    built: dict[str, TinyModel] = {}

    def get(name: str) -> TinyModel:
        if name not in built:
            ckpt, overrides = VARIANTS[name]
            root = tmp_path_factory.mktemp(name)
            hf_dir = make_checkpoint(root / "hf", **ckpt)
            out_dir = convert_weight(hf_dir, "q0f32", root / "out", progress=False)
            lib = compile_model(resolve_model(str(out_dir), **overrides), "cpu", "q0f32", root / "lib.so",
                                log=lambda _m: None)
            built[name] = TinyModel(name, hf_dir, out_dir, lib)
        return built[name]

    return get


@pytest.fixture(scope="session")
def engine_of(tiny_model):
    """engine_of(name) → a loaded Engine for that tiny model (one per session)."""
    from gptbc.runtime.engine import Engine

    engines = {}

    def get(name: str):
        if name not in engines:
            m = tiny_model(name)
            engines[name] = Engine(m.out_dir, m.lib)
        return engines[name]

    return get


def _shipped(name: str, root: Path, prefill_chunk_size: int = 32) -> TinyModel:
    """A model shipped in tests/data, converted to q0f32 and compiled with 32-token prefill chunks."""
    import shutil

    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.compile.compiler import compile_model

    shutil.copytree(Path(__file__).parent / "data" / name, root / "hf")
    out = convert_weight(root / "hf", "q0f32", root / "out", progress=False)
    lib = compile_model(resolve_model(str(out), prefill_chunk_size=prefill_chunk_size), "cpu", "q0f32",
                        root / "lib.so", log=lambda _m: None)
    return TinyModel(name, root / "hf", out, lib)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> TinyModel:
    """tests/data/trained-tiny (it learned hf_models.CORPUS) as q0f32 weights and a library with 32-token prefill
    chunks: the target of the trained pair, and prompt lookup's model."""
    return _shipped("trained-tiny", tmp_path_factory.mktemp("trained-tiny"))


@pytest.fixture(scope="session")
def draft_tiny(tmp_path_factory) -> TinyModel:
    """tests/data/draft-tiny, the trained pair's draft (smaller, trained the same way on the same data)."""
    return _shipped("draft-tiny", tmp_path_factory.mktemp("draft-tiny"))


@pytest.fixture(scope="session")
def import_checkpoint(tmp_path_factory) -> Path:
    """The seeded HF checkpoint the GGUF / GPTQ / AWQ tests write their files from."""
    return make_checkpoint(tmp_path_factory.mktemp("imports") / "hf", tokenizer="underscore", n_embd=64, n_head=4,
                           n_layer=2, seed=5)


def _import_lib(checkpoint: Path, scheme: str, root: Path) -> Path:
    from gptbc.artifact.config import resolve_model
    from gptbc.compile.compiler import compile_model

    return compile_model(resolve_model(str(checkpoint)), "cpu", scheme, root / f"{scheme}.so", log=lambda _m: None,
                         activations="float")


@pytest.fixture(scope="session")
def import_lib(import_checkpoint, tmp_path_factory) -> Path:
    """One q4f32_1 CPU library (float activations) that runs every conversion of `import_checkpoint`'s files: a
    library depends only on the config and the scheme, which all of them share."""
    return _import_lib(import_checkpoint, "q4f32_1", tmp_path_factory.mktemp("imports-lib"))


@pytest.fixture(scope="session")
def import_lib_affine(import_checkpoint, tmp_path_factory) -> Path:
    """The same for the affine scheme q4f32_a (asymmetric GPTQ, AWQ, GGUF Q4_1 / Q4_K held exactly)."""
    return _import_lib(import_checkpoint, "q4f32_a", tmp_path_factory.mktemp("imports-lib-a"))


def run_logits(engine, ids: list[int], steps: int):
    """Logits of a prompt and `steps` greedy decode steps, and the greedy tokens."""
    import numpy as np

    seq = engine.runner.add_sequence()
    try:
        got = [engine.runner.prefill(seq, ids)]
        tokens = [int(np.argmax(got[-1]))]
        for _ in range(steps):
            got.append(engine.runner.decode(seq, tokens[-1]))
            tokens.append(int(np.argmax(got[-1])))
    finally:
        engine.runner.remove_sequence(seq)
    return np.array(got), tokens


def assert_matches_hf(engine, hf, seed: int = 0) -> None:
    """Logits within 1e-4 (relative to the largest) of HF model `hf`, and greedy tokens identical."""
    import numpy as np
    import torch

    ids = np.random.default_rng(seed).integers(0, engine.config.vocab_size, 12).tolist()
    got, tokens = run_logits(engine, ids, 10)
    with torch.no_grad():
        want = hf(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:].numpy()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-4, f"relative logit error {err:.2e}"
    assert want.argmax(-1).tolist() == tokens
