"""The artifact contract: what `gptbc-config.json` (converted weights) and a library's `_metadata` hold.

Both manifests are built here and read here, and nowhere else in Python; `native/manifest.cc` is the C++
reader of the same files and must say the same thing, word for word, about a bad one (tests/test_manifest.py
runs both on the fixtures in tests/data/manifests/). Changing a field: bump SCHEMA_VERSION, change both
readers and the fixtures together.

Weights (`gptbc-config.json`):
  schema_version, gptbc_version, page_size, alignment   the common header (the writer's values)
  model_name            shown for the model (read by config.resolve_model)
  model_config          GPTBigCodeConfig.to_dict()
  quantization          Quantization.describe(): name, kind, quantize_lm_head, ...
  eos_token_id          [int]: the ids generation stops at
  params                [{name, shape, dtype, file}] in the library's load order
  tensor_parallel       N > 1 only (absent: 1): the weights are presharded for N ranks (sharding.py); `params`
                        lists one rank's shapes and rank 0's files, and rank r's tensors sit in the files of
                        the same names with the `rank0-` prefix replaced (`rank_file`)
Library (`_metadata`):
  the common header, model_config (its `_IDENTITY` fields must equal the weights': a library runs only its own
  model), quantization (per-tensor widths included), target (the --target spelling), device (cpu, cuda, ...),
  context_window_size, prefill_chunk_size, max_batch_size, params [{name, shape, dtype}]
  tensor_parallel       N > 1 only (absent: 1): the library is one rank of an N-way tensor-parallel model, to be
                        run by N disco workers (runtime/disco_runner.py); both readers compare it with the
                        weights', and gptbc-run (one device) refuses N > 1
  cuda_fatbin           CUDA libraries only: [{kind: "sass" | "ptx", arch: 80}], what the nvcc fatbin linked
                        into the library holds. Optional, and read by runtime/cuda.py alone (its "this GPU
                        cannot run it" refusal), so neither reader here nor native/manifest.cc checks it and
                        the schema version stays: older readers ignore it.

Imports no TVM: the compiler, the converter, the runtime and the tests all read it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptbc import __version__
from gptbc.errors import GptbcError
from gptbc.artifact.files import clip, contained, reading

if TYPE_CHECKING:
    from gptbc.artifact.config import GPTBigCodeConfig, ModelSource
    from gptbc.artifact.quantization import Quantization

# The manifest layout this gptbc writes, and the oldest it still reads.
SCHEMA_VERSION = 2  # 2: a library's params may name a `repack` function (int8 activations)
MIN_SCHEMA_VERSION = 1
# Tokens per KV-cache page: the paged attention kernels are compiled for it and the runtime creates the cache with it.
PAGE_SIZE = 16
# Byte alignment of tensor data: TVM's kernels assume 64-byte aligned buffers (its kAllocAlignment), so the
# converter places tensors at multiples of it and a runtime uses such a tensor in place, without a copy.
ALIGNMENT = 64
WEIGHTS_FILE = "gptbc-config.json"

_CONFIG_SIZES = ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")
# The model config fields that shape what a library computes, beyond the tensor shapes (a 3-layer model's weights
# on a 2-layer library have the same tensors but one layer too many; another activation has none different), with
# the value a manifest that leaves one out means (GPTBigCodeConfig's defaults; n_inner: 4 n_embd). Checked
# between library and weights before running (check_compatible); native/manifest.cc holds the same list.
_IDENTITY: dict[str, Any] = {
    "n_layer": None, "n_embd": None, "n_head": None, "n_inner": None, "multi_query": True,
    "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "vocab_size": None, "n_positions": None, "tie_word_embeddings": True,
}
# Activation names that compute the same function (config.ACTIVATIONS): a library compiled from a config saying
# gelu_fast runs weights whose config says gelu_pytorch_tanh. Here, not imported, because config.py imports this.
_SAME_ACTIVATION = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                    "gelu": "gelu_erf"}
_LIBRARY_SIZES = ("context_window_size", "prefill_chunk_size", "max_batch_size")


# ---- building ----

def _header() -> dict[str, Any]:
    # gptbc_version first: tests find a library's metadata in its binary by this opening.
    return {"gptbc_version": __version__, "schema_version": SCHEMA_VERSION, "page_size": PAGE_SIZE,
            "alignment": ALIGNMENT}


def tensor_parallel(meta: dict[str, Any]) -> int:
    """The ranks a library or weights manifest was built for (1 when it does not say)."""
    return int(meta.get("tensor_parallel", 1))


def _tp_field(tp: int) -> dict[str, int]:
    return {"tensor_parallel": tp} if tp > 1 else {}


def rank_file(file: str, rank: int) -> str:
    """The file holding rank `rank`'s tensors, given rank 0's (as a presharded manifest lists them)."""
    return f"rank{rank}-" + file.removeprefix("rank0-") if file.startswith("rank0-") else file


def weights_manifest(model_name: str, config: "GPTBigCodeConfig", quant: "Quantization",
                     params: list[dict[str, Any]], tp: int = 1) -> dict[str, Any]:
    """The `gptbc-config.json` of a converted directory; `params`: {name, shape, dtype, file} in load order."""
    return {
        **_tp_field(tp),
        **_header(),
        "model_name": model_name,
        "model_config": config.to_dict(),
        "quantization": quant.describe(),
        "eos_token_id": list(config.eos_token_id),
        "params": [{"name": p["name"], "shape": [int(n) for n in p["shape"]], "dtype": p["dtype"], "file": p["file"]}
                   for p in params],
    }


def library_manifest(source: "ModelSource", quant: "Quantization", device: str, spelling: str,
                     params: list[tuple[str, tuple[int, ...], str]], repack: dict[str, str] | None = None,
                     cuda_fatbin: list[tuple[str, int]] | None = None, tp: int = 1) -> dict[str, Any]:
    """A library's `_metadata`: what a runtime checks against the weights before computing anything.
    `repack`: {parameter: library function} the runtime applies to that weight once it is loaded;
    `cuda_fatbin`: [(kind, arch)] of the CUDA kernels linked into the library."""
    repack = repack or {}
    cfg = source.config
    return {
        **_header(),
        "model_config": cfg.to_dict(),
        "quantization": quant.describe(),
        "activations": "int8" if quant.int8_activations else "float",
        "target": spelling,
        "device": device,
        "context_window_size": cfg.context_window_size,
        "prefill_chunk_size": cfg.prefill_chunk_size,
        "max_batch_size": cfg.max_batch_size,
        "params": [{"name": n, "shape": [int(x) for x in s], "dtype": d, **({"repack": repack[n]} if n in repack else {})}
                   for n, s, d in params],
        **({"cuda_fatbin": [{"kind": k, "arch": a} for k, a in cuda_fatbin]} if cuda_fatbin else {}),
        **_tp_field(tp),
    }


# ---- reading: every check below has its twin, with the same message, in native/manifest.cc ----

def _kind(v: Any) -> str:
    """A JSON value's type, as messages name it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        # beyond 64 bits the C++ parser (native/json.cc) holds a float: both readers call it a number
        return "integer" if -(1 << 63) <= v < (1 << 63) else "number"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


