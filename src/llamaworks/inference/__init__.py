"""Inference: loading any checkpoint (load.py), sampling, generation, speculative decoding,
quantised layers (quant.py) and CPU kernels, and the `generate` / `quantize` commands."""
