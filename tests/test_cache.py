"""The artifact cache (artifact/cache.py) and MODEL anywhere a model is named (prepare.py): entries appear whole or
not at all, one process builds what several want, a damaged entry is built again, and one command goes from a
GGUF file, an HF directory or a preset to a server answering /infill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from gptbc.artifact import cache
from gptbc.cli import main

REPO = Path(__file__).resolve().parents[1]
KQUANT = REPO / "tests" / "data" / "kquant"


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache of the test's own (the suite's shared one is left alone)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("GPTBC_CACHE_DIR", str(root))
    return root


def write_file(text: str):
    def build(folder: Path) -> None:
        (folder / "a.txt").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "b.bin").write_bytes(b"\0" * 1000)

    return build


def test_an_entry_is_built_once_then_reused(own_cache):
    lines, calls = [], []

    def build(folder: Path) -> None:
        calls.append(folder)
        write_file("one")(folder)

    first = cache.get_or_build("libraries", {"k": 1}, build, "thing one", log=lines.append)
    again = cache.get_or_build("libraries", {"k": 1}, build, "thing one", log=lines.append)
    assert len(calls) == 1 and first.path == again.path and (again.path / "a.txt").read_text() == "one"
    assert lines[0].startswith("[gptbc] library: built in") and "thing one" in lines[0]
    assert lines[1].startswith("[gptbc] library: cached, built 20") and lines[1].endswith("for thing one")
    assert set(json.loads((first.path / cache.ENTRY_FILE).read_text())["files"]) == {"a.txt", "sub/b.bin"}
    other = cache.get_or_build("libraries", {"k": 2}, build, "thing two", log=lines.append)
    assert len(calls) == 2 and other.path != first.path  # another key, another entry
    assert sorted(p.name for p in (own_cache / "libraries").iterdir() if not p.name.startswith(".")) == \
        sorted([first.key, other.key])


def test_a_damaged_entry_is_detected_and_built_again(own_cache, monkeypatch):
    lines = []
    entry = cache.get_or_build("weights", {"k": 1}, write_file("one"), "w", log=lines.append)
    (entry.path / "a.txt").write_text("two")  # same size, other bytes: the sha256 differs
    assert cache.damage(entry.path) == "a.txt changed (sha256)"
    cache.get_or_build("weights", {"k": 1}, write_file("one"), "w", log=lines.append)
    assert "is damaged (a.txt changed (sha256)); building it again" in lines[1]
    assert (entry.path / "a.txt").read_text() == "one" and cache.damage(entry.path) is None

    monkeypatch.setattr(cache, "HASHED_BYTES", 10)  # sub/b.bin is now checked by size and mtime only
    entry = cache.get_or_build("weights", {"k": 3}, write_file("one"), "w", log=lines.append)
    with open(entry.path / "sub" / "b.bin", "r+b") as f:
        f.truncate(500)
    assert cache.damage(entry.path) == "sub/b.bin is 500 bytes, was 1000"
    os.utime(entry.path / "a.txt", ns=(1, 1))  # a.txt is small: hashed, so a new mtime alone is no damage
    (entry.path / cache.ENTRY_FILE).unlink()
    assert cache.damage(entry.path) == "entry.json missing or unreadable"


def test_a_failed_build_leaves_nothing(own_cache):
    def fails(folder: Path) -> None:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_build("libraries", {"k": 1}, fails, "f", log=lambda _m: None)
    assert [p.name for p in (own_cache / "libraries").iterdir() if not p.name.endswith(".lock")] == []


BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gptbc.artifact import cache

    counter, hold = Path(sys.argv[1]), float(sys.argv[2])
    def build(folder):
        with open(counter, "a") as f:
            f.write("built\\n")
        (folder / "started").write_text("yes")
        time.sleep(hold)
        (folder / "out.txt").write_text("done")
    entry = cache.get_or_build("libraries", {"shared": 1}, build, "shared thing", log=lambda m: print(m, flush=True))
    print("PATH", entry.path, flush=True)
""")


