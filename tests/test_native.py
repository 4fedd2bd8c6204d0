"""The native runner (CMakeLists.txt, cmake/, native/): built here with the README's commands, then checked
against the Python engine (greedy ids, text) and `tokenizers` (ids of a corpus, decoded text), and fed bad
input under AddressSanitizer (one line on stderr, exit status 1, no crash)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptbc.runtime.engine import Engine
from gptbc.runtime.sampling import RANGES, SamplingParams
from hf_models import CORPUS, make_tokenizer
from native_build import REPO, build, cmake, shared_build

MAX_NEW = 24


# ---- building ----

@pytest.fixture(scope="module")
def native() -> Path:
    return shared_build()


@pytest.fixture(scope="module")
def native_asan() -> Path:
    # Debug: -O0 compiles in half the time, and ASan reports read better.
    return shared_build("-DGPTBC_ASAN=ON", "-DCMAKE_BUILD_TYPE=Debug")


def test_configure_fails_clearly_without_tvm(tmp_path):
    cases = [(["-DTVM_HOME=/nonexistent/tvm"], "TVM_HOME=/nonexistent/tvm", "unset it"),
             ([f"-DPython3_EXECUTABLE={shutil.which('false')}"], "the apache-tvm wheel of", "pip install apache-tvm")]
    for i, (options, where, hint) in enumerate(cases):
        env = {k: v for k, v in os.environ.items() if k != "TVM_HOME"}
        done = cmake("-S", str(REPO), "-B", str(tmp_path / f"b{i}"), *options, cwd=tmp_path, env=env)
        message = " ".join(done.stderr.split())  # CMake wraps it
        assert done.returncode != 0
        assert f"TVM runtime not found in {where}" in message and hint in message, done.stderr


# ---- models ----

@pytest.fixture(scope="module")
def model_files(tiny_model, tmp_path_factory):
    """model_files(name, quant) → (converted dir, library); q0f32 from the session's tiny models. A grouped
    scheme compiles with int8 activations (weights repacked at load), or float ones with a ":float" suffix."""
    from gptbc.compile.compiler import compile_model
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight

    built = {}

    def get(name: str, quant: str) -> tuple[Path, Path]:
        m = tiny_model(name)
        if quant == "q0f32":
            return m.out_dir, m.lib
        if (name, quant) not in built:
            scheme, _, activations = quant.partition(":")
            root = tmp_path_factory.mktemp(f"{name}-{scheme}-{activations or 'int8'}")
            out = convert_weight(m.hf_dir, scheme, root / "out", progress=False)
            lib = compile_model(resolve_model(str(out)), "cpu", scheme, root / "lib.so", log=lambda _m: None,
                                activations=activations or "int8")
            built[name, quant] = (out, lib)
        return built[name, quant]

    return get


def run(exe: Path, out_dir: Path, lib: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe / "gptbc-run"), "--model", str(out_dir), "--lib", str(lib), *args],
                          capture_output=True, env=env, timeout=120)


def run_json(exe: Path, out_dir: Path, lib: Path, *args: str) -> dict:
    done = run(exe, out_dir, lib, *args, "--json")
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def ids_arg(ids) -> str:
    return ",".join(map(str, ids))


def prompt(length: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, vocab, size=length).tolist()


# ---- generation: the same tokens as the Python engine ----

CASES = [("mqa64", "q0f32"), ("mha64", "q0f32"), ("mqa32", "q0f32"), ("mha32", "q0f32"),
         ("mqa64", "q4f32_1"), ("mha32", "q8f32_1"), ("mqa64", "q4f32_1:float"), ("mha32", "q4f32_a")]


@pytest.mark.parametrize("name,quant", CASES, ids=[f"{n}-{q}" for n, q in CASES])
def test_greedy_ids_equal_engine_generate(name, quant, native, model_files):
    out_dir, lib = model_files(name, quant)
    engine = Engine(out_dir, lib, prefix_cache_size=0)
    for length in (1, 17, 40):  # mqa32 prefills in chunks of 16: 40 tokens take three calls
        ids = prompt(length, engine.config.vocab_size, seed=length)
        want = engine.complete(ids, greedy=True, max_new_tokens=MAX_NEW)
        got = run_json(native, out_dir, lib, "--prompt-ids", ids_arg(ids), "--max-new-tokens", str(MAX_NEW))
        assert got["token_ids"] == want.token_ids, f"{name} {quant} prompt {length}"
        assert got["finish_reason"] == want.finish_reason and got["prompt_tokens"] == length
        if engine.tokenizer is not None:
            assert got["text"] == engine.decode_text(want.token_ids)
        else:
            assert got["text"] is None


@pytest.mark.parametrize("name", ["mqa64", "mha32"])  # the dash and the underscore FIM spellings
def test_text_prompt_and_streamed_text(name, native, model_files):
    out_dir, lib = model_files(name, "q0f32")
    engine = Engine(out_dir, lib, prefix_cache_size=0)
    text = "def fibonacci(n):\n    return 1  # héllo 你好 🚀"
    got = run_json(native, out_dir, lib, "--prompt", text, "--max-new-tokens", str(MAX_NEW))
    assert got["prompt_ids"] == engine.encode(text)
    want = engine.generate(text, max_new_tokens=MAX_NEW)
    assert got["token_ids"] == want and got["text"] == engine.decode_text(want)
    streamed = run(native, out_dir, lib, "--prompt", text, "--max-new-tokens", str(MAX_NEW))
    assert streamed.returncode == 0 and streamed.stdout.decode() == got["text"] + "\n"
    spell = {k: v["text"] for k, v in engine.fim.items()}
    fim = f"{spell['prefix']}def f(x):\n    {spell['suffix']}\n{spell['middle']}"
    got = run_json(native, out_dir, lib, "--prompt", fim, "--max-new-tokens", "8")
    assert got["prompt_ids"][0] == engine.fim["prefix"]["id"] and got["prompt_ids"][-1] == engine.fim["middle"]["id"]
    assert got["token_ids"] == engine.generate(engine.encode(fim), max_new_tokens=8)


def test_ids_without_a_tokenizer_and_max_new_tokens_zero(native, model_files):
    out_dir, lib = model_files("mha64", "q0f32")  # converted without tokenizer files
    engine = Engine(out_dir, lib, prefix_cache_size=0)
    done = run(native, out_dir, lib, "--prompt-ids", "3, 4,5", "--max-new-tokens", "6")
    assert done.returncode == 0 and done.stdout.decode() == ids_arg(engine.generate([3, 4, 5], 6)) + "\n"
    got = run_json(native, out_dir, lib, "--prompt-ids", "3,4,5", "--max-new-tokens", "0")
    assert got["token_ids"] == [] and got["finish_reason"] == "length"


def test_stops_at_an_eos_from_generation_config(native, model_files, tmp_path):
    out_dir, lib = model_files("mqa64", "q0f32")
    ids = [5, 6, 7]
    first = Engine(out_dir, lib, prefix_cache_size=0).generate(ids, 1)[0]
    copy = tmp_path / "model"
    shutil.copytree(out_dir, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [first]}))
    want = Engine(copy, lib, prefix_cache_size=0).complete(ids, greedy=True, max_new_tokens=20)
    assert want.token_ids == [first] and want.finish_reason == "stop"
    got = run_json(native, copy, lib, "--prompt-ids", ids_arg(ids), "--max-new-tokens", "20")
    assert got["token_ids"] == [first] and got["finish_reason"] == "stop"
    got = run_json(native, copy, lib, "--prompt-ids", ids_arg(ids), "--max-new-tokens", "20", "--ignore-eos")
    assert len(got["token_ids"]) == 20


def realign(src: Path, dst: Path) -> None:
    """Copy a converted directory with each safetensors header padded so the data starts 64-byte aligned."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = raw[8:8 + n] + b" " * (-(8 + n) % 64)
        f.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])


