"""`gptbc` command line: compile, convert-weight, generate, bundle, targets.

Every user error ends as one line `error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from gptbc import __version__
from gptbc.errors import GptbcError, interrupt_requested


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {value}")
        return value

    return parse


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise GptbcError(f"--prompt-ids {text!r}: expected comma-separated integers like 1,2,3") from None


def cmd_compile(args: argparse.Namespace) -> int:
    from gptbc.compile.compiler import compile_model
    from gptbc.artifact.config import resolve_model

    source = resolve_model(args.model, context_window_size=args.context_window_size,
                           prefill_chunk_size=args.prefill_chunk_size, max_batch_size=args.max_batch_size)
    quantization, keep_head = args.quantization, args.no_quantize_lm_head
    if quantization is None:  # a converted directory compiles for its own scheme; anything else for q0f32
        from gptbc.artifact.config import GPTBC_CONFIG, load_gptbc_config

        converted = source.directory is not None and (source.directory / GPTBC_CONFIG).is_file()
        scheme = load_gptbc_config(source.directory)["quantization"] if converted else {"name": "q0f32"}
        quantization = scheme["name"]
        keep_head = keep_head or not scheme.get("quantize_lm_head", True)
    out = compile_model(source, args.target, quantization, args.output,
                        log=lambda m: print(m, file=sys.stderr, flush=True), quantize_lm_head=not keep_head,
                        activations=args.activations, batch_invariant=args.batch_invariant,
                        tensor_parallel=args.tensor_parallel)
    _print_memory_plan(source.config, quantization, keep_head, args.tensor_parallel, source)
    print(out)
    return 0


def _print_memory_plan(cfg, quantization: str, keep_head: bool, tp: int = 1, source=None) -> None:
    from gptbc.artifact.memory_plan import compile_report
    from gptbc.artifact.quantization import get_quantization

    quant = get_quantization(quantization, not keep_head)
    if source is not None:  # a per-tensor scheme's sizes are its converted weights' widths
        from gptbc.compile.compiler import own_widths

        quant = own_widths(source, quant)
    for line in compile_report(cfg, quant, tp):
        print(f"[gptbc] memory plan: {line}", file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> int:
    from gptbc.artifact.memory_plan import models_table

    print(models_table(as_json=args.json))
    return 0


def cmd_convert_weight(args: argparse.Namespace) -> int:
    from gptbc.artifact.convert import convert_weight

    out = convert_weight(args.hf_dir, args.quantization, args.output, progress=not args.quiet,
                         quantize_lm_head=not args.no_quantize_lm_head, tensor_parallel=args.tensor_parallel,
                         allow_non_finite=args.allow_non_finite)
    print(out)
    return 0


def use_threads(args: argparse.Namespace) -> None:
    """--threads: TVM's CPU worker count, read when its thread pool starts (the first parallel kernel)."""

    if getattr(args, "threads", None):
        os.environ["TVM_NUM_THREADS"] = str(args.threads)


def prompt_lookup(args: argparse.Namespace):
    """--prompt-lookup [N]: speculative decoding with drafts of up to N tokens copied from the text so far."""
    if not getattr(args, "prompt_lookup", None):
        return None
    from gptbc.runtime.speculation import PromptLookup

    return PromptLookup(num_draft=args.prompt_lookup)


