"""The first CUDA run (issue 37): everything a lent GPU machine does, in one call, from a gpu_prepare.py folder.

Runs where there is no TVM and no gptbc: Python with numpy and the standard library, PyTorch and
transformers for the reference and the peer. Every gptbc computation is the folder's bin/gptbc-run.

  1. the device: GPU and driver (nvidia-smi, torch.cuda), and a measured device-to-device copy bandwidth
  2. correctness: each tiny case (MQA and MHA; q0f32, q4f16_1, q8f16_1) gives the greedy ids the CPU build
     gave where the folder was made (plan.json); HF transformers on this machine's PyTorch, from the same
     checkpoint, gives the q0f32 ids; the --batch-invariant library gives the same ids alone and in a batch
  3. speed: for each shape, random weights written here from its converted manifest (numpy, no weights
     travel), gptbc-run --bench at batch 1 (prefill 512, decode) and 16 (decode), the bandwidth each decode
     rate implies (weight bytes x decode steps/s) as a share of the measured copy bandwidth; HF transformers
     (fp16, SDPA; fp32 on a CPU) on the same shape, in the same call
  4. results: OUT/gpu_run.json (rewritten after every step, so a cut-off run still reports) and
     OUT/gpu_run.log; stops starting steps when the time left (--budget-s) is under what a step needs, and
     records which were skipped

    python3 gpu_carry/gpu_run.py --carry gpu_carry --out "$OUT" --budget-s 380

Exit status 0 when every check that ran passed (skipped steps are recorded, not failures), 1 otherwise.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ALIGNMENT = 64  # gptbc-run uses a tensor in place when its data is 64-byte aligned
POOL_BYTES = 64 << 20  # random values are written from pools of this size, cycled (writing speed, not entropy)
FLOAT_POOL_BYTES = 4 << 20
RESERVE_S = 15  # kept back at the end for writing results


class Run:
    """The log, the result object and the clock."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.start, self.budget = out, time.monotonic(), budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "gpu_run.log", "a", encoding="utf-8")
        self.result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": budget_s,
                             "steps": {}, "skipped": [], "failures": []}

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - RESERVE_S - self.elapsed()

    def can(self, step: str, need_s: float) -> bool:
        """Whether `step` (about need_s seconds) fits in the time left; if not, it is recorded as skipped."""
        if self.left() >= need_s:
            return True
        self.result["skipped"].append({"step": step, "needed_s": need_s, "left_s": round(self.left(), 1)})
        self.log(f"SKIP {step}: needs ~{need_s:.0f}s, {self.left():.0f}s left")
        self.save()
        return False

    def fail(self, what: str) -> None:
        self.result["failures"].append(what)
        self.log(f"FAIL {what}")

    def save(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.out / ".gpu_run.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=1) + "\n")
        os.replace(tmp, self.out / "gpu_run.json")


# ---- gptbc-run ----

def gptbc_run(run: Run, carry: Path, args: list[str], timeout: float) -> dict:
    """One gptbc-run call (--json or --bench output): its JSON, or {"error": ...}."""
    exe = carry / "bin" / "gptbc-run"
    try:
        done = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=max(timeout, 1), cwd=carry)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip() or f"exit status {done.returncode}")[-500:]}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"no JSON in the output: {done.stdout[-300:]!r}"}


def ids_arg(prompts: list[list[int]]) -> str:
    return ";".join(",".join(map(str, p)) for p in prompts)


def generate(run: Run, carry: Path, device: str, weights: str, lib: str, prompts: list[list[int]],
             max_new: int) -> list[list[int]] | str:
    """Greedy ids of the prompts, together (one batch) when several are given; an error string on failure."""
    got = gptbc_run(run, carry, ["--model", weights, "--lib", lib, "--device", device, "--prompt-ids", ids_arg(prompts),
                                 "--max-new-tokens", str(max_new), "--ignore-eos", "--json"],
                    min(120.0, max(run.left(), 1)))
    if "error" in got:
        return got["error"]
    return [o["token_ids"] for o in got["outputs"]] if "outputs" in got else [got["token_ids"]]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---- 1. the device ----

