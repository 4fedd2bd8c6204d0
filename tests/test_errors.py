"""Bad input: one line `error: ...` naming the culprit, exit status != 0, nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gptbc.cli import main
from hf_models import edit_config, make_checkpoint


def run(capsys, *argv: str) -> str:
    """Run the CLI; assert it failed with exactly one error line, and return that line."""
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "hf", n_embd=32, n_head=2, n_layer=1, n_positions=64)


def assert_nothing_written(parent: Path, name: str) -> None:
    leftovers = [p.name for p in parent.iterdir() if name in p.name]
    assert leftovers == [], leftovers


def test_missing_config_json(capsys, ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    err = run(capsys, "convert-weight", ckpt, "--quantization", "q0f32", "-o", tmp_path / "out")
    assert "config.json" in err and str(ckpt) in err
    assert_nothing_written(tmp_path, "out")
    assert "config.json" in run(capsys, "compile", "--model", ckpt, "-o", tmp_path / "x.so")


def test_wrong_model_type(capsys, ckpt, tmp_path):
    edit_config(ckpt, model_type="llama")
    err = run(capsys, "convert-weight", ckpt, "--quantization", "q0f32", "-o", tmp_path / "out")
    assert "model_type" in err and "llama" in err
    assert_nothing_written(tmp_path, "out")


def test_convert_weight_takes_a_hub_id(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = run(capsys, "convert-weight", "bigcode/not-in-the-cache", "--quantization", "q0f32", "-o", tmp_path / "o")
    assert "bigcode/not-in-the-cache" in err and "HF_HUB_OFFLINE" in err
    assert_nothing_written(tmp_path, "o")


def test_missing_tensor(capsys, ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["transformer.h.0.mlp.c_fc.bias"]
    save_file(tensors, str(path))
    err = run(capsys, "convert-weight", ckpt, "--quantization", "q0f32", "-o", tmp_path / "out")
    assert "transformer.h.0.mlp.c_fc.bias" in err and "missing" in err
    assert_nothing_written(tmp_path, "out")


def test_wrong_shape(capsys, ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    tensors["transformer.h.0.attn.c_proj.weight"] = tensors["transformer.h.0.attn.c_proj.weight"][:, :16].copy()
    save_file(tensors, str(path))
    err = run(capsys, "convert-weight", ckpt, "--quantization", "q0f32", "-o", tmp_path / "out")
    assert "transformer.h.0.attn.c_proj.weight" in err and "[32, 16]" in err and "[32, 32]" in err
    assert_nothing_written(tmp_path, "out")


def test_bin_only_checkpoint_is_refused(capsys, ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not unpickled")
    err = run(capsys, "convert-weight", ckpt, "--quantization", "q0f32", "-o", tmp_path / "out")
    assert "pytorch_model.bin" in err and "safetensors" in err and "save_pretrained" in err
    assert_nothing_written(tmp_path, "out")


def test_corrupt_safetensors(capsys, ckpt, tmp_path):
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    err = run(capsys, "convert-weight", ckpt, "--quantization", "q0f32", "-o", tmp_path / "out")
    assert "model.safetensors" in err and "corrupt" in err


def test_unknown_preset(capsys, tmp_path):
    err = run(capsys, "compile", "--model", "santacoderr", "-o", tmp_path / "x.so")
    assert "santacoderr" in err and "santacoder" in err
    assert_nothing_written(tmp_path, "x.so")


def test_unknown_target(capsys, tmp_path):
    err = run(capsys, "compile", "--model", "santacoder", "--target", "tpu", "-o", tmp_path / "x.so")
    assert "--target tpu" in err and "cpu" in err
    assert_nothing_written(tmp_path, "x.so")


def test_unknown_quantization(capsys, tmp_path, ckpt):
    err = run(capsys, "convert-weight", ckpt, "--quantization", "q3f7", "-o", tmp_path / "out")
    assert "q3f7" in err and "q0f32" in err


def test_context_window_larger_than_n_positions(capsys, tmp_path):
    err = run(capsys, "compile", "--model", "santacoder", "--context-window-size", "4096", "-o", tmp_path / "x.so")
    assert "context_window_size 4096" in err and "n_positions 2048" in err


def test_refuses_to_overwrite_a_foreign_directory(capsys, ckpt, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    err = run(capsys, "convert-weight", ckpt, "--quantization", "q0f32", "-o", out)
    assert "precious" in err and "overwrite" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_prompt_longer_than_context_window(capsys, tiny_model):
    m = tiny_model("mqa64")  # n_positions 128
    ids = ",".join(["5"] * 130)
    err = run(capsys, "generate", m.out_dir, "--lib", m.lib, "--prompt-ids", ids, "--max-new-tokens", "4")
    assert "130 tokens" in err and "context window of 128" in err
    assert "--truncate-prompt" in err and "--max-new-tokens 4" in err  # the CLI names its own flags


def test_converted_directory_compiles_only_for_its_scheme(capsys, ckpt, tmp_path):
    out = tmp_path / "q4"
    assert main(["convert-weight", str(ckpt), "--quantization", "q4f32_1", "-o", str(out), "--quiet"]) == 0
    err = run(capsys, "compile", "--model", out, "--quantization", "q8f32_1", "-o", tmp_path / "x.so")
    assert "q8f32_1" in err and "q4f32_1" in err and str(out) in err
    err = run(capsys, "compile", "--model", out, "--no-quantize-lm-head", "-o", tmp_path / "x.so")
    assert "--no-quantize-lm-head" in err
    assert_nothing_written(tmp_path, "x.so")


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_outputs_are_one_line(capsys, ckpt, tmp_path, where):
    blocker = tmp_path / "some_file.py"
    blocker.write_text("")
    parent = blocker if where == "under_a_file" else Path("/proc/nope")
    err = run(capsys, "convert-weight", ckpt, "--quantization", "q0f32", "-o", parent / "out")
    assert str(parent / "out") in err and "-o" in err
    err = run(capsys, "compile", "--model", ckpt, "-o", parent / "x.so")
    assert str(parent / "x.so") in err and "-o" in err


def test_ctrl_c_is_one_line_and_leaves_nothing(tmp_path):
    """SIGINT in the middle of a compile (inside TVM's passes, which wrap the KeyboardInterrupt), building into an
    empty artifact cache: neither -o nor the cache gets anything."""
    import os
    import signal
    import subprocess
    import time

    out, cache = tmp_path / "lib", tmp_path / "cache"
    out.mkdir()
    proc = subprocess.Popen(["gptbc", "compile", "--model", "santacoder", "-o", str(out / "x.so")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GPTBC_CACHE_DIR": str(cache)})
    deadline = time.time() + 60
    line = ""
    while "export" not in line and time.time() < deadline:  # interrupt once lowering has started
        line = proc.stderr.readline()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: interrupted"
    assert list(out.iterdir()) == []
    assert [p.name for p in (cache / "libraries").iterdir() if not p.name.endswith(".lock")] == []


def test_token_id_outside_vocabulary(capsys, tiny_model):
    m = tiny_model("mqa64")  # vocab 320
    err = run(capsys, "generate", m.out_dir, "--lib", m.lib, "--prompt-ids", "1,2,320", "--max-new-tokens", "4")
    assert "token id 320" in err and "position 2" in err


def test_bad_prompt_ids_and_empty_prompt(capsys, tiny_model):
    m = tiny_model("mqa64")
    assert "--prompt-ids" in run(capsys, "generate", m.out_dir, "--lib", m.lib, "--prompt-ids", "1,x")
    assert "empty" in run(capsys, "generate", m.out_dir, "--lib", m.lib, "--prompt-ids", "")


def test_weights_and_library_of_different_models(capsys, tiny_model):
    a, b = tiny_model("mqa64"), tiny_model("mha32")
    err = run(capsys, "generate", a.out_dir, "--lib", b.lib, "--prompt-ids", "1,2", "--max-new-tokens", "1")
    assert str(b.lib) in err and "a library runs only the model it was compiled for" in err


def test_library_missing_or_not_a_library(capsys, tiny_model, tmp_path):
    m = tiny_model("mqa64")
    assert "file not found" in run(capsys, "generate", m.out_dir, "--lib", tmp_path / "nope.so", "--prompt-ids", "1")
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"\x7fELF garbage")
    assert "not a gptbc model library" in run(capsys, "generate", m.out_dir, "--lib", junk, "--prompt-ids", "1")


def test_generate_from_an_hf_directory_with_a_library_converts_into_its_scheme(capsys, tiny_model):
    """MODEL may be the HF directory even with --lib: its weights are converted (once, into the artifact cache) in
    the library's scheme, and generate what the converted directory does; a library of another scheme for a
    converted directory is still a one-line error."""
    import json

    m = tiny_model("mqa64")
    args = ["--lib", str(m.lib), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json"]
    capsys.readouterr()
    assert main(["generate", str(m.hf_dir), *args]) == 0
    from_hf = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(["generate", str(m.out_dir), *args]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == from_hf and len(from_hf) == 4
    err = run(capsys, "generate", m.hf_dir, "--lib", m.lib, "--quantization", "q8f32_1", "--prompt-ids", "1")
    assert str(m.lib) in err and "q8f32_1" in err and "compiled for q0f32" in err


def test_text_prompt_without_tokenizer(capsys, tiny_model):
    m = tiny_model("mha64")  # built without a tokenizer
    err = run(capsys, "generate", m.out_dir, "--lib", m.lib, "--prompt", "hello")
    assert "tokenizer" in err


def test_corrupt_converted_shard(capsys, tiny_model, tmp_path):
    m = tiny_model("mqa64")
    copy = tmp_path / "out"
    shutil.copytree(m.out_dir, copy)
    shard = next(copy.glob("params-*.safetensors"))
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    err = run(capsys, "generate", copy, "--lib", m.lib, "--prompt-ids", "1")
    assert shard.name in err and "corrupt" in err


def test_an_interrupt_swallowed_on_the_way_still_cancels_the_output(ckpt, tmp_path):
    """TVM can lose a KeyboardInterrupt raised inside a pass (dlight catches the error it becomes); the flag the
    Ctrl-C handler sets still stops the converter and the compiler from publishing their outputs."""
    from gptbc import errors
    from gptbc.compile.compiler import compile_model
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight

    source = resolve_model(str(ckpt))
    errors.interrupt_requested.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            convert_weight(ckpt, "q0f32", tmp_path / "out", progress=False)
        with pytest.raises(KeyboardInterrupt):
            compile_model(source, "cpu", "q0f32", tmp_path / "x.so", log=lambda _m: None)
    finally:
        errors.interrupt_requested.clear()
    assert_nothing_written(tmp_path, "out")
    assert_nothing_written(tmp_path, "x.so")