def prepared_draft(args: argparse.Namespace, model) -> tuple[Path, Path] | None:
    """--draft MODEL: its weights and library, made the way MODEL's are (prepare.py; cached), for the device the
    target runs on; a preset name gets random weights when the target has them."""
    if not getattr(args, "draft", None):
        return None
    from gptbc.artifact.config import preset_names
    from gptbc.prepare import prepare

    random_weights = args.random_weights and args.draft in preset_names() and not Path(args.draft).exists()
    try:
        draft = prepare(args.draft, lib=args.draft_lib, quantization=args.draft_quantization, device=model.device,
                        random_weights=random_weights, activations=args.activations,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    except GptbcError as err:
        raise GptbcError(f"--draft: {err}") from None
    return draft.model_dir, draft.lib


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from gptbc.errors import ContextWindowError
    from gptbc.runtime.engine import Completion, Engine

    use_threads(args)
    model = prepared(args)
    engine = Engine(model.model_dir, model.lib, device=model.device, speculation=prompt_lookup(args),
                    tensor_parallel=args.tensor_parallel, draft=prepared_draft(args, model), max_draft=args.draft_max,
                    min_draft=args.draft_min)
    sampling = {k: getattr(args, k) for k in (
        "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty", "seed")}
    params = engine.sampling(**sampling, stop=args.stop or None, logprobs=args.json,
                             truncate_prompt=args.truncate_prompt or None)
    prompt = parse_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
    fim = args.prefix is not None or args.suffix is not None
    from gptbc.artifact.config import preset_fim_orders
    from gptbc.runtime.engine import resolve_fim_order

    order = resolve_fim_order(args.fim_order, preset_fim_orders(args.model))
    try:
        req = engine.submit(None if fim else prompt, prefix=args.prefix, suffix=args.suffix, params=params,
                            fim_order=order)
    except ContextWindowError as err:
        raise GptbcError(err.render("--max-new-tokens", "--truncate-prompt")) from None
    stream = not args.json and engine.tokenizer is not None
    start = time.perf_counter()
    first = None  # when the first new token arrived: the prompt's prefill ends there
    while req.finish_reason is None:
        for event in engine.step():
            if event.request is req and event.token is not None and first is None:
                first = time.perf_counter()
            if stream and event.request is req and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    end = time.perf_counter()
    done = Completion.of(req)
    timings = generation_timings(done, start, first or end, end)
    if args.json:
        print(json.dumps({**done.to_dict(), "timings": timings}))
    else:
        print("\n" if stream else ",".join(map(str, done.token_ids)), end="" if stream else "\n")
        print(f"[gptbc] prompt {timings['prompt_tokens']} tokens ({timings['reused_prefix_tokens']} reused) in "
              f"{timings['prefill_s'] * 1e3:.0f} ms, {timings['generated_tokens']} new tokens at "
              f"{timings['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return 0


def generation_timings(done, start: float, first: float, end: float) -> dict:
    """Prefill = up to the first new token (time to first token); decode = the tokens after it."""
    decoded = max(len(done.token_ids) - 1, 0)
    prefill_s, decode_s = first - start, end - first
    return {"prompt_tokens": done.prompt_tokens, "reused_prefix_tokens": done.reused_prefix_tokens,
            "generated_tokens": len(done.token_ids), "prefill_s": prefill_s,
            "prefill_tokens_per_s": (done.prompt_tokens - done.reused_prefix_tokens) / prefill_s if prefill_s else 0.0,
            "decode_s": decode_s, "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else 0.0}


def cmd_targets(_args: argparse.Namespace) -> int:
    from gptbc.compile.targets import TARGETS
    from gptbc.runtime.devices import runs_here

    print(f"{'target':<16} {'output':<7} {'build here':<11} {'run here':<9} description")
    for t in TARGETS:
        names = ", ".join((t.name, *t.aliases))
        why = t.unavailable()
        output = t.plan(None).suffix if why is None else "-"
        print(f"{names:<16} {output:<7} {'yes' if why is None else 'no':<11} {'yes' if runs_here(t.device, t.arch) else 'no':<9} "
              f"{t.description}; needs {t.toolchain}" + (f" [{why}]" if why else ""))
    print_x86_cpus()
    print_arm_cpus()
    print_vulkan_adapters()
    return 0


def print_x86_cpus() -> None:
    """Which int8-activation kernel each named x86 CPU of `--target cpu:MCPU` gets, and this machine's."""
    from tvm.target import codegen

    from gptbc.compile.targets import X86_CPUS, x86_cpu_features, x86_int8_kernel

    here = str(codegen.llvm_get_system_cpu())
    print("\nx86-64 CPUs (`--target cpu:MCPU`; features as LLVM enables them; the int8-activation kernel they get):")
    for cpu, what in X86_CPUS.items():
        mark = "  <- this machine" if cpu == here else ""
        print(f"  cpu:{cpu:<16} {'+'.join(x86_cpu_features(cpu)):<32} int8:{x86_int8_kernel(cpu):<26} {what}{mark}")
    if here not in X86_CPUS and codegen.llvm_get_system_triple().startswith("x86_64"):
        print(f"  cpu:{here:<16} {'+'.join(x86_cpu_features(here)):<32} int8:{x86_int8_kernel(here):<26} "
              "this machine")


def print_arm_cpus() -> None:
    """What each named Arm CPU of `--target aarch64-linux:CPU` turns on (LLVM decides, from -mcpu), and so which
    int8-activation kernel it gets."""
    from gptbc.compile.targets import ARM_CPUS, arm_cpu_features, arm_int8_kernel

    print("\naarch64-linux CPUs (features as LLVM enables them for -mcpu; the int8-activation kernel they get):")
    for cpu, board in [("generic", "the default: any 64-bit Arm board"), *ARM_CPUS.items()]:
        print(f"  aarch64-linux:{cpu:<13} {'+'.join(arm_cpu_features(cpu)):<22} int8:{arm_int8_kernel(cpu):<8} {board}")


def print_vulkan_adapters() -> None:
    """Which way --target vulkan goes here, and the adapters `--device vulkan[:N]` chooses from."""
    from gptbc.compile.targets import vulkan_codegen, vulkan_path

    print(f"\nvulkan path: {vulkan_path()}")
    if vulkan_codegen():
        return
    from gptbc.runtime import webgpu

    try:
        found = webgpu.adapters()
    except GptbcError as err:
        print(f"vulkan adapters: unknown ({err})")
        return
    if not found:
        print(f"vulkan adapters: none ({webgpu.NO_ADAPTER})")
    for a in found:
        print(f"vulkan:{a['index']}  {a['name']} [{a['type']}, {a['backend']}] shader-f16 "
              f"{'yes' if a['shader_f16'] else 'no'}, max storage binding {a['max_storage_buffer_binding_size']} B, "
              f"max buffer {a['max_buffer_size']} B" + ("  (default for --device vulkan)" if a['index'] == 0 else ""))


def cmd_bundle(args: argparse.Namespace) -> int:
    from gptbc.bundle import make_bundle

    model = prepared(args)
    out, size = make_bundle(model.model_dir, model.lib, args.output, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{out} ({size / 1e6:.1f} MB): run {out / 'gptbc-run'} --prompt TEXT there; see {out / 'README.txt'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from gptbc.bench import run_bench

    use_threads(args)
    batches = tuple(int(b) for b in args.batch.split(",") if b) if args.batch else ()
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    model = prepared(args)
    result = run_bench(model.model_dir, model.lib, prefill=args.prefill_tokens, prompt=args.prompt_tokens,
                       decode=args.decode, prompt_lookup=prompt_lookup(args),
                       batches=batches, repeat=args.repeat, device=model.device, log=log,
                       tensor_parallel=args.tensor_parallel, draft=prepared_draft(args, model),
                       max_draft=args.draft_max, min_draft=args.draft_min)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import tempfile

    from gptbc import check

    use_threads(args)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    runner = Path(args.runner) if args.runner else None
    if args.model is not None:
        for flag, value in (("--tensor-parallel", args.tensor_parallel > 1), ("--bench", args.bench)):
            if value:
                raise GptbcError(f"{flag}: checks a target on random models; with MODEL leave it out "
                                 f"(`gptbc bench MODEL` times a model)")
        if args.quantization and "," in args.quantization:
            raise GptbcError(f"--quantization {args.quantization}: MODEL is checked in one scheme")
        check.check_run_options(args.tokens, runner)
        model = prepared(args)
        result = check.check_model(model.name, model.model_dir, model.lib, model.device, args.tokens, runner, log)
    else:
        for flag, value in (("--lib", args.lib), ("--random-weights", args.random_weights)):
            if value:
                raise GptbcError(f"{flag}: only with MODEL")
        target = args.target or "cpu"
        device = args.device or check.plan_build(target)[0].device
        schemes = [s for s in (args.quantization or ",".join(check.DEFAULT_SCHEMES)).split(",") if s]
        with tempfile.TemporaryDirectory(prefix="gptbc-check-") as tmp:
            result = check.run_check(target, device, schemes, args.tokens, Path(tmp), runner=runner,
                                     bench=args.bench, log=log, tensor_parallel=args.tensor_parallel)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def prepared(args: argparse.Namespace):
    """MODEL (with --lib, --quantization, --target, --device, --random-weights) → weights, library and device,
    converted and compiled into the artifact cache on first use (prepare.py)."""
    from gptbc.prepare import prepare

    return prepare(args.model, lib=args.lib, quantization=args.quantization, target=getattr(args, "target", None),
                   device=getattr(args, "device", None), random_weights=args.random_weights,
                   tensor_parallel=getattr(args, "tensor_parallel", 1), activations=args.activations,
                   batch_invariant=getattr(args, "batch_invariant", False),
                   allow_non_finite=args.allow_non_finite, log=lambda m: print(m, file=sys.stderr, flush=True))


def cmd_cache(args: argparse.Namespace) -> int:
    from gptbc.artifact import cache

    if args.action == "clear":
        gone = [e for e in cache.entries() if cache.remove(e)]
        cache.remove_stale_builds()
        print(f"removed {len(gone)} entries ({sum(e.size for e in gone) / 1e6:.1f} MB) from {cache.cache_root()}")
        return 0
    if args.action == "prune":
        gone = cache.prune(args.older_than, int(args.max_size * 1e9) if args.max_size is not None else None)
        for e in gone:
            print(f"removed {e.kind}/{e.key[:12]} {e.info.get('describe', '(damaged)')} ({e.size / 1e6:.1f} MB)")
        print(f"removed {len(gone)} entries ({sum(e.size for e in gone) / 1e6:.1f} MB)")
        return 0
    found = cache.entries()
    print(f"{cache.cache_root()}: {len(found)} entries, {sum(e.size for e in found) / 1e6:.1f} MB")
    print(f"{'kind':<10} {'key':<12} {'size MB':>9}  {'built':<16}  {'last used':<16}  what")
    for e in sorted(found, key=lambda e: -e.last_used):
        damaged = cache.damage(e.path)
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"{e.kind:<10} {e.key[:12]:<12} {e.size / 1e6:>9.1f}  {e.built:<16}  {used:<16}  "
              f"{e.info.get('describe', '')}" + (f"  [damaged: {damaged}]" if damaged else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gptbc.runtime.engine import Engine
    from gptbc.serve.app import serve

    use_threads(args)
    api_key = args.api_key or os.environ.get("GPTBC_API_KEY") or None
    model = prepared(args)
    engine = Engine(model.model_dir, model.lib, device=model.device, max_batch_size=args.max_batch,
                    max_total_seq_len=args.max_total_seq_len, speculation=prompt_lookup(args),
                    batch_invariant=args.batch_invariant, tensor_parallel=args.tensor_parallel,
                    draft=prepared_draft(args, model), max_draft=args.draft_max, min_draft=args.draft_min,
                    prefill_budget=args.prefill_budget)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)

    def ready(url: str) -> None:
        print(f"gptbc serve: {model.name} on {url} (OpenAI API at {url}/v1)", flush=True)

    from gptbc.artifact.config import preset_fim_orders

    serve(engine, host=args.host, port=args.port, model_name=args.model_name or model.name, api_key=api_key,
          max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, on_ready=ready, fim_order=args.fim_order,
          trained_fim_orders=preset_fim_orders(args.model))
    return 0


FIM_ORDER_HELP = ("fill-in-the-middle order: psm, or spm (BigCode's SPM variant 2, where typing only appends to the "
                  "cached prompt; not llama.cpp's --spm-infill order); auto: spm where the model's preset says it "
                  "was trained with it, else psm")
TP_HELP = ("run the model on N tensor-parallel workers (TVM disco; a library compiled and weights converted with "
           "--tensor-parallel N); on the CPU the threads are split between them")
BATCH_INVARIANT_HELP = ("the same request gives the same answer, bit for bit, under any load (a library compiled "
                        "with --batch-invariant; prefixes copied, not shared; docs/determinism.md)")
KEEP_HEAD_HELP = "keep lm_head (and a tied wte) in the activation dtype under a grouped int scheme"
LIB_HELP = "the model library made by `gptbc compile` for these weights (default: compiled for MODEL and --target, cached)"
DEVICE_HELP = ("where to run: cpu, cuda[:N], metal, vulkan[:N] (must match the library's target; default: --lib's "
               "device, else --target's, else a CUDA GPU if TVM sees one, else the CPU)")
MODEL_HELP = ("a converted weights directory, a Hugging Face directory, a Hub id (owner/name[@revision]), a GGUF file, "
              "or a preset name with --random-weights; what is missing is converted and compiled on first use and "
              "kept in the artifact cache (`gptbc cache`)")
PROMPT_LOOKUP_HELP = ("speculative decoding: draft up to N tokens (8 if N is left out) by copying what followed the "
                      "latest n-gram match in the text so far, verify them in one call; same output, faster when the "
                      "text repeats the prompt (code editing)")
ALLOW_NON_FINITE_HELP = "convert weights holding NaN or infinite values (refused by default, naming the tensor)"
THREADS_HELP = "CPU worker threads (default: one per physical core; TVM_NUM_THREADS also sets it)"


def draft_args(p: argparse.ArgumentParser) -> None:
    """--draft MODEL and how its weights and library are made (generate, bench, serve)."""
    p.add_argument("--draft", metavar="MODEL",
                   help="speculative decoding with a smaller draft model of the same tokenizer (e.g. "
                        "tiny_starcoder_py for StarCoder): anything MODEL accepts; it drafts up to --draft-max "
                        "tokens for every running request a step, verified in one call (same greedy output, "
                        "the target's distribution when sampling)")
    p.add_argument("--draft-lib", help="the draft's library (default: compiled for it, cached)")
    p.add_argument("--draft-quantization", help="the draft's weight scheme where it is converted (default: as for MODEL)")
    p.add_argument("--draft-max", type=_positive_int("--draft-max"), default=8, metavar="N",
                   help="most tokens drafted a step (each request's k is chosen from measured costs and its "
                        "acceptance)")
    p.add_argument("--draft-min", type=_positive_int("--draft-min"), default=1, metavar="N",
                   help="fewest tokens drafted a step (--draft-min = --draft-max fixes k)")


def quantization_help(default: str) -> str:
    from gptbc.artifact.quantization import QUANTIZATIONS

    return f"weight scheme, one of {', '.join(QUANTIZATIONS)} (see README); {default}"


def model_args(p: argparse.ArgumentParser, lib_help: str = LIB_HELP) -> None:
    """MODEL and what makes its weights and library: the same flags on generate, bench, serve and bundle."""
    from gptbc.artifact.quantization import ACTIVATION_MODES

    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--lib", help=lib_help)
    p.add_argument("--quantization", help=quantization_help(
        "default: a converted directory's or a quantized file's own scheme, q4f16_1 for a float checkpoint"))
    p.add_argument("--target", help="without --lib: compile for this target (default: --device's kind)")
    p.add_argument("--activations", choices=ACTIVATION_MODES, default="auto",
                   help="without --lib: int8 or float activations for grouped schemes on CPUs (see compile)")
    p.add_argument("--random-weights", action="store_true",
                   help="with a preset name: seeded random weights and a byte-level stand-in tokenizer, to try "
                        "the plumbing offline")
    p.add_argument("--allow-non-finite", action="store_true", help=ALLOW_NON_FINITE_HELP)


class _ShowDefaults(argparse.HelpFormatter):
    """--help shows each option's default where it has one (not "None" for options without)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from gptbc.artifact.quantization import ACTIVATION_MODES

    fmt = _ShowDefaults
    p = argparse.ArgumentParser(prog="gptbc", description="Compile and run GPTBigCode models with TVM Relax.",
                                formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"gptbc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=fmt)

    c = command("compile", "compile a model library for a target")
    c.add_argument("--model", required=True, help="preset name, HF directory, gptbc weights directory or Hub id")
    c.add_argument("--target", default="cpu", help="cpu, cuda[:sm_XX[,sm_YY]], metal, vulkan, webgpu, "
                                                    "aarch64-linux (see `gptbc targets`)")
    c.add_argument("--quantization", help=quantization_help(
        "default: the scheme of a converted --model directory (which compiles only for it), else q0f32"))
    c.add_argument("-o", "--output", help="library path (default dist/libs/<model>-<quant>-<target>.so)")
    c.add_argument("--no-quantize-lm-head", action="store_true", help=KEEP_HEAD_HELP)
    c.add_argument("--batch-invariant", action="store_true",
                   help="a row's result does not depend on the other rows of a call (for serve --batch-invariant; "
                        "on a CPU float prefill runs the row-tile matmul layout, no GEMM; on a GPU one thread per "
                        "attention row; docs/determinism.md)")
    c.add_argument("--activations", choices=ACTIVATION_MODES, default="auto",
                   help="grouped schemes on CPUs: int8 rounds each linear layer's input to int8 per group of 32 and "
                        "uses integer dot products (weights repacked when loaded); float keeps float activations; "
                        "auto is int8 where the CPU has VNNI (x86) or dotprod (aarch64: sdot)")
    c.add_argument("--context-window-size", type=_positive_int("--context-window-size"),
                   help="longest sequence (prompt + new tokens) the library serves (default: the model's n_positions)")
    c.add_argument("--prefill-chunk-size", type=_positive_int("--prefill-chunk-size"),
                   help="most tokens one prefill call takes; longer prompts go in chunks (default: min(context, 2048))")
    c.add_argument("--max-batch-size", type=_positive_int("--max-batch-size"),
                   help="most sequences decoded together (default: 16)")
    c.add_argument("--tensor-parallel", type=_positive_int("--tensor-parallel"), default=1, metavar="N",
                   help="the library of one rank of an N-way tensor-parallel model (weights converted with the same N)")
    c.set_defaults(func=cmd_compile)

    w = command("convert-weight", "convert (and quantize) an HF safetensors checkpoint or a GGUF file")
    w.add_argument("hf_dir", metavar="SOURCE", help="Hugging Face model directory or Hub id, or a GGUF file "
                   "(a folder holding one, or one part of a split set)")
    w.add_argument("--quantization", help=quantization_help(
        "required for an HF checkpoint; for a GGUF file the default keeps its values as stored (F32/F16/BF16, "
        "Q8_0, Q4_*/Q5_*/Q6_K files, a mix of them included) and a scheme re-quantizes into it, printing the "
        "error it measured"))
    w.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="the converted weights directory")
    w.add_argument("--no-quantize-lm-head", action="store_true", help=KEEP_HEAD_HELP)
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.add_argument("--allow-non-finite", action="store_true", help=ALLOW_NON_FINITE_HELP)
    w.add_argument("--tensor-parallel", type=_positive_int("--tensor-parallel"), default=1, metavar="N",
                   help="preshard the weights for N tensor-parallel ranks (each rank's slices in files of their own)")
    w.set_defaults(func=cmd_convert_weight)

    g = command("generate", "generate tokens from MODEL (converted and compiled on first use)")
    model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt, as text")
    src.add_argument("--prompt-ids", help="the prompt, as comma-separated token ids")
    src.add_argument("--prefix", help="fill-in-the-middle: the code before the cursor")
    g.add_argument("--suffix", help="fill-in-the-middle: the code after the cursor (with --prefix)")
    g.add_argument("--fim-order", choices=["auto", "psm", "spm"], default="auto", help=FIM_ORDER_HELP)
    g.add_argument("--max-new-tokens", type=int,
                   help="tokens to generate at most (default: generation_config.json's, else 64)")
    g.add_argument("--temperature", type=float, help="0 = greedy (the default unless generation_config.json "
                                                     "says do_sample)")
    g.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, help="sample within this probability mass (nucleus)")
    g.add_argument("--min-p", type=float, help="drop tokens below this fraction of the top probability")
    g.add_argument("--repetition-penalty", type=float, help="divide the logits of seen tokens (CTRL style)")
    g.add_argument("--presence-penalty", type=float, help="subtract from the logits of generated tokens")
    g.add_argument("--frequency-penalty", type=float, help="subtract per occurrence of a generated token")
    g.add_argument("--seed", type=int, help="sampling seed (reproducible output)")
    g.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    g.add_argument("--truncate-prompt", action="store_true",
                   help="drop the oldest prompt tokens when prompt + max-new-tokens exceeds the context window "
                        "(in whole blocks of up to 64 tokens, so that a prompt that grows keeps its start)")
    g.add_argument("--device", help=DEVICE_HELP)
    g.add_argument("--threads", type=_positive_int("--threads"), help=THREADS_HELP)
    g.add_argument("--tensor-parallel", type=_positive_int("--tensor-parallel"), default=1, metavar="N",
                   help=TP_HELP)
    g.add_argument("--prompt-lookup", nargs="?", const=8, type=_positive_int("--prompt-lookup"), metavar="N",
                   help=PROMPT_LOOKUP_HELP)
    draft_args(g)
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: token_ids, text, logprobs, finish_reason, prompt_tokens, timings")
    g.set_defaults(func=cmd_generate)

    b = command("bench", "measure prefill / decode / batched decode speed")
    model_args(b)
    b.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill test (0: skip)")
    b.add_argument("--prompt-tokens", type=int, default=32, help="prompt length before the decode tests")
    b.add_argument("--decode", type=int, default=64, help="decode steps")
    b.add_argument("--batch", default="4,16", help="comma-separated batch sizes for batched decode ('' to skip)")
    b.add_argument("--repeat", type=int, default=3, help="runs of each test (best and median reported)")
    b.add_argument("--device", help=DEVICE_HELP)
    b.add_argument("--threads", type=_positive_int("--threads"), help=THREADS_HELP)
    b.add_argument("--tensor-parallel", type=_positive_int("--tensor-parallel"), default=1, metavar="N",
                   help=TP_HELP)
    b.add_argument("--prompt-lookup", nargs="?", const=8, type=_positive_int("--prompt-lookup"), metavar="N",
                   help="also time greedy generation with prompt-lookup drafts of up to N tokens (8 if N is left "
                        "out) against plain, on a prompt the output repeats; reports acceptance and tokens/step")
    draft_args(b)
    b.add_argument("--json", action="store_true", help="print the results as JSON (progress goes to stderr)")
    b.set_defaults(func=cmd_bench)

    k = command("check", "check MODEL, or (without it) a target, end to end on this machine's device against a "
                         "float64 reference of the same weights")
    k.add_argument("model", metavar="MODEL", nargs="?",
                   help=MODEL_HELP + "; left out: random small models of each attention layout and scheme, no download")
    k.add_argument("--lib", help=LIB_HELP)
    k.add_argument("--target", help="the target to check (cpu, cuda, vulkan, metal, ...; default: cpu, or with MODEL "
                                    "--device's kind)")
    k.add_argument("--device", help=DEVICE_HELP)
    k.add_argument("--quantization", help="comma-separated schemes to check (default: q0f32,q0f16,q4f16_1); with "
                                          "MODEL one scheme (default: the model's own, q4f16_1 for a float one)")
    k.add_argument("--activations", choices=ACTIVATION_MODES, default="auto",
                   help="with MODEL and no --lib: int8 or float activations for grouped schemes on CPUs")
    k.add_argument("--random-weights", action="store_true",
                   help="with a preset name as MODEL: seeded random weights (see serve)")
    k.add_argument("--allow-non-finite", action="store_true", help=ALLOW_NON_FINITE_HELP)
    k.add_argument("--tokens", type=int, default=32,
                   help="greedy tokens compared after the 39-token prompt (fewer is quicker on slow devices "
                        "such as lavapipe)")
    k.add_argument("--runner", help="a gptbc-run binary: its greedy tokens on the target's library are checked too")
    k.add_argument("--bench", action="store_true",
                   help="also a santacoder-shaped random model's decode (batch 1, 16) and prefill-512 rates, "
                        "next to the device's copy bandwidth (needs ~10 GB of memory and disk)")
    k.add_argument("--threads", type=_positive_int("--threads"), help=THREADS_HELP)
    k.add_argument("--tensor-parallel", type=_positive_int("--tensor-parallel"), default=1, metavar="N",
                   help="run each model on N tensor-parallel workers (CPU), against the single-device reference")
    k.add_argument("--json", action="store_true", help="print the results as JSON (the table goes to stderr)")
    k.set_defaults(func=cmd_check)

    s = command("serve", "serve an OpenAI-compatible completions API (with FIM) and /infill")
    model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (loopback: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set GPTBC_API_KEY)")
    s.add_argument("--model-name", help="the model id clients use (default: MODEL's name)")
    s.add_argument("--max-batch", type=_positive_int("--max-batch"),
                   help="sequences decoded together (default: the library's max batch size)")
    s.add_argument("--max-queue", type=int, default=64, help="sequences waiting beyond the batch before "
                   "requests get 503")
    s.add_argument("--max-total-seq-len", type=_positive_int("--max-total-seq-len"),
                   help="KV-cache capacity in tokens over all sequences (default: context window x (min(4, batch) "
                        "+ 8): the running requests and the prefix cache's 8 kept prompts; less where that is over "
                        "a quarter of the memory the weights leave)")
    s.add_argument("--max-body-bytes", type=_positive_int("--max-body-bytes"), default=4 << 20,
                   help="largest request body accepted (413 beyond)")
    s.add_argument("--device", help=DEVICE_HELP)
    s.add_argument("--threads", type=_positive_int("--threads"), help=THREADS_HELP)
    s.add_argument("--tensor-parallel", type=_positive_int("--tensor-parallel"), default=1, metavar="N",
                   help=TP_HELP)
    s.add_argument("--prompt-lookup", nargs="?", const=8, type=_positive_int("--prompt-lookup"), metavar="N",
                   help=PROMPT_LOOKUP_HELP)
    s.add_argument("--batch-invariant", action="store_true", help=BATCH_INVARIANT_HELP)
    s.add_argument("--prefill-budget", type=_positive_int("--prefill-budget"), metavar="N",
                   help="prompt tokens one step prefills while other requests decode (and half a second after), "
                        "shortest prompt first "
                        "(default: 16 on the CPU, a whole prefill chunk on a GPU): smaller keeps completions "
                        "fast while a long prompt is read, larger reads it sooner")
    draft_args(s)
    s.add_argument("--fim-order", choices=["auto", "psm", "spm"], default="auto",
                   help=FIM_ORDER_HELP + " (of /infill and suffix requests that name none in their fim_order field)")
    s.set_defaults(func=cmd_serve)

    m = command("models", "list the bundled presets: parameters, weight bytes per quantization, KV-cache bytes "
                          "per token, the Hub id each stands for")
    m.add_argument("--json", action="store_true", help="print the table as JSON")
    m.set_defaults(func=cmd_models)

    u = command("bundle", "a folder that runs the model on the library's machine without Python: gptbc-run built "
                          "for its CPU, the TVM runtime, the library, weights and tokenizer")
    model_args(u, lib_help="a library from `gptbc compile` for a CPU (cpu, aarch64-linux[:CPU]) or CUDA "
                           "(default: compiled for MODEL and --target, cached)")
    u.add_argument("-o", "--output", required=True, metavar="DIR", help="the bundle folder (replaced if it is one)")
    u.set_defaults(func=cmd_bundle)

    a = command("cache", "the artifact cache (converted weights, libraries, native builds): list, prune, clear")
    a.add_argument("action", choices=("list", "prune", "clear"), nargs="?", default="list",
                   help="list: entries with size, build date and last use; prune: remove damaged entries, those "
                        "unused for --older-than days and the least recently used beyond --max-size; clear: all")
    a.add_argument("--older-than", type=float, default=30.0, metavar="DAYS", help="prune: unused this long")
    a.add_argument("--max-size", type=float, metavar="GB", help="prune: keep at most this much")
    a.set_defaults(func=cmd_cache)

    t = command("targets", "list the targets, and what this machine can build and run")
    t.set_defaults(func=cmd_targets)
    return p


def _on_ctrl_c(_signum, _frame) -> None:
    """Ctrl-C: remember it (TVM turns a KeyboardInterrupt raised inside one of its passes into a RuntimeError with
    a long traceback, or loses it: errors.interrupt_requested keeps outputs from appearing), then interrupt."""
    interrupt_requested.set()
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        interrupt_requested.clear()
        signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        return args.func(args)
    except GptbcError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a file-system failure not already named by the code that met it
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Exception):
        if not interrupt_requested.is_set():
            raise
        # outputs are written under temporary names and removed on the way out: nothing half-written remains
        print("error: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `gptbc` console command: main() in a process of its own, where torch is kept out. tvm_ffi imports
    torch whenever it is installed (a workaround for a symbol clash on Windows, and for optional DLPack interop),
    which costs 1.5-3 s of every start here; nothing gptbc runs needs torch, so its import fails for this process.
    (Tests call main() in their own process, where torch stays importable.)"""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tvm_ffi catches
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    sys.exit(main())


if __name__ == "__main__":
    run()
