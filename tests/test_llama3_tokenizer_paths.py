"""Every tokenizer path the package reads takes a Llama 3 tiktoken tokenizer.model as well as a
SentencePiece model: token shards, CCNet's LM tokenisation, training (whose checkpoints are
model directories with that tokenizer) and checkpoints' tokenizer files."""

from __future__ import annotations

import json

import pytest

from llamaworks.data.ccnet import tokenize_for_lm
from llamaworks.data.shards import open_token_dataset, prepare
from llamaworks.inference.load import load_model
from llamaworks.modeldir import CHAT_TEMPLATE, TOKENIZER, read_tokenizer, write_tokenizer_files
from llamaworks.tokenizer import ByteLevelBPETokenizer, load_tokenizer
from llamaworks.tokenizer.chat import ChatTemplate
from llamaworks.train.trainer import train

pytest.importorskip("tokenizers")

from tiny_llama3 import write_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, corpus_docs):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), corpus_docs)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus_docs, tok_path):
    root = tmp_path_factory.mktemp("shards")
    with open(root / "docs.jsonl", "w") as f:
        for i, doc in enumerate(corpus_docs[:2]):
            for j in range(0, 40000, 4000):
                f.write(json.dumps({"id": f"d{i}-{j}", "text": doc[j:j + 4000]}) + "\n")
    prepare([str(root / "docs.jsonl")], str(tok_path), root / "data", val_fraction=0.1, workers=1)
    return root / "data"


def test_shards_of_a_tiktoken_tokenizer(shards, tok_path):
    tok = load_tokenizer(tok_path)
    manifest = open_token_dataset(shards)
    assert manifest["vocab_size"] == tok.vocab_size and manifest["bos_id"] == tok.bos_id
    assert manifest["eos_id"] == tok.eos_id == tok.special_tokens["<|end_of_text|>"]
    assert manifest["dtype"] == "uint16"


def test_ccnet_lm_pieces_of_a_tiktoken_tokenizer(tok_path):
    tok = load_tokenizer(tok_path)
    [sentence] = tokenize_for_lm("The king is here.", tok_path)
    assert sentence == [tok.id_to_piece(i) for i in tok.encode("the king is here.", bos=False)]


def test_training_on_tiktoken_shards_writes_llama3_model_directories(make_config, shards, tok_path, tmp_path):
    out = tmp_path / "run"
    train(make_config(out, data={"dir": str(shards), "tokenizer": str(tok_path)},
                      train={"max_steps": 2}, checkpoint={"every": 2}, eval={"every": 0}))
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert (ckpt / TOKENIZER).read_bytes() == tok_path.read_bytes()
    model, tok = load_model(ckpt)
    assert isinstance(tok, ByteLevelBPETokenizer) and model.args.vocab_size == tok.vocab_size


def test_checkpoint_tokenizer_files_carry_the_chat_template(tok_path, tmp_path):
    tok = load_tokenizer(tok_path)
    tok.chat_template = ChatTemplate.builtin("llama3")
    write_tokenizer_files(tok, tmp_path)
    assert (tmp_path / CHAT_TEMPLATE).read_text() == tok.chat_template.source
    back = read_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    assert back.chat_template.render(messages) == tok.chat_template.render(messages)
