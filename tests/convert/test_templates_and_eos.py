"""A Llama-3-instruct-shaped checkpoint's tokenizer settings through every format we write: its
eos (<|eot_id|>, or any other token a fine-tune chose) and its chat templates, the default one
and named ones (tool_use), survive model directory, Hugging Face, GGUF and Meta round trips; what
transformers, gguf-py and llama.cpp read from our files agrees; generation stops at the eos read back."""

from __future__ import annotations

import json

import pytest
import torch

from llamaworks.convert.formats import load_checkpoint, save_checkpoint
from llamaworks.convert.gguf import read_gguf, tokenizer_from_gguf
from llamaworks.inference.generate import generate
from llamaworks.model import ModelArgs, build_model
from llamaworks.tokenizer import load_tokenizer, stop_ids
from llamaworks.tokenizer.chat import ChatTemplate, encode_chat, resolve_chat_template

pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf", reason="the gguf package is an optional extra (pip install gguf)")

from tiny_llama3 import ScriptedModel, write_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# A tool-calling template of our own making: a named template must differ from the default to
# show which one was read.
TOOL_USE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{% if m['role'] == 'system' %}Environment: ipython\n{% endif %}{{ m['content'] | trim }}<|eot_id|>"
            "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
RAG = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|eot_id|>{% endfor %}"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
FORMATS = ["native", "hf", "gguf", "meta"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_docs):
    """A tiny random model over a Llama 3 tiktoken tokenizer (the tokenizer object is loaded
    fresh per test: tests change its eos and templates)."""
    path = write_tokenizer(tmp_path_factory.mktemp("tok"), corpus_docs)
    tok = load_tokenizer(path)
    model = build_model(ModelArgs.from_name("tiny", vocab_size=tok.vocab_size, n_layers=1), seed=0).eval()
    return model, path


def instruct_tokenizer(path, eos: str, named: dict[str, str]):
    tok = load_tokenizer(path)
    tok.eos_id = tok.special_tokens[eos]
    bos, eos_piece = tok.id_to_piece(tok.bos_id), tok.id_to_piece(tok.eos_id)
    tok.chat_template = ChatTemplate.builtin("llama3", bos_token=bos, eos_token=eos_piece)
    tok.chat_templates = {name: ChatTemplate(src, bos_token=bos, eos_token=eos_piece) for name, src in named.items()}
    return tok


