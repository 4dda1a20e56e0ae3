"""GGUF -> llamaworks: float files are exact, quantised ones dequantise within their step, the
embedded vocabulary becomes a SentencePiece model that tokenises like the original."""

from __future__ import annotations

import pytest
import torch

from llamaworks.convert.command import convert_command
from llamaworks.convert.formats import load_checkpoint
from llamaworks.inference.load import load_model

gguf = pytest.importorskip("gguf", reason="the gguf package is an optional extra (pip install gguf)")

from llamaworks.convert.gguf import load_gguf, write_gguf  # noqa: E402

TEXTS = ["Hello world", "  two leading spaces", "tabs\tand\nnewlines\n\n", "12345 + 678 = 13023", "日本語のテキスト",
         "emoji 🦙🚀 and accents: café naïve", "trailing space ", "", "\u0000 control \u200b zero width",
         "def f(x):\n    return x**2  # comment", "a" * 300]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    convert_command("native", "gguf", str(tiny_model_dir), str(out))
    return out


def test_float_gguf_round_trip_is_exact(exported, tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir)
    back, back_tok = load_gguf(exported)
    assert back.args == model.args
    ref, got = model.state_dict(), back.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # the rebuilt SentencePiece model tokenises and detokenises like the trained one
    assert back_tok.vocab_size == tok.vocab_size
    assert (back_tok.bos_id, back_tok.eos_id, back_tok.unk_id) == (tok.bos_id, tok.eos_id, tok.unk_id)
    for text in TEXTS:
        assert back_tok.encode(text) == tok.encode(text), text
        assert back_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    # and the command writes a native folder that loads like the original
    convert_command("gguf", "native", str(exported), str(tmp_path / "native"))
    again, again_tok = load_model(tmp_path / "native")
    x = torch.tensor([tok.encode("The capital of France is")])
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert again_tok.encode(TEXTS[5]) == tok.encode(TEXTS[5])


def test_f16_gguf_loads_close(tiny_model_dir, tmp_path):
    convert_command("native", "gguf", str(tiny_model_dir), str(tmp_path / "h.gguf"), dtype="float16")
    model, _ = load_model(tiny_model_dir)
    back, _ = load_checkpoint("gguf", tmp_path)  # a folder holding one .gguf file
    assert back.layers[0].attention.wq.weight.dtype == torch.float16
    assert back.norm.weight.dtype == torch.float16  # llama.cpp keeps norms f32; one dtype per model here
    torch.testing.assert_close(back.layers[0].feed_forward.w2.weight.float(), model.layers[0].feed_forward.w2.weight,
                               rtol=1e-3, atol=1e-4)


