"""The server's one declared schema: pydantic models of every request and response.

The sampling ranges are not written here: `sampling_field` reads them from sampling.RANGES, the table
SamplingParams validates against, so the OpenAPI document, the server's 400s and the engine agree.
Every request model is strict (a string is not a number, 1.0 is not an integer), refuses NaN and
Infinity, and accepts unknown fields and ignores them (as OpenAI-compatible servers and llama.cpp do).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gptbc.runtime.sampling import MAX_TOP_LOGPROBS, RANGES

MAX_CHOICES = 16  # n × number of prompts in one request
MAX_STOPS = 16


def sampling_field(name: str, description: str, default: Any = None, **overrides: Any) -> Any:
    """A request field whose range is sampling.RANGES[name] (overrides: e.g. llama.cpp's seed -1)."""
    rng = RANGES[name]
    bounds = rng.bounds() | overrides
    return Field(default=default, description=f"{description} Must be {rng.rule}.", **bounds)


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class Closed(BaseModel):
    """Response models: nothing beyond what is declared."""

    model_config = ConfigDict(extra="forbid")


Stop = str | Annotated[list[str], Field(max_length=MAX_STOPS)]


class SamplingFields(Strict):
    """Sampling fields shared by every generating endpoint (names as OpenAI spells them)."""

    temperature: float | None = sampling_field("temperature", "Sampling temperature; unset: the model's "
                                               "generation_config.json default (greedy if it has none).")
    top_p: float | None = sampling_field("top_p", "Nucleus sampling: keep the smallest set of tokens reaching "
                                         "this probability.")
    top_k: int | None = sampling_field("top_k", "Keep only the k most likely tokens.")
    min_p: float | None = sampling_field("min_p", "Drop tokens less likely than min_p times the most likely.")
    repetition_penalty: float | None = sampling_field("repetition_penalty", "HF/CTRL repetition penalty.")
    presence_penalty: float | None = sampling_field("presence_penalty", "OpenAI presence penalty.")
    frequency_penalty: float | None = sampling_field("frequency_penalty", "OpenAI frequency penalty.")
    seed: int | None = sampling_field("seed", "Random seed (each choice i uses seed + i).")
    stop: Stop | None = Field(None, description=f"Up to {MAX_STOPS} stop strings, not included in the output.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token.")


class StreamOptions(Strict):
    include_usage: bool = False


class CompletionRequest(SamplingFields):
    """POST /v1/completions (OpenAI)."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, strings, token ids or lists of token ids.")
    suffix: str | None = Field(None, description="Text after the gap: fill-in-the-middle (prompt is the prefix).")
    max_tokens: int = sampling_field("max_new_tokens", "Most tokens to generate.", default=16)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt.")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Only best_of == n is supported.")
    echo: bool = False
    logprobs: int | None = sampling_field("top_logprobs", "Log-probabilities of the chosen and N most likely "
                                          "tokens.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class FimRequest(SamplingFields):
    """POST /v1/fim/completions (Mistral/Codestral-style, as Continue's OpenAI provider sends it)."""

    model: str | None = None
    prompt: str = Field(description="Text before the gap.")
    suffix: str | None = Field(None, description="Text after the gap.")
    max_tokens: int = sampling_field("max_new_tokens", "Most tokens to generate.", default=16)
    stream: bool = False
    stream_options: StreamOptions | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions (OpenAI), rendered with the tokenizer's chat template (ChatML without one)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = sampling_field("max_new_tokens", "Most tokens to generate (default: until the end "
                                                              "of text or of the context window).")
    max_completion_tokens: int | None = sampling_field("max_new_tokens", "Alias of max_tokens.")
    n_predict: int | None = Field(None, ge=-1, description="llama.cpp's name, before max_tokens: -1 until eos "
                                                           "or the window; 0 evaluates the prompt only (a "
                                                           "warm-up: empty answer).")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    logprobs: bool = False
    top_logprobs: int | None = sampling_field("top_logprobs", "With logprobs: the N most likely tokens too.")
    stream: bool = False
    stream_options: StreamOptions | None = None


class LlamaFields(SamplingFields):
    """llama.cpp's `/completion` and `/infill` fields (its spellings); unknown llama.cpp fields are ignored."""

    n_predict: int = Field(-1, ge=-1, description="Most tokens to generate; -1: until eos or the context "
                                                  "window; 0: only evaluate (warm the prompt cache).")
    stream: bool = False
    n_probs: int = sampling_field("top_logprobs", "Probabilities of the N most likely tokens per step.", default=0)
    repeat_penalty: float | None = sampling_field("repetition_penalty", "llama.cpp's name for "
                                                  "repetition_penalty.")
    seed: int | None = sampling_field("seed", "Random seed; -1: random.", ge=-1)
    cache_prompt: bool = Field(True, description="Keep the evaluated prompt for reuse (always on in gptbc).")
    id_slot: int = Field(-1, ge=-1, description="Accepted and echoed; gptbc has no slots (every request shares "
                                                "one batch and the prefix cache).")
    response_fields: list[str] | None = Field(None, description="Answer only these fields ('a/b' reaches "
                                                                "into nested objects).")
    t_max_predict_ms: int | None = Field(None, ge=0, description="Once this long has passed since the first "
                                                                 "token, stop on the first token that holds a "
                                                                 "newline (0: no limit).")
    t_max_prompt_ms: int | None = Field(None, ge=-1, description="Accepted and ignored, as llama.cpp does.")
    samplers: list[str] | None = Field(None, description="Accepted and ignored (gptbc's order is fixed).")


class LlamaCompletionRequest(LlamaFields):
    """POST /completion (llama.cpp)."""

    prompt: str | list[int] = Field(description="Text or token ids.")


class ExtraChunk(Strict):
    filename: str = "tmp"  # llama.cpp's default
    text: str = ""


class InfillRequest(LlamaFields):
    """POST /infill (llama.cpp), as llama.vim and llama.vscode send it."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list, description="Repository context: "
                                          "[{filename, text}], oldest first.")
    prompt: str = Field("", description="The text typed on the cursor's line before the cursor: it ends the "
                                        "FIM prefix, as in llama.cpp.")
    n_indent: int = Field(0, ge=0, description="After the first line, stop at a line indented less than this "
                                               "(an empty line too), cut after its indentation.")


class TokenizeRequest(Strict):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(Strict):
    tokens: list[int]


# ---- responses ----

class ErrorBody(Closed):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Closed):
    error: ErrorBody


class Usage(Closed):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Logprobs(Closed):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(Closed):
    index: int
    text: str
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(Closed):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(Closed):
    role: Literal["assistant"]
    content: str


class ChatChoice(Closed):
    index: int
    message: ChatMessageOut
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length"]


class ChatResponse(Closed):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class LlamaResponse(Closed):
    """llama.cpp's answer of /completion and /infill (a streamed chunk has `content` and `stop` only, the last
    one everything)."""

    content: str
    tokens: list[int]
    id_slot: int
    stop: bool
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int
    truncated: bool
    stop_type: Literal["none", "eos", "limit", "word"]
    stopping_word: str
    timings: dict[str, float]
    completion_probabilities: list[dict] | None = None


class TokenizeResponse(Closed):
    tokens: list[int] | list[dict[str, Any]]


class DetokenizeResponse(Closed):
    content: str


class Guarantee(Closed):
    """Whether the same request gives the same answer, bit for bit, under any load (serve --batch-invariant)."""
    batch_invariant: bool
    scope: str


class ModelCard(Closed):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_window: int
    quantization: str
    activations: Literal["float", "int8"]
    guarantee: Guarantee


class ModelList(Closed):
    object: Literal["list"]
    data: list[ModelCard]


class Health(Closed):
    status: Literal["ok", "error"]
    model: str
    error: str | None = None


REQUEST_MODELS = [CompletionRequest, FimRequest, ChatRequest, LlamaCompletionRequest, InfillRequest,
                  TokenizeRequest, DetokenizeRequest]
# path → the model of its (non-streamed) JSON answer
RESPONSE_MODELS = {"/v1/completions": CompletionResponse, "/completions": CompletionResponse,
                   "/v1/fim/completions": ChatResponse, "/v1/chat/completions": ChatResponse,
                   "/completion": LlamaResponse, "/infill": LlamaResponse, "/tokenize": TokenizeResponse,
                   "/detokenize": DetokenizeResponse}
MAX_LOGPROBS = MAX_TOP_LOGPROBS
