"""llamachat: a terminal chat for local LLaMA-family models, on its own PyTorch engine."""

__version__ = "0.1.0.dev0"
