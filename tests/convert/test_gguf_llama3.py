"""GGUF for the Llama 3 family (issue 15): a Llama-3.2-shaped tiny model (grouped-query
attention, rope_theta 500000, Llama 3.1's RoPE scaling with a 16-token original context so that
it changes every position past the first few, tied embeddings, byte-level BPE with Llama 3's
special tokens) exported and imported with identical logits; llama.cpp runs our export to the
same greedy tokens and tokenises text as we do; what the model cannot run is refused by name.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peaked import sharpen

from llamaworks.convert.command import greedy
from llamaworks.model import ModelArgs, build_model, llama31_scaled_inv_freq, model_inv_freq, rope_inv_freq
from llamaworks.modeldir import load_model, save_model
from llamaworks.tokenizer import ByteLevelBPETokenizer
from llamaworks.tokenizer.bpe import LLAMA3_PATTERN, byte_alphabet, piece_to_bytes
from llamaworks.tokenizer.chat import ChatTemplate

gguf = pytest.importorskip("gguf", reason="the gguf package is an optional extra (pip install gguf)")
pytest.importorskip("tokenizers")
from gguf.gguf_writer import GGUFValue  # noqa: E402

from llamaworks.convert.gguf import (  # noqa: E402
    ROPE_FREQS,
    bpe_vocab_for_gguf,
    llama31_scaling_from_factors,
    load_gguf,
    rope_freq_factors,
    write_gguf,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

T = gguf.GGUFValueType
SEQ = 48  # positions past rope_old_context_len=16, where the scaling bites
TEXTS = ["Hello world", "The king's crown, don't we'll THEY'RE", "12345678 + 90 = 1234", "naïve café déjà vu",
         "日本語のテキスト", "emoji 🦙🚀 and 👍🏽", "  two leading spaces", "tabs\tand\nnewlines\n\n\n", "trailing   ",
         "x = y + z; foo(bar) {baz}\t[1, 22, 333]\r\n   indented", "<|eot_id|> typed as text", "a" * 200, ""]
PROMPT_TEXTS = ["The king and queen speak of love", "Scene 12.\nThe lord would come, 1623 days!",
                "naïve café: 日本語 😀 don't we'll"]
N_NEW = 16


def _train(docs: list[str], vocab_size: int):
    """A byte-level BPE trained with `tokenizers` on Llama 3's pre-tokeniser (the raw object)."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RawTokenizer

    tk = RawTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def _docs(corpus_docs) -> list[str]:
    extra = ["naïve café déjà vu, señor; straße Ångström\n", "日本語の文章です。東京は日本の首都です。\n",
             "😀 emoji 🎉 and 👍🏽, ‘quotes’ — dashes …\n", "x = y + z; foo(bar) {baz}\t[1, 22, 333, 4444]\r\n"]
    return [d[:20000] for d in corpus_docs] + extra * 20


@pytest.fixture(scope="module")
def bpe(corpus_docs) -> ByteLevelBPETokenizer:
    """Meta's form: tiktoken ranks (bytes at 0-255, then tokens in the order training made them)
    and the 256 special tokens of Llama 3.1 after them."""
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(_train(_docs(corpus_docs), 700).to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        ranks.setdefault(piece_to_bytes(left) + piece_to_bytes(right), len(ranks))
    return ByteLevelBPETokenizer.from_ranks(ranks, "llama3.1")




def _llama32(vocab_size: int, **overrides) -> ModelArgs:
    return ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=64,
                               norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, rope_scaling_factor=32.0,
                               rope_old_context_len=16, tie_word_embeddings=True), **overrides})


