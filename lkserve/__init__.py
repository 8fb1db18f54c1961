"""lkserve: speculative decoding on vLLM whose draft keeps learning from live traffic."""

__version__ = "0.1.0"
