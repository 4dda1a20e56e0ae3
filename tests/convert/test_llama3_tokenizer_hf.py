"""A Llama 3 model directory (byte-level BPE tokenizer, chat template) through a Hugging Face
folder and back: the tokenizer, its ids and the template survive, and transformers reads them."""

from __future__ import annotations

import pytest
from tiny_llama3 import make_model_dir, write_tokenizer

from llamaworks.convert.formats import load_checkpoint, save_checkpoint
from llamaworks.inference.load import load_model
from llamaworks.tokenizer.chat import encode_chat

TEXTS = ["Hello world", "  two spaces and 12345 digits", "日本語のテキスト 🦙", "it's we'll they've\n\n\tx"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, corpus_docs):
    root = tmp_path_factory.mktemp("l3hf")
    native = make_model_dir(root / "native", write_tokenizer(root / "tok", corpus_docs))
    model, tok = load_model(native)
    hf = save_checkpoint("hf", model, tok, root / "hf")
    return native, hf


def test_the_tokenizer_and_template_survive_a_hugging_face_folder(folders):
    native, hf = folders
    _, ours = load_model(native)
    _, back = load_checkpoint("hf", hf)
    assert back.vocab_size == ours.vocab_size and back.special_tokens == ours.special_tokens
    for text in TEXTS:
        assert back.encode(text) == ours.encode(text)
        assert back.decode(back.encode(text)) == text
    assert back.chat_template is not None and back.chat_template.source == ours.chat_template.source
    assert encode_chat(back, back.chat_template, MESSAGES) == encode_chat(ours, ours.chat_template, MESSAGES)


def test_transformers_reads_the_exported_tokenizer_and_template(folders):
    transformers = pytest.importorskip("transformers")
    native, hf = folders
    _, ours = load_model(native)
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    for text in TEXTS:
        assert auto(text)["input_ids"] == ours.encode(text)
    ids = auto.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == encode_chat(ours, ours.chat_template, MESSAGES)
