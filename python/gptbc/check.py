"""`gptbc check`: does a target work on this machine's device, end to end?

For a small random checkpoint of each attention layout (multi-query and multi-head) and each scheme, it
converts, compiles for the target, runs 39 prompt tokens and N greedy tokens, and compares them with a
float64 numpy forward pass of the network the converted weights define (dequantized; written here from
GPTBigCode's definition, so neither torch nor TVM is in the reference):
  logits   the largest error relative to the largest logit, at every position, within the precision the
           scheme computes in (TOLERANCE);
  greedy   each greedy token against the reference's choice at that step, wherever the reference's choice
           is decisive (its top two logits further apart than that precision), must be equal;
  runner   with --runner, gptbc-run's greedy tokens on the same library must equal the engine's.
With --bench, a santacoder-shaped random checkpoint's decode (batch 1 and 16) and prefill-512 rates on the
target, next to the device's copy bandwidth measured in the same run.

Needs only gptbc: the checkpoints are written with numpy in Hugging Face's safetensors layout.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from gptbc.artifact.config import GPTBigCodeConfig, resolve_model
from gptbc.artifact.convert import convert_weight
from gptbc.artifact.params import hf_shapes
from gptbc.artifact.quantization import dequantize, get_quantization, quantization_of
from gptbc.compile.compiler import compile_model
from gptbc.compile.targets import plan_build
from gptbc.errors import GptbcError
from gptbc.runtime.devices import parse_device, parse_device_kind
from gptbc.runtime.engine import Engine

LAYOUTS = {"mqa": True, "mha": False}  # name → multi_query
DEFAULT_SCHEMES = ("q0f32", "q0f16", "q4f16_1")
PROMPT = list(range(1, 40))
# Largest logit error relative to the largest logit, against the float64 reference of the same dequantized
# weights: the precision the library computes in (float32, float16, or int8-rounded activations).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "int8": 5e-2}


def random_checkpoint(directory: Path, cfg: GPTBigCodeConfig, seed: int = 0) -> Path:
    """A seeded random checkpoint of `cfg`'s shape in HF's layout (float32 safetensors and config.json)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {k: (1.0 + 0.1 * rng.standard_normal(s, dtype=np.float32) if "ln_" in k and k.endswith("weight")
                   else 0.1 * rng.standard_normal(s, dtype=np.float32)) for k, s in hf_shapes(cfg)}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    compile_sizes = ("context_window_size", "prefill_chunk_size", "max_batch_size")
    hf_cfg = {k: v for k, v in cfg.to_dict().items() if k not in compile_sizes}
    (directory / "config.json").write_text(json.dumps(hf_cfg))
    return directory


def small_config(multi_query: bool) -> GPTBigCodeConfig:
    return GPTBigCodeConfig(n_embd=256, n_head=4, n_layer=2, n_positions=256, vocab_size=1000,
                            multi_query=multi_query, bos_token_id=0, eos_token_id=[0])


def converted_network(out_dir: Path) -> tuple[GPTBigCodeConfig, dict[str, np.ndarray]]:
    """(config, float64 weights in HF's layout) of a converted directory: dequantized, and multi-head c_attn
    rows put back per head (the converter fuses them as all q, all k, all v)."""
    from safetensors.numpy import load_file

    from gptbc.artifact.manifest import read_weights

    cfg = resolve_model(str(out_dir)).config
    q = quantization_of(read_weights(out_dir)["quantization"], str(out_dir))
    shapes = dict(hf_shapes(cfg))
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    w = {}
    for key, value in tensors.items():
        if key.endswith(".q_weight"):
            base = key[:-len(".q_weight")]
            cols = shapes[base + ".weight"][1]
            w[base + ".weight"] = dequantize(value, tensors[base + ".q_scale"], cols, q.layout(base),
                                             tensors.get(base + ".q_min"),
                                             tensors.get(base + ".q_high")).astype(np.float64)
        elif not key.endswith((".q_scale", ".q_min", ".q_high")):
            w[key] = value.astype(np.float64)
    if not cfg.multi_query:
        for i in range(cfg.n_layer):
            for part in ("weight", "bias"):
                name = f"transformer.h.{i}.attn.c_attn.{part}"
                x = w[name]
                w[name] = x.reshape(3, cfg.n_head, cfg.head_dim, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)
    return cfg, w