def torch_device(device: str):
    import torch

    return torch.device("cuda" if device == "cuda" else "cpu")


def describe_device(run: Run, device: str, carry_bin: Path) -> None:
    import torch

    info: dict = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                  "numpy": np.__version__, "device": device}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.memory,"
                               "pcie.link.gen.max", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    if device == "cuda":
        if not torch.cuda.is_available():
            run.fail("torch sees no CUDA device")
        else:
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", gpu_memory_bytes=p.total_memory,
                        cuda_runtime=torch.version.cuda, multiprocessors=p.multi_processor_count)
        check_driver(run, info, carry_bin)
    info["copy_bandwidth"] = copy_bandwidth(torch_device(device))
    run.result["device"] = info
    run.log(f"device: {json.dumps(info)}")


def check_driver(run: Run, info: dict, carry_bin: Path) -> None:
    """The carried libcudart.so.N runs only on a driver for CUDA N or newer: say so up front, in words."""
    import re

    import torch

    version = torch._C._cuda_getDriverVersion() if hasattr(torch._C, "_cuda_getDriverVersion") else 0
    info["driver_cuda_version"] = f"{version // 1000}.{version % 1000 // 10}" if version else None
    carried = sorted(p.name for p in carry_bin.glob("libcudart.so.*"))
    info["carried_cudart"] = carried
    needs = [int(m.group(1)) for m in (re.match(r"libcudart\.so\.(\d+)$", n) for n in carried) if m]
    if version and needs and version // 1000 < max(needs):
        run.fail(f"the driver supports CUDA {info['driver_cuda_version']}, the carried {carried[0]} needs CUDA "
                 f"{max(needs)} (driver 580+ for 13): gptbc-run cannot use this GPU; the tiny and speed steps will say so")


def copy_bandwidth(dev) -> dict:
    """Device-to-device copy: bytes read + bytes written per second, best of several timed copies."""
    import torch

    size = (1 << 30) if dev.type == "cuda" else (64 << 20)
    a = torch.empty(size, dtype=torch.uint8, device=dev)
    a.fill_(1)
    b = torch.empty_like(a)
    times = []
    for i in range(12):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up copies
            times.append(time.perf_counter() - t0)
    best = min(times)
    del a, b
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"bytes": size, "best_s": best, "read_plus_write_GBps": round(2 * size / best / 1e9, 2),
            "how": f"torch {dev.type} tensor.copy_ of {size >> 20} MiB, best of 10 after 2 warm-ups"}


# ---- 2. correctness ----

def check_tiny(run: Run, carry: Path, plan: dict, device: str) -> None:
    results = []
    max_new = plan["max_new_tokens"]
    for case in plan["tiny"]:
        if not run.can(f"tiny {case['name']}", 10):
            break
        row = {"name": case["name"], "per_prompt": []}
        for prompt, want in zip(case["prompts"], case["cpu_ids"]):
            got = generate(run, carry, device, case["weights"], case["lib"], [prompt], max_new)
            if isinstance(got, str):
                row["per_prompt"].append({"error": got})
                run.fail(f"tiny {case['name']}: {got}")
                continue
            diff = first_difference(got[0], want)
            row["per_prompt"].append({"ids": got[0], "equal_cpu": diff is None, "first_difference": diff})
            if diff is not None:
                run.fail(f"tiny {case['name']}: ids differ from the CPU build's at position {diff}")
        row["equal_cpu"] = all(p.get("equal_cpu") for p in row["per_prompt"])
        results.append(row)
        run.log(f"tiny {case['name']}: {'equal to the CPU build' if row['equal_cpu'] else 'DIFFERENT'}")
        run.result["steps"]["tiny"] = results
        run.save()


