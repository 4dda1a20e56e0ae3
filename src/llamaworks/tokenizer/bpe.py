"""Byte-level BPE, the tokenizer of Llama 3: Meta's tiktoken `tokenizer.model` and byte-level
`tokenizer.json` files, behind the same protocol as SentencePiece (base.py).

A token is a byte string. Text is split by a regex (Llama 3's `LLAMA3_PATTERN`), each piece's
UTF-8 bytes are merged pairwise, always the adjacent pair whose concatenation ranks lowest,
leftmost on ties; a piece that is itself a token is taken whole. Decoding joins the tokens'
bytes and decodes them as UTF-8, each invalid sequence becoming one U+FFFD (Python's
"replace", which is also what tiktoken and `tokenizers` give).

Two file formats:
- tiktoken (Meta's `tokenizer.model` for Llama 3): one "base64(token) rank" line per token,
  ranks 0..n-1; the special tokens are not in the file, Meta's code appends them at ids
  n..n+255 (`llama3_special_tokens`).
- `tokenizer.json` whose model is BPE over the byte-level alphabet with a ByteLevel decoder
  (Hugging Face's Llama 3 file, GPT-2 style files); its added tokens marked special are the
  special tokens.

Encoding runs in `tokenizers` (native speed): a tiktoken file becomes a `tokenizers` BPE whose
merges are every split of every token, ranked by the token's rank, with `ignore_merges` (a
whole-piece token is used directly, as tiktoken does); `bpe_merge` is the reference algorithm
written out, which the tests hold the conversion to.

Special tokens are control tokens: decode leaves them out (as SentencePiece leaves out <s>),
and text that spells one ("<|eot_id|>") is encoded as text unless `allow_special` names it.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Collection, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from llamaworks.atomic import atomic_write_text
from llamaworks.paths import path_kind
from llamaworks.tokenizer.base import JSON_BYTE_LEVEL, as_id_list, json_tokenizer_kind

__all__ = [
    "LLAMA3_PATTERN",
    "ByteLevelBPETokenizer",
    "ByteStreamDecoder",
    "bpe_merge",
    "byte_alphabet",
    "llama3_special_tokens",
    "read_tiktoken",
    "split_long_runs",
    "tiktoken_text",
]

# Llama 3's pre-tokenisation (Meta's `pat_str`, the same as OpenAI's cl100k): English
# contractions, letters with one optional leading non-letter, digits in groups of at most 3,
# punctuation runs with their newlines, newline runs, whitespace not followed by a word.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta's encode cuts text into 400,000-character windows and cuts runs of more than 25,000
# whitespace or non-whitespace characters (a tiktoken panic and a quadratic case). The cuts
# are pre-tokenisation boundaries, so they change ids; the tiktoken format reproduces them.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS + 1},}}|\S{{{MAX_RUN_CHARS + 1},}}")

LLAMA3_VERSIONS = ("llama3", "llama3.1")
NUM_SPECIAL = 256  # Meta reserves 256 ids after the ranks, used or not


def llama3_special_tokens(version: str = "llama3.1") -> list[str]:
    """The 256 special-token names Meta's code appends after the ranks, in id order.

    "llama3" is Llama 3.0 (meta-llama/llama3); "llama3.1" is Meta's llama-models reference
    for 3.1 and later, which names 128004 <|finetune_right_pad_id|>, 128005 <|step_id|>,
    128008 <|eom_id|> and 128010 <|python_tag|>. (Hugging Face's 3.1 tokenizer.json calls
    128005 <|reserved_special_token_2|> and numbers the reserved tokens after it from 3; a
    tokenizer.json carries its own names.)
    """
    if version == "llama3":
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        first_reserved = 5
    elif version == "llama3.1":
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        first_reserved = 2
    else:
        raise ValueError(f"unknown Llama 3 special-token table {version!r}; choose one of {', '.join(LLAMA3_VERSIONS)}")
    reserved = [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(NUM_SPECIAL - len(named))]
    return named + reserved


# Token names that end a reply: Llama 3 instruct ends a turn with <|eot_id|> and a tool call
# with <|eom_id|>; generation stops at these as well as at end-of-text.
STOP_NAMES = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
PAD_NAMES = ("<|finetune_right_pad_id|>", "<pad>")


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """Byte -> the character that stands for it in byte-level vocabularies (GPT-2's scheme,
    used by Hugging Face and GGUF files): printable Latin-1 bytes stand for themselves, the
    other 68 take the characters from U+0100 up, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 0x100
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(extra))
            extra += 1
    return tuple(out)


