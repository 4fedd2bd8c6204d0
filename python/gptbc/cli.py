"""`gptbc` command line: compile, convert-weight, generate, targets.

Every user error ends as one line `error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from . import __version__
from .errors import GptbcError


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
    from .compiler import compile_model
    from .config import resolve_model

    source = resolve_model(args.model, context_window_size=args.context_window_size,
                           prefill_chunk_size=args.prefill_chunk_size, max_batch_size=args.max_batch_size)
    quantization, keep_head = args.quantization, args.no_quantize_lm_head
    if quantization is None:  # a converted directory compiles for its own scheme; anything else for q0f32
        from .config import GPTBC_CONFIG, load_gptbc_config

        converted = source.directory is not None and (source.directory / GPTBC_CONFIG).is_file()
        scheme = load_gptbc_config(source.directory)["quantization"] if converted else {"name": "q0f32"}
        quantization = scheme["name"]
        keep_head = keep_head or not scheme.get("quantize_lm_head", True)
    out = compile_model(source, args.target, quantization, args.output,
                        log=lambda m: print(m, file=sys.stderr, flush=True), quantize_lm_head=not keep_head)
    print(out)
    return 0


def cmd_convert_weight(args: argparse.Namespace) -> int:
    from .loader import convert_weight

    out = convert_weight(args.hf_dir, args.quantization, args.output, progress=not args.quiet,
                         quantize_lm_head=not args.no_quantize_lm_head)
    print(out)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime import Completion, Engine

    engine = Engine(args.out_dir, args.lib, device=args.device)
    sampling = {k: getattr(args, k) for k in (
        "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty", "seed")}
    params = engine.sampling(**sampling, stop=args.stop or None, logprobs=args.json,
                             truncate_prompt=args.truncate_prompt or None)
    prompt = parse_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
    fim = args.prefix is not None or args.suffix is not None
    req = engine.submit(None if fim else prompt, prefix=args.prefix, suffix=args.suffix, params=params)
    stream = not args.json and engine.tokenizer is not None
    while req.finish_reason is None:
        for event in engine.step():
            if stream and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    done = Completion.of(req)
    if args.json:
        print(json.dumps(done.to_dict()))
    elif stream:
        sys.stdout.write("\n")
    else:
        print(",".join(map(str, done.token_ids)))
    return 0


def cmd_targets(_args: argparse.Namespace) -> int:
    from .targets import TARGETS

    print(f"{'target':<16} {'output':<7} {'build here':<11} {'run here':<9} description")
    for t in TARGETS:
        names = ", ".join((t.name, *t.aliases))
        why = t.unavailable()
        output = t.plan(None).suffix if why is None else "-"
        print(f"{names:<16} {output:<7} {'yes' if why is None else 'no':<11} {'yes' if t.runs_here() else 'no':<9} "
              f"{t.description}; needs {t.toolchain}" + (f" [{why}]" if why else ""))
    print_vulkan_adapters()
    return 0


def print_vulkan_adapters() -> None:
    """Which way --target vulkan goes here, and the adapters `--device vulkan[:N]` chooses from."""
    from .targets import vulkan_codegen, vulkan_path

    print(f"\nvulkan path: {vulkan_path()}")
    if vulkan_codegen():
        return
    from . import webgpu

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


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    batches = tuple(int(b) for b in args.batch.split(",") if b) if args.batch else ()
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    result = run_bench(args.out_dir, args.lib, prefill=args.prefill, prompt=args.prompt, decode=args.decode,
                       batches=batches, repeat=args.repeat, device=args.device, log=log)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .runtime import Engine
    from .server import serve

    api_key = args.api_key or os.environ.get("GPTBC_API_KEY") or None
    engine = Engine(args.out_dir, args.lib, device=args.device, max_batch_size=args.max_batch,
                    max_total_seq_len=args.max_total_seq_len)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)

    def ready(url: str) -> None:
        print(f"gptbc serve: {engine.model_dir.name} on {url} (OpenAI API at {url}/v1)", flush=True)

    serve(engine, host=args.host, port=args.port, model_name=args.model_name, api_key=api_key,
          max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, on_ready=ready)
    return 0


KEEP_HEAD_HELP = "keep lm_head (and a tied wte) in the activation dtype under a grouped int scheme"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptbc", description="Compile and run GPTBigCode models with TVM Relax.")
    p.add_argument("--version", action="version", version=f"gptbc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model library for a target")
    c.add_argument("--model", required=True, help="preset name, HF directory, gptbc weights directory or Hub id")
    c.add_argument("--target", default="cpu", help="cpu, cuda[:sm_XX], metal, vulkan, webgpu, aarch64-linux "
                                                    "(see `gptbc targets`)")
    c.add_argument("--quantization", help="default: the scheme of a converted --model directory, else q0f32")
    c.add_argument("-o", "--output", help="library path (default dist/libs/<model>-<quant>-<target>.so)")
    c.add_argument("--no-quantize-lm-head", action="store_true", help=KEEP_HEAD_HELP)
    c.add_argument("--context-window-size", type=_positive_int("--context-window-size"))
    c.add_argument("--prefill-chunk-size", type=_positive_int("--prefill-chunk-size"))
    c.add_argument("--max-batch-size", type=_positive_int("--max-batch-size"))
    c.set_defaults(func=cmd_compile)

    w = sub.add_parser("convert-weight", help="convert an HF safetensors checkpoint")
    w.add_argument("hf_dir", metavar="HF_DIR")
    w.add_argument("--quantization", required=True)
    w.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    w.add_argument("--no-quantize-lm-head", action="store_true", help=KEEP_HEAD_HELP)
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_convert_weight)

    g = sub.add_parser("generate", help="generate tokens with a compiled library and converted weights")
    g.add_argument("out_dir", metavar="OUT_DIR")
    g.add_argument("--lib", required=True)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    src.add_argument("--prefix", help="fill-in-the-middle: the code before the cursor")
    g.add_argument("--suffix", help="fill-in-the-middle: the code after the cursor (with --prefix)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy (the default unless generation_config.json "
                                                     "says do_sample)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    g.add_argument("--truncate-prompt", action="store_true",
                   help="drop the oldest prompt tokens when prompt + max-new-tokens exceeds the context window")
    g.add_argument("--device", default="cpu")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: token_ids, text, logprobs, finish_reason, prompt_tokens")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="measure prefill / decode / batched decode speed")
    b.add_argument("out_dir", metavar="OUT_DIR")
    b.add_argument("--lib", required=True)
    b.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill test (0: skip)")
    b.add_argument("--prompt", type=int, default=32, help="prompt tokens before the decode tests")
    b.add_argument("--decode", type=int, default=64, help="decode steps")
    b.add_argument("--batch", default="4,16", help="comma-separated batch sizes for batched decode ('' to skip)")
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--device", default="cpu")
    b.add_argument("--json", action="store_true", help="print the results as JSON (progress goes to stderr)")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="serve an OpenAI-compatible completions API (with FIM) and /infill")
    s.add_argument("out_dir", metavar="OUT_DIR")
    s.add_argument("--lib", required=True)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set GPTBC_API_KEY)")
    s.add_argument("--model-name", help="the model id clients use (default: OUT_DIR's name)")
    s.add_argument("--max-batch", type=_positive_int("--max-batch"),
                   help="sequences decoded together (default: the library's max batch size)")
    s.add_argument("--max-queue", type=int, default=64, help="sequences waiting beyond the batch before "
                   "requests get 503 (default 64)")
    s.add_argument("--max-total-seq-len", type=_positive_int("--max-total-seq-len"),
                   help="KV-cache capacity in tokens over all sequences")
    s.add_argument("--max-body-bytes", type=_positive_int("--max-body-bytes"), default=4 << 20)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("targets", help="list the targets")
    t.set_defaults(func=cmd_targets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GptbcError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
