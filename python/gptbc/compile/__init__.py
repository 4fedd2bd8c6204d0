"""Compile time: the Relax model, its quantized layers, the per-target pipeline, schedules and hand-written
kernels, and the driver that exports a library (compiler.py).

May import: gptbc.artifact, gptbc.errors, TVM (codegen, dlight, relax). Never gptbc.runtime or gptbc.serve: a
library is built from the artifact's definitions alone.
"""
