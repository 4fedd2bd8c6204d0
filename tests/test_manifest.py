"""The artifact manifests (manifest.py, native/manifest.cc): the Python reader and `gptbc-check-manifest` read the
same golden fixtures (tests/data/manifests/, written by make_fixtures.py there), accept the good ones and refuse
each bad one with the same one-line message; the builders still write what the good fixture holds."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from gptbc import __version__
from gptbc.artifact import manifest
from gptbc.artifact.config import GPTBigCodeConfig, ModelSource, resolve_model
from gptbc.errors import GptbcError
from gptbc.artifact.quantization import get_quantization
from native_build import shared_build

FIXTURES = Path(__file__).resolve().parent / "data" / "manifests"
LIB = "library.json"

# case → what both readers answer: "ok", or a piece of the one-line error ({dir}: the case's directory,
# {lib}: its library.json). Each message names the file and the field at fault.
CASES = {
    "good": "ok",
    "good-optional-fields": "ok",
    "good-int8-activations": "ok",
    "good-same-model": "ok",
    "weights-schema-too-new": "{dir}/gptbc-config.json: written by gptbc 9.0.0 with schema_version 3; this gptbc "
                              "reads schema versions 1 to 2 (upgrade gptbc, or convert the weights again with this one)",
    "weights-before-schema": "{dir}/gptbc-config.json: written by gptbc 0.1.0 without a schema_version (before schema "
                             "version 1); this gptbc reads schema versions 1 to 2 (convert the weights again with this gptbc)",
    "weights-schema-not-int": "{dir}/gptbc-config.json: schema_version must be an integer, got string",
    "library-schema-too-new": "--lib {lib} metadata: written by gptbc 2.0.0 with schema_version 4; this gptbc reads "
                              "schema versions 1 to 2 (upgrade gptbc, or compile the library again with this one)",
    "library-schema-too-old": "--lib {lib} metadata: written by gptbc 0.1.0 with schema_version 0; this gptbc reads "
                              "schema versions 1 to 2 (compile the library again with this gptbc)",
    "library-schema-unknown-writer": "--lib {lib} metadata: written by an unknown gptbc with schema_version 3",
    "weights-missing-params": "{dir}/gptbc-config.json: missing field params",
    "weights-missing-quantization-name": "{dir}/gptbc-config.json: missing field quantization.name",
    "weights-missing-param-file": "{dir}/gptbc-config.json: missing field params[3].file",
    "library-missing-prefill-chunk-size": "--lib {lib} metadata: missing field prefill_chunk_size",
    "library-missing-vocab-size": "--lib {lib} metadata: missing field model_config.vocab_size",
    "library-missing-gptbc-version": "--lib {lib} metadata: missing field gptbc_version",
    "weights-page-size-string": "{dir}/gptbc-config.json: page_size must be an integer, got string",
    "weights-eos-not-a-list": "{dir}/gptbc-config.json: eos_token_id must be an array, got integer",
    "weights-shape-string": "{dir}/gptbc-config.json: params[2].shape[0] must be an integer, got string",
    "weights-shape-negative": "{dir}/gptbc-config.json: params[2].shape[1] must be at least 0, got -32",
    "weights-param-not-object": "{dir}/gptbc-config.json: params[2] must be an object, got string",
    "weights-file-outside": '{dir}/gptbc-config.json: params[0].file must name a file in the directory, got '
                            '"../secret.safetensors"',
    "weights-file-absolute": '{dir}/gptbc-config.json: params[0].file must name a file in the directory, got '
                             '"/etc/passwd"',
    "weights-file-nul": "{dir}/gptbc-config.json: params[1].file names 'params\\x00.safetensors', outside its "
                        "directory {dir}",
    "weights-file-odd-outside": '{dir}/gptbc-config.json: params[0].file must name a file in the directory, got '
                                '"../\\u00e9\\b\\f\\u007f\\ud83d\\ude00.safetensors"',
    "weights-duplicate-long-name": "{dir}/gptbc-config.json: params[22]: tensor a b c yyyyyyyy",  # one line, cut
    "weights-not-utf8": "{dir}/gptbc-config.json: not valid UTF-8",
    "weights-shape-too-large": "{dir}/gptbc-config.json: params[2].shape [2097152, 1048576] has more than 2^40 "
                               "elements",
    "weights-shape-overflows-int64": "{dir}/gptbc-config.json: params[2].shape [4294967296, 4294967296, 4294967296] "
                                     "has more than 2^40 elements",
    "weights-shape-dim-2-63": "{dir}/gptbc-config.json: params[2].shape[0] must be an integer, got number",
    "weights-dtype-unknown": "{dir}/gptbc-config.json: params[2].dtype 'float1024' is not a tensor dtype (float64, "
                             "float32, float16, bfloat16, int64, int32, int16, int8, uint8, uint32, bool)",
    "weights-dtype-long-odd": '{dir}/gptbc-config.json: params[2].dtype "it\'s\\xa0\u00e9\\u2028\\t\U0001f600'
                              + "x" * 38 + '... is not a tensor dtype (float64,',
    "weights-duplicate-param": "{dir}/gptbc-config.json: params[21]: tensor transformer.wte.q_scale is listed twice",
    "weights-alignment-not-power-of-two": "{dir}/gptbc-config.json: alignment must be a power of two, got 48",
    "weights-zero-vocab": "{dir}/gptbc-config.json: model_config.vocab_size must be positive, got 0",
    "weights-config-eos-string": "{dir}/gptbc-config.json: model_config.eos_token_id must be an integer or an array, "
                                 "got string",
    "library-window-float": "--lib {lib} metadata: context_window_size must be an integer, got number",
    "library-batch-boolean": "--lib {lib} metadata: max_batch_size must be an integer, got boolean",
    "library-lm-head-flag-string": "--lib {lib} metadata: quantization.quantize_lm_head must be a boolean, got string",
    "library-device-null": "--lib {lib} metadata: device must be a string, got null",
    "library-repack-not-string": "--lib {lib} metadata: params[13].repack must be a string, got array",
    "library-params-object": "--lib {lib} metadata: params must be an array, got object",
    "library-nested-too-deep": "--lib {lib} metadata: not valid JSON (nested deeper than 128)",
    "weights-not-json": "{dir}/gptbc-config.json: not valid JSON (Expecting value: line 3 column 1 (char 36))",
    "library-not-json": "--lib {lib} metadata: not valid JSON (Expecting property name enclosed in double quotes: "
                        "line 1 column 39 (char 38))",
    "library-not-object": "--lib {lib} metadata: the manifest must be an object, got array",
    "weights-missing-file": "{dir}: no gptbc-config.json (convert weights with `gptbc convert-weight`)",
    "quantization-mismatch": "--lib {lib} was compiled for quantization q8f32_1, but the weights in {dir} are "
                             "q4f32_1; compile and convert with the same --quantization",
    "lm-head-mismatch": "--lib {lib} was compiled for quantization q4f32_1 (lm_head unquantized), but the weights in "
                        "{dir} are q4f32_1;",
    "param-shape-mismatch": "{dir}: tensor transformer.wpe.weight is float32[128, 32], --lib {lib} expects "
                            "float32[64, 32] (were they built from different configs?)",
    "param-dtype-mismatch": "{dir}: tensor transformer.ln_f.weight is float16[32], --lib {lib} expects float32[32]",
    "missing-param": "{dir}/gptbc-config.json: no tensor transformer.ln_f.bias, which --lib {lib} needs",
    "page-size-mismatch": "--lib {lib} was built with a KV-cache page size of 32 (gptbc 0.1.0), but "
                          "{dir}/gptbc-config.json says 16 (gptbc 0.1.0); compile and convert with the same gptbc",
    "alignment-mismatch": "--lib {lib} was built with a tensor alignment of 64 (gptbc 0.1.0), but "
                          "{dir}/gptbc-config.json says 32 (gptbc 0.1.0)",
    "weights-multi-query-string": "{dir}/gptbc-config.json: model_config.multi_query must be a boolean, got string",
    "library-epsilon-string": "--lib {lib} metadata: model_config.layer_norm_epsilon must be a number, got string",
    "library-widths-not-object": "--lib {lib} metadata: quantization.widths must be an object, got array",
    "layers-mismatch": "--lib {lib} was compiled for n_layer 1, but the weights in {dir} have n_layer 3; a library "
                       "runs only the model it was compiled for",
    "activation-mismatch": "--lib {lib} was compiled for activation_function gelu_pytorch_tanh, but the weights in "
                           "{dir} have activation_function gelu;",
    "epsilon-mismatch": "--lib {lib} was compiled for layer_norm_epsilon 1e-05, but the weights in {dir} have "
                        "layer_norm_epsilon 1e-06;",
    "multi-query-mismatch": "--lib {lib} was compiled for multi_query false, but the weights in {dir} have "
                            "multi_query true;",
    "tensor-parallel-mismatch": "--lib {lib} was compiled with --tensor-parallel 2, but the weights in {dir} were "
                                "converted with --tensor-parallel 1; compile and convert with the same N",
    "library-tensor-parallel-string": "--lib {lib} metadata: tensor_parallel must be an integer, got string",
    "extra-param": "{dir}/gptbc-config.json: tensor transformer.h.1.ln_1.weight is not one --lib {lib} takes",
    "widths-mismatch": "--lib {lib} was compiled for transformer.h.0.mlp.c_fc at 6 bits, but the weights in {dir} "
                       "have it at 4 bits; compile the library from the converted directory (gptbc compile --model "
                       "{dir})",
}


def python_answer(case: Path) -> str:
    """What the Python reader says, as the CLI prints it."""
    try:
        weights = manifest.read_weights(case)
        lib = manifest.parse_library((case / LIB).read_text("utf-8"), case / LIB)
        manifest.check_compatible(lib, weights, case / LIB, case)
    except GptbcError as err:
        return f"error: {err}"
    return "ok"


@pytest.fixture(scope="module")
def check_manifest() -> Path:
    """gptbc-check-manifest alone (three source files), under AddressSanitizer: the reader takes untrusted files."""
    return shared_build("-DGPTBC_ASAN=ON", "-DCMAKE_BUILD_TYPE=Debug") / "gptbc-check-manifest"


def native_answer(exe: Path, case: Path) -> str:
    done = subprocess.run([str(exe), str(case), str(case / LIB)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ASAN_OPTIONS": "abort_on_error=0:exitcode=99"})
    if done.returncode == 0:
        assert done.stdout == "ok\n" and done.stderr == "", done
        return "ok"
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1 and done.stdout == "", done
    return lines[0]


def test_every_fixture_has_an_expected_answer():
    on_disk = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert on_disk == CASES.keys()


@pytest.mark.parametrize("name", CASES)
def test_python_and_native_readers_agree(name, check_manifest):
    case = FIXTURES / name
    want = CASES[name].format(dir=case, lib=case / LIB)
    py, native = python_answer(case), native_answer(check_manifest, case)
    assert py == native
    if want == "ok":
        assert py == "ok"
    else:
        assert py.startswith("error: ") and want in py, py


def test_a_long_line_is_cut():
    """The weights reader's lines are at most 2 MESSAGE_LIMIT characters (both readers: the case above)."""
    answer = python_answer(FIXTURES / "weights-duplicate-long-name")
    assert len(answer) == len("error: ") + 600 and answer.endswith("y...")


