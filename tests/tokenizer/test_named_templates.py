"""Named chat templates of a folder (tokenizer/chat.py): read as transformers 5 reads them (the
.jinja files over tokenizer_config.json), written back as it writes them, chosen by name."""

from __future__ import annotations

import json

import pytest

from llamaworks.tokenizer.chat import (
    ChatTemplate,
    attach_chat_templates,
    resolve_chat_template,
    tokenizer_chat_templates,
    write_chat_template_files,
)

DEFAULT, TOOLS = "{{ 'D' }}", "{{ 'T' }}"
MESSAGES = [{"role": "user", "content": "hi"}]


def test_jinja_files_win_over_the_config_list(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": [{"name": "default", "template": "{{ 'old' }}"}, {"name": "rag", "template": "{{ 'R' }}"}]}))
    assert {n: t.render(MESSAGES) for n, t in ChatTemplate.folder_templates(tmp_path).items()} == {
        "default": "old", "rag": "R"}
    (tmp_path / "chat_template.jinja").write_text(DEFAULT)
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(TOOLS)
    found = ChatTemplate.folder_templates(tmp_path, bos_token="<x>", eos_token="<y>")
    assert {n: t.render(MESSAGES) for n, t in found.items()} == {"default": "D", "tool_use": "T"}
    assert (found["tool_use"].bos_token, found["tool_use"].eos_token) == ("<s>", "</s>")  # the config's own
    assert ChatTemplate.from_hf_folder(tmp_path, "tool_use").source == TOOLS
    with pytest.raises(ValueError, match=r"no chat template named 'rag' \(it has 'default', 'tool_use'\)"):
        ChatTemplate.from_hf_folder(tmp_path, "rag")
    (tmp_path / "additional_chat_templates" / "default.jinja").write_text(TOOLS)
    with pytest.raises(ValueError, match=r"default.jinja: 'default' is not a chat template name"):
        ChatTemplate.folder_templates(tmp_path)


def test_write_and_read_back_and_choose(tmp_path):
    class Tok:  # the attributes the functions read: the templates and the bos/eos ids
        bos_id, eos_id = 1, 2

        def id_to_piece(self, i):
            return {1: "<s>", 2: "</s>"}[i]

    tok = Tok()
    attach_chat_templates(tok, {"tool_use": ChatTemplate(TOOLS), "default": ChatTemplate(DEFAULT)})
    assert tok.chat_template.source == DEFAULT and list(tok.chat_templates) == ["tool_use"]
    assert list(tokenizer_chat_templates(tok)) == ["default", "tool_use"]
    write_chat_template_files(tok, tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == DEFAULT
    assert (tmp_path / "additional_chat_templates" / "tool_use.jinja").read_text() == TOOLS
    back = Tok()
    attach_chat_templates(back, ChatTemplate.folder_templates(tmp_path, bos_token="<s>", eos_token="</s>"))
    assert resolve_chat_template(back, "tool_use").render(MESSAGES) == "T"
    assert resolve_chat_template(back, "default").render(MESSAGES) == "D"
    assert resolve_chat_template(back).render(MESSAGES) == "D"
    assert resolve_chat_template(back, "plain").key == "plain"  # a built-in the checkpoint does not shadow
    attach_chat_templates(back, {"default": ChatTemplate(DEFAULT), "plain": ChatTemplate(TOOLS)})
    assert resolve_chat_template(back, "plain").render(MESSAGES) == "T"  # the checkpoint's own name first
    (tmp_path / "mine.jinja").write_text("{{ 'F' }}")
    assert resolve_chat_template(back, str(tmp_path / "mine.jinja")).render(MESSAGES) == "F"  # a file still
