"""HF safetensors checkpoint → converted weights directory (`gptbc convert-weight`).

Output layout (everything the runtime and the native runner need, nothing else):
  OUT/gptbc-config.json          the weights manifest (manifest.py): model config, quantization, eos ids,
                                 the param list
  OUT/params-0000K-of-0000N.safetensors
                                 (--tensor-parallel R: rankI-params-... for each rank I, each rank's slices
                                 only, so no rank needs the whole model in memory; sharding.py)
  OUT/<tokenizer files that exist in the HF directory>
The directory is built under a temporary name beside OUT and renamed at the end, so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from gptbc.artifact.files import TOKENIZER_FILES, atomic_path, clip, contained, read_json, reading
from gptbc.artifact.config import (GPTBC_CONFIG, GPTBigCodeConfig, fetch_from_hub, load_hf_config, looks_like_hub_id,
                                  split_revision)
from gptbc.errors import GptbcError, raise_if_interrupted
from gptbc.artifact.manifest import weights_manifest
from gptbc.artifact.sharding import check_tensor_parallel, rank_slicer
from gptbc.artifact.params import converted_params, hf_shapes
from gptbc.artifact.gguf_reader import GGUFCheckpoint, looks_like_gguf
from gptbc.artifact.gguf_tokenizer import tokenizer_files, write_tokenizer
from gptbc.artifact.gptq_reader import QuantizedCheckpoint, quant_config
from gptbc.artifact.quantization import Quantization, dequantize_parts, get_quantization, numpy_dtype, quantize
from gptbc.artifact.safetensors_io import SafetensorsFile, aligned_order, dtype_name, write_safetensors

SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}\.gguf$")  # a split GGUF set's part numbers
PARTS = ("q_weight", "q_scale", "q_min", "q_high")  # a packed weight's parameters (Quantization.parts)
SHARD_BYTES = 1 << 30  # 1 GiB shards: small enough to copy around, few enough to open quickly


class Checkpoint:
    """All tensors of an HF safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        try:
            for path in self._find_files(directory):
                self.files.append(SafetensorsFile(path))
                for name in self.files[-1].keys():
                    if name in self.where:  # which one the model would get is not for us to guess
                        raise GptbcError(f"{path}: tensor {clip(name)} is also in {self.where[name].path.name}")
                    self.where[name] = self.files[-1]
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _find_files(directory: Path) -> list[Path]:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise GptbcError(f"{index}: not a valid safetensors index (weight_map must be a non-empty object, "
                                 f"got {clip(weight_map)})")
            files = sorted({contained(directory, v, str(index), f"weight_map[{clip(k)}]")
                            for k, v in weight_map.items()})
            for f in files:
                if not f.is_file():
                    raise GptbcError(f"{f}: listed in {index.name} but missing")
            return files
        single = directory / "model.safetensors"
        if single.is_file():
            return [single]
        others = sorted(directory.glob("*.safetensors"))
        if others:
            return others
        bins = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        if bins:
            raise GptbcError(
                f"{directory / bins[0]}: PyTorch pickle checkpoints are not loaded (unpickling runs arbitrary code); "
                f"convert to safetensors first: python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{directory}').save_pretrained('{directory}-safetensors')\"")
        raise GptbcError(f"{directory}: no model.safetensors, sharded safetensors index or *.safetensors file")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        return self.where[name].info(name)

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get(name)

    def release(self, name: str) -> None:
        self.where[name].release(name)

    def source_of(self, name: str) -> Path:
        return self.where[name].path if name in self.where else self.directory

    def close(self) -> None:
        for f in self.files:
            f.close()


@dataclass
class ParamPlan:
    """How one model parameter is made from the checkpoint."""

    name: str  # model parameter name (the library's load order uses these)
    shape: tuple[int, ...]
    dtype: str
    source: str  # HF tensor name
    source_shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # layout change, before quantizing
    part: str = ""  # "q_weight" / "q_scale" (/ "q_min" / "q_high") for a packed weight, "" for a plain copy