PARAMS_FILE = "params-00001-of-00001.safetensors"  # the one file every param of the good fixture names
# name → (the link's target, relative to the weights directory or absolute; where the link sits: "" for the weights
# directory, "snapshot" for a Hugging Face cache snapshot), and whether both readers accept it. {out}: a file
# beside the directory, outside it.
LINKS = {
    "to-a-file-outside": ("{out}", "", False),
    "to-etc-passwd": ("/etc/passwd", "", False),
    "up-and-out": ("../outside.safetensors", "", False),
    "dangling-outside": ("{tmp}/gone/x.safetensors", "", False),  # resolved as far as it exists: still outside
    "loop": (PARAMS_FILE, "", False),
    "through-an-inner-link-out": ("hop", "", False),  # hop (inside) leads to {out}
    "to-a-file-inside": ("real.safetensors", "", True),
    "up-and-back-in": ("../weights/real.safetensors", "", True),
    "dangling-inside": ("not-yet.safetensors", "", True),  # missing, but inside: the safetensors reader says so
    "hf-snapshot-blob": ("../../blobs/0123abcd", "snapshot", True),
    "hf-snapshot-past-the-repo": ("../../../outside.safetensors", "snapshot", False),
}


@pytest.mark.parametrize("name", LINKS)
def test_readers_agree_on_files_that_are_links(name, tmp_path, check_manifest):
    """A param's file that is a symbolic link: both readers refuse it, with the same line, when it leads (or may
    lead) out of the directory; git keeps no such link, so the cases are made here."""
    target, where, accepted = LINKS[name]
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    if where == "snapshot":  # models--owner--name/snapshots/REV/FILE → ../../blobs/HASH, as the Hugging Face cache
        repo = tmp_path / "models--o--n"
        (repo / "blobs").mkdir(parents=True)
        (repo / "blobs" / "0123abcd").write_bytes(b"weights")
        (repo / "outside.safetensors").write_bytes(b"secret")
        case = repo / "snapshots" / "rev"
    else:
        case = tmp_path / "weights"
    case.mkdir(parents=True)
    for f in (manifest.WEIGHTS_FILE, LIB):
        (case / f).write_bytes((FIXTURES / "good" / f).read_bytes())
    (case / "real.safetensors").write_bytes(b"weights")
    (case / "hop").symlink_to(tmp_path / "outside.safetensors")
    (case / PARAMS_FILE).symlink_to(target.format(out=tmp_path / "outside.safetensors", tmp=tmp_path))
    py, native = python_answer(case), native_answer(check_manifest, case)
    assert py == native
    if accepted:
        assert py == "ok"
    else:
        assert py == (f"error: {case}/gptbc-config.json: params[0].file names '{PARAMS_FILE}', which leads outside "
                      f"its directory {case}")


