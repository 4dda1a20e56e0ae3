"""Instruction data (data/sft.py) and the fine-tuning loader (train/sft.py): the three JSONL
layouts and their errors, labels that cover the assistant's tokens only, the held-out split,
padding that never leaks into an example, and a loss that weighs every unmasked target alike."""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from llamaworks.data.sft import (
    IGNORE_INDEX,
    Example,
    is_held_out,
    read_examples,
    split_examples,
    tokenize_conversation,
    tokenize_examples,
)
from llamaworks.model import ModelArgs, build_model
from llamaworks.tokenizer.chat import ChatTemplate
from llamaworks.train.sft import SFTLoader
from llamaworks.train.trainer import accumulate_masked_gradients


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def pieces(tok):
    return {"bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id)}


CONVERSATION = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Name the king."},
    {"role": "assistant", "content": "The king is Lear."},
    {"role": "user", "content": "And the queen?"},
    {"role": "assistant", "content": "Gertrude, lady of the night 42."},
]


# ---------------------------------------------------------------------------- layouts


def test_the_three_layouts_read_as_conversations(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Say hi.", "input": "", "output": "Hi.", "id": 7},  # other keys are ignored
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Count.", "output": "1 2 3"},  # input is optional
        "",  # blank lines are skipped
        {"instruction": "Null input.", "input": None, "output": "ok"},
    ])
    layout, examples = read_examples(alpaca)
    assert layout.name == "alpaca"
    assert [e.line for e in examples] == [1, 2, 3, 5]
    assert examples[0].messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
    assert examples[1].messages[0] == {"role": "user", "content": "Add.\n\n2 and 3"}
    assert examples[2].messages[0]["content"] == "Count." and examples[3].messages[0]["content"] == "Null input."

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    layout, (example,) = read_examples(chat)
    assert layout.name == "messages" and example.messages == CONVERSATION

    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Two plus two?", "completion": "Four."}])
    layout, (example,) = read_examples(pc)
    assert layout.name == "prompt-completion"
    assert example.messages == [{"role": "user", "content": "Two plus two?"},
                                {"role": "assistant", "content": "Four."}]


GOOD = {"instruction": "Say hi.", "output": "Hi."}


@pytest.mark.parametrize("records, line, expected", [
    # a missing key: the file, the line, the key, the layout line 1 set, the fix
    ([GOOD, GOOD, {"instruction": "x"}], 3,
     ["missing key 'output'", "alpaca layout", "line 1 set", "add it or delete"]),
    ([GOOD, {"messages": CONVERSATION}], 2, ["missing key 'instruction'", "looks like the messages layout",
                                             "every line must share it"]),
    ([{"prompt": "p", "completion": "c"}, {"prompt": "p"}], 2, ["missing key 'completion'", "prompt-completion"]),
    ([{"question": "q", "answer": "a"}], 1, ["no layout's key", "alpaca (instruction, optional input, output)",
                                             "messages", "prompt-completion"]),
    ([{"instruction": "i", "output": "o", "prompt": "p"}], 1, ["keys of several layouts"]),
    ([GOOD, '{"instruction": "broken'], 2, ["malformed JSON"]),
    ([["not", "an", "object"]], 1, ["a line is a JSON object"]),
    ([{"instruction": "i", "output": 3}], 1, ["'output' must be a string, got int"]),
    ([{"messages": [{"role": "user", "content": "hi"}]}], 1, ["no assistant message"]),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], 1, ["messages[0]['role'] is 'robot'"]),
    ([{"messages": [{"role": "user"}]}], 1, ["messages[0] has no 'content' key"]),
    ([{"messages": [{"role": "assistant", "content": "hi"}]}], 1, ["starts with a user message"]),
    ([{"messages": []}], 1, ["non-empty list"]),
])
def test_layout_errors_name_the_file_line_and_key(tmp_path, records, line, expected):
    path = write_jsonl(tmp_path / "data.jsonl", records)
    with pytest.raises(ValueError) as e:
        read_examples(path)
    assert str(e.value).startswith(f"{path}:{line}: "), str(e.value)
    for text in expected:
        assert text in str(e.value), str(e.value)