class _Reader:
    """Typed field access whose errors read `WHERE: FIELD must be ..., got TYPE` / `WHERE: missing field FIELD`."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str) -> GptbcError:
        return GptbcError(f"{self.where}: {what}")

    def need(self, obj: dict, key: str, path: str) -> Any:
        if key not in obj:
            raise self.fail(f"missing field {path}")
        return obj[key]

    def typed(self, v: Any, kind: str, path: str) -> Any:
        if _kind(v) != kind:
            article = "an" if kind[0] in "aeiou" else "a"
            raise self.fail(f"{path} must be {article} {kind}, got {_kind(v)}")
        return v

    def field(self, obj: dict, key: str, kind: str, path: str | None = None) -> Any:
        path = path or key
        return self.typed(self.need(obj, key, path), kind, path)

    def positive(self, obj: dict, key: str, path: str | None = None) -> int:
        path = path or key
        v = self.field(obj, key, "integer", path)
        if v <= 0:
            raise self.fail(f"{path} must be positive, got {v}")
        return v

    def ints(self, v: Any, path: str, minimum: int | None = None) -> list[int]:
        for i, x in enumerate(self.typed(v, "array", path)):
            self.typed(x, "integer", f"{path}[{i}]")
            if minimum is not None and x < minimum:
                raise self.fail(f"{path}[{i}] must be at least {minimum}, got {x}")
        return v


def _supported() -> str:
    if MIN_SCHEMA_VERSION == SCHEMA_VERSION:
        return f"schema version {SCHEMA_VERSION}"
    return f"schema versions {MIN_SCHEMA_VERSION} to {SCHEMA_VERSION}"


MAX_DEPTH = 128  # as native/json.cc: deeper nesting is refused before parsing (the C++ parser recurses)


def _too_deep(text: str) -> bool:
    depth, in_string, i = 0, False, 0
    while i < len(text):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif c in "]}":
            depth -= 1
        i += 1
    return False


def _parse(text: str, r: _Reader) -> dict:
    if _too_deep(text):
        raise r.fail(f"not valid JSON (nested deeper than {MAX_DEPTH})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise r.fail(f"not valid JSON ({err})") from None
    return r.typed(data, "object", "the manifest")


def _common(m: dict, r: _Reader, redo: str) -> None:
    """The header both manifests share; the schema version first, since another version may lay out the rest
    differently (or, before versions existed, lack it)."""
    made_by = m.get("gptbc_version")
    made_by = f"gptbc {made_by}" if isinstance(made_by, str) else "an unknown gptbc"
    if "schema_version" not in m:
        raise r.fail(f"written by {made_by} without a schema_version (before schema version {MIN_SCHEMA_VERSION}); "
                     f"this gptbc reads {_supported()} ({redo} with this gptbc)")
    version = r.field(m, "schema_version", "integer")
    if not MIN_SCHEMA_VERSION <= version <= SCHEMA_VERSION:
        hint = f"upgrade gptbc, or {redo} with this one" if version > SCHEMA_VERSION else f"{redo} with this gptbc"
        raise r.fail(f"written by {made_by} with schema_version {version}; this gptbc reads {_supported()} ({hint})")
    r.field(m, "gptbc_version", "string")
    r.positive(m, "page_size")
    alignment = r.positive(m, "alignment")
    if alignment & (alignment - 1):
        raise r.fail(f"alignment must be a power of two, got {alignment}")
    cfg = r.field(m, "model_config", "object")
    for key in _CONFIG_SIZES:
        r.positive(cfg, key, f"model_config.{key}")
    identity(cfg, r)
    eos = cfg.get("eos_token_id")  # HF's spellings: absent, null, an id or a list of ids
    if eos is not None and _kind(eos) != "integer":
        if _kind(eos) != "array":
            raise r.fail(f"model_config.eos_token_id must be an integer or an array, got {_kind(eos)}")
        r.ints(eos, "model_config.eos_token_id")
    q = r.field(m, "quantization", "object")
    r.field(q, "name", "string", "quantization.name")
    r.field(q, "kind", "string", "quantization.kind")
    if "quantize_lm_head" in q:
        r.field(q, "quantize_lm_head", "boolean", "quantization.quantize_lm_head")
    if q.get("bits") is not None:
        r.field(q, "bits", "integer", "quantization.bits")
    if "tensor_parallel" in m:
        r.positive(m, "tensor_parallel")
    if "widths" in q:
        for module, bits in r.field(q, "widths", "object", "quantization.widths").items():
            r.typed(bits, "integer", f"quantization.widths.{module}")


def _params(m: dict, r: _Reader, with_file: bool) -> None:
    seen: set[str] = set()
    for i, p in enumerate(r.field(m, "params", "array")):
        at = f"params[{i}]"
        r.typed(p, "object", at)
        name = r.field(p, "name", "string", f"{at}.name")
        r.ints(r.need(p, "shape", f"{at}.shape"), f"{at}.shape", minimum=0)
        r.field(p, "dtype", "string", f"{at}.dtype")
        if "repack" in p:
            r.field(p, "repack", "string", f"{at}.repack")
        if with_file:
            f = r.field(p, "file", "string", f"{at}.file")
            if not f or "/" in f or "\\" in f or f in (".", ".."):
                raise r.fail(f"{at}.file must name a file in the directory, got {json.dumps(f)}")
        if name in seen:
            raise r.fail(f"{at}: tensor {name} is listed twice")
        seen.add(name)


def read_weights(directory: Path) -> dict[str, Any]:
    """The validated `gptbc-config.json` of a converted-weights directory."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise GptbcError(f"{directory}: no {WEIGHTS_FILE} (convert weights with `gptbc convert-weight`)")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise GptbcError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise GptbcError(f"{path}: not valid UTF-8") from None
    r = _Reader(str(path))
    with reading(path):
        m = _parse(text, r)
        _common(m, r, "convert the weights again")
        r.field(m, "model_name", "string")
        r.ints(r.need(m, "eos_token_id", "eos_token_id"), "eos_token_id")
        _params(m, r, with_file=True)
        _param_files(m, r, Path(directory))
    return m


