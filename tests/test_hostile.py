"""Files you cannot trust: hostile checkpoints, indexes, configs, GGUF files and manifests.

Each case is judged as a user (or an attacker) would: non-zero exit, exactly one line `error: ...` naming the
culprit, no traceback, nothing read outside the directory a file names things in, nothing left at -o (its
missing parent directories included). The last tests feed seeded mutations of good files to every reader.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gguf_files import retyped, write_gguf
from gptq_files import write_quantized
from hf_models import edit_config, make_checkpoint
from gptbc.cli import main
from gptbc.errors import GptbcError

SECRET = b"SECRET-BYTES-OUTSIDE-THE-CHECKPOINT"
KQUANT = Path(__file__).parent / "data" / "kquant"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny checkpoint with a tokenizer, made once; tests work on copies (`ckpt`)."""
    return make_checkpoint(tmp_path_factory.mktemp("hostile") / "hf", tokenizer="underscore", n_embd=32, n_head=2,
                           n_layer=1, n_positions=64)


@pytest.fixture()
def ckpt(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "hf"))


@pytest.fixture(scope="module")
def base_gguf(base, tmp_path_factory) -> Path:
    return write_gguf(base, tmp_path_factory.mktemp("hostile-gguf") / "model.gguf", "Q8_0")


def refused(capsys, *argv, out: Path | None = None) -> str:
    """Run the CLI; assert it failed with one `error:` line, no traceback, and (with `out`) nothing left at out,
    nor the parent directories the command would have made for it; return the line."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert SECRET.decode() not in err, err
    if out is not None:
        assert not out.exists(), out
        assert not out.parent.exists() or not list(out.parent.glob(f".{out.name}*")), "a temporary output was left"
    return err


def convert_refused(capsys, source: Path, tmp_path: Path, *flags: str) -> str:
    """convert-weight into a missing nested directory: nothing may be left, not even the directories."""
    out = tmp_path / "new" / "deeper" / "out"
    err = refused(capsys, "convert-weight", source, *flags, "-o", out, "--quiet", out=out)
    assert not (tmp_path / "new").exists(), "convert left the parent directory of -o behind"
    return err


def secret_file(path: Path) -> Path:
    path.write_bytes(SECRET * 4)
    return path


# ---- 1. nothing a file names leaves its directory ----

def shard(ckpt: Path) -> None:
    """Turn the checkpoint into a sharded one: an index naming model-00001-of-00001.safetensors."""
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    names = load_file(str(ckpt / "model-00001-of-00001.safetensors")).keys()
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def point_index(ckpt: Path, target: str) -> None:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = target
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "absolute-valid-weights"])
def test_index_naming_a_file_outside_is_refused(capsys, ckpt, tmp_path, how):
    shard(ckpt)
    outside = secret_file(tmp_path / "outside.safetensors")
    if how == "absolute-valid-weights":  # a real checkpoint outside: converting it would be a silent exit 0
        shutil.copyfile(ckpt / "model-00001-of-00001.safetensors", outside)
    target = {"absolute": str(outside), "absolute-valid-weights": str(outside), "dotdot": "../outside.safetensors",
              "symlink": "link.safetensors"}[how]
    if how == "symlink":
        (ckpt / "link.safetensors").symlink_to(outside)
    point_index(ckpt, target)
    err = convert_refused(capsys, ckpt, tmp_path, "--quantization", "q0f32")
    assert "model.safetensors.index.json" in err and "weight_map[" in err and "outside" in err, err


def test_hub_cache_links_into_blobs_are_followed(ckpt, tmp_path):
    """The Hugging Face cache keeps a snapshot's files as links to ../../blobs: those stay allowed."""
    from gptbc.artifact.convert import convert_weight

    repo = tmp_path / "models--o--n"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc"
    shutil.copytree(ckpt, snapshot)
    shard(snapshot)
    blob = repo / "blobs" / "0123"
    (snapshot / "model-00001-of-00001.safetensors").rename(blob)
    (snapshot / "model-00001-of-00001.safetensors").symlink_to(Path("../../blobs/0123"))
    convert_weight(snapshot, "q0f32", tmp_path / "out", progress=False)


