"""A tiny Llama-3-style model directory for tests: a byte-level BPE tiktoken tokenizer.model
(trained here with `tokenizers` on Llama 3's regex, Meta's 256 special tokens appended), random
weights and the llama3 chat template as chat_template.jinja; and stand-in models that make a
generation go where a test needs it (no download, nothing trained for long).

Imported by test modules (tests/ is on sys.path through its conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import save_model
from llamaworks.tokenizer import load_tokenizer
from llamaworks.tokenizer.bpe import LLAMA3_PATTERN, piece_to_bytes, tiktoken_text
from llamaworks.tokenizer.chat import ChatTemplate

# Several scripts, so that training merges bytes inside multi-byte characters and the vocabulary
# has tokens that hold part of a character.
MULTILINGUAL = [
    "naïve café déjà vu, señor; straße über façade. Ångström ça œuvre\n",
    "日本語の文章です。東京は日本の首都です。中文字符和汉字。\n",
    "Привет, мир! Как дела? Ελληνικά γράμματα. עברית ואותיות. العربية\n",
    "😀😃😄 emoji 🎉🎉 and 👍🏽 skin tones, ‘quotes’ “double” — dashes – ... …\n",
]


def train_ranks(docs: list[str], vocab_size: int = 700) -> dict[bytes, int]:
    """tiktoken ranks: the 256 bytes first, then the tokens byte-level BPE training creates."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RawTokenizer

    tk = RawTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(docs, trainer)
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(tk.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        ranks.setdefault(piece_to_bytes(left) + piece_to_bytes(right), len(ranks))
    return ranks


def write_tokenizer(folder: Path, docs: list[str]) -> Path:
    """A Llama 3 tiktoken tokenizer.model in `folder`, trained on `docs` and MULTILINGUAL."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.model"
    path.write_text(tiktoken_text(train_ranks([d[:20000] for d in docs[:4]] + MULTILINGUAL * 10)))
    return path


def make_model_dir(folder: Path, tokenizer_path: Path, template: str | None = "llama3", seed: int = 0,
                   n_layers: int = 1) -> Path:
    """A model directory of random weights over the tokenizer, with the built-in `template`
    saved as its chat_template.jinja (None: a base model, no template)."""
    tok = load_tokenizer(tokenizer_path)
    tok.chat_template = ChatTemplate.builtin(template) if template else None
    args = ModelArgs.from_name("tiny", vocab_size=tok.vocab_size, n_layers=n_layers)
    return save_model(build_model(args, seed=seed).eval(), tok, folder)


class ScriptedModel:
    """A stand-in model that generates `script` after any prompt of `prompt_len` tokens:
    the logits at position p favour script[p - prompt_len + 1]."""

    def __init__(self, vocab_size: int, prompt_len: int, script: list[int], context: int = 256):
        self.args = type("Args", (), {"max_seq_len": context})()
        self.output = type("Output", (), {"weight": torch.zeros(1)})()
        self.vocab_size, self.prompt_len, self.script = vocab_size, prompt_len, list(script)

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        pass

    def __call__(self, tokens, pos=None, rows=None):
        bsz, n = tokens.shape
        if pos is None:
            pos = torch.arange(n).expand(bsz, n)
        at = (pos - self.prompt_len + 1).clamp(0, len(self.script) - 1)
        logits = torch.zeros(bsz, n, self.vocab_size)
        logits.scatter_(-1, torch.tensor(self.script)[at].unsqueeze(-1), 30.0)
        return logits


class StopAfter:
    """A real model whose logits favour `stop_id` from the `after`-th generated token on (for
    any prompt), and which records the ids of every prompt it prefills from its start."""

    def __init__(self, model, stop_id: int, after: int):
        self.model, self.stop_id, self.after = model, stop_id, after
        self.prompts: list[list[int]] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, pos=None, rows=None, **kw):
        logits = self.model(tokens, pos, rows=rows, **kw)
        if rows is not None:  # the engine's prefill (decode steps run every row): a prompt, or its part
            if int(pos[0, 0]) == 0:  # past a cached prefix or a first chunk, it starts later
                self.prompts.append(tokens[0].tolist())
            self.prompt_len = int(pos[0, -1]) + 1
            return logits
        prompt = self.prompt_len
        bump = torch.where(pos >= prompt + self.after - 1, 1e4, 0.0).to(logits.dtype)
        logits = logits.clone()
        logits[..., self.stop_id] += bump
        return logits


@torch.no_grad()
def steer_to_stop(model, prompt_ids: list[int], stop_id: int, max_new: int = 12) -> list[int]:
    """Change `model`'s output row of `stop_id` so that greedy decoding of `prompt_ids` emits it
    after a few tokens: the row becomes 1.05 x the row of a token the model picks at step k, so
    it wins where that token did and (checked here) nowhere before. Returns the tokens before it."""
    def greedy(n):
        ids = list(prompt_ids)
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt_ids):]

    ref = greedy(max_new)
    assert stop_id not in ref, "the random model already stops; pick another seed"
    original = model.output.weight[stop_id].clone()
    for k in range(2, max_new):
        if ref[k] in ref[:k]:
            continue
        model.output.weight[stop_id] = model.output.weight[ref[k]] * 1.05
        if greedy(k + 1) == ref[:k] + [stop_id]:
            return ref[:k]
        model.output.weight[stop_id] = original
    raise AssertionError("no step of the greedy output could be turned into the stop token")