def mha_qkv_to_fused(cfg: GPTBigCodeConfig) -> Callable[[np.ndarray], np.ndarray]:
    """HF MHA c_attn rows are per head (q, k, v); the KV cache wants all q, then all k, then all v."""
    h, d = cfg.n_head, cfg.head_dim

    def reorder(x: np.ndarray) -> np.ndarray:
        rest = x.shape[1:]
        return x.reshape(h, 3, d, *rest).swapaxes(0, 1).reshape(3 * h * d, *rest)

    return reorder


def _then(first: Callable[[np.ndarray], np.ndarray] | None,
          second: Callable[[np.ndarray], np.ndarray] | None) -> Callable[[np.ndarray], np.ndarray] | None:
    if first is None or second is None:
        return first or second
    return lambda x: second(first(x))


def plan_conversion(cfg: GPTBigCodeConfig, quant: Quantization, ckpt: Checkpoint, tp: int = 1,
                    rank: int = 0) -> list[ParamPlan]:
    """How each tensor of rank `rank` (of `tp`) is made: its HF source, reordered, sliced, then quantized."""
    plans, full = [], dict(hf_shapes(cfg))
    for name, shape, dtype in converted_params(cfg, quant, tp):
        module, _, part = name.rpartition(".")
        source = name
        if part in PARTS:
            source = f"{module}.weight"
        else:
            part = ""
        source_shape = full[source]
        transform = mha_qkv_to_fused(cfg) if ".attn.c_attn." in name and not cfg.multi_query else None
        transform = _then(transform, rank_slicer(cfg, source, tp, rank))
        if module == "lm_head" and source not in ckpt:
            source = "transformer.wte.weight"  # untied config but no lm_head saved: HF falls back the same way
        plans.append(ParamPlan(name, shape, dtype, source, source_shape, transform, part))
    check_plan(plans, ckpt)
    return plans


def check_plan(plans: list[ParamPlan], ckpt: Checkpoint) -> None:
    """Every tensor present, with the right shape and a float dtype, before anything is written."""
    label = getattr(ckpt, "label", lambda name: name)  # a GGUF file names its tensors its own way
    for p in plans:
        if p.source not in ckpt:
            raise GptbcError(f"{ckpt.directory}: tensor {label(p.source)} is missing from the checkpoint")
        dtype, shape = ckpt.info(p.source)
        if tuple(shape) != p.source_shape:
            raise GptbcError(f"{ckpt.source_of(p.source)}: tensor {label(p.source)} has shape {list(shape)}, "
                             f"the config needs {list(p.source_shape)}")
        if dtype.kind != "f" and dtype_name(dtype) != "bfloat16":
            raise GptbcError(f"{ckpt.source_of(p.source)}: tensor {p.source} has dtype {dtype_name(dtype)}, "
                             f"expected a floating-point type")


def count_non_finite(x: np.ndarray, rows: int = 4096) -> int:
    """How many of `x`'s values are NaN or infinite, a block of rows at a time (no full-size temporary)."""
    flat = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    return sum(int(flat[r:r + rows].size - np.count_nonzero(np.isfinite(flat[r:r + rows])))
               for r in range(0, flat.shape[0], rows))


def _shard(plans: list[ParamPlan], limit: int) -> list[list[ParamPlan]]:
    shards: list[list[ParamPlan]] = [[]]
    size = 0
    for p in plans:
        nbytes = int(np.prod(p.shape, dtype=np.int64)) * numpy_dtype(p.dtype).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += nbytes
    return shards


class Fidelity:
    """What a conversion changed: per source type (GGUF's Q6_K, F16, ...), the tensors whose stored values differ
    from the source's, and the worst relative RMS error among them (||stored - source|| / ||source||).
    The converter prints it, so re-quantizing a quantized file is never silent."""

    def __init__(self, type_of: Callable[[str], str]):
        self.type_of = type_of
        self.changed: dict[str, list[tuple[str, float]]] = {}

    def record(self, name: str, source: np.ndarray, stored: Callable[[np.ndarray], np.ndarray]) -> None:
        """`stored(rows)`: the stored values of those source rows as float32 (computed in row chunks)."""
        err = ref = 0.0
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite values were refused or allowed before
            for r in range(0, source.shape[0], 2048):
                s = np.asarray(source[r:r + 2048], np.float32)
                err += float(np.square(stored(np.arange(r, min(r + 2048, source.shape[0]))) - s).sum())
                ref += float(np.square(s).sum())
        if err > 0:
            self.changed.setdefault(self.type_of(name), []).append((name, (err / ref) ** 0.5 if ref else float("inf")))

    def summary(self, scheme: str) -> str | None:
        if not self.changed:
            return None
        parts = [f"{len(v)} {k} tensor{'s' * (len(v) > 1)} (worst {max(v, key=lambda t: t[1])[0]}: relative RMS "
                 f"error {max(e for _, e in v):.2e})" for k, v in sorted(self.changed.items())]
        return f"re-quantized into {scheme}, not exact: " + "; ".join(parts)


