"""Meta/llamaworks <-> Hugging Face `LlamaForCausalLM`: key map, q/k permutation, config.

Meta's RoPE rotates interleaved pairs (rows 2i, 2i+1 of each head); transformers'
`rotate_half` rotates rows i and i + head_dim/2. The same model therefore needs the
wq/wk rows reordered within each head when crossing over; everything else is renamed.
"""

from __future__ import annotations

import torch

from llamaworks.atomic import atomic_write_json, atomic_write_text
from llamaworks.model import ModelArgs, ffn_params
from llamaworks.modeldir import read_tokenizer_extras
from llamaworks.paths import path_kind, require_file
from llamaworks.tokenizer.bpe import ByteLevelBPETokenizer
from llamaworks.tokenizer.chat import write_chat_template_files
from llamaworks.tokenizer.hf import HFTokenizer, save_tokenizer_json
from llamaworks.tokenizer.sentencepiece import load_tokenizer
from llamaworks.weights import check_finite, model_from_state, read_json_file, read_safetensors

# Per-layer suffixes, Meta -> HF (prefix layers.N. -> model.layers.N.).
LAYER_KEYS: dict[str, str] = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_KEYS: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def key_map(n_layers: int, tied: bool = False) -> dict[str, str]:
    """Every Meta state-dict key of an n_layers model -> its HF name. A tied model
    (tie_word_embeddings) has no output layer of its own: no output.weight / lm_head.weight."""
    out = {m: h for m, h in TOP_KEYS.items() if not (tied and m == "output.weight")}
    for i in range(n_layers):
        out.update({f"layers.{i}.{m}": f"model.layers.{i}.{h}" for m, h in LAYER_KEYS.items()})
    return out


def _pair_view(w: torch.Tensor, n_heads: int) -> tuple[int, int]:
    if w.dim() != 2 or w.shape[0] % (2 * n_heads):
        raise ValueError(f"cannot split a {tuple(w.shape)} projection into {n_heads} heads of even size")
    return w.shape[0] // n_heads // 2, w.shape[1]


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved rows (2i, 2i+1) of each head -> HF rows (i, i + head_dim/2)."""
    half, cols = _pair_view(w, n_heads)
    return w.reshape(n_heads, half, 2, cols).transpose(1, 2).reshape(w.shape)


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_for_hf."""
    half, cols = _pair_view(w, n_heads)
    return w.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(w.shape)


def _check_keys(got, expected, what: str):
    unknown, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
    if unknown or missing:
        raise ValueError(
            f"{what} state dict does not match the model: unknown keys {unknown}, missing keys {missing}"
        )


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta-keyed tensors -> LlamaForCausalLM-keyed tensors (q/k permuted; others shared, not copied)."""
    names = key_map(args.n_layers, args.tie_word_embeddings)
    _check_keys(sd, names, "Meta")
    return _rename(sd, names, {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads},
                   permute_for_hf)


def from_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM-keyed tensors -> Meta-keyed tensors; HF's rotary inv_freq buffers are dropped."""
    names = {h: m for m, h in key_map(args.n_layers, args.tie_word_embeddings).items()}
    # Older transformers saved the (recomputable) RoPE frequencies as a persistent buffer.
    sd = {k: t for k, t in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_word_embeddings and "lm_head.weight" in sd:
        # Some exports of a tied model write the shared tensor under both names.
        head, emb = sd.pop("lm_head.weight"), sd.get("model.embed_tokens.weight")
        if emb is not None and not torch.equal(head, emb):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight; "
                             "set tie_word_embeddings to false in config.json if the model has its own output layer")
    _check_keys(sd, names, "Hugging Face")
    return _rename(sd, names, {"self_attn.q_proj.weight": args.n_heads, "self_attn.k_proj.weight": args.n_kv_heads},
                   unpermute_from_hf)


