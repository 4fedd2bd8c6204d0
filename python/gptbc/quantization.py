"""Weight quantization schemes: one table, one entry per `--quantization` name.

Only unquantized float32 exists so far; grouped int8/int4 schemes plug in here as new entries
(how to pack a tensor, how the model dequantizes it) without touching the converter or the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GptbcError


@dataclass(frozen=True)
class Quantization:
    name: str
    kind: str  # "none": weights stored as-is in model_dtype
    model_dtype: str  # dtype of activations, and of unquantized weights

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "model_dtype": self.model_dtype}


QUANTIZATIONS: dict[str, Quantization] = {
    "q0f32": Quantization("q0f32", "none", "float32"),
}


def get_quantization(name: str) -> Quantization:
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise GptbcError(f"--quantization {name}: unknown scheme (choose from {', '.join(QUANTIZATIONS)})") from None