class Materializer:
    """Makes each planned tensor; remembers the last quantized weight, whose scales come right after it.

    A checkpoint with `carried` (GGUF) hands over a weight already in the scheme's packed form when its blocks
    are exactly that scheme's groups; anything else is quantized here, and with a `Fidelity` the error of every
    value that changed is measured."""

    def __init__(self, ckpt: Checkpoint, quant: Quantization, fidelity: Fidelity | None = None,
                 allow_non_finite: bool = False):
        self.ckpt, self.quant, self.fidelity = ckpt, quant, fidelity
        self.allow_non_finite = allow_non_finite
        self._last: tuple[str, dict[str, np.ndarray]] | None = None

    def _finite(self, p: ParamPlan, x: np.ndarray, what: str) -> None:
        """Refuse NaN / infinite values in `x` (`what` says which values: the source's, or the stored ones of
        another dtype), naming the tensor and the count, unless the user allowed them."""
        if self.allow_non_finite or x.dtype.kind != "f" and dtype_name(x.dtype) != "bfloat16":
            return
        bad = count_non_finite(x)
        if bad:
            label = getattr(self.ckpt, "label", lambda name: name)(p.source)
            raise GptbcError(f"{self.ckpt.source_of(p.source)}: tensor {label} has {bad} {what} (of {x.size}); "
                             f"pass --allow-non-finite to convert it anyway")

    def __call__(self, p: ParamPlan) -> np.ndarray:
        label = getattr(self.ckpt, "label", lambda name: name)(p.source)
        with reading(self.ckpt.source_of(p.source), f"tensor {label}"):  # a corrupt tensor named, in one line
            return self._make(p)

    def _make(self, p: ParamPlan) -> np.ndarray:
        if p.part:
            if self._last is None or self._last[0] != p.source:
                self._last = (p.source, self._pack(p))
            parts = self._last[1]
            value = parts.pop(p.part)
            if not parts:
                self._last = None  # every part used: free the memory now
            return value
        source = self._source(p)
        self._finite(p, source, "NaN or infinite values")
        with np.errstate(over="ignore"):  # a float32 value past float16's range: counted just below
            out = np.ascontiguousarray(source.astype(numpy_dtype(p.dtype), copy=False))
        if out is not source:
            self._finite(p, out, f"values outside the range of {p.dtype}")
        if self.fidelity is not None and out is not source:
            self.fidelity.record(p.source, source.reshape(source.shape[0], -1),
                                 lambda rows: out.reshape(out.shape[0], -1)[rows].astype(np.float32))
        return out

    def _pack(self, p: ParamPlan) -> dict[str, np.ndarray]:
        quant = self.quant.layout(p.name.rpartition(".")[0])  # a per-tensor scheme: this module's own layout
        names = [name for name, _, _ in quant.parts(p.source_shape)]
        carried = getattr(self.ckpt, "carried", None)
        exact = carried(p.source, quant) if carried is not None else None
        if exact is not None:
            parts = {n: p.transform(a) if p.transform is not None else a for n, a in zip(names, exact)}
            for x in parts.values():
                self._finite(p, x, "NaN or infinite scales or minimums")
            return parts
        w = self._source(p)
        self._finite(p, w, "NaN or infinite values")
        parts = dict(zip(names, quantize(w, quant)))
        for x in parts.values():
            self._finite(p, x, f"scales outside the range of {quant.model_dtype} once quantized")
        if self.fidelity is not None:
            self.fidelity.record(p.source, w, lambda rows: dequantize_parts(
                {n: x[rows] for n, x in parts.items()}, w.shape[1], quant))
        return parts

    def _source(self, p: ParamPlan) -> np.ndarray:
        x = self.ckpt.get(p.source)
        return p.transform(x) if p.transform is not None else x


