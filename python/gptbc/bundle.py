"""`gptbc bundle`: one folder that runs a compiled model on its target machine with no Python.

The folder holds `gptbc-run` built for the library's CPU architecture (cross-built with CMake for aarch64,
native for this machine's), the TVM runtime libraries for that architecture from the wheels of exactly the TVM
that compiled the library, the library (`model.so`), the converted weights with config and tokenizer
(`model/`), `bundle.json` (every file with its size; gptbc-run checks the copy is whole before using it) and a
README.txt. gptbc-run has an `$ORIGIN` rpath, so the folder runs wherever it is copied.

What is slow to make is kept in the artifact cache (artifact/cache.py, `gptbc cache list`): the foreign-architecture
wheels (downloaded once per TVM version with `pip download`, or taken from CACHE/downloads where a user put them)
with their runtime libraries unpacked, and gptbc-run per (architecture, TVM version, hash of the native sources).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gptbc import __version__
from gptbc.artifact import cache, manifest
from gptbc.compile.targets import AARCH64_PACKAGE, arm_cpu_features
from gptbc.errors import GptbcError
from gptbc.runtime.devices import ELF_MACHINES, check_library_intact, host_arch, library_arch

CROSS_CXX = {"aarch64": ("aarch64-linux-gnu-g++", AARCH64_PACKAGE)}
WHEEL_PLATFORM = "manylinux_2_28_{arch}"  # the tag the TVM and tvm-ffi wheels are published for
RUNNER, LIBRARY, WEIGHTS = "gptbc-run", "model.so", "model"  # the names inside a bundle (gptbc-run reads bundle.json)
RUNTIME_LIBS = {"libtvm_runtime.so": ("tvm", "lib/libtvm_runtime.so"), "libtvm_ffi.so": ("tvm_ffi", "lib/libtvm_ffi.so"),
                # TVM's CUDA device runtime (both wheels ship it): gptbc-run is built to load it, and a bundle of
                # a CUDA library carries it (a Jetson is an aarch64 board with a CUDA GPU)
                "libtvm_runtime_cuda.so": ("tvm", "lib/libtvm_runtime_cuda.so")}
CUDA_RUNTIME = "libtvm_runtime_cuda.so"
DEVICES = ("cpu", "cuda")  # the library devices a bundle runs (Vulkan needs wgpu-native beside it: not yet)
SOURCES = ("CMakeLists.txt", "cmake", "native")  # what gptbc-run is built from (native/webgpu is not linked in)


@dataclass(frozen=True)
class Runtime:
    """The tvm and tvm_ffi package folders (lib/ and include/ inside) for one architecture."""

    tvm_dir: Path
    ffi_dir: Path

    def library(self, name: str) -> Path:
        package, path = RUNTIME_LIBS[name]
        return (self.tvm_dir if package == "tvm" else self.ffi_dir) / path


def tvm_versions() -> tuple[str, str]:
    """(apache-tvm, apache-tvm-ffi) versions installed here: the runtime a bundle ships must be exactly these."""
    return importlib.metadata.version("apache-tvm"), importlib.metadata.version("apache-tvm-ffi")


# ---- the library ----

def bundle_arch(lib: Path) -> str:
    """The architecture a bundle of `lib` is for (a .so's ELF machine)."""
    arch = library_arch(lib)
    if arch is None:
        raise GptbcError(f"--lib {lib}: not a shared library (a .tar of objects cannot be bundled: compile with the "
                         f"cross compiler installed to get a .so)")
    if arch not in ELF_MACHINES.values():
        raise GptbcError(f"--lib {lib}: built for {arch}; gptbc bundle knows {', '.join(ELF_MACHINES.values())}")
    return arch


def check_library(lib: Path, model_dir: Path) -> tuple[str, dict]:
    """(architecture, metadata) of a library that a bundle can run with these weights; else a one-line error."""
    if not lib.is_file():
        raise GptbcError(f"--lib {lib}: file not found")
    check_library_intact(lib)  # a bundle of a cut library would die of SIGBUS on the board, nothing printed
    arch, meta = bundle_arch(lib), manifest.library_metadata_of(lib)
    if meta["device"] not in DEVICES:
        raise GptbcError(f"--lib {lib} was built for {meta['device']} (--target {meta['target']}); a bundle runs CPU "
                         f"libraries (cpu, aarch64-linux[:CPU]) and CUDA ones")
    manifest.check_compatible(meta, manifest.read_weights(model_dir), lib, model_dir)
    built_with, have = meta.get("tvm_version"), tvm_versions()[0]
    if built_with != have:
        raise GptbcError(f"--lib {lib} was compiled with TVM {built_with or 'of unknown version'}, but this gptbc has "
                         f"TVM {have}, whose runtime the bundle ships; compile the library again here")
    return arch, meta


# ---- the TVM runtime for an architecture ----

def installed_runtime() -> Runtime:
    dirs = [importlib.util.find_spec(n) for n in ("tvm", "tvm_ffi")]
    return Runtime(*(Path(s.submodule_search_locations[0]) for s in dirs))


def wheel_names(arch: str) -> list[str]:
    tvm_version, ffi_version = tvm_versions()
    return [f"apache_tvm-{tvm_version}-*_{arch}.whl", f"apache_tvm_ffi-{ffi_version}-*_{arch}.whl"]


def downloads_dir() -> Path:
    """Where a user without internet puts wheels fetched elsewhere (they are taken from here before pip is asked)."""
    return cache.cache_root() / "downloads"


def fetch_wheels(arch: str, folder: Path, log: Callable[[str], None]) -> list[Path]:
    """The apache-tvm and apache-tvm-ffi wheels of the installed versions for `arch`, into `folder`: from the
    downloads folder, else `pip download`; offline, a one-line error that says what to download and where to put
    it."""
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in wheel_names(arch):
        for wheel in sorted(downloads_dir().glob(pattern))[:1]:
            shutil.copyfile(wheel, folder / wheel.name)
    found = [next(iter(sorted(folder.glob(p))), None) for p in wheel_names(arch)]
    if all(found):
        return found
    tvm_version, ffi_version = tvm_versions()
    pins = [f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}"]
    platform = WHEEL_PLATFORM.format(arch=arch)
    command = ["pip", "download", "--no-deps", "--only-binary=:all:", "--platform", platform, "--python-version",
               f"{sys.version_info.major}.{sys.version_info.minor}", *pins, "-d", str(folder)]
    log(f"[gptbc] downloading the {arch} TVM runtime: {' '.join(command)}")
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
    found = [next(iter(sorted(folder.glob(p))), None) for p in wheel_names(arch)]
    if done.returncode != 0 or not all(found):
        why = next((l for l in reversed(done.stderr.splitlines()) if l.strip()), "no wheel found").strip()
        raise GptbcError(f"cannot fetch the {arch} TVM runtime ({why}); on a machine with internet run "
                         f"`pip download --no-deps --only-binary=:all: --platform {platform} --python-version "
                         f"{sys.version_info.major}.{sys.version_info.minor} {' '.join(pins)}` and put the two "
                         f"wheels in {downloads_dir()}")
    return found


def foreign_runtime(arch: str, log: Callable[[str], None]) -> Runtime:
    """The runtime libraries and headers of `arch`'s wheels: downloaded and unpacked once, a cache entry."""
    tvm_version, ffi_version = tvm_versions()

    def unpack(folder: Path) -> None:
        wheels = fetch_wheels(arch, folder / "wheels", log)
        for wheel, package in zip(wheels, ("tvm", "tvm_ffi")):
            libs = {f"{p}/{path}" for p, path in RUNTIME_LIBS.values() if p == package}
            with zipfile.ZipFile(wheel) as z:
                z.extractall(folder, [m for m in z.namelist() if m.startswith(f"{package}/include/") or m in libs])
        for lib in libs_in(Runtime(folder / "tvm", folder / "tvm_ffi")):
            lib.chmod(0o755)  # zipfile drops the mode

    key = {"arch": arch, "tvm": tvm_version, "tvm_ffi": ffi_version,
           "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    entry = cache.get_or_build("wheels", key, unpack, describe=f"the {arch} TVM {tvm_version} runtime", log=log)
    return Runtime(entry.path / "tvm", entry.path / "tvm_ffi")


def cuda_runtime_dependency(runtime: Runtime, arch: str) -> Path:
    """The CUDA runtime library (libcudart.so.N) that TVM's libtvm_runtime_cuda.so is linked against, found on
    this machine for `arch`: a CUDA bundle carries it beside libtvm_runtime_cuda.so (whose run path is $ORIGIN),
    because the machine it runs on may have the NVIDIA driver and no CUDA toolkit of that version."""
    names = sorted({m.decode() for m in re.findall(rb"libcudart\.so\.[0-9]+", runtime.library(CUDA_RUNTIME).read_bytes())})
    if len(names) != 1:
        raise GptbcError(f"{runtime.library(CUDA_RUNTIME)}: cannot tell which libcudart it needs ({names or 'none named'})")
    name = names[0]
    places = [Path(os.environ[v]) / "lib64" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if shutil.which("nvcc"):
        toolkit = Path(shutil.which("nvcc")).resolve().parents[1]
        places += [toolkit / "lib64", *sorted(toolkit.glob("targets/*/lib"))]
    places.append(Path("/usr/local/cuda/lib64"))
    nvidia = importlib.util.find_spec("nvidia")  # PyPI's nvidia-cuda-runtime-cuNN wheels
    for root in (nvidia.submodule_search_locations if nvidia and nvidia.submodule_search_locations else []):
        places += sorted(Path(root).glob("*/lib"))
    for place in places:
        if (place / name).is_file() and library_arch(place / name) == arch:
            return place / name
    raise GptbcError(f"TVM's CUDA runtime needs {name} for {arch}, which is not installed here (a CUDA bundle "
                     f"carries it): install the CUDA toolkit of that version or pip install the matching "
                     f"nvidia-cuda-runtime wheel, or set CUDA_HOME")


def libs_in(runtime: Runtime) -> list[Path]:
    return [runtime.library(n) for n in RUNTIME_LIBS]


def runtime_for(arch: str, log: Callable[[str], None]) -> Runtime:
    return installed_runtime() if arch == host_arch() else foreign_runtime(arch, log)


# ---- gptbc-run for an architecture ----

def source_tree() -> Path:
    """The repository gptbc-run is built from: gptbc bundle needs a source checkout (an editable install)."""
    root = Path(__file__).resolve().parents[2]
    if not all((root / s).exists() for s in SOURCES):
        raise GptbcError(f"gptbc bundle builds gptbc-run from the gptbc sources (CMakeLists.txt, native/), which "
                         f"are not beside this installation ({root}); install gptbc from a source checkout")
    return root


def source_hash(root: Path) -> str:
    digest = hashlib.sha256()
    files = [root / SOURCES[0]] + sorted(p for s in SOURCES[1:] for p in (root / s).glob("*") if p.is_file())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


TOOLCHAIN = """\
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR {arch})
set(CMAKE_CXX_COMPILER {cxx})
# The target's system libraries and the unpacked wheels: FindTVMRuntime looks only under these roots.
set(CMAKE_FIND_ROOT_PATH /usr/{arch}-linux-gnu {runtime_root})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
"""


def check_toolchain(arch: str) -> list[str]:
    """What building gptbc-run for `arch` needs, checked before anything is downloaded or built; returns the
    cross compiler, if one is needed, in a list."""
    if shutil.which("cmake") is None:
        raise GptbcError("gptbc bundle builds gptbc-run with CMake, which is not installed (pip install cmake, or "
                         "apt-get install cmake)")
    if arch == host_arch():
        return []
    if arch not in CROSS_CXX:
        raise GptbcError(f"gptbc bundle cannot cross-build gptbc-run for {arch} (it knows {', '.join(CROSS_CXX)})")
    cxx, package = CROSS_CXX[arch]
    if shutil.which(cxx) is None:
        raise GptbcError(f"gptbc bundle cross-builds gptbc-run for {arch} with {cxx}, which is not installed "
                         f"(Debian/Ubuntu: apt-get install {package})")
    return [cxx]


def native_program(arch: str, runtime: Runtime, log: Callable[[str], None], name: str = RUNNER) -> Path:
    """Native program `name` (gptbc-run; the tests' gptbc-call) for `arch`, this TVM and these native sources:
    built with an $ORIGIN rpath once, a cache entry."""
    cross = check_toolchain(arch)
    key = {"program": name, "arch": arch, "tvm": tvm_versions()[0], "sources": source_hash(source_tree()),
           "runtime": str(runtime.tvm_dir), "cross": cross}
    entry = cache.get_or_build("native", key, lambda folder: _build_program(arch, runtime, cross, folder, name),
                               describe=f"{name} for {arch}", log=log)
    return entry.path / name


def _build_program(arch: str, runtime: Runtime, cross: list[str], folder: Path, name: str) -> None:
    """Build the CMake target `name` for `arch` in a scratch folder and keep only the program, in `folder`."""
    with tempfile.TemporaryDirectory(prefix=f".{name}-build.", dir=folder.parent) as tmp:
        options = [f"-DTVM_HOME={runtime.tvm_dir}", "-DGPTBC_ORIGIN_RPATH=ON", "-DCMAKE_BUILD_TYPE=Release"]
        if cross:
            toolchain = Path(tmp) / f"{arch}.cmake"
            toolchain.write_text(TOOLCHAIN.format(arch=arch, cxx=cross[0], runtime_root=runtime.tvm_dir.parent))
            options.append(f"-DCMAKE_TOOLCHAIN_FILE={toolchain}")
        build = Path(tmp) / "build"
        for args in (["-S", str(source_tree()), "-B", str(build), *options],
                     ["--build", str(build), "--target", name, f"-j{os.cpu_count() or 1}"]):
            done = subprocess.run(["cmake", *args], capture_output=True, text=True)
            if done.returncode != 0:
                lines = [l for l in (done.stderr + done.stdout).splitlines() if "rror" in l] or ["(no message)"]
                raise GptbcError(f"building {name} for {arch} failed: {lines[0].strip()[:300]}")
        shutil.copy2(build / name, folder / name)


# ---- the folder ----

def bundle_files(folder: Path) -> list[dict]:
    return [{"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()]


def readme(arch: str, meta: dict, model_name: str, size: int) -> str:
    target = meta["target"]
    run = f'./{RUNNER} --prompt "def f(" --max-new-tokens 16'
    lines = [f"gptbc bundle: {model_name} ({manifest.scheme(meta['quantization'])}, {meta['activations']} "
             f"activations), {size / 1e6:.1f} MB",
             f"Built for {arch} Linux: library compiled for --target {target} by gptbc {meta['gptbc_version']} with "
             f"TVM {meta['tvm_version']}; the TVM runtime here is that version's.", ""]
    cpu = target.partition(":")[2]
    if arch == "aarch64" and cpu:
        lines += [f"CPU: {cpu}; the library uses {'+'.join(arm_cpu_features(cpu))}, and a CPU without one of them "
                  f"stops with SIGILL (--target aarch64-linux, without :CPU, runs on any 64-bit Arm board).", ""]
    lines += ["Run it on the target machine (glibc 2.28 or newer, and libstdc++), no Python needed:",
              f"  {run}", f"  ./{RUNNER} --prompt-ids 1,2,3 --max-new-tokens 8 --json", "",
              "gptbc-run finds libtvm_runtime.so and libtvm_ffi.so beside itself and, with no --model/--lib, uses",
              f"{WEIGHTS}/ and {LIBRARY} here, after checking every file in bundle.json is present and whole.",
              f"./{RUNNER} --help lists the sampling options."]
    if meta["device"] == "cuda":
        lines += ["", f"The library's kernels are CUDA's ({meta['target']}): gptbc-run runs them on CUDA device 0 "
                  f"unless --device cuda:N says another, through {CUDA_RUNTIME} and the CUDA runtime library here "
                  f"(libcudart); the machine needs the NVIDIA driver (libcuda.so.1) of that CUDA version or newer, "
                  f"not the CUDA toolkit."]
    if arch == "aarch64":
        lines += ["", "On an x86-64 Linux machine it runs under emulation (apt-get install qemu-user "
                  "g++-aarch64-linux-gnu), which is correct but not fast:",
                  f"  qemu-aarch64 -L /usr/aarch64-linux-gnu {run}"]
    return "\n".join(lines) + "\n"


def make_bundle(model_dir: str | Path, lib: str | Path, output: str | Path,
                log: Callable[[str], None] = print) -> tuple[Path, int]:
    """Write the bundle folder `output` (atomically: a temporary folder renamed into place) and return it with
    its size in bytes."""
    model_dir, lib, output = Path(model_dir), Path(lib), Path(output)
    arch, meta = check_library(lib, model_dir)
    if output.exists() and not (output / "bundle.json").is_file():
        raise GptbcError(f"-o {output}: exists and is not a bundle; remove it or choose another folder")
    check_toolchain(arch)  # before a download that would be of no use
    runtime = runtime_for(arch, log)
    runner = native_program(arch, runtime, log)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    except OSError as err:
        raise GptbcError(f"-o {output}: cannot write there ({err.strerror})") from None
    try:
        shutil.copy2(runner, tmp / RUNNER)
        for name in RUNTIME_LIBS:
            if name != CUDA_RUNTIME or meta["device"] == "cuda":
                shutil.copy2(runtime.library(name), tmp / name)
        if meta["device"] == "cuda":
            cudart = cuda_runtime_dependency(runtime, arch)
            shutil.copy2(cudart, tmp / cudart.name)
        shutil.copy2(lib, tmp / LIBRARY)
        (tmp / WEIGHTS).mkdir()
        for f in sorted(model_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / WEIGHTS / f.name)
        files = bundle_files(tmp)
        size = sum(f["bytes"] for f in files)
        model_name = manifest.read_weights(model_dir)["model_name"]
        (tmp / "bundle.json").write_text(json.dumps(
            {"gptbc_version": __version__, "arch": arch, "target": meta["target"], "tvm_version": meta["tvm_version"],
             "device": meta["device"], "model": WEIGHTS, "lib": LIBRARY, "files": files}, indent=1) + "\n")
        (tmp / "README.txt").write_text(readme(arch, meta, model_name, size))
        tmp.chmod(0o755)
        replace_folder(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output, size


def replace_folder(new: Path, output: Path) -> None:
    """Put `new` at `output`; an older bundle there is moved aside first and removed after."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
        os.replace(output, old / "bundle")
    os.replace(new, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