def odd_value(rng: random.Random, kind: str):
    """A value a hostile manifest may hold where a param's `kind` (shape, dtype, file) goes."""
    texts = ["float32", "float1024", "", "..", ".", "../x", "/etc/passwd", "a/b", "a\\b", "it's", 'say "x"',
             "\x00", "\t\n", "\u00a0\u00e9\u2028\U0001f600\x7f\x85", "x" * rng.randint(50, 900)]
    dims = [0, 1, 7, -1, 1 << 20, 1 << 31, 1 << 32, 1 << 40, (1 << 40) + 1, (1 << 62), (1 << 63) - 1, 1 << 63,
            -(1 << 63), 1 << 64, 2.0, "3", None, True]
    if kind == "shape" and rng.random() < 0.8:
        return [rng.choice(dims) for _ in range(rng.randint(0, 4))]
    if kind != "shape" and rng.random() < 0.9:
        return "".join(rng.choice(texts) for _ in range(rng.randint(1, 3)))
    return rng.choice([None, 5, 1.5, [], {}, ["x"]])


def test_readers_agree_on_odd_params(tmp_path, check_manifest):
    """Seeded mutations of a param's shape, dtype and file: the twins of each check (bounds, dtype list,
    containment, quoting, clipping) answer with the same line."""
    good = json.loads((FIXTURES / "good" / manifest.WEIGHTS_FILE).read_text())
    rng = random.Random(36)
    case = tmp_path / "weights"
    case.mkdir()
    (case / LIB).write_bytes((FIXTURES / "good" / LIB).read_bytes())
    answers = set()
    for i in range(120):
        m = copy.deepcopy(good)
        for _ in range(rng.randint(1, 2)):
            p = rng.choice(m["params"])
            key = rng.choice(["shape", "dtype", "file"])
            p[key] = odd_value(rng, key)
        (case / manifest.WEIGHTS_FILE).write_text(json.dumps(m))
        py, native = python_answer(case), native_answer(check_manifest, case)
        assert py == native, (i, m)
        answers.add(py.split(": ", 2)[-1][:40])
    assert len(answers) > 10  # the mutations reach many checks, not one