def hf_greedy(hf_dir: Path, prompts: list[list[int]], max_new: int, dev) -> list[list[int]]:
    """HF transformers' greedy ids (eos ignored), float32, recomputing the whole sequence each step."""
    import torch
    from transformers import GPTBigCodeForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = GPTBigCodeForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).to(dev).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_new):
                logits = model(torch.tensor([ids], device=dev)).logits[0, -1]
                ids.append(int(torch.argmax(logits)))
            out.append(ids[len(prompt):])
    return out


def check_hf(run: Run, carry: Path, plan: dict, device: str) -> None:
    rows = []
    dev = torch_device(device)
    for model in sorted({c["model"] for c in plan["tiny"]}):
        if not run.can(f"hf {model}", 20):
            break
        cases = [c for c in plan["tiny"] if c["model"] == model]
        hf = hf_greedy(carry / cases[0]["hf"], cases[0]["prompts"], plan["max_new_tokens"], dev)
        for case in cases:
            cpu_equal = [first_difference(h, c) is None for h, c in zip(hf, case["cpu_ids"])]
            tiny = {r["name"]: r for r in run.result["steps"].get("tiny", [])}.get(case["name"])
            dev_ids = [p.get("ids") for p in tiny["per_prompt"]] if tiny else None
            row = {"name": case["name"], "hf_equal_cpu": cpu_equal,
                   "hf_equal_device": [d is not None and first_difference(h, d) is None for h, d in zip(hf, dev_ids)]
                   if dev_ids else None,
                   "hf_agreement_with_device": agreement(hf, dev_ids) if dev_ids else None}
            rows.append(row)
            # The float32 build computes what HF computes: its ids must be HF's. A quantized build's are
            # reported (its weights are not HF's), not checked.
            if case["scheme"] == "q0f32" and not (all(cpu_equal) and row["hf_equal_device"] and all(row["hf_equal_device"])):
                run.fail(f"hf {case['name']}: HF transformers on {dev.type} gives other ids "
                         f"(equal to CPU: {cpu_equal}, to {device}: {row['hf_equal_device']})")
        run.log(f"hf {model}: {json.dumps(rows[-len(cases):])}")
        run.result["steps"]["hf_reference"] = {"device": str(dev), "max_new_tokens": plan["max_new_tokens"],
                                               "cases": rows}
        run.save()


def agreement(a: list[list[int]], b: list[list[int] | None]) -> float:
    pairs = [(x, y) for p, q in zip(a, b) if q is not None for x, y in zip(p, q)]
    return round(sum(x == y for x, y in pairs) / max(len(pairs), 1), 4)


def check_batch_invariant(run: Run, carry: Path, plan: dict, device: str) -> None:
    case = plan.get("batch_invariant")
    if not case or not run.can("batch invariance", 15):
        return
    max_new, prompts = plan["max_new_tokens"], case["prompts"]
    row = {"name": case["name"]}
    for label, lib in (("batch_invariant", case["lib"]), ("plain", case.get("plain_lib"))):
        if lib is None:
            continue
        alone = [generate(run, carry, device, case["weights"], lib, [p], max_new) for p in prompts]
        together = generate(run, carry, device, case["weights"], lib, prompts, max_new)
        errors = [x for x in alone + [together] if isinstance(x, str)]
        if errors:
            row[label] = {"error": errors[0]}
            run.fail(f"batch {label}: {errors[0]}")
            continue
        alone = [a[0] for a in alone]
        equal = [first_difference(a, t) is None for a, t in zip(alone, together)]
        row[label] = {"alone_equals_batch": equal, "batch_ids": together}
        if label == "batch_invariant" and not all(equal):
            run.fail(f"batch invariance: {case['name']} gives other ids in a batch of {len(prompts)} ({equal})")
    run.log(f"batch invariance: {json.dumps({k: v.get('alone_equals_batch', v) for k, v in row.items() if k != 'name'})}")
    run.result["steps"]["batch_invariance"] = row
    run.save()


