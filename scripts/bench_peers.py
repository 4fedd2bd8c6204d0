#!/usr/bin/env python3
"""Side-by-side CPU benchmark on one seeded random santacoder-shaped checkpoint.

    pip install -e ".[test]"                         # gptbc and transformers (hf:fp32)
    pip install -r scripts/requirements-peers.txt    # optional: llama.cpp and CTranslate2 peers
    python scripts/bench_peers.py --work /tmp/gptbc-peers            # every peer that is installed
    python scripts/bench_peers.py --work /tmp/gptbc-peers --peers gptbc:q4f32_1,llamacpp:q4_0 --threads 2

Peers: gptbc (q0f32, q8f32_1, q4f32_1 and their `-float` builds by default; q8f16_1, q4f16_1 on request), llama.cpp
through llama-cpp-python (llamacpp: f32, q8_0, q4_0),
CTranslate2 (ct2: float32, int8) and transformers on torch CPU (hf: fp32). With the default --peers, a
peer whose optional package is missing is shown as skipped; a peer named in --peers must run.

One HF checkpoint is built (seeded random weights) and converted for each peer: gptbc's converter; for
llama.cpp the `convert_hf_to_gguf.py` that ships inside the llama-cpp-python source distribution (the
sdist is fetched with `pip download` into --work unless --llama-sdist names one), then q8_0/q4_0 with
llama.cpp's own quantizer; for CTranslate2 its transformers converter (float32 and int8 on disk).
Both converters need a tokenizer: the real StarCoder BPE is rebuilt from the sdist's vocab-only
`models/ggml-vocab-starcoder.gguf` (convert_hf_to_gguf.py recognises the pre-tokenizer by hashing a
tokenization, so a made-up tokenizer will not do).

Workload (the same for every peer, greedy, random prompt ids): prefill of a 512-token prompt; decode of
63 single-token steps after a 32-token prompt; best of 3. Each peer is converted in one process and
measured in another with the same thread count, so RSS and threads are its own. The read bandwidth of
this machine is measured in the same run, and each decode rate is compared with the limit it implies:
bandwidth / bytes of weights read per token (the converted files' sizes). "x llama.cpp" compares with
llama.cpp at the same bits: f32 for gptbc q0f32, ct2 float32, hf fp32; q8_0 for gptbc q8*, ct2 int8;
q4_0 for gptbc q4*. "first greedy tokens" is how many of the 8 first greedy tokens of the decode prompt
match hf:fp32 (or the first full-precision peer that ran) before one differs; quantized peers may differ
early: the weights are random, so the logits are close together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PREFILL, PROMPT, STEPS, REPEAT = 512, 32, 63, 3
GREEDY = 8  # greedy tokens compared across peers
SHAPES = {
    "santacoder": dict(n_embd=2048, n_layer=24, n_head=16, n_inner=8192, n_positions=2048, vocab_size=49280,
                       multi_query=True, activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-5,
                       bos_token_id=49152, eos_token_id=49152),
    # a few seconds end to end: for checking the script itself (tests/test_bench.py). The vocabulary is
    # santacoder's because the llama.cpp and CTranslate2 converters need the real StarCoder tokenizer.
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=49280, multi_query=True,
                 bos_token_id=0, eos_token_id=0),
}
VOCAB = SHAPES["santacoder"]["vocab_size"]
THREADS = 2

# gptbc:SCHEME is compiled with --activations auto (int8 activations where the CPU has VNNI); SCHEME-float
# with float activations (the kernels before issue 14), from the same converted weights.
DEFAULT_PEERS = ("gptbc:q0f32,gptbc:q8f32_1,gptbc:q4f32_1,gptbc:q8f32_1-float,gptbc:q4f32_1-float,"
                 "llamacpp:f32,llamacpp:q8_0,llamacpp:q4_0,"
                 "ct2:float32,ct2:int8,hf:fp32")
# peer -> (module, pip name) for the peers that are not installed with gptbc's test extra
OPTIONAL = {"llamacpp": ("llama_cpp", "llama-cpp-python"), "ct2": ("ctranslate2", "ctranslate2")}
INSTALL = "pip install -r scripts/requirements-peers.txt"
SAME_BITS = {"gptbc:q0f32": "f32", "gptbc:q8f32_1": "q8_0", "gptbc:q4f32_1": "q4_0", "gptbc:q8f32_1-float": "q8_0",
             "gptbc:q4f32_1-float": "q4_0", "gptbc:q8f16_1": "q8_0", "gptbc:q4f16_1": "q4_0", "hf:fp32": "f32",
             "ct2:float32": "f32", "ct2:int8": "q8_0", "llamacpp:f32": "f32", "llamacpp:q8_0": "q8_0",
             "llamacpp:q4_0": "q4_0"}
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose convert_hf_to_gguf.py is used (the installed version wins)
# what is needed from the sdist's vendor/llama.cpp: the converter, its packages, and the StarCoder vocab
LLAMA_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-starcoder.gguf")


def ids(n: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def make_checkpoint(path: Path, shape: str) -> None:
    if (path / "model.safetensors").is_file():
        return
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(0)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**SHAPES[shape])).eval()
    model.save_pretrained(path, safe_serialization=True)


def llama_source(work: Path, sdist: Path | None) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, extracted into work/llama.cpp (only LLAMA_FILES)."""
    root = work / "llama.cpp"
    if (root / LLAMA_FILES[-1]).is_file():
        return root
    if sdist is None:
        from importlib.metadata import PackageNotFoundError, version

        try:  # the converter should match the llama.cpp that runs the GGUF
            want = version("llama_cpp_python")
        except PackageNotFoundError:
            want = LLAMA_CPP_PYTHON
        sdist = work / f"llama_cpp_python-{want}.tar.gz"
        if not sdist.is_file():
            print(f"downloading the llama-cpp-python {want} sdist (for convert_hf_to_gguf.py and its vocab)", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={want}", "-d", str(work)], check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            top, _, rest = m.name.partition("/vendor/llama.cpp/")
            if rest and "/" not in top and any(rest == f or rest.startswith(f) for f in LLAMA_FILES):
                m.name = rest
                members.append(m)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, members=members, **extra)
    return root