def _logits(model, vocab_size):
    x = torch.randint(0, vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def source(bpe, tmp_path_factory):
    model = sharpen(build_model(_llama32(bpe.vocab_size), seed=0))
    path = tmp_path_factory.mktemp("llama3") / "m.gguf"
    write_gguf(model.state_dict(), model.args, bpe, path)
    return model, path


# --- export ---------------------------------------------------------------------------------------


def test_exported_file_is_what_llama_cpp_reads_for_llama3(source, bpe):
    model, path = source
    r = gguf.GGUFReader(str(path))

    def value(key):
        return r.fields[key].contents()

    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "llama-bpe"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == bpe.vocab_size
    # byte-level strings (bytes at ranks 0-255 here: byte 0x20 is "Ġ"), then the special tokens' names
    assert tokens[:256] == list(byte_alphabet()) and tokens[32] == "Ġ" and tokens[-256:] == list(bpe.special_tokens)
    n_ranks = len(bpe.ranks)
    assert value("tokenizer.ggml.token_type") == [gguf.TokenType.NORMAL] * n_ranks + [gguf.TokenType.CONTROL] * 256
    assert value("tokenizer.ggml.merges") == [f"{a} {b}" for a, b in bpe.merges()]
    names = bpe.special_tokens
    assert value("tokenizer.ggml.bos_token_id") == names["<|begin_of_text|>"] == bpe.bos_id
    assert value("tokenizer.ggml.eos_token_id") == names["<|end_of_text|>"]
    assert value("tokenizer.ggml.eot_token_id") == names["<|eot_id|>"]
    assert value("tokenizer.ggml.eom_token_id") == names["<|eom_id|>"]
    assert value("tokenizer.ggml.add_bos_token") is True
    assert value("llama.rope.freq_base") == 500000.0 and value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.scaling.original_context_length") == 16
    assert "llama.rope.scaling.type" not in r.fields  # llama.cpp would scale every frequency again
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd
    freqs = tensors[ROPE_FREQS]
    assert freqs.tensor_type == gguf.GGMLQuantizationType.F32 and list(freqs.shape) == [8]
    factors = torch.from_numpy(freqs.data.copy())
    torch.testing.assert_close(factors, rope_freq_factors(model.args), rtol=0, atol=0)
    # with a 16-token original context the fastest frequency is blended, the others divided by 32
    assert 1 < float(factors[0]) < 32 and factors[1:].tolist() == [32.0] * 7


def _reference_factors(head_dim, theta, factor, low, high, old_ctx) -> list[float]:
    # The definition llama.cpp's convert_hf_to_gguf.py writes for Llama 3.1 (LlamaModel's
    # generate_extra_tensors): per base frequency, 1, the factor, or the blend between.
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


@pytest.mark.parametrize("factor,old_ctx", [(8.0, 8192), (32.0, 8192), (32.0, 16)])
def test_rope_freqs_are_llama_cpp_converters(factor, old_ctx):
    # Our factors are the converter's (head_dim 128 as the released models, 16 as the test's).
    for head_dim in (128, 16):
        args = ModelArgs(dim=head_dim * 4, n_heads=4, rope_theta=500000.0, use_scaled_rope=True,
                         rope_scaling_factor=factor, rope_old_context_len=old_ctx)
        ref = torch.tensor(_reference_factors(head_dim, 500000.0, factor, 1.0, 4.0, old_ctx))
        torch.testing.assert_close(rope_freq_factors(args), ref, rtol=1e-6, atol=0)
        # and read back as exactly those parameters
        assert llama31_scaling_from_factors(ref.float(), head_dim, 500000.0, [old_ctx]) == (factor, 1.0, 4.0, old_ctx)


def test_rope_freqs_with_other_band_parameters_are_fitted():
    # Not Meta's 1/4: low/high are fitted to the blended factors, then checked against all of them.
    ref = torch.tensor(_reference_factors(128, 500000.0, 16.0, 2.0, 8.0, 8192), dtype=torch.float32)
    assert llama31_scaling_from_factors(ref, 128, 500000.0, [8192]) == (16.0, 2.0, 8.0, 8192)
    ref[20] *= 1.01  # no Llama 3.1 scaling gives this
    assert llama31_scaling_from_factors(ref, 128, 500000.0, [8192]) is None


def test_tokenizer_export_refuses_another_pretokenizer(corpus_docs):
    from tokenizers import decoders, pre_tokenizers

    tk = _train(_docs(corpus_docs)[:50], 400)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split
    tk.decoder = decoders.ByteLevel()
    tok = ByteLevelBPETokenizer.from_json(tk.to_str())
    with pytest.raises(ValueError, match=r"tokenizer.json: GGUF export .*llama-bpe.*pre-tokenizer is \['ByteLevel'\]"):
        bpe_vocab_for_gguf(tok)


# --- import ---------------------------------------------------------------------------------------


def test_round_trip_keeps_model_and_tokenizer(source, bpe, tmp_path):
    model, path = source
    back, tok = load_gguf(path)
    assert back.args == model.args  # GQA, theta, the 3.1 scaling (32/1/4/16), tied
    assert back.output.weight is back.tok_embeddings.weight
    torch.testing.assert_close(_logits(back, bpe.vocab_size), _logits(model, bpe.vocab_size), atol=0, rtol=0)
    # The vocabulary comes back as Meta's form: the same ranks and special tokens.
    assert isinstance(tok, ByteLevelBPETokenizer) and tok.format == "tiktoken"
    assert tok.ranks == bpe.ranks and tok.special_tokens == bpe.special_tokens
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (bpe.bos_id, bpe.eos_id, bpe.stop_ids)
    assert tok.chat_template is None
    for text in TEXTS:
        assert tok.encode(text) == bpe.encode(text), text
    # GGUF -> model directory -> GGUF: logits equal at each hop, and the second file is the first.
    save_model(back, tok, tmp_path / "native")
    native, _ = load_model(tmp_path / "native", tokenizer=False)
    native_tok = ByteLevelBPETokenizer(tmp_path / "native" / "tokenizer.model")  # Meta's tiktoken file
    torch.testing.assert_close(_logits(native, bpe.vocab_size), _logits(model, bpe.vocab_size), atol=0, rtol=0)
    write_gguf(native.state_dict(), native.args, native_tok, tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == path.read_bytes()


def test_rope_freqs_is_read_not_recomputed(source, bpe, tmp_path):
    # The model computes its frequencies from ModelArgs: the arguments read back give the
    # file's tensor within float32 rounding, and a tensor no arguments give is refused.
    model, path = source
    back, _ = load_gguf(path)
    stored = torch.from_numpy(next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == ROPE_FREQS).data.copy())
    base = rope_inv_freq(back.args.head_dim, back.args.rope_theta)
    rel = ((base / model_inv_freq(back.args) - stored) / stored).abs().max()
    assert float(rel) <= 2 ** -23
    # the band between the plateaus is used at these lengths: scaled frequencies differ from Meta's
    assert not torch.equal(model_inv_freq(back.args), llama31_scaled_inv_freq(base, 32.0, 1.0, 4.0, 8192))
    bent = stored.clone()
    bent[3] *= 1.01
    with rewritten(tensors={ROPE_FREQS: bent}):
        write_gguf(model.state_dict(), model.args, bpe, tmp_path / "bent.gguf")
    with pytest.raises(ValueError, match=r"bent.gguf: tensor rope_freqs.weight holds RoPE frequency factors .* no "
                                         r"Llama 3.1 scaling gives"):
        load_gguf(tmp_path / "bent.gguf")


@contextmanager
def rewritten(meta: dict | None = None, drop=(), tensors: dict | None = None):
    """While active, write_gguf writes `meta` ({key: (value, GGUFValueType[, sub type])}) over
    its own metadata, leaves out `drop` (keys and tensors) and writes `tensors` in place of its own."""
    real_header, real_add = gguf.GGUFWriter.write_header_to_file, gguf.GGUFWriter.add_tensor

    def header(self, *a, **kw):
        for k in drop:
            self.kv_data[0].pop(k, None)
        for k, v in (meta or {}).items():
            self.kv_data[0][k] = GGUFValue(v[0], v[1], v[2] if len(v) > 2 else None)
        return real_header(self, *a, **kw)

    def add(self, name, tensor, **kw):
        if name in drop:
            return None
        if tensors and name in tensors:
            tensor = tensors[name].numpy()
        return real_add(self, name, tensor, **kw)

    with mock.patch.object(gguf.GGUFWriter, "write_header_to_file", header), \
            mock.patch.object(gguf.GGUFWriter, "add_tensor", add):
        yield


def test_linear_scaling_and_untied_output_round_trip(bpe, tmp_path):
    args = _llama32(bpe.vocab_size, use_scaled_rope=False, rope_old_context_len=None, rope_scaling_factor=4.0,
                    tie_word_embeddings=False)
    model = sharpen(build_model(args, seed=1))
    write_gguf(model.state_dict(), args, bpe, tmp_path / "lin.gguf")
    r = gguf.GGUFReader(str(tmp_path / "lin.gguf"))
    assert r.fields["llama.rope.scaling.type"].contents() == "linear"
    assert r.fields["llama.rope.scaling.factor"].contents() == 4.0
    assert {t.name for t in r.tensors} >= {"output.weight"} and ROPE_FREQS not in {t.name for t in r.tensors}
    back, _ = load_gguf(tmp_path / "lin.gguf")
    assert back.args == args and back.output.weight is not back.tok_embeddings.weight
    torch.testing.assert_close(_logits(back, bpe.vocab_size), _logits(model, bpe.vocab_size), atol=0, rtol=0)


def test_chat_template_travels_in_the_file(source, bpe, tmp_path):
    model, _ = source
    tok = ByteLevelBPETokenizer.from_ranks(bpe.ranks, "llama3.1")
    tok.chat_template = ChatTemplate.builtin("llama3")
    write_gguf(model.state_dict(), model.args, tok, tmp_path / "chat.gguf")
    _, back = load_gguf(tmp_path / "chat.gguf")
    assert back.chat_template.source == tok.chat_template.source
    assert (back.chat_template.bos_token, back.chat_template.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert str(tmp_path / "chat.gguf") in back.chat_template.where
    messages = [{"role": "user", "content": "Hi"}]
    assert back.chat_template.render(messages) == tok.chat_template.render(messages)


@pytest.fixture(scope="module")
def json_bpe(corpus_docs) -> ByteLevelBPETokenizer:
    """Hugging Face's form: a tokenizer.json with the merges training made (one per token, not
    every split as Meta's ranks imply), Llama 3's special tokens and one added token that is
    not special (matched in text, llama.cpp's USER_DEFINED)."""
    from tokenizers import AddedToken, decoders, processors

    tk = _train(_docs(corpus_docs), 700)
    tk.model.ignore_merges = True
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in
                           ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")])
    tk.add_tokens([AddedToken("<user_tag>", special=False, normalized=False)])
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|>:0 $A:0",
                                                      special_tokens=[("<|begin_of_text|>", 700)])
    return ByteLevelBPETokenizer.from_json(tk.to_str())


def test_merges_that_are_not_ranks_come_back_as_merges(json_bpe, tmp_path):
    args = _llama32(json_bpe.vocab_size)
    model = build_model(args, seed=0).eval()
    write_gguf(model.state_dict(), args, json_bpe, tmp_path / "hf.gguf")
    types = gguf.GGUFReader(str(tmp_path / "hf.gguf")).fields["tokenizer.ggml.token_type"].contents()
    assert types[-4:] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.USER_DEFINED]
    _, tok = load_gguf(tmp_path / "hf.gguf")
    assert tok.format == "json" and tok.merges() == json_bpe.merges()
    assert tok.special_tokens == json_bpe.special_tokens and tok.bos_id == json_bpe.bos_id == 700
    for text in TEXTS + ["a <user_tag> b"]:
        assert tok.encode(text) == json_bpe.encode(text), text