def test_tensor_in_two_shards_is_refused(capsys, ckpt, tmp_path):
    shard(ckpt)
    shutil.copyfile(ckpt / "model-00001-of-00001.safetensors", ckpt / "extra.safetensors")
    point_index(ckpt, "extra.safetensors")
    err = convert_refused(capsys, ckpt, tmp_path, "--quantization", "q0f32")
    assert "is also in" in err and "safetensors" in err


def test_index_weight_map_of_another_type_is_one_line(capsys, ckpt, tmp_path):
    shard(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    err = convert_refused(capsys, ckpt, tmp_path, "--quantization", "q0f32")
    assert "model.safetensors.index.json" in err and "weight_map" in err


def converted(ckpt: Path, tmp_path: Path) -> Path:
    from gptbc.artifact.convert import convert_weight

    return convert_weight(ckpt, "q0f32", tmp_path / "w", progress=False)


def edit_manifest(out: Path, **param0) -> None:
    meta = json.loads((out / "gptbc-config.json").read_text())
    meta["params"][0].update(param0)
    (out / "gptbc-config.json").write_text(json.dumps(meta))


def test_manifest_file_linking_outside_is_refused(capsys, ckpt, tmp_path):
    out = converted(ckpt, tmp_path)
    name = json.loads((out / "gptbc-config.json").read_text())["params"][0]["file"]
    (out / name).unlink()
    (out / name).symlink_to(secret_file(tmp_path / "secret.safetensors"))
    err = refused(capsys, "compile", "--model", out, "-o", tmp_path / "lib" / "x.so", out=tmp_path / "lib" / "x.so")
    assert "gptbc-config.json" in err and "params[0].file" in err and "outside" in err
    assert not (tmp_path / "lib").exists()


@pytest.mark.parametrize("change, words", [({"shape": [2 ** 64]}, "params[0].shape"),
                                           ({"shape": [2 ** 30, 2 ** 30]}, "params[0].shape"),
                                           ({"dtype": "float1024"}, "params[0].dtype")])
def test_manifest_param_of_impossible_shape_or_dtype(capsys, ckpt, tmp_path, change, words):
    out = converted(ckpt, tmp_path)
    edit_manifest(out, **change)
    err = refused(capsys, "compile", "--model", out, "-o", tmp_path / "x.so")
    assert "gptbc-config.json" in err and words in err


# ---- 2. counts and sizes checked against the file before use ----

def write_raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", claimed: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data)
    return path


@pytest.mark.parametrize("header, data, claimed, words", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2 ** 62, "claims"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "inside the file"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"a": {"dtype": "F1024", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype"),
    ({"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape"),
    ({"a": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62], "data_offsets": [0, 8]}}, b"\0" * 8, None, "span"),
    ({"a": ["not", "an", "object"]}, b"", None, "not an object"),
    ({"x" * 5_000_000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "overlap"),
    (b"[" * 100_000 + b"]" * 100_000, b"", None, "nested"),
], ids=["header-length", "outside-data", "overlap", "dtype", "negative-shape", "overflowing-shape", "entry-type",
        "5MB-name", "deep"])
def test_corrupt_safetensors_headers(capsys, ckpt, tmp_path, header, data, claimed, words):
    write_raw_safetensors(ckpt / "model.safetensors", header, data, claimed)
    err = convert_refused(capsys, ckpt, tmp_path, "--quantization", "q0f32")
    assert "model.safetensors" in err and words in err and len(err) <= 300, err[:400]


def gguf_value_at(data: bytes, key: str) -> int:
    """Byte offset of the value type of metadata `key` in a GGUF header."""
    k = key.encode()
    at = data.index(struct.pack("<Q", len(k)) + k)
    return at + 8 + len(k)


def patched_gguf(src: Path, path: Path, key: str, fmt: str, value, skip: int = 4) -> Path:
    """A copy of `src` with the bytes after metadata `key`'s value type (+ `skip`) overwritten by `value`."""
    data = bytearray(src.read_bytes())
    at = gguf_value_at(bytes(data), key) + skip
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))
    return path


