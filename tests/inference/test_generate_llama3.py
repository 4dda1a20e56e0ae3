"""Generation on a Llama-3-style model directory (tiktoken tokenizer.model, random weights):
`generate`, `generate_ids`, speculative decoding and `llamaworks generate` stop at each of
<|eot_id|>, <|eom_id|> and <|end_of_text|>, and streamed text never splits a character."""

from __future__ import annotations

import copy
import shutil
import sys

import pytest
import torch

from llamaworks.cli import main as cli_main
from llamaworks.inference import command as inference_command
from llamaworks.inference.generate import generate, generate_ids
from llamaworks.inference.load import load_model
from llamaworks.inference.speculative import check_same_vocabulary, generate_speculative, speculative_batch
from llamaworks.modeldir import save_model
from llamaworks.tokenizer import ByteLevelBPETokenizer, load_tokenizer

pytest.importorskip("tokenizers")

from tiny_llama3 import ScriptedModel, make_model_dir, steer_to_stop, write_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STOPS = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]
PROMPT = "The king said"


@pytest.fixture(scope="module")
def llama3(tmp_path_factory, corpus_docs):
    root = tmp_path_factory.mktemp("llama3")
    path = make_model_dir(root / "model", write_tokenizer(root / "tok", corpus_docs), n_layers=2)
    model, tok = load_model(path)
    return path, model, tok


@pytest.fixture(scope="module")
def steered(llama3, tmp_path_factory):
    """Per stop token: a model directory whose greedy output of PROMPT stops at it, and the
    tokens before it."""
    path, model, tok = llama3
    out = {}
    for name in STOPS:
        m = copy.deepcopy(model)
        before = steer_to_stop(m, tok.encode(PROMPT), tok.special_tokens[name])
        d = tmp_path_factory.mktemp("steered") / name.strip("<|>")
        out[name] = (save_model(m, tok, d), m, before)
    return out


def test_the_tokenizer_stops_at_the_end_of_turn_tokens_too(llama3):
    _, _, tok = llama3
    assert tok.stop_ids == {tok.special_tokens[n] for n in STOPS} and tok.eos_id in tok.stop_ids


@pytest.mark.parametrize("name", STOPS)
def test_generate_stops_at_each_stop_token(steered, llama3, name):
    _, _, tok = llama3
    _, model, before = steered[name]
    [c] = generate(model, tok, [PROMPT], 20, temperature=0.0)
    assert c.finish_reason == "stop" and c.tokens == before
    assert c.text == tok.decode(before)
    # generate_ids: the row repeats its stop id and the loop ends early, on the device's flags.
    chunks = list(generate_ids(model, [tok.encode(PROMPT)], 20, temperature=0.0, stop_ids=tok.stop_ids,
                               sync_every=1))
    ids = torch.cat([c[0] for c in chunks], 1)[0].tolist()
    assert ids == before + [tok.special_tokens[name]]


def test_generate_ids_keeps_emitting_each_rows_own_stop_id(steered, llama3):
    # Two stop ids in one batch: each finished row repeats the id it stopped at.
    _, _, tok = llama3
    _, model, before = steered["<|eom_id|>"]
    eom, eot = tok.special_tokens["<|eom_id|>"], tok.special_tokens["<|eot_id|>"]
    prompts = [tok.encode(PROMPT), tok.encode("Love is")]
    free = torch.cat([c[0] for c in generate_ids(model, prompts, 8, temperature=0.0)], 1)[1].tolist()
    j = next(j for j in range(1, 8) if free[j] not in free[:j] and free[j] not in before)
    stops = {eom, free[j]}  # the second row stops at its token j
    got = torch.cat([c[0] for c in generate_ids(model, prompts, 8, temperature=0.0, stop_ids=stops,
                                                sync_every=1)], 1).tolist()
    n = len(before)
    assert got[0][: n + 1] == before + [eom] and set(got[0][n:]) == {eom}
    assert got[1][: j + 1] == free[: j + 1] and set(got[1][j:]) == {free[j]}
    assert eot not in stops