def convert_weight(hf_dir: str | Path, quantization: str | None, out_dir: str | Path, progress: bool = True,
                   shard_bytes: int = SHARD_BYTES, quantize_lm_head: bool = True, tensor_parallel: int = 1,
                   allow_non_finite: bool = False) -> Path:
    """Convert (and quantize) an HF GPTBigCode checkpoint, a GGUF file or a GPTQ/AWQ directory, one tensor at a
    time; returns the output directory. `quantization` None: a quantized file's own scheme (HF checkpoints
    need one named). `tensor_parallel` N > 1: presharded for N ranks, each rank's tensors in files of their own.
    A NaN or infinite weight is refused (naming its tensor) unless `allow_non_finite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / GPTBC_CONFIG).is_file() and any(out_dir.iterdir()):
        raise GptbcError(f"-o {out_dir}: exists and is not a gptbc weights directory; refusing to overwrite it")
    source = _open_source(str(hf_dir), quantization)
    try:
        quant = get_quantization(quantization or source.scheme, quantize_lm_head)
        if quant.per_tensor and hasattr(source.ckpt, "widths"):  # each tensor in its own width (quantization.py)
            quant = dataclasses.replace(quant, widths=source.ckpt.widths(quant))
        check_tensor_parallel(source.cfg, quant, tensor_parallel)
        ranks = [plan_conversion(source.cfg, quant, source.ckpt, tensor_parallel, r) for r in range(tensor_parallel)]
        with atomic_path(out_dir, directory=True) as tmp:
            fidelity = _write_output(tmp, source, quant, ranks, progress, shard_bytes, allow_non_finite)
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: readable by its owner only
            raise_if_interrupted()  # a Ctrl-C swallowed on the way still cancels the output
            _replace_dir(tmp, out_dir)
    finally:
        source.ckpt.close()
    note = fidelity.summary(quant.name) if fidelity is not None else None
    if note:
        print(f"gptbc: {note}", file=sys.stderr)
    return out_dir


@dataclass
class Source:
    """What a conversion reads: the checkpoint, its config, its display name and the files written beside it."""

    name: str
    cfg: GPTBigCodeConfig
    ckpt: Any
    write_extras: Callable[[Path], None]  # tokenizer (and generation defaults) into the output
    scheme: str = ""  # the scheme holding the weights as stored ("" when none does)
    fidelity: Fidelity | None = None  # measures what re-quantizing changed (quantized sources)


def _open_source(spec: str, quantization: str | None) -> Source:
    if looks_like_gguf(spec):
        ckpt = GGUFCheckpoint(spec)
        try:
            scheme = ckpt.default_scheme() or ""
            if not (quantization or scheme):
                raise GptbcError(f"{ckpt.directory}: its weights are {', '.join(ckpt.packed_types())}, which no "
                                 f"one packed gptbc scheme stores exactly; pass --quantization q0f32 to keep every "
                                 f"value (as float32), or a packed scheme (qkf16_a keeps Q4_*/Q5_*/Q6_K tensors "
                                 f"exactly, q8f16_1 Q8_0 ones) to re-quantize the others (the error is measured and printed)")
            stem = SPLIT_SUFFIX.sub("", ckpt.files[0].name).removesuffix(".gguf")
            tokenizer = tokenizer_files(ckpt.meta, ckpt.files[0])
            return Source(stem, ckpt.config, ckpt, lambda tmp: write_tokenizer(tokenizer, tmp),
                          scheme, Fidelity(lambda n: ckpt.type_of(n)))
        except BaseException:
            ckpt.close()
            raise
    hf_dir = checkpoint_dir(spec)
    cfg = load_hf_config(hf_dir)
    settings = quant_config(hf_dir)
    if quantization is None and settings is None:
        raise GptbcError(f"{spec}: --quantization is required for a Hugging Face checkpoint")
    from gptbc.artifact.checkpoint_layouts import wrap_checkpoint  # original SantaCoder layout → gpt_bigcode tensors, on the fly

    def copy_tokenizer(tmp: Path) -> None:
        for f in TOKENIZER_FILES:
            if (hf_dir / f).is_file():
                shutil.copyfile(hf_dir / f, tmp / f)

    if settings is None:
        return Source(hf_dir.resolve().name, cfg, wrap_checkpoint(Checkpoint(hf_dir), hf_dir, cfg), copy_tokenizer)
    ckpt = QuantizedCheckpoint(Checkpoint(hf_dir), cfg, settings)
    try:
        scheme = ckpt.exact_scheme() or ""
        if not (quantization or scheme):
            raise GptbcError(f"{hf_dir}: gptbc cannot store this {ckpt.method} checkpoint exactly: "
                             f"{ckpt.why_not_exact()}; pass --quantization (e.g. q4f16_1) to re-quantize it "
                             f"(the error is measured and printed)")
    except BaseException:
        ckpt.close()
        raise
    return Source(hf_dir.resolve().name, cfg, ckpt, copy_tokenizer, scheme, Fidelity(ckpt.type_of))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checkpoint_dir(spec: str) -> Path:
    """A local HF directory, or a Hub id fetched (safetensors, config, tokenizer) into the HF cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise GptbcError(f"{spec}: is a file, expected a Hugging Face model directory or a Hub id")
    if looks_like_hub_id(spec):
        repo, revision = split_revision(spec)
        return fetch_from_hub(repo, revision=revision)
    raise GptbcError(f"{spec}: not a directory (nor a Hub id like bigcode/gpt_bigcode-santacoder)")