# The dtypes a converted tensor can have (safetensors_io.DTYPES), and the largest tensor a manifest may list.
DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "uint32", "bool")
MAX_TENSOR_ELEMENTS = 1 << 40


def _param_files(m: dict, r: _Reader, directory: Path) -> None:
    """After every param passed `_params` (native/manifest.cc `check_param_files`, in the same order): each file
    inside the directory, links resolved; each shape and dtype one a tensor can have."""
    for i, p in enumerate(m["params"]):
        at = f"params[{i}]"
        contained(directory, p["file"], r.where, f"{at}.file")
        if p["dtype"] not in DTYPES:
            raise r.fail(f"{at}.dtype {clip(p['dtype'])} is not a tensor dtype ({', '.join(DTYPES)})")
        count = 1
        for n in p["shape"]:
            count *= n
            if count > MAX_TENSOR_ELEMENTS:
                raise r.fail(f"{at}.shape {clip(p['shape'])} has more than 2^40 elements")


def parse_library(text: str, lib: Path) -> dict[str, Any]:
    """The validated `_metadata` of library `lib` (its JSON text)."""
    r = _Reader(f"--lib {lib} metadata")
    m = _parse(text, r)
    _common(m, r, "compile the library again")
    r.field(m, "target", "string")
    r.field(m, "device", "string")
    for key in _LIBRARY_SIZES:
        r.positive(m, key)
    _params(m, r, with_file=False)
    return m


