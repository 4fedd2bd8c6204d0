"""The compile driver: config → Relax module → our pipeline for the target → model library.

Phases (each reported): export the nn.Module to Relax, attach `_metadata`, lower with the
pipeline below, build, write the library under a temporary name and rename it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .config import GPTBigCodeConfig, ModelSource
from .errors import GptbcError
from .quantization import Quantization, get_quantization
from .targets import TargetSpec, get_target


def default_output(model_name: str, quant: str, target: TargetSpec) -> Path:
    return Path("dist") / "libs" / f"{model_name}-{quant}-{target.name}{target.output_suffix}"


def metadata(source: ModelSource, quant: Quantization, target: TargetSpec, target_json: dict,
             params: list[tuple[str, tuple[int, ...], str]]) -> dict:
    """What the runtime checks before loading weights; served by the library's `_metadata` function."""
    cfg = source.config
    return {
        "gptbc_version": __version__,
        "model_name": source.name,
        "model_config": cfg.to_dict(),
        "quantization": quant.describe(),
        "target": target.name,
        "target_json": target_json,
        "device": target.device,
        "context_window_size": cfg.context_window_size,
        "prefill_chunk_size": cfg.prefill_chunk_size,
        "max_batch_size": cfg.max_batch_size,
        "params": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in params],
    }


def attach_metadata(mod, meta: dict):
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    with bb.function("_metadata", []):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(meta)))
    return bb.get()


def fusion_passes() -> list:
    """Legalize Relax ops to TIR and fuse them into kernels (dequantization already sits inside the
    matmul/lookup compute of a quantized weight, see model.py, so fusion never separates them)."""
    from tvm import relax

    return [
        # x @ permute_dims(W) as one NT-matmul kernel; otherwise every call materializes W transposed.
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def lowering_passes() -> list:
    """Relax → VM: memory planning and shape lowering, as TVM's default pipeline does."""
    from tvm import relax

    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def cpu_pipeline(target):
    """TVM's CPU pipeline (legalize, fuse, lower) — the place where CPU schedules go."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="gptbc_cpu_pipeline")
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(fusion_passes() + lowering_passes())(mod)

    return pipeline


PIPELINES: dict[str, Callable] = {"llvm": cpu_pipeline}


def export_relax(cfg: GPTBigCodeConfig, quant: Quantization, target):
    """The model's Relax IRModule (all exported functions, parameters packed), before any pass."""
    from .model import GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM(cfg, target, quant)
    mod, _ = model.export_tvm(spec=model.get_default_spec())
    return mod


def compile_model(source: ModelSource, target_name: str, quantization: str, output: str | Path | None = None,
                  log: Callable[[str], None] = print, quantize_lm_head: bool = True) -> Path:
    """Build the model library for `source` and return its path."""
    spec = get_target(target_name)
    quant = get_quantization(quantization, quantize_lm_head)
    output = Path(output) if output else default_output(source.name, quant.name, spec)
    if output.suffix != spec.output_suffix:
        raise GptbcError(f"-o {output}: target {spec.name} produces a {spec.output_suffix} file")

    import tvm

    from .loader import model_params

    def phase(name: str, start: float) -> float:
        now = time.perf_counter()
        log(f"[gptbc] {name}: {now - start:.1f}s")
        return now

    t = time.perf_counter()
    target_json = spec.make()
    target = tvm.target.Target(target_json)
    mod = export_relax(source.config, quant, target)
    mod = attach_metadata(mod, metadata(source, quant, spec, target_json, model_params(source.config, quant)))
    t = phase(f"export {source.name} ({quant.name}) to Relax", t)

    pipeline = PIPELINES.get(target.kind.name)
    if pipeline is None:
        raise GptbcError(f"--target {spec.name}: no compile pipeline for TVM target kind {target.kind.name}")
    with tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(mod, target, relax_pipeline=pipeline(target))
    t = phase(f"lower and build for {spec.name}", t)

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=spec.output_suffix, dir=output.parent)
    os.close(fd)
    try:
        executable.export_library(tmp)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    phase(f"write {output}", t)
    return output
