"""The llamaworks model directory: params.json + model.safetensors + tokenizer.model.

params.json holds Meta's keys and the weights carry Meta's state-dict names, so a
directory reads like Meta's release with safetensors in place of pickles. Loading
maps the file into memory and hands those pages to the model (load_state_dict with
assign=True): no second copy of the weights is ever made on the CPU.

tokenizer.model is any tokenizer file llamaworks reads (`load_tokenizer` picks the class
from the content: SentencePiece for LLaMA 1/2, Meta's tiktoken file for Llama 3, or a
tokenizer.json under that name), written back in the format it was read from. An
instruct model's chat template sits beside it as chat_template.jinja (the file name
transformers uses); the loaded tokenizer carries it as `tokenizer.chat_template` (a
`ChatTemplate`, or None), rendered with the tokenizer's own bos/eos pieces, so that
(model, tokenizer) stays the pair every loader returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from llamaworks.atomic import atomic_directory, atomic_write_json, atomic_write_text
from llamaworks.device import parse_dtype
from llamaworks.model import ModelArgs, Transformer
from llamaworks.paths import require_dir, require_file
from llamaworks.tokenizer import load_tokenizer
from llamaworks.tokenizer.chat import ChatTemplate
from llamaworks.weights import check_state_dict, read_json_file, read_safetensors, save_safetensors

PARAMS, WEIGHTS, TOKENIZER = "params.json", "model.safetensors", "tokenizer.model"
CHAT_TEMPLATE = "chat_template.jinja"  # only for models that have a chat format
QUANT_FILE = "quantization.json"  # only in quantised directories (llamaworks quantize: inference/quant.py)


def save_model(model: Transformer, tokenizer, path: str | os.PathLike, overwrite: bool = True,
               dtype: torch.dtype | None = None) -> Path:
    """Write a model directory atomically (a temporary folder renamed into place)."""
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_model_files(model, tokenizer, tmp, dtype)
    return path


def write_model_files(model: Transformer, tokenizer, folder: Path, dtype: torch.dtype | None = None) -> None:
    """The model directory's files, written into an existing (temporary) folder."""
    if tokenizer is not None and tokenizer.vocab_size != model.args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                         f"{model.args.vocab_size}; save the tokenizer the model was trained with")
    params = {k: v for k, v in model.args.to_params().items() if v is not None}
    atomic_write_json(folder / PARAMS, params)
    sd = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(sd, folder / WEIGHTS, metadata={"format": "pt"})  # weights 64-byte aligned in the file
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, folder)


def write_tokenizer_files(tokenizer, folder: str | os.PathLike) -> None:
    """tokenizer.model in the format the tokenizer was read from, and chat_template.jinja when
    it carries a chat template."""
    folder = Path(folder)
    tokenizer.save(folder / TOKENIZER)
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        atomic_write_text(folder / CHAT_TEMPLATE, template.source)


def read_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a model directory (or checkpoint folder), with `chat_template` set from
    chat_template.jinja when the folder has one, else None."""
    folder = Path(folder)
    tok = load_tokenizer(folder / TOKENIZER)
    tok.chat_template = read_chat_template(folder, tok)
    return tok


def read_chat_template(folder: str | os.PathLike, tokenizer) -> ChatTemplate | None:
    """chat_template.jinja of `folder`, rendered with the tokenizer's bos and eos pieces; None
    when there is none (a base model)."""
    path = Path(folder) / CHAT_TEMPLATE
    if not path.exists():
        return None

    def piece(token_id: int) -> str | None:
        return tokenizer.id_to_piece(token_id) if token_id is not None and token_id >= 0 else None

    return ChatTemplate.from_file(path, bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id))


def read_params(path: str | os.PathLike) -> dict:
    """The JSON object of a params.json (Meta's keys); ValueError naming the file otherwise."""
    path = Path(path)
    params = read_json_file(path, "params.json")
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object of model arguments")
    return params


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               tokenizer: bool = True, prepare: Callable[[Transformer], object] | None = None):
    """(model, tokenizer) from a model directory; the model is in eval mode. The tokenizer
    is the class its file calls for (SentencePiece or Llama 3's byte-level BPE) and carries
    the directory's chat template as `tokenizer.chat_template` (None without one).

    Weights keep their stored dtype unless `dtype` is given (then converted one tensor at
    a time, so peak memory stays about one model plus one tensor). `prepare(model)` runs on
    the empty meta-device model before the weights are assigned (quantised layers swap in
    there: llamaworks.inference.load_model). Other formats: llamaworks.convert.load_any.
    """
    path = require_dir(path, f"a model directory holds {PARAMS}, {WEIGHTS} and {TOKENIZER}")
    for name in (PARAMS, WEIGHTS) + ((TOKENIZER,) if tokenizer else ()):
        hint = " (a training run folder keeps its final model in OUT/model)" if (path / "model").is_dir() else ""
        require_file(path / name, f"a model directory holds {PARAMS}, {WEIGHTS} and {TOKENIZER}{hint}")
    dtype = parse_dtype(dtype)
    tok = read_tokenizer(path) if tokenizer else None
    params = read_params(path / PARAMS)
    if params.get("vocab_size", -1) == -1:
        if tok is None:
            raise ValueError(f"{path / PARAMS}: vocab_size is -1 (\"from the tokenizer\"); load the tokenizer too, "
                             "or write the vocabulary size into params.json")
        params["vocab_size"] = tok.vocab_size  # Meta's convention: -1 means "from the tokenizer"
    try:
        args = ModelArgs.from_params(params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / PARAMS}: {e}") from None
    if tok is not None and tok.vocab_size != args.vocab_size:
        raise ValueError(f"vocabulary mismatch: {path / PARAMS} says vocab_size={args.vocab_size} but "
                         f"{path / TOKENIZER} has {tok.vocab_size} tokens (special tokens included); use the tokenizer "
                         "the model was trained with (or fix vocab_size in params.json)")
    device = torch.device(device)
    # On the meta device no weight is read (tensor-parallel loading reads its slices itself).
    state = read_safetensors(path / WEIGHTS, check_values=device.type != "meta")
    check_state_dict(args, state, path / WEIGHTS, prepare, str(path / PARAMS))  # before building the model
    with torch.device("meta"):
        model = Transformer(args)
    if prepare is not None:
        prepare(model)
    for k, v in state.items():
        if dtype is not None and v.dtype != dtype and v.is_floating_point():  # int weights stay int
            v = v.to(dtype)
        state[k] = v.to(device)  # no-op on CPU: the mmap pages become the parameters
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(device)
    return model.eval(), tok