# ---- compatibility ----

def library_metadata_of(lib: Path) -> dict[str, Any]:
    """A library's `_metadata`, read from its bytes without loading it (a foreign-architecture library cannot be
    loaded here); a one-line error when it has none."""
    try:
        blob = Path(lib).read_bytes()
    except FileNotFoundError:
        raise GptbcError(f"--lib {lib}: file not found") from None
    except OSError as err:
        raise GptbcError(f"--lib {lib}: cannot read it ({err.strerror})") from None
    start = blob.find(b'{"gptbc_version"')
    if start < 0:
        raise GptbcError(f"--lib {lib}: not a gptbc model library (no metadata)")
    try:
        meta, _end = json.JSONDecoder().raw_decode(blob[start:start + (1 << 24)].decode("utf-8", "replace"))
    except ValueError:
        raise GptbcError(f"--lib {lib}: its metadata is not valid JSON") from None
    return parse_library(json.dumps(meta), lib)


def _number(x: float) -> str:
    """A float as messages show it: short where that is exact (1e-05), else every digit; the same text as
    native/manifest.cc's (both are C's %g)."""
    short = f"{x:g}"
    return short if float(short) == x else f"{x:.17g}"


def _float32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def identity(cfg: dict, r: _Reader) -> list[tuple[str, str, Any]]:
    """The `_IDENTITY` fields of a manifest's model_config (type-checked; the sizes were checked before) as
    (field, value as messages show it, value as compared)."""
    out: list[tuple[str, str, Any]] = []
    for key, default in _IDENTITY.items():
        path = f"model_config.{key}"
        v = cfg.get(key)
        if v is None:  # absent or null: the default (HF's n_inner null means 4 n_embd)
            v = 4 * cfg["n_embd"] if key == "n_inner" else default
        elif key == "n_inner":
            r.positive(cfg, key, path)
        if isinstance(default, bool):
            out.append((key, "true" if r.typed(v, "boolean", path) else "false", v))
        elif isinstance(default, str):
            out.append((key, r.typed(v, "string", path), _SAME_ACTIVATION.get(v, v)))
        elif isinstance(default, float):
            if _kind(v) not in ("number", "integer"):
                raise r.fail(f"{path} must be a number, got {_kind(v)}")
            # compared as float32, the kernels' type: a GGUF stores epsilon as float32 (1e-05 reads back as
            # 9.99999974738e-06), and its weights run on the library compiled from the HF config that says 1e-05
            out.append((key, _number(float(v)), _number(_float32(float(v)))))
        else:
            out.append((key, str(v), v))
    return out


