"""`pretrain --init-from DIR` (train/init_from.py): the run starts from a checkpoint's weights and
arguments, in any format `convert` reads, with a fresh optimizer at step 0 on the paper's
schedule; a [model] section that disagrees with the checkpoint and token shards of another
vocabulary are errors that name the key or the sizes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llamaworks.cli import main
from llamaworks.convert.formats import save_checkpoint
from llamaworks.model import ModelArgs
from llamaworks.modeldir import load_model, save_model
from llamaworks.tokenizer import load_tokenizer
from llamaworks.train.loader import TokenLoader
from llamaworks.train.metrics_log import read_metrics
from llamaworks.train.schedule import lr_at
from llamaworks.train.trainer import train

STEPS = 8


def rows(out, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(out / "metrics.jsonl") if key in r]


def first_batch_loss(model_dir, token_shards, cfg) -> float:
    """The model's mean loss on the run's first global batch (one micro-batch here: accum 1)."""
    model, _ = load_model(model_dir, dtype=torch.float32)
    t = cfg.train
    x, y = next(iter(TokenLoader(token_shards, "train", batch_size=t.micro_batch_size, seq_len=t.seq_len,
                                 seed=t.seed)))
    with torch.no_grad():
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


@pytest.fixture(scope="module")
def pretrained(make_config, tmp_path_factory):
    """A preset run of 8 steps: its final model directory is what --init-from continues."""
    out = tmp_path_factory.mktemp("first")
    summary = train(make_config(out, optim={"lr": 3e-3}))
    return out / "model", summary


def test_step_zero_loss_is_the_checkpoints_and_training_continues(pretrained, make_config, token_shards, tmp_path):
    model_dir, first = pretrained
    cfg = make_config(tmp_path / "run", model={"init_from": str(model_dir)}, optim={"lr": 3e-3})
    summary = train(cfg)
    losses = rows(tmp_path / "run", "loss")
    # Step 1's logged loss is the batch's loss before any update: the checkpoint's own, not a new model's.
    assert losses[0][0] == 1
    assert losses[0][1] == pytest.approx(first_batch_loss(model_dir, token_shards, cfg), abs=1e-5)
    assert losses[0][1] < rows(model_dir.parent, "loss")[0][1] - 0.5  # well below a random model's first loss
    # A fresh optimizer at step 0: the schedule starts over from its warm-up.
    lrs = rows(tmp_path / "run", "lr")
    assert [lr for _, lr in lrs] == pytest.approx([lr_at(s, 3e-3, 2, STEPS, 0.1) for s in range(STEPS)])
    assert summary["steps"] == STEPS and summary["tokens"] == STEPS * 128
    # Continued pretraining lowers the validation loss (the same held-out batches) below the
    # checkpoint's own, where the first run left it.
    assert summary["final_val_loss"] < first["final_val_loss"]
    cfg_toml = (tmp_path / "run" / "config.toml").read_text()
    assert f'init_from = "{model_dir}"' in cfg_toml  # `--config OUT/config.toml --resume` starts from it again


def test_any_checkpoint_format(pretrained, make_config, token_shards, tmp_path):
    model_dir, _ = pretrained
    model, tok = load_model(model_dir)
    hf = save_checkpoint("hf", model, tok, tmp_path / "hf")
    cfg = make_config(tmp_path / "run", model={"init_from": str(hf)}, train={"max_steps": 1})
    train(cfg)
    assert rows(tmp_path / "run", "loss")[0][1] == pytest.approx(first_batch_loss(model_dir, token_shards, cfg),
                                                                 abs=1e-5)


def test_the_checkpoints_tokenizer_travels_with_the_run(make_config, tiny_model, tiny_tokenizer, tmp_path):
    tok = load_tokenizer(tiny_tokenizer.path)
    tok.chat_template = None
    src = save_model(tiny_model, tok, tmp_path / "src")
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    train(make_config(tmp_path / "run", model={"init_from": str(src)}, train={"max_steps": 1}))
    assert (tmp_path / "run" / "model" / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()


def test_command_line_flag(pretrained, token_shards, tmp_path, capsys):
    model_dir, _ = pretrained
    out = tmp_path / "cli"
    rc = main(["pretrain", "--config", "tiny_cpu", "--init-from", str(model_dir), "--data.dir", str(token_shards),
               "--run.out_dir", str(out), "--model.n_layers", "2", "--train.max_steps", "1",
               "--train.batch_tokens", "128", "--train.micro_batch_size", "4", "--train.seq_len", "32",
               "--train.device", "cpu", "--log.progress", "false", "--hardware.peak_flops", "1e12"])
    assert rc == 0 and "done: 1 steps" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_a_disagreeing_model_section_names_the_key(pretrained, make_config, tmp_path):
    model_dir, _ = pretrained
    cfg = make_config(tmp_path / "run", model={"init_from": str(model_dir), "n_layers": 3})
    with pytest.raises(ValueError, match=rf"model.n_layers=3 but {model_dir} has n_layers=2; with model.init_from "
                                         r"\(--init-from\) the model's arguments are the checkpoint's"):
        train(cfg)
    # A field that agrees is fine (make_config sets n_layers=2, as the checkpoint has).
    args = make_config(tmp_path / "ok", model={"init_from": str(model_dir)}).model.checkpoint_args(
        ModelArgs.from_name("tiny", n_layers=2, vocab_size=512), "x")
    assert args.n_layers == 2


def test_shards_of_another_vocabulary_are_refused(make_config, corpus_docs, tmp_path):
    pytest.importorskip("tokenizers")
    from tiny_llama3 import make_model_dir, write_tokenizer  # a byte-level vocabulary of 956 tokens

    other = make_model_dir(tmp_path / "llama3", write_tokenizer(tmp_path / "tok", corpus_docs), n_layers=2)
    cfg = make_config(tmp_path / "run", model={"init_from": str(other)})
    with pytest.raises(ValueError, match=rf"--init-from {other} has vocab_size=956 but the token shards in .* have 512 "
                                         r"tokens: .* run `llamaworks prepare` with that tokenizer"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_of_a_continued_run_is_exact(pretrained, make_config, tmp_path):
    model_dir, _ = pretrained
    fixed = {"model": {"init_from": str(model_dir)}, "schedule": {"warmup_steps": 2, "decay_steps": STEPS}}
    train(make_config(tmp_path / "whole", **fixed))
    train(make_config(tmp_path / "parts", **fixed, train={"max_steps": 3}))  # stops at its step-3 checkpoint
    # The resumed run starts from the checkpoint again (model.init_from), then restores step 3 over it.
    train(make_config(tmp_path / "parts", **fixed), resume=True)
    whole, parts = load_model(tmp_path / "whole" / "model")[0], load_model(tmp_path / "parts" / "model")[0]
    for (name, a), (_, b) in zip(whole.state_dict().items(), parts.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
