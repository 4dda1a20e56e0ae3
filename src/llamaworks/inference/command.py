"""The inference commands: `llamaworks generate`, `llamaworks quantize` and `llamaworks merge`."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llamaworks.args import Arg
from llamaworks.device import resolve_device
from llamaworks.inference.generate import generate
from llamaworks.inference.load import load_model
from llamaworks.inference.lora import ADAPTER_CONFIG, lora_layers, merge_adapter, read_adapter_config
from llamaworks.inference.quant import MODES, MODES_HELP, get_mode, quantize_model, read_quantization, save_quantized
from llamaworks.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from llamaworks.inference.speculative import generate_with_draft
from llamaworks.modeldir import QUANT_FILE, WEIGHTS, save_model
from llamaworks.parallel.distributed import close_distributed, env_world_size, init_distributed
from llamaworks.parallel.tp_load import load_tensor_parallel


def generate_command(
    checkpoint: Annotated[str, Arg("model directory (params.json, model.safetensors, tokenizer.model)")],
    prompt: Annotated[list[str], Arg("prompt text; several prompts run as one batch")],
    max_new_tokens: Annotated[int, Arg("tokens to generate per prompt")] = 256,
    temperature: Annotated[float, Arg("sampling temperature; 0 is greedy")] = DEFAULT_TEMPERATURE,
    top_p: Annotated[float, Arg("nucleus sampling mass")] = DEFAULT_TOP_P,
    top_k: Annotated[int | None, Arg("keep only the k most likely tokens")] = None,
    seed: Annotated[int | None, Arg("random seed; the same seed gives the same sample")] = None,
    stop: Annotated[list[str] | None, Arg("stop strings (not included in the output)")] = None,
    truncate: Annotated[bool, Arg("keep the last tokens of a prompt longer than the context window")] = False,
    device: Annotated[str, Arg("cpu, cuda, cuda:N or auto")] = "auto",
    dtype: Annotated[str | None, Arg("float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)")] = None,
    compile: Annotated[bool, Arg("torch.compile the decode step (with CUDA graphs on a GPU)")] = False,
    compile_prefill: Annotated[bool, Arg("also torch.compile the prompt's forward pass (dynamic shapes)")] = False,
    fuse: Annotated[bool, Arg("run q/k/v and the SwiGLU gate/up projections as one product each "
                              "(load-time fusion; --no-fuse for Meta's separate products)")] = True,
    draft: Annotated[str | None, Arg("draft model directory: speculative decoding (batched)")] = None,
    draft_k: Annotated[int, Arg("tokens the draft proposes per target forward")] = 4,
    adapter: Annotated[str | None, Arg("LoRA adapter directory (PEFT's adapter_config.json + "
                                       "adapter_model.safetensors) applied to the checkpoint, unmerged")] = None,
) -> int:
    """Generate a completion for each prompt; prints the text, then speed on stderr."""
    dev, dt = resolve_device(device, dtype)
    out, err, env = sys.stdout, sys.stderr, None
    if env_world_size() > 1:  # under torchrun: tensor parallelism, each process holds 1/N of the weights
        if draft is not None:
            raise ValueError("--draft (speculative decoding) runs in one process; launch it without torchrun")
        if adapter is not None:
            raise ValueError("--adapter runs in one process; merge it into the model first (llamaworks merge) to "
                             "generate with tensor parallelism")
        env, dev, model, tokenizer, seed = _setup_tensor_parallel(checkpoint, dev, dt, seed)
        if not env.is_main:  # the other ranks compute the same tokens in silence
            out = err = io.StringIO()
    else:
        model, tokenizer = load_model(checkpoint, device=dev, dtype=dt, adapter=adapter, fuse=fuse)
    torch.manual_seed(0)
    if draft is not None:
        return generate_with_draft(model, tokenizer, draft, prompt, max_new_tokens, k=draft_k, device=dev, dtype=dt,
                                   target_name=checkpoint, temperature=temperature, top_k=top_k, top_p=top_p,
                                   stop=stop or (), seed=seed, truncate=truncate)
    streaming = len(prompt) == 1

    def show(i, delta):
        out.write(delta)
        out.flush()

    if streaming:
        out.write(prompt[0])
    results = generate(model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       stop=stop or (), seed=seed, truncate=truncate, compile=compile, compile_prefill=compile_prefill,
                       on_text=show if streaming else None)
    if streaming:
        out.write("\n")
    else:
        for p, r in zip(prompt, results):
            print(f"{p}{r.text}\n{'-' * 40}", file=out)
    s = results[0].stats
    where = f"{dev}" if env is None else f"{env.world_size} x {dev.type}, tensor parallel"
    print(f"prefill: {s['prefill_tokens']} tokens, {s['prefill_tokens_per_s']:.1f} tokens/s | "
          f"decode: {s['decode_tokens']} tokens, {s['decode_tokens_per_s']:.1f} tokens/s "
          f"({where}, {str(dt).removeprefix('torch.')})"
          + (f" | compile: {s['compile_s']:.1f} s, before the prefill, not timed in either" if compile else ""),
          file=err)
    if env is not None:
        close_distributed(env)
    return 0


def _setup_tensor_parallel(checkpoint: str, dev: torch.device, dt: torch.dtype, seed: int | None):
    """Join torchrun's process group, split the model over a 1-D mesh of all ranks
    (parallel/tp_load.py: load_tensor_parallel) and agree on one sampling seed: every rank
    samples from the same gathered logits with the same generator, so all ranks pick the
    same tokens and their KV caches stay consistent. -> (env, device, model, tokenizer, seed)"""
    env, dev = init_distributed(dev)
    mesh = init_device_mesh(dev.type, (env.world_size,), mesh_dim_names=("tp",))
    model, tokenizer = load_tensor_parallel(checkpoint, mesh, dev, dt)
    if seed is None:  # rank 0's random seed for all
        chosen = torch.tensor([torch.seed() % 2**63], dtype=torch.int64, device=dev)
        dist.broadcast(chosen, src=0)
        seed = int(chosen.item())
    return env, dev, model, tokenizer, seed


def quantize_command(
    checkpoint: Annotated[str, Arg("model directory to quantise (params.json, model.safetensors, tokenizer.model), "
                                   "or a .gguf file")],
    output: Annotated[str, Arg("model directory to write")],
    # The choices are the registered modes (inference/quant.py): Literal of the tuple MODES.
    mode: Annotated[Literal[MODES], Arg(MODES_HELP)],
    group_size: Annotated[int, Arg("int4: input columns sharing one scale and zero (32, 64, 128 or 256)")] = 128,
) -> int:
    """Weight-only quantisation of a model directory; prints the size before and after."""
    options = {"group_size": group_size}  # each mode takes those it has (inference/quant.py: get_mode)
    spec = get_mode(mode, **options)
    if read_quantization(checkpoint) is not None:
        raise ValueError(f"{checkpoint} is already quantised ({QUANT_FILE}); quantise the original model")
    if Path(output).resolve() == Path(checkpoint).resolve():
        raise ValueError("--output must differ from --checkpoint (the original is read while writing)")
    model, tokenizer = load_model(checkpoint, fuse=False)  # quantize_model finds the projections by name
    quantize_model(model, mode, **options)
    save_quantized(model, tokenizer, output, mode, **options)
    src = Path(checkpoint)
    before = (src if src.is_file() else src / WEIGHTS).stat().st_size  # a .gguf file, or a directory
    after = (Path(output) / WEIGHTS).stat().st_size
    print(f"wrote {output}: {spec.describe()}, weights {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB", file=sys.stderr)
    return 0


def merge_command(
    checkpoint: Annotated[str, Arg("base model: a model directory (quantised or not), a Hugging Face or Meta "
                                   "folder, or a .gguf file")],
    adapter: Annotated[str, Arg("LoRA adapter directory (adapter_config.json + adapter_model.safetensors), "
                                "ours or PEFT's")],
    out: Annotated[str, Arg("model directory to write", metavar="DIR")],
    dtype: Annotated[str | None, Arg("float32, bfloat16 or float16 (default: the base's; a quantised base "
                                     "gives its scales' dtype)")] = None,
) -> int:
    """Fold a LoRA adapter into its base model: W + (alpha/r) B A for every adapted projection
    (Hu et al. 2021, section 4.1), written as a plain model directory (a quantised base is
    dequantised). The result runs without the adapter and at the base model's speed."""
    read_adapter_config(adapter)  # named before the base is read
    dest = Path(out).resolve()
    for name, src in (("--checkpoint", checkpoint), ("--adapter", adapter)):
        if dest == Path(src).resolve():
            raise ValueError(f"--out must differ from {name} (it is read while writing)")
    model, tokenizer = load_model(checkpoint, dtype=dtype, adapter=adapter, fuse=False)  # writes a plain model
    n = len(lora_layers(model))
    layer = lora_layers(model)[0][1]
    merge_adapter(model)
    save_model(model, tokenizer, out)
    print(f"wrote {out}: {n} projections merged from {Path(adapter) / ADAPTER_CONFIG} (r={layer.r}, "
          f"alpha={layer.alpha}) into {checkpoint}", file=sys.stderr)
    return 0
