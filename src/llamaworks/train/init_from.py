"""`pretrain --init-from DIR`: continue pretraining from a checkpoint in any format `convert`
reads (a model directory, a Hugging Face or Meta folder, a .gguf file).

The model is the checkpoint's: its arguments are the run's (a [model] field the config sets must
agree with them: ModelConfig.checkpoint_args) and its weights fill the materialised model, each
rank keeping its shards as it would keep a preset's random weights. The rest is a fresh
pretraining run: the optimizer's moments start at zero at step 0 and the learning rate follows
the paper's warm-up and cosine schedule over train.max_steps, as for a new model (continued
pretraining usually lowers optim.lr and schedule.warmup_steps). The token shards must be in the
checkpoint's vocabulary; the checkpoint's tokenizer, when it has one, is the run's (its chat
templates and eos travel into every checkpoint and the final model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llamaworks.convert.formats import load_any
from llamaworks.model import ModelArgs
from llamaworks.parallel.distributed import is_distributed

log = logging.getLogger("llamaworks")


@dataclass
class InitFrom:
    """A checkpoint to start from: its path, arguments, weights (fp32, memory-mapped where the
    format allows) and tokenizer (None when the checkpoint has none)."""

    path: str
    args: ModelArgs
    state: dict[str, torch.Tensor]
    tokenizer: Any | None

    @property
    def name(self) -> str:
        """For logs and the loss curve's title."""
        return f"continued pretraining of {Path(self.path).name}"

    def run_tokenizer(self, data_tokenizer, manifest: dict, data_dir: str):
        """The tokenizer the run saves: the checkpoint's, else the shards'; either way the shards'
        vocabulary must be the model's, or the ids would index other embeddings (or none)."""
        data_vocab = int(manifest.get("vocab_size") or data_tokenizer.vocab_size)
        for what, size in (("token shards in " + str(data_dir), data_vocab),
                           ("their tokenizer " + str(getattr(data_tokenizer, "path", "")), data_tokenizer.vocab_size)):
            if size != self.args.vocab_size:
                raise ValueError(f"--init-from {self.path} has vocab_size={self.args.vocab_size} but the {what} "
                                 f"have {size} tokens: pretraining continues on data tokenised with the checkpoint's "
                                 "own tokenizer; run `llamaworks prepare` with that tokenizer (or choose a checkpoint "
                                 "of this vocabulary)")
        return self.tokenizer if self.tokenizer is not None else data_tokenizer

    def weights_init(self, model, seed: int, device: torch.device) -> None:
        """ModelSpec.init: the checkpoint's weights into the materialised (possibly sharded) model;
        `seed` is unused (nothing is drawn). The state is released once copied."""
        copy_state(model, self.state, device)


@torch.no_grad()
def copy_state(model, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """A whole checkpoint `state` (Meta's names, fp32) into a materialised model that may be
    sharded (FSDP/TP: each rank keeps its shards), strictly; the state is released once copied."""
    if is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Every rank holds the whole state (memory-mapped where the format allows) and keeps its shards.
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        model.load_state_dict(state, strict=True)
    model.init_rope(device)
    state.clear()


def load_init_from(model_cfg) -> InitFrom:
    """The checkpoint model.init_from names, its arguments checked against the [model] section."""
    path = model_cfg.init_from
    model, tokenizer = load_any(path, device="cpu", dtype=torch.float32)
    args = model_cfg.checkpoint_args(model.args, path)
    log.info("--init-from %s: %s", path, args)
    return InitFrom(path, args, model.state_dict(), tokenizer)
