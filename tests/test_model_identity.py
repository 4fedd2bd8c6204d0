"""A library runs only its own model's weights, and only when the library file is whole (issue 36).

The weights of another model whose tensors happen to fit (one layer more, another activation) or that carry a
tensor the library does not take are refused with one line naming both files; a library cut short is refused
before it is loaded, where it used to end the process with SIGBUS and nothing printed. The same cases for
gptbc-run are in test_native.py (bad_inputs); the manifest-level cases, for both readers, in test_manifest.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptbc.cli import main

IDS = "1,2,3"


def other_weights(src: Path, dst: Path, edit) -> Path:
    """A copy of converted weights with its gptbc-config.json edited (the tensors stay: only the manifest lies)."""
    shutil.copytree(src, dst)
    config = dst / "gptbc-config.json"
    data = json.loads(config.read_text())
    edit(data)
    config.write_text(json.dumps(data))
    return dst


def one_line_error(capsys, *argv: str) -> str:
    assert main([*argv]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    return captured.err.strip()


EDITS = {
    # the 2-layer library, weights of a 3-layer model (its third layer's tensors added, as a converter writes them)
    "more layers": (lambda c: (c["model_config"].update(n_layer=3), c["params"].extend(
        {**p, "name": p["name"].replace(".h.1.", ".h.2.")} for p in list(c["params"]) if ".h.1." in p["name"])),
        "was compiled for n_layer 2, but the weights in {dir} have n_layer 3; a library runs only the model it "
        "was compiled for"),
    "other activation": (lambda c: c["model_config"].update(activation_function="relu"),
                         "was compiled for activation_function gelu_pytorch_tanh, but the weights in {dir} have "
                         "activation_function relu"),
    "extra tensor": (lambda c: c["params"].append({**c["params"][-1], "name": "transformer.h.2.ln_1.weight"}),
                     "{dir}/gptbc-config.json: tensor transformer.h.2.ln_1.weight is not one --lib {lib} takes"),
}


@pytest.mark.parametrize("case", EDITS)
def test_weights_of_another_model_are_refused(case, tiny_model, tmp_path, capsys):
    m = tiny_model("mqa64")
    capsys.readouterr()
    edit, want = EDITS[case]
    weights = other_weights(m.out_dir, tmp_path / "other", edit)
    err = one_line_error(capsys, "generate", str(weights), "--lib", str(m.lib), "--prompt-ids", IDS)
    assert want.format(dir=weights, lib=m.lib) in err
    assert f"--lib {m.lib}" in err


def test_the_same_model_in_other_words_runs(tiny_model, tmp_path, capsys):
    """What is not the model's identity does not refuse: another name of the same GELU, a GGUF's float32 epsilon."""
    m = tiny_model("mqa64")
    weights = other_weights(m.out_dir, tmp_path / "same", lambda c: c["model_config"].update(
        activation_function="gelu_fast", layer_norm_epsilon=9.999999747378752e-06))
    assert main(["generate", str(weights), "--lib", str(m.lib), "--prompt-ids", IDS, "--max-new-tokens", "2"]) == 0


def run_generate(weights: Path, lib: Path) -> subprocess.CompletedProcess:
    """In a child process: a library that crashes the loader must not take pytest with it."""
    return subprocess.run([sys.executable, "-m", "gptbc.cli", "generate", str(weights), "--lib", str(lib),
                           "--prompt-ids", IDS, "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_library_is_refused_before_loading(keep, tiny_model, tmp_path):
    m = tiny_model("mqa64")
    blob = m.lib.read_bytes()
    cut = tmp_path / "cut.so"
    cut.write_bytes(blob[:int(len(blob) * keep)])
    done = run_generate(m.out_dir, cut)
    assert done.returncode == 1, done  # not -7 (SIGBUS)
    assert done.stderr.startswith(f"error: --lib {cut}: truncated or damaged (") and done.stderr.count("\n") == 1
    assert f"past the end of the {len(blob[:int(len(blob) * keep)])}-byte file" in done.stderr


def test_whole_library_copied_elsewhere_runs(tiny_model, tmp_path):
    """The check is structural, nothing beside the library: a plain copy still loads."""
    m = tiny_model("mqa64")
    copy = tmp_path / "elsewhere" / "lib.so"
    copy.parent.mkdir()
    shutil.copy(m.lib, copy)
    done = run_generate(m.out_dir, copy)
    assert done.returncode == 0, done.stderr
