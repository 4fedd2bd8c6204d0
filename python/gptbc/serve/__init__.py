"""The HTTP server, one module per protocol in the style of vLLM's entrypoints: openai.py (completions, FIM,
chat) and llamacpp.py (completion, infill, tokenize, detokenize), over the request and stream core (core.py)
and the HTTP plumbing with SSE framing (transport.py); the app, its API-key gate and info routes (app.py), the
error model (errors.py), metrics (metrics.py), llama.cpp's text stop rules (stops.py), the declared schema
(schema.py) and the OpenAPI document (openapi.py).

May import: gptbc.runtime, gptbc.artifact, gptbc.errors, FastAPI/starlette/pydantic. Never gptbc.compile.
"""
