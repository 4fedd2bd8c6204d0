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
from collections.abc import MutableMapping
from pathlib import Path

import numpy as np

from gptbc.artifact.config import GPTBigCodeConfig, load_gptbc_config, resolve_model
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


class ConvertedNetwork(MutableMapping):
    """A converted directory's weights as float64 in HF's layout, dequantized when read (and multi-head c_attn
    rows put back per head: the converter fuses them as all q, all k, all v). One tensor at a time, so the
    reference of a full-size model needs a layer's worth of memory, not the whole network in float64 (9 GB for
    santacoder). Assigned tensors replace what is read (tests break a layer that way)."""

    def __init__(self, out_dir: Path, cfg: GPTBigCodeConfig):
        from safetensors import safe_open

        from gptbc.artifact.manifest import read_weights

        self.cfg = cfg
        self.scheme = quantization_of(read_weights(out_dir)["quantization"], str(out_dir))
        self.shapes = dict(hf_shapes(cfg))
        self.file_of: dict[str, Path] = {}
        for f in sorted(out_dir.glob("*.safetensors")):
            with safe_open(str(f), "np") as handle:
                self.file_of.update((key, f) for key in handle.keys())
        self.names = sorted({k[:-len(".q_weight")] + ".weight" if k.endswith(".q_weight") else k
                             for k in self.file_of if not k.endswith((".q_scale", ".q_min", ".q_high"))})
        self.replaced: dict[str, np.ndarray] = {}

    def _raw(self, key: str) -> np.ndarray | None:
        from safetensors import safe_open

        if key not in self.file_of:
            return None
        with safe_open(str(self.file_of[key]), "np") as handle:
            return handle.get_tensor(key)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.replaced:
            return self.replaced[name]
        if name not in self.names:
            raise KeyError(name)
        base = name[:-len(".weight")] if name.endswith(".weight") else None
        if base is not None and base + ".q_weight" in self.file_of:
            x = dequantize(self._raw(base + ".q_weight"), self._raw(base + ".q_scale"), self.shapes[name][1],
                           self.scheme.layout(base), self._raw(base + ".q_min"), self._raw(base + ".q_high"))
        else:
            x = self._raw(name)
        x = x.astype(np.float64)
        if not self.cfg.multi_query and ".attn.c_attn." in name:
            x = x.reshape(3, self.cfg.n_head, self.cfg.head_dim, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)
        return x

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.replaced[name] = value

    def __delitem__(self, name: str) -> None:
        raise TypeError("the converted weights are read-only")

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def converted_network(out_dir: Path) -> tuple[GPTBigCodeConfig, ConvertedNetwork]:
    """(config, float64 weights in HF's layout, read when used) of a converted directory."""
    cfg = resolve_model(str(out_dir)).config
    return cfg, ConvertedNetwork(out_dir, cfg)


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
    check_run_options(tokens, runner)
    parse_device(device)  # it exists here (a driver, an adapter, a TVM runtime for it)
    return build.suffix


def check_run_options(tokens: int, runner: Path | None) -> None:
    if tokens < 1:
        raise GptbcError(f"--tokens {tokens}: must be at least 1")
    if runner is not None and not runner.is_file():
        raise GptbcError(f"--runner {runner}: no such file (build gptbc-run: cmake -S . -B build && "
                         f"cmake --build build)")


