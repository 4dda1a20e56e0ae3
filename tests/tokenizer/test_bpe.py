"""Byte-level BPE (Llama 3): a tiktoken file and its tokenizer.json twin, built here from a tiny
byte-level BPE trained with `tokenizers`, held to the reference merge algorithm, to `tokenizers`
itself, and to Meta's special-token table, regex and long-run cuts."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tokenizers")

from tiny_llama3 import train_ranks  # noqa: E402

from llamaworks.tokenizer import (  # noqa: E402
    ByteLevelBPETokenizer,
    Tokenizer,
    detect_format,
    llama3_special_tokens,
    load_tokenizer,
    stop_ids,
)
from llamaworks.tokenizer.base import JSON_BYTE_LEVEL, JSON_SENTENCEPIECE, SENTENCEPIECE, TIKTOKEN  # noqa: E402
from llamaworks.tokenizer.bpe import (  # noqa: E402
    LLAMA3_PATTERN,
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    bpe_merge,
    byte_alphabet,
    read_tiktoken,
    split_long_runs,
    tiktoken_text,
)
from llamaworks.tokenizer.hf import HFTokenizer, save_tokenizer_json  # noqa: E402

# Text in many scripts, so training merges bytes inside multi-byte characters too and the
# vocabulary has tokens that hold part of a character.
MULTILINGUAL = [
    "naïve café déjà vu, señor; straße über façade. Ångström ça œuvre\n",
    "日本語の文章です。東京は日本の首都です。中文字符和汉字。\n",
    "Привет, мир! Как дела? Ελληνικά γράμματα. עברית ואותיות. العربية\n",
    "😀😃😄 emoji 🎉🎉 and 👍🏽 skin tones, ‘quotes’ “double” — dashes – ... …\n",
    "한국어 텍스트입니다. हिन्दी पाठ. ภาษาไทย\n",
    "x = y + z; foo(bar) {baz}\t[1, 22, 333, 4444]\r\n   indented\n\n\n",
]


@pytest.fixture(scope="module")
def ranks(corpus_docs) -> dict[bytes, int]:
    return train_ranks([d[:20000] for d in corpus_docs] + MULTILINGUAL * 20, 900)


@pytest.fixture(scope="module")
def files(tmp_path_factory, ranks):
    folder = tmp_path_factory.mktemp("bpe")
    (folder / "tokenizer.model").write_text(tiktoken_text(ranks))
    tok = Tokenizer.from_file(folder / "tokenizer.model")
    (folder / "tokenizer.json").write_text(tok.to_json())
    return folder


@pytest.fixture(scope="module")
def tok(files) -> ByteLevelBPETokenizer:
    return Tokenizer.from_file(files / "tokenizer.model")


@pytest.fixture(scope="module")
def tj(files) -> ByteLevelBPETokenizer:
    return Tokenizer.from_file(files / "tokenizer.json")


class Raw:
    """The tokenizer.json read by plain `tokenizers`: `plain` encodes "<|eot_id|>" typed in text
    as text, `special` as the special token (the library's default)."""

    def __init__(self, path):
        from tokenizers import Tokenizer as RawTokenizer

        self.plain = RawTokenizer.from_file(str(path))
        self.plain.encode_special_tokens = True
        self.special = RawTokenizer.from_file(str(path))

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "Raw(tokenizer.json)"


@pytest.fixture(scope="module")
def raw(files) -> Raw:
    return Raw(files / "tokenizer.json")


def reference_ids(ranks: dict[bytes, int], text: str) -> list[int]:
    # The definition: Llama 3's regex (the `regex` module), then rank-order BPE per piece.
    import regex

    return [r for piece in regex.findall(LLAMA3_PATTERN, text) for r in bpe_merge(ranks, piece.encode("utf-8"))]


# Any Unicode text (no lone surrogates: they have no UTF-8), with the characters the regex and
# the byte merges care about drawn often.
TRICKY = list(" \t\n\r\x0b\x0c\x85\xa0\u2028\u3000'sStTrRvVmMlLdDſ0123456789٣½.,!?-_<|>") + ["<|eot_id|>", "'ll"]
ANY_CHAR = st.characters(blacklist_categories=("Cs",))
TEXTS = st.lists(st.sampled_from(TRICKY) | st.sampled_from(MULTILINGUAL[:5]).map(lambda s: s[:8]) | ANY_CHAR,
                 max_size=30).map("".join)
# Assigned characters only where the `regex` module is the reference: its Unicode tables are
# newer than those of `tokenizers` (and tiktoken), which differ on code points assigned since.
ASSIGNED = st.lists(st.sampled_from(TRICKY) | st.characters(blacklist_categories=("Cs", "Cn")),
                    max_size=30).map("".join)


def slow(examples: int):
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- the special-token table ------------------------------------------------------------------


def test_llama3_special_token_table():
    v30 = {name: 128000 + i for i, name in enumerate(llama3_special_tokens("llama3"))}
    v31 = {name: 128000 + i for i, name in enumerate(llama3_special_tokens("llama3.1"))}
    assert len(v30) == len(v31) == 256
    assert [n for n, _ in sorted(v30.items(), key=lambda x: x[1])][:11] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|reserved_special_token_4|>", "<|eot_id|>", "<|reserved_special_token_5|>"]
    assert v30["<|reserved_special_token_250|>"] == 128255
    assert [n for n, _ in sorted(v31.items(), key=lambda x: x[1])][:12] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
        "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_2|>"]
    assert v31["<|reserved_special_token_246|>"] == 128255
    for table in (v30, v31):  # the ids every Llama 3 generation relies on
        assert (table["<|begin_of_text|>"], table["<|end_of_text|>"], table["<|start_header_id|>"],
                table["<|end_header_id|>"], table["<|eot_id|>"]) == (128000, 128001, 128006, 128007, 128009)
    with pytest.raises(ValueError, match="llama3.1"):
        llama3_special_tokens("llama4")


