"""Packing (finetune.pack, train/sft.py): several examples in a row, each attending to itself only
(document masking, Transformer.forward's doc_ids). Each example's logits equal its logits alone,
targets never cross an example, the loss and gradients equal the unpacked loader's, and a packed
fine-tuning run trains as an unpacked one does."""

from __future__ import annotations

import copy
import json
import random
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from llamaworks.configfile import load_config, resolve_config_path
from llamaworks.data.sft import IGNORE_INDEX, Example, tokenize_examples
from llamaworks.model import ModelArgs, build_model
from llamaworks.tokenizer.chat import ChatTemplate
from llamaworks.train.finetune import FinetuneJobConfig, run_finetune
from llamaworks.train.metrics_log import read_metrics
from llamaworks.train.sft import SFTLoader, pack_rows
from llamaworks.train.trainer import accumulate_masked_gradients, evaluate

WORDS = "the king queen lord lady love night day sword crown".split()


def conversation(i: int) -> list[dict[str, str]]:
    rng = random.Random(i)
    return [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))}]


@pytest.fixture(scope="module")
def tokenized(tiny_tokenizer):
    tok = tiny_tokenizer
    template = ChatTemplate.builtin("llama2", bos_token=tok.id_to_piece(tok.bos_id),
                                    eos_token=tok.id_to_piece(tok.eos_id))
    examples = [Example(i + 1, conversation(i)) for i in range(48)]
    return tokenize_examples(examples, tok, template, 256, "x.jsonl").examples


@pytest.fixture(scope="module")
def model():
    # Weights larger than init's std 0.02: attention far from uniform, so a leak between examples
    # or a wrong position moves the logits well above the tolerance.
    model = build_model(ModelArgs.from_name("tiny", n_layers=2, vocab_size=512, n_kv_heads=2), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.08 * noise)
    return model


def segments(doc_ids_row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of equal ids along a row."""
    ids, out, start = doc_ids_row.tolist(), [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[start]:
            out.append((start, t))
            start = t
    return out


# ---------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("seed", range(30))
def test_pack_rows_places_every_example_once_in_rows_no_wider_than_unpacked_tokens(seed):
    rng = random.Random(seed)
    seq_len, multiple = rng.choice([(64, 8), (256, 8), (100, 8), (2048, 16)])
    lengths = [rng.randint(1, seq_len) if rng.random() < 0.2 else rng.randint(1, seq_len // 4)
               for _ in range(rng.randint(1, 24))]
    width, rows = pack_rows(lengths, seq_len, multiple)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(row == sorted(row) and sum(lengths[i] for i in row) <= width for row in rows)
    assert width <= seq_len and (width % multiple == 0 or width == seq_len)
    unpadded = min(seq_len, -(-max(lengths) // multiple) * multiple)
    assert len(rows) * width <= len(lengths) * unpadded  # never more tokens than one example per row


def test_pack_rows_chooses_the_fewest_tokens_then_the_narrower_rows():
    assert pack_rows([100, 200, 300, 50], 2048) == (656, [[0, 1, 2, 3]])  # all in one row
    assert pack_rows([600] * 4, 2048) == (600, [[0], [1], [2], [3]])  # 4 x 600 = 2 x 1200: the narrower
    # 1000, 1000, 100, 900, 50 in 2048: 3 rows of 1152 (3456 tokens) beat 5 x 1000 and 2 x 2000.
    assert pack_rows([1000, 1000, 100, 900, 50], 2048) == (1152, [[0, 2, 4], [1], [3]])
    assert pack_rows([5], 7) == (7, [[0]])  # the width is capped at seq_len
    with pytest.raises(AssertionError):
        pack_rows([9], 8)


# ---------------------------------------------------------------------------- the batches


def test_packed_rows_hold_each_example_whole_with_its_labels_and_nothing_across(tokenized):
    batch = tokenized[:12]
    loader = SFTLoader(batch, batch_size=12, seq_len=256, pad_id=0, train=False, pack=True)
    x, y, doc_ids = next(loader)
    assert x.shape == y.shape == doc_ids.shape and x.shape[0] < 12 and x.dtype == y.dtype == doc_ids.dtype
    plain_x, plain_y = next(SFTLoader(batch, batch_size=12, seq_len=256, pad_id=0, train=False))
    assert x.numel() < plain_x.numel()  # less padding
    found = []
    for row in range(x.shape[0]):
        for start, end in segments(doc_ids[row]):
            ids = x[row, start:end].tolist()
            match = [i for i, ex in enumerate(batch) if ex.ids[:-1].tolist() == ids]
            if not match:  # the row's padding: nothing to learn
                assert end == x.shape[1] and (x[row, start:] == 0).all() and (y[row, start:] == IGNORE_INDEX).all()
                continue
            ex = batch[match[0]]
            found.append(match[0])
            # The example's targets are its own labels shifted by one: prompts masked, and its last
            # target is its own end-of-turn token, never the next example's first token.
            assert y[row, start:end].tolist() == ex.labels[1:].tolist()
            assert y[row, start] == IGNORE_INDEX and y[row, end - 1] == ex.ids[-1] == ex.labels[-1]
    assert sorted(found) == list(range(12))
    assert int((y != IGNORE_INDEX).sum()) == int((plain_y != IGNORE_INDEX).sum())


def test_packing_keeps_the_order_the_steps_and_the_state(tokenized):
    """Each packed batch holds the examples of the unpacked loader's batch; the state is the same."""
    packed = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0, seed=3, pack=True)
    plain = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0, seed=3)
    assert len(packed) == len(plain) == 6
    for _ in range(8):  # into the second epoch: each batch the same examples
        xp, _, dp = next(packed)
        xu, _ = next(plain)
        mine = sorted(tuple(xp[r, s:e].tolist()) for r in range(xp.shape[0]) for s, e in segments(dp[r])
                      if not (e == xp.shape[1] and (xp[r, s:] == 0).all()))
        # An unpacked row is its example and padding 0 (<unk>, never in the examples' ids).
        theirs = sorted(tuple(row[:max(i for i, v in enumerate(row) if v != 0) + 1]) for row in xu.tolist())
        assert mine == theirs
    assert packed.state_dict() == plain.state_dict()
    restored = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0, seed=3, pack=True)
    restored.load_state_dict(plain.state_dict())
    for a, b in zip(next(restored), next(packed)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- the model and the loss


@torch.no_grad()
def test_each_packed_example_gives_its_logits_alone(tokenized, model):
    model.eval()
    x, _, doc_ids = next(SFTLoader(tokenized[:16], batch_size=16, seq_len=256, pad_id=7, train=False, pack=True))
    packed = model(x, doc_ids=doc_ids)
    unmasked = model(x)
    compared = leaked = 0
    for row in range(x.shape[0]):
        for start, end in segments(doc_ids[row]):
            if start > 0 and (x[row, start:] == 7).all():
                continue  # the padding
            alone = model(x[row, start:end].unsqueeze(0))[0]
            torch.testing.assert_close(packed[row, start:end], alone, atol=1e-5, rtol=0)
            compared += 1
            leaked += start > 0 and (unmasked[row, start:end] - alone).abs().max() > 1e-3
    assert compared == 16 and x.shape[0] < 16
    assert leaked > 0  # control: without doc_ids the later examples of a row see the earlier ones


def test_the_packed_loss_and_gradients_equal_the_unpacked(tokenized, model):
    """The step's loss is the mean over its unmasked targets whatever the rows: packed or not,
    two micro-batches of 8 give the same loss (within 1e-5) and the same gradients."""
    model = copy.deepcopy(model).train()
    twin, cpu = copy.deepcopy(model), torch.device("cpu")
    plain = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0, seed=1)
    packed = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0, seed=1, pack=True)
    loss_plain, tokens_plain = accumulate_masked_gradients(model, plain, 2, cpu, nullcontext())
    loss_packed, tokens_packed = accumulate_masked_gradients(twin, packed, 2, cpu, nullcontext())
    assert abs(loss_packed.item() - loss_plain.item()) < 1e-5
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert tokens_packed < tokens_plain  # the padding not computed

    # And the loss is the token-weighted mean over the examples computed one by one.
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in [tokenized[int(i)] for i in _order(tokenized, 16, seed=1)]:
            x = torch.from_numpy(ex.ids[:-1].astype("int64"))[None]
            y = torch.from_numpy(ex.labels[1:].astype("int64"))
            total += torch.nn.functional.cross_entropy(model(x)[0], y, ignore_index=IGNORE_INDEX,
                                                       reduction="sum").item()
            count += int((y != IGNORE_INDEX).sum())
    assert abs(loss_packed.item() - total / count) < 1e-5