def round_trip(fmt: str, model, tok, tmp_path):
    dst = tmp_path / ("model.gguf" if fmt == "gguf" else fmt)
    written = save_checkpoint(fmt, model, tok, dst)
    model2, tok2 = load_checkpoint(fmt, written)
    return written, model2, tok2


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("eos", ["<|eot_id|>", "<|reserved_special_token_7|>"])
def test_eos_survives_every_format_and_generation_stops_at_it(base, tmp_path, fmt, eos):
    model, path = base
    tok = instruct_tokenizer(path, eos, {})
    custom = tok.special_tokens[eos]
    assert tok.eos_id == custom != tok.default_eos_id and custom in tok.stop_ids
    _, _, back = round_trip(fmt, model, tok, tmp_path)
    assert back.eos_id == custom
    assert back.encode("hi", bos=True, eos=True)[-1] == custom
    ends = {back.special_tokens[n] for n in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")}
    assert ends | {custom} <= stop_ids(back)
    # The chat template renders eos_token as the new eos, as transformers would.
    assert back.chat_template.eos_token == eos
    # Generation stops at it: the scripted model writes "ok", the eos, then more text.
    prompt = back.encode("The king said")
    script = back.encode(" ok", bos=False) + [custom] + back.encode(" never shown", bos=False)
    [c] = generate(ScriptedModel(back.vocab_size, len(prompt), script), back, ["The king said"], 20, temperature=0.0)
    assert (c.text, c.finish_reason) == (" ok", "stop")


def test_default_eos_writes_no_tokenizer_config_in_a_model_directory(base, tmp_path):
    model, path = base
    tok = load_tokenizer(path)
    written, _, back = round_trip("native", model, tok, tmp_path)
    assert not (written / "tokenizer_config.json").exists() and back.eos_id == tok.default_eos_id
    tok.eos_id = tok.special_tokens["<|eot_id|>"]
    written, _, _ = round_trip("native", model, tok, tmp_path / "b")
    assert json.loads((written / "tokenizer_config.json").read_text()) == {"eos_token": "<|eot_id|>"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_default_and_named_chat_templates_survive_every_format(base, tmp_path, fmt):
    model, path = base
    tok = instruct_tokenizer(path, "<|eot_id|>", {"tool_use": TOOL_USE, "rag": RAG})
    _, _, back = round_trip(fmt, model, tok, tmp_path)
    assert back.chat_template.source == tok.chat_template.source
    assert {n: t.source for n, t in back.chat_templates.items()} == {"tool_use": TOOL_USE, "rag": RAG}
    for name in ("tool_use", "rag"):
        chosen = resolve_chat_template(back, name)
        assert chosen.source == tok.chat_templates[name].source
        assert encode_chat(back, chosen, MESSAGES) == encode_chat(tok, tok.chat_templates[name], MESSAGES)
    assert resolve_chat_template(back, "llama3").source == ChatTemplate.builtin("llama3").source  # built-ins still
    assert resolve_chat_template(back, None) is back.chat_template
    with pytest.raises(ValueError, match=r"'summarise' is neither a built-in \(llama2, llama3, plain\), a template "
                                         r"of this checkpoint \('rag', 'tool_use', 'default'\)"):
        resolve_chat_template(back, "summarise")


def test_hf_export_is_what_transformers_reads(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, path = base
    tok = instruct_tokenizer(path, "<|eot_id|>", {"tool_use": TOOL_USE})
    written, _, _ = round_trip("hf", model, tok, tmp_path)
    assert (written / "additional_chat_templates" / "tool_use.jinja").read_text() == TOOL_USE
    config = json.loads((written / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|eot_id|>"  # transformers 4.x reads the list form below
    assert config["chat_template"] == [{"name": "default", "template": tok.chat_template.source},
                                       {"name": "tool_use", "template": TOOL_USE}]
    hf = transformers.AutoTokenizer.from_pretrained(str(written))
    assert hf.eos_token == "<|eot_id|>" and hf.eos_token_id == tok.eos_id
    assert hf.chat_template == {"default": tok.chat_template.source, "tool_use": TOOL_USE}
    for name in ("default", "tool_use"):
        ids = hf.apply_chat_template(MESSAGES, chat_template=name, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert encode_chat(tok, resolve_chat_template(tok, name), MESSAGES) == list(ids)


def test_hf_folder_with_the_list_form_only(base, tmp_path):
    # transformers 4.x folders: every template in tokenizer_config.json, no .jinja files.
    model, path = base
    tok = instruct_tokenizer(path, "<|eot_id|>", {"tool_use": TOOL_USE})
    written, _, _ = round_trip("hf", model, tok, tmp_path)
    (written / "chat_template.jinja").unlink()
    (written / "additional_chat_templates" / "tool_use.jinja").unlink()
    (written / "additional_chat_templates").rmdir()
    _, back = load_checkpoint("hf", written)
    assert back.chat_template.key == "chat_template[name='default']"
    assert back.chat_templates["tool_use"].source == TOOL_USE and back.eos_id == tok.eos_id


def test_gguf_keys_are_the_ones_llama_cpp_reads(base, tmp_path):
    model, path = base
    tok = instruct_tokenizer(path, "<|eot_id|>", {"tool_use": TOOL_USE, "rag": RAG})
    written, _, _ = round_trip("gguf", model, tok, tmp_path)
    reader = gguf.GGUFReader(str(written))

    def text(key):
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("tokenizer.chat_template") == tok.chat_template.source
    assert text("tokenizer.chat_template.tool_use") == TOOL_USE  # llama.cpp's server asks for "tool_use"
    names = reader.fields["tokenizer.chat_templates"]
    assert [bytes(names.parts[i]).decode() for i in names.data] == ["rag", "tool_use"]
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == tok.special_tokens["<|eot_id|>"]


def test_gguf_written_by_gguf_py_list_form(base, tmp_path):
    # gguf-py's own writer given transformers' list of {name, template}: names with other
    # characters become '_' there, and we read what it wrote.
    model, path = base
    tok = load_tokenizer(path)
    written = save_checkpoint("gguf", model, tok, tmp_path / "plain.gguf")
    f = read_gguf(written, gguf)
    w = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "llama")
    w.add_chat_template([{"name": "default", "template": RAG}, {"name": "tool-use", "template": TOOL_USE}])
    w.add_tensor("x", torch.zeros(8).numpy())  # our reader wants a well-formed file: one tensor
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f.metadata.update(read_gguf(tmp_path / "meta.gguf", gguf).metadata)  # the template keys on our file's tokenizer
    back = tokenizer_from_gguf(f)
    assert back.chat_template.source == RAG and back.chat_templates["tool_use"].source == TOOL_USE


def test_bad_template_names_and_metadata(base, tmp_path):
    model, path = base
    tok = instruct_tokenizer(path, "<|eot_id|>", {"tool-use": TOOL_USE, "tool.use": RAG})
    with pytest.raises(ValueError, match="become the same GGUF key"):
        save_checkpoint("gguf", model, tok, tmp_path / "x.gguf")
    tok.chat_templates = {"../escape": RAG}
    with pytest.raises(ValueError, match=r"'../escape' is not a name"):
        save_checkpoint("native", model, tok, tmp_path / "d")
    good = instruct_tokenizer(path, "<|eot_id|>", {"tool_use": TOOL_USE})
    f = read_gguf(save_checkpoint("gguf", model, good, tmp_path / "ok.gguf"), gguf)
    del f.metadata["tokenizer.chat_template.tool_use"]
    with pytest.raises(ValueError, match=r"tokenizer.chat_templates lists b'tool_use', but the file has no "
                                         r"tokenizer.chat_template.tool_use; the file is corrupt"):
        tokenizer_from_gguf(f)


def test_tokenizer_config_eos_must_be_a_token(base, tmp_path):
    model, path = base
    tok = instruct_tokenizer(path, "<|eot_id|>", {})
    written, _, _ = round_trip("native", model, tok, tmp_path)
    (written / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token is '</s>', which .* does not have as a "
                                         r"token"):
        load_checkpoint("native", written)
    with pytest.raises(ValueError, match=r"eos_id 999999 is not a token id"):
        tok.eos_id = 999_999
    assert torch.equal(torch.tensor(tok.encode("a", eos=True)[-1:]), torch.tensor([tok.special_tokens["<|eot_id|>"]]))


def test_llama_cpp_reads_our_eos_and_named_template(base, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (./dev.sh extras)")
    model, path = base
    tok = instruct_tokenizer(path, "<|eot_id|>", {"tool_use": TOOL_USE})
    written, _, _ = round_trip("gguf", model, tok, tmp_path)
    llm = llama_cpp.Llama(model_path=str(written), vocab_only=True, verbose=False)
    # What llama.cpp's server looks up: the default template, and "tool_use" by name.
    assert llama_cpp.llama_model_chat_template(llm.model, None).decode() == tok.chat_template.source
    assert llama_cpp.llama_model_chat_template(llm.model, b"tool_use").decode() == TOOL_USE
    assert llama_cpp.llama_model_chat_template(llm.model, b"rag") is None
    assert llm.token_eos() == tok.special_tokens["<|eot_id|>"]