def test_gguf_array_claiming_2_to_the_40_elements_fails_at_once_in_little_memory(base_gguf, tmp_path):
    """Run as a user would, in a process limited to 3 GB of address space: a reader that trusts the count
    allocates past it (or loops for hours over the end of the file)."""
    bad = patched_gguf(base_gguf, tmp_path / "huge.gguf", "tokenizer.ggml.token_type", "<Q", 2 ** 40, skip=8)
    assert bad.stat().st_size < 300_000
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from gptbc.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "convert-weight", str(bad), "-o", str(tmp_path / "o"),
                           "--quiet"], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "tokenizer.ggml.token_type" in err and "1099511627776" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key, fmt, value, words", [
    ("starcoder.block_count", "<I", 10 ** 9, "n_layer 1000000000 is larger"),
    ("starcoder.embedding_length", "<I", 0, "n_embd must be positive"),
    ("starcoder.attention.layer_norm_epsilon", "<f", float("nan"), "layer_norm_epsilon"),
    ("tokenizer.ggml.eos_token_id", "<I", 10 ** 6, "eos_token_id 1000000"),
])
def test_gguf_metadata_out_of_range(capsys, base_gguf, tmp_path, key, fmt, value, words):
    bad = patched_gguf(base_gguf, tmp_path / "bad.gguf", key, fmt, value)
    err = convert_refused(capsys, bad, tmp_path)
    assert "bad.gguf" in err and words in err, err


def test_gguf_counts_and_offsets_past_the_file(capsys, base_gguf, tmp_path):
    data = bytearray(base_gguf.read_bytes())
    bad = tmp_path / "bad.gguf"
    struct.pack_into("<Q", data, 8, 2 ** 60)  # tensor count
    bad.write_bytes(bytes(data))
    assert "tensor count" in convert_refused(capsys, bad, tmp_path)
    data = bytearray(base_gguf.read_bytes())
    struct.pack_into("<Q", data, gguf_value_at(bytes(data), "general.architecture") + 4, 2 ** 50)  # string length
    bad.write_bytes(bytes(data))
    assert "string length" in convert_refused(capsys, bad, tmp_path)


def tensor_info_offset(path: Path, name: str) -> int:
    """Byte offset of tensor `name`'s data offset field in the GGUF header."""
    import gguf

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape) + 4


def test_gguf_overlapping_tensors(capsys, base_gguf, tmp_path):
    data = bytearray(base_gguf.read_bytes())
    (up,) = struct.unpack_from("<Q", data, tensor_info_offset(base_gguf, "blk.0.ffn_up.weight"))
    struct.pack_into("<Q", data, tensor_info_offset(base_gguf, "blk.0.ffn_down.weight"), up + 64)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    err = convert_refused(capsys, bad, tmp_path)
    assert "overlap" in err and "blk.0.ffn_up.weight" in err and "blk.0.ffn_down.weight" in err


