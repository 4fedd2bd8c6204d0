"""Runtime devices: what a `--device` spelling means (`cpu`, `cuda:1`, `vulkan`, ...), the TVM device for it,
and whether a library for a given device kind and CPU architecture can run on this machine."""

from __future__ import annotations

import os
import platform
import struct
from pathlib import Path

from gptbc.errors import GptbcError

WEBGPU_DEVICE_TYPE = 15  # DLPack's kDLWebGPU: gptbc's WebGPU runtime (the Vulkan path without TVM's Vulkan)

# Runtime device spellings → TVM device kind (the kind a library's `device` must equal to run there).
DEVICE_KINDS = {"cpu": "cpu", "llvm": "cpu", "cuda": "cuda", "metal": "metal", "vulkan": "vulkan", "rocm": "rocm",
                "opencl": "opencl"}


def parse_device_kind(spelling: str) -> tuple[str, int]:
    """'cpu', 'cuda:0', 'metal', 'vulkan:1' → (TVM device kind, index); anything else is a one-line error."""
    kind, _, index = spelling.partition(":")
    if kind not in DEVICE_KINDS or (index and not (index.isascii() and index.isdigit())):
        raise GptbcError(f"device {spelling!r}: expected one of {', '.join(sorted(set(DEVICE_KINDS)))}, "
                         f"optionally with :INDEX")
    return DEVICE_KINDS[kind], int(index or 0)


def _tvm_vulkan_runtime() -> bool:
    import tvm

    return tvm.get_global_func("device_api.vulkan", allow_missing=True) is not None


def parse_device(device: str):
    """'cpu', 'cuda:0', 'metal', 'vulkan:1' → a TVM device that exists on this machine."""
    import tvm

    kind, index = parse_device_kind(device)
    if kind == "vulkan" and not _tvm_vulkan_runtime():
        # No TVM Vulkan runtime (the PyPI wheel): Vulkan runs WGSL libraries on gptbc's WebGPU runtime.
        from gptbc.runtime import webgpu

        return webgpu.device(index)
    try:
        dev = tvm.device(kind, index)
        exists = dev.exist
    except Exception:  # this TVM build has no runtime for that kind
        exists = False
    if not exists:
        raise GptbcError(f"device {device!r}: no such device on this machine (or this TVM has no runtime for it)")
    return dev


def host_arch() -> str:
    """This machine's CPU architecture as targets name it: x86_64 or aarch64."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


ELF_MACHINES = {62: "x86_64", 183: "aarch64"}  # e_machine → the arch as targets name it
ARCH_WORDS = {"x86_64": "x86-64"}  # as messages (and gptbc-run's) spell an arch


def library_arch(lib: Path) -> str | None:
    """The CPU architecture a shared library's code is for, from its ELF header; None if it is not ELF (a
    .dylib, a .tar: the loader's own error will say what it is)."""
    with open(lib, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(head[18:20], "little")
    return ELF_MACHINES.get(machine, f"ELF machine {machine}")


# ELF class (1: 32-bit, 2: 64-bit) → the struct format of (e_phoff, e_shoff, e_phentsize, e_phnum, e_shentsize,
# e_shnum) and where it starts in the header; of a program header's (p_type, p_offset, p_filesz) and a section
# header's (sh_type, sh_offset, sh_size), each with the entry's size.
_ELF_LAYOUT = {
    1: ("<II6xHHHH", 28, ("<II8xI", 32), ("<4xI8xII", 40)),
    2: ("<QQ6xHHHH", 32, ("<I4xQ16xQ", 56), ("<4xI16xQQ", 64)),
}


def check_library_intact(lib: Path) -> None:
    """A library cut short (a copy interrupted, a full disk) is mapped past its end by dlopen, and the first
    touch of a missing page kills the process with SIGBUS, nothing printed. So before loading: every table and
    segment its ELF header describes (program headers and the segments they map, section headers and their
    sections) lies within the file. Structural, so it holds for a copy of the library; a file that is not
    little-endian ELF is left to the loader, whose own message says what it is."""
    size = os.path.getsize(lib)

    def damaged(what: str, end: int) -> GptbcError:
        return GptbcError(f"--lib {lib}: truncated or damaged ({what} ends at byte {end}, past the end of the "
                          f"{size}-byte file); compile it or copy it again")

    with open(lib, "rb") as f:
        head = f.read(64)
        if len(head) < 6 or head[:4] != b"\x7fELF" or head[5] != 1 or head[4] not in _ELF_LAYOUT:
            return
        fmt, at, (ph_fmt, ph_size), (sh_fmt, sh_size) = _ELF_LAYOUT[head[4]]
        if len(head) < at + struct.calcsize(fmt):
            raise damaged("the ELF header", at + struct.calcsize(fmt))
        phoff, shoff, phentsize, phnum, shentsize, shnum = struct.unpack_from(fmt, head, at)
        tables = [("program header", phoff, phentsize, phnum, ph_fmt, ph_size, 1),  # PT_LOAD: mapped
                  ("section header", shoff, shentsize, shnum, sh_fmt, sh_size, None)]
        for what, offset, entsize, count, entry_fmt, least, only in tables:
            if count == 0:
                continue
            if entsize < least:
                raise GptbcError(f"--lib {lib}: damaged ({what} entries of {entsize} bytes, ELF needs {least})")
            if offset + entsize * count > size:
                raise damaged(f"the {what} table", offset + entsize * count)
            f.seek(offset)
            table = f.read(entsize * count)
            for i in range(count):
                kind, start, length = struct.unpack_from(entry_fmt, table, i * entsize)
                if (only is None and kind != 8) or kind == only:  # SHT_NOBITS (.bss) has no bytes in the file
                    if start + length > size:
                        raise damaged(f"{'segment' if only else 'section'} {i}", start + length)


def check_library_arch(lib: Path) -> None:
    """A library for another CPU fails in dlopen with only "cannot open shared object file": name both arches."""
    built = library_arch(lib)
    if built is not None and built != host_arch():
        here = ARCH_WORDS.get(host_arch(), host_arch())
        raise GptbcError(f"--lib {lib} was built for {ARCH_WORDS.get(built, built)}, this machine is {here} (run it "
                         f"on a {ARCH_WORDS.get(built, built)} machine, e.g. from `gptbc bundle`, or compile for "
                         f"--target cpu)")


def runs_here(device: str, arch: str | None = None) -> bool:
    """Can a library for device kind `device` (host code for `arch`; None: this machine's) run here?"""
    if arch is not None and (arch != host_arch() or platform.system() != "Linux"):
        return False
    if device == "cpu":
        return True
    if device == "vulkan" and not _tvm_vulkan_runtime():
        try:
            from gptbc.runtime import webgpu

            return bool(webgpu.adapters())
        except Exception:  # noqa: BLE001 - no wgpu, no compiler, no driver: it does not run here
            return False
    try:
        import tvm

        return bool(tvm.device(device, 0).exist)
    except Exception:  # noqa: BLE001 - this TVM has no runtime for that kind
        return False
