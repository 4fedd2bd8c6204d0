"""The HTTP server: one module per protocol (openai.py, llamacpp.py) over a shared request and stream core
(core.py), with the app and its error model (app.py), SSE framing (sse.py), metrics (metrics.py) and the
declared request schema (schema.py).

May import: gptbc.runtime, gptbc.artifact, gptbc.errors. Never gptbc.compile.
"""
