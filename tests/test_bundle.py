"""`gptbc bundle`: a folder that runs on the library's machine with no Python. aarch64 bundles run here under
qemu-aarch64 as a Cortex-A72 (tests marked aarch64: see aarch64_tools.py); x86-64 bundles run natively. qemu
shows the code is correct, not how fast it is on a board."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from aarch64_tools import qemu
from gptbc.artifact.config import resolve_model
from gptbc.bundle import make_bundle
from gptbc.cli import main
from gptbc.compile.compiler import compile_model
from gptbc.errors import GptbcError
from hf_models import load_hf

PROMPT_IDS = [5, 17, 42, 99, 3, 250]
MAX_NEW = 16


@pytest.fixture(scope="module")
def aarch64_lib(tiny_model, tmp_path_factory):
    """aarch64_lib(name) → the tiny model's q0f32 library for generic aarch64 (a .so: the cross compiler is there)."""
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            out = tmp_path_factory.mktemp(f"{name}-aarch64") / "lib.so"
            built[name] = compile_model(resolve_model(str(tiny_model(name).out_dir)), "aarch64-linux", "q0f32", out,
                                        log=lambda _m: None)
        return built[name]

    return get


@pytest.fixture(scope="module")
def bundle_of(tiny_model, aarch64_lib, tmp_path_factory):
    """bundle_of(name, arch) → a bundle of that tiny model for aarch64 or x86_64 (gptbc-run cached across sessions)."""
    built = {}

    def get(name: str, arch: str) -> Path:
        if (name, arch) not in built:
            m = tiny_model(name)
            lib = aarch64_lib(name) if arch == "aarch64" else m.lib
            out, size = make_bundle(m.out_dir, lib, tmp_path_factory.mktemp("bundles") / f"{name}-{arch}",
                                    log=lambda _m: None)
            assert size == sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) - \
                sum((out / n).stat().st_size for n in ("bundle.json", "README.txt"))
            built[name, arch] = out
        return built[name, arch]

    return get


@pytest.fixture(scope="module")
def no_python_path(tmp_path_factory) -> str:
    """A PATH holding qemu-aarch64 and nothing else: the bundle must not need Python (or anything on PATH)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    if shutil.which("qemu-aarch64"):
        (bin_dir / "qemu-aarch64").symlink_to(shutil.which("qemu-aarch64"))
    assert shutil.which("python3", path=str(bin_dir)) is None and shutil.which("python", path=str(bin_dir)) is None
    return str(bin_dir)


def run_bundle(bundle: Path, *args: str, path: str, arch: str = "aarch64") -> subprocess.CompletedProcess:
    """Run the bundle's gptbc-run from another folder, with only `path` on PATH and no PYTHON* variables."""
    exe = [str(bundle / "gptbc-run"), *args]
    command = [*qemu("cortex-a72"), *exe] if arch == "aarch64" else exe
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/")}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd="/", timeout=300)


def hf_greedy(hf_dir: Path, ids: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        return load_hf(hf_dir).generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                        eos_token_id=0, pad_token_id=0)[0, len(ids):].tolist()


