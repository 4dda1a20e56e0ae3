"""load_model: any checkpoint, ready for inference.

A model directory (quantised or not), a Hugging Face or Meta folder, or a .gguf file, on
the device and in the dtype asked for, in eval mode; a quantised directory gets its
quantised layers before the integer weights are mapped in, and bf16 linears on CPU get the
faster one-row kernel (kernels.GemvLinear). With `adapter`, a LoRA adapter directory
(PEFT's layout, inference/lora.py) is applied on top, unmerged: over a quantised base too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llamaworks.convert.formats import load_any
from llamaworks.inference.kernels import use_gemv
from llamaworks.inference.lora import load_adapter, read_adapter_config
from llamaworks.inference.quant import read_quantization, swap_empty


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               tokenizer: bool = True, adapter: str | os.PathLike | None = None):
    """(model, tokenizer) from any checkpoint path; the model is in eval mode.

    Weights keep their stored dtype unless `dtype` is given (then converted one tensor at
    a time, so peak memory stays about one model plus one tensor). `adapter`: a LoRA adapter
    directory (adapter_config.json + adapter_model.safetensors) wrapped around the loaded
    projections; its factors keep their stored dtype (fp32 as trained), whatever `dtype` is.
    """
    if adapter is not None:
        read_adapter_config(adapter)  # a wrong adapter directory is named before the model is read
    quant = read_quantization(path) if Path(path).is_dir() else None
    prepare = (lambda model: swap_empty(model, **quant)) if quant else None
    model, tok = load_any(path, device=device, dtype=dtype, tokenizer=tokenizer, prepare=prepare)
    if model.output.weight.device.type == "cpu":
        use_gemv(model)  # bf16 weights: a faster one-row kernel for decoding (no-op otherwise)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval(), tok