def _rename(sd: dict[str, torch.Tensor], names: dict[str, str], rotary: dict[str, int],
            permute) -> dict[str, torch.Tensor]:
    """Tensors under their new names; the q/k projections (key suffix -> heads) re-ordered by
    `permute` for the other rotary row layout, every other tensor shared, not copied."""
    out = {}
    for k, t in sd.items():
        suffix = next((s for s in rotary if k.endswith(s)), None)
        out[names[k]] = t if suffix is None else permute(t, rotary[suffix])
    return out


# HF rope_type "llama3" (Llama 3.1's scaling): its keys -> ModelArgs fields.
LLAMA3_ROPE_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                    "high_freq_factor": "rope_high_freq_factor",
                    "original_max_position_embeddings": "rope_old_context_len"}


def hf_rope_scaling(args: ModelArgs) -> dict | None:
    """config.json's rope_scaling for `args`: None, {"rope_type": "linear", "factor"} or
    {"rope_type": "llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}."""
    if args.use_scaled_rope:
        return {"rope_type": "llama3", **{k: getattr(args, f) for k, f in LLAMA3_ROPE_KEYS.items()}}
    if args.rope_scaling_factor is not None:
        return {"rope_type": "linear", "factor": args.rope_scaling_factor}
    return None


def hf_config_dict(args: ModelArgs, dtype: torch.dtype | str = torch.float32) -> dict:
    """A LlamaConfig/config.json dict for `args`.

    Both spellings of RoPE and dtype are written: transformers 5 reads `rope_parameters`/
    `dtype`, transformers 4 and most other readers (llama.cpp's converter, vLLM) read
    `rope_theta`, `rope_scaling` and `torch_dtype`.
    """
    if args.vocab_size <= 0:
        raise ValueError(f"vocab_size={args.vocab_size} is unresolved; set it from the tokenizer first")
    dtype_name = str(dtype).removeprefix("torch.")
    scaling = hf_rope_scaling(args)
    rope = {"rope_type": "default", **(scaling or {}), "rope_theta": args.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        **({"rope_scaling": scaling} if scaling else {}),
        "rope_parameters": rope,
        "max_position_embeddings": args.max_seq_len,
        "vocab_size": args.vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def rope_args_from_hf(cfg: dict) -> dict:
    """ModelArgs' RoPE fields from a config.json: rope_theta and rope_scaling (transformers 4,
    most released files) or rope_parameters (transformers 5); where both are written they must
    agree. Types other than "default", "linear" and "llama3" are refused: run without their
    scaling, the model would silently degrade on long inputs."""
    found = {}
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key) is None:
            continue
        if not isinstance(cfg[key], dict):
            raise ValueError(f"{key}={cfg[key]!r}: expected an object or null")
        params = dict(cfg[key])
        kind, legacy = params.pop("rope_type", None), params.pop("type", None)
        if kind is not None and legacy is not None and kind != legacy:
            raise ValueError(f"{key} gives rope_type {kind!r} and type {legacy!r}; keep one")
        found[key] = (kind or legacy or "default", params.pop("rope_theta", None), params)
    takes = {"default": {}, "linear": {"factor": "rope_scaling_factor"}, "llama3": LLAMA3_ROPE_KEYS}
    for source, (kind, _, _) in found.items():
        if kind not in takes:
            hint = (" (dynamic scaling changes nothing within max_position_embeddings: rope_scaling null runs "
                    "the model exactly up to that length)" if kind == "dynamic" else "")
            raise ValueError(f"unsupported Hugging Face config: {source} rope_type {kind!r} is not implemented; "
                             f"llamaworks runs 'default', 'linear' and 'llama3' (Llama 3.1) RoPE{hint}")
    thetas = {cfg.get("rope_theta"), *(theta for _, theta, _ in found.values())} - {None}
    if len(thetas) > 1:
        raise ValueError(f"rope_theta is given as {sorted(thetas)} (rope_theta, rope_parameters); keep one")
    specs = [(kind, params) for kind, _, params in found.values()]
    if specs[1:] and specs[0] != specs[1]:
        raise ValueError(f"rope_scaling {cfg['rope_scaling']} and rope_parameters {cfg['rope_parameters']} "
                         "disagree; keep one of them")
    source = next(iter(found), "rope_scaling")  # rope_scaling first, as transformers 5 reads them
    kind, _, params = found.get(source, ("default", None, {}))
    out, expected = {"rope_theta": thetas.pop() if thetas else 10000.0}, takes[kind]
    if set(params) != set(expected):
        extra, missing = sorted(set(params) - set(expected)), sorted(set(expected) - set(params))
        raise ValueError(f"{source} of rope_type {kind!r} " + (f"has unknown keys {extra}" if extra else
                         f"lacks {missing}") + f"; it takes {sorted(expected) or 'no other keys'}")
    for key, field in expected.items():
        value = params[key]
        integer = key == "original_max_position_embeddings"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise ValueError(f"{source} {key} must be a{'n integer' if integer else ' number'}, got {value!r}")
        out[field] = value
    out["use_scaled_rope"] = kind == "llama3"
    return out


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a config.json / LlamaConfig.to_dict() dict; rejects what the model cannot express."""

    def bad(why):
        return ValueError(f"unsupported Hugging Face config: {why}")

    def integer(key, default=None):
        # Checked here, under config.json's own key names (ModelArgs would name its fields).
        value = cfg.get(key, default)
        if value is None:
            raise ValueError(f"{key} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        return value

    if not isinstance(cfg, dict):
        raise ValueError(f"expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("model_type", "llama") != "llama":
        raise bad(f"model_type={cfg['model_type']!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag, False):
            raise bad(f"{flag}=True")
    # Keys of other architectures that a "llama" config may still carry.
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "sliding_window", "use_sliding_window"):
        if cfg.get(key):
            raise bad(f"{key}={cfg[key]!r} ({'sliding-window attention' if 'sliding' in key else 'mixture of experts'}"
                      ", not LLaMA)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise bad(f"hidden_act={cfg['hidden_act']!r}")
    tied = cfg.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ValueError(f"tie_word_embeddings must be true or false, got {tied!r}")
    dim, n_heads = integer("hidden_size"), integer("num_attention_heads")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and (head_dim != dim // n_heads or isinstance(head_dim, bool) or dim % n_heads):
        raise bad(f"head_dim={head_dim!r}, but hidden_size/num_attention_heads is {dim}/{n_heads}: heads of "
                  "another width than hidden_size/num_attention_heads are not LLaMA's (a config.json for a "
                  f"Llama model has head_dim {dim // n_heads} or none)")
    multiple_of, mult = ffn_params(dim, integer("intermediate_size"))
    return ModelArgs(
        dim=dim,
        n_layers=integer("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=integer("num_key_value_heads", n_heads),
        vocab_size=integer("vocab_size"),
        multiple_of=multiple_of,
        ffn_dim_multiplier=mult,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_seq_len=integer("max_position_embeddings", 2048),
        tie_word_embeddings=tied,
        **rope_args_from_hf(cfg),
    )


# --- Hugging Face folders ----------------------------------------------------------------------

HF_CONFIG, HF_GENERATION = "config.json", "generation_config.json"
ST_SINGLE, ST_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# transformers' save_pretrained default (max_shard_size="5GB"): 7B in fp16 becomes 3 files.
MAX_SHARD_BYTES = 5 * 10**9


def _hf_tensor(key: str, t: torch.Tensor, args: ModelArgs, dtype: torch.dtype | None) -> torch.Tensor:
    if key.endswith("attention.wq.weight"):
        t = permute_for_hf(t, args.n_heads)
    elif key.endswith("attention.wk.weight"):
        t = permute_for_hf(t, args.n_kv_heads)
    return t.to(dtype or t.dtype).detach().contiguous()


def write_hf_files(state: dict[str, torch.Tensor], args: ModelArgs, tokenizer, folder, dtype=None,
                   max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = False) -> None:
    """A `LlamaForCausalLM` folder's files, written into an existing (temporary) folder.

    Tensors are converted one file at a time, so the extra memory is about one shard file.
    """
    from pathlib import Path

    from safetensors.torch import save_file
    from tqdm import tqdm

    folder = Path(folder)
    names = key_map(args.n_layers, args.tie_word_embeddings)
    _check_keys(state, names, "Meta")
    if tokenizer is not None and tokenizer.vocab_size != args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but vocab_size is {args.vocab_size}")
    out_dtype = dtype or next(iter(state.values())).dtype
    groups, size = [[]], 0
    for k, t in state.items():  # plan the files first: their names carry the count
        nbytes = t.numel() * out_dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    n = len(groups)
    files = [ST_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    with tqdm(total=len(state), desc="writing safetensors", unit="tensor", disable=not progress,
              leave=False) as bar:
        for fname, keys in zip(files, groups):
            part = {}
            for k in keys:
                part[names[k]] = _hf_tensor(k, state[k], args, dtype)
                weight_map[names[k]] = fname
                total += part[names[k]].numel() * part[names[k]].element_size()
                bar.update(1)
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            del part
    if n > 1:
        atomic_write_json(folder / ST_INDEX, {"metadata": {"total_size": total},
                                              "weight_map": dict(sorted(weight_map.items()))})
    cfg = hf_config_dict(args, out_dtype)
    bos, eos = (tokenizer.bos_id, tokenizer.eos_id) if tokenizer is not None else (1, 2)
    cfg.update(bos_token_id=bos, eos_token_id=eos)
    atomic_write_json(folder / HF_CONFIG, cfg)
    atomic_write_json(folder / HF_GENERATION, {"bos_token_id": bos, "eos_token_id": eos})
    if tokenizer is not None:
        write_hf_tokenizer_files(tokenizer, folder)


def write_hf_tokenizer_files(tokenizer, folder) -> None:
    """tokenizer.json (+ tokenizer.model when SentencePiece), tokenizer_config.json, special_tokens_map.json."""
    from pathlib import Path

    folder = Path(folder)
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(folder / "tokenizer.json")
    elif isinstance(tokenizer, ByteLevelBPETokenizer):
        # Llama 3's HF folders hold tokenizer.json only (the tiktoken file lives in original/).
        atomic_write_text(folder / "tokenizer.json", tokenizer.to_json())
    else:
        tokenizer.save(folder / "tokenizer.model")
        save_tokenizer_json(tokenizer, folder / "tokenizer.json")
    piece = tokenizer.id_to_piece
    special = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id)}
    if tokenizer.unk_id >= 0:  # byte-level BPE has no unknown token
        special["unk_token"] = piece(tokenizer.unk_id)
    # transformers 5 reads chat_template.jinja and additional_chat_templates/; 4.x the config key below
    templates = write_chat_template_files(tokenizer, folder)
    if set(templates) - {"default"}:
        chat_template = [{"name": name, "template": t.source} for name, t in templates.items()]
    else:
        chat_template = templates["default"].source if templates else None
    # PreTrainedTokenizerFast loads tokenizer.json as written. Naming LlamaTokenizer instead
    # would make transformers 5 rebuild the pipeline with its Metaspace "first" scheme, which
    # drops SentencePiece's dummy prefix before a leading space (" a" -> different ids).
    atomic_write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30, "legacy": True,
        **({"chat_template": chat_template} if chat_template is not None else {}),
    })
    atomic_write_json(folder / "special_tokens_map.json", special)


def read_hf_state_dict(folder) -> dict[str, torch.Tensor]:
    """HF-keyed tensors of a folder: model.safetensors, sharded safetensors with an index,
    or pytorch_model*.bin; memory-mapped, not read."""
    from pathlib import Path

    folder = Path(folder)

    def index_files(index):
        # An index may be up to a few MB (one line per tensor); its file names stay inside the
        # folder: a name with a path in it could point at any file (or at /dev/zero).
        wm = read_json_file(index, "a weight index", max_bytes=64 << 20)
        wm = wm.get("weight_map") if isinstance(wm, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ValueError(f"{index}: not a valid weight index (expected {{\"weight_map\": {{tensor: file}}}}); "
                             "re-download it")
        files = sorted(set(wm.values()))
        outside = [f for f in files if f in ("", ".", "..") or "/" in f or "\\" in f or "\0" in f]
        if outside:
            raise ValueError(f"{index}: lists {outside[0]!r}, which is not a file name in {folder}; the index is "
                             "corrupt or hostile")
        missing = [f for f in files if path_kind(folder / f) == "missing"]
        if missing:
            raise ValueError(f"{index} lists {', '.join(missing[:3])}, which {'is' if len(missing) == 1 else 'are'} "
                             f"missing from {folder}; copy every shard file")
        return [require_file(folder / f, f"listed in {index.name}") for f in files]

    if (folder / ST_INDEX).is_file():
        paths, reader = index_files(folder / ST_INDEX), read_safetensors
    elif (folder / ST_SINGLE).is_file():
        paths, reader = [folder / ST_SINGLE], read_safetensors
    elif (folder / BIN_INDEX).is_file():
        paths, reader = index_files(folder / BIN_INDEX), _read_bin
    elif (folder / BIN_SINGLE).is_file():
        paths, reader = [folder / BIN_SINGLE], _read_bin
    else:
        raise FileNotFoundError(f"{folder}: no weights ({ST_SINGLE}, {ST_INDEX}, {BIN_SINGLE} or {BIN_INDEX}); "
                                "is this a Hugging Face model folder?")
    state = {}
    for p in paths:
        for k, t in reader(p).items():
            if k in state:
                raise ValueError(f"{p}: tensor {k} also appears in another shard; the folder mixes checkpoints")
            state[k] = t
    return state


def _read_bin(path) -> dict[str, torch.Tensor]:
    import pickle
    import zipfile

    # weights_only: torch's restricted unpickler, which builds tensors and plain containers and
    # refuses every other global, so a hostile pickle cannot run code.
    try:
        sd = torch.load(require_file(path), map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise ValueError(f"{path}: truncated or corrupt checkpoint ({str(e).splitlines()[0] if str(e) else e!r}); "
                         "re-download it") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: not a state dict of named tensors; expected a pytorch_model.bin")
    check_finite(sd, path)
    return sd


def load_hf(folder, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a `LlamaForCausalLM` folder; tokenizer.model is preferred over
    tokenizer.json, neither gives None; the folder's chat template travels as
    `tokenizer.chat_template`."""
    from pathlib import Path

    folder = Path(folder)
    cfg = read_json_file(folder / HF_CONFIG, "config.json", hint=f"is {folder} a Hugging Face model folder?")
    try:
        args = args_from_hf_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / HF_CONFIG}: {e}") from None
    tok = None
    # tokenizer.model: SentencePiece (LLaMA 1/2) or Llama 3's tiktoken file; tokenizer.json:
    # its SentencePiece-style or byte-level twin. load_tokenizer tells them apart by content.
    for name in ("tokenizer.model", "tokenizer.json"):
        if (folder / name).is_file():
            tok = load_tokenizer(folder / name)
            read_tokenizer_extras(folder, tok)  # eos_token of tokenizer_config.json, the chat templates
            break
    hf_state = read_hf_state_dict(folder)
    # key_map lists every layer's names: a num_hidden_layers that the tensors cannot hold is
    # refused before that list is made.
    if args.n_layers > len(hf_state):
        raise ValueError(f"{folder / HF_CONFIG}: num_hidden_layers={args.n_layers}, but the weights hold only "
                         f"{len(hf_state)} tensors; config.json and the weights disagree")
    try:
        state = from_hf_state_dict(hf_state, args)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}; config.json and the weights disagree") from None
    return model_from_state(args, state, folder, dtype, config="config.json"), tok
