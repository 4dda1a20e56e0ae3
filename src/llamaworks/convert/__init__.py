"""Conversion between llamaworks/Meta checkpoints and other ecosystems (Hugging Face, GGUF)."""
