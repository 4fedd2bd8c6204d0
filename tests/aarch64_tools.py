"""Can this machine build aarch64 code and run it under emulation, for the tests marked `aarch64`?

They need qemu-aarch64 (Debian: qemu-user), the cross toolchain with its target libraries (g++-aarch64-linux-gnu,
which brings /usr/aarch64-linux-gnu) and, for bundles, the aarch64 TVM wheels (downloaded once, cached). Without
the tools those tests skip with the reason printed; GPTBC_REQUIRE_AARCH64=1 (set by .ci/run) turns that skip into
a failure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from requirement import skip_or_fail

SYSROOT = Path("/usr/aarch64-linux-gnu")  # where the cross toolchain's target libraries are (qemu's -L)
QEMU = "qemu-aarch64"
CXX = "aarch64-linux-gnu-g++"


def why_no_aarch64() -> str | None:
    """None where aarch64 code can be built and run here, else why not (one line)."""
    missing = [what for what, ok in [(f"{QEMU} (apt-get install qemu-user)", shutil.which(QEMU)),
                                     (f"{CXX} (apt-get install g++-aarch64-linux-gnu)", shutil.which(CXX)),
                                     (f"{SYSROOT}/lib/ld-linux-aarch64.so.1 (the cross toolchain's target libraries)",
                                      (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists())] if not ok]
    return f"missing {', '.join(missing)}" if missing else None


def need_aarch64() -> None:
    """Skip the test where aarch64 code cannot run here; fail it when that is required."""
    why = why_no_aarch64()
    if why is not None:
        message = f"cannot build and emulate aarch64: {why}"
        skip_or_fail(message, "GPTBC_REQUIRE_AARCH64")


def qemu(cpu: str = "cortex-a72") -> list[str]:
    """The command prefix that runs an aarch64 Linux program here as a `cpu` would (SIGILL on what it lacks)."""
    return [shutil.which(QEMU) or QEMU, "-cpu", cpu, "-L", str(SYSROOT)]
