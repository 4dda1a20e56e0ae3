"""The llamaworks model directory: params.json + model.safetensors + tokenizer.model.

params.json holds Meta's keys and the weights carry Meta's state-dict names, so a
directory reads like Meta's release with safetensors in place of pickles. Loading
maps the file into memory and hands those pages to the model (load_state_dict with
assign=True): no second copy of the weights is ever made on the CPU.

tokenizer.model is any tokenizer file llamaworks reads (`load_tokenizer` picks the class
from the content: SentencePiece for LLaMA 1/2, Meta's tiktoken file for Llama 3, or a
tokenizer.json under that name), written back in the format it was read from. An
instruct model's chat template sits beside it as chat_template.jinja, its named ones (tool_use,
...) as additional_chat_templates/NAME.jinja (the file names transformers uses); the loaded
tokenizer carries them as `tokenizer.chat_template` (a `ChatTemplate`, or None) and
`tokenizer.chat_templates` (name -> ChatTemplate), rendered with the tokenizer's own bos/eos
pieces, so that (model, tokenizer) stays the pair every loader returns. A byte-level tokenizer
whose eos is not its file's (Llama 3 instruct: <|eot_id|>) has it in tokenizer_config.json.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from llamaworks.atomic import atomic_directory, atomic_write_json
from llamaworks.device import parse_dtype
from llamaworks.model import ModelArgs, Transformer
from llamaworks.paths import require_dir, require_file
from llamaworks.tokenizer import ByteLevelBPETokenizer, load_tokenizer
from llamaworks.tokenizer.chat import (
    CHAT_TEMPLATE_FILE,
    ChatTemplate,
    attach_chat_templates,
    token_string,
    write_chat_template_files,
)
from llamaworks.weights import check_state_dict, read_json_file, read_safetensors, save_safetensors

PARAMS, WEIGHTS, TOKENIZER = "params.json", "model.safetensors", "tokenizer.model"
CHAT_TEMPLATE = CHAT_TEMPLATE_FILE  # chat_template.jinja, only for models that have a chat format
TOKENIZER_CONFIG = "tokenizer_config.json"  # only when bos/eos are not the tokenizer file's own
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
    """tokenizer.model in the format the tokenizer was read from; chat_template.jinja and
    additional_chat_templates/NAME.jinja for the chat templates it carries; tokenizer_config.json
    with its bos/eos tokens when they are not the ones the tokenizer file implies (a Llama 3
    instruct model's eos is <|eot_id|>, which neither tokenizer file format can say)."""
    folder = Path(folder)
    tokenizer.save(folder / TOKENIZER)
    write_chat_template_files(tokenizer, folder)
    special = special_token_overrides(tokenizer)
    if special:
        atomic_write_json(folder / TOKENIZER_CONFIG, special)


def special_token_overrides(tokenizer) -> dict[str, str]:
    """{"bos_token", "eos_token"} pieces where the tokenizer's ids are not its file's own
    (`default_bos_id`/`default_eos_id` of a byte-level BPE tokenizer); {} when they are."""
    out = {}
    for key, now, default in (("bos_token", tokenizer.bos_id, getattr(tokenizer, "default_bos_id", tokenizer.bos_id)),
                              ("eos_token", tokenizer.eos_id, getattr(tokenizer, "default_eos_id", tokenizer.eos_id))):
        if now != default and now is not None and now >= 0:
            out[key] = tokenizer.id_to_piece(now)
    return out


def read_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a model directory (or checkpoint folder), with its chat templates and
    special tokens as `read_tokenizer_extras` sets them."""
    folder = Path(folder)
    tok = load_tokenizer(folder / TOKENIZER)
    read_tokenizer_extras(folder, tok)
    return tok


def read_tokenizer_extras(folder: str | os.PathLike, tokenizer) -> None:
    """What a folder says beside the tokenizer file, set on `tokenizer`: the bos/eos tokens of
    tokenizer_config.json (a byte-level BPE tokenizer's; SentencePiece's are in its model), then
    `chat_template` (None without one) and the named `chat_templates`, rendered with those
    tokens. For model directories and Hugging Face folders alike (transformers' file names)."""
    folder = Path(folder)
    config_path = folder / TOKENIZER_CONFIG
    if isinstance(tokenizer, ByteLevelBPETokenizer) and config_path.is_file():
        config = read_json_file(config_path, "tokenizer_config.json")
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: a tokenizer_config.json is a JSON object; copy it from the model again")
        for key in ("bos_token", "eos_token"):
            piece = token_string(config, key, config_path)
            if piece is None:
                continue
            token_id = tokenizer.piece_to_id(piece)
            if token_id < 0:
                raise ValueError(f"{config_path}: {key} is {piece!r}, which {tokenizer.path} does not have as a "
                                 f"token; the tokenizer file and tokenizer_config.json belong to different models: "
                                 f"copy both from one model, or remove {key}")
            if key == "bos_token":
                tokenizer.bos_id = token_id
            elif token_id != tokenizer.eos_id:
                tokenizer.eos_id = token_id  # also a stop id

    def piece(token_id: int | None) -> str | None:
        return tokenizer.id_to_piece(token_id) if token_id is not None and token_id >= 0 else None

    attach_chat_templates(tokenizer, ChatTemplate.folder_templates(folder, bos_token=piece(tokenizer.bos_id),
                                                                   eos_token=piece(tokenizer.eos_id)))


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