def one_line_error(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return lines[0]


# ---- a bundle runs, with nothing from the build machine ----

@pytest.mark.aarch64
@pytest.mark.parametrize("name", ["mqa64", "mha64"])
def test_aarch64_bundle_equals_hf_greedy_under_qemu_without_python(name, tiny_model, bundle_of, no_python_path):
    """HF's greedy ids, and --json output with the host runner's fields (the same run: qemu time is the cost)."""
    args = ("--prompt-ids", ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", str(MAX_NEW), "--json")
    arm = run_bundle(bundle_of(name, "aarch64"), *args, path=no_python_path)
    host = run_bundle(bundle_of(name, "x86_64"), *args, path=no_python_path, arch="x86_64")
    assert arm.returncode == 0 and host.returncode == 0, arm.stderr + host.stderr
    arm, host = json.loads(arm.stdout), json.loads(host.stdout)
    assert arm["token_ids"] == hf_greedy(tiny_model(name).hf_dir, PROMPT_IDS, MAX_NEW)
    assert list(arm) == list(host) and arm["token_ids"] == host["token_ids"]


@pytest.mark.aarch64
def test_aarch64_bundle_text_prompt_as_its_readme_says(tiny_model, bundle_of, no_python_path):
    from tokenizers import Tokenizer

    bundle = bundle_of("mqa64", "aarch64")
    readme = (bundle / "README.txt").read_text()
    assert "aarch64" in readme and "--target aarch64-linux" in readme and "qemu-aarch64 -L /usr/aarch64-linux-gnu" in readme
    done = run_bundle(bundle, "--prompt", "def f(", "--max-new-tokens", str(MAX_NEW), "--json", path=no_python_path)
    assert done.returncode == 0, done.stderr
    ids = Tokenizer.from_file(str(tiny_model("mqa64").hf_dir / "tokenizer.json")).encode("def f(").ids
    assert json.loads(done.stdout)["token_ids"] == hf_greedy(tiny_model("mqa64").hf_dir, ids, MAX_NEW)
    streamed = run_bundle(bundle, "--prompt", "def f(", "--max-new-tokens", str(MAX_NEW), path=no_python_path)
    assert streamed.returncode == 0 and streamed.stdout.rstrip("\n") == json.loads(done.stdout)["text"]


def test_host_bundle_runs_without_python(tiny_model, bundle_of, no_python_path):
    bundle = bundle_of("mha64", "x86_64")
    done = run_bundle(bundle, "--prompt-ids", ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", str(MAX_NEW),
                      path=no_python_path, arch="x86_64")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ",".join(map(str, hf_greedy(tiny_model("mha64").hf_dir, PROMPT_IDS, MAX_NEW)))
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["arch"] == "x86_64" and info["lib"] == "model.so" and {"path": "model/gptbc-config.json",
                                                                       "bytes": (bundle / "model" / "gptbc-config.json").stat().st_size} in info["files"]


def test_bundling_again_replaces_the_bundle_and_nothing_else(tiny_model, tmp_path, capsys):
    m = tiny_model("mha64")
    out = tmp_path / "b"
    assert main(["bundle", str(m.out_dir), "--lib", str(m.lib), "-o", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out} (")
    (out / "stale").write_text("from the last bundle")
    assert main(["bundle", str(m.out_dir), "--lib", str(m.lib), "-o", str(out)]) == 0
    assert not (out / "stale").exists() and (out / "gptbc-run").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folder left behind
    other = tmp_path / "not-a-bundle"
    other.mkdir()
    (other / "keep").write_text("mine")
    with pytest.raises(GptbcError, match="exists and is not a bundle"):
        make_bundle(m.out_dir, m.lib, other)
    assert (other / "keep").read_text() == "mine"


# ---- bad input: one line, exit status != 0, nothing half-written ----

@pytest.mark.aarch64
def test_gptbc_run_refuses_a_library_for_another_architecture(tiny_model, aarch64_lib, bundle_of, no_python_path):
    m = tiny_model("mqa64")
    done = run_bundle(bundle_of("mqa64", "x86_64"), "--model", str(m.out_dir), "--lib", str(aarch64_lib("mqa64")),
                      "--prompt-ids", "1,2", path=no_python_path, arch="x86_64")
    assert f"--lib {aarch64_lib('mqa64')} was built for aarch64, this machine is x86-64" in one_line_error(done)
    done = run_bundle(bundle_of("mqa64", "aarch64"), "--model", str(m.out_dir), "--lib", str(m.lib),
                      "--prompt-ids", "1,2", path=no_python_path)
    assert f"--lib {m.lib} was built for x86-64, this machine is aarch64" in one_line_error(done)


@pytest.mark.aarch64
def test_gptbc_generate_refuses_a_library_for_another_architecture(tiny_model, aarch64_lib, capsys):
    lib, out_dir = aarch64_lib("mqa64"), tiny_model("mqa64").out_dir  # built first: their progress is not ours
    capsys.readouterr()
    assert main(["generate", str(out_dir), "--lib", str(lib), "--prompt-ids", "1,2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --lib {lib} was built for aarch64, this machine is x86-64") and err.count("\n") == 1


@pytest.mark.parametrize("damage, message", [
    ("model/tokenizer.json", "model/tokenizer.json is missing (copy the whole folder)"),
    ("model.so", "model.so is missing (copy the whole folder)"),
    ("truncate", "bytes, bundle.json says"),
    ("libtvm_runtime.so", "libtvm_runtime.so"),  # the system loader's own one-line message, before gptbc-run starts
])
def test_bundle_with_a_file_missing(damage, message, bundle_of, tmp_path, no_python_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle_of("mqa64", "x86_64"), copy)
    if damage == "truncate":
        shard = next((copy / "model").glob("*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        (copy / damage).unlink()
    done = run_bundle(copy, "--prompt-ids", "1,2", path=no_python_path, arch="x86_64")
    assert message in one_line_error(done) and done.stdout == ""


def bundle_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["bundle", *argv]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("[gptbc] ")]  # progress lines may come first
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in err, err
    return errors[0]


@pytest.mark.aarch64
def test_bundle_without_the_cross_compiler_names_the_package(tiny_model, aarch64_lib, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cmake").symlink_to(shutil.which("cmake"))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("GPTBC_CACHE_DIR", str(tmp_path / "cache"))  # no gptbc-run built yet
    out = tmp_path / "out" / "bundle"
    err = bundle_error(capsys, str(tiny_model("mqa64").out_dir), "--lib", str(aarch64_lib("mqa64")), "-o", str(out))
    assert "aarch64-linux-gnu-g++" in err and "apt-get install g++-aarch64-linux-gnu" in err
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.aarch64
def test_bundle_offline_without_cached_wheels_says_what_to_download(tiny_model, aarch64_lib, tmp_path, monkeypatch,
                                                                    capsys):
    from gptbc.bundle import tvm_versions

    monkeypatch.setenv("GPTBC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline: pip finds no wheel anywhere
    out = tmp_path / "out" / "bundle"
    err = bundle_error(capsys, str(tiny_model("mqa64").out_dir), "--lib", str(aarch64_lib("mqa64")), "-o", str(out))
    tvm_version, ffi_version = tvm_versions()
    assert "cannot fetch the aarch64 TVM runtime" in err and "--platform manylinux_2_28_aarch64" in err
    assert f"apache-tvm=={tvm_version} apache-tvm-ffi=={ffi_version}" in err
    assert f"put the two wheels in {tmp_path / 'cache' / 'downloads'}" in err  # where fetch_wheels looks first
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_bundle_refuses_a_library_from_another_tvm(tiny_model, tmp_path):
    m = tiny_model("mqa64")
    blob = m.lib.read_bytes()
    stamp = b'"tvm_version": "' + __import__("tvm").__version__.encode()
    assert blob.count(stamp) == 1
    other = tmp_path / "other.so"
    other.write_bytes(blob.replace(stamp, stamp[:-1] + (b"8" if stamp[-1:] != b"8" else b"9")))
    with pytest.raises(GptbcError, match="was compiled with TVM .*, but this gptbc has TVM .*compile the library again"):
        make_bundle(m.out_dir, other, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bundle_refuses_weights_of_another_model(tiny_model, tmp_path):
    with pytest.raises(GptbcError, match="was compiled for multi_query true, but the weights in .* have multi_query "
                                         "false; a library runs only the model it was compiled for"):
        make_bundle(tiny_model("mha64").out_dir, tiny_model("mqa64").lib, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_unknown_arm_cpu_on_the_command_line(tiny_model, tmp_path, capsys):
    out_dir = tiny_model("mqa64").out_dir  # built first: its progress is not ours
    capsys.readouterr()
    assert main(["compile", "--model", str(out_dir), "--target", "aarch64-linux:cortex-z99",
                 "-o", str(tmp_path / "lib.so")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --target aarch64-linux:cortex-z99: unknown CPU") and err.count("\n") == 1
    assert "cortex-a76" in err and not (tmp_path / "lib.so").exists()


@pytest.mark.nvcc
def test_cuda_bundle_carries_the_cuda_runtime_and_runs_on_cuda(tiny_model, bundle_of, tmp_path, no_python_path):
    """A CUDA library (nvcc is here) bundles like a CPU one, with TVM's CUDA runtime beside gptbc-run, and the
    bundle's gptbc-run runs it on CUDA by default. Without a GPU, a driver stand-in that has no device
    (tests/test_cuda_library.py) shows it got that far: it loaded the CUDA runtime from the bundle and asked
    for device 0."""
    from test_cuda_library import libcuda_stand_in

    m = tiny_model("mqa64")
    lib = compile_model(resolve_model(str(m.out_dir)), "cuda:sm_87", "q0f32", tmp_path / "cuda.so",
                        log=lambda _m: None)
    bundle, _ = make_bundle(m.out_dir, lib, tmp_path / "bundle", log=lambda _m: None)
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["device"] == "cuda" and (bundle / "libtvm_runtime_cuda.so").is_file()
    # the libcudart TVM's CUDA runtime links, beside it (its run path is $ORIGIN): the GPU machine may have no toolkit
    [cudart] = [f["path"] for f in info["files"] if f["path"].startswith("libcudart.so.")]
    assert cudart.encode() in (bundle / "libtvm_runtime_cuda.so").read_bytes()
    assert "NVIDIA driver" in (bundle / "README.txt").read_text()
    bundle_cpu = bundle_of("mqa64", "x86_64")
    assert not (bundle_cpu / "libtvm_runtime_cuda.so").exists()  # only a CUDA library's bundle carries it
    assert json.loads((bundle_cpu / "bundle.json").read_text())["device"] == "cpu"
    env = {"PATH": no_python_path, "HOME": os.environ.get("HOME", "/"),
           "LD_LIBRARY_PATH": str(libcuda_stand_in(tmp_path))}
    done = subprocess.run([str(bundle / "gptbc-run"), "--prompt-ids", "1,2"], capture_output=True, text=True,
                          env=env, cwd="/", timeout=120)
    assert one_line_error(done) == "error: --device cuda: no such CUDA device (nvidia-smi lists them)"


def test_bundle_refuses_a_truncated_library(tiny_model, tmp_path):
    m = tiny_model("mqa64")
    cut = tmp_path / "cut.so"
    cut.write_bytes(m.lib.read_bytes()[:m.lib.stat().st_size // 2])
    with pytest.raises(GptbcError, match=f"--lib {cut}: truncated or damaged \\(segment "):
        make_bundle(m.out_dir, cut, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_wheels_put_in_the_downloads_folder_are_taken_without_pip(tmp_path, monkeypatch):
    """Offline, a user puts the two wheels in CACHE/downloads (as the error says): fetch_wheels takes them from there
    and never asks pip (which PIP_NO_INDEX would fail)."""
    from gptbc.bundle import downloads_dir, fetch_wheels, tvm_versions

    monkeypatch.setenv("GPTBC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    tvm_version, ffi_version = tvm_versions()
    downloads_dir().mkdir(parents=True)
    names = [f"apache_tvm-{tvm_version}-cp311-cp311-manylinux_2_28_aarch64.whl",
             f"apache_tvm_ffi-{ffi_version}-cp311-cp311-manylinux_2_28_aarch64.whl"]
    for name in names:
        (downloads_dir() / name).write_bytes(b"a wheel")
    found = fetch_wheels("aarch64", tmp_path / "into", log=lambda m: pytest.fail(f"asked pip: {m}"))
    assert [p.name for p in found] == names and all(p.parent == tmp_path / "into" for p in found)