def _width(q: dict, module: str) -> int | None:
    """A packed module's width in bits in a per-tensor scheme: the recorded one, else the scheme's (quantization.py)."""
    return q.get("widths", {}).get(module, q.get("bits"))


def scheme(quantization: dict) -> str:
    """A quantization description as messages show it; equal strings mean compatible weights."""
    keep = quantization.get("quantize_lm_head", True) or quantization.get("kind") == "none"
    return quantization["name"] + ("" if keep else " (lm_head unquantized)")


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def check_compatible(lib_meta: dict, weights_meta: dict, lib: Path, model_dir: Path, tp: int = 1) -> None:
    """Library and weights (both as read above) describe the same model, scheme and layout, for `tp` ranks
    (--tensor-parallel, as asked of the runtime); fail before computing."""
    weights = Path(model_dir) / WEIGHTS_FILE
    lib_tp, weights_tp = tensor_parallel(lib_meta), tensor_parallel(weights_meta)
    if lib_tp != weights_tp:
        raise GptbcError(f"--lib {lib} was compiled with --tensor-parallel {lib_tp}, but the weights in {model_dir} "
                         f"were converted with --tensor-parallel {weights_tp}; compile and convert with the same N")
    if lib_tp != tp:
        raise GptbcError(f"--tensor-parallel {tp}: --lib {lib} was compiled with --tensor-parallel {lib_tp}; "
                         f"run it with --tensor-parallel {lib_tp}")
    for key, what in (("page_size", "a KV-cache page size"), ("alignment", "a tensor alignment")):
        if lib_meta[key] != weights_meta[key]:
            raise GptbcError(f"--lib {lib} was built with {what} of {lib_meta[key]} "
                             f"(gptbc {lib_meta['gptbc_version']}), but {weights} says {weights_meta[key]} "
                             f"(gptbc {weights_meta['gptbc_version']}); compile and convert with the same gptbc")
    r = _Reader(str(lib))
    for (key, lv, lkey), (_, wv, wkey) in zip(identity(lib_meta["model_config"], r),
                                             identity(weights_meta["model_config"], r)):
        if lkey != wkey:
            raise GptbcError(f"--lib {lib} was compiled for {key} {lv}, but the weights in {model_dir} have {key} "
                             f"{wv}; a library runs only the model it was compiled for (compile one for these weights)")
    lq, wq = scheme(lib_meta["quantization"]), scheme(weights_meta["quantization"])
    if lq != wq:
        raise GptbcError(f"--lib {lib} was compiled for quantization {lq}, but the weights in {model_dir} are {wq}; "
                         f"compile and convert with the same --quantization (and --no-quantize-lm-head) settings")
    lw, ww = lib_meta["quantization"], weights_meta["quantization"]
    for module in sorted(set(lw.get("widths", {})) | set(ww.get("widths", {}))):
        lb, wb = _width(lw, module), _width(ww, module)
        if lb != wb:
            raise GptbcError(f"--lib {lib} was compiled for {module} at {lb} bits, but the weights in {model_dir} "
                             f"have it at {wb} bits; compile the library from the converted directory "
                             f"(gptbc compile --model {model_dir})")
    have = {p["name"]: p for p in weights_meta["params"]}
    for p in lib_meta["params"]:
        w = have.get(p["name"])
        if w is None:
            raise GptbcError(f"{weights}: no tensor {p['name']}, which --lib {lib} needs "
                             f"(were they built from different configs?)")
        if w["shape"] != p["shape"] or w["dtype"] != p["dtype"]:
            raise GptbcError(f"{model_dir}: tensor {p['name']} is {w['dtype']}{_shape(w['shape'])}, --lib {lib} "
                             f"expects {p['dtype']}{_shape(p['shape'])} (were they built from different configs?)")
    takes = {p["name"] for p in lib_meta["params"]}
    for p in weights_meta["params"]:
        if p["name"] not in takes:  # the converter writes exactly the library's list: an extra is another model's
            raise GptbcError(f"{weights}: tensor {p['name']} is not one --lib {lib} takes "
                             f"(were they built from different configs?)")
