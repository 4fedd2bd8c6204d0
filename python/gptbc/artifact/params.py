"""The tensors of a model, by name: the checkpoint's (gpt_bigcode naming) and the converted weights' (what the
converter writes and a compiled library takes, in its load order).

This list is the artifact's definition of the weights. The compiler builds the Relax model and refuses to
export one whose parameters differ from it (compile.compiler.export_relax), so the converter never needs the
compiler to know what to write.
"""

from __future__ import annotations

from gptbc.artifact.config import GPTBigCodeConfig
from gptbc.artifact.quantization import Quantization, is_quantized
from gptbc.artifact.sharding import rank_shape

Param = tuple[str, tuple[int, ...], str]  # (name, shape, dtype)


def hf_shapes(cfg: GPTBigCodeConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter in gpt_bigcode naming, Linear weights [out, in]; lm_head only if untied."""
    e, inner, qkv = cfg.n_embd, cfg.n_inner, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    out = [("transformer.wte.weight", (cfg.vocab_size, e)), ("transformer.wpe.weight", (cfg.n_positions, e))]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        out += [(p + "ln_1.weight", (e,)), (p + "ln_1.bias", (e,)),
                (p + "attn.c_attn.weight", (qkv, e)), (p + "attn.c_attn.bias", (qkv,)),
                (p + "attn.c_proj.weight", (e, e)), (p + "attn.c_proj.bias", (e,)),
                (p + "ln_2.weight", (e,)), (p + "ln_2.bias", (e,)),
                (p + "mlp.c_fc.weight", (inner, e)), (p + "mlp.c_fc.bias", (inner,)),
                (p + "mlp.c_proj.weight", (e, inner)), (p + "mlp.c_proj.bias", (e,))]
    out += [("transformer.ln_f.weight", (e,)), ("transformer.ln_f.bias", (e,))]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (cfg.vocab_size, e)))
    return out


def converted_params(cfg: GPTBigCodeConfig, quant: Quantization, tp: int = 1) -> list[Param]:
    """(name, shape, dtype) of every converted tensor, in the order the compiled library takes them: a weight
    the scheme packs becomes `MODULE.q_weight` + `MODULE.q_scale` (+ q_min, q_high: quantization.py's layouts,
    per module for a per-tensor scheme), the rest stays
    in the activation dtype under its HF name. With `tp` ranks, the shapes are one rank's (sharding.py)."""
    out: list[Param] = []
    for name, full in hf_shapes(cfg):
        shape = rank_shape(cfg, name, full, tp)
        if is_quantized(quant, name, cfg.tie_word_embeddings):
            module = name.rpartition(".")[0]
            out += [(f"{module}.{part}", pshape, dtype) for part, pshape, dtype in quant.layout(module).parts(shape)]
        else:
            out.append((name, shape, quant.model_dtype))
    return out