def test_aligned_weights_are_used_in_place(native, model_files, tmp_path):
    out_dir, lib = model_files("mqa64", "q4f32_1")
    realign(out_dir, tmp_path / "aligned")
    args = ("--prompt-ids", "9,8,7", "--max-new-tokens", "8")
    mapped, original = run_json(native, tmp_path / "aligned", lib, *args), run_json(native, out_dir, lib, *args)
    assert mapped["mapped_weight_bytes"] > 0 and mapped["token_ids"] == original["token_ids"]
    total = original["mapped_weight_bytes"] + original["copied_weight_bytes"]
    assert mapped["mapped_weight_bytes"] + mapped["copied_weight_bytes"] == total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_repacked_weights_sit_on_huge_page_memory(native, model_files):
    """The repacked int8 weights lie in memory advised for huge pages (runtime/hugepages.py), all of them."""
    import tvm

    from gptbc.runtime.runner import load_library, param_bytes

    out_dir, lib = model_files("mqa64", "q4f32_1")
    meta = load_library(lib, tvm.cpu(0))[1]
    repacked = sum(param_bytes(p) for p in meta["params"] if p.get("repack"))
    got = run_json(native, out_dir, lib, "--prompt-ids", "9,8,7", "--max-new-tokens", "4")
    assert repacked > 0 and got["huge_page_weight_bytes"] == repacked


# ---- sampling ----

def nucleus(logits: np.ndarray, temperature: float, top_p: float) -> set[int]:
    """The tokens top-p sampling may pick (sampling.py's rule)."""
    x = logits.astype(np.float64) / temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cut = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
    return set(order[:cut].tolist())


