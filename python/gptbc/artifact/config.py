"""Model configuration: what a GPTBigCode checkpoint looks like, plus what the compiled library is sized for.

`--model` accepts four spellings, all resolved here by `resolve_model`:
a bundled preset name (`santacoder`), a Hugging Face model directory (has `config.json`),
a gptbc output directory (has `gptbc-config.json`), or a Hub id (`bigcode/gpt_bigcode-santacoder`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gptbc.errors import GptbcError
from gptbc.artifact.checkpoint_layouts import normalize_config  # the original SantaCoder layout reads as gpt_bigcode
from gptbc.artifact.files import HF_CONFIG, clip, read_json, reading
from gptbc.artifact.manifest import WEIGHTS_FILE, read_weights

GPTBC_CONFIG = WEIGHTS_FILE

# Activation names HF uses for GPTBigCode checkpoints → how we compute them.
# "gelu" in HF is the exact (erf) GELU, which StarCoder-15B-shaped checkpoints (StarCoder, StarChat-alpha) name;
# santacoder ships "gelu_pytorch_tanh" (the presets carry each model's own).
ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu_erf",
    "relu": "relu",
}


INVALID = "invalid model config: "  # how a config built in code words its errors; from_dict names the file instead
# The largest size of each field gptbc accepts (a file claiming 10^9 layers is refused before anything is sized
# from it); far above any GPTBigCode model (StarCoder 15B: n_embd 6144, 40 layers, 49152 tokens, 8192 positions).
SIZE_LIMITS = {"n_embd": 1 << 16, "n_head": 1 << 10, "n_layer": 1 << 10, "n_positions": 1 << 20,
               "vocab_size": 1 << 22, "n_inner": 1 << 18, "context_window_size": 1 << 20,
               "prefill_chunk_size": 1 << 20, "max_batch_size": 1 << 12}
MAX_EMBEDDING = 1 << 32  # vocab_size x n_embd values


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class GPTBigCodeConfig:
    """HF `GPTBigCodeConfig` fields we use, and the compile-time sizes of the library."""

    n_embd: int
    n_head: int
    n_layer: int
    n_positions: int
    vocab_size: int
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    multi_query: bool = True
    activation_function: str = "gelu_pytorch_tanh"
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # Compile-time sizes; 0 means "derive a default" (see __post_init__).
    context_window_size: int = 0
    prefill_chunk_size: int = 0
    max_batch_size: int = 16

    def __post_init__(self) -> None:
        self.check_types()
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = [int(e) for e in (self.eos_token_id or [])]
        if self.context_window_size <= 0:
            self.context_window_size = self.n_positions
        if self.prefill_chunk_size <= 0:
            self.prefill_chunk_size = min(self.context_window_size, 2048)
        self.validate()

    def check_types(self) -> None:
        """Each field of the type it must have (a config is a user's file: `n_head: "4"` is an error naming
        n_head, not a failure deep inside the compiler)."""
        def need(ok: bool, name: str, kind: str) -> None:
            if not ok:
                raise GptbcError(f"{INVALID}{name} must be {kind}, got {clip(getattr(self, name))}")

        for name in SIZE_LIMITS:
            value = getattr(self, name)
            if name == "n_inner" and value is None:
                continue
            need(_is_int(value), name, "an integer")
        for name in ("multi_query", "scale_attn_weights", "tie_word_embeddings"):
            need(isinstance(getattr(self, name), bool), name, "true or false")
        need(isinstance(self.activation_function, str), "activation_function", "a string")
        eps = self.layer_norm_epsilon
        need(_is_number(eps) and math.isfinite(eps), "layer_norm_epsilon", "a finite number")
        need(self.bos_token_id is None or _is_int(self.bos_token_id), "bos_token_id", "an integer or null")
        eos = self.eos_token_id
        need(eos is None or _is_int(eos) or (isinstance(eos, list) and all(_is_int(e) for e in eos)),
             "eos_token_id", "an integer or a list of integers")

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise GptbcError(f"{INVALID}{what}")

        self.check_types()
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            need(value > 0, f"{name} must be positive, got {value}")
            need(value <= limit, f"{name} {value} is larger than gptbc allows ({limit})")
        need(0 < self.layer_norm_epsilon < 1, f"layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon}")
        need(self.n_head <= self.n_embd, f"n_head {self.n_head} is larger than n_embd {self.n_embd}")
        need(self.vocab_size * self.n_embd <= MAX_EMBEDDING,
             f"vocab_size {self.vocab_size} x n_embd {self.n_embd} is a larger embedding than gptbc allows "
             f"({MAX_EMBEDDING} values)")
        if self.bos_token_id is not None:
            need(0 <= self.bos_token_id < self.vocab_size,
                 f"bos_token_id {self.bos_token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        need(self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        need(self.activation_function in ACTIVATIONS,
             f"activation_function {clip(self.activation_function)} is not one of {sorted(ACTIVATIONS)}")
        need(self.context_window_size <= self.n_positions,
             f"context_window_size {self.context_window_size} exceeds n_positions {self.n_positions}")
        need(0 < self.prefill_chunk_size <= self.context_window_size,
             f"prefill_chunk_size {self.prefill_chunk_size} must be in 1..context_window_size "
             f"({self.context_window_size})")
        need(self.max_batch_size > 0, f"max_batch_size must be positive, got {self.max_batch_size}")
        for e in self.eos_token_id:
            need(0 <= e < self.vocab_size, f"eos_token_id {e} is outside the vocabulary (0..{self.vocab_size - 1})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:
        """MQA shares one K/V head across all query heads; MHA has one per query head."""
        return 1 if self.multi_query else self.n_head

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", **overrides: Any) -> "GPTBigCodeConfig":
        model_type = raw.get("model_type")
        if model_type != "gpt_bigcode":
            hint = (" (the original bigcode/santacoder layout; use its gpt_bigcode conversion, "
                    "bigcode/gpt_bigcode-santacoder)" if model_type == "gpt2" else "")
            raise GptbcError(f"{source}: model_type is {clip(model_type)}, expected 'gpt_bigcode'{hint}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("context_window_size") is not None and overrides.get("prefill_chunk_size") is None:
            # A new window: the recorded chunk (sized for the old one) gives way to the default for the new one.
            kwargs.pop("prefill_chunk_size", None)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in kwargs]
        if missing:
            raise GptbcError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except GptbcError as err:
            raise GptbcError(f"{source}: {str(err).removeprefix(INVALID)}") from None
        except (TypeError, ValueError) as err:
            raise GptbcError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "gpt_bigcode", **dataclasses.asdict(self)}


@dataclass
class ModelSource:
    """What `--model` resolved to: a display name, the config, and where weights/tokenizer live (if anywhere)."""

    name: str
    config: GPTBigCodeConfig
    directory: Path | None  # an HF or gptbc directory; None for a bare preset


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("gptbc.presets").iterdir() if p.name.endswith(".json"))


def load_hf_config(directory: Path, **overrides: Any) -> GPTBigCodeConfig:
    path = Path(directory) / HF_CONFIG
    if not path.is_file():
        raise GptbcError(f"{directory}: no config.json here (expected a Hugging Face model directory)")
    with reading(path):  # a config of unexpected types is still one line naming it
        return GPTBigCodeConfig.from_dict(normalize_config(read_json(path), str(path)), source=str(path), **overrides)


def load_gptbc_config(directory: Path) -> dict[str, Any]:
    """The whole `gptbc-config.json` of a converted-weights directory, validated (see manifest.py)."""
    return read_weights(Path(directory))


def preset_fim_orders(spec: str) -> list[str] | None:
    """The FIM orders ("psm", "spm") the model `spec` names was trained with, from its preset's _fim_orders:
    `spec` is a preset name, a preset's Hub id, or a directory named like either (the Hub id's last part).
    None: no preset matches, so not known."""
    name = split_revision(spec)[0].rstrip("/")
    base = Path(name).name
    for preset in preset_names():
        raw = json.loads(resources.files("gptbc.presets").joinpath(f"{preset}.json").read_text("utf-8"))
        hub = raw.get("_hub_id", "")
        if name in (preset, hub) or base in (preset, hub.rsplit("/", 1)[-1]):
            return list(raw.get("_fim_orders") or []) or None
    return None


def looks_like_hub_id(spec: str) -> bool:
    parts = split_revision(spec)[0].split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def split_revision(spec: str) -> tuple[str, str | None]:
    """`owner/name@revision` → (owner/name, revision); no @: (spec, None)."""
    repo, at, revision = spec.partition("@")
    return (repo, revision or None) if at else (spec, None)


def fetch_from_hub(repo_id: str, config_only: bool = False, revision: str | None = None) -> Path:
    """Download a Hub repository (safetensors, JSON, tokenizer files) into the HF cache; its snapshot folder
    (named by the commit) is returned."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["config.json"] if config_only else [
        "*.json", "*.safetensors", "*.txt", "tokenizer*", "vocab*", "merges*"]
    hint = (f"cannot download {repo_id!r} from the Hugging Face Hub ({{why}}); download it on a machine "
            f"with network access and pass the local directory instead, e.g. --model /path/to/{repo_id.split('/')[-1]}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True,
                                          revision=revision))
        except Exception:  # not in the local cache either
            raise GptbcError(hint.format(why="HF_HUB_OFFLINE is set and it is not in the local cache")) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision))
    except RepositoryNotFoundError:
        raise GptbcError(f"{repo_id!r}: no such repository on the Hugging Face Hub") from None
    except (LocalEntryNotFoundError, OSError) as err:
        raise GptbcError(hint.format(why=f"no network route: {type(err).__name__}")) from None
    except Exception as err:  # huggingface_hub raises many HTTP error types
        raise GptbcError(hint.format(why=f"{type(err).__name__}")) from None