@lru_cache(maxsize=1)
def _alphabet_bytes() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_alphabet())}


def bytes_to_piece(token: bytes) -> str:
    """A token's bytes as its byte-level vocabulary string ("Ġthe" for b" the")."""
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in token)


def piece_to_bytes(piece: str) -> bytes:
    """The bytes a byte-level vocabulary string stands for. A string with a character outside
    the alphabet (an added token such as "<|eot_id|>" is inside it; "日本" is not) stands for
    its own UTF-8, as Hugging Face's ByteLevel decoder reads it."""
    table = _alphabet_bytes()
    try:
        return bytes(table[c] for c in piece)
    except KeyError:
        return piece.encode("utf-8")


# ---------------------------------------------------------------------------------------------
# tiktoken files


_TIKTOKEN_LINE = re.compile(rb"^([A-Za-z0-9+/]*={0,2}) (\d+)$")


def read_tiktoken(path: str | os.PathLike) -> dict[bytes, int]:
    """token bytes -> rank from a tiktoken BPE file, checked: ranks are 0..n-1 (the special
    tokens take the ids after them) and every single byte is a token (so any text encodes)."""
    path = Path(path)
    data = read_tokenizer_bytes(path, "tokenizer model")
    if not data.strip():
        raise ValueError(f"tokenizer model {path} is empty: copy it again")
    return parse_tiktoken(data, path)


def read_tokenizer_bytes(path: Path, what: str) -> bytes:
    """The bytes of a tokenizer file; a missing path, a directory, a FIFO or a device is an
    error naming it (a FIFO or /dev/zero would otherwise be read forever)."""
    kind = path_kind(path)
    if kind == "missing":
        raise FileNotFoundError(f"{what} {path} does not exist")
    if kind == "directory":
        raise ValueError(f"{what} {path} is a directory: pass the tokenizer file inside it")
    if kind != "file":
        raise ValueError(f"{what} {path} is {kind}, not a regular file: pass the tokenizer file")
    return path.read_bytes()


def parse_tiktoken(data: bytes, path: str | os.PathLike = "tokenizer.model") -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        m = _TIKTOKEN_LINE.match(line.strip())
        try:
            token = base64.b64decode(m[1], validate=True) if m else None
        except ValueError:
            token = None
        if token is None or not token:
            raise ValueError(f"{path}:{lineno}: expected a tiktoken line 'base64-token rank', got "
                             f"{line[:80]!r}; the file is not a tiktoken BPE model (or is damaged: copy it again)")
        if token in ranks:
            raise ValueError(f"{path}:{lineno}: token {token!r} appears twice; the file is damaged: copy it again")
        ranks[token] = int(m[2])
    check_ranks(ranks, path)
    return ranks


def check_ranks(ranks: dict[bytes, int], path: str | os.PathLike = "tokenizer.model") -> None:
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError(f"{path}: the ranks must be 0..{n - 1}, each once (the special tokens take the ids "
                         f"after them); the file is damaged or not a Llama 3 style tiktoken model")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: byte-level BPE needs every single byte as a token, and "
                         f"{', '.join(f'0x{b:02X}' for b in missing[:8])}{' ...' if len(missing) > 8 else ''} "
                         f"are missing; the file is damaged or not a byte-level tiktoken model")