# --- llama.cpp ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (./dev.sh extras)")


def _prompts(tok):
    return [tok.encode(t) for t in PROMPT_TEXTS]


def test_llama_cpp_decodes_our_export_to_the_same_tokens(source, bpe, llama_cpp, tmp_path):
    from llamaworks.convert.command import llama_cpp_greedy

    model, path = source
    prompts = _prompts(bpe)
    assert max(len(p) for p in prompts) + N_NEW > 2 * 16  # well past the original context
    with torch.no_grad():
        ours = [greedy(model, p, N_NEW) for p in prompts]
    assert llama_cpp_greedy(path, prompts, N_NEW) == ours
    # Logits too: llama.cpp's CPU path (f16 key/value cache) is within 0.004 of ours (measured
    # 0.0014-0.003 with logits of magnitude ~3).
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False)
    try:
        for p in prompts:
            llm.reset()
            llm.eval(p)
            theirs = torch.tensor(llm.scores[:len(p)])
            with torch.no_grad():
                mine = model(torch.tensor([p]))[0]
            assert float((theirs - mine).abs().max()) < 0.02
    finally:
        llm.close()
    # Control: without rope_freqs llama.cpp computes other tokens, so the check above sees the scaling.
    with rewritten(drop=(ROPE_FREQS,)):
        write_gguf(model.state_dict(), model.args, bpe, tmp_path / "unscaled.gguf")
    assert llama_cpp_greedy(tmp_path / "unscaled.gguf", prompts, N_NEW) != ours


