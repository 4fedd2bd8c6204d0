"""User-facing errors: each message is a single line that names the thing at fault."""

import threading

# Set by the CLI's Ctrl-C handler. The KeyboardInterrupt it raises can be swallowed on its way out of TVM (a
# Python callback inside a pass turns it into a TVM error, which dlight's rule loop catches), so whatever publishes
# an output (a rename from a temporary name) asks `raise_if_interrupted` first: after a Ctrl-C, nothing appears.
interrupt_requested = threading.Event()


def raise_if_interrupted() -> None:
    if interrupt_requested.is_set():
        raise KeyboardInterrupt


class GptbcError(Exception):
    """A user-facing failure (bad input, missing file, unsupported option).

    The CLI prints ``error: <message>`` and exits with status 1; anything else is a bug and
    keeps its traceback.
    """


class ContextWindowError(GptbcError):
    """A prompt that does not fit the context window together with its new tokens.

    Each front end names its own knobs (`--max-new-tokens` in the CLI, `max_tokens` in the server), so the
    numbers are kept and `render` words the message.
    """

    def __init__(self, prompt_tokens: int, max_new_tokens: int, window: int):
        self.prompt_tokens, self.max_new_tokens, self.window = prompt_tokens, max_new_tokens, window
        super().__init__(self.render())

    def render(self, new_tokens: str = "max_new_tokens", truncate: str | None = "truncate_prompt") -> str:
        need = self.prompt_tokens + self.max_new_tokens
        fix = f"set {truncate} to drop the oldest prompt tokens" if truncate else "shorten the prompt"
        return (f"prompt of {self.prompt_tokens} tokens + {new_tokens} {self.max_new_tokens} = {need} exceeds the "
                f"context window of {self.window} tokens (lower {new_tokens}, or {fix})")
