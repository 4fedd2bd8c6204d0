"""Bundled model presets (HF-style config.json files), installed as the package `gptbc.presets`."""