def add_tokenizer(hf: Path, llama: Path) -> None:
    """Save the StarCoder byte-level BPE next to the checkpoint, rebuilt from llama.cpp's vocab GGUF."""
    if (hf / "tokenizer.json").is_file():
        return
    sys.path.insert(0, str(llama / "gguf-py"))
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(llama / "models" / "ggml-vocab-starcoder.gguf").fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    kinds = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    eos = tokens[int(fields["tokenizer.ggml.eos_token_id"].contents())]
    # the model's vocabulary is 49280 (rounded up for speed) > the 49152 tokens: the converters pad it
    assert len(tokens) <= json.loads((hf / "config.json").read_text())["vocab_size"]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # StarCoder splits digits one by one, then applies GPT-2's byte-level regex
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp's token type for special tokens
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == control])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos, unk_token=eos).save_pretrained(hf)


def best(times: list[float], tokens: int) -> float:
    return tokens / min(times)


def measure(prefill, start, step) -> dict:
    """The workload, given three callables of one peer.

    prefill(ids): run the prompt (state is reset by the peer); start(ids) -> first greedy token of a fresh
    sequence; step(token) -> next greedy token. Returns tok/s and the first GREEDY tokens of repeat 0.
    """
    pre, dec, greedy = [], [], []
    for r in range(REPEAT):
        t = time.perf_counter()
        prefill(ids(PREFILL, r))
        pre.append(time.perf_counter() - t)
        tokens = [start(ids(PROMPT, 100 + r))]
        t = time.perf_counter()
        for _ in range(STEPS):
            tokens.append(step(tokens[-1]))
        dec.append(time.perf_counter() - t)
        greedy = greedy or tokens[:GREEDY]
    return {"prefill": best(pre, PREFILL), "decode": best(dec, STEPS), "greedy": greedy}