def test_special_ids_follow_the_ranks(tok, ranks, files):
    n = len(ranks)
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (n, n + 1, n + 4, -1)
    assert tok.special_tokens["<|eot_id|>"] == n + 9
    assert stop_ids(tok) == tok.stop_ids == {n + 1, n + 8, n + 9}  # end_of_text, eom_id, eot_id
    old = ByteLevelBPETokenizer(files / "tokenizer.model", specials="llama3")
    assert (old.pad_id, old.stop_ids) == (-1, {n + 1, n + 9})
    assert old.id_to_piece(n + 8) == "<|reserved_special_token_4|>"
    assert [tok.id_to_piece(i) for i in (n, n + 9)] == ["<|begin_of_text|>", "<|eot_id|>"]
    assert tok.piece_to_id("<|eot_id|>") == n + 9 and tok.piece_to_id("no such piece") == -1


# -- loading ----------------------------------------------------------------------------------


def test_from_file_picks_the_class_from_the_content(files, tok, tj, tiny_tokenizer, tmp_path):
    assert (tok.format, tj.format) == ("tiktoken", "json")
    assert detect_format(files / "tokenizer.model") == TIKTOKEN
    assert detect_format(files / "tokenizer.json") == JSON_BYTE_LEVEL
    assert detect_format(tiny_tokenizer.path) == SENTENCEPIECE
    save_tokenizer_json(tiny_tokenizer, tmp_path / "tokenizer.json")
    assert detect_format(tmp_path / "tokenizer.json") == JSON_SENTENCEPIECE
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), HFTokenizer)
    assert isinstance(load_tokenizer(tiny_tokenizer.path), Tokenizer)
    assert isinstance(load_tokenizer(files / "tokenizer.json"), ByteLevelBPETokenizer)
    renamed = tmp_path / "vocab.txt"  # the name does not matter, the content does
    renamed.write_bytes((files / "tokenizer.model").read_bytes())
    assert isinstance(Tokenizer.from_file(renamed), ByteLevelBPETokenizer)
    with pytest.raises(ValueError, match="tiktoken BPE model.*load_tokenizer"):
        Tokenizer(files / "tokenizer.model")
    assert (tj.vocab_size, tj.bos_id, tj.eos_id, tj.pad_id, tj.stop_ids, tj.special_tokens) == (
        tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.special_tokens)
    assert [tj.id_to_piece(i) for i in range(tj.vocab_size)] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert tj.merges() == tok.merges()
    in_memory = ByteLevelBPETokenizer.from_json(json.loads(tok.to_json()))
    assert in_memory.encode("in memory 日本") == tj.encode("in memory 日本")


def test_save_writes_the_format_it_read(files, tok, tj, tmp_path):
    tok.save(tmp_path / "a" / "tokenizer.model")
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (files / "tokenizer.model").read_bytes()
    tj.save(tmp_path / "b" / "tokenizer.json")
    assert (tmp_path / "b" / "tokenizer.json").read_text() == (files / "tokenizer.json").read_text()
    again = load_tokenizer(tmp_path / "a" / "tokenizer.model")
    text = "Round trip: 日本語 😀 <|eot_id|>"
    assert again.encode(text) == tok.encode(text) == load_tokenizer(tmp_path / "b" / "tokenizer.json").encode(text)
    assert read_tiktoken(tmp_path / "a" / "tokenizer.model") == tok.ranks


