"""`llamaworks chat`: the session's history and context budget in-process, and the REPL driven
through a pseudo-terminal (two turns, /reset, /system, Ctrl-C stops a reply, /exit)."""

from __future__ import annotations

import io
import sys

import pytest
from tiny_llama3 import make_model_dir, write_tokenizer

from llamaworks.inference.chat import ChatSession, run_repl
from llamaworks.inference.load import load_model
from llamaworks.tokenizer.chat import encode_chat, resolve_chat_template

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, corpus_docs):
    root = tmp_path_factory.mktemp("chat")
    return make_model_dir(root / "model", write_tokenizer(root / "tok", corpus_docs))


@pytest.fixture
def session(llama3_dir):
    model, tok = load_model(llama3_dir)
    return ChatSession(model, tok, resolve_chat_template(tok), system="Be brief.", max_new_tokens=8,
                       temperature=0.0)


def test_each_turn_is_the_template_over_the_whole_conversation(session):
    first, _ = session.reply("Hello there", lambda _: None)
    ids, dropped = session.prompt_ids()
    assert dropped == 0
    # The next prompt is the conversation so far, encoded by the one chat renderer.
    assert ids == encode_chat(session.tokenizer, session.template, session.messages())
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant"]
    assert session.messages()[2]["content"] == first
    session.reset()
    assert session.messages() == [{"role": "system", "content": "Be brief."}]


def test_streamed_text_is_the_reply(session):
    pieces: list[str] = []
    answer, _ = session.reply("Tell me something", pieces.append)
    assert "".join(pieces) == answer


def test_old_turns_are_dropped_to_fit_the_context(session):
    session.model.args.max_seq_len, session.max_new_tokens = 160, 8  # a small window
    dropped_total = 0
    for i in range(12):
        _, dropped = session.reply(f"message number {i} with a few more words in it", lambda _: None)
        dropped_total += dropped
        assert len(session.prompt_ids()[0]) <= 160 - 8 or session.turns[-1]["role"] == "assistant"
    assert dropped_total > 0
    assert session.messages()[0]["role"] == "system"  # the system prompt stays
    assert session.turns[0]["role"] == "user"  # exchanges are dropped whole


def test_a_message_too_long_for_the_context_is_an_error_and_not_kept(session):
    session.model.args.max_seq_len = 64
    with pytest.raises(ValueError, match="shorten it"):
        session.reply("word " * 200, lambda _: None)
    assert session.turns == []


def test_repl_commands_in_process(session):
    lines = iter(["hi", "/system Talk like a pirate.", "/bogus", "hello again", "/reset", "/exit"])
    out = io.StringIO()
    assert run_repl(session, read=lambda _: next(lines), out=out) == 0
    text = out.getvalue()
    assert "system prompt set" in text and "unknown command '/bogus'" in text and "conversation reset" in text
    assert session.system == "Talk like a pirate." and session.turns == []


def test_chat_in_a_pseudo_terminal(llama3_dir):
    pexpect = pytest.importorskip("pexpect", reason="pexpect drives the terminal (pip install pexpect)")
    child = pexpect.spawn(sys.executable, ["-m", "llamaworks", "chat", "--checkpoint", str(llama3_dir),
                                           "--device", "cpu", "--max-new-tokens", "200", "--temperature", "1.0",
                                           "--seed", "0"],
                          encoding="utf-8", timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    try:
        child.expect(">>> ")
        child.sendline("Hello")
        child.expect(">>> ")  # first turn answered
        child.sendline("And again")
        child.expect(">>> ")  # second turn
        child.sendline("/reset")
        child.expect("conversation reset")
        child.expect(">>> ")
        child.sendline("A long answer please")
        child.expect("please\r\n")  # the terminal's echo of the line
        child.expect(r"\S", timeout=60)  # the reply has started streaming
        child.sendintr()  # Ctrl-C: stops the reply, not the program
        child.expect(">>> ", timeout=60)
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
