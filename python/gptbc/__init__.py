"""gptbc: compile GPTBigCode models (SantaCoder, StarCoder) with TVM Relax and run them."""

__version__ = "0.1.0"