def test_quantised_gguf_is_dequantised(tiny_model, tiny_tokenizer, tmp_path):
    # A Q8_0 file as llama.cpp writes it: 2-D weights quantised in blocks of 32, norms f32.
    from gguf.quants import quantize

    Q = gguf.GGMLQuantizationType
    path = tmp_path / "q8.gguf"
    real_add = gguf.GGUFWriter.add_tensor

    def add_q8(self, name, tensor, **kw):
        if tensor.ndim == 2:
            return real_add(self, name, quantize(tensor, Q.Q8_0), raw_dtype=Q.Q8_0)
        return real_add(self, name, tensor, **kw)

    gguf.GGUFWriter.add_tensor = add_q8
    try:
        write_gguf(tiny_model.state_dict(), tiny_model.args, tiny_tokenizer, path)
    finally:
        gguf.GGUFWriter.add_tensor = real_add
    assert {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors} == {Q.Q8_0, Q.F32}
    back, _ = load_gguf(path)
    for name, ref in tiny_model.state_dict().items():
        got = back.state_dict()[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape
        step = ref.abs().amax() / 127 if ref.dim() == 2 else 0  # Q8_0: one scale per 32 values
        assert (got - ref).abs().max() <= step + 1e-6, name
    x = torch.tensor([tiny_tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        assert float((back(x) - tiny_model(x)).abs().max()) < 0.05
    assert load_gguf(path, dtype=torch.bfloat16)[0].layers[0].attention.wq.weight.dtype == torch.bfloat16


def test_a_file_without_output_weight_has_tied_embeddings(tiny_model, tiny_tokenizer, tmp_path):
    # llama.cpp runs such a file (Llama 3.2 1B/3B) with token_embd as its output layer: the
    # model reads it as tied, one tensor (before issue 15 it was given a copy of its own).
    state = {k: v for k, v in tiny_model.state_dict().items() if k != "output.weight"}
    write_gguf(state, tiny_model.args, tiny_tokenizer, tmp_path / "tied.gguf")
    back, _ = load_gguf(tmp_path / "tied.gguf")
    assert back.args.tie_word_embeddings
    assert torch.equal(back.output.weight, tiny_model.tok_embeddings.weight)
    assert back.output.weight is back.tok_embeddings.weight
    assert "output.weight" not in back.state_dict()


def test_bad_gguf_inputs(exported, tiny_model_dir, tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="junk.gguf"):
        load_gguf(tmp_path / "junk.gguf")
    data = exported.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        load_gguf(tmp_path / "cut.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_gguf(tmp_path / "other.gguf")
    real = gguf.GGUFWriter.write_header_to_file
    for extra, msg in (({"llama.expert_count": 8}, "mixture of experts"),
                       ({"llama.rope.scaling.type": "yarn"}, "yarn")):

        def with_extra(self, *a, extra=extra, **kw):
            for k, v in extra.items():
                (self.add_uint32 if isinstance(v, int) else self.add_string)(k, v)
            return real(self, *a, **kw)

        gguf.GGUFWriter.write_header_to_file = with_extra
        try:
            convert_command("native", "gguf", str(tiny_model_dir), str(tmp_path / f"x{len(msg)}.gguf"))
        finally:
            gguf.GGUFWriter.write_header_to_file = real
        with pytest.raises(ValueError, match=msg):
            load_gguf(tmp_path / f"x{len(msg)}.gguf")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        (two / n).write_bytes(data)
    with pytest.raises(ValueError, match="2 .gguf files"):
        load_checkpoint("gguf", two)


def test_commands_take_a_gguf_file_as_checkpoint(exported, tiny_model_dir):
    from llamaworks.inference.generate import generate

    model, tok = load_model(tiny_model_dir)
    assert load_model(exported, dtype="bfloat16")[0].output.weight.dtype == torch.bfloat16
    g_model, g_tok = load_model(exported)  # what generate/serve/eval --checkpoint x.gguf do
    a = generate(model, tok, ["To be"], 6, temperature=0.0)[0].tokens
    assert generate(g_model, g_tok, ["To be"], 6, temperature=0.0)[0].tokens == a


def test_rebuilt_tokenizer_matches_llama_cpp(exported):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (./dev.sh extras)")
    _, tok = load_gguf(exported)
    llm = llama_cpp.Llama(model_path=str(exported), vocab_only=True, verbose=False)
    for text in TEXTS + ["x  y", " leading", "\n\nx", "   "]:
        assert tok.encode(text) == llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), text


def test_quantize_a_gguf_file(exported, tmp_path):
    from llamaworks.inference.command import quantize_command
    from llamaworks.inference.quant import Int8Linear

    assert quantize_command(str(exported), str(tmp_path / "q"), "int8") == 0
    model, _ = load_model(tmp_path / "q", fuse=False)
    assert isinstance(model.layers[0].attention.wq, Int8Linear)


@pytest.mark.parametrize("ftype,bound", [("LLAMA_FTYPE_MOSTLY_Q8_0", 0.012), ("LLAMA_FTYPE_MOSTLY_Q4_0", 0.18)])
def test_files_quantised_by_llama_cpp_load(exported, tiny_model_dir, tmp_path, ftype, bound):
    # llama.cpp's own quantiser writes the file (its block layouts, its choice of types per
    # tensor); gguf-py's dequantisers read it back close to the original weights.
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (./dev.sh extras)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    out = tmp_path / "q.gguf"
    assert llama_cpp.llama_model_quantize(str(exported).encode(), str(out).encode(), params) == 0
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors} - {"F32"}  # really quantised
    model, tok = load_model(tiny_model_dir)
    back, back_tok = load_gguf(out)
    for name, ref in model.state_dict().items():
        got = back.state_dict()[name]
        assert float((got - ref).norm() / ref.norm()) < bound, name
    x = torch.tensor([tok.encode("Now is the winter of our discontent")])
    with torch.no_grad():
        assert float((back(x) - model(x)).abs().max()) < 10 * bound  # measured: about 6x the weight error
    assert back_tok.encode("Now is the winter") == tok.encode("Now is the winter")
