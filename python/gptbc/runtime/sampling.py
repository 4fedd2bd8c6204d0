"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, penalties, seeds."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptbc.errors import GptbcError

MAX_TOP_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # a temperature under this is greedy: logits / 1e-308 would overflow to inf, then NaN


@dataclass(frozen=True)
class Range:
    """What one sampling field accepts. The one table both SamplingParams and the server's schema read."""

    integer: bool
    ge: float | None = None  # lowest allowed value (inclusive)
    gt: float | None = None  # exclusive lower bound
    le: float | None = None  # highest allowed value (inclusive)
    rule: str = ""  # how the error words it

    def bounds(self) -> dict[str, float]:
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}

    def accepts(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.integer and not isinstance(v, int):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le))


RANGES: dict[str, Range] = {
    "max_new_tokens": Range(True, ge=0, rule="an integer >= 0"),
    "temperature": Range(False, ge=0, le=2, rule=f"in [0, 2] (0, or anything below {GREEDY_BELOW}, is greedy)"),
    "top_k": Range(True, ge=0, rule="an integer >= 0 (0 is off)"),
    "top_p": Range(False, gt=0, le=1, rule="in (0, 1]"),
    "min_p": Range(False, ge=0, le=1, rule="in [0, 1]"),
    # >= 0.01: a positive logit divided by less could overflow (1e-300 made it inf, then NaN)
    "repetition_penalty": Range(False, ge=0.01, le=10, rule="in [0.01, 10] (1 is off)"),
    "presence_penalty": Range(False, ge=-2, le=2, rule="in [-2, 2]"),
    "frequency_penalty": Range(False, ge=-2, le=2, rule="in [-2, 2]"),
    "top_logprobs": Range(True, ge=0, le=MAX_TOP_LOGPROBS, rule=f"an integer in [0, {MAX_TOP_LOGPROBS}]"),
    "seed": Range(True, ge=0, le=2**64 - 1, rule="an integer in [0, 2**64 - 1]"),
}


class SamplingError(GptbcError):
    """A sampling field out of its range; `field` names it (SamplingParams' name), `rule` says what it takes."""

    def __init__(self, field: str, value: Any, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"{field} {value!r}: must be {rule}")


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 means greedy (so does any temperature below GREEDY_BELOW). Penalties follow their usual
    definitions: `repetition_penalty` (HF/CTRL) divides positive logits and multiplies negative ones of every
    token seen in the prompt or output; `presence_penalty` / `frequency_penalty` (OpenAI) subtract a constant /
    a per-occurrence amount for tokens already generated. `logprobs` returns the log-probability of each chosen
    token under the model's own distribution (before penalties and temperature). Every numeric field's range
    is in RANGES.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: also the N most likely tokens at each step
    prompt_logprobs: bool = False  # with logprobs: also score every prompt token (no prefix reuse then)
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's eos ids
    ignore_eos: bool = False
    truncate_prompt: bool = False  # drop the oldest prompt tokens to fit the window (whole blocks: engine.cut_start)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, rng in RANGES.items():
            value = getattr(self, name)
            if not (name == "seed" and value is None) and not rng.accepts(value):
                raise SamplingError(name, value, rng.rule)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not (isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop)):
            raise SamplingError("stop", self.stop, "a list of non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise SamplingError("stop_token_ids", self.stop_token_ids, "a list of token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def generation_defaults(directory: Path) -> tuple[SamplingParams, set[int]]:
    """The model's own `generation_config.json`: sampling defaults (greedy when it has none or do_sample is
    false) and any eos ids it adds."""
    from gptbc.artifact.files import read_json

    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return SamplingParams(), set()
    cfg = read_json(path)
    params: dict[str, Any] = {}
    if cfg.get("do_sample"):
        params["temperature"] = float(cfg.get("temperature", 1.0))
        params["top_k"] = int(cfg.get("top_k", 0) or 0)
        params["top_p"] = float(cfg.get("top_p", 1.0) or 1.0)
        if cfg.get("min_p") is not None:
            params["min_p"] = float(cfg["min_p"])
    if cfg.get("repetition_penalty") is not None:
        params["repetition_penalty"] = float(cfg["repetition_penalty"])
    if cfg.get("max_new_tokens") is not None:
        params["max_new_tokens"] = int(cfg["max_new_tokens"])
    eos = cfg.get("eos_token_id")
    eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos])} if eos is not None else set()
    try:
        return SamplingParams(**params), eos_ids
    except GptbcError as err:
        raise GptbcError(f"{path}: {err}") from None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def apply_penalties(logits: np.ndarray, p: SamplingParams, seen: np.ndarray, output_counts: np.ndarray) -> np.ndarray:
    """`seen`: bool[vocab] of prompt+output tokens; `output_counts`: int[vocab] of generated tokens."""
    if p.repetition_penalty != 1.0 and seen.any():
        x = logits[seen]
        logits[seen] = np.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        logits -= p.presence_penalty * (output_counts > 0) + p.frequency_penalty * output_counts
    return logits


def top_tokens(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely (token, logprob) pairs, most likely first."""
    if n <= 0:
        return []
    best = np.argpartition(-logprobs, n - 1)[:n]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return [(int(t), float(logprobs[t])) for t in best]


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator, seen: np.ndarray | None = None,
           output_counts: np.ndarray | None = None) -> int:
    """The next token id."""
    if p.greedy:
        x = logits if seen is None or output_counts is None else apply_penalties(
            logits.astype(np.float64), p, seen, output_counts)
        return int(np.argmax(x))
    probs = probabilities(logits, p, seen, output_counts)
    return int(rng.choice(probs.size, p=probs))


def probabilities(logits: np.ndarray, p: SamplingParams, seen: np.ndarray | None = None,
                  output_counts: np.ndarray | None = None) -> np.ndarray:
    """The distribution a sampling (non-greedy) request draws from: penalties, temperature, top-k, min-p, top-p."""
    x = logits.astype(np.float64)  # a copy: penalties edit it
    if seen is not None and output_counts is not None:
        x = apply_penalties(x, p, seen, output_counts)
    x = x / p.temperature  # finite: temperature >= GREEDY_BELOW and logits are float32-sized
    if not np.isfinite(x.max()):
        raise GptbcError(f"sampling: logits are not finite (max {x.max()}) at temperature {p.temperature}")
    if 0 < p.top_k < x.size:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x[x < kth] = -np.inf
    x -= x.max()
    probs = np.exp(x)
    probs /= probs.sum()
    if p.min_p > 0:
        probs[probs < p.min_p * probs.max()] = 0.0
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        cut = int(np.searchsorted(cum, p.top_p * cum[-1])) + 1  # smallest prefix reaching top_p
        probs[order[cut:]] = 0.0
    return probs / probs.sum()