def test_sampling(native, model_files):
    out_dir, lib = model_files("mqa64", "q0f32")
    engine = Engine(out_dir, lib, prefix_cache_size=0)
    ids = prompt(12, engine.config.vocab_size, seed=7)
    greedy = engine.generate(ids, MAX_NEW)
    base = ("--prompt-ids", ids_arg(ids), "--max-new-tokens", str(MAX_NEW))

    def sample(*args: str) -> list[int]:
        return run_json(native, out_dir, lib, *base, *args)["token_ids"]

    # Settings that leave one candidate are greedy, whatever the seed.
    assert sample("--temperature", "0", "--seed", "1") == greedy
    assert sample("--temperature", "1", "--top-p", "1e-9", "--seed", "2") == greedy
    assert sample("--temperature", "1", "--top-k", "1", "--seed", "3") == greedy
    assert sample("--temperature", "1e-300", "--seed", "4") == greedy  # tiny temperatures are greedy, as in Python
    # A seed fixes the tokens; different seeds at a high temperature give different ones.
    hot = [sample("--temperature", "2", "--seed", str(s)) for s in (11, 11, 12, 13)]
    assert hot[0] == hot[1] and len({tuple(h) for h in hot}) == 3
    assert all(0 <= t < engine.config.vocab_size for h in hot for t in h)
    # Every first token drawn with top-p lies in the nucleus of the engine's own logits.
    seq = engine.runner.add_sequence()
    allowed = nucleus(engine.runner.prefill(seq, ids), 2.0, 0.6)
    engine.runner.remove_sequence(seq)
    firsts = {run_json(native, out_dir, lib, "--prompt-ids", ids_arg(ids), "--max-new-tokens", "1", "--temperature",
                       "2", "--top-p", "0.6", "--seed", str(s))["token_ids"][0] for s in range(12)}
    assert firsts <= allowed and (len(firsts) > 1 or len(allowed) == 1)


def test_generation_config_sampling_defaults(native, model_files, tmp_path):
    out_dir, lib = model_files("mqa64", "q0f32")
    copy = tmp_path / "model"
    shutil.copytree(out_dir, copy)
    (copy / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 1, "max_new_tokens": 5}))
    engine = Engine(copy, lib, prefix_cache_size=0)
    assert engine.sampling() == SamplingParams(temperature=1.0, top_k=1, max_new_tokens=5)
    got = run_json(native, copy, lib, "--prompt-ids", "4,5,6")
    assert got["token_ids"] == engine.generate([4, 5, 6], greedy=None)


# ---- tokenizer: the same ids and text as `tokenizers` ----

FIXED = [
    "", " ", "  ", "\n", "\t", "x", "'", "''s", "it's they're we've I'm you'll he'd 'S 'LL", "don't  'tis",
    "def fibonacci(n):\n    return n", "    \n\n    \t\t  x", "a  b   c    d", "trailing   ", "   leading",
    "\r\n\r\n", "a\r\nb\rc", "x\u00a0y\u00a0\u00a0z", "\u2000\u2001\u2002a\u3000b", "\u0085\u2028\u2029next",
    "\u001c\u001d\u001e\u001f sep", "\u180e\u200b\u200d\ufeffzero", "\x00\x01\x07\x7f ctrl",
    "0", "7", "123", "1234567890", "3.14159", "x1y22z333", "v2.0.1-rc3", "0x1F 0b101 1e-9", " 42 ", "a 1 b 22",
    "٣٤٥ ১২৩ ४५६", "Ⅻ ⅷ ½ ¾ ² ³ ①", "x² + y³", "１２３ ＡＢＣ",
    "héllo wörld", "ünïcode — “quotes” ‘single’ …", "你好，世界！", "日本語のテキスト", "한국어 텍스트",
    "Здравствуй, мир", "Γειά σου κόσμε", "مرحبا بالعالم", "שלום עולם", "हिन्दी", "ไทย", "e\u0301 a\u0308 n\u0303",
    "🚀🔥👍🏽 👨‍👩‍👧", "emoji🙂inline", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛", "\x00\x01x\x02\x03\x04\x05\x06\x07\x08\x09y\x00",
    "zzqq zzqq\nzzqq xzzqq",
    "<fim-prefix>", "<fim-prefix>def f(x):\n    <fim-suffix>\n    return y<fim-middle>",
    "<fim_prefix>a<fim_suffix>b<fim_middle>", "<|endoftext|>", "<|endoftext|><|endoftext|>x<|endoftext|>",
    "a<fim-prefix", "<fim-prefix<fim-prefix>>", "<fim-pad><fim_pad>", " <fim-middle> ", "x<fim-prefix>x",
    "print('hello, world')", 'printf("%d\\n", i);', "for (int i = 0; i < 10; ++i) { x += i; }",
    "if a == b && c != d || !e:", "x = [1, 2, 3].map((v) => v * 2);", "#include <stdio.h>", "// TODO: fix",
    "SELECT * FROM t WHERE id = 42;", "$ ls -la | grep foo", "@decorator\ndef g(): ...", "a_b_c __init__",
    " " * 40 + "deep", "\n" * 12, "x" * 300, "9" * 50, "!" * 30 + "?" * 5, "ab" * 100,
]