def test_an_empty_or_missing_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="holds no examples"):
        read_examples(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_examples(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="not a regular file"):
        read_examples(tmp_path)


# ---------------------------------------------------------------------------- labels


def assistant_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The unmasked stretches of `labels`, checked to be the ids at those positions."""
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == i
            current.append(label)
    return runs + ([current] if current else [])


def test_labels_are_the_assistant_turns_and_their_end_of_turn_token_llama2(tiny_tokenizer):
    tok = tiny_tokenizer
    template = ChatTemplate.builtin("llama2", **pieces(tok))
    ids, labels = tokenize_conversation(tok, template, CONVERSATION)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    runs = assistant_runs(ids, labels)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert run[-1] == tok.eos_id  # Llama 2 ends an assistant turn with </s>: the model learns to stop
        assert tok.decode(run[:-1]).strip() == reply
    # Everything else, the system prompt, the user turns, [INST] tags and BOS, is masked.
    masked = tok.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert "Answer in one line." in masked and "Name the king." in masked and "And the queen?" in masked
    assert "Lear" not in masked and "Gertrude" not in masked
    assert ids[0] == tok.bos_id and labels[0] == IGNORE_INDEX


def test_labels_with_the_plain_template_end_with_its_newline(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels = tokenize_conversation(tok, ChatTemplate.builtin("plain", **pieces(tok)), CONVERSATION)
    runs = assistant_runs(ids, labels)
    assert [tok.decode(r) for r in runs] == ["The king is Lear.\n", "Gertrude, lady of the night 42.\n"]


def test_labels_with_the_llama3_template_end_with_eot(tmp_path, corpus_docs):
    from tiny_llama3 import write_tokenizer

    from llamaworks.tokenizer import load_tokenizer

    tok = load_tokenizer(write_tokenizer(tmp_path, corpus_docs))
    ids, labels = tokenize_conversation(tok, ChatTemplate.builtin("llama3"), CONVERSATION)
    eot = tok.piece_to_id("<|eot_id|>")
    runs = assistant_runs(ids, labels)
    assert [tok.decode(r[:-1]) for r in runs] == ["The king is Lear.", "Gertrude, lady of the night 42."]
    assert all(r[-1] == eot for r in runs)
    masked = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX]
    assert tok.piece_to_id("<|start_header_id|>") in masked
    assert masked.count(eot) == 3  # the ends of the system turn and of the two user turns


def test_template_errors_name_the_line(tmp_path, tiny_tokenizer):
    # Llama 2's format refuses two user turns in a row, and its own tags in message text.
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},
    ])
    _, examples = read_examples(path)
    template = ChatTemplate.builtin("llama2", **pieces(tiny_tokenizer))
    with pytest.raises(ValueError, match=rf"^{path}:2: .*alternate"):
        tokenize_examples(examples, tiny_tokenizer, template, 4096, path)
    tagged = [Example(5, [{"role": "user", "content": "say [INST]"}, {"role": "assistant", "content": "no"}])]
    with pytest.raises(ValueError, match=rf"^{path}:5: .*\[INST\]"):
        tokenize_examples(tagged, tiny_tokenizer, template, 4096, path)


def test_examples_longer_than_seq_len_are_dropped_and_counted(tiny_tokenizer):
    template = ChatTemplate.builtin("llama2", **pieces(tiny_tokenizer))
    short = Example(1, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}])
    long = Example(2, [{"role": "user", "content": "the king " * 200}, {"role": "assistant", "content": "Yes."}])
    split = tokenize_examples([short, long, short], tiny_tokenizer, template, 64, "x.jsonl")
    assert [e.line for e in split.examples] == [1, 1] and split.dropped == 1 and split.longest > 64
    assert all(len(e.ids) <= 64 for e in split.examples)


# ---------------------------------------------------------------------------- held-out split


def test_the_held_out_split_is_a_fraction_chosen_by_content():
    examples = [Example(i, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
                for i in range(2000)]
    train, held = split_examples(examples, 0.1)
    assert 150 < len(held) < 250 and len(train) + len(held) == 2000
    # Not the order: the same examples are held out from a shuffled file; a copy joins its original.
    _, held_again = split_examples(examples[::-1] + [Example(9999, held[0].messages)], 0.1)
    assert sorted(e.line for e in held_again) == sorted([e.line for e in held] + [9999])
    assert split_examples(examples, 0.0)[1] == []
    assert is_held_out(held[0].messages, 0.1) and not is_held_out(train[0].messages, 0.1)


# ---------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def tokenized(tiny_tokenizer):
    template = ChatTemplate.builtin("llama2", **pieces(tiny_tokenizer))
    words = "the king queen lord lady love night day sword crown".split()
    examples = [Example(i + 1, [{"role": "user", "content": " ".join(words[: 1 + i % 9])},
                                {"role": "assistant", "content": " ".join(words[i % 5:])}]) for i in range(40)]
    return tokenize_examples(examples, tiny_tokenizer, template, 256, "x.jsonl").examples


def test_rows_are_one_example_each_right_padded_with_the_padding_masked(tokenized):
    loader = SFTLoader(tokenized[:38], batch_size=4, seq_len=256, pad_id=0, train=False, pad_multiple=8)
    x, y = next(loader)
    longest = max(len(e.ids) for e in tokenized[:4]) - 1
    assert x.shape == y.shape == (4, -(-longest // 8) * 8) and x.dtype == y.dtype == torch.int64
    for row, ex in enumerate(tokenized[:4]):
        n = len(ex.ids) - 1
        assert x[row, :n].tolist() == ex.ids[:-1].tolist() and y[row, :n].tolist() == ex.labels[1:].tolist()
        assert (x[row, n:] == 0).all() and (y[row, n:] == IGNORE_INDEX).all()
    # Validation: every example once, in file order, the last batch smaller; each pass the same.
    assert [b[0].shape[0] for b in loader] == [4] * 8 + [2]  # 38 examples: 10 batches, the first read above
    assert len(list(loader)) == 10


def test_training_order_is_shuffled_per_epoch_split_across_ranks_and_resumable(tokenized):
    def rows(loader, n):  # each row's example: its ids without the padding (pad_id 0 is <unk>, never in them)
        out = []
        for _ in range(n):
            for r in next(loader)[0].tolist():
                while r and r[-1] == 0:
                    r.pop()
                out.append(tuple(r))
        return out

    one = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0)
    ranks = [SFTLoader(tokenized, batch_size=4, seq_len=256, pad_id=0, rank=r, world_size=2) for r in range(2)]
    epoch0 = rows(one, 5)  # 40 examples = 5 batches of 8: the whole epoch
    assert sorted(epoch0) == sorted(rows(SFTLoader(tokenized, batch_size=40, seq_len=256, pad_id=0), 1))
    # Two ranks of 4 read, together, one process's batches of 8.
    for i in range(5):
        both = rows(ranks[0], 1) + rows(ranks[1], 1)
        assert both == epoch0[8 * i: 8 * i + 8]
    epoch1 = rows(one, 5)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)  # another order, the same examples
    # A loader restored from a state continues the stream exactly.
    fresh = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0)
    rows(fresh, 3)
    state = fresh.state_dict()
    after = rows(fresh, 4)
    restored = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0)
    restored.load_state_dict(state)
    assert rows(restored, 4) == after
    with pytest.raises(ValueError, match="instruction data.*changed"):
        SFTLoader(tokenized[:-8], batch_size=8, seq_len=256, pad_id=0).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        SFTLoader(tokenized[:3], batch_size=4, seq_len=256, pad_id=0)


@pytest.fixture(scope="module")
def model():
    return build_model(ModelArgs.from_name("tiny", n_layers=2, vocab_size=512), seed=0)


@torch.no_grad()
def test_padding_and_other_rows_never_reach_an_example(tokenized, model):
    """An example's logits alone equal its logits in a padded batch beside other examples."""
    model.eval()
    loader = SFTLoader(tokenized[4:12], batch_size=8, seq_len=256, pad_id=7, train=False)
    x, _ = next(loader)
    batched = model(x)
    lengths = [len(e.ids) - 1 for e in tokenized[4:12]]
    assert len(set(lengths)) > 3 and min(lengths) < x.shape[1]  # rows of several lengths, padding in most
    for row, ex in enumerate(tokenized[4:12]):
        alone = model(torch.from_numpy(ex.ids[:-1].astype("int64"))[None])
        torch.testing.assert_close(batched[row, : lengths[row]], alone[0], rtol=1e-5, atol=1e-5)


def test_the_loss_is_the_mean_over_all_unmasked_targets_of_the_step(tokenized, model):
    """Two micro-batches of 4 give the loss and gradient of one of 8: the mean over all their
    unmasked targets, not the mean of two micro-batch means."""
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        model.output.weight.mul_(30)  # peaky logits: per-token losses far apart, so the two means differ
    twin, cpu = copy.deepcopy(model), torch.device("cpu")
    one = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0)
    two = SFTLoader(tokenized, batch_size=4, seq_len=256, pad_id=0)
    loss_one, tokens_one = accumulate_masked_gradients(model, one, 1, cpu, nullcontext())
    loss_two, tokens_two = accumulate_masked_gradients(twin, two, 2, cpu, nullcontext())
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-6, atol=0)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=n)  # gradients up to ~10

    halves = SFTLoader(tokenized, batch_size=4, seq_len=256, pad_id=0)
    sums, counts, means = [], [], []
    with torch.no_grad():
        for _ in range(2):
            x, y = next(halves)
            per_token = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(0, 1), reduction="none")
            sums.append(per_token.sum().item())
            counts.append(int((y != IGNORE_INDEX).sum()))
            means.append(sums[-1] / counts[-1])
    assert counts[0] != counts[1]
    assert loss_one.item() == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert sum(means) / 2 != pytest.approx(loss_one.item(), rel=1e-5)  # the mean of means is another number
    # Tokens: every position read, padding included (8 rows of the batch's width).
    assert tokens_one == 8 * next(SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0))[0].shape[1]
    assert tokens_two <= tokens_one  # two micro-batches pad less
