"""What the in-process serving benchmarks (prefix_ttft.py, speculative_serve.py) share: the model
presets they run with random weights, and a tokenizer for random token ids."""

from __future__ import annotations

import types

from llamaworks.model import ModelArgs

# "Config A" of the issue tracker (benchmarks/decode.py): ~60M parameters.
PRESETS = {"A": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=2048),
           "tiny": dict(ModelArgs.from_name("tiny").to_params(), max_seq_len=2048)}


class NullTokenizer:
    """What the engine reads of a tokenizer, for random token ids: no text; requests pass
    stop_ids=() so eos is never sampled as an end."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eos_id, self.bos_id = vocab_size, 2, 1

    def stream_decoder(self, prefix_ids=()):
        return types.SimpleNamespace(push=lambda token: "", flush=lambda: "")
