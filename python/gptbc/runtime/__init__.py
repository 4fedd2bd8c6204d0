"""Serve time without a compiler: load a library and its converted weights (runner.py, on a device from
devices.py), schedule requests over a paged KV cache (scheduler.py), sample (sampling.py), draft (speculation.py),
and the text-level engine on top (engine.py, async_engine.py, tokenizer.py, chat_template.py).

May import: gptbc.artifact, gptbc.errors, TVM's runtime. Never gptbc.compile (LLVM codegen, dlight, schedules):
tests/test_layers.py loads and runs a library and checks that no compile module was imported.
"""