def test_builders_write_the_good_fixture():
    """weights_manifest / library_manifest of the good fixture's model reproduce it: the fixture is what gptbc
    writes (a change to the builders must come with new fixtures and, if incompatible, a schema version)."""
    weights = json.loads((FIXTURES / "good" / manifest.WEIGHTS_FILE).read_text())
    lib = json.loads((FIXTURES / "good" / LIB).read_text())
    cfg = GPTBigCodeConfig.from_dict(weights["model_config"])
    quant = get_quantization(weights["quantization"]["name"], weights["quantization"]["quantize_lm_head"])
    built_weights = manifest.weights_manifest(weights["model_name"], cfg, quant, weights["params"])
    params = [(p["name"], tuple(p["shape"]), p["dtype"]) for p in lib["params"]]
    built_lib = manifest.library_manifest(ModelSource("tiny", cfg, None), quant, "cpu", "cpu", params)
    for built, fixture in ((built_weights, weights), (built_lib, lib)):
        assert built.pop("gptbc_version") == __version__
        fixture.pop("gptbc_version")
        assert built == fixture
        assert (built["schema_version"], built["page_size"], built["alignment"]) == (
            manifest.SCHEMA_VERSION, manifest.PAGE_SIZE, manifest.ALIGNMENT)


def test_commands_refuse_weights_from_another_schema(tmp_path):
    """`--model` of compile / generate reads the weights through the manifest reader too."""
    case = FIXTURES / "weights-schema-too-new"
    with pytest.raises(GptbcError) as err:
        resolve_model(str(case))
    assert str(err.value) == CASES["weights-schema-too-new"].format(dir=case)