@pytest.mark.parametrize("which", ["ranks", "json"])
def test_llama_cpp_tokenises_as_we_do(source, bpe, json_bpe, llama_cpp, tmp_path, which):
    if which == "ranks":
        tok, path = bpe, source[1]
    else:
        tok, path = json_bpe, tmp_path / "json.gguf"
        model = build_model(_llama32(tok.vocab_size), seed=0).eval()
        write_gguf(model.state_dict(), model.args, tok, path)
    _, back = load_gguf(path)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in TEXTS + ["x  y", " leading", "\n\nx", "   ", "I'M you'VE 1234567 ½ ⅔", "a <user_tag> b"]:
            for bos in (True, False):
                want = llm.tokenize(text.encode(), add_bos=bos, special=False)
                assert tok.encode(text, bos=bos) == want, (text, bos)
                assert back.encode(text, bos=bos) == want, (text, bos)
            ids = tok.encode(text, bos=False)
            assert llm.detokenize(ids).decode("utf-8", "replace") == tok.decode(ids)
    finally:
        llm.close()


# --- refused --------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta,drop,words", [
    ({"tokenizer.ggml.pre": ("qwen2", T.STRING)}, (), "tokenizer.ggml.pre is 'qwen2'"),
    ({}, ("tokenizer.ggml.pre",), "tokenizer.ggml.pre is missing"),
    ({"tokenizer.ggml.model": ("bert", T.STRING)}, (), "tokenizer.ggml.model is 'bert'"),
    ({"tokenizer.ggml.merges": (["a b c"], T.ARRAY, T.STRING)}, (), "merge 0 of tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": (["Ġ zzzq"], T.ARRAY, T.STRING)}, (), "merge 0 of tokenizer.ggml.merges"),
    ({}, ("tokenizer.ggml.merges",), "'tokenizer.ggml.merges' is missing"),
    ({"llama.expert_count": (8, T.UINT32)}, (), "'llama.expert_count' makes this a mixture of experts (8 experts)"),
    ({"llama.attention.sliding_window": (8, T.UINT32)}, (), "sliding-window attention (a window of 8 positions)"),
    ({"llama.attention.key_length": (32, T.UINT32)}, (), "keys of 32 dimensions per head"),
    ({"llama.attention.layer_norm_epsilon": (1e-5, T.FLOAT32)}, (), "LayerNorm"),
    ({"llama.attention.max_alibi_bias": (8.0, T.FLOAT32)}, (), "ALiBi"),
    ({"llama.rope.scaling.type": ("yarn", T.STRING)}, (), "RoPE scaling 'yarn' (llama.rope.scaling.type)"),
    ({"llama.rope.scaling.type": ("linear", T.STRING), "llama.rope.scaling.factor": (2.0, T.FLOAT32)}, (),
     "tensor rope_freqs.weight and linear RoPE scaling"),
])
def test_what_llamaworks_cannot_run_is_refused_by_name(source, bpe, tmp_path, meta, drop, words):
    model, _ = source
    with rewritten(meta=meta, drop=drop):
        write_gguf(model.state_dict(), model.args, bpe, tmp_path / "x.gguf")
    with pytest.raises(ValueError) as e:
        load_gguf(tmp_path / "x.gguf")
    assert str(e.value).startswith(str(tmp_path / "x.gguf")) and words in str(e.value), str(e.value)


