"""The converter: layout, tied/untied heads, shards, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from gptbc.artifact import manifest
from gptbc.artifact.convert import convert_weight
from gptbc.artifact.safetensors_io import SafetensorsFile, write_safetensors
from hf_models import load_hf, make_checkpoint


def converted(out_dir) -> dict[str, np.ndarray]:
    tensors = {}
    for f in sorted(out_dir.glob("params-*.safetensors")):
        tensors.update(load_file(str(f)))  # the reference safetensors library reads our files
    return tensors


def test_mha_c_attn_is_reordered_to_q_k_v_blocks(tmp_path):
    hf_dir = make_checkpoint(tmp_path / "hf", n_embd=48, n_head=3, n_layer=1, multi_query=False)
    out = converted(convert_weight(hf_dir, "q0f32", tmp_path / "out", progress=False))
    hf = load_hf(hf_dir)
    w = hf.transformer.h[0].attn.c_attn.weight.detach().numpy()  # rows: head0 (q k v), head1 (q k v), ...
    b = hf.transformer.h[0].attn.c_attn.bias.detach().numpy()
    x = np.random.default_rng(0).standard_normal(48).astype(np.float32)
    per_head = (w @ x + b).reshape(3, 3, 16)  # (head, qkv, dim)
    ours = (out["transformer.h.0.attn.c_attn.weight"] @ x + out["transformer.h.0.attn.c_attn.bias"]).reshape(3, 3, 16)
    np.testing.assert_allclose(ours, per_head.transpose(1, 0, 2), rtol=1e-6)  # (qkv, head, dim)


def test_mqa_c_attn_is_copied_as_is(tmp_path):
    hf_dir = make_checkpoint(tmp_path / "hf", n_embd=48, n_head=3, n_layer=1, multi_query=True)
    out = converted(convert_weight(hf_dir, "q0f32", tmp_path / "out", progress=False))
    hf = load_hf(hf_dir)
    np.testing.assert_array_equal(out["transformer.h.0.attn.c_attn.weight"],
                                  hf.transformer.h[0].attn.c_attn.weight.detach().numpy())


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    hf_dir = make_checkpoint(tmp_path / "hf", n_embd=32, n_head=2, n_layer=1)
    assert "lm_head.weight" not in load_file(str(hf_dir / "model.safetensors"))
    out = converted(convert_weight(hf_dir, "q0f32", tmp_path / "out", progress=False))
    assert "lm_head.weight" not in out and "transformer.wte.weight" in out


def test_untied_without_lm_head_falls_back_to_wte(tmp_path):
    hf_dir = make_checkpoint(tmp_path / "hf", n_embd=32, n_head=2, n_layer=1, tie_word_embeddings=False,
                             drop_lm_head=True)
    out = converted(convert_weight(hf_dir, "q0f32", tmp_path / "out", progress=False))
    np.testing.assert_array_equal(out["lm_head.weight"], out["transformer.wte.weight"])


def test_untied_lm_head_is_kept(tmp_path):
    hf_dir = make_checkpoint(tmp_path / "hf", n_embd=32, n_head=2, n_layer=1, tie_word_embeddings=False)
    out = converted(convert_weight(hf_dir, "q0f32", tmp_path / "out", progress=False))
    hf = load_hf(hf_dir)
    np.testing.assert_array_equal(out["lm_head.weight"], hf.lm_head.weight.detach().numpy())
    assert not np.array_equal(out["lm_head.weight"], out["transformer.wte.weight"])


def test_sharded_input_and_output(tmp_path):
    hf_dir = make_checkpoint(tmp_path / "hf", n_embd=32, n_head=2, n_layer=2)
    hf = load_hf(hf_dir)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    out_dir = convert_weight(sharded, "q0f32", tmp_path / "out", progress=False, shard_bytes=16 * 1024)
    meta = json.loads((out_dir / "gptbc-config.json").read_text())
    files = sorted({p["file"] for p in meta["params"]})
    assert len(files) > 1 and files == sorted(p.name for p in out_dir.glob("params-*.safetensors"))
    ref = converted(convert_weight(hf_dir, "q0f32", tmp_path / "single", progress=False))
    got = converted(out_dir)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)


def test_bfloat16_checkpoint_converts_to_float32(tmp_path):
    hf_dir = make_checkpoint(tmp_path / "hf", n_embd=32, n_head=2, n_layer=1)
    hf = load_hf(hf_dir).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    out = converted(convert_weight(tmp_path / "bf16", "q0f32", tmp_path / "out", progress=False))
    want = hf.transformer.wte.weight.detach().float().numpy()
    assert out["transformer.wte.weight"].dtype == np.float32
    np.testing.assert_array_equal(out["transformer.wte.weight"], want)


def test_output_metadata_and_tokenizer(tmp_path):
    hf_dir = make_checkpoint(tmp_path / "hf", n_embd=32, n_head=2, n_layer=1, tokenizer="dash")
    out_dir = convert_weight(hf_dir, "q0f32", tmp_path / "out", progress=False)
    meta = json.loads((out_dir / "gptbc-config.json").read_text())
    assert meta["quantization"]["name"] == "q0f32" and meta["eos_token_id"] == [0]
    assert meta["model_config"]["n_embd"] == 32
    assert meta["schema_version"] == manifest.SCHEMA_VERSION and meta["page_size"] == 16 and meta["alignment"] == 64
    assert (out_dir / "tokenizer.json").is_file()
    assert not {"fim_tokens", "tokenizer_files", "bos_token_id"} & meta.keys()  # unread: the tokenizer files say it


def test_reconvert_replaces_previous_output(tmp_path):
    hf_a = make_checkpoint(tmp_path / "a", n_embd=32, n_head=2, n_layer=1, seed=1)
    hf_b = make_checkpoint(tmp_path / "b", n_embd=32, n_head=2, n_layer=1, seed=2)
    out = tmp_path / "out"
    convert_weight(hf_a, "q0f32", out, progress=False)
    convert_weight(hf_b, "q0f32", out, progress=False)
    np.testing.assert_array_equal(converted(out)["transformer.wpe.weight"],
                                  load_hf(hf_b).transformer.wpe.weight.detach().numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # no temp or old dirs left


def test_tensorfile_round_trip_and_views(tmp_path):
    import ml_dtypes

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, ml_dtypes.bfloat16),
              "c": np.array([7], np.uint32)}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, [(k, v.shape, v.dtype) for k, v in arrays.items()], iter(arrays.values()))
    with SafetensorsFile(path) as f:
        for k, v in arrays.items():
            got = f.get(k)
            assert got.dtype == v.dtype and np.array_equal(got.astype(np.float64), v.astype(np.float64))
    assert load_file(str(path))["c"].tolist() == [7]


def test_tensorfile_rejects_plan_mismatch(tmp_path):
    from gptbc.errors import GptbcError

    with pytest.raises(GptbcError, match="tensor a: produced"):
        write_safetensors(tmp_path / "t.safetensors", [("a", (2,), np.dtype("float32"))],
                          iter([np.zeros(3, np.float32)]))


def test_aligned_tensors_are_mapped_not_copied(tiny_model):
    """Tensors whose size is a multiple of 64 bytes sit at 64-byte aligned offsets, and the CPU engine
    views them in the mapped file; the others (n_inner 200: an 800-byte bias) are copied, and both load."""
    from gptbc.runtime.engine import Engine

    for name, all_aligned in (("mqa64", True), ("mqa32", False)):
        m = tiny_model(name)
        aligned = total = 0
        for path in m.out_dir.glob("params-*.safetensors"):
            with SafetensorsFile(path) as f:
                for key in f.keys():
                    arr = f.get(key)
                    total += arr.nbytes
                    if arr.nbytes % 64 == 0:
                        assert arr.ctypes.data % 64 == 0, key
                        aligned += arr.nbytes
        assert (aligned == total) == all_aligned
        engine = Engine(m.out_dir, m.lib)
        assert 0 < aligned <= engine.runner.mapped_bytes  # (a misaligned size may still land on an aligned offset)
        assert (engine.runner.mapped_bytes == total) == all_aligned


def test_progress_reaches_every_tensor_and_releases_the_last_of_each_shard(tmp_path, capsys):
    """The writer drives each shard's producer to its end: the code after the last yield (release, progress)."""
    from gptbc.artifact.convert import Checkpoint

    hf = make_checkpoint(tmp_path / "hf", n_embd=32, n_head=2, n_layer=2)
    released = []
    original = Checkpoint.release
    Checkpoint.release = lambda self, name: (released.append(name), original(self, name))[1]
    try:
        convert_weight(hf, "q4f32_1", tmp_path / "out", progress=True, shard_bytes=20_000)
    finally:
        Checkpoint.release = original
    index = json.loads((tmp_path / "out" / "gptbc-config.json").read_text())["params"]
    assert len({p["file"] for p in index}) > 1  # several shards
    assert len(released) == len(index)
    total = len(index)
    assert f"{total}/{total}" in capsys.readouterr().err


def test_write_safetensors_runs_the_generator_to_its_end(tmp_path):
    finished = []

    def arrays():
        yield np.zeros(3, np.float32)
        finished.append(True)

    write_safetensors(tmp_path / "a.safetensors", [("a", (3,), np.float32)], arrays())
    assert finished == [True]


def test_converted_directory_is_readable_by_others(tmp_path):
    import os
    import stat

    hf = make_checkpoint(tmp_path / "hf", n_embd=32, n_head=2, n_layer=1)
    old = os.umask(0o022)
    try:
        out = convert_weight(hf, "q0f32", tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044 for f in out.iterdir())