@pytest.mark.parametrize("name", STOPS)
def test_generate_command_stops_at_each_stop_token(steered, llama3, name, capsys):
    _, _, tok = llama3
    path, _, before = steered[name]
    code = cli_main(["generate", "--checkpoint", str(path), "--prompt", PROMPT, "--max-new-tokens", "20",
                     "--temperature", "0", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == PROMPT + tok.decode(before) + "\n"
    assert f"decode: {len(before)} tokens" in err


def test_speculative_decoding_stops_at_the_stop_tokens(steered, llama3):
    _, _, tok = llama3
    _, model, before = steered["<|eot_id|>"]
    got = generate_speculative(model, model, tok, PROMPT, 20, k=3)
    assert got.finish_reason == "stop" and got.tokens == before
    outs, _ = speculative_batch(model, model, [tok.encode(PROMPT)], 20, k=3, stop_ids=tok.stop_ids)
    assert outs[0] == before + [tok.special_tokens["<|eot_id|>"]]


def _bytes_ids(tok: ByteLevelBPETokenizer, text: str) -> list[int]:
    # Each byte of `text` as its own token: every character split across tokens.
    table = {b: i for i, b in enumerate(tok.token_bytes_table()) if len(b) == 1}
    return [table[bytes([b])] for b in text.encode("utf-8")]


def test_streaming_never_splits_a_character(llama3):
    _, _, tok = llama3
    text = "é日本😀!"
    prompt = tok.encode(PROMPT)
    script = _bytes_ids(tok, text) + [tok.special_tokens["<|eot_id|>"]]
    model = ScriptedModel(tok.vocab_size, len(prompt), script)
    deltas = []
    [c] = generate(model, tok, [PROMPT], 40, temperature=0.0, on_text=lambda i, d: deltas.append(d))
    assert c.finish_reason == "stop" and c.text == text and "".join(deltas) == text
    assert [d for d in deltas if d] == list(text)  # each character whole, as soon as its last byte arrives


def test_generate_command_streams_whole_characters(llama3, monkeypatch, capsys):
    path, _, tok = llama3
    text = "naïve 日本"
    prompt = tok.encode(PROMPT)
    model = ScriptedModel(tok.vocab_size, len(prompt), _bytes_ids(tok, text) + [tok.special_tokens["<|eom_id|>"]])
    monkeypatch.setattr(inference_command, "load_model", lambda *a, **k: (model, tok))
    writes = []

    class Recorder:
        def write(self, s):
            writes.append(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert cli_main(["generate", "--checkpoint", str(path), "--prompt", PROMPT, "--max-new-tokens", "40",
                     "--temperature", "0", "--device", "cpu"]) == 0
    assert "".join(writes) == PROMPT + text + "\n"
    assert all("\ufffd" not in w for w in writes)
    assert [w for w in writes[1:-1] if w] == list(text)


def test_a_draft_with_another_vocabulary_is_refused(llama3, tiny_model_dir, tmp_path, capsys):
    path, model, tok = llama3
    code = cli_main(["generate", "--checkpoint", str(path), "--prompt", PROMPT, "--draft", str(tiny_model_dir),
                     "--max-new-tokens", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and str(tiny_model_dir) in err and "tokens against the target's" in err
    # The same size, two tokens swapped: the ids mean other tokens.
    ranks = dict(tok.ranks)
    a, b = [t for t in ranks if len(t) > 1][:2]
    ranks[a], ranks[b] = ranks[b], ranks[a]
    swapped = ByteLevelBPETokenizer.from_ranks(ranks)
    assert swapped.vocab_size == tok.vocab_size
    with pytest.raises(ValueError) as e:
        check_same_vocabulary(tok, swapped, "TARGET", "DRAFT")
    first = min(tok.ranks[a], tok.ranks[b])
    assert "DRAFT" in str(e.value) and "TARGET" in str(e.value) and f"id {first} is" in str(e.value)
    check_same_vocabulary(tok, load_tokenizer(path / "tokenizer.model"), "TARGET", "DRAFT")  # the same one passes
    draft = tmp_path / "draft"
    shutil.copytree(path, draft)
    swapped.save(draft / "tokenizer.model")
    code = cli_main(["generate", "--checkpoint", str(path), "--prompt", PROMPT, "--draft", str(draft),
                     "--max-new-tokens", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "does not share the tokenizer" in err and str(draft) in err