# ---- 3. speed: random weights from a manifest ----

def random_pools(seed: int, size: int) -> dict[str, np.ndarray]:
    """Byte pools of `size` bytes the weight files are cut from: raw random bytes for packed integers, and
    values of a sane size for each float role (so fp16 activations stay finite)."""
    rng = np.random.default_rng(seed)
    n = min(size, FLOAT_POOL_BYTES) // 4  # float values are slow to draw: smaller pools, cycled more often
    pools = {"bytes": np.frombuffer(rng.bytes(size), dtype=np.uint8)}
    for dtype in ("float16", "float32"):
        pools[f"normal-{dtype}"] = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(dtype).view(np.uint8)
        pools[f"scale-{dtype}"] = rng.uniform(0.002, 0.01, n).astype(dtype).view(np.uint8)
        pools[f"one-{dtype}"] = (1 + 0.05 * rng.standard_normal(n, dtype=np.float32)).astype(dtype).view(np.uint8)
    return pools


def pool_of(name: str, dtype: str) -> str:
    if not dtype.startswith("float"):
        return "bytes"
    if name.endswith("q_scale") or name.endswith("q_min"):
        return f"scale-{dtype}"
    if ".ln_" in name and name.endswith(".weight"):
        return f"one-{dtype}"
    return f"normal-{dtype}"


