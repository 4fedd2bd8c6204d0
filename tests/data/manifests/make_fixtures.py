"""Writes the golden manifest fixtures beside this file: `good/` (a converted directory's gptbc-config.json and
its library's _metadata, as gptbc writes them for a tiny q4f32_1 model) and one directory per way of being wrong,
each holding both files with one thing changed. tests/test_manifest.py feeds every directory to the Python
reader and to `gptbc-check-manifest` and says what each must answer.

Run it only when the manifest schema changes (python tests/data/manifests/make_fixtures.py), and review the diff:
the files are the contract. It needs TVM (for the parameter list of the tiny model).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable

from gptbc.artifact.config import GPTBigCodeConfig, ModelSource
from gptbc.artifact.params import converted_params
from gptbc.artifact.manifest import SCHEMA_VERSION, library_manifest, weights_manifest
from gptbc.artifact.quantization import get_quantization
from gptbc.compile.targets import plan_build

HERE = Path(__file__).parent
LIB = "library.json"
WEIGHTS = "gptbc-config.json"


def good() -> tuple[dict, dict]:
    cfg = GPTBigCodeConfig(n_embd=32, n_head=2, n_layer=1, n_positions=64, vocab_size=320, bos_token_id=0,
                           eos_token_id=[0], prefill_chunk_size=32, max_batch_size=4)
    quant = get_quantization("q4f32_1")
    params = converted_params(cfg, quant)
    weights = weights_manifest("tiny", cfg, quant, [
        {"name": n, "shape": list(s), "dtype": d, "file": "params-00001-of-00001.safetensors"} for n, s, d in params])
    spec, _ = plan_build("cpu")
    return weights, library_manifest(ModelSource("tiny", cfg, None), quant, spec.device, "cpu", params)


def param(m: dict, name: str) -> dict:
    return next(p for p in m["params"] if p["name"] == name)


def nested(depth: int) -> list:
    v: list = []
    for _ in range(depth - 1):
        v = [v]
    return v


Edit = Callable[[dict], None]
# case → (edit of the weights manifest, edit of the library manifest); None: keep the good one.
CASES: dict[str, tuple[Edit | None, Edit | None]] = {
    "good": (None, None),
    # optional spellings: model_config.eos_token_id as one id, no quantize_lm_head (default: quantized)
    "good-optional-fields": (
        lambda w: (w["model_config"].update(eos_token_id=0), w["quantization"].pop("quantize_lm_head")),
        lambda m: (m["model_config"].update(eos_token_id=None), m["quantization"].pop("quantize_lm_head"))),
    # the same model in other words: another name of the tanh GELU, epsilon as a GGUF's float32 holds 1e-5,
    # n_inner null (HF: 4 n_embd) and the identity fields with defaults left out
    "good-same-model": (
        lambda w: w["model_config"].update(activation_function="gelu_fast", layer_norm_epsilon=9.999999747378752e-06),
        lambda m: (m["model_config"].update(n_inner=None),
                   [m["model_config"].pop(k) for k in ("multi_query", "scale_attn_weights", "tie_word_embeddings",
                                                       "activation_function", "layer_norm_epsilon")])),
    # a library built with int8 activations: weights it repacks when loading (schema 2)
    "good-int8-activations": (None, lambda m: (m.update(activations="int8"), param(m, "transformer.h.0.mlp.c_fc.q_weight")
                                               .update(repack="repack_int4_128x4_uint32"))),
    # ---- the schema version ----
    "weights-schema-too-new": (lambda w: w.update(schema_version=SCHEMA_VERSION + 1, gptbc_version="9.0.0"), None),
    "weights-before-schema": (  # a gptbc-config.json as gptbc wrote it before manifests were versioned
        lambda w: ([w.pop(k) for k in ("schema_version", "page_size", "alignment")],
                   w.update(bos_token_id=0, fim_tokens=None, tokenizer_files=[])), None),
    "weights-schema-not-int": (lambda w: w.update(schema_version="1"), None),
    "library-schema-too-new": (None, lambda m: m.update(schema_version=SCHEMA_VERSION + 2, gptbc_version="2.0.0")),
    "library-schema-too-old": (None, lambda m: m.update(schema_version=0)),
    "library-schema-unknown-writer": (None, lambda m: (m.pop("gptbc_version"), m.update(schema_version=SCHEMA_VERSION + 1))),
    # ---- missing fields ----
    "weights-missing-params": (lambda w: w.pop("params"), None),
    "weights-missing-quantization-name": (lambda w: w["quantization"].pop("name"), None),
    "weights-missing-param-file": (lambda w: w["params"][3].pop("file"), None),
    "library-missing-prefill-chunk-size": (None, lambda m: m.pop("prefill_chunk_size")),
    "library-missing-vocab-size": (None, lambda m: m["model_config"].pop("vocab_size")),
    "library-missing-gptbc-version": (None, lambda m: m.pop("gptbc_version")),
    # ---- wrong types and values ----
    "weights-page-size-string": (lambda w: w.update(page_size="16"), None),
    "weights-eos-not-a-list": (lambda w: w.update(eos_token_id=0), None),
    "weights-shape-string": (lambda w: param(w, "transformer.wpe.weight").update(shape=["64", 32]), None),
    "weights-shape-negative": (lambda w: param(w, "transformer.wpe.weight").update(shape=[64, -32]), None),
    "weights-param-not-object": (lambda w: w["params"].__setitem__(2, "transformer.wpe.weight"), None),
    "weights-file-outside": (lambda w: w["params"][0].update(file="../secret.safetensors"), None),
    "weights-file-absolute": (lambda w: w["params"][0].update(file="/etc/passwd"), None),
    "weights-file-nul": (lambda w: w["params"][1].update(file="params\u0000.safetensors"), None),
    "weights-file-odd-outside": (  # quoted as json.dumps does: \\b, \\f, non-ASCII as \\u escapes
        lambda w: w["params"][0].update(file="../\u00e9\b\f\x7f\U0001f600.safetensors"), None),
    # (a file that is a link leading outside: test_manifest.py makes those, git keeps no such link)
    # ---- sizes and dtypes a tensor cannot have ----
    "weights-shape-too-large": (lambda w: param(w, "transformer.wpe.weight").update(shape=[1 << 21, 1 << 20]), None),
    "weights-shape-overflows-int64": (  # 2^96 elements: a product that wraps to 0 in int64 must still be refused
        lambda w: param(w, "transformer.wpe.weight").update(shape=[1 << 32, 1 << 32, 1 << 32]), None),
    "weights-shape-dim-2-63": (  # past int64: the C++ parser holds a float, both readers say so
        lambda w: param(w, "transformer.wpe.weight").update(shape=[1 << 63, 32]), None),
    "weights-dtype-unknown": (lambda w: param(w, "transformer.wpe.weight").update(dtype="float1024"), None),
    "weights-dtype-long-odd": (  # quoted as repr() does (quotes, unprintable code points) and clipped
        lambda w: param(w, "transformer.wpe.weight").update(dtype="it's\u00a0\u00e9\u2028\t\U0001f600" + "x" * 5000),
        None),
    "weights-duplicate-param": (lambda w: w["params"].append(copy.deepcopy(w["params"][1])), None),
    "weights-duplicate-long-name": (  # the line is made one line (whitespace runs, \\u2028 too) and cut at 600
        lambda w: w["params"].extend([{**w["params"][0], "name": "a  b\u2028\u00a0c\t" + "y" * 1000}] * 2), None),
    "weights-alignment-not-power-of-two": (lambda w: w.update(alignment=48), None),
    "weights-zero-vocab": (lambda w: w["model_config"].update(vocab_size=0), None),
    "weights-config-eos-string": (lambda w: w["model_config"].update(eos_token_id="0"), None),
    "library-window-float": (None, lambda m: m.update(context_window_size=64.0)),
    "library-batch-boolean": (None, lambda m: m.update(max_batch_size=True)),
    "library-lm-head-flag-string": (None, lambda m: m["quantization"].update(quantize_lm_head="no")),
    "library-device-null": (None, lambda m: m.update(device=None)),
    "library-repack-not-string": (None, lambda m: param(m, "transformer.h.0.mlp.c_fc.q_weight").update(repack=["x"])),
    "library-params-object": (None, lambda m: m.update(params={})),
    "library-nested-too-deep": (None, lambda m: m["model_config"].update(extra=nested(200))),
    "weights-multi-query-string": (lambda w: w["model_config"].update(multi_query="yes"), None),
    "library-epsilon-string": (None, lambda m: m["model_config"].update(layer_norm_epsilon="1e-5")),
    "library-widths-not-object": (None, lambda m: m["quantization"].update(widths=[4])),
    # ---- compatibility ----
    "quantization-mismatch": (None, lambda m: m["quantization"].update(name="q8f32_1", bits=8)),
    "lm-head-mismatch": (None, lambda m: m["quantization"].update(quantize_lm_head=False)),
    "param-shape-mismatch": (lambda w: param(w, "transformer.wpe.weight").update(shape=[128, 32]), None),
    "param-dtype-mismatch": (lambda w: param(w, "transformer.ln_f.weight").update(dtype="float16"), None),
    "missing-param": (lambda w: w["params"].remove(param(w, "transformer.ln_f.bias")), None),
    "page-size-mismatch": (None, lambda m: m.update(page_size=32)),
    "alignment-mismatch": (lambda w: w.update(alignment=32), None),
    # ---- the model: a library runs only the weights of the model it was compiled for ----
    "layers-mismatch": (lambda w: w["model_config"].update(n_layer=3), None),
    "activation-mismatch": (lambda w: w["model_config"].update(activation_function="gelu"), None),
    "epsilon-mismatch": (lambda w: w["model_config"].update(layer_norm_epsilon=1e-6), None),
    "multi-query-mismatch": (None, lambda m: m["model_config"].update(multi_query=False)),
    "tensor-parallel-mismatch": (None, lambda m: m.update(tensor_parallel=2)),
    "library-tensor-parallel-string": (None, lambda m: m.update(tensor_parallel="2")),
    "extra-param": (lambda w: w["params"].append({**w["params"][0], "name": "transformer.h.1.ln_1.weight"}), None),
    "widths-mismatch": tuple(  # a per-tensor scheme with one module at 4 bits in the weights, 6 (default) in the library
        (lambda mw, width=width: (mw["quantization"].update(name="qkf32_a", kind="affine", bits=6, group_size=16),
                                  mw["quantization"].update(widths={"transformer.h.0.mlp.c_fc": width} if width else {})))
        for width in (4, None)),
}
# Written by hand (not JSON of a manifest, or no file at all): case → (weights text or None, library text or None).
RAW: dict[str, tuple[str | bytes | None, str | None]] = {
    "weights-not-json": ('{"schema_version": 1,\n  "params": [\n', None),
    "library-not-json": (None, '{"schema_version": 1, "page_size": 16,}'),
    "library-not-object": (None, '[1, 2, 3]\n'),
    "weights-missing-file": (None, None),  # a directory without gptbc-config.json
    "weights-not-utf8": (b'{"schema_version": 2, "model_name": "caf\xe9"}\n', None),  # Latin-1, not UTF-8
}


def dump(path: Path, data: dict) -> None:
    """One top-level field a line, one parameter a line: small files whose diffs read well."""
    def line(key: str, v) -> str:
        if key == "params" and isinstance(v, list) and v:
            return f'"params": [\n    ' + ",\n    ".join(json.dumps(p) for p in v) + "\n  ]"
        return f"{json.dumps(key)}: {json.dumps(v)}"

    path.write_text("{\n  " + ",\n  ".join(line(k, v) for k, v in data.items()) + "\n}\n")


def main() -> None:
    weights, lib = good()
    for case in [*CASES, *RAW]:
        shutil.rmtree(HERE / case, ignore_errors=True)
        (HERE / case).mkdir()
    for case, (edit_w, edit_l) in CASES.items():
        w, m = copy.deepcopy(weights), copy.deepcopy(lib)
        for edit, data in ((edit_w, w), (edit_l, m)):
            if edit:
                edit(data)
        dump(HERE / case / WEIGHTS, w)
        dump(HERE / case / LIB, m)
    for case, (w_text, l_text) in RAW.items():
        if isinstance(w_text, bytes):
            (HERE / case / WEIGHTS).write_bytes(w_text)
        elif w_text is not None:
            (HERE / case / WEIGHTS).write_text(w_text)
        elif case != "weights-missing-file":
            dump(HERE / case / WEIGHTS, weights)
        if l_text is not None:
            (HERE / case / LIB).write_text(l_text)
        else:
            dump(HERE / case / LIB, lib)


if __name__ == "__main__":
    main()