def run_native(runner: Path, model_dir: Path, lib: Path, device: str, tokens: int,
               prompt: list[int] = PROMPT) -> list[int]:
    """gptbc-run's greedy tokens after `prompt`."""
    run = subprocess.run([str(runner), "--model", str(model_dir), "--lib", str(lib), "--device", device,
                          "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(tokens),
                          "--ignore-eos", "--json"], capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise GptbcError(f"gptbc-run failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(run.stdout)["token_ids"]


def compare(engine: Engine, prompt: list[int], tokens: int, reference_dir: Path, scheme: str) -> dict:
    """`tokens` greedy tokens after `prompt` and the logits at every position, against the float64 reference of
    the weights in `reference_dir`."""
    start = time.perf_counter()
    got = engine.generate(prompt, tokens, ignore_eos=True)
    rate = tokens / (time.perf_counter() - start)
    ids = list(prompt) + got
    seq = engine.runner.add_sequence()
    logits = engine.runner.verify(seq, ids).astype(np.float64)
    engine.runner.remove_sequence(seq)
    ref = reference_logits(*converted_network(reference_dir), ids)
    scale = np.abs(ref).max()
    error = float(np.abs(logits - ref).max() / scale) if np.isfinite(logits).all() else float("inf")
    precision = "int8" if engine.runner.meta.get("activations") == "int8" else get_quantization(scheme).model_dtype
    tolerance = TOLERANCE[precision]
    # The reference's choice after each prompt/generated token; decisive where its top two are further
    # apart than the library's precision can move them.
    steps = ref[len(prompt) - 1:-1]
    top2 = np.sort(steps, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * tolerance * scale
    agree = np.asarray(got) == steps.argmax(-1)
    return {"scheme": scheme, "precision": precision, "logits_error": error, "tolerance": tolerance,
            "decisive_steps": int(decisive.sum()), "greedy_agrees": bool(agree[decisive].all()),
            "engine_tokens_per_s": rate, "token_ids": got}


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
    result = {"layout": layout, "compile_s": compiled, **compare(engine, PROMPT, tokens, whole, scheme)}
    if tp > 1:
        engine.runner.close()  # its worker process
    if runner is not None:
        result["runner_greedy_equal"] = run_native(runner, out, lib, device, tokens) == result["token_ids"]
    result["ok"] = (result["logits_error"] <= result["tolerance"] and result["greedy_agrees"]
                    and result["decisive_steps"] > 0 and result.get("runner_greedy_equal", True))
    log(format_row(result))
    return result


CODE_PROMPT = "def fibonacci(n):\n    "  # a prompt a code model continues decisively


def check_model(name: str, model_dir: Path, lib: Path, device: str, tokens: int, runner: Path | None = None,
                log=print) -> dict:
    """`gptbc check MODEL`: the prepared model itself (its converted weights and library) on its device, against
    the float64 reference of its converted weights; with a tokenizer, on a code prompt, and the completion shown."""
    check_run_options(tokens, runner)
    engine = Engine(model_dir, lib, device=device)
    scheme = load_gptbc_config(model_dir)["quantization"]["name"]
    prompt = engine.encode(CODE_PROMPT) if engine.tokenizer is not None else PROMPT
    tokens = max(1, min(tokens, engine.context_window_size - len(prompt)))
    log(f"gptbc check {name} ({scheme}, {device}): logits and {tokens} greedy tokens against a float64 numpy "
        f"forward pass of the same (dequantized) weights")
    log("| model | scheme (computes in) | logits error | greedy | gptbc-run | tok/s | |")
    log("|---|---|---|---|---|---|---|")
    result = {"layout": name, **compare(engine, prompt, tokens, model_dir, scheme)}
    if runner is not None:
        result["runner_greedy_equal"] = (run_native(runner, model_dir, lib, device, tokens, prompt)
                                         == result["token_ids"])
    # A model's greedy choices are checked where the reference is decisive; a random-weights model may have
    # no such step, and then its logits alone decide.
    result["ok"] = (result["logits_error"] <= result["tolerance"] and result["greedy_agrees"]
                    and result.get("runner_greedy_equal", True))
    log(format_row(result))
    if result["decisive_steps"] == 0:
        log("no greedy step was decisive (the reference's top two logits are closer than the library's precision): "
            "the greedy tokens were not compared")
    if engine.tokenizer is not None:
        log(f"completion: {CODE_PROMPT + engine.decode_text(result['token_ids'])!r}")
    log("all checks passed" if result["ok"] else "FAILED: see the row marked FAIL")
    return {"model": name, "device": device, "lib": str(lib), "cases": [result], "ok": result["ok"]}


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