def prepare_gptbc(work: Path, precision: str) -> dict:
    from gptbc.compile.compiler import compile_model
    from gptbc.artifact.config import resolve_model
    from gptbc.artifact.convert import convert_weight

    scheme, _, activations = precision.partition("-")
    out = work / f"gptbc-{scheme}"
    if not (out / "gptbc-config.json").is_file():
        convert_weight(work / "hf", scheme, out, progress=False)
    t = time.perf_counter()
    compile_model(resolve_model(str(out)), "cpu", scheme, work / f"gptbc-{precision}.so", log=lambda _m: None,
                  activations=activations or "auto")
    return {"compile_s": time.perf_counter() - t}


def worker_gptbc(work: Path, precision: str) -> dict:
    from gptbc.bench import weight_bytes
    from gptbc.runtime.engine import Engine

    out = work / f"gptbc-{precision.partition('-')[0]}"
    engine = Engine(out, work / f"gptbc-{precision}.so", max_total_seq_len=PREFILL + 128, max_batch_size=1,
                    prefix_cache_size=0)
    seq = None

    def prefill(prompt):
        s = engine.runner.add_sequence()
        engine.runner.prefill(s, prompt)
        engine.runner.remove_sequence(s)

    def start(prompt):
        nonlocal seq
        if seq is not None:
            engine.runner.remove_sequence(seq)
        seq = engine.runner.add_sequence()
        return int(engine.runner.prefill(seq, prompt).argmax())

    result = measure(prefill, start, lambda token: int(engine.runner.decode(seq, token).argmax()))
    return {**result, "weight_bytes": weight_bytes(out)}


def prepare_llamacpp(work: Path, ftype: str) -> dict:
    """GGUF f32 with the sdist's convert_hf_to_gguf.py; q8_0/q4_0 from it with llama.cpp's quantizer."""
    f32 = work / "llamacpp-f32.gguf"
    if not f32.is_file():
        tmp = f32.with_suffix(".part")
        subprocess.run([sys.executable, str(work / "llama.cpp" / "convert_hf_to_gguf.py"), str(work / "hf"),
                        "--outtype", "f32", "--outfile", str(tmp)], check=True)
        tmp.rename(f32)
    out = work / f"llamacpp-{ftype}.gguf"
    if out.is_file():
        return {}
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[ftype]
    params.nthread = THREADS
    tmp = out.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype} failed")
    tmp.rename(out)
    return {}


def worker_llamacpp(work: Path, ftype: str) -> dict:
    import llama_cpp
    import numpy as np

    path = work / f"llamacpp-{ftype}.gguf"
    # one ubatch holds the whole 512-token prefill, as the other peers run it in one call
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=PREFILL + 128, n_batch=PREFILL, n_ubatch=PREFILL,
                          n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    n_vocab = llm.n_vocab()

    def argmax() -> int:
        # Llama.scores is only filled with logits_all=True, so read the last row from the context
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

    def prefill(prompt):
        llm.reset()
        llm.eval(prompt)

    def start(prompt):
        prefill(prompt)
        return argmax()

    def step(token):
        llm.eval([token])
        return argmax()

    return {**measure(prefill, start, step), "weight_bytes": path.stat().st_size}


def prepare_ct2(work: Path, kind: str) -> dict:
    out = work / f"ct2-{kind}"
    if not (out / "model.bin").is_file():
        from ctranslate2.converters import TransformersConverter

        # int8 is converted on disk rather than quantized at load: the file is what is read per token
        TransformersConverter(str(work / "hf"), low_cpu_mem_usage=True).convert(str(out), quantization=kind, force=True)
    return {}


def worker_ct2(work: Path, kind: str) -> dict:
    import ctranslate2

    path = work / f"ct2-{kind}"
    vocab = json.loads((path / "vocabulary.json").read_text())
    gen = ctranslate2.Generator(str(path), device="cpu", compute_type=kind, intra_threads=THREADS, inter_threads=1)
    stream = None

    def prefill(prompt):
        # one new token: the prompt pass and the first greedy pick, like the others' last-position logits
        gen.generate_batch([[vocab[i] for i in prompt]], max_length=1, sampling_topk=1,
                           include_prompt_in_result=False)

    def start(prompt):
        # CTranslate2 owns the decode loop: a generator yields one greedy token per step
        nonlocal stream
        stream = gen.generate_tokens([vocab[i] for i in prompt], max_length=STEPS + 1, min_length=STEPS + 1,
                                     sampling_topk=1)
        return next(stream).token_id

    return {**measure(prefill, start, lambda _token: next(stream).token_id),
            "weight_bytes": (path / "model.bin").stat().st_size}


