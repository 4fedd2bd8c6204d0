"""Build the folder that scripts/gpu_run.py runs on a lent GPU machine (issue 37), here, with gptbc installed.

The GPU machine has the NVIDIA driver, PyTorch, numpy, safetensors and transformers, but no TVM and no
gptbc, and a call carries at most 64 MiB. So the folder holds everything else, small:

  bin/        gptbc-run built for this machine's CPU with an $ORIGIN run path, TVM's runtime libraries
              (and libtvm_runtime_cuda.so: it needs only the driver; libgptbc_webgpu.so for --target vulkan)
  tiny/M/hf   the tiny HF checkpoints (the reference that needs no TVM runs on them there)
  tiny/M/S    their converted weights for each scheme S
  shapes/X    the converted manifests (gptbc-config.json, no weights) of the big shapes: gpu_run.py writes
              random weights for them there, with numpy
  libs/       the model libraries for --target (CUDA: nvcc's sm_90a kernels inside)
  plan.json   what to run, and the greedy ids the CPU build produced here for every tiny case

    python scripts/gpu_prepare.py -o gpu_carry                      # the CUDA folder for an H100/H200
    python scripts/gpu_prepare.py -o /tmp/c --target cpu --smallest  # the same code path on this CPU

The tiny models are the shipped trained one (tests/data/trained-tiny, multi-query) and the same network
written as multi-head attention (its one K/V head repeated for every query head): both give confident
greedy ids, so an fp16 build and an fp32 build can be compared token for token. Converted weights, compiled
libraries and gptbc-run come from gptbc's artifact cache (`gptbc cache`), so a second run rebuilds nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from gptbc import bundle
from gptbc.artifact import manifest
from gptbc.artifact.config import resolve_model
from gptbc.artifact.params import converted_params
from gptbc.artifact.quantization import get_quantization
from gptbc.errors import GptbcError
from gptbc.runtime.devices import host_arch

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "tests" / "data" / "trained-tiny"
CARRY_LIMIT = 64 << 20  # what one `run` call carries
SHARD_BYTES = 2 << 30
MAX_NEW_TOKENS = 24
SMALLEST_MAX_NEW_TOKENS, SMALLEST_PROMPTS = 12, 2  # the test's mode: fewer, shorter runs
# Prompts of several lengths from the trained model's corpus (encoded with its tokenizer).
PROMPTS = ["def fibonacci(n):\n", "import numpy as np\n\nclass Model:\n    def __init__(self, size", "    return "]
TINY_SCHEMES = ("q0f32", "q4f16_1", "q8f16_1")
# (name, preset, scheme, HF peer measured for this shape): the speed run.
SHAPES = [("santacoder-q4f16_1", "santacoder", "q4f16_1", True), ("santacoder-q0f16", "santacoder", "q0f16", False),
          ("starcoder-q4f16_1", "starcoder", "q4f16_1", True)]
# Bench settings per shape: batch 1 prefills the 512-token prompt that is measured; batch 16 measures decode
# (its prompts are short, so 16 prefills of 512 do not eat the time limit).
BENCH = [{"batch": 1, "prompt_len": 512, "max_new_tokens": 65, "warmup": 1, "repeats": 3},
         {"batch": 16, "prompt_len": 64, "max_new_tokens": 33, "warmup": 1, "repeats": 2}]
SMALLEST_BENCH = [{"batch": 1, "prompt_len": 32, "max_new_tokens": 5, "warmup": 1, "repeats": 2},
                  {"batch": 4, "prompt_len": 8, "max_new_tokens": 5, "warmup": 0, "repeats": 1}]
DEVICES = {"cuda": "cuda", "cpu": "cpu", "vulkan": "vulkan"}
HF_CONFIG_KEYS = ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size", "n_inner", "layer_norm_epsilon",
                  "multi_query", "activation_function", "scale_attn_weights", "tie_word_embeddings", "bos_token_id",
                  "eos_token_id")


def log(message: str) -> None:
    print(f"[gpu_prepare] {message}", file=sys.stderr, flush=True)


def device_of(target: str) -> str:
    kind = target.partition(":")[0]
    if kind not in DEVICES:
        raise GptbcError(f"--target {target}: gpu_prepare builds for cuda[:sm_XX], cpu or vulkan")
    return DEVICES[kind]


# ---- the tiny models ----

def mha_copy(mqa_dir: Path, out: Path) -> Path:
    """The multi-query checkpoint written as multi-head attention: HF's MHA c_attn rows are per head
    (q_h, k_h, v_h); each head gets the one K/V head, so the network computes the same function."""
    from safetensors.numpy import load_file, save_file

    config = json.loads((mqa_dir / "config.json").read_text())
    n_embd, n_head = config["n_embd"], config["n_head"]
    d = n_embd // n_head
    tensors = load_file(str(mqa_dir / "model.safetensors"))
    for name in [n for n in tensors if ".attn.c_attn." in n]:
        x = tensors[name]  # [n_embd + 2d, ...]: all q, then k, then v
        q, k, v = x[:n_embd], x[n_embd:n_embd + d], x[n_embd + d:]
        tensors[name] = np.ascontiguousarray(
            np.concatenate([np.concatenate([q[h * d:(h + 1) * d], k, v]) for h in range(n_head)]))
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.update(multi_query=False, num_key_value_heads=n_head)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("tokenizer.json", "generation_config.json"):
        if (mqa_dir / extra).is_file():
            shutil.copy2(mqa_dir / extra, out / extra)
    return out


def prompt_ids(hf_dir: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    return [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]


# ---- compiling and converting (both through gptbc's artifact cache) ----

def compiled(model: Path | str, scheme: str, target: str, output: Path, batch_invariant: bool = False) -> Path:
    """The library for `model` (an HF checkpoint, a converted directory or a preset name) at `output`, from the
    artifact cache (compiled there on a miss). Float activations on the CPU: the GPU targets have no others, and
    the CPU ids are the reference for them."""
    from gptbc.compile.compiler import compile_model

    log(f"library: {model} {scheme} for {target}{' (batch-invariant)' if batch_invariant else ''}")
    return compile_model(resolve_model(str(model)), target, scheme, output, log=lambda _m: None, activations="float",
                         batch_invariant=batch_invariant)


def converted(hf_dir: Path, scheme: str) -> Path:
    from gptbc.prepare import converted as cached_conversion

    return cached_conversion(str(hf_dir), scheme, False, 1, lambda _m: None, progress=False)[1]


# ---- gptbc-run and the runtime ----

def make_bin(folder: Path, device: str) -> Path:
    """gptbc-run for this machine (cached by gptbc bundle, $ORIGIN run path) beside TVM's runtime libraries."""
    arch = host_arch()
    runtime = bundle.runtime_for(arch, log)
    runner = bundle.native_program(arch, runtime, log)
    folder.mkdir(parents=True)
    shutil.copy2(runner, folder / bundle.RUNNER)
    for name in bundle.RUNTIME_LIBS:
        if name != bundle.CUDA_RUNTIME or device == "cuda":
            shutil.copy2(runtime.library(name), folder / name)
    if device == "cuda":  # what libtvm_runtime_cuda.so links besides the driver
        cudart = bundle.cuda_runtime_dependency(runtime, arch)
        shutil.copy2(cudart, folder / cudart.name)
    if device == "vulkan":
        from gptbc.runtime import webgpu

        shutil.copy2(webgpu.runtime_library(), folder / "libgptbc_webgpu.so")
    return folder / bundle.RUNNER


