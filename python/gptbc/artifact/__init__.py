"""The artifact: what a checkpoint, the converted weights and a library's manifest are, and how they are made.

Config (config.py) and the checkpoint layouts it reads (checkpoint_layouts.py), the weight schemes
(quantization.py) and the tensor list they give (params.py), the converter (convert.py), the quantized files it
also reads (gguf_reader.py with gguf_tokenizer.py, gptq_reader.py) and the safetensors shards it writes
(safetensors_io.py), the two manifests (manifest.py), the memory plan (memory_plan.py) and
what a CUDA fatbin holds (fatbin.py). Both the compile and the runtime side read these.

May import: gptbc.errors, numpy and file-format libraries. Never gptbc.compile, gptbc.runtime, gptbc.serve, and
never TVM at import time (a device-memory query imports it when called).
"""
