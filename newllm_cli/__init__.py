"""newllm: a command-line toolkit for New-LLM (context vector fixed-point) research."""

__version__ = "0.1.0"