def test_harmless_keys_are_not_refused(source, bpe, tmp_path):
    # A window as long as the context is no window; heads of head_dim are LLaMA's; "llama3" is
    # llama.cpp's older name for the same pre-tokeniser.
    model, _ = source
    meta = {"llama.attention.sliding_window": (64, T.UINT32), "llama.attention.key_length": (16, T.UINT32),
            "llama.expert_count": (0, T.UINT32), "tokenizer.ggml.pre": ("llama3", T.STRING)}
    with rewritten(meta=meta):
        write_gguf(model.state_dict(), model.args, bpe, tmp_path / "ok.gguf")
    back, _ = load_gguf(tmp_path / "ok.gguf")
    assert back.args == model.args


def test_bad_byte_level_vocabularies_name_the_file_and_key(source, bpe, tmp_path):
    model, _ = source
    tokens, types, _ = bpe_vocab_for_gguf(bpe)
    cases = [({"tokenizer.ggml.tokens": ([*tokens[:5], "日本".encode(), *tokens[6:]], T.ARRAY, T.STRING)},
              "token 5 of tokenizer.ggml.tokens, '日本', is NORMAL but not a byte-level token string"),
             ({"tokenizer.ggml.tokens": ([*tokens[:5], tokens[6], *tokens[6:]], T.ARRAY, T.STRING)},
              "tokens 5 and 6 of tokenizer.ggml.tokens are both"),
             ({"tokenizer.ggml.token_type": ([*types[:-1], 6], T.ARRAY, T.INT32)}, "values outside 1..5"),
             ({"tokenizer.ggml.bos_token_id": (10**6, T.UINT32)}, "'tokenizer.ggml.bos_token_id' is 1000000")]
    for meta, words in cases:
        with rewritten(meta=meta):
            write_gguf(model.state_dict(), model.args, bpe, tmp_path / "v.gguf")
        with pytest.raises(ValueError) as e:
            load_gguf(tmp_path / "v.gguf")
        assert str(e.value).startswith(str(tmp_path / "v.gguf")) and words in str(e.value), str(e.value)


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_byte_level_vocabulary(source, bpe, tmp_path_factory, data):
    # A few tokens, types, merges or ids replaced: every outcome is a model or a ValueError that
    # names the file, in well under a second (the vocabulary is 956 tokens).
    model, _ = source
    tokens, types, merges = bpe_vocab_for_gguf(bpe)
    tokens, types, merges = list(tokens), list(types), list(merges)
    strings = st.one_of(st.text(byte_alphabet(), min_size=1, max_size=4).map(str.encode), st.binary(max_size=4),
                        st.sampled_from(tokens))
    for _ in range(data.draw(st.integers(1, 2))):
        what = data.draw(st.sampled_from(["token", "type", "type", "merge", "merges", "merges"]))
        if what == "token":
            tokens[data.draw(st.integers(0, len(tokens) - 1))] = data.draw(strings)
        elif what == "type":
            types[data.draw(st.integers(0, len(types) - 1))] = data.draw(st.sampled_from([3, 4, 5, 2, 1, 6, 0]))
        elif what == "merge":
            merges[data.draw(st.integers(0, len(merges) - 1))] = data.draw(
                st.one_of(strings, st.sampled_from(merges)))
        else:
            merges = data.draw(st.permutations(merges)) if data.draw(st.booleans()) else merges[:-1]
    meta = {"tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
            "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
            "tokenizer.ggml.merges": (merges, T.ARRAY, T.STRING),
            "tokenizer.ggml.pre": (data.draw(st.sampled_from(["llama-bpe"] * 4 + ["llama3", "gpt-2"])), T.STRING),
            "tokenizer.ggml.eos_token_id": (data.draw(st.integers(0, len(tokens) + 8)), T.UINT32)}
    path = tmp_path_factory.mktemp("fuzz") / "f.gguf"
    try:
        with rewritten(meta=meta):
            write_gguf(model.state_dict(), model.args, bpe, path)
    except (ValueError, TypeError, OverflowError, AssertionError):
        return  # a value gguf-py will not write
    start = time.perf_counter()
    try:
        _, tok = load_gguf(path)
        assert tok.encode("Hello world, 1234 naïve 日本")
    except ValueError as e:
        assert str(e).startswith(str(path)), e
    assert time.perf_counter() - start < 2.0


def test_convert_a_llama3_gguf_to_a_model_directory_and_back(tmp_path, corpus_docs):
    from tiny_llama3 import make_model_dir, write_tokenizer

    from llamaworks.convert.command import convert_command
    from llamaworks.inference.load import load_model

    native = make_model_dir(tmp_path / "native", write_tokenizer(tmp_path / "tok", corpus_docs))
    convert_command("native", "gguf", str(native), str(tmp_path / "m.gguf"))
    convert_command("gguf", "native", str(tmp_path / "m.gguf"), str(tmp_path / "back"))
    (a, ta), (b, tb) = load_model(native), load_model(tmp_path / "back")
    ids = ta.encode("Hello 123 world")
    assert tb.encode("Hello 123 world") == ids and tb.special_tokens == ta.special_tokens
    with torch.no_grad():
        assert torch.equal(a(torch.tensor([ids])), b(torch.tensor([ids])))
