"""GGUF files (llama.cpp, Ollama, LM Studio) as a checkpoint the converter reads, tensor by tensor.

GPTBigCode models are GGUF architecture `starcoder` (llama.cpp's convert_hf_to_gguf.py writes them; there is
no `gpt_bigcode` architecture, and `starcoder2` is another model). What this module relies on:
  * metadata `starcoder.{context_length, embedding_length, block_count, feed_forward_length,
    attention.head_count, attention.head_count_kv, attention.layer_norm_epsilon}`;
  * tensors named `token_embd`, `position_embd`, `blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up,
    ffn_down}`, `output_norm`, `output` (absent when tied), each `.weight` / `.bias`, weights [out, in] as HF's;
  * a block of Q8_0 is an fp16 scale d and 32 int8 q (value d * q): exactly gptbc's q8*_1 group;
    a block of Q4_0 is an fp16 d and 16 bytes, byte j holding element j (low nibble) and j + 16 (high), value
    (q - 8) * d: exactly q4*_1's (n - 7) * s with n = 15 - q and s = -d.
  * Q4_0, Q4_1 and Q4_K are (q, scale, min) per 32 values: exactly the affine scheme q4*_a (quantization.py);
    Q5_0, Q5_1 and Q5_K are the same with 5-bit q, and Q6_K is (q - 32) scale per 16 values: exactly the affine
    layouts of 5 and 6 bits, which the per-tensor schemes qk*_a use for the tensors of those types (each tensor
    in its own width: `widths`).
Every other block type (Q2_K, Q3_K, ...), and any type the chosen scheme does not hold, is dequantized with
`gguf.quants.dequantize` (bit-exact with ggml's C) and then re-quantized into the chosen scheme, and the converter
reports the error it measured.

The header is parsed with the `gguf` package; the tensor bytes are read through our own read-only mapping
of each file, one tensor at a time, and dropped from memory once written (as SafetensorsFile does).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptbc.artifact.config import GPTBigCodeConfig
from gptbc.artifact.quantization import Quantization, is_quantized, pack_affine, pack_nibbles
from gptbc.artifact.files import clip, reading
from gptbc.errors import GptbcError

ARCH = "starcoder"
# The first 4 bytes of the pre-GGUF formats (GGML, GGMF, GGJT: llama.cpp before August 2023), as stored.
OLD_GGML_MAGICS = (b"lmgg", b"fmgg", b"tjgg", b"algg")
GGUF_MAGIC = b"GGUF"
ROW_BLOCK = 1024  # rows dequantized at a time
SPLIT = re.compile(r"^(?P<stem>.*)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")

# Tensor types whose values gptbc stores without re-quantizing, by scheme kind.
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
GROUP_TYPES = {"Q8_0": 8, "Q4_0": 4}  # → q8*_1 / q4*_1 bit for bit
# The scheme a file converts to when --quantization is not given: the one type of its packed tensors.
DEFAULT_SCHEME = {"F32": "q0f32", "F16": "q0f16", "BF16": "q0bf16", "Q8_0": "q8f16_1", "Q4_0": "q4f16_1"}


def looks_like_gguf(spec: str) -> bool:
    """Whether `convert-weight` should read `spec` as GGUF: a .gguf (or old GGML .bin) file, or a folder of them."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.suffix == ".gguf" or _magic(path) in (GGUF_MAGIC, *OLD_GGML_MAGICS)
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as err:
        raise GptbcError(f"{path}: cannot open ({err.strerror})") from None