def test_bad_files_say_what_is_wrong(tmp_path, ranks):
    bad = tmp_path / "tokenizer.model"
    lines = tiktoken_text(ranks).splitlines()
    bad.write_text("\n".join(lines[:5] + ["not base64! 5"] + lines[6:]) + "\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:6: expected a tiktoken line"):
        ByteLevelBPETokenizer(bad)
    bad.write_text("\n".join(lines[:5] + lines[6:]) + "\n")  # rank 5 (byte 0x05) missing
    with pytest.raises(ValueError, match="ranks must be 0"):
        ByteLevelBPETokenizer(bad)
    without_a = {t: r for t, r in ranks.items() if t != b"a"}
    bad.write_text(tiktoken_text({t: i for i, t in enumerate(sorted(without_a, key=without_a.get))}))
    with pytest.raises(ValueError, match="every single byte.*0x61"):
        load_tokenizer(bad)
    bad.write_text("")
    with pytest.raises(ValueError, match="empty"):
        ByteLevelBPETokenizer(bad)
    with pytest.raises(FileNotFoundError):
        ByteLevelBPETokenizer(tmp_path / "missing.model")
    wordlevel = tmp_path / "tokenizer.json"
    wordlevel.write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}))
    with pytest.raises(ValueError, match="WordLevel"):
        load_tokenizer(wordlevel)
    with pytest.raises(ValueError, match="ByteLevel decoder"):
        ByteLevelBPETokenizer(wordlevel)
    wordlevel.write_bytes(b'{"model": "\xff"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        ByteLevelBPETokenizer(wordlevel)


# -- encoding ---------------------------------------------------------------------------------


@slow(300)
@given(text=TEXTS, bos=st.booleans(), eos=st.booleans())
def test_any_text_round_trips(tok, tj, text, bos, eos):
    ids = tok.encode(text, bos=bos, eos=eos)
    assert ids[:1] == [tok.bos_id] if bos else tok.bos_id not in ids
    assert ids[-1:] == [tok.eos_id] if eos else tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tj.encode(text, bos=bos, eos=eos) == ids
    assert tj.decode(ids) == text


@slow(300)
@given(text=ASSIGNED)
def test_ids_are_the_reference_algorithms(tok, ranks, text):
    pytest.importorskip("regex")
    assert tok.encode(text, bos=False) == reference_ids(ranks, text)


@slow(300)
@given(text=TEXTS)
def test_json_ids_are_tokenizers_ids(tj, raw, text):
    assert tj.encode(text, bos=False) == raw.plain.encode(text, add_special_tokens=False).ids
    assert tj.encode(text) == raw.plain.encode(text).ids  # the file's post-processor adds <|begin_of_text|>
    assert tj.encode(text, allow_special=True) == raw.special.encode(text).ids


def test_same_ids_as_tiktoken(tok, ranks):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding("tiny", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens=dict(tok.special_tokens))
    rng = random.Random(0)
    pool = TRICKY + list("".join(MULTILINGUAL))
    for _ in range(3000):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(40)))
        assert tok.encode(text, bos=False) == enc.encode(text, disallowed_special=()), text
        assert tok.encode(text, bos=False, allow_special=True) == enc.encode(text, allowed_special="all"), text
        assert tok.decode(enc.encode(text, disallowed_special=())) == text


@slow(60)
@given(data=st.data())
def test_rank_bpe_in_tokenizers_equals_the_reference_on_any_vocabulary(data):
    # Random vocabularies over a few letters give many tokens with several splits and ties
    # between them: the merges derived from ranks must still reproduce rank-order BPE.
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    ranks = {bytes([b]): b for b in range(256)}
    grown = [b"a", b"b", b"c"]
    while len(ranks) < 256 + rng.randrange(3, 40):
        token = rng.choice(grown) + rng.choice(grown)
        if token not in ranks and len(token) <= 8:
            ranks[token] = len(ranks)
            grown.append(token)
    tok = ByteLevelBPETokenizer.from_ranks(ranks, specials=[])
    for _ in range(30):
        word = "".join(rng.choice("abc") for _ in range(rng.randrange(1, 25)))
        assert tok.encode(word, bos=False) == bpe_merge(ranks, word.encode()), (word, ranks)