def write_random_weights(manifest_path: Path, folder: Path, seed: int = 0) -> int:
    """The safetensors files `manifest_path` (a converted gptbc-config.json) lists, with random values of the
    right dtype and shape, each tensor's data 64-byte aligned; returns the bytes written. numpy only."""
    info = json.loads(manifest_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(manifest_path, folder / manifest_path.name)
    files: dict[str, list[dict]] = {}
    largest = 0
    for p in info["params"]:
        largest = max(largest, int(np.prod(p["shape"], dtype=np.int64)) * np.dtype(p["dtype"]).itemsize)
        if "/" in p["file"] or p["file"].startswith("."):
            raise ValueError(f"{manifest_path}: file {p['file']!r} is not a plain name")
        files.setdefault(p["file"], []).append(p)
    pool_bytes = min(POOL_BYTES, (largest + 4095) // 4096 * 4096 or 4096)
    pools, total = random_pools(seed, pool_bytes), 0
    for fname, params in files.items():
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for p in params:
            nbytes = int(np.prod(p["shape"], dtype=np.int64)) * np.dtype(p["dtype"]).itemsize
            header[p["name"]] = {"dtype": SAFETENSORS_DTYPES[p["dtype"]], "shape": p["shape"],
                                 "data_offsets": [offset, offset + nbytes]}
            offset = (offset + nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        text = json.dumps(header).encode()
        text += b" " * (-(8 + len(text)) % ALIGNMENT)  # data starts aligned
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for k, p in enumerate(params):
                start, end = header[p["name"]]["data_offsets"]
                pool = pools[pool_of(p["name"], p["dtype"])]
                at = (k * 4096) % len(pool)
                left = end - start
                while left > 0:
                    piece = pool[at:at + left]
                    f.write(piece.tobytes() if len(piece) < (1 << 20) else memoryview(piece))
                    left -= len(piece)
                    at = 0
                pad = (-end) % ALIGNMENT if k + 1 < len(params) else 0
                f.write(b"\0" * pad)
        total += (folder / fname).stat().st_size
    return total


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32", "int32": "I32",
                      "uint8": "U8", "int8": "I8", "int64": "I64"}


def bench_shape(run: Run, carry: Path, device: str, shape: dict, scratch: Path, copy_bw: float | None) -> dict:
    row: dict = {"name": shape["name"], "weight_bytes": shape["weight_bytes"], "gptbc": [], "hf": None}
    weights_dir = scratch / shape["name"]
    gb = shape["weight_bytes"] / 1e9
    if not run.can(f"{shape['name']}: write random weights", 10 + 2 * gb):
        return row
    t0 = time.monotonic()
    row["written_bytes"] = write_random_weights(carry / shape["manifest"], weights_dir)
    row["write_s"] = round(time.monotonic() - t0, 1)
    run.log(f"{shape['name']}: wrote {row['written_bytes'] / 1e9:.2f} GB of random weights in {row['write_s']}s")
    try:
        for b in shape["bench"]:
            step = f"{shape['name']}: gptbc-run --bench batch {b['batch']}"
            if not run.can(step, 10 + 2 * gb):
                continue
            got = gptbc_run(run, carry, ["--model", str(weights_dir), "--lib", shape["lib"], "--device", device,
                                         "--bench", "--batch", str(b["batch"]), "--prompt-len", str(b["prompt_len"]),
                                         "--max-new-tokens", str(b["max_new_tokens"]), "--warmup", str(b["warmup"]),
                                         "--repeats", str(b["repeats"])], run.left())
            if "error" in got:
                run.fail(f"{step}: {got['error']}")
                row["gptbc"].append({"batch": b["batch"], "error": got["error"]})
                continue
            row["gptbc"].append(with_bandwidth(got["bench"], shape["weight_bytes"], copy_bw))
            run.log(f"{step}: {json.dumps(row['gptbc'][-1])}")
            run.save()
    finally:
        shutil.rmtree(weights_dir, ignore_errors=True)  # the next shape needs the disk
    if shape.get("hf_peer") and run.can(f"{shape['name']}: HF transformers peer", 20 + 3 * gb):
        try:
            row["hf"] = hf_peer(shape, torch_device(device), copy_bw)
            run.log(f"{shape['name']}: HF transformers {json.dumps(row['hf'])}")
        except Exception as err:  # the peer is a reference: its failure is recorded, the run goes on
            row["hf"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            run.fail(f"{shape['name']}: HF peer: {row['hf']['error']}")
    return row


def with_bandwidth(bench: dict, weight_bytes: int, copy_bw: float | None) -> dict:
    """Each decode step reads every weight once, whatever the batch: weight bytes x steps/s is the weight
    traffic it implies (KV cache and activations not counted), shown against the copy bandwidth."""
    implied = weight_bytes * bench["decode_steps_per_s"]
    out = dict(bench, implied_weight_GBps=round(implied / 1e9, 2))
    if copy_bw:
        out["share_of_copy_bandwidth"] = round(implied / (copy_bw * 1e9), 3)
    return out


def hf_peer(shape: dict, dev, copy_bw: float | None) -> dict:
    """HF transformers on the same shape and device: fp16 with SDPA on a GPU (fp32 on a CPU), random weights:
    prefill of the batch-1 prompt length, and greedy decode with the KV cache at each bench batch."""
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    config = GPTBigCodeConfig(**{k: v for k, v in shape["hf_config"].items() if k not in ("architectures",)})
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = GPTBigCodeForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # transformers 5 renames past_key_values to cache (the old name goes in 5.40): whichever this one takes
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def kv_of(result):
        kv = getattr(result, "cache", None)
        return kv if kv is not None else result.past_key_values

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out: dict = {"dtype": str(dtype).replace("torch.", ""), "attention": "sdpa", "weight_bytes": nbytes, "runs": []}
    vocab = config.vocab_size
    with torch.no_grad():
        for b in shape["bench"]:
            ids = (torch.arange(b["prompt_len"], device=dev)[None, :] * 7919 +
                   torch.arange(b["batch"], device=dev)[:, None] * 104729 + 1) % vocab
            steps = b["max_new_tokens"] - 1
            prefill, decode = [], []
            for r in range(b["warmup"] + b["repeats"]):
                sync()
                t0 = time.perf_counter()
                result = model(ids, use_cache=True)
                nxt = result.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                t1 = time.perf_counter()
                past = kv_of(result)
                for _ in range(steps):
                    result = model(nxt, use_cache=True, **{cache_arg: past})
                    past, nxt = kv_of(result), result.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                t2 = time.perf_counter()
                if r >= b["warmup"]:
                    prefill.append(t1 - t0)
                    decode.append(t2 - t1)
                del past, result
            p, d = float(np.median(prefill)), float(np.median(decode))
            run = {"batch": b["batch"], "prompt_tokens": b["prompt_len"], "decode_steps": steps, "prefill_s": prefill,
                   "decode_s": decode, "prefill_tokens_per_s": round(b["batch"] * b["prompt_len"] / p, 2),
                   "decode_tokens_per_s": round(b["batch"] * steps / d, 2), "decode_steps_per_s": round(steps / d, 3)}
            out["runs"].append(with_bandwidth(run, nbytes, copy_bw))
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run_speed(run: Run, carry: Path, plan: dict, device: str, scratch: Path) -> None:
    copy_bw = (run.result.get("device") or {}).get("copy_bandwidth", {}).get("read_plus_write_GBps")
    rows = []
    for shape in plan["shapes"]:
        rows.append(bench_shape(run, carry, device, shape, scratch, copy_bw))
        run.result["steps"]["speed"] = rows
        run.save()


# ---- main ----

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--carry", default=str(Path(__file__).resolve().parent),
                    help="the folder gpu_prepare.py wrote (default: this script's folder)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="where gpu_run.json and gpu_run.log go "
                    "(default: $OUT)")
    ap.add_argument("--budget-s", type=float, default=380, help="stop starting steps so that the run ends "
                    "within this many seconds (default %(default)s)")
    ap.add_argument("--device", help="override the plan's device (cuda, cpu, vulkan)")
    ap.add_argument("--scratch", help="where random weights are written (default: a temporary folder)")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out: device, tiny, hf, batch, speed")
    args = ap.parse_args(argv)
    if not args.out:
        print("error: --out is required (or set OUT)", file=sys.stderr)
        return 1
    carry = Path(args.carry).resolve()
    if not (carry / "plan.json").is_file():
        print(f"error: --carry {carry}: no plan.json (make the folder with scripts/gpu_prepare.py)", file=sys.stderr)
        return 1
    plan = json.loads((carry / "plan.json").read_text())
    device = args.device or plan["device"]
    run = Run(Path(args.out), args.budget_s)
    run.result.update(plan={k: plan[k] for k in ("created", "gptbc_commit", "target", "device", "smallest")},
                      device_used=device)
    run.log(f"gpu_run: {carry} (target {plan['target']}, commit {plan['gptbc_commit'][:12]}), device {device}, "
            f"budget {args.budget_s:.0f}s")
    skip = set(filter(None, args.skip.split(",")))
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="gpu_run."))
    steps = [("device", describe_device), ("tiny", check_tiny), ("hf", check_hf), ("batch", check_batch_invariant),
             ("speed", lambda r, d: run_speed(r, carry, plan, d, scratch))]
    try:
        for name, step in steps:
            if name in skip:
                run.result["skipped"].append({"step": name, "why": "--skip"})
                continue
            try:
                if name == "device":
                    step(run, device, carry / "bin")
                elif name == "speed":
                    step(run, device)
                else:
                    step(run, carry, plan, device)
            except Exception as err:  # one step's crash is recorded; the later steps still run
                run.fail(f"{name}: {type(err).__name__}: {str(err)[:500]}")
            run.save()
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        run.result["ok"] = not run.result["failures"]
        run.save()
        run.log(f"done in {run.elapsed():.0f}s: {'ok' if run.result['ok'] else 'FAILURES: ' + '; '.join(run.result['failures'])}")
    return 0 if run.result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
