"""kvpack: LLM serving with a compressed, shareable KV cache."""
__version__ = "0.1.0"
