"""What the CUDA tests need: nvcc (to compile a library's kernels; no GPU needed) and a CUDA GPU (to run them).
Where one is missing the test skips with the reason printed, and fails instead under GPTBC_REQUIRE_NVCC=1 /
GPTBC_REQUIRE_GPU=1 (requirement.py), as the Vulkan and aarch64 tests do: a machine that has a GPU cannot hide a
broken CUDA path behind a skip. Tests mark themselves `nvcc` or `gpu` (conftest.py calls these)."""

from __future__ import annotations

import shutil

from requirement import skip_or_fail


def why_no_gpu() -> str | None:
    """None where TVM sees CUDA device 0; else why not, the probe's own error included (not swallowed)."""
    try:
        import tvm

        if tvm.cuda(0).exist:
            return None
        return "no CUDA GPU visible to TVM on this machine (tvm.cuda(0).exist is false)"
    except Exception as err:  # noqa: BLE001 - a TVM without a CUDA runtime raises its own types; say which
        return f"TVM cannot probe CUDA here ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"


def need_gpu() -> None:
    why = why_no_gpu()
    if why is not None:
        skip_or_fail(why, "GPTBC_REQUIRE_GPU")


def need_nvcc() -> None:
    missing = [tool for tool in ("nvcc", "cc") if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"{' and '.join(missing)} not installed: cannot compile CUDA kernels (nvcc) or the libcuda "
                     f"stand-in (cc)", "GPTBC_REQUIRE_NVCC")