def gguf_files(spec: str) -> list[Path]:
    """The file(s) of one model: a .gguf file, every part of its split set, or the one model in a folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        models = sorted({SPLIT.sub(r"\g<stem>", f.name) for f in found})
        if len(models) != 1:
            raise GptbcError(f"{path}: holds {len(models)} GGUF models ({', '.join(models) or 'none'}); "
                             f"pass the one to convert")
        path = found[0]
    if _magic(path) in OLD_GGML_MAGICS:
        raise GptbcError(f"{path}: an old GGML file, not GGUF: convert it with llama.cpp first "
                         f"(convert_llama_ggml_to_gguf.py)")
    m = SPLIT.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    parts = [path.with_name(f"{m['stem']}-{k:05d}-of-{n:05d}.gguf") for k in range(1, n + 1)]
    for p in parts:
        if not p.is_file():
            raise GptbcError(f"{p}: part {p.name} of the split set {m['stem']} is missing")
    return parts


@dataclass
class TensorEntry:
    path: Path
    type_name: str  # ggml type: "F16", "Q4_0", "Q6_K", ...
    type_id: int
    shape: tuple[int, ...]  # numpy order: [out, in] for a weight
    offset: int  # of its bytes in the file
    nbytes: int


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, TensorEntry]]:
    """(metadata key → value, GGUF tensor name → entry) of one file; a bad file is one line naming it."""
    if _magic(path) != GGUF_MAGIC:
        raise GptbcError(f"{path}: not a GGUF file (its first bytes are not 'GGUF')")
    with open(path, "rb") as f, reading(path, "GGUF header"):
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _Header(buf, path, size).read()


# GGUF metadata value types: id → (struct format, size) of the scalar ones; 8 is a string, 9 an array.
SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
           7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS


class _Header:
    """The GGUF header parsed from the bytes of the file (no count or length is trusted before it is checked
    against the bytes left: a 243 KB file claiming a 2^40-element array fails at once, allocating nothing)."""

    def __init__(self, buf: mmap.mmap, path: Path, size: int):
        self.buf, self.path, self.size, self.at = buf, path, size, 4

    def fail(self, what: str) -> GptbcError:
        return GptbcError(f"{self.path}: truncated or corrupt GGUF file ({what})")

    def take(self, fmt: str, n: int) -> Any:
        if self.at + n > self.size:
            raise self.fail(f"ends at byte {self.size} inside its header")
        (v,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += n
        return v

    def count(self, n: int, item_bytes: int, what: str) -> int:
        """A count of items of at least `item_bytes` bytes each, checked against the bytes left in the file."""
        if n * item_bytes > self.size - self.at:
            raise self.fail(f"{what} claims {n} items, more than the {self.size - self.at} bytes left hold")
        return n

    def string(self, what: str) -> str:
        n = self.count(self.take("<Q", 8), 1, f"the string length of {what}")
        raw = bytes(self.buf[self.at:self.at + n])
        self.at += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, kind: int, key: str) -> Any:
        if kind in SCALARS:
            return self.take(*SCALARS[kind])
        if kind == STRING:
            return self.string(f"metadata {clip(key)}")
        if kind == ARRAY:  # of scalars or strings (nested arrays: no model metadata uses them)
            kind = item = self.take("<I", 4)
            n = self.take("<Q", 8)
            if item in SCALARS:
                fmt, width = SCALARS[item]
                self.count(n, width, f"metadata array {clip(key)}")
                values = np.frombuffer(self.buf, np.dtype(fmt), count=n, offset=self.at).tolist()
                self.at += n * width
                return values
            if item == STRING:
                return [self.string(f"metadata {clip(key)}") for _ in range(self.count(n, 8, f"metadata array "
                                                                                          f"{clip(key)}"))]
        raise self.fail(f"metadata {clip(key)} has value type {kind}, not one gptbc reads")

    def read(self) -> tuple[dict[str, Any], dict[str, TensorEntry]]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        version = self.take("<I", 4)
        if version not in (2, 3):
            raise GptbcError(f"{self.path}: GGUF version {version}; gptbc reads versions 2 and 3 (little-endian)")
        n_tensors, n_keys = self.take("<Q", 8), self.take("<Q", 8)
        self.count(n_keys, 12, "the metadata key count")
        self.count(n_tensors, 24, "the tensor count")
        meta: dict[str, Any] = {}
        for _ in range(n_keys):
            key = self.string("a metadata key")
            meta[key] = self.value(self.take("<I", 4), key)
        infos = []
        for _ in range(n_tensors):
            name = self.string("a tensor name")
            n_dims = self.take("<I", 4)
            if not 1 <= n_dims <= MAX_DIMS:
                raise self.fail(f"tensor {clip(name)} has {n_dims} dimensions, GGUF allows 1 to {MAX_DIMS}")
            dims = [self.take("<Q", 8) for _ in range(n_dims)]
            infos.append((name, dims, self.take("<I", 4), self.take("<Q", 8)))
        alignment = meta.get("general.alignment", 32)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment {clip(alignment)} is not a power of two")
        data = -(-self.at // alignment) * alignment
        tensors: dict[str, TensorEntry] = {}
        for name, dims, type_id, offset in infos:
            try:
                kind = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[kind]
            except (ValueError, KeyError):
                raise GptbcError(f"{self.path}: tensor {clip(name)} has unknown block type {type_id} (not a ggml "
                                 f"type the installed gguf package knows: a newer file, or a corrupt one)") from None
            elements = math.prod(dims)
            if dims[0] % block:
                raise self.fail(f"tensor {clip(name)}'s rows of {dims[0]} are not whole {kind.name} blocks of "
                                f"{block}")
            nbytes = elements // block * type_size
            if data + offset + nbytes > self.size:
                raise GptbcError(f"{self.path}: truncated GGUF file (tensor {clip(name)} ends at byte "
                                 f"{data + offset + nbytes}, the file has {self.size})")
            if name in tensors:
                raise self.fail(f"tensor {clip(name)} is listed twice")
            tensors[name] = TensorEntry(self.path, kind.name, type_id, tuple(reversed(dims)), data + offset, nbytes)
        spans = sorted((e.offset, e.offset + e.nbytes, n) for n, e in tensors.items() if e.nbytes)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise self.fail(f"the bytes of tensors {clip(a)} and {clip(b)} overlap")
        return meta, tensors


def _hf_to_gguf(cfg: GPTBigCodeConfig) -> dict[str, str]:
    """gpt_bigcode tensor name → GGUF tensor name."""
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}
    modules = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(cfg.n_layer):
        for hf, gg in modules.items():
            for part in ("weight", "bias"):
                names[f"transformer.h.{i}.{hf}.{part}"] = f"blk.{i}.{gg}.{part}"
    return names


class GGUFCheckpoint:
    """The tensors of a GGUF model under gpt_bigcode names, as `convert.Checkpoint` offers them (`in`, `info`,
    `get`, `release`, `source_of`, `close`), plus `carried`: the packed form of a tensor in a
    scheme (layout) that holds it exactly, `widths`: the per-tensor widths of the file's affine types, and
    `type_of`: the ggml type a tensor is stored in."""

    def __init__(self, spec: str):
        self.files = gguf_files(spec)
        self.directory = self.files[0]
        self.meta: dict[str, Any] = {}
        self.entries: dict[str, TensorEntry] = {}
        for k, f in enumerate(self.files):
            meta, tensors = _read_header(f)
            if k == 0:
                self.meta = meta
            self.entries.update(tensors)
        with reading(self.files[0], "metadata"):
            self.config = config_from_metadata(self.meta, self.files[0], self.entries)
        self.names = {hf: gg for hf, gg in _hf_to_gguf(self.config).items() if gg in self.entries}
        self._maps: dict[Path, mmap.mmap] = {}
        self._handles = []
        for f in self.files:
            handle = open(f, "rb")
            self._handles.append(handle)
            self._maps[f] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def type_of(self, name: str) -> str:
        return self.entries[self.names[name]].type_name

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        e = self.entries[self.names[name]]
        return np.dtype("float32") if e.type_name not in FLOAT_TYPES else _float_dtype(e.type_name), e.shape

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored: floats in their own dtype, blocks as uint8 [rows, bytes per row]."""
        e = self.entries[self.names[name]]
        buf = np.frombuffer(self._maps[e.path], np.uint8, count=e.nbytes, offset=e.offset)
        if e.type_name in FLOAT_TYPES:
            return buf.view(_float_dtype(e.type_name)).reshape(e.shape)
        return buf.reshape(*e.shape[:-1], -1)

    def get(self, name: str) -> np.ndarray:
        e = self.entries[self.names[name]]
        if e.type_name in FLOAT_TYPES:
            return self.raw(name)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        # in row blocks: gguf's dequantizers make several full-size float32 temporaries, which for a 15B
        # model's token embedding would be gigabytes
        raw, kind = self.raw(name), GGMLQuantizationType(e.type_id)
        out = np.empty(e.shape, np.float32)
        for r in range(0, e.shape[0], ROW_BLOCK):
            out[r:r + ROW_BLOCK] = dequantize(raw[r:r + ROW_BLOCK], kind)
        return out

    def carried(self, name: str, quant: Quantization) -> tuple[np.ndarray, ...] | None:
        """(q_weight, q_scale (, q_min, q_high)) holding exactly the stored values, when `quant` (one module's
        layout) can; else None."""
        kind = self.type_of(name)
        if quant.kind == "affine" and kind in AFFINE_TYPES and AFFINE_TYPES[kind][0] == quant.bits:
            q, scale, low = AFFINE_TYPES[kind][1](self.raw(name))
            nibbles, high = pack_affine(q, quant)
            return tuple(x for x in (nibbles, scale, low, high) if x is not None)
        if quant.kind != "group" or GROUP_TYPES.get(kind) != quant.bits:
            return None
        blocks = self.raw(name)
        rows = blocks.shape[0]
        blocks = blocks.reshape(rows, -1, 34 if kind == "Q8_0" else 18)
        d = _half(blocks, 0)
        if kind == "Q8_0":
            return (np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, -1),
                    d.astype(quant.model_dtype))
        # flipped: (15 - q) - 7 = 8 - q, and the scale negated
        return pack_nibbles(15 - _split_nibbles(blocks[:, :, 2:]).reshape(rows, -1)), (-d).astype(quant.model_dtype)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from resident memory (a 9 GB file must not end up all resident)."""
        e = self.entries[self.names[name]]
        page = mmap.PAGESIZE
        lo, hi = e.offset // page * page, min(-(-(e.offset + e.nbytes) // page) * page, len(self._maps[e.path]))
        if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
            self._maps[e.path].madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def source_of(self, name: str) -> Path:
        return self.entries[self.names[name]].path if name in self.names else self.directory

    def label(self, name: str) -> str:
        """How messages name a tensor: the file's name, then the gpt_bigcode one."""
        return f"{_hf_to_gguf(self.config).get(name, name)} ({name})"

    def default_scheme(self) -> str | None:
        """The scheme holding every packed weight as stored (the layers' linear weights, and the embedding and
        head, which llama.cpp's quantizer often writes in another type: Q6_K beside Q4_0 layers), when one does:
        a file of one type that a scheme holds, of 4-bit types that the affine scheme holds (Q4_0, Q4_1, Q4_K),
        or of types the per-tensor affine scheme holds (Q4_*, Q5_*, Q6_K)."""
        types = self.packed_types()
        if len(types) == 1 and types[0] in DEFAULT_SCHEME:
            return DEFAULT_SCHEME[types[0]]
        if types and all(AFFINE_TYPES.get(t, (0,))[0] == 4 for t in types):
            return "q4f16_a"
        return "qkf16_a" if types and set(types) <= set(AFFINE_TYPES) else None

    def packed_types(self) -> list[str]:
        """The ggml types of the tensors a packed scheme packs (linear weights, embedding, head)."""
        return sorted({self.type_of(n) for n in self.names if is_quantized(PACKED, n, self.config.tie_word_embeddings)})

    def widths(self, quant: Quantization) -> tuple[tuple[str, int], ...]:
        """For a per-tensor scheme: (module, bits) of each packed module whose tensor is of a type an affine
        layout holds exactly (Q4_*, Q5_*, Q6_K); the others take the scheme's default layout (re-quantized)."""
        out = []
        for name in self.names:
            if is_quantized(quant, name, self.config.tie_word_embeddings) and self.type_of(name) in AFFINE_TYPES:
                out.append((name.rpartition(".")[0], AFFINE_TYPES[self.type_of(name)][0]))
        return tuple(sorted(out))  # (a GGUF is untied exactly when it has `output`, so lm_head is always its own)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # views still alive; the mapping goes when they do
                pass
        for h in self._handles:
            h.close()


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block: float16 [rows, blocks]."""
    return np.ascontiguousarray(blocks[:, :, at:at + 2]).view(np.float16)[:, :, 0]


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes → [..., 32] values: byte j's low nibble is value j, its high nibble value j + 16."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _q4_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 [rows, cols], scale, min float32 [rows, groups]) of Q4_0 blocks: (q - 8) d = q d + (-8 d)."""
    blocks = raw.reshape(raw.shape[0], -1, 18)
    d = _half(blocks, 0).astype(np.float32)
    return _split_nibbles(blocks[:, :, 2:]).reshape(raw.shape[0], -1), d, -8 * d