def reference_logits(cfg, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits after every token of `ids`, in float64 numpy, from GPTBigCode's definition (HF's layout:
    multi-head c_attn rows per head as [q | k | v]; multi-query as [all q | k | v]; lm_head tied unless
    given)."""
    n, e, heads = len(ids), cfg.n_embd, cfg.n_head
    hd = e // heads

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_epsilon) * w[name + ".weight"] + w[name + ".bias"]

    def linear(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    x = w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][:n]
    future = np.triu(np.ones((n, n), bool), 1)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        qkv = linear(norm(x, p + "ln_1"), p + "attn.c_attn")
        if cfg.multi_query:
            q = qkv[:, :e].reshape(n, heads, hd)
            k = np.repeat(qkv[:, None, e:e + hd], heads, axis=1)
            v = np.repeat(qkv[:, None, e + hd:], heads, axis=1)
        else:
            per_head = qkv.reshape(n, heads, 3 * hd)
            q, k, v = per_head[..., :hd], per_head[..., hd:2 * hd], per_head[..., 2 * hd:]
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        scores[:, future] = -np.inf
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + linear(np.einsum("hqk,khd->qhd", probs, v).reshape(n, e), p + "attn.c_proj")
        h = linear(norm(x, p + "ln_2"), p + "mlp.c_fc")
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        x = x + linear(h, p + "mlp.c_proj")
    head = w.get("lm_head.weight", w["transformer.wte.weight"])
    return norm(x, "transformer.ln_f") @ head.T


def check_options(target: str, device: str, schemes: list[str], tokens: int, runner: Path | None) -> str:
    """One-line errors for what cannot work, before anything is converted or compiled; returns the
    library suffix."""
    spec, build = plan_build(target)
    if build.system_lib:
        raise GptbcError(f"--target {target}: builds objects ({build.suffix}) for an app to link here, "
                         f"nothing this machine can load and run")
    kind = parse_device_kind(device)[0]
    if kind != spec.device:
        raise GptbcError(f"--device {device}: --target {target} builds for {spec.device} devices "
                         f"(try --device {spec.device})")
    for scheme in schemes:
        get_quantization(scheme)
    if tokens < 1:
        raise GptbcError(f"--tokens {tokens}: must be at least 1")
    if runner is not None and not runner.is_file():
        raise GptbcError(f"--runner {runner}: no such file (build gptbc-run: cmake -S . -B build && "
                         f"cmake --build build)")
    parse_device(device)  # it exists here (a driver, an adapter, a TVM runtime for it)
    return build.suffix


def run_native(runner: Path, model_dir: Path, lib: Path, device: str, tokens: int) -> list[int]:
    """gptbc-run's greedy tokens after PROMPT."""
    run = subprocess.run([str(runner), "--model", str(model_dir), "--lib", str(lib), "--device", device,
                          "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(tokens),
                          "--ignore-eos", "--json"], capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise GptbcError(f"gptbc-run failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(run.stdout)["token_ids"]


def check_case(root: Path, hf_dir: Path, layout: str, scheme: str, target: str, device: str, suffix: str,
               tokens: int, runner: Path | None, log, tp: int = 1) -> dict:
    """One layout × scheme: logits and greedy tokens on the target against the numpy reference (with `tp` > 1,
    the model on that many tensor-parallel ranks; the reference reads a single-device conversion)."""
    out = convert_weight(hf_dir, scheme, root / f"{layout}-{scheme}", progress=False, tensor_parallel=tp)
    whole = out if tp == 1 else convert_weight(hf_dir, scheme, root / f"{layout}-{scheme}-whole", progress=False)
    start = time.perf_counter()
    lib = compile_model(resolve_model(str(out)), target, scheme, root / f"{layout}-{scheme}{suffix}",
                        log=lambda _m: None, tensor_parallel=tp)
    compiled = time.perf_counter() - start
    engine = Engine(out, lib, device=device, tensor_parallel=tp)
    start = time.perf_counter()
    got = engine.generate(PROMPT, tokens, ignore_eos=True)
    rate = tokens / (time.perf_counter() - start)
    ids = PROMPT + got
    seq = engine.runner.add_sequence()
    logits = engine.runner.verify(seq, ids).astype(np.float64)
    engine.runner.remove_sequence(seq)
    if tp > 1:
        engine.runner.close()  # its worker process
    ref = reference_logits(*converted_network(whole), ids)
    scale = np.abs(ref).max()
    error = float(np.abs(logits - ref).max() / scale) if np.isfinite(logits).all() else float("inf")
    precision = "int8" if engine.runner.meta.get("activations") == "int8" else get_quantization(scheme).model_dtype
    tolerance = TOLERANCE[precision]
    # The reference's choice after each prompt/generated token; decisive where its top two are further
    # apart than the library's precision can move them.
    steps = ref[len(PROMPT) - 1:-1]
    top2 = np.sort(steps, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * tolerance * scale
    agree = np.asarray(got) == steps.argmax(-1)
    result = {"layout": layout, "scheme": scheme, "precision": precision, "compile_s": compiled,
              "logits_error": error, "tolerance": tolerance, "decisive_steps": int(decisive.sum()),
              "greedy_agrees": bool(agree[decisive].all()), "engine_tokens_per_s": rate}
    if runner is not None:
        result["runner_greedy_equal"] = run_native(runner, out, lib, device, tokens) == got
    result["ok"] = (error <= tolerance and result["greedy_agrees"] and result["decisive_steps"] > 0
                    and result.get("runner_greedy_equal", True))
    log(format_row(result))
    return result


def format_row(r: dict) -> str:
    native = {True: "equal", False: "DIFFER"}.get(r.get("runner_greedy_equal"), "-")
    return (f"| {r['layout']} | {r['scheme']} ({r['precision']}) | {r['logits_error']:.1e} (≤ {r['tolerance']:.0e}) "
            f"| {'agree' if r['greedy_agrees'] else 'DIFFER'} ({r['decisive_steps']} decisive) | {native} | "
            f"{r['engine_tokens_per_s']:.1f} | {'ok' if r['ok'] else 'FAIL'} |")


def device_copy_bandwidth(device: str, nbytes: int = 1 << 28, repeat: int = 5) -> float:
    """GB/s of a device-to-device copy (read + write counted), best of `repeat`; the CPU's read probe there."""
    import tvm

    from gptbc.bench import read_bandwidth

    if parse_device_kind(device)[0] == "cpu":
        return read_bandwidth()
    dev = parse_device(device)
    src = tvm.runtime.empty((nbytes // 4,), "float32", dev)
    dst = tvm.runtime.empty((nbytes // 4,), "float32", dev)
    best = float("inf")
    for _ in range(repeat):
        dev.sync()
        start = time.perf_counter()
        src.copyto(dst)
        dev.sync()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def bench_target(root: Path, target: str, device: str, suffix: str, scheme: str, log,
                 cfg: GPTBigCodeConfig | None = None) -> dict:
    """A random checkpoint's decode (batch 1 and 16) and prefill rates on the target, next to the device's
    copy bandwidth; santacoder's shape unless `cfg` gives another."""
    from gptbc.bench import run_bench

    cfg = cfg or resolve_model("santacoder").config
    hf_dir = random_checkpoint(root / "bench-hf", cfg)
    out = convert_weight(hf_dir, scheme, root / "bench", progress=False)
    lib = compile_model(resolve_model(str(out)), target, scheme, root / f"bench{suffix}", log=lambda _m: None)
    result = run_bench(out, lib, prefill=min(512, cfg.n_positions // 2), batches=(16,), repeat=3, device=device,
                       log=log)
    bandwidth = device_copy_bandwidth(device)
    result["device_copy_GBps"] = bandwidth
    result["decode_fraction_of_bandwidth"] = result["decode"]["weight_GBps_best"] / bandwidth
    log(f"device copy bandwidth {bandwidth:.1f} GB/s: decode streams weights at "
        f"{100 * result['decode_fraction_of_bandwidth']:.0f}% of it")
    return result


def run_check(target: str, device: str, schemes: list[str], tokens: int, workdir: Path,
              runner: Path | None = None, bench: bool = False, log=print, tensor_parallel: int = 1) -> dict:
    """Every layout × scheme (and the benchmark with `bench`); result["ok"] says whether all passed."""
    suffix = check_options(target, device, schemes, tokens, runner)
    if tensor_parallel > 1 and (runner is not None or bench):
        raise GptbcError(f"--tensor-parallel {tensor_parallel}: checks the Python engine only (no --runner, no --bench)")
    log(f"gptbc check --target {target} --device {device}: logits and {tokens} greedy tokens against a float64 "
        f"numpy forward pass of the same (dequantized) weights")
    log("| layout | scheme (computes in) | logits error | greedy | gptbc-run | tok/s | |")
    log("|---|---|---|---|---|---|---|")
    cases = []
    for layout, multi_query in LAYOUTS.items():
        hf_dir = random_checkpoint(workdir / f"{layout}-hf", small_config(multi_query))
        for scheme in schemes:
            cases.append(check_case(workdir, hf_dir, layout, scheme, target, device, suffix, tokens, runner, log,
                                    tensor_parallel))
    result = {"target": target, "device": device, "tensor_parallel": tensor_parallel, "cases": cases,
              "ok": all(c["ok"] for c in cases)}
    if bench:
        result["bench"] = bench_target(workdir, target, device, suffix, schemes[-1], log)
    log("all checks passed" if result["ok"] else "FAILED: see the rows marked FAIL")
    return result
