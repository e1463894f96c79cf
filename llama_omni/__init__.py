"""llama-omni: speech in, text and speech out, streaming (after LLaMA-Omni, arXiv 2409.06666)."""

__version__ = "0.1.0"