def test_pretokenizer_splits_like_llama3():
    tok = ByteLevelBPETokenizer.from_ranks({bytes([b]): b for b in range(256)})
    cases = {
        "I'm don't you'LL they're we've she'd it's": [
            "I", "'m", " don", "'t", " you", "'LL", " they", "'re", " we", "'ve", " she", "'d", " it", "'s"],
        "Don'T 'S": ["Don", "'T", " '", "S"],
        "don’t": ["don", "’t"],  # only the ASCII apostrophe makes a contraction
        "1234567 12 3": ["123", "456", "7", " ", "12", " ", "3"],
        "3.14159": ["3", ".", "141", "59"],
        "abc123def": ["abc", "123", "def"],
        "$100.50": ["$", "100", ".", "50"],
        "hello   world": ["hello", "  ", " world"],  # the last space goes with the word
        "   ": ["   "],
        "\t\tindent": ["\t", "\tindent"],
        "a\n\n\nb": ["a", "\n\n\n", "b"],
        "x\r\ny": ["x", "\r\n", "y"],
        "x  \n  y": ["x", "  \n", " ", " y"],
        "x \n\n y  \n": ["x", " \n\n", " y", "  \n"],
        "Hello, world!!\n": ["Hello", ",", " world", "!!\n"],
        " ...\n\n": [" ...\n\n"],
        "e.g.\u00a0foo": ["e", ".g", ".", "\u00a0foo"],
        "日本語のテキスト": ["日本語のテキスト"],
        "😀😀 ok": ["😀😀", " ok"],
    }
    for text, pieces in cases.items():
        assert tok.pre_tokenize(text) == pieces, text


@slow(300)
@given(text=ASSIGNED)
def test_pretokenizer_is_the_llama3_regex(text):
    regex = pytest.importorskip("regex")
    tok = ByteLevelBPETokenizer.from_ranks({bytes([b]): b for b in range(256)})
    assert tok.pre_tokenize(text) == regex.findall(LLAMA3_PATTERN, text)


def meta_split(s: str, limit: int):
    # Meta's reference cut, character by character: a slice ends when the current run of
    # whitespace or non-whitespace characters would exceed `limit`.
    run, space, start = 0, s[0].isspace() if s else False, 0
    for i, c in enumerate(s):
        if c.isspace() != space:
            run, space = 1, c.isspace()
        else:
            run += 1
            if run > limit:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


def test_long_runs_are_cut_as_meta_cuts_them(tok, tj, raw):
    r = MAX_RUN_CHARS
    texts = ["", "short", "a" * r, "a" * (r + 1), " " * (2 * r + 7) + "x", "ab " * 9000 + "z" * (3 * r + 5) + " \n" * 3,
             "\u3000" * (r + 3) + "b" * 10, "w" * (MAX_ENCODE_CHARS + 10)]
    for text in texts:
        want = [p for i in range(0, len(text), MAX_ENCODE_CHARS) for p in meta_split(text[i:i + MAX_ENCODE_CHARS], r)]
        assert list(split_long_runs(text)) == (want if text else [""])
    text = "a" * (r + 100)  # one piece for `tokenizers`, two for Meta's reference
    assert tok.encode(text, bos=False) == tok.encode("a" * r, bos=False) + tok.encode("a" * 100, bos=False)
    assert tj.encode(text, bos=False) == raw.plain.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_in_text_stay_text_unless_allowed(tok, tj, tiny_tokenizer):
    eot, header = tok.special_tokens["<|eot_id|>"], tok.special_tokens["<|start_header_id|>"]
    text = "hi<|eot_id|><|start_header_id|>user"
    plain = tok.encode(text, bos=False)
    assert eot not in plain and header not in plain and tok.decode(plain) == text
    hi, user = tok.encode("hi", bos=False), tok.encode("user", bos=False)
    assert tok.encode(text, bos=False, allow_special=True) == hi + [eot, header] + user
    assert tok.encode(text, bos=False, allow_special="all") == hi + [eot, header] + user
    assert tj.encode(text, bos=False, allow_special=True) == hi + [eot, header] + user
    assert tok.encode(text, bos=False, allow_special={"<|eot_id|>"}) == (
        hi + [eot] + tok.encode("<|start_header_id|>user", bos=False))
    assert tok.encode_batch([text, "x"], bos=False, allow_special=True) == [hi + [eot, header] + user,
                                                                             tok.encode("x", bos=False)]
    assert tok.decode(hi + [eot, header] + user) == "hiuser"  # special tokens are control tokens
    with pytest.raises(ValueError, match="<|not_special|> is not special"):
        tok.encode(text, allow_special={"<|not_special|>"})
    # SentencePiece takes the argument too; "<s>" in text is text either way.
    assert tiny_tokenizer.encode("<s>x", allow_special=True) == tiny_tokenizer.encode("<s>x")
    assert stop_ids(tiny_tokenizer) == {tiny_tokenizer.eos_id}