def resolve_model(spec: str, with_weights: bool = False, **overrides: Any) -> ModelSource:
    """Turn a `--model` argument into a config. `overrides` set compile-time fields (None = keep).

    A Hub id downloads only config.json unless `with_weights` is set.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        name = path.resolve().name
        if (path / GPTBC_CONFIG).is_file():
            raw = load_gptbc_config(path)
            cfg = GPTBigCodeConfig.from_dict(raw.get("model_config", {}), source=str(path / GPTBC_CONFIG),
                                             **overrides)
            return ModelSource(raw.get("model_name", name), cfg, path)
        return ModelSource(name, load_hf_config(path, **overrides), path)
    if spec in preset_names():
        raw = normalize_config(json.loads(resources.files("gptbc.presets").joinpath(f"{spec}.json").read_text("utf-8")),
                               f"preset {spec}")
        return ModelSource(spec, GPTBigCodeConfig.from_dict(raw, source=f"preset {spec}", **overrides), None)
    if path.exists():
        raise GptbcError(f"--model {spec}: is a file, expected a preset name or a model directory")
    if looks_like_hub_id(spec):
        repo, revision = split_revision(spec)
        directory = fetch_from_hub(repo, config_only=not with_weights, revision=revision)
        return ModelSource(repo.split("/")[-1], load_hf_config(directory, **overrides), directory)
    raise GptbcError(f"--model {spec}: not a directory, a Hub id (owner/name) or a known preset "
                     f"({', '.join(preset_names())})")
