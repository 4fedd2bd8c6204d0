"""MODEL → converted weights + library: what `gptbc serve|generate|bench|bundle MODEL` run.

MODEL is a converted directory (used as it is), a Hugging Face directory, a Hub id (`owner/name[@revision]`), a
GGUF file, or a preset name with `--random-weights`. Whatever is missing is made on first use and kept in the
artifact cache (artifact/cache.py): converted weights keyed by the source's identity (its files' sha256, or the Hub
commit) + scheme + tensor-parallel degree + the converter's sources; the library keyed as compile.compiler's
`library_key` says. Later runs find both and start at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from gptbc.artifact import cache
from gptbc.artifact.config import (GPTBC_CONFIG, fetch_from_hub, load_gptbc_config, looks_like_hub_id,
                                   preset_names, resolve_model, split_revision)
from gptbc.errors import GptbcError

# The scheme a float checkpoint gets when --quantization is left out: 4-bit weights with float16 scales, the
# smallest scheme that every target runs, and the fastest decode on the CPUs measured (BENCHMARKS.md).
FLOAT_DEFAULT = "q4f16_1"
RANDOM_SEED = 0
TARGET_OF_DEVICE = {"cpu": "cpu", "cuda": "cuda", "vulkan": "vulkan", "metal": "metal"}


@dataclass
class Prepared:
    name: str  # what the model is called (serve's model id)
    model_dir: Path  # converted weights
    lib: Path  # the model library
    device: str  # where it runs


def default_device() -> str:
    """This machine's best: a CUDA GPU if TVM sees one, else the CPU."""
    import tvm

    try:
        return "cuda" if tvm.cuda(0).exist else "cpu"
    except Exception:  # a TVM built without CUDA, or no driver
        return "cpu"


def choose_device(device: str | None, target: str | None, lib_meta: dict | None) -> tuple[str, str | None]:
    """(device, target): what was named, else what the library (its metadata) was built for, else this machine's
    best."""
    from gptbc.compile.targets import get_target

    if device is None and lib_meta is not None:
        device = lib_meta["device"]
    if device is None and target is not None:
        device = get_target(target)[0].device
    device = device or default_device()
    kind = device.split(":")[0]
    if target is None and lib_meta is None:
        if kind not in TARGET_OF_DEVICE:
            raise GptbcError(f"--device {device}: choose cpu, cuda[:N], vulkan[:N] or metal")
        target = TARGET_OF_DEVICE[kind]
    return device, target


def prepare(model: str, lib: str | None = None, quantization: str | None = None, target: str | None = None,
            device: str | None = None, random_weights: bool = False, tensor_parallel: int = 1,
            activations: str = "auto", batch_invariant: bool = False, log: Callable[[str], None] = print,
            progress: bool | None = None, allow_non_finite: bool = False) -> Prepared:
    """Resolve MODEL to weights and a library, converting and compiling what the cache does not hold yet."""
    from gptbc.artifact.manifest import library_metadata_of, tensor_parallel as lib_tp

    meta = library_metadata_of(Path(lib)) if lib is not None else None
    device, target = choose_device(device, target, meta)
    keep_head, path = True, Path(model).expanduser()
    converted_dir = path.is_dir() and (path / GPTBC_CONFIG).is_file()
    if meta is not None and not converted_dir:
        # weights still to convert go into the library's own scheme (and tensor-parallel degree)
        held = meta["quantization"]["name"]
        if quantization is not None and quantization != held:
            raise GptbcError(f"--quantization {quantization}: --lib {lib} was compiled for {held} (leave "
                             f"--quantization out to convert {model} into it)")
        quantization, tensor_parallel = held, lib_tp(meta)
        keep_head = meta["quantization"].get("quantize_lm_head", True)
    name, model_dir = converted(model, quantization, random_weights, tensor_parallel, log, progress, keep_head,
                                allow_non_finite)
    if lib is None:
        from gptbc.compile.compiler import cached_library, plan_library

        source = resolve_model(str(model_dir))
        scheme = load_gptbc_config(model_dir)["quantization"]
        plan = plan_library(source, target, scheme["name"], scheme.get("quantize_lm_head", True), activations,
                            batch_invariant, tensor_parallel)
        with progress_bar("compile", lambda: estimate_seconds("libraries", target), log) as shown:
            lib = cached_library(plan, shown)
    return Prepared(name, model_dir, Path(lib), device)