def _write_output(tmp: Path, source: Source, quant: Quantization, ranks: list[list[ParamPlan]], progress: bool,
                  shard_bytes: int, allow_non_finite: bool) -> Fidelity | None:
    bar = tqdm(total=sum(map(len, ranks)), desc="convert", unit="tensor", disable=not progress)
    fidelity = Fidelity(source.fidelity.type_of) if source.fidelity is not None else None
    files = [_write_rank(tmp, plans, source.ckpt, quant, shard_bytes, bar, f"rank{rank}-" if len(ranks) > 1 else "",
                         fidelity, allow_non_finite) for rank, plans in enumerate(ranks)][0]
    bar.close()
    plans = ranks[0]  # every rank has the same names and shapes; the manifest lists rank 0's files
    # listed in the model's order (the library's load order), whatever order the shards hold them in
    param_index = [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "file": files[p.name]} for p in plans]
    source.write_extras(tmp)
    meta = weights_manifest(source.name, source.cfg, quant, param_index, len(ranks))
    (tmp / GPTBC_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return fidelity


def _write_rank(tmp: Path, plans: list[ParamPlan], ckpt: Checkpoint, quant: Quantization, shard_bytes: int,
                bar: tqdm, prefix: str, fidelity: Fidelity | None, allow_non_finite: bool) -> dict[str, str]:
    """Write one rank's tensors (`prefix` names its files); returns {param name: its file}."""
    shards = _shard(plans, shard_bytes)
    make = Materializer(ckpt, quant, fidelity, allow_non_finite)
    files: dict[str, str] = {}  # param name → its shard
    for k, shard in enumerate(shards):
        fname = f"{prefix}params-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        sizes = [int(np.prod(p.shape, dtype=np.int64)) * numpy_dtype(p.dtype).itemsize for p in shard]
        shard = [shard[i] for i in aligned_order(sizes)]  # aligned tensors load without a copy

        def arrays(shard: list[ParamPlan] = shard) -> Iterator[np.ndarray]:
            for p in shard:
                yield make(p)
                ckpt.release(p.source)  # written: its mapped pages need not stay resident
                bar.update(1)

        write_safetensors(tmp / fname, [(p.name, p.shape, numpy_dtype(p.dtype)) for p in shard], arrays())
        files.update({p.name: fname for p in shard})
    return files


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an existing gptbc output is swapped out only after the new one is complete."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name[-8:]}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
