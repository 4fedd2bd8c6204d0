"""The repacked weights on memory advised for transparent huge pages (runtime/hugepages.py)."""

from __future__ import annotations

import gc
import mmap
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from gptbc.runtime.hugepages import ALIGN, HugePageArena

TRAINED = Path(__file__).parent / "data" / "trained-tiny"

linux_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
                               reason="transparent huge pages are Linux's (madvise MADV_HUGEPAGE)")


def data_pointer(tensor) -> int:
    return np.from_dlpack(tensor).ctypes.data


def vm_flags_at(address: int) -> list[str]:
    """The kernel's VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(part, 16) for part in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_arena_copies_exactly_and_outlives_itself():
    import tvm

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 2**32, (300, 7), dtype=np.uint32), rng.standard_normal((5, 33)).astype(np.float16),
              rng.integers(-128, 128, 4097, dtype=np.int8)]
    arena = HugePageArena([a.nbytes for a in arrays])
    placed = [arena.place(tvm.runtime.tensor(a)) for a in arrays]
    del arena
    gc.collect()  # the tensors keep the mapping alive
    for a, t in zip(arrays, placed):
        assert data_pointer(t) % ALIGN == 0
        assert str(t.dtype) == str(a.dtype) and tuple(t.shape) == a.shape
        np.testing.assert_array_equal(t.numpy(), a)


def test_arena_refuses_what_does_not_fit():
    import tvm

    arena = HugePageArena([ALIGN])
    arena.place(tvm.runtime.tensor(np.zeros(ALIGN, np.uint8)))
    with pytest.raises(ValueError, match="huge-page arena"):
        arena.place(tvm.runtime.tensor(np.zeros(1, np.uint8)))


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> tuple[Path, Path]:
    """The shipped trained model in q4f32_1 with int8 activations (test_quantization's library, from the cache)."""
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.compile.compiler import compile_model

    root = tmp_path_factory.mktemp("int8")
    shutil.copytree(TRAINED, root / "hf")
    out = convert_weight(root / "hf", "q4f32_1", root / "q4f32_1", progress=False)
    lib = compile_model(resolve_model(str(out)), "cpu", "q4f32_1", root / "q4f32_1-int8.so",
                        log=lambda _m: None, activations="int8")
    return out, lib


@linux_thp
def test_int8_kernels_stream_weights_from_huge_page_memory(int8_model):
    """Every repacked weight of an int8-activation model lies in a mapping advised for huge pages ("hg"); the
    others (LayerNorm, embeddings) stay views of the file."""
    from gptbc.runtime.runner import ModelRunner

    runner = ModelRunner(*int8_model, max_batch_size=1)
    repacked = [p.get("repack") is not None for p in runner.meta["params"]]
    assert sum(repacked) >= 4
    for spec, param, moved in zip(runner.meta["params"], runner.params, repacked):
        flags = vm_flags_at(data_pointer(param))
        assert ("hg" in flags) == moved, f"{spec['name']}: VmFlags {flags}"


def test_repack_kernels_write_in_place_what_the_functions_return(int8_model, monkeypatch):
    """The runner calls each repack function's kernel with the arena's tensor as its output (no second copy of
    the weights); found by its name for every repack function, it writes what the Relax function returns."""
    from gptbc.runtime import runner as runner_module
    from gptbc.runtime.runner import ModelRunner, _repack_kernel, load_library

    import tvm

    _, meta, library = load_library(int8_model[1], tvm.cpu(0))
    functions = {p["repack"] for p in meta["params"] if p.get("repack")}
    assert functions and all(_repack_kernel(library, f) is not None for f in functions)
    direct = ModelRunner(*int8_model, max_batch_size=1)
    monkeypatch.setattr(runner_module, "_repack_kernel", lambda library, function: None)
    copied = ModelRunner(*int8_model, max_batch_size=1)
    for spec, a, b in zip(meta["params"], direct.params, copied.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=spec["name"])