def estimate_seconds(kind: str, target: str) -> float | None:
    """How long a build of `kind` for `target` took here, the median of those in the cache (None: never built)."""
    took = sorted(e.info.get("build_seconds", 0) for e in cache.entries()
                  if e.kind == kind and e.info.get("parts", {}).get("target") == target)
    return took[len(took) // 2] if took else None


@contextlib.contextmanager
def progress_bar(what: str, estimate: Callable[[], float | None],
                 log: Callable[[str], None]) -> Iterator[Callable[[str], None]]:
    """On a terminal, a bar of the seconds spent against `estimate()` (so an ETA) while the block runs, its lines
    printed above the bar; elsewhere the block's lines alone (one per phase). The estimate is made on the bar's
    own thread, so a block that ends at once (a cached library) never waits for it."""
    if not sys.stderr.isatty():
        yield log
        return
    from tqdm import tqdm

    bar = tqdm(total=None, desc=what, unit="s", file=sys.stderr, leave=False)
    stop = threading.Event()

    def tick() -> None:
        seconds = estimate()
        if seconds and not stop.is_set():
            bar.total = round(seconds)
            bar.refresh()
        while not stop.wait(1.0):
            if bar.total is None or bar.n < bar.total - 1:  # past the estimate: hold just short of the end
                bar.update(1)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield lambda m: bar.write(m, file=sys.stderr)
    finally:
        stop.set()
        ticker.join()
        bar.close()


def converted(model: str, quantization: str | None, random_weights: bool, tp: int,
              log: Callable[[str], None], progress: bool | None = None,
              quantize_lm_head: bool = True, allow_non_finite: bool = False) -> tuple[str, Path]:
    """(name, converted weights directory) of MODEL: the directory itself when it is one, else the cache's.
    `allow_non_finite` converts weights holding NaN or infinities (refused otherwise); it is not part of the key:
    what it converts is what the same source gives with it, and without it nothing is made."""
    path = Path(model).expanduser()
    if random_weights:
        return _random(model, quantization, tp, log)
    if path.is_dir() and (path / GPTBC_CONFIG).is_file():
        manifest = load_gptbc_config(path)
        held = manifest["quantization"]["name"]
        if quantization is not None and held != quantization:
            raise GptbcError(f"--quantization {quantization}: {path} holds {held} weights (a converted directory "
                             f"runs as it is; point MODEL at the original checkpoint to convert it again)")
        return manifest.get("model_name") or path.resolve().name, path
    if model in preset_names() and not path.exists():
        raise GptbcError(f"{model} is a preset (a config, no weights): pass --random-weights to try it with random "
                         f"weights, or the Hub id / local checkpoint of its weights")
    source, name, identity = _source(model)
    scheme = quantization or (FLOAT_DEFAULT if _is_float_hf(source) else None)
    parts = {"source": identity, "quantization": scheme or "as stored", "tensor_parallel": tp,
             "converter": converter_sources()}

    def build(folder: Path) -> None:
        from gptbc.artifact.convert import convert_weight

        show = sys.stderr.isatty() if progress is None else progress
        if not show:
            log(f"[gptbc] converting {model} ({scheme or 'its own scheme'})")
        convert_weight(source, scheme, folder / "model", progress=show, tensor_parallel=tp,
                       quantize_lm_head=quantize_lm_head, allow_non_finite=allow_non_finite)

    if not quantize_lm_head:
        parts["quantize_lm_head"] = False
    entry = cache.get_or_build("weights", parts, build, describe=f"{name} {scheme or '(as stored)'}", log=log)
    return name, entry.path / "model"


def _random(model: str, quantization: str | None, tp: int, log: Callable[[str], None]) -> tuple[str, Path]:
    if model not in preset_names():
        raise GptbcError(f"--random-weights: {model} is not a preset name (one of {', '.join(preset_names())})")
    if tp > 1:
        raise GptbcError(f"--random-weights with --tensor-parallel {tp}: random weights are written for one device")
    from gptbc.artifact.quantization import get_quantization
    from gptbc.artifact.random_weights import write_random_weights

    cfg = resolve_model(model).config
    quant = get_quantization(quantization or FLOAT_DEFAULT)
    parts = {"preset": cfg.to_dict(), "quantization": quant.name, "seed": RANDOM_SEED, "converter": converter_sources()}
    entry = cache.get_or_build(
        "weights", parts, lambda folder: write_random_weights(folder / "model", model, cfg, quant, RANDOM_SEED),
        describe=f"{model} {quant.name} (random weights)", log=log)
    return model, entry.path / "model"


def _is_float_hf(source: str) -> bool:
    """An HF checkpoint without a GPTQ/AWQ quantization_config (a GGUF or quantized one keeps its own scheme)."""
    from gptbc.artifact.gguf_reader import looks_like_gguf
    from gptbc.artifact.gptq_reader import quant_config

    return not looks_like_gguf(source) and quant_config(Path(source)) is None


def _source(model: str) -> tuple[str, str, dict[str, Any]]:
    """(what convert_weight reads, the model's name, its identity for the cache key)."""
    from gptbc.artifact.convert import SPLIT_SUFFIX
    from gptbc.artifact.gguf_reader import looks_like_gguf

    path = Path(model).expanduser()
    if looks_like_gguf(model):
        files = gguf_files(path)
        stem = SPLIT_SUFFIX.sub("", files[0].name).removesuffix(".gguf")
        return model, stem, {"gguf": file_identities(files)}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return model, path.resolve().name, {"directory": file_identities(files)}
    if path.exists():
        raise GptbcError(f"{model}: not a GGUF file, a model directory, a Hub id or a preset")
    if looks_like_hub_id(model):
        repo, revision = split_revision(model)
        snapshot = fetch_from_hub(repo, revision=revision)  # huggingface_hub draws its own bars on a terminal
        return str(snapshot), repo.split("/")[-1], {"hub": repo, "commit": snapshot.name}
    raise GptbcError(f"{model}: not a converted or Hugging Face directory, a GGUF file, a Hub id (owner/name) or a "
                     f"preset ({', '.join(preset_names())})")


def gguf_files(path: Path) -> list[Path]:
    """The files of a GGUF model: the file, every part of its split set, or the .gguf files of a folder."""
    from gptbc.artifact.convert import SPLIT_SUFFIX

    if path.is_dir():
        return sorted(path.glob("*.gguf"))
    if SPLIT_SUFFIX.search(path.name):
        stem = SPLIT_SUFFIX.sub("", path.name)
        return sorted(p for p in path.parent.glob(f"{stem}-*.gguf") if SPLIT_SUFFIX.search(p.name))
    return [path]


def file_identities(files: list[Path]) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of each file. A file whose path, size, mtime and inode are as when it was last hashed
    is not read again (the hashes are remembered in the cache folder), so a second start costs a stat a file."""
    memo_path = cache.cache_root() / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    out, changed = [], False
    for f in files:
        real = os.path.realpath(f)
        st = os.stat(real)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = memo.get(real)
        if not (isinstance(known, dict) and known.get("stamp") == stamp):
            known, changed = {"stamp": stamp, "sha256": cache.file_sha256(Path(real))}, True
            memo[real] = known
        out.append((f.name, st.st_size, known["sha256"]))
    if changed:
        _write_memo(memo_path, memo)
    return out


def _write_memo(path: Path, memo: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".file-hashes.", dir=path.parent)
    except OSError:
        return  # only a memo: the next start hashes again
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


@functools.lru_cache(maxsize=None)
def converter_sources() -> str:
    """A hash of the artifact package's sources: a changed converter converts again."""
    return cache.sources_hash(Path(__file__).resolve().parent / "artifact")