def tiktoken_text(ranks: dict[bytes, int]) -> str:
    """The tiktoken file of `ranks`: "base64 rank" lines in rank order (Meta's layout)."""
    return "".join(f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def bpe_merge(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """The ranks of one pre-tokenised piece by the reference algorithm (what tiktoken does):
    the piece whole if it is a token, else start from single bytes and merge the adjacent pair
    whose concatenation has the lowest rank, the leftmost of equal ones, until none is a token."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return [ranks[p] for p in parts]


def ranks_to_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that makes rank-order BPE (`bpe_merge`) out of pair-merge BPE: every way
    to write a token as two tokens, ordered by the token's rank (then the parts' ranks, so the
    list is deterministic). tiktoken merges any adjacent pair whose concatenation is a token,
    whatever pairs training used, so every split is listed, not only the trained one."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                merges.append((rank, lr, rr, left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def split_long_runs(text: str) -> Iterator[str]:
    """`text` cut as Meta's Llama 3 encode cuts it: into windows of 400,000 characters, each
    cut inside every run of more than 25,000 whitespace (str.isspace) or non-whitespace
    characters, every 25,000 characters from the run's start."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        window = text[start:start + MAX_ENCODE_CHARS]
        at = 0
        for m in _LONG_RUN.finditer(window):  # re's \s on str is str.isspace(), as Meta's loop
            for cut in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
                yield window[at:cut]
                at = cut
        yield window[at:]
    if not text:
        yield text


# ---------------------------------------------------------------------------------------------
# tokenizer.json files


def _template_bos(node) -> str | None:
    # The special token a TemplateProcessing post-processor puts before a single sequence
    # (Llama 3's file adds <|begin_of_text|> this way), searched through a Sequence.
    if not isinstance(node, dict):
        return None
    if node.get("type") == "TemplateProcessing":
        single = node.get("single") or []
        if single and isinstance(single[0], dict) and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"].get("id")
        return None
    for child in node.get("processors") or []:
        found = _template_bos(child)
        if found:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# the tokenizer


class ByteStreamDecoder:
    """Token ids in, text out, as they arrive; the outputs joined equal `decode` of all ids.

    Bytes that begin a character more bytes could complete are held back, so a character split
    across tokens comes out whole; bytes that cannot become a character come out as U+FFFD
    exactly as `decode` writes them (one per maximal invalid sequence). Special tokens add no
    text and do not interrupt a character. With `prefix_ids` (a prompt) the output continues
    `decode(prefix_ids)`.
    """

    def __init__(self, tokenizer: ByteLevelBPETokenizer, prefix_ids: Sequence[int] = ()):
        self._bytes = tokenizer.token_bytes_table()
        self._pending = b""  # the start of a character not yet complete (at most 3 bytes)
        self._shown = b""  # pending bytes decode(prefix_ids) already showed as one U+FFFD
        for token_id in as_id_list(prefix_ids):
            self.push(token_id)
        self._shown = self._pending

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._bytes):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(self._bytes) - 1})")
        piece = self._bytes[token_id]
        if not piece:
            return ""
        data = self._pending + piece
        keep = incomplete_tail(data)
        self._pending = data[len(data) - keep:] if keep else b""
        return self._emit(data[:len(data) - keep])

    def flush(self) -> str:
        data, self._pending = self._pending, b""
        return self._emit(data)

    def _emit(self, data: bytes) -> str:
        if not data:
            return ""
        text = data.decode("utf-8", "replace")
        if self._shown:
            held, self._shown = self._shown, b""
            n = _utf8_length(held[0])
            if not _is_char(data[:n]):
                text = text[1:]  # the held bytes ended up invalid: their U+FFFD was already shown
        return text