def cpu_greedy_ids(runner: Path, weights: Path, lib: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """The ids the CPU build gives for each prompt alone (gptbc-run's single-sequence path, eos ignored)."""
    ids = []
    for prompt in prompts:
        done = subprocess.run([str(runner), "--model", str(weights), "--lib", str(lib), "--device", "cpu",
                               "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(max_new),
                               "--ignore-eos", "--json"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise GptbcError(f"the CPU reference run of {lib} failed: {done.stderr.strip()[-300:]}")
        ids.append(json.loads(done.stdout)["token_ids"])
    return ids


# ---- the big shapes: manifests only ----

def shape_manifest(preset: str, scheme: str) -> tuple[dict, dict]:
    """(the converted gptbc-config.json of `preset` in `scheme`, with its tensors in 2 GiB files; the HF config
    of the same shape, for the transformers peer)."""
    source = resolve_model(preset)
    cfg, quant = source.config, get_quantization(scheme)
    params, shard, size = [], 0, 0
    for name, shape, dtype in converted_params(cfg, quant):
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if size and size + nbytes > SHARD_BYTES:
            shard, size = shard + 1, 0
        size += nbytes
        params.append({"name": name, "shape": shape, "dtype": dtype, "file": f"weights-{shard:05d}.safetensors"})
    weights = manifest.weights_manifest(f"{preset}-random", cfg, quant, params)
    model_config = cfg.to_dict()
    hf = {"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"],
          **{k: model_config[k] for k in HF_CONFIG_KEYS if k in model_config}}
    return weights, hf


def weight_bytes(weights: dict) -> int:
    return sum(int(np.prod(p["shape"], dtype=np.int64)) * np.dtype(p["dtype"]).itemsize for p in weights["params"])


# ---- the folder ----

def build_plan(out: Path, target: str, smallest: bool) -> dict:
    device = device_of(target)
    runner = make_bin(out / "bin", device)
    tiny_root = out / "tiny"
    models = {"mqa": tiny_root / "mqa" / "hf"}
    shutil.copytree(TRAINED, models["mqa"])
    if not smallest:
        models["mha"] = mha_copy(TRAINED, tiny_root / "mha" / "hf")
    schemes = ("q0f32",) if smallest else TINY_SCHEMES
    max_new = SMALLEST_MAX_NEW_TOKENS if smallest else MAX_NEW_TOKENS
    plan = {"schema": 1, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gptbc_commit": git_commit(), "target": target, "device": device, "smallest": smallest,
            "max_new_tokens": max_new, "tiny": [], "batch_invariant": None, "shapes": []}
    prompts = prompt_ids(models["mqa"])[:SMALLEST_PROMPTS if smallest else None]
    scratch = out.parent / f".{out.name}.cpu-libs"  # the CPU reference libraries: not carried
    scratch.mkdir()
    try:
        for model, hf_dir in models.items():
            for scheme in schemes:
                name = f"{model}-{scheme}"
                weights = converted(hf_dir, scheme)
                shutil.copytree(weights, tiny_root / model / scheme)
                lib = compiled(weights, scheme, target, out / "libs" / f"{name}.so")
                cpu_lib = lib if device == "cpu" else compiled(weights, scheme, "cpu", scratch / f"{name}.so")
                plan["tiny"].append({"name": name, "model": model, "scheme": scheme, "hf": rel(hf_dir, out),
                                     "weights": f"tiny/{model}/{scheme}", "lib": f"libs/{name}.so", "prompts": prompts,
                                     "cpu_ids": cpu_greedy_ids(runner, weights, cpu_lib, prompts, max_new)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # batch invariance: the same prompts alone and together, with a --batch-invariant library
    bi_scheme = "q0f32" if smallest else "q4f16_1"
    compiled(converted(models["mqa"], bi_scheme), bi_scheme, target, out / "libs" / "mqa-bi.so", batch_invariant=True)
    plan["batch_invariant"] = {"name": f"mqa-{bi_scheme}-batch-invariant", "weights": f"tiny/mqa/{bi_scheme}",
                               "lib": "libs/mqa-bi.so", "prompts": prompts,
                               # the same check on the plain library, reported (a plain library promises nothing)
                               "plain_lib": None if smallest else f"libs/mqa-{bi_scheme}.so"}
    if smallest:  # the speed path on the tiny shape: random weights from its manifest, the tiny library
        shape_dir = out / "shapes" / "tiny-mqa-q0f32"
        shape_dir.mkdir(parents=True)
        info = manifest.read_weights(tiny_root / "mqa" / "q0f32")
        shutil.copy2(tiny_root / "mqa" / "q0f32" / manifest.WEIGHTS_FILE, shape_dir / manifest.WEIGHTS_FILE)
        hf = json.loads((models["mqa"] / "config.json").read_text())
        plan["shapes"].append({"name": "tiny-mqa-q0f32", "manifest": f"shapes/tiny-mqa-q0f32/{manifest.WEIGHTS_FILE}",
                               "lib": "libs/mqa-q0f32.so", "weight_bytes": weight_bytes(info), "hf_config": hf,
                               "hf_peer": True, "bench": SMALLEST_BENCH})
    else:
        for name, preset, scheme, peer in SHAPES:
            weights, hf = shape_manifest(preset, scheme)
            shape_dir = out / "shapes" / name
            shape_dir.mkdir(parents=True)
            (shape_dir / manifest.WEIGHTS_FILE).write_text(json.dumps(weights, indent=1) + "\n")
            compiled(preset, scheme, target, out / "libs" / f"{name}.so")
            plan["shapes"].append({"name": name, "manifest": f"shapes/{name}/{manifest.WEIGHTS_FILE}",
                                   "lib": f"libs/{name}.so", "weight_bytes": weight_bytes(weights), "hf_config": hf,
                                   "hf_peer": peer, "bench": BENCH})
    shutil.copy2(Path(__file__).with_name("gpu_run.py"), out / "gpu_run.py")
    return plan


def rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def git_commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, help="the folder to write (replaced if it holds a plan.json)")
    ap.add_argument("--target", default="cuda:sm_90a", help="cuda[:sm_XX] (default cuda:sm_90a), cpu or vulkan")
    ap.add_argument("--smallest", action="store_true", help="the tiny multi-query model in q0f32 only, and its "
                    "shape as the speed case (for the test that runs this path on the CPU and on lavapipe)")
    args = ap.parse_args(argv)
    out = Path(args.output)
    try:
        device_of(args.target)
        if out.exists() and not (out / "plan.json").is_file():
            raise GptbcError(f"-o {out}: exists and is not a gpu_prepare folder; remove it or choose another")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            (tmp / "libs").mkdir()
            plan = build_plan(tmp, args.target, args.smallest)
            (tmp / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
            size = folder_bytes(tmp)
            if size > CARRY_LIMIT:
                raise GptbcError(f"-o {out}: the folder is {size / 2**20:.1f} MiB, over the {CARRY_LIMIT >> 20} MiB "
                                 f"a run call carries")
            bundle.replace_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except GptbcError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{out}: {size / 2**20:.1f} MiB, {len(plan['tiny'])} tiny cases, {len(plan['shapes'])} shapes, "
          f"target {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