def _q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 blocks (fp16 d, fp16 m, 16 bytes): q d + m."""
    blocks = raw.reshape(raw.shape[0], -1, 20)
    return (_split_nibbles(blocks[:, :, 4:]).reshape(raw.shape[0], -1), _half(blocks, 0).astype(np.float32),
            _half(blocks, 2).astype(np.float32))


def _q5_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_0 blocks (fp16 d, 4 bytes of high bits, 16 bytes of nibbles): (q - 16) d = q d + (-16 d), exact."""
    blocks = raw.reshape(raw.shape[0], -1, 22)
    d = _half(blocks, 0).astype(np.float32)
    return _five_bits(blocks[:, :, 2:6], blocks[:, :, 6:]), d, -16 * d


def _q5_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_1 blocks (fp16 d, fp16 m, 4 bytes of high bits, 16 bytes of nibbles): q d + m."""
    blocks = raw.reshape(raw.shape[0], -1, 24)
    return (_five_bits(blocks[:, :, 4:8], blocks[:, :, 8:]), _half(blocks, 0).astype(np.float32),
            _half(blocks, 2).astype(np.float32))


def _five_bits(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's q [rows, cols]: bit i of the little-endian uint32 qh is value i's fifth bit."""
    rows = qs.shape[0]
    high = (np.ascontiguousarray(qh).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1  # [rows, blocks, 32]
    return (_split_nibbles(qs) | (high.astype(np.uint8) << 4)).reshape(rows, -1)


def _q5_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_K super-blocks of 256 (fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 32 bytes of fifth bits,
    128 bytes of nibbles): sub-block j of 32 is q (d sc_j) - (dmin m_j), bit j of byte 32 + k its value k's fifth
    bit; the nibbles as Q4_K's."""
    from gguf.quants import Q4_K

    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 176)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, :, 4:16]).reshape(-1, 12))
    d, dmin = (_half(blocks, k).astype(np.float32).reshape(-1, 1) for k in (0, 2))
    low = (blocks[:, :, 48:].reshape(rows, -1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 15
    high = (blocks[:, :, 16:48].reshape(rows, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
    q = low.reshape(rows, -1, 8, 32) | (high << 4)
    scale, low_ = d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
    return q.reshape(rows, -1), scale.reshape(rows, -1), low_.reshape(rows, -1)


def _q6_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """Q6_K super-blocks of 256 (128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, fp16 d): value
    (d sc_j) (q - 32) per 16; half h of 128 values: ql[64h + k] low/high nibble = values 128h + k / + 64,
    bits 2s of qh[32h + k] the high bits of value 128h + 32s + k."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 210)
    low = (blocks[:, :, :128].reshape(rows, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 15
    high = (blocks[:, :, 128:192].reshape(rows, -1, 2, 1, 32)
            >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    q = low.reshape(rows, -1, 8, 32) | (high.reshape(rows, -1, 8, 32) << 4)
    sc = np.ascontiguousarray(blocks[:, :, 192:208]).view(np.int8).astype(np.float32)
    d = _half(blocks, 208).astype(np.float32)[:, :, None]
    return q.reshape(rows, -1), (d * sc).reshape(rows, -1), None


def _q4_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks of 256 (fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles):
    sub-block j of 32 is q (d sc_j) - (dmin m_j); bytes 32c..32c+31 hold sub-block 2c (low nibbles), 2c+1 (high)."""
    from gguf.quants import Q4_K

    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 144)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, :, 4:16]).reshape(-1, 12))
    d, dmin = (_half(blocks, k).astype(np.float32).reshape(-1, 1) for k in (0, 2))
    qs = blocks[:, :, 16:].reshape(rows, -1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    scale, low = d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
    return (qs & 15).reshape(rows, -1), scale.reshape(rows, -1), low.reshape(rows, -1)


# ggml types an affine layout holds exactly: type → (its bits, the function giving (unsigned q, float32 scale,
# float32 min or None) of its blocks, per group of the layout's size: 32, Q6_K's 16)
AFFINE_TYPES = {"Q4_0": (4, _q4_0), "Q4_1": (4, _q4_1), "Q4_K": (4, _q4_k), "Q5_0": (5, _q5_0), "Q5_1": (5, _q5_1),
                "Q5_K": (5, _q5_k), "Q6_K": (6, _q6_k)}
PACKED = Quantization("packed", "affine", "float32", bits=4, group_size=32)  # which tensors any packed scheme packs


def _float_dtype(type_name: str) -> np.dtype:
    from gptbc.artifact.quantization import numpy_dtype

    return numpy_dtype(FLOAT_TYPES[type_name])


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def config_from_metadata(meta: dict[str, Any], path: Path, tensors: dict[str, TensorEntry]) -> GPTBigCodeConfig:
    """The model config a `starcoder` GGUF describes; another architecture is refused by name."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise GptbcError(f"{path}: GGUF architecture {clip(arch)}, not 'starcoder' (GPTBigCode: SantaCoder, StarCoder, "
                         f"WizardCoder...); gptbc runs only that one")

    def need(key: str) -> Any:
        if f"{ARCH}.{key}" not in meta:
            raise GptbcError(f"{path}: metadata {ARCH}.{key} is missing")
        return _scalar(meta[f"{ARCH}.{key}"])

    n_head, n_kv = need("attention.head_count"), need("attention.head_count_kv")
    if n_kv != 1:
        # llama.cpp's starcoder graph reads attn_qkv as [all q; all k; all v] while HF's multi-head c_attn is per
        # head, and its converter does not reorder: which order a multi-head file holds is not recorded.
        raise GptbcError(f"{path}: attention.head_count_kv is {clip(n_kv)}; gptbc reads multi-query starcoder GGUF "
                         f"files only (head_count_kv 1, as every published StarCoder model)")
    if "token_embd.weight" not in tensors:
        raise GptbcError(f"{path}: tensor token_embd.weight is missing")
    tokens = meta.get("tokenizer.ggml.tokens")
    embedding = tensors["token_embd.weight"].shape
    vocab = embedding[0]
    if len(embedding) != 2:
        raise GptbcError(f"{path}: tensor token_embd.weight has shape {list(embedding)}, expected [vocab, n_embd]")
    if f"{ARCH}.vocab_size" in meta and meta[f"{ARCH}.vocab_size"] != vocab:
        raise GptbcError(f"{path}: metadata {ARCH}.vocab_size is {clip(meta[f'{ARCH}.vocab_size'])} but "
                         f"token_embd has {vocab} rows")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    raw = {"model_type": "gpt_bigcode", "n_embd": need("embedding_length"), "n_head": n_head,
           "n_layer": need("block_count"), "n_positions": need("context_length"),
           "n_inner": need("feed_forward_length"), "vocab_size": vocab, "multi_query": True,
           "layer_norm_epsilon": need("attention.layer_norm_epsilon"),
           # llama.cpp runs every starcoder GGUF with ggml_gelu, the tanh approximation (also for StarCoder-15B,
           # whose own config names the exact "gelu"): what the file's numbers were made to be run with
           "activation_function": "gelu_pytorch_tanh",
           "tie_word_embeddings": "output.weight" not in tensors,
           "bos_token_id": bos, "eos_token_id": [] if eos is None else eos}
    # llama.cpp's converter pads the token list to the embedding's rows ([PAD<id>]): one of another length
    # leaves ids the model can produce without text (or text with no row)
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) != vocab):
        raise GptbcError(f"{path}: {len(tokens) if isinstance(tokens, list) else 'no list of'} tokens in the "
                         f"vocabulary (tokenizer.ggml.tokens) but token_embd has {vocab} rows")
    return GPTBigCodeConfig.from_dict(raw, source=str(path))