def _utf8_length(lead: int) -> int:
    # Length of the character a lead byte starts; 0 for bytes no valid character starts with
    # (continuations 80-BF, C0/C1 that only start overlongs, F5-FF beyond U+10FFFF).
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _is_char(data: bytes) -> bool:
    try:
        return len(data.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of `data` are the start of a character that more bytes could
    complete (0-3); those are held back, anything else can be decoded now."""
    for k in range(1, min(3, len(data)) + 1):
        lead = data[-k]
        if 0x80 <= lead <= 0xBF:
            continue  # a continuation byte: the character, if any, starts further back
        n = _utf8_length(lead)
        if n <= k:
            return 0
        # Some continuation completes it; the second byte has the tightest range (E0: A0-BF,
        # ED: 80-9F, F0: 90-BF, F4: 80-8F), so trying 80, 90 and A0 there covers every case.
        head = data[-k:]
        fill = b"\x80" * (n - k - 1)
        return k if any(_is_char(head + bytes([c]) + fill) for c in (0x80, 0x90, 0xA0)) else 0
    return 0


class ByteLevelBPETokenizer:
    """Byte-level BPE (Llama 3) with the SentencePiece `Tokenizer`'s interface.

    Read from a tiktoken file (`ByteLevelBPETokenizer(path)`, `from_ranks`) with Llama 3's
    special tokens appended (`specials`: "llama3.1", "llama3", or a list of names), or from a
    byte-level tokenizer.json (`ByteLevelBPETokenizer(path)`, `from_json`); `save` writes the
    format it was read from (a custom `eos_id` travels beside it: modeldir.write_tokenizer_files).
    `stop_ids` are the ids generation stops at.
    """

    unk_id: int = -1  # every byte is a token: nothing is unknown

    def __init__(self, path: str | os.PathLike, specials: str | Sequence[str] = "llama3.1"):
        path = Path(path)
        data = read_tokenizer_bytes(path, "tokenizer file")
        if data.lstrip()[:1] == b"{":  # a tokenizer.json names its own special tokens: `specials` is not used
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e}); a tokenizer.json is JSON in UTF-8: copy it again") \
                    from None
            self._init_json(text, path)
        else:
            if not data.strip():
                raise ValueError(f"tokenizer model {path} is empty: copy it again")
            self._init_ranks(parse_tiktoken(data, path), specials, path)

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], specials: str | Sequence[str] = "llama3.1",
                   path: str | os.PathLike = "tokenizer.model") -> ByteLevelBPETokenizer:
        """From tiktoken ranks held in memory (e.g. rebuilt from a GGUF vocabulary); `path` is
        the name it is known by, not read."""
        tok = cls.__new__(cls)
        check_ranks(ranks, path)
        tok._init_ranks(dict(ranks), specials, Path(path))
        return tok

    @classmethod
    def from_json(cls, text: str | dict, path: str | os.PathLike = "tokenizer.json") -> ByteLevelBPETokenizer:
        """From tokenizer.json text (or its parsed dict) held in memory."""
        tok = cls.__new__(cls)
        tok._init_json(text if isinstance(text, str) else json.dumps(text, ensure_ascii=False), Path(path))
        return tok

    # -- loading ------------------------------------------------------------------------------

    def _init_ranks(self, ranks: dict[bytes, int], specials: str | Sequence[str], path: Path) -> None:
        tokenizers = _tokenizers()
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

        names = llama3_special_tokens(specials) if isinstance(specials, str) else list(specials)
        if len(set(names)) != len(names):
            raise ValueError("the special-token names must be distinct")
        n = len(ranks)
        self.path, self.format, self.pattern = path, "tiktoken", LLAMA3_PATTERN
        self._ranks = ranks
        self._json_text: str | None = None
        vocab = {bytes_to_piece(t): r for t, r in ranks.items()}
        merges = [(bytes_to_piece(a), bytes_to_piece(b)) for a, b in ranks_to_merges(ranks)]
        model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
        if not hasattr(model, "ignore_merges"):
            raise ImportError("reading a tiktoken BPE file needs tokenizers >= 0.19 (BPE.ignore_merges): "
                              "pip install -U tokenizers")
        model.ignore_merges = True  # a piece that is a token is taken whole, as tiktoken does
        tk = tokenizers.Tokenizer(model)
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
        bos = next((name for name in BOS_NAMES if name in names), None)
        tk.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False)] + ([
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, n + names.index(bos))])] if bos else []))
        self._tk = tk
        table = [b""] * (n + len(names))
        for t, r in ranks.items():
            table[r] = t
        self._setup(table, [bytes_to_piece(t) for t in table[:n]] + names,
                    {name: n + i for i, name in enumerate(names)})
        for name, i in self.special_tokens.items():
            if tk.token_to_id(name) != i:
                raise ValueError(f"{path}: special token {name!r} would not get id {i}; "
                                 f"the token {name!r} also appears among the ranks")

    def _init_json(self, text: str, path: Path) -> None:
        tokenizers = _tokenizers()
        try:
            data = json.loads(text)
            tk = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # json's ValueError, or tokenizers' own Exception type
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(e)[:200]})") from None
        if not isinstance(data, dict) or json_tokenizer_kind(data) != JSON_BYTE_LEVEL:
            model = data.get("model", {}) if isinstance(data, dict) else {}
            raise ValueError(f"{path}: a byte-level BPE tokenizer.json has a BPE model and a ByteLevel decoder or "
                             f"pre-tokenizer; this one is {model.get('type')} with decoder "
                             f"{(data.get('decoder') or {}).get('type') if isinstance(data, dict) else None}")
        self.path, self.format, self.pattern = path, "json", None
        self._ranks = None
        self._json_text = text
        vocab = tk.get_vocab(with_added_tokens=True)
        special = {t["content"]: t["id"] for t in data.get("added_tokens") or [] if t.get("special")}
        size = max(vocab.values(), default=-1) + 1
        pieces: list[str | None] = [None] * size
        for piece, i in vocab.items():
            pieces[i] = piece
        table = [b"" if p is None or p in special else piece_to_bytes(p) for p in pieces]
        self._tk = tk
        self._setup(table, pieces, special, bos=_template_bos(data.get("post_processor")))

    def _setup(self, table: list[bytes], pieces: list, special: dict[str, int], bos: str | None = None) -> None:
        # Special tokens are typed-text-as-text by default; allow_special splits them out
        # itself, so the shared `tokenizers` object never changes between calls (threads).
        self._tk.encode_special_tokens = True
        self._bytes = table
        self._pieces = pieces
        self._piece_ids: dict[str, int] | None = None
        self.special_tokens: dict[str, int] = dict(special)
        self.vocab_size: int = len(table)

        def first(names) -> int:
            return next((special[n] for n in names if n in special), -1)

        self.bos_id: int = special[bos] if bos in special else first(BOS_NAMES)
        self._eos_id: int = first(EOS_NAMES)
        # What the file says by its token names alone; a checkpoint whose eos is another token
        # (Llama 3 instruct: <|eot_id|>) records it beside the file (modeldir, HF, GGUF).
        self.default_bos_id, self.default_eos_id = self.bos_id, self._eos_id
        self.pad_id: int = first(PAD_NAMES)
        self.stop_ids: frozenset[int] = frozenset(
            [special[n] for n in STOP_NAMES if n in special] + ([self._eos_id] if self._eos_id >= 0 else []))
        self._table: list[str | int | None] | None = None

    @property
    def eos_id(self) -> int:
        """The id `encode(..., eos=True)` appends and generation stops at: <|end_of_text|> by the
        file's names, or what the checkpoint sets (tokenizer_config.json's eos_token, GGUF's
        tokenizer.ggml.eos_token_id; Llama 3 instruct: <|eot_id|>). Setting it adds it to
        `stop_ids`, which keep <|eot_id|>, <|eom_id|> and <|end_of_text|>."""
        return self._eos_id

    @eos_id.setter
    def eos_id(self, token_id: int) -> None:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
            raise ValueError(f"eos_id {token_id!r} is not a token id of {self.path} (0..{self.vocab_size - 1}); "
                             "give the id of the token that ends a sequence (e.g. piece_to_id('<|eot_id|>'))")
        self._eos_id = token_id
        self.stop_ids = self.stop_ids | {token_id}

    def __repr__(self) -> str:
        return f"ByteLevelBPETokenizer({str(self.path)!r}, format={self.format!r}, vocab_size={self.vocab_size})"

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False,
               allow_special: bool | str | Collection[str] = False) -> list[int]:
        """Ids of `text`, with <|begin_of_text|> first if `bos` and <|end_of_text|> last if `eos`.
        Text spelling a special token stays text unless `allow_special` is True (or "all") or
        a collection holding its name; then it becomes that token, as in Meta's reference."""
        return self.encode_batch([text], bos=bos, eos=eos, allow_special=allow_special)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     allow_special: bool | str | Collection[str] = False) -> list[list[int]]:
        splitter = self._special_splitter(allow_special)
        pieces: list[str] = []  # every text segment, encoded in one native batch
        layouts: list[list[int | tuple[int]]] = []  # per text: special ids, and (segment index,)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode takes str, not {type(text).__name__}")
            layout: list[int | tuple[int]] = []
            for chunk in (split_long_runs(text) if self.format == "tiktoken" else (text,)):
                parts = splitter(chunk) if splitter else (chunk,)
                for part in parts:
                    if isinstance(part, int):
                        layout.append(part)
                    elif part:
                        layout.append((len(pieces),))
                        pieces.append(part)
            layouts.append(layout)
        try:
            encoded = [e.ids for e in self._tk.encode_batch(pieces, add_special_tokens=False)] if pieces else []
        except TypeError:
            for text in texts:
                bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
                if bad is not None:
                    raise ValueError(f"the text holds a lone surrogate U+{ord(text[bad]):04X} at character {bad}, "
                                     f"which has no UTF-8 encoding; decode the input with errors='replace'") from None
            raise
        head = [self.bos_id] if bos and self.bos_id >= 0 else []
        tail = [self.eos_id] if eos and self.eos_id >= 0 else []
        out = []
        for layout in layouts:
            ids = list(head)
            for item in layout:
                if isinstance(item, int):
                    ids.append(item)
                else:
                    ids.extend(encoded[item[0]])
            out.append(ids + tail)
        return out

    def _special_splitter(self, allow_special):
        if allow_special is False or allow_special is None:
            return None
        if allow_special is True or allow_special == "all":
            names = frozenset(self.special_tokens)
        else:
            names = frozenset([allow_special] if isinstance(allow_special, str) else allow_special)
            unknown = sorted(names - self.special_tokens.keys())
            if unknown:
                raise ValueError(f"{', '.join(unknown[:5])} {'is' if len(unknown) == 1 else 'are'} not special "
                                 f"tokens of {self.path}; allow_special takes names from tokenizer.special_tokens")
        if not names:
            return None
        return _splitter(names, tuple(self.special_tokens[n] for n in sorted(names)), tuple(sorted(names)))

    def pre_tokenize(self, text: str) -> list[str]:
        """The pieces the pre-tokeniser cuts `text` into before BPE (for inspection and tests)."""
        return [piece_to_bytes(p).decode("utf-8", "replace") for p, _ in self._tk.pre_tokenizer.pre_tokenize_str(text)]

    # -- decoding -----------------------------------------------------------------------------

    def decode(self, ids) -> str:
        ids = as_id_list(ids)
        table = self._bytes
        try:
            if min(ids, default=0) < 0:
                raise IndexError
            data = b"".join([table[i] for i in ids])
        except IndexError:
            bad = [i for i in ids if not 0 <= i < len(table)][:5]
            raise ValueError(f"token ids {bad} are outside the vocabulary (0..{len(table) - 1})") from None
        return data.decode("utf-8", "replace")

    def stream_decoder(self, prefix_ids: Sequence[int] = ()) -> ByteStreamDecoder:
        return ByteStreamDecoder(self, prefix_ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` adds to decoded text (b"" for a special token)."""
        self._check_id(token_id)
        return self._bytes[token_id]

    def token_bytes_table(self) -> list[bytes]:
        return self._bytes

    def piece_table(self) -> list[str | int | None]:
        # The protocol's per-id entries: None for special tokens (invisible), a byte value for
        # a single byte that is no character by itself (0x80-0xFF), else the token's text; a
        # token holding part of a character has U+FFFD for that part (its exact bytes:
        # token_bytes).
        if self._table is None:
            table: list[str | int | None] = []
            special = set(self.special_tokens.values())
            for i, b in enumerate(self._bytes):
                if i in special or (not b and self._pieces[i] is None):
                    table.append(None)
                elif len(b) == 1 and b[0] >= 0x80:
                    table.append(b[0])
                else:
                    table.append(b.decode("utf-8", "replace"))
            self._table = table
        return self._table

    def piece_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def id_to_piece(self, token_id: int) -> str:
        """The token's vocabulary string: byte-level ("Ġthe") or the special token's name."""
        self._check_id(token_id)
        piece = self._pieces[token_id]
        return "" if piece is None else piece

    def piece_to_id(self, piece: str) -> int:
        if self._piece_ids is None:
            self._piece_ids = {p: i for i, p in enumerate(self._pieces) if p is not None}
        return self._piece_ids.get(piece, -1)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")

    # -- export -------------------------------------------------------------------------------

    @property
    def ranks(self) -> dict[bytes, int] | None:
        """token bytes -> rank of a tokenizer read from tiktoken ranks (None for tokenizer.json)."""
        return self._ranks

    def merges(self) -> list[tuple[str, str]]:
        """The BPE merges in priority order, as byte-level strings (GGUF's and HF's form)."""
        if self._ranks is not None:
            return [(bytes_to_piece(a), bytes_to_piece(b)) for a, b in ranks_to_merges(self._ranks)]
        merges = json.loads(self._json_text)["model"].get("merges") or []
        return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]

    def to_json(self) -> str:
        """tokenizer.json text: the file itself if read from one; for tiktoken ranks, the
        equivalent Hugging Face file (BPE from the ranks, Llama 3's regex, ByteLevel decoder,
        <|begin_of_text|> added by the post-processor)."""
        if self._json_text is not None:
            return self._json_text
        return self._tk.to_str(pretty=True) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the format it was read from (tiktoken file or tokenizer.json), atomically."""
        if self.format == "tiktoken":
            atomic_write_text(Path(path), tiktoken_text(self._ranks))
        else:
            atomic_write_text(Path(path), self._json_text)


def _tokenizers():
    # Encoding runs in Hugging Face's `tokenizers` (native BPE); only this class needs it.
    try:
        import tokenizers
    except ImportError:
        raise ImportError("byte-level BPE tokenizers (Llama 3) need the tokenizers package: pip install tokenizers") \
            from None
    return tokenizers


@lru_cache(maxsize=16)
def _splitter(names: frozenset[str], ids: tuple[int, ...], ordered: tuple[str, ...]):
    # Longest name first, so no special token is cut short by another that is its prefix.
    by_name = dict(zip(ordered, ids))
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=lambda n: (-len(n), n))))

    def split(text: str) -> list[str | int]:
        out: list[str | int] = []
        at = 0
        for m in pattern.finditer(text):
            out.append(text[at:m.start()])
            out.append(by_name[m[0]])
            at = m.end()
        out.append(text[at:])
        return out

    return split
