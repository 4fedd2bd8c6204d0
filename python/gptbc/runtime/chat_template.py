"""Chat templates: the tokenizer's own `chat_template` (tokenizer_config.json), rendered as transformers does —
jinja2's ImmutableSandboxedEnvironment with trim_blocks/lstrip_blocks and a `raise_exception` helper — so a
template can neither reach Python objects nor change its inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptbc.errors import GptbcError

# llama.cpp's template for a model that has none (every base StarCoder): ChatML. A base model never learned it,
# but an answer the editor shows beats a 400 that llama.vim's instruct mode swallows without a word; the
# server stops on CHATML_STOP, which such a model may write as plain text.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_STOP = "<|im_end|>"


class ChatTemplate:
    def __init__(self, source: str, special: dict[str, str]):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        self.source, self.special = source, special
        try:
            self.template = env.from_string(source)
        except TemplateError as err:
            raise GptbcError(f"chat_template: does not parse ({err})") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special)
        except TemplateError as err:  # the template refused these messages (e.g. roles out of order)
            raise GptbcError(f"messages: the chat template refused them ({err})") from None


def load_chat_template(directory: Path) -> ChatTemplate | None:
    """The chat template of a model directory (tokenizer_config.json's chat_template, or chat_template.jinja),
    or None when it has none."""
    directory = Path(directory)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text("utf-8")) if cfg_path.is_file() else {}
    source = cfg.get("chat_template")
    if isinstance(source, list):  # named templates: take "default"
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if source is None and (directory / "chat_template.jinja").is_file():
        source = (directory / "chat_template.jinja").read_text("utf-8")
    if not source:
        return None

    def text(v):
        return v.get("content") if isinstance(v, dict) else v

    special = {k: text(cfg.get(k)) or "" for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return ChatTemplate(source, special)
