"""load_model: any checkpoint, ready for inference.

A model directory (quantised or not), a Hugging Face or Meta folder, or a .gguf file, on
the device and in the dtype asked for, in eval mode; a quantised directory gets its
quantised layers before the integer weights are mapped in, and bf16 linears on CPU get the
faster one-row kernel (kernels.GemvLinear).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llamaworks.convert.formats import load_any
from llamaworks.inference.kernels import use_gemv
from llamaworks.inference.quant import read_quantization, swap_empty


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               tokenizer: bool = True):
    """(model, tokenizer) from any checkpoint path; the model is in eval mode.

    Weights keep their stored dtype unless `dtype` is given (then converted one tensor at
    a time, so peak memory stays about one model plus one tensor).
    """
    quant = read_quantization(path) if Path(path).is_dir() else None
    prepare = (lambda model: swap_empty(model, **quant)) if quant else None
    model, tok = load_any(path, device=device, dtype=dtype, tokenizer=tokenizer, prepare=prepare)
    if model.output.weight.device.type == "cpu":
        use_gemv(model)  # bf16 weights: a faster one-row kernel for decoding (no-op otherwise)
    return model.eval(), tok