def start_builder(tmp_path: Path, hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(tmp_path / "count"), str(hold)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def test_two_processes_wanting_one_entry_build_it_once(own_cache, tmp_path):
    procs = [start_builder(tmp_path, 3.0)]
    deadline = time.time() + 60
    while not (tmp_path / "count").exists() and time.time() < deadline:  # the first one is building
        time.sleep(0.05)
    procs.append(start_builder(tmp_path, 3.0))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert (tmp_path / "count").read_text() == "built\n"
    paths = {line for out, _ in outs for line in out.splitlines() if line.startswith("PATH")}
    assert len(paths) == 1
    second = outs[1][0]
    assert "waiting for another process building it (shared thing)" in second and "library: cached" in second


def test_a_killed_build_leaves_no_entry_and_the_next_one_builds(own_cache, tmp_path):
    proc = start_builder(tmp_path, 60.0)
    folder = own_cache / "libraries"
    deadline = time.time() + 60
    while not list(folder.glob(".*.tmp-*/started")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [p for p in folder.iterdir() if not p.name.startswith(".")] == []  # no entry, only the dead build's temp
    assert list(folder.glob(".*.tmp-*"))
    done = start_builder(tmp_path, 0.0)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert (tmp_path / "count").read_text() == "built\nbuilt\n" and "library: built in" in out
    assert list(folder.glob(".*.tmp-*")) == []  # the dead build's temporary folder went with the rebuild


def test_cache_command_lists_prunes_and_clears(own_cache, capsys):
    old = cache.get_or_build("libraries", {"k": "old"}, write_file("x" * 3000), "the old one", log=lambda _m: None)
    cache.get_or_build("weights", {"k": "new"}, write_file("y" * 10), "the new one", log=lambda _m: None)
    (old.path / cache.USED_FILE).touch()
    os.utime(old.path / cache.USED_FILE, (time.time() - 40 * 86400,) * 2)  # last used 40 days ago
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{own_cache}: 2 entries" in out and "the old one" in out and "the new one" in out
    assert out.index("the new one") < out.index("the old one")  # most recently used first
    assert main(["cache", "prune", "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert "the old one" in out and "removed 1 entries" in out and not old.path.exists()
    assert main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and cache.entries() == []


def test_prune_to_a_size_removes_the_least_recently_used(own_cache):
    a = cache.get_or_build("libraries", {"k": "a"}, write_file("a" * 5000), "a", log=lambda _m: None)
    b = cache.get_or_build("libraries", {"k": "b"}, write_file("b" * 5000), "b", log=lambda _m: None)
    (a.path / cache.USED_FILE).touch()
    (b.path / cache.USED_FILE).touch()
    os.utime(b.path / cache.USED_FILE, (time.time() - 100,) * 2)
    removed = cache.prune(max_bytes=7000)
    assert [e.key for e in removed] == [b.key] and a.path.exists()


# ---- libraries ----

def test_compile_takes_a_library_built_before_from_the_cache(tiny_model, tmp_path):
    """The suite's fixture built mqa64's library into the cache: the same compile is a copy of it, and a compile
    with another option is another entry."""
    from gptbc.artifact.config import resolve_model
    from gptbc.compile.compiler import compile_model, plan_library

    m = tiny_model("mqa64")
    lines = []
    out = compile_model(resolve_model(str(m.out_dir)), "cpu", "q0f32", tmp_path / "again.so", log=lines.append)
    assert out.read_bytes() == m.lib.read_bytes()
    assert len(lines) == 1 and lines[0].startswith("[gptbc] library: cached, built") and "cpu/" in lines[0]
    source = resolve_model(str(m.out_dir))
    keys = {cache.key_of(plan_library(source, "cpu", "q0f32").key),
            cache.key_of(plan_library(source, "cpu", "q0f32", batch_invariant=True).key),
            cache.key_of(plan_library(resolve_model(str(m.out_dir), context_window_size=64), "cpu", "q0f32").key),
            cache.key_of(plan_library(source, "cpu:skylake-avx512", "q0f32").key)}
    assert len(keys) == 4


def test_a_changed_compiler_source_is_a_new_library_key(tiny_model, monkeypatch):
    from gptbc.artifact.config import resolve_model
    from gptbc.compile import compiler

    plan = compiler.plan_library(resolve_model(str(tiny_model("mqa64").out_dir)), "cpu", "q0f32")
    before = cache.key_of(plan.key)
    compiler.compiler_sources.cache_clear()
    real = cache.sources_hash
    monkeypatch.setattr(compiler, "sources_hash", lambda *a, **k: real(*a, **k) + "-edited")
    try:
        assert cache.key_of(plan.key) != before
    finally:
        compiler.compiler_sources.cache_clear()


# ---- MODEL anywhere ----

def test_file_identities_follow_the_bytes_not_the_name(own_cache, tmp_path):
    from gptbc.prepare import file_identities

    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    first = file_identities([f])
    assert file_identities([f]) == first and (own_cache / "file-hashes.json").is_file()
    f.write_bytes(b"abd")
    assert file_identities([f]) != first


def test_a_float_checkpoint_converts_once_into_the_default_scheme(own_cache, tiny_model):
    from gptbc.prepare import FLOAT_DEFAULT, converted

    lines = []
    name, first = converted(str(tiny_model("mqa64").hf_dir), None, False, 1, lines.append, progress=False)
    assert json.loads((first / "gptbc-config.json").read_text())["quantization"]["name"] == FLOAT_DEFAULT
    _, again = converted(str(tiny_model("mqa64").hf_dir), None, False, 1, lines.append, progress=False)
    assert again == first and name == "hf"
    assert lines[0] == f"[gptbc] converting {tiny_model('mqa64').hf_dir} ({FLOAT_DEFAULT})" and len(lines) == 3
    assert lines[1].startswith("[gptbc] weights: built in") and lines[2].startswith("[gptbc] weights: cached")


def test_model_errors_are_one_line(own_cache, capsys, tmp_path):
    cases = [(["generate", "santacoder", "--prompt", "x"], "santacoder is a preset (a config, no weights): pass "
                                                           "--random-weights"),
             (["generate", str(tmp_path), "--random-weights", "--prompt", "x"], "--random-weights: "),
             (["generate", str(tmp_path / "nope"), "--prompt", "x"], "nope: not a converted or Hugging Face "
                                                                     "directory, a GGUF file, a Hub id"),
             (["serve", "tiny_starcoder_py", "--random-weights", "--device", "tpu"], "--device tpu: choose cpu")]
    for argv, want in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and want in err, err


def serve_once(args: list[str], env: dict, request: tuple[str, dict]) -> tuple[dict, str]:
    """Start `gptbc serve MODEL ...` on a free port, send one request, stop it: (response, its stderr)."""
    proc = subprocess.Popen(["gptbc", "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert " on http://127.0.0.1:" in line, proc.stderr.read()[-3000:]
        base = line.split(" on ", 1)[1].split()[0]
        path, body = request
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return answer, err


INFILL = ("/infill", {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n    return c\n", "n_predict": 4,
                     "temperature": 0})


def test_one_command_serves_a_gguf_file(tmp_path):
    """A shipped GGUF file and one command answer /infill: converted in the scheme that keeps its values, compiled,
    both cached (in the suite's cache: a first run builds them, later runs find them; the two-process test below
    is the one that always builds); the second start builds nothing."""
    gguf = tmp_path / "model-Q4_K_M.gguf"
    gguf.write_bytes((KQUANT / "model-Q4_K_M.gguf").read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    answer, err = serve_once([str(gguf)], env, INFILL)
    assert answer["tokens_predicted"] == 4 and isinstance(answer["content"], str)
    assert "qkf16_a" in err and "model-Q4_K_M" in err
    assert ("weights: built in" in err or "weights: cached" in err) and "library: " in err
    again, err = serve_once([str(gguf)], env, INFILL)
    assert again["content"] == answer["content"]  # greedy: the same model answers the same
    assert "weights: cached" in err and "library: cached" in err and "built in" not in err


def test_one_command_serves_an_hf_directory(tiny_model, tmp_path):
    """An HF directory and one command: converted into the test's cache, the library the suite built already."""
    m = tiny_model("mqa64")
    env = {**os.environ, "GPTBC_CACHE_DIR": os.environ.get("GPTBC_CACHE_DIR", str(cache.cache_root()))}
    answer, err = serve_once([str(m.hf_dir), "--quantization", "q0f32"], env, INFILL)
    assert answer["tokens_predicted"] >= 1 and "library: cached" in err
    from gptbc.runtime.engine import Engine

    want = Engine(m.out_dir, m.lib).complete(prefix=INFILL[1]["input_prefix"], suffix=INFILL[1]["input_suffix"],
                                            max_new_tokens=4)
    assert answer["content"] == want.text


def test_one_command_serves_a_preset_with_random_weights(tmp_path):
    answer, err = serve_once(["tiny_starcoder_py", "--random-weights"], {**os.environ, "HF_HUB_OFFLINE": "1"},
                             INFILL)
    assert answer["tokens_predicted"] >= 1 and "tiny_starcoder_py q4f16_1 (random weights)" in err


def test_two_processes_starting_one_uncached_model_build_it_once(tiny_model, tmp_path):
    hf_dir = tiny_model("mha64").hf_dir
    env = {**os.environ, "GPTBC_CACHE_DIR": str(tmp_path / "cache")}
    args = ["gptbc", "generate", str(hf_dir), "--quantization", "q0f32", "--prompt-ids", "1,2,3",
            "--max-new-tokens", "4", "--json"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    err = "".join(e for _, e in outs)
    assert err.count("library: built in") == 1 and err.count("weights: built in") == 1
    assert json.loads(outs[0][0])["token_ids"] == json.loads(outs[1][0])["token_ids"]
    assert len(list((tmp_path / "cache" / "libraries").glob("[0-9a-f]*"))) == 1


def test_progress_on_a_terminal_is_a_bar_and_elsewhere_lines(monkeypatch, capsys):
    from gptbc import prepare

    lines = []
    with prepare.progress_bar("compile", lambda: 5.0, lines.append) as log:
        log("[gptbc] a phase")
    assert lines == ["[gptbc] a phase"] and capsys.readouterr().err == ""  # not a terminal: the lines alone
    monkeypatch.setattr(prepare.sys.stderr, "isatty", lambda: True)
    with prepare.progress_bar("compile", lambda: 5.0, lines.append) as log:
        time.sleep(1.3)
        log("[gptbc] a phase")
    err = capsys.readouterr().err
    assert "compile:" in err and "/5" in err and "[gptbc] a phase" in err and lines == ["[gptbc] a phase"]
