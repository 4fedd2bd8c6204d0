"""The OpenAPI document: each endpoint's declared request and response models (schema.py), and this server's
own limits written into it (its one model name, token ids within the vocabulary, max tokens within the
window), so a schema-driven fuzzer reaches past the first refusal."""

from __future__ import annotations

from typing import Any

from gptbc.serve import schema as S

ENDPOINTS = {  # path → (request model, what it is)
    "/v1/completions": (S.CompletionRequest, "OpenAI completions (prompt, suffix for FIM)"),
    "/completions": (S.CompletionRequest, "alias of /v1/completions"),
    "/v1/fim/completions": (S.FimRequest, "fill-in-the-middle (Continue's OpenAI provider)"),
    "/v1/chat/completions": (S.ChatRequest, "OpenAI chat completions, with the tokenizer's chat template "
                                            "(ChatML without one)"),
    "/completion": (S.LlamaCompletionRequest, "llama.cpp completion (Tabby, Continue's llama.cpp provider)"),
    "/infill": (S.InfillRequest, "llama.cpp infill (llama.vim, llama.vscode)"),
    "/tokenize": (S.TokenizeRequest, "llama.cpp tokenize"),
    "/detokenize": (S.DetokenizeRequest, "llama.cpp detokenize"),
}


def route_doc(path: str, streams: bool = True) -> dict[str, Any]:
    """The keyword arguments of a POST route for `path`: its summary and request/response documentation."""
    model = ENDPOINTS[path][0]
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    responses = {"400": {"description": "a bad field (named in error.param)",
                         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}},
                 "503": {"description": "busy (Retry-After) or the engine failed"}}
    schema = {"$ref": f"#/components/schemas/{S.RESPONSE_MODELS[path].__name__}"}
    if path in ("/completion", "/infill"):  # with response_fields: only the fields asked for, by path
        schema = {"anyOf": [schema, {"type": "object", "description": "response_fields given: {path: value} "
                                                                      "for each path found"}]}
    answer = {"application/json": {"schema": schema}}
    if streams:
        answer["text/event-stream"] = {"schema": {  # each event; its data is one JSON chunk (or [DONE])
            "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}
    responses["200"] = {"description": "the answer (server-sent events with stream: true)" if streams
                        else "the answer", "content": answer}
    return {"openapi_extra": {"requestBody": {"required": True, "content": content}, "responses": responses},
            "response_model": None, "summary": ENDPOINTS[path][1]}


def _token_ids(node: Any, vocab: int) -> None:
    """Every integer inside a prompt/tokens field is a token id."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node.update(minimum=0, maximum=vocab - 1)
        for v in node.values():
            _token_ids(v, vocab)
    elif isinstance(node, list):
        for v in node:
            _token_ids(v, vocab)


def document(app, model_name: str, vocab: int, window: int) -> dict:
    """The app's OpenAPI document with every declared model and this server's limits."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in [*S.REQUEST_MODELS, *set(S.RESPONSE_MODELS.values()), S.ErrorResponse]:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(js.pop("$defs", {}))
        components[model.__name__] = js
    for js in components.values():  # this server's own limits: its model name, vocabulary, window
        props = js.get("properties", {}) if js.get("title", "").endswith("Request") else {}
        if "model" in props:  # the one name the OpenAI endpoints accept (else 404)
            props["model"] = {"anyOf": [{"type": "string", "enum": [model_name]}, {"type": "null"}],
                              "description": "the served model (GET /v1/models); another name is a 404"}
        for name in ("prompt", "tokens"):
            if name in props:
                _token_ids(props[name], vocab)
        for name in ("max_tokens", "max_completion_tokens", "n_predict"):
            for alt in props.get(name, {}).get("anyOf", [props.get(name, {})]):
                if alt.get("type") == "integer":
                    alt["maximum"] = window  # prompt + new tokens must fit the context window
    return schema
