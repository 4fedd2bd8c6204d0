"""Small seeded GPTBigCode checkpoints and tokenizers in Hugging Face format, made on the fly.

Nothing can be downloaded here, so every test model is built by `transformers` itself with random
weights (seeded) and saved with `save_pretrained` (safetensors), exactly as a user's checkpoint is.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS_DASH = ["<|endoftext|>", "<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>"]
SPECIALS_UNDERSCORE = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
SPECIALS_REPO = SPECIALS_UNDERSCORE + ["<repo_name>", "<file_sep>"]  # StarCoder 2's repository-level tokens

CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import numpy as np\n\nclass Model:\n    def __init__(self, size: int) -> None:\n        self.size = size\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\n",
    "// héllo wörld — ünïcode ✓ 你好 🚀\nconst x = [1, 2, 3].map((v) => v * 2);\n",
] * 20


def make_tokenizer(directory: Path, fim: str | None = "dash", vocab_size: int = 320) -> int:
    """Train a byte-level BPE (StarCoder-style pre-tokenizer) and save tokenizer.json; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = {"dash": SPECIALS_DASH, "underscore": SPECIALS_UNDERSCORE, "repo": SPECIALS_REPO,
                None: ["<|endoftext|>"]}[fim]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return tok.get_vocab_size()


def make_checkpoint(directory: Path, seed: int = 0, tokenizer: str | None = None, drop_lm_head: bool = False,
                    weight_std: float = 0.15, **config) -> Path:
    """Save a seeded random GPTBigCodeForCausalLM; `config` overrides the tiny defaults."""
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    fields = dict(n_embd=64, n_head=4, n_layer=2, n_positions=128, vocab_size=320, multi_query=True,
                  activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0)
    fields.update(config)
    torch.manual_seed(seed)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**fields)).eval()
    # Random init has tiny weights (std 0.02) and near-uniform logits; widen them so argmax is decisive
    # and the parity test compares meaningful distributions.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, weight_std if p.dim() > 1 else 0.05)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if drop_lm_head:
        _drop_tensor(directory / "model.safetensors", "lm_head.weight")
    if tokenizer is not None:
        make_tokenizer(directory, fim=tokenizer, vocab_size=fields["vocab_size"])
    return directory