def test_batch_and_errors(tok):
    texts = ["hello", " world\n", "", "日本語"]
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, bos=True, eos=True) for t in texts]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="surrogate U\\+D800 at character 1"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.stream_decoder().push(tok.vocab_size)


# -- decoding ---------------------------------------------------------------------------------


# Ids weighted towards what splits characters: the single bytes 0x80-0xFF (ranks 128-255) and
# ASCII, besides any id (taken modulo the vocabulary size: special tokens included).
ID_LISTS = st.lists(st.integers(0x80, 0xFF) | st.integers(0, 127) | st.integers(0, 10**6), max_size=16)


def is_text(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@slow(400)
@given(ids=ID_LISTS, cut=st.integers(0, 16))
def test_stream_decoder_equals_decode(tok, tj, raw, ids, cut):
    ids = [i % tok.vocab_size for i in ids]
    want = tok.decode(ids)
    assert want == raw.plain.decode(ids)  # the same U+FFFD rules as `tokenizers` (special tokens skipped)
    assert tj.decode(ids) == want
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == want
    # After a prompt: the output continues decode(prompt) wherever that is a prefix of the whole.
    prefix, rest = ids[:cut], ids[cut:]
    stream = tok.stream_decoder(prefix)
    out = "".join(stream.push(i) for i in rest) + stream.flush()
    head = tok.decode(prefix)
    if want.startswith(head):
        assert head + out == want


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@slow(200)
@given(text=TEXTS)
def test_stream_never_splits_a_character(tok, text):
    # Text that is valid Unicode never shows a U+FFFD it does not contain, however its bytes
    # fall into tokens (emoji and CJK are split across byte tokens here).
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == text
    assert sum(c.count("\ufffd") for c in chunks) == text.count("\ufffd")
    for cut in range(len(ids) + 1):
        prompt = tok.stream_decoder(ids[:cut])
        head = tok.decode(ids[:cut])
        # Only a prompt that ends between characters: one ending inside a character shows a U+FFFD
        # for its part, which a text that holds U+FFFD itself would wrongly "start with".
        raw = b"".join(tok.token_bytes(i) for i in ids[:cut])
        if text.encode().startswith(raw) and _is_utf8(raw):
            assert head + "".join(prompt.push(i) for i in ids[cut:]) + prompt.flush() == text


def test_piece_table(tok, tj):
    table = tok.piece_table()
    assert table == tj.piece_table() and len(table) == tok.vocab_size
    assert all(table[i] is None for i in tok.special_tokens.values())
    assert table[0x41] == "A" and table[0xE6] == 0xE6  # a lone lead byte is no character
    for i, entry in enumerate(table):
        if isinstance(entry, str):
            assert entry == tok.token_bytes(i).decode("utf-8", "replace")
    partial = [b for b in tok.token_bytes_table() if len(b) > 1 and not is_text(b)]
    assert partial, "the vocabulary should hold tokens with part of a character"
    for i in range(len(tok.ranks)):
        assert tok.id_to_piece(i) == "".join(byte_alphabet()[b] for b in tok.token_bytes(i))
        assert tok.piece_to_id(tok.id_to_piece(i)) == i
    assert tok.id_to_piece(ord(" ")) == "Ġ"
    assert byte_alphabet()[ord(" ")] == "Ġ" and byte_alphabet()[ord("\n")] == "Ċ"
    assert len(set(byte_alphabet())) == 256


def test_added_tokens_of_a_tokenizer_json(tj, tmp_path):
    # A tokenizer.json may add tokens that are not special: they are always split out of the
    # text and decode through the ByteLevel decoder like any token ("é!" comes back as bytes
    # E9 21, invalid UTF-8, in `tokenizers` too).
    from tokenizers import Tokenizer as RawTokenizer

    data = json.loads(tj.to_json())
    n = tj.vocab_size
    data["added_tokens"] += [
        {"id": n, "content": "<tag>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": False},
        {"id": n + 1, "content": "é!", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": False},
        {"id": n + 2, "content": "<|im_end|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    tok = load_tokenizer(path)
    raw = RawTokenizer.from_file(str(path))
    raw.encode_special_tokens = True
    assert tok.vocab_size == n + 3 and tok.special_tokens["<|im_end|>"] == n + 2
    for text in ["a<tag>b", "x é! y", "<|im_end|><tag>", "日本<tag>😀"]:
        ids = tok.encode(text, bos=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == raw.decode(ids)
        stream = tok.stream_decoder()
        assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)
    assert tok.encode("<|im_end|>", bos=False, allow_special=True) == [n + 2]
    assert tok.piece_table()[n] == "<tag>" and tok.piece_table()[n + 2] is None