def _order(examples, n, seed):
    # The first n examples a training loader reads (the unpacked rows, in order).
    loader = SFTLoader(examples, batch_size=n, seq_len=256, pad_id=0, seed=seed)
    lookup = {tuple(ex.ids[:-1].tolist()): i for i, ex in enumerate(examples)}
    x, y = next(loader)
    out = []
    for row, target in zip(x.tolist(), y.tolist()):
        n_tokens = max(i for i, t in enumerate(target) if t != IGNORE_INDEX) + 1
        out.append(lookup[tuple(row[:n_tokens])])
    return out


def test_validation_with_packing_measures_the_same_loss(tokenized, model):
    plain = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0, train=False)
    packed = SFTLoader(tokenized, batch_size=8, seq_len=256, pad_id=0, train=False, pack=True)
    cpu = torch.device("cpu")
    assert evaluate(model, packed, 0, cpu, nullcontext()) == pytest.approx(
        evaluate(model, plain, 0, cpu, nullcontext()), abs=1e-5)


# ---------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(160)))
    return path


def test_a_packed_finetuning_run_trains_as_an_unpacked_one(tiny_model_dir, instructions, tmp_path):
    def run(pack: bool) -> Path:
        out = tmp_path / f"pack_{pack}"
        over = {"run": {"out_dir": str(out)},
                "finetune": {"checkpoint": str(tiny_model_dir), "data": str(instructions), "pack": pack},
                "train": {"max_steps": 3, "device": "cpu", "batch_size": 16, "micro_batch_size": 8},
                "schedule": {"warmup_steps": 1}, "checkpoint": {"every": 100}, "eval": {"every": 3},
                "log": {"progress": False}, "hardware": {"peak_flops": 1e12}}
        run_finetune(load_config(FinetuneJobConfig, resolve_config_path("finetune_tiny"), over))
        assert load_config(FinetuneJobConfig, out / "config.toml").finetune.pack is pack
        return out

    packed, plain = run(True), run(False)
    rows = {out: [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r or "val_loss" in r]
            for out in (packed, plain)}
    for key in ("loss", "val_loss"):
        a = [(r["step"], r[key]) for r in rows[packed] if key in r]
        b = [(r["step"], r[key]) for r in rows[plain] if key in r]
        assert [s for s, _ in a] == [s for s, _ in b] and a
        for (_, u), (_, v) in zip(a, b):
            assert u == pytest.approx(v, abs=2e-5)