def make_scripted_checkpoint(directory: Path, text: str, n_positions: int = 1024, n_head: int = 8) -> Path:
    """A GPTBigCode whose greedy output is known: at position p it predicts token p (mod len) of `text`
    (tokenized with the "dash" tokenizer) whatever the input, by a wide margin. So what it writes after a
    prompt of L tokens is `text`'s tokens from L - 1 on, round and round: the server's stop rules
    (n_indent, t_max_predict_ms, stop strings) meet exactly the lines the test wrote.

    How: no token embedding, a one-hot position embedding (n_embd = n_positions), every attention and MLP
    weight zero (each block adds nothing to the residual), and an untied lm_head whose row for token t is
    the sum of the one-hots of the positions that predict t.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    vocab = make_tokenizer(directory, fim="dash")
    ids = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text).ids
    config = GPTBigCodeConfig(n_embd=n_positions, n_head=n_head, n_layer=1, n_positions=n_positions,
                              n_inner=64, vocab_size=vocab, multi_query=True, tie_word_embeddings=False, bos_token_id=0,
                              eos_token_id=0)
    model = GPTBigCodeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "ln_" in name and name.endswith("weight") else 0.0)
        model.transformer.wpe.weight.copy_(torch.eye(n_positions))
        for pos in range(n_positions):
            model.lm_head.weight[ids[pos % len(ids)], pos] = 1.0
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _drop_tensor(path: Path, name: str) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    tensors.pop(name, None)
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_hf(directory: Path):
    from transformers import GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM.from_pretrained(directory).eval()


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def make_trained_checkpoint(directory: Path, steps: int = 300, seed: int = 0, **config) -> Path:
    """A tiny model trained briefly on CORPUS (seeded, deterministic on CPU), saved with its tokenizer.

    Random weights give near-flat next-token distributions, the worst case for measuring quantization
    (any noise flips a near-tie); a model that has learned something has the peaked distributions of
    a real code model. A few hundred AdamW steps take seconds on the CPU.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(directory, fim="dash", vocab_size=config.get("vocab_size", 320))
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = torch.tensor([t for text in CORPUS[:4] for t in tok.encode(text).ids])
    fields = dict(n_embd=128, n_head=4, n_layer=2, n_positions=128, vocab_size=vocab, multi_query=True,
                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    fields.update(config)
    torch.manual_seed(seed)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**fields))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    window = 64
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window - 1, (8,), generator=gen)
        batch = torch.stack([ids[s:s + window] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(directory, safe_serialization=True)
    return directory


def make_draft_checkpoint(directory: Path, steps: int = 300, seed: int = 0) -> Path:
    """The draft model of the trained pair: trained exactly as the trained tiny model (make_trained_checkpoint: the
    same data, tokenizer, steps and seed) at a smaller shape, n_embd 64 and one layer (a quarter of its weights
    and well under half its per-token work), as tiny_starcoder_py is a smaller StarCoder."""
    return make_trained_checkpoint(directory, steps=steps, seed=seed, n_embd=64, n_layer=1)


# The FIM examples the shipped FIM model holds out of training (document index, start, end of the middle in
# characters): tests ask it for these middles in both orders. Training splits are drawn by character and each
# part is tokenized alone, as BigCode's Megatron-LM `permute` does; these were drawn (seeded) among splits where
# the parts tokenize as the whole document does, so that no answer depends on healing a token cut in two.
FIM_HELD_OUT = [(0, 74, 94), (0, 14, 28), (1, 64, 89), (1, 55, 73), (2, 19, 29), (2, 8, 32), (3, 49, 67),
                (3, 27, 36)]


def fim_example(tok, doc: str, start: int, end: int, order: str, ids: dict[str, int]) -> list[int]:
    """One training sequence for the middle doc[start:end]: PSM is <fim-prefix> P <fim-suffix> S <fim-middle> M,
    SPM (Megatron-LM's "SPM variant 2") <fim-prefix> <fim-suffix> S <fim-middle> P M; both end in <|endoftext|>."""
    pre, mid, suf = (tok.encode(t).ids for t in (doc[:start], doc[start:end], doc[end:]))
    if order == "psm":
        body = [ids["prefix"], *pre, ids["suffix"], *suf, ids["middle"], *mid]
    else:
        body = [ids["prefix"], ids["suffix"], *suf, ids["middle"], *pre, *mid]
    return body + [ids["eot"]]


def make_fim_checkpoint(directory: Path, steps: int = 3500, seed: int = 0, fim_rate: float = 0.9,
                        spm_rate: float = 0.5, log=None) -> Path:
    """The trained tiny model's shape and tokenizer, trained with fill-in-the-middle in both orders: each example
    is FIM with probability `fim_rate` (else the plain document), SPM variant 2 with probability `spm_rate` (else
    PSM), a middle of 1-30 characters at a random place (never one of FIM_HELD_OUT). Loss on every token but
    the padding, as in BigCode's training. One thread (deterministic for a given torch and CPU, and faster than
    two on a busy machine); `log(step, loss)` every 100 steps."""
    import random

    import torch
    from tokenizers import Tokenizer
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(directory, fim="dash")
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = {k: tok.token_to_id(t) for k, t in [("prefix", "<fim-prefix>"), ("suffix", "<fim-suffix>"),
                                              ("middle", "<fim-middle>"), ("pad", "<fim-pad>"),
                                              ("eot", "<|endoftext|>")]}
    docs, held = CORPUS[:4], set(FIM_HELD_OUT)
    rng = random.Random(seed)

    def example() -> list[int]:
        d = rng.randrange(len(docs))
        doc = docs[d]
        if rng.random() >= fim_rate:
            return tok.encode(doc).ids + [ids["eot"]]
        while True:
            start = rng.randrange(0, len(doc))
            end = min(len(doc), start + rng.randint(1, 30))
            if (d, start, end) not in held:
                break
        return fim_example(tok, doc, start, end, "spm" if rng.random() < spm_rate else "psm", ids)

    fields = dict(n_embd=128, n_head=4, n_layer=2, n_positions=128, vocab_size=vocab, multi_query=True,
                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**fields))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100) * max(0.05, 1 - i / steps))
    for step in range(steps):
        batch = [example() for _ in range(16)]
        width = max(map(len, batch))
        inputs = torch.tensor([b + [ids["pad"]] * (width - len(b)) for b in batch])
        labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
        loss = model(inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and step % 100 == 0:
            log(step, loss.item())
    torch.set_num_threads(threads)
    model.eval().save_pretrained(directory, safe_serialization=True)
    return directory


if __name__ == "__main__":  # python tests/hf_models.py trained|fim DIR: regenerate a shipped trained model
    import sys

    makers = {"trained": make_trained_checkpoint, "fim": make_fim_checkpoint, "draft": make_draft_checkpoint}
    if len(sys.argv) != 3 or sys.argv[1] not in makers:
        sys.exit("usage: python tests/hf_models.py trained|fim|draft DIR")
    if sys.argv[1] == "fim":
        make_fim_checkpoint(Path(sys.argv[2]), log=lambda step, loss: print(f"step {step} loss {loss:.3f}", flush=True))
    else:
        makers[sys.argv[1]](Path(sys.argv[2]))
