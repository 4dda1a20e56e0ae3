"""load_model: any checkpoint, ready for inference.

A model directory (quantised or not), a Hugging Face or Meta folder, or a .gguf file, on
the device and in the dtype asked for, in eval mode; a quantised directory gets its
quantised layers before the integer weights are mapped in. With `adapter`, a LoRA adapter
directory (PEFT's layout, inference/lora.py) is applied on top, unmerged: over a quantised
base too. Then the load-time transforms for decoding: with fuse=True q/k/v and gate/up fused
into one product each (fuse.py; the state dict keeps Meta's names; on by default, so that
generate, serve, chat and eval decode through the fused products), and on CPU the fp32/bf16 linears
swapped for the native one-row kernels (kernels.NativeLinear) and each decode step made one native
call (block.py: the whole eager step, or a call per block in compiled steps), or where those are not built,
bf16 ones for torch.mv (kernels.GemvLinear); a bf16 model's activations in fp32 on CPUs without
hardware bf16 (kernels.use_fp32_activations); last, the CPU weights moved into transparent huge
pages (hugepages.use_hugepages).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llamaworks.convert.formats import load_any
from llamaworks.inference.block import use_native_blocks
from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.hugepages import use_hugepages
from llamaworks.inference.kernels import use_fp32_activations, use_gemv, use_native_kernels
from llamaworks.inference.lora import load_adapter, read_adapter_config
from llamaworks.inference.quant import read_quantization, swap_empty


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               tokenizer: bool = True, adapter: str | os.PathLike | None = None, fuse: bool = True):
    """(model, tokenizer) from any checkpoint path; the model is in eval mode.

    Weights keep their stored dtype unless `dtype` is given (then converted one tensor at
    a time, so peak memory stays about one model plus one tensor). `adapter`: a LoRA adapter
    directory (adapter_config.json + adapter_model.safetensors) wrapped around the loaded
    projections; its factors keep their stored dtype (fp32 as trained), whatever `dtype` is.
    fuse: q/k/v and w1/w3 as one product each (fuse.fuse_projections; adapted projections stay
    apart), for decoding. apply_lora and load_adapter unfuse a fused model themselves; a caller
    that changes the loaded model by other module names (quantize_model, tensor parallelism)
    passes fuse=False, or calls fuse.unfuse first.
    """
    if adapter is not None:
        read_adapter_config(adapter)  # a wrong adapter directory is named before the model is read
    quant = read_quantization(path) if Path(path).is_dir() else None
    prepare = (lambda model: swap_empty(model, **quant)) if quant else None
    model, tok = load_any(path, device=device, dtype=dtype, tokenizer=tokenizer, prepare=prepare)
    if adapter is not None:  # by module name: before fusion, which leaves the adapted projections apart
        load_adapter(model, adapter)
    if fuse:
        fuse_projections(model)
    if model.output.weight.device.type == "cpu":
        if use_native_kernels(model):
            use_native_blocks(model)  # an eager decode step as one native call (block.py)
        else:
            use_gemv(model)  # no native kernels: bf16 weights take torch.mv's faster one-row product
    use_fp32_activations(model)  # bf16 weights, fp32 arithmetic where the CPU has no bf16 (kernels.py)
    use_hugepages(model)  # decode streams every weight: 2 MiB pages spare a TLB miss per 4 KiB (hugepages.py)
    return model.eval(), tok