def worker_hf(work: Path, _precision: str) -> dict:
    import torch
    from transformers import GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    past = None

    def prefill(prompt):
        model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)

    def run(tokens) -> int:
        nonlocal past
        out = model(torch.tensor([tokens]), past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def start(prompt):
        nonlocal past
        past = None
        return run(prompt)

    with torch.inference_mode():
        result = measure(prefill, start, lambda token: run([token]))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {**result, "weight_bytes": nbytes}


WORKERS = {"gptbc": worker_gptbc, "hf": worker_hf, "llamacpp": worker_llamacpp, "ct2": worker_ct2}
PREPARE = {"gptbc": prepare_gptbc, "llamacpp": prepare_llamacpp, "ct2": prepare_ct2}


def peak_rss_gb() -> float:
    """Peak RSS of this process since exec.

    Not ru_maxrss: Linux carries it over fork and exec, so a worker would report at least the RSS of
    the parent that built the checkpoint. VmHWM belongs to the process's own address space.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    peer, precision = args.worker.split(":")
    if args.prepare:
        result = PREPARE[peer](Path(args.work), precision)
    else:
        result = WORKERS[peer](Path(args.work), precision)
        result["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result), flush=True)


def not_installed(peer: str) -> str | None:
    """Why the optional package of `peer` can't be used, or None."""
    if peer not in OPTIONAL:
        return None
    module, pip_name = OPTIONAL[peer]
    try:
        __import__(module)
    except ImportError as e:
        return f"{pip_name} is not installed ({e}); {INSTALL}"
    return None


def subprocess_result(cmd: list[str], env: dict) -> tuple[dict | None, str]:
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    if run.returncode or not line:
        return None, (run.stdout[-1500:] + run.stderr[-3000:])
    return json.loads(line[-1][7:]), ""


def check_peers(names: list[str]) -> None:
    for name in names:
        if name not in SAME_BITS:
            raise SystemExit(f"unknown peer {name!r} (known: {', '.join(SAME_BITS)})")


def reference_peer(rows: dict) -> str | None:
    """The peer whose greedy tokens the others are compared with: hf fp32, else a full-precision one."""
    for name in ("hf:fp32", "gptbc:q0f32", "llamacpp:f32", "ct2:float32"):
        if name in rows:
            return name
    return None


def ratio(rows: dict, name: str, key: str) -> str:
    """`key` of `name` over the same of llama.cpp at the same bits."""
    base = "llamacpp:" + SAME_BITS[name]
    return f"{rows[name][key] / rows[base][key]:.2f}x" if base in rows and base != name else "-"


def same_prefix(want: list[int], got: list[int]) -> str:
    n = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return f"{n}/{len(want)}"


def print_table(names: list[str], rows: dict, skipped: dict, failed: dict, bw: float) -> None:
    ref = reference_peer(rows)
    print(f"\n| peer | weights GB | prefill tok/s | decode tok/s | % of bandwidth limit | peak RSS GB "
          f"| prefill x llama.cpp | decode x llama.cpp | first greedy tokens = {ref or '-'} |\n"
          + "|---" * 9 + "|")
    for name in names:
        r = rows.get(name)
        if r is None:
            why = f"skipped: {skipped[name]}" if name in skipped else f"failed: {failed[name]}"
            print(f"| {name} | {why} |" + " |" * 7)
            continue
        limit = bw * 1e9 / r["weight_bytes"]
        print(f"| {name} | {r['weight_bytes'] / 1e9:.3f} | {r['prefill']:.1f} | {r['decode']:.2f} | "
              f"{100 * r['decode'] / limit:.0f}% of {limit:.1f} | {r['peak_rss_gb']:.2f} | "
              f"{ratio(rows, name, 'prefill')} | {ratio(rows, name, 'decode')} | "
              f"{same_prefix(rows[ref]['greedy'], r['greedy']) if ref else '-'} |")


def main() -> int:
    global REPEAT, VOCAB, THREADS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the checkpoint and converted files")
    ap.add_argument("--peers", help=f"comma-separated peer:precision list (default: {DEFAULT_PEERS}, "
                                    "skipping peers whose optional package is missing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=REPEAT, help="runs per measurement; the best is reported")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="santacoder")
    ap.add_argument("--llama-sdist", type=Path, help="llama-cpp-python sdist (.tar.gz) to take "
                                                     "convert_hf_to_gguf.py from (default: pip download it)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    REPEAT, VOCAB, THREADS = args.repeat, SHAPES[args.shape]["vocab_size"], args.threads
    if args.worker:
        run_worker(args)
        return 0
    names = (args.peers or DEFAULT_PEERS).split(",")
    check_peers(names)
    skipped, failed = {}, {}  # peer -> why
    for name in names:
        why = not_installed(name.split(":")[0])
        if why and args.peers is None:  # only the default list may leave out what isn't installed
            print(f"{name}: skipped: {why}", flush=True)
            skipped[name] = why.split(" (")[0]
        elif why:
            print(f"{name}: failed: {why}", file=sys.stderr, flush=True)
            failed[name] = why.split(" (")[0]
    todo = [n for n in names if n not in skipped and n not in failed]

    args.work.mkdir(parents=True, exist_ok=True)
    make_checkpoint(args.work / "hf", args.shape)
    converted = [n for n in todo if n.split(":")[0] in OPTIONAL]
    try:
        if converted:
            add_tokenizer(args.work / "hf", llama_source(args.work, args.llama_sdist))
    except Exception as e:  # no sdist (offline?): the other peers can still run
        print(f"{', '.join(converted)}: failed: no tokenizer / convert_hf_to_gguf.py from the llama-cpp-python "
              f"sdist: {e!r}", file=sys.stderr, flush=True)
        failed.update(dict.fromkeys(converted, "no llama-cpp-python sdist"))
        todo = [n for n in todo if n not in converted]
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    # gptbc.bench.read_bandwidth: a compiled streaming kernel on TVM's pool of TVM_NUM_THREADS threads (numpy's
    # reduction is compute-bound on Zen 5 and undercounts), in its own process like the peers
    bw = float(subprocess.run([sys.executable, "-c", "from gptbc.bench import read_bandwidth; print(read_bandwidth())"],
                              env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
    print(f"read bandwidth ({args.threads} threads): {bw:.1f} GB/s", flush=True)
    rows = {}
    base = [sys.executable, __file__, "--work", str(args.work), "--threads", str(args.threads),
            "--repeat", str(args.repeat), "--shape", args.shape]
    for name in todo:
        # converting in its own process keeps the converter's memory out of the peer's peak RSS
        t = time.perf_counter()
        prep, err = ({}, "") if name.split(":")[0] not in PREPARE else subprocess_result(
            base + ["--worker", name, "--prepare"], env)
        prep_s = time.perf_counter() - t
        r, err = (None, err) if prep is None else subprocess_result(base + ["--worker", name], env)
        if r is None:
            print(f"{name}: failed\n{err}", file=sys.stderr, flush=True)
            failed[name] = "see stderr"
            continue
        rows[name] = r = {**prep, **r}
        limit = bw * 1e9 / r["weight_bytes"]
        print(f"{name:<16} prefill {r['prefill']:7.1f} tok/s   decode {r['decode']:6.2f} tok/s "
              f"({100 * r['decode'] / limit:4.0f}% of the {limit:5.1f} tok/s bandwidth limit)   "
              f"peak RSS {r['peak_rss_gb']:.2f} GB   prepared in {prep_s:.0f}s"
              + (f" (compile {r['compile_s']:.0f}s)" if "compile_s" in r else ""), flush=True)
    print_table(names, rows, skipped, failed, bw)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