def rewritten_gguf(src: Path, path: Path, **meta) -> Path:
    """A copy of GGUF `src` with metadata keys replaced (`tokenizer_ggml_tokens=` for tokenizer.ggml.tokens)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(path), "starcoder")
    changes = {k.replace("__", ".").replace("_ggml_", ".ggml."): v for k, v in meta.items()}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(key, changes.pop(key, field.contents()), field.types[0], sub)
    for key, value in changes.items():
        w.add_key_value(key, value, gguf.GGUFValueType.UINT32)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_vocabulary_that_disagrees_with_the_embedding(capsys, base_gguf, tmp_path):
    import gguf

    tokens = gguf.GGUFReader(str(base_gguf)).fields["tokenizer.ggml.tokens"].contents()
    types = [1] * (len(tokens) - 5)
    short = rewritten_gguf(base_gguf, tmp_path / "short.gguf", tokenizer_ggml_tokens=tokens[:-5],
                           tokenizer_ggml_token_type=types)
    err = convert_refused(capsys, short, tmp_path)
    assert f"{len(tokens) - 5} tokens" in err and f"token_embd has {len(tokens)} rows" in err
    vocab = rewritten_gguf(base_gguf, tmp_path / "vocab.gguf", **{"starcoder__vocab_size": len(tokens) + 1})
    assert "starcoder.vocab_size" in convert_refused(capsys, vocab, tmp_path)


@pytest.mark.parametrize("merge", ["nospace", "a b c", "zzzz qqqq"])
def test_gguf_malformed_merges(capsys, base_gguf, tmp_path, merge):
    import gguf

    merges = gguf.GGUFReader(str(base_gguf)).fields["tokenizer.ggml.merges"].contents()
    bad = rewritten_gguf(base_gguf, tmp_path / "bad.gguf", tokenizer_ggml_merges=merges[:3] + [merge] + merges[3:])
    err = convert_refused(capsys, bad, tmp_path)
    assert "tokenizer.ggml.merges[3]" in err and merge in err


# ---- 3. config fields: type, finite, range ----

@pytest.mark.parametrize("change, words", [
    ({"n_head": "4"}, "n_head must be an integer, got '4'"),
    ({"n_layer": 10 ** 9}, "n_layer 1000000000 is larger than gptbc allows"),
    ({"vocab_size": 10 ** 12}, "vocab_size 1000000000000 is larger than gptbc allows"),
    ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon must be a finite number, got nan"),
    ({"layer_norm_epsilon": float("inf")}, "layer_norm_epsilon must be a finite number"),
    ({"multi_query": "yes"}, "multi_query must be true or false"),
    ({"eos_token_id": [0, "1"]}, "eos_token_id must be an integer or a list of integers"),
    ({"n_embd": 3.5}, "n_embd must be an integer, got 3.5"),
    ({"architectures": 5, "model_type": "gpt2"}, "config.json"),
])
def test_config_fields(capsys, ckpt, tmp_path, change, words):
    edit_config(ckpt, **change)
    err = convert_refused(capsys, ckpt, tmp_path, "--quantization", "q0f32")
    assert f"{ckpt / 'config.json'}: " in err and words in err, err
    assert words in refused(capsys, "compile", "--model", ckpt, "-o", tmp_path / "x.so")


def test_config_nested_absurdly_deep(capsys, ckpt, tmp_path):
    (ckpt / "config.json").write_text('{"model_type": "gpt_bigcode", "x": ' + "[" * 10_000 + "]" * 10_000 + "}")
    err = convert_refused(capsys, ckpt, tmp_path, "--quantization", "q0f32")
    assert "config.json" in err and "nested too deeply" in err


# ---- GPTQ / AWQ layouts against their settings ----

def test_gptq_group_size_that_disagrees_with_the_tensors(capsys, ckpt, tmp_path):
    src = write_quantized(ckpt, tmp_path / "gptq", group_size=32)
    settings = json.loads((src / "quantize_config.json").read_text())
    (src / "quantize_config.json").write_text(json.dumps({**settings, "group_size": 16}))
    err = convert_refused(capsys, src, tmp_path)
    assert "group_size 16" in err and ".qzeros" in err
    (src / "quantize_config.json").write_text(json.dumps({**settings, "group_size": "32"}))
    assert "group_size must be an integer, got '32'" in convert_refused(capsys, src, tmp_path)


@pytest.mark.parametrize("method, tensor", [("gptq", "qzeros"), ("awq", "qweight"), ("gptq", "scales")])
def test_misshaped_packed_tensors(capsys, ckpt, tmp_path, method, tensor):
    src = write_quantized(ckpt, tmp_path / method, method=method)
    tensors = load_file(str(src / "model.safetensors"))
    name = f"transformer.h.0.mlp.c_fc.{tensor}"
    tensors[name] = np.ascontiguousarray(tensors[name][:, : tensors[name].shape[1] // 2])
    save_file(tensors, str(src / "model.safetensors"))
    err = convert_refused(capsys, src, tmp_path)
    assert name in err and "group_size" in err, err


# ---- 4. NaN and infinities refused, unless asked for ----

def poison(ckpt: Path, name: str, values: dict[int, float]) -> None:
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    flat = tensors[name].reshape(-1)
    for i, v in values.items():
        flat[i] = v
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("scheme", ["q0f32", "q4f32_1", "q8f16_1", "q4f16_a"])
def test_non_finite_weights_are_refused_naming_the_tensor_and_count(capsys, ckpt, tmp_path, scheme):
    poison(ckpt, "transformer.h.0.mlp.c_fc.weight", {3: float("nan"), 70: float("inf"), 71: -float("inf")})
    err = convert_refused(capsys, ckpt, tmp_path, "--quantization", scheme)
    assert "transformer.h.0.mlp.c_fc.weight" in err and "3 NaN or infinite values" in err
    assert "--allow-non-finite" in err


def test_out_of_range_for_float16_is_refused(capsys, ckpt, tmp_path):
    poison(ckpt, "transformer.h.0.ln_1.bias", {0: 1e6})
    err = convert_refused(capsys, ckpt, tmp_path, "--quantization", "q0f16")
    assert "transformer.h.0.ln_1.bias" in err and "1 values outside the range of float16" in err


@pytest.mark.parametrize("scheme", ["q0f16", "q4f32_1", "q4f16_a", "q8f16_1"])
def test_allow_non_finite_converts_without_numpy_warnings(ckpt, tmp_path, scheme):
    from gptbc.artifact.convert import convert_weight

    poison(ckpt, "transformer.h.0.mlp.c_fc.weight", {3: float("nan"), 70: float("inf")})
    poison(ckpt, "transformer.h.0.attn.c_proj.weight", {5: 1e30})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning from numpy fails the test
        convert_weight(ckpt, scheme, tmp_path / "w", progress=False, allow_non_finite=True)
    assert main(["convert-weight", str(ckpt), "--quantization", scheme, "-o", str(tmp_path / "cli"), "--quiet",
                 "--allow-non-finite"]) == 0


def test_model_anywhere_refuses_non_finite_unless_allowed(ckpt, tmp_path, monkeypatch):
    """serve/generate/check MODEL convert through prepare: the same refusal there, and --allow-non-finite passed on
    to the converter; the refused conversion leaves no cache entry behind."""
    from gptbc.artifact import cache
    from gptbc.prepare import converted

    monkeypatch.setenv("GPTBC_CACHE_DIR", str(tmp_path / "cache"))
    poison(ckpt, "transformer.h.0.mlp.c_fc.weight", {3: float("nan")})
    with pytest.raises(GptbcError, match="transformer.h.0.mlp.c_fc.weight.*--allow-non-finite"):
        converted(str(ckpt), "q4f32_1", False, 1, log=lambda _m: None, progress=False)
    assert cache.entries() == []
    _, out = converted(str(ckpt), "q4f32_1", False, 1, log=lambda _m: None, progress=False, allow_non_finite=True)
    assert (out / "gptbc-config.json").is_file() and [e.kind for e in cache.entries()] == ["weights"]


def test_zero_groups_quantize_without_warnings():
    from gptbc.artifact.quantization import get_quantization, quantize

    w = np.zeros((4, 64), np.float32)
    w[1, :32] = 1e-45  # a subnormal group: its scale underflows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scheme in ("q4f32_1", "q4f16_a", "q8f16_1", "q4f16_1"):
            parts = quantize(w, get_quantization(scheme))
            assert all(np.isfinite(p).all() for p in parts if p.dtype.kind == "f")


# ---- 5. one-line errors, outputs that leave nothing ----

def test_corrupt_tensor_is_named(capsys, ckpt, tmp_path, monkeypatch):
    """A failure while making one tensor (here: a reader raising what a corrupt block would) names it."""
    from gptbc.artifact.convert import Checkpoint

    original = Checkpoint.get

    def get(self, name):
        if name == "transformer.h.0.mlp.c_proj.weight":
            raise ValueError("cannot reshape array of size 7 into shape (2,4)")
        return original(self, name)

    monkeypatch.setattr(Checkpoint, "get", get)
    err = convert_refused(capsys, ckpt, tmp_path, "--quantization", "q4f32_1")
    assert "tensor transformer.h.0.mlp.c_proj.weight" in err and "cannot reshape" in err


def test_failed_compile_removes_the_directories_it_made(ckpt, tmp_path, monkeypatch):
    from gptbc.artifact.config import resolve_model
    from gptbc.compile import compiler

    def fail(*_args, **_kwargs):
        raise GptbcError("export failed on purpose")

    monkeypatch.setattr(compiler, "export_relax", fail)
    out = tmp_path / "a" / "b" / "x.so"
    with pytest.raises(GptbcError, match="on purpose"):
        compiler.compile_model(resolve_model(str(ckpt)), "cpu", "q0f32", out, log=lambda _m: None, cache=False)
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()  # a directory that was there before stays
    with pytest.raises(GptbcError, match="on purpose"):
        compiler.compile_model(resolve_model(str(ckpt)), "cpu", "q0f32", tmp_path / "kept" / "x.so",
                               log=lambda _m: None, cache=False)
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


# ---- 6. the default conversion of a GGUF keeps its values ----

def test_default_scheme_keeps_a_q4_0_files_q6_k_embedding(tmp_path, capsys):
    """llama-quantize's Q4_0 writes token_embd in Q6_K: without --quantization every packed tensor is kept
    (qkf16_a), the embedding is not re-quantized to 4 bits."""
    import gguf

    from gptbc.artifact.convert import convert_weight

    src = KQUANT / "model-Q4_K_M.gguf"
    layers = {t.name: "Q4_0" for t in gguf.GGUFReader(str(src)).tensors
              if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}
    path = retyped(src, tmp_path / "model-Q4_0.gguf", layers)
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight"} == {"Q6_K"}
    out = convert_weight(path, None, tmp_path / "w", progress=False)
    note = capsys.readouterr().err
    described = json.loads((out / "gptbc-config.json").read_text())["quantization"]
    assert described["name"] == "qkf16_a" and described["widths"]["transformer.wte"] == 6, described
    assert "Q6_K" not in note and "Q4_0" not in note, note  # only F32 norms/biases rounded to float16


# ---- the fuzz test: seeded mutations of good files, fed to each reader ----

FUZZ_CASES = 100  # per reader; each case reads a file of a few hundred KB at most


def mutate(data: bytes, rng: random.Random, header_bytes: int) -> bytes:
    """One of: random bytes overwritten (mostly in the header), a random 4/8-byte field set to an extreme, the
    file cut short, or bytes inserted."""
    data = bytearray(data)
    what = rng.choice(["bytes", "field", "cut", "insert"])
    span = max(1, min(header_bytes, len(data)))
    if what == "bytes":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(span)] = rng.randrange(256)
    elif what == "field":
        at = rng.randrange(max(1, span - 8))
        value = rng.choice([0, 1, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 40, 2 ** 63 - 1, 2 ** 64 - 1, rng.randrange(2 ** 64)])
        size = rng.choice([4, 8])
        data[at:at + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    elif what == "cut":
        del data[rng.randrange(len(data)):]
    else:
        at = rng.randrange(span)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(data)


def mutate_json(value, rng: random.Random, depth: int = 0):
    """A JSON value with one random leaf or container replaced by a value of another type or an extreme."""
    extremes = [None, True, -1, 0, 2 ** 64, 10 ** 12, 1e308, float("nan"), "4", "../../etc/passwd", "/etc/passwd",
                [], {}, ["a"] * 3, "x" * 100_000]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        return {**value, key: mutate_json(value[key], rng, depth + 1)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return value[:i] + [mutate_json(value[i], rng, depth + 1)] + value[i + 1:]
    return rng.choice(extremes)


def assert_one_line_or_success(read, where: str) -> bool:
    """Run `read`; True when it succeeded, False when it failed with a one-line GptbcError of at most 300
    characters; anything else fails the test."""
    try:
        read()
    except GptbcError as err:
        message = str(err)
        assert "\n" not in message and len(message) <= 300, (where, message[:500])
        return False
    return True


@pytest.fixture(scope="module")
def fuzz_sources(base, base_gguf, tmp_path_factory) -> dict[str, Path]:
    from gptbc.artifact.convert import convert_weight

    root = tmp_path_factory.mktemp("fz")
    sharded = Path(shutil.copytree(base, root / "sh"))
    shard(sharded)
    out = convert_weight(base, "q4f32_1", root / "w", progress=False)
    return {"hf": base, "gguf": base_gguf, "sharded": sharded, "converted": out}


def test_fuzz_gguf_reader(fuzz_sources, tmp_path):
    from gptbc.artifact.convert import convert_weight

    import gguf

    good = fuzz_sources["gguf"].read_bytes()
    header = min(t.data_offset for t in gguf.GGUFReader(str(fuzz_sources["gguf"])).tensors)  # where data starts
    rng = random.Random(36)
    outcomes = []
    for case in range(FUZZ_CASES * 2):
        path = tmp_path / "m.gguf"
        path.write_bytes(mutate(good, rng, header if rng.random() < 0.8 else len(good)))  # some in the blocks
        outcomes.append(assert_one_line_or_success(lambda: convert_weight(path, None, tmp_path / "o", progress=False),
                                                   f"gguf {case}"))
        shutil.rmtree(tmp_path / "o", ignore_errors=True)
    assert 0 < sum(outcomes) < len(outcomes)  # the mutations reach past the first check, and some files stay readable


def test_fuzz_safetensors_reader(fuzz_sources, tmp_path):
    from gptbc.artifact.safetensors_io import SafetensorsFile

    good = (fuzz_sources["hf"] / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", good[:8])[0]
    rng = random.Random(37)
    entries = json.loads(good[8:header])
    outcomes = []
    for case in range(FUZZ_CASES * 4):  # the header alone: fast
        path = tmp_path / "m.safetensors"
        if rng.random() < 0.5:  # as bytes
            path.write_bytes(mutate(good, rng, header if rng.random() < 0.8 else len(good)))
        else:  # as JSON: an entry's field of another type or an extreme value
            raw = json.dumps(mutate_json(entries, rng)).encode()
            path.write_bytes(struct.pack("<Q", len(raw)) + raw + good[header:])

        def read():
            with SafetensorsFile(path) as f:
                for name in f.keys():
                    f.get(name)

        outcomes.append(assert_one_line_or_success(read, f"safetensors {case}"))
    assert 0 < sum(outcomes) < len(outcomes)


@pytest.mark.parametrize("which", ["config", "index", "manifest"])
def test_fuzz_json_readers(fuzz_sources, tmp_path, which):
    """config.json (convert), model.safetensors.index.json (convert), gptbc-config.json (compile's reader and
    the runtime's compatibility check), mutated at the JSON level and as bytes."""
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight
    from gptbc.artifact.manifest import check_compatible, read_weights

    source = {"config": fuzz_sources["hf"], "index": fuzz_sources["sharded"],
              "manifest": fuzz_sources["converted"]}[which]
    name = {"config": "config.json", "index": "model.safetensors.index.json", "manifest": "gptbc-config.json"}[which]
    good_text = (source / name).read_text()
    good = json.loads(good_text)
    rng = random.Random(38)
    work = Path(shutil.copytree(source, tmp_path / "d"))
    cases = FUZZ_CASES if which != "manifest" else FUZZ_CASES * 2
    outcomes = []
    for case in range(cases):
        if rng.random() < 0.7:
            (work / name).write_text(json.dumps(mutate_json(good, rng)))
        else:
            (work / name).write_bytes(mutate(good_text.encode(), rng, len(good_text)))
        if which == "manifest":
            def read():
                meta = read_weights(work)
                resolve_model(str(work))
                check_compatible(read_weights(source), meta, Path("lib.so"), work)
        else:
            def read():
                convert_weight(work, "q0f32", tmp_path / "o", progress=False)
                shutil.rmtree(tmp_path / "o", ignore_errors=True)
        outcomes.append(assert_one_line_or_success(read, f"{which} {case}"))
        assert not list(tmp_path.glob(".o.tmp-*")), "a failed conversion left its temporary directory"
    assert 0 < sum(outcomes) < len(outcomes)
