"""Inference: loading any checkpoint (load.py), sampling, generation, speculative decoding,
quantised layers (quant.py), LoRA adapters (lora.py), CPU kernels, and the `generate`,
`quantize`, `merge` and `chat` commands."""