def random_strings(count: int, seed: int) -> list[str]:
    """Mixes of the pieces that exercise each pre-tokenizer rule."""
    pieces = ["a", "Z", "word", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "1", "42", "٣", "½", "'s", "'",
              "'ll", ".", "(", ")", "==", "->", "é", "ß", "你", "好", "🚀", "\u0301", "_", "-", "<", ">",
              "<fim-prefix>", "<fim_middle>", "<|endoftext|>", "def", "return", "x1"]
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(pieces, size=int(rng.integers(1, 25)))) for _ in range(count)]


CORPUS_STRINGS = FIXED + list(dict.fromkeys(CORPUS)) + [line for text in CORPUS[:4] for line in text.split("\n")] \
    + random_strings(150, seed=0)


def edited(src: Path, dst: Path, edit) -> Path:
    data = json.loads(src.read_text("utf-8"))
    edit(data)
    dst.write_text(json.dumps(data), "utf-8")
    return dst


def legacy_byte_level_only(data: dict) -> None:
    """GPT-2 style: ByteLevel alone, merges written as "a b" strings, add_prefix_space on."""
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]


def grouped_digits_and_added_tokens(data: dict) -> None:
    data["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False
    top = len(data["model"]["vocab"])
    extra = [("<fim-prefix>x", False, False), ("aĠb", True, False), (" zz", False, False), ("<sep>", False, True)]
    for i, (content, normalized, special) in enumerate(extra):
        data["added_tokens"].append({"id": top + i, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": normalized, "special": special})


def ignore_merges(data: dict) -> None:
    """A word that is a whole token skips the merges: give it words no merge sequence reaches."""
    data["model"]["ignore_merges"] = True
    vocab = data["model"]["vocab"]
    for word in ("zzqq", "Ġzzqq", "Ċzzqq"):
        vocab[word] = len(vocab)


def unknown_bytes(data: dict) -> None:
    """Control bytes 0x00..0x08 missing from the vocabulary: they become one fused unk token."""
    gone = {chr(0x100 + b) for b in range(9)}
    merges = [m if isinstance(m, list) else m.split(" ") for m in data["model"]["merges"]]
    assert not any(set(a + b) & gone for a, b in merges)
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in gone}
    data["model"].update(unk_token="<|endoftext|>", fuse_unk=True)


def many_merges(data: dict, count: int = 20000) -> None:
    """A vocabulary the size of a real one: random merges of existing tokens (seeded), so that thousands of
    merge ranks compete inside every word."""
    rng = np.random.default_rng(2)
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    added = {t["content"] for t in data["added_tokens"]}
    tokens = [t for t in vocab if t not in added]
    while len(merges) < count:
        a, b = tokens[rng.integers(0, max(300, len(tokens) // 2))], tokens[rng.integers(0, len(tokens))]
        if a + b not in vocab and len(a + b) <= 12:
            vocab[a + b] = len(vocab)
            tokens.append(a + b)
            merges.append([a, b])


@pytest.fixture(scope="module")
def tokenizer_files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    big = root / "big"
    make_tokenizer(big, fim="dash", vocab_size=2000)  # many more merges than the models' 320-token ones
    dash = tiny_model("mqa64").out_dir / "tokenizer.json"
    return {
        "dash": dash,
        "underscore": tiny_model("mha32").out_dir / "tokenizer.json",
        "big": big / "tokenizer.json",
        "byte-level-only": edited(big / "tokenizer.json", root / "legacy.json", legacy_byte_level_only),
        "grouped-digits": edited(dash, root / "grouped.json", grouped_digits_and_added_tokens),
        "20k-merges": edited(dash, root / "many.json", many_merges),
        "ignore-merges": edited(big / "tokenizer.json", root / "ignore.json", ignore_merges),
        "unknown-bytes": edited(dash, root / "unk.json", unknown_bytes),
    }


def tokenize(exe: Path, path: Path, mode: str, lines: list[str]) -> list[str]:
    done = subprocess.run([str(exe / "gptbc-tokenize"), str(path), mode], input="".join(f"{l}\n" for l in lines),
                          capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout.split("\n")[:-1]
    assert len(out) == len(lines)
    return out


@pytest.mark.parametrize("variant", ["dash", "underscore", "big", "byte-level-only", "grouped-digits", "20k-merges",
                                     "ignore-merges", "unknown-bytes"])
def test_tokenizer_matches_tokenizers(variant, tokenizer_files, native_asan):
    from tokenizers import Tokenizer

    assert len(CORPUS_STRINGS) >= 200
    path = tokenizer_files[variant]
    ref = Tokenizer.from_file(str(path))
    got = tokenize(native_asan, path, "encode", [json.dumps(s) for s in CORPUS_STRINGS])
    mismatched = [(s, want, ids) for s, ids in zip(CORPUS_STRINGS, got)
                  if (want := ref.encode(s, add_special_tokens=False).ids) != [int(i) for i in ids.split()]]
    assert not mismatched, f"{len(mismatched)} strings differ, first: {mismatched[0]}"

    # Decoding: every id alone, then random sequences (byte tokens split characters: U+FFFD where invalid).
    size = ref.get_vocab_size(with_added_tokens=True)
    rng = np.random.default_rng(1)
    seqs = [[i] for i in range(size)] + [rng.integers(0, size, int(rng.integers(1, 30))).tolist() for _ in range(200)]
    seqs += [ref.encode(s, add_special_tokens=False).ids for s in CORPUS_STRINGS]
    got = [json.loads(line) for line in tokenize(native_asan, path, "decode", [" ".join(map(str, s)) for s in seqs])]
    mismatched = [(s, ref.decode(s, skip_special_tokens=False), g) for s, g in zip(seqs, got)
                  if ref.decode(s, skip_special_tokens=False) != g]
    assert not mismatched, f"{len(mismatched)} id sequences decode differently, first: {mismatched[0]}"


def test_release_build_tokenizes_alike(tokenizer_files, native):
    from tokenizers import Tokenizer

    path = tokenizer_files["big"]
    ref = Tokenizer.from_file(str(path))
    got = tokenize(native, path, "encode", [json.dumps(s) for s in CORPUS_STRINGS])
    assert [[int(i) for i in g.split()] for g in got] == [ref.encode(s, add_special_tokens=False).ids
                                                          for s in CORPUS_STRINGS]


# ---- bad input: one line on stderr, exit status 1, no crash (under AddressSanitizer) ----

def corrupt(out_dir: Path, dst: Path, how: str) -> Path:
    shutil.copytree(out_dir, dst)
    shard = sorted(dst.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if how == "huge-length":
        shard.write_bytes(struct.pack("<Q", 1 << 62) + raw[8:])
    elif how == "garbage-header":
        shard.write_bytes(raw[:8] + b"{\"x\": [1, 2" + b"#" * (n - 11) + raw[8 + n:])
    elif how == "nested-header":
        shard.write_bytes(raw[:8] + b"[" * n + raw[8 + n:])
    elif how == "truncated":
        shard.write_bytes(raw[:len(raw) // 2])
    elif how == "tiny":
        shard.write_bytes(raw[:5])
    elif how == "missing":
        shard.unlink()
    elif how == "bad-offsets":
        header = json.loads(raw[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        text = json.dumps(header).encode()
        shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return dst


@pytest.fixture(scope="module")
def bad_inputs(model_files, tmp_path_factory):
    """name → (argv after gptbc-run, what the one-line error must contain)."""
    root = tmp_path_factory.mktemp("bad")
    out_dir, lib = model_files("mqa64", "q0f32")
    _, q4_lib = model_files("mqa64", "q4f32_1")
    mha_dir, mha_lib = model_files("mha64", "q0f32")
    ok = ["--model", str(out_dir), "--lib", str(lib)]
    ids = ["--prompt-ids", "1,2,3"]
    (root / "not-a-lib.so").write_text("hello")
    (root / "cut.so").write_bytes(lib.read_bytes()[:lib.stat().st_size // 2])  # SIGBUS in dlopen, unchecked
    # one rank of a 2-way tensor-parallel model, and weights presharded for it: the manifests agree, but gptbc-run
    # runs one device (the field written over the library's metadata in place, at the same length)
    blob = lib.read_bytes()
    assert blob.count(b'"batch_invariant": false') == 1
    (root / "rank.so").write_bytes(blob.replace(b'"batch_invariant": false', b'"tensor_parallel": 2    '))
    shutil.copytree(out_dir, root / "presharded")
    edited(root / "presharded" / "gptbc-config.json", root / "presharded" / "gptbc-config.json",
           lambda c: c.update(tensor_parallel=2))
    cases = {
        "missing model dir": (["--model", str(root / "nope"), "--lib", str(lib), *ids], "no gptbc-config.json"),
        "missing lib": (["--model", str(out_dir), "--lib", str(root / "nope.so"), *ids], "nope.so: file not found"),
        "not a library": (["--model", str(out_dir), "--lib", str(root / "not-a-lib.so"), *ids],
                          "not a gptbc model library"),
        "other quantization": (["--model", str(out_dir), "--lib", str(q4_lib), *ids],
                               f"was compiled for quantization q4f32_1, but the weights in {out_dir} are q0f32"),
        "other model": (["--model", str(mha_dir), "--lib", str(lib), *ids],
                        f"--lib {lib} was compiled for multi_query true, but the weights in {mha_dir} have "
                        f"multi_query false; a library runs only the model it was compiled for"),
        "tensor-parallel library": (["--model", str(root / "presharded"), "--lib", str(root / "rank.so"), *ids],
                                    f"--lib {root / 'rank.so'} is one rank of a --tensor-parallel 2 model; gptbc-run "
                                    f"runs one device (run it with `gptbc generate --tensor-parallel 2`)"),
        "truncated library": (["--model", str(out_dir), "--lib", str(root / "cut.so"), *ids],
                              f"--lib {root / 'cut.so'}: truncated or damaged (segment "),
        "bad token id": ([*ok, "--prompt-ids", "1,320"], "token id 320 at position 1 is outside the vocabulary"),
        "bad ids": ([*ok, "--prompt-ids", "1,x"], "expected comma-separated integers"),
        "empty ids": ([*ok, "--prompt-ids", ","], "prompt is empty"),
        "too long": ([*ok, "--prompt-ids", ",".join(["1"] * 120), "--max-new-tokens", "20"],
                     "exceeds the context window of 128 tokens"),
        "two prompts": ([*ok, *ids, "--prompt", "x"], "exactly one of --prompt and --prompt-ids"),
        "no prompt": (ok, "exactly one of --prompt and --prompt-ids"),
        "unknown flag": ([*ok, *ids, "--frobnicate"], "unknown option --frobnicate"),
        "missing value": ([*ok, *ids, "--max-new-tokens"], "--max-new-tokens needs a value"),
        "bad number": ([*ok, *ids, "--max-new-tokens", "ten"], "--max-new-tokens expects an integer"),
        # The same ranges and wording as the Python engine's (sampling.RANGES).
        "negative temperature": ([*ok, *ids, "--temperature", "-1"], "temperature must be " + RANGES["temperature"].rule),
        "temperature above 2": ([*ok, *ids, "--temperature", "2.5"], "temperature must be " + RANGES["temperature"].rule),
        "zero top-p": ([*ok, *ids, "--top-p", "0"], "top-p must be " + RANGES["top_p"].rule),
        "negative top-k": ([*ok, *ids, "--top-k", "-1"], "top-k must be " + RANGES["top_k"].rule),
        "text without tokenizer": (["--model", str(mha_dir), "--lib", str(mha_lib), "--prompt", "x"],
                                   "no tokenizer.json"),
        "bad device": ([*ok, *ids, "--device", "cuda:x"], "expected cpu, vulkan or cuda, optionally with :INDEX"),
        # Without the NVIDIA driver, TVM's CUDA runtime cannot load; with it, a CPU library is refused there.
        "cuda device": ([*ok, *ids, "--device", "cuda"], "libcuda.so.1" if not has_nvidia_driver() else
                        "was built for cpu (--target cpu), not for device cuda; run it with --device cpu"),
    }
    for how in ["huge-length", "garbage-header", "nested-header", "truncated", "tiny", "missing", "bad-offsets"]:
        d = corrupt(out_dir, root / how, how)
        want = {"missing": "cannot open (No such file or directory)", "bad-offsets": "data offsets do not match",
                "truncated": "data offsets do not match", "tiny": "shorter than its 8-byte header length"}
        cases[f"safetensors {how}"] = (["--model", str(d), "--lib", str(lib), *ids],
                                       want.get(how, "corrupt safetensors header"))
    for name, edit, want in [
        ("config not json", lambda d: (d / "gptbc-config.json").write_text("{oops"),
         "gptbc-config.json: not valid JSON"),
        ("tokenizer not json", lambda d: (d / "tokenizer.json").write_text("[1,"), "tokenizer.json: not valid JSON"),
        ("unsupported tokenizer", lambda d: edited(d / "tokenizer.json", d / "tokenizer.json", lambda t: t.update(
            pre_tokenizer={"type": "Whitespace"})), "pre_tokenizer type Whitespace is not supported by gptbc-run"),
        ("tokenizer normalizer", lambda d: edited(d / "tokenizer.json", d / "tokenizer.json", lambda t: t.update(
            normalizer={"type": "NFC"})), "a normalizer is not supported by gptbc-run"),
        ("wrong tensor shape", lambda d: edited(d / "gptbc-config.json", d / "gptbc-config.json", lambda c: c[
            "params"][0].update(shape=[1, 2])), "expects float32[320, 128]"),
        ("newer weights", lambda d: edited(d / "gptbc-config.json", d / "gptbc-config.json", lambda c: c.update(
            schema_version=99)), "with schema_version 99; this gptbc reads schema versions 1 to 2"),
        # a library runs only its own model's weights, even where every tensor it takes fits
        ("more layers", lambda d: edited(d / "gptbc-config.json", d / "gptbc-config.json", lambda c: c[
            "model_config"].update(n_layer=3)), "was compiled for n_layer 2, but the weights in {dir} have n_layer 3"),
        ("other activation", lambda d: edited(d / "gptbc-config.json", d / "gptbc-config.json", lambda c: c[
            "model_config"].update(activation_function="relu")),
         "was compiled for activation_function gelu_pytorch_tanh, but the weights in {dir} have activation_function "
         "relu"),
        ("extra tensor", lambda d: edited(d / "gptbc-config.json", d / "gptbc-config.json", lambda c: c[
            "params"].append({**c["params"][-1], "name": "transformer.h.2.ln_1.weight"})),
         "{dir}/gptbc-config.json: tensor transformer.h.2.ln_1.weight is not one --lib {lib} takes"),
    ]:
        d = root / name.replace(" ", "-")
        shutil.copytree(out_dir, d)
        edit(d)
        cases[name] = (["--model", str(d), "--lib", str(lib), "--prompt", "x"], want.format(dir=d, lib=lib))
    return cases


BAD = ["missing model dir", "missing lib", "not a library", "other quantization", "other model", "bad token id",
       "bad ids", "empty ids", "too long", "two prompts", "no prompt", "unknown flag", "missing value", "bad number",
       "negative temperature", "temperature above 2", "zero top-p", "negative top-k", "text without tokenizer",
       "bad device", "cuda device", "config not json", "tokenizer not json",
       "unsupported tokenizer", "tokenizer normalizer", "wrong tensor shape", "newer weights", "more layers",
       "other activation", "extra tensor", "truncated library", "tensor-parallel library"] + [
    f"safetensors {h}" for h in ["huge-length", "garbage-header", "nested-header", "truncated", "tiny", "missing",
                                 "bad-offsets"]]


def has_nvidia_driver() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_error(case, bad_inputs, native_asan):
    argv, want = bad_inputs[case]
    done = subprocess.run([str(native_asan / "gptbc-run"), *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ASAN_OPTIONS": "abort_on_error=0:exitcode=99"})
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert want in lines[0]
    assert done.stdout == ""


def test_invalid_utf8_prompt(model_files, native_asan):
    out_dir, lib = model_files("mqa64", "q0f32")
    done = subprocess.run([str(native_asan / "gptbc-run"), "--model", str(out_dir), "--lib", str(lib), "--prompt",
                           b"ab\xff\xfe"], capture_output=True, timeout=120)
    assert done.returncode == 1 and done.stderr == b"error: the prompt is not valid UTF-8\n"


def test_asan_build_generates_like_the_release_build(native, native_asan, model_files):
    out_dir, lib = model_files("mqa32", "q0f32")  # chunked prefill
    args = ("--prompt-ids", ids_arg(prompt(40, 320, seed=3)), "--max-new-tokens", "12")
    plain = run_json(native, out_dir, lib, *args)
    checked = run(native_asan, out_dir, lib, *args, "--json")
    assert checked.returncode == 0 and checked.stderr == b"", checked.stderr.decode()[-3000:]
    assert json.loads(checked.stdout)["token_ids"] == plain["token_ids"]


def test_cuda_support_is_optional_and_says_so(model_files, tmp_path):
    """-DGPTBC_CUDA=OFF (or no libtvm_runtime_cuda in the wheel): configure says so, --device cuda says so."""
    from native_build import cmake

    build_dir = build(tmp_path / "build", "-DGPTBC_CUDA=OFF", target="gptbc-run")
    configure = cmake("-S", ".", "-B", str(build_dir), cwd=Path(__file__).resolve().parents[1])
    assert "gptbc-run --device cuda will not be available" in configure.stdout
    out_dir, lib = model_files("mqa64", "q0f32")
    done = run(build_dir, out_dir, lib, "--prompt-ids", "1,2", "--device", "cuda:0")
    assert done.returncode == 1 and done.stderr.decode().strip().splitlines() == [
        "error: --device cuda:0: this gptbc-run was built without CUDA support (CMake found no libtvm_runtime_cuda "
        "beside libtvm_runtime, or -DGPTBC_CUDA=OFF); rebuild it where the TVM wheel has it"]


@pytest.mark.nvcc
def test_a_cuda_library_is_refused_on_the_cpu(tiny_model, native, tmp_path):
    """A library whose kernels are CUDA's (nvcc is here; no GPU is needed to build one) named with --device cpu."""
    from gptbc.artifact.config import resolve_model
    from gptbc.compile.compiler import compile_model

    m = tiny_model("mqa64")
    lib = compile_model(resolve_model(str(m.out_dir)), "cuda:sm_80", "q0f32", tmp_path / "cuda.so",
                        log=lambda _m: None)
    done = run(native, m.out_dir, lib, "--prompt-ids", "1,2")
    assert done.returncode == 1 and done.stderr.decode().strip().splitlines() == [
        f"error: --lib {lib} was built for cuda, not for device cpu: run it with --device cuda"], done.stderr


@pytest.mark.nvcc  # cc, for the libcuda stand-in
def test_cuda_runtime_is_loaded_from_beside_libtvm_runtime(model_files, native, tmp_path):
    """With a driver stand-in that has no device (tests/test_cuda_library.py), gptbc-run loads TVM's CUDA runtime
    from the wheel, which registers the CUDA device, and asks it whether device 0 exists: that is all of
    --device cuda short of a GPU."""
    from test_cuda_library import libcuda_stand_in

    out_dir, lib = model_files("mqa64", "q0f32")
    env = {**os.environ, "LD_LIBRARY_PATH": str(libcuda_stand_in(tmp_path))}
    done = run(native, out_dir, lib, "--prompt-ids", "1,2", "--device", "cuda", env=env)
    assert done.returncode == 1 and done.stderr.decode().strip().splitlines() == [
        "error: --device cuda: no such CUDA device (nvidia-smi lists them)"], done.stderr


# ---- a draft model (--draft): the trained pair, tests/data/trained-tiny verifying, tests/data/draft-tiny drafting ----

DRAFT_CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 2


def test_draft_gives_the_same_tokens_with_fewer_model_steps(native, trained_tiny, draft_tiny):
    """Greedy tokens with --draft equal those without, for prompts ending across 16-token pages, several k, and
    --max-new-tokens cutting an accepted run short; most tokens come from accepted drafts (so verify, the KV cache
    pops and the draft's catch-up all ran)."""
    model, draft = (trained_tiny.out_dir, trained_tiny.lib), ["--draft", str(draft_tiny.out_dir), "--draft-lib",
                                                               str(draft_tiny.lib)]
    accepted = verifies = 0
    for chars, k, max_new in ((20, "4", "40"), (61, "1", "33"), (62, "6", "9"), (100, "3", "40")):
        common = ("--prompt", DRAFT_CODE[:chars], "--max-new-tokens", max_new, "--temperature", "0", "--ignore-eos")
        plain = run_json(native, *model, *common)
        drafted = run_json(native, *model, *common, *draft, "--draft-k", k)
        assert drafted["token_ids"] == plain["token_ids"] and drafted["text"] == plain["text"], (chars, k)
        assert len(drafted["token_ids"]) == int(max_new) and "draft" not in plain
        stats = drafted["draft"]
        assert 0 <= stats["accepted"] <= stats["drafted"] <= stats["verifies"] * int(k)
        accepted, verifies = accepted + stats["accepted"], verifies + stats["verifies"]
    assert verifies > 0 and (accepted + verifies) / verifies > 2  # tokens per verify


def test_draft_refusals_are_one_line(native, trained_tiny, draft_tiny, tmp_path):
    model = (trained_tiny.out_dir, trained_tiny.lib)
    draft = ["--draft", str(draft_tiny.out_dir), "--draft-lib", str(draft_tiny.lib)]
    other = tmp_path / "other"
    shutil.copytree(draft_tiny.out_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][1]["content"] = "<fim_prefix>"  # the underscore spelling of StarCoder
    (other / "tokenizer.json").write_text(json.dumps(tok))
    # the library's metadata as a --batch-invariant build writes it (an attention grain), edited in place
    blob = trained_tiny.lib.read_bytes()
    assert blob.count(b'"batch_invariant": false') == 1
    (tmp_path / "invariant.so").write_bytes(blob.replace(b'"batch_invariant": false', b'"attention_grain": 16   '))
    cases = [(["--prompt-ids", "1,2", "--draft", str(draft_tiny.out_dir)], "--draft needs --draft-lib"),
             (["--prompt-ids", "1,2", *draft, "--temperature", "0.8"], "greedy decoding only"),
             (["--prompt-ids", "1,2;3,4", *draft], "one prompt at a time"),
             (["--prompt-ids", "1,2", *draft, "--draft-k", "0"], "--draft-k must be in 1..16"),
             (["--bench", *draft], "--draft does not apply to --bench"),
             (["--prompt-ids", "1,2", "--draft", str(other), "--draft-lib", str(draft_tiny.lib)],
              "token 1 is \"<fim_prefix>\" there but \"<fim-prefix>\" in the model")]
    for args, message in cases:
        done = run(native, *model, *args)
        err = done.stderr.decode()
        assert done.returncode == 1 and message in err and err.count("\n") == 1, (args, err)
    done = run(native, trained_tiny.out_dir, tmp_path / "invariant.so", "--prompt-ids", "1,2", *draft)
    assert done.returncode == 1 and "--draft with a --batch-invariant library: not supported" in done.stderr.decode()
    assert run(native, trained_tiny.out_dir, tmp_path / "invariant.so", "--prompt-ids", "1,2").returncode == 0
