from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

from llamaworks import demo
from llamaworks.cli import main
from llamaworks.demo import stdlib_files
from llamaworks.inference.load import load_model
from llamaworks.inference.lora import lora_layers


def test_stdlib_corpus_is_real_python_without_tests():
    files = stdlib_files()
    assert len(files) > 100
    names = {f.name for f in files}
    assert "os.py" in names and "functools.py" in names
    root = Path(sysconfig.get_paths()["stdlib"])
    assert not any(set(f.relative_to(root).parts) & {"test", "tests", "idle_test", "site-packages"} for f in files)
    assert files == stdlib_files()  # a fixed order: the corpus is reproducible


def test_demo_runs_end_to_end_on_a_folder(tmp_path, corpus_docs, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(corpus_docs[:3]):
        (corpus / f"doc{i}.txt").write_text(doc[:60_000])
    out = tmp_path / "run"
    rc = main(["demo", "--corpus", str(corpus), "--out", str(out), "--steps", "3", "--preset", "tiny",
               "--vocab-size", "512"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "samples (temperature 0.8, top-p 0.95)" in printed and "done: 3 steps" in printed
    for name in ("metrics.jsonl", "config.toml", "loss_curve.png", "summary.json", "tokenizer.model"):
        assert (out / name).is_file(), name
    assert (out / "model" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # --steps logs every step
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    # the final model directory is what `llamaworks generate` loads
    assert main(["generate", "--checkpoint", str(out / "model"), "--prompt", "The", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    # --resume continues the same run folder: nothing left to do at 3 steps, no error
    assert main(["demo", "--corpus", str(corpus), "--out", str(out), "--steps", "3", "--preset", "tiny",
                 "--vocab-size", "512", "--resume"]) == 0


def test_demo_instruct_tunes_the_demo_model_and_shows_held_out_answers(tmp_path, corpus_docs, capsys, monkeypatch):
    # test sizes: the demo's batch and held-out sample, smaller
    monkeypatch.setattr(demo, "INSTRUCT_BATCH", 8)
    monkeypatch.setattr(demo, "INSTRUCT_MICRO_BATCH", 8)
    monkeypatch.setattr(demo, "INSTRUCT_VAL_EXAMPLES", 48)
    monkeypatch.setattr(demo, "INSTRUCT_MAX_NEW_TOKENS", 8)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(corpus_docs[:3]):
        (corpus / f"doc{i}.txt").write_text(doc[:60_000])
    out = tmp_path / "run"
    rc = main(["demo", "--corpus", str(corpus), "--out", str(out), "--steps", "3", "--preset", "tiny",
               "--vocab-size", "512", "--instruct", "--instruct-steps", "6", "--instruct-examples", "48"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "done: 3 steps" in captured.out and "done: 6 steps" in captured.out  # pretraining, then tuning
    assert "[instruct 3/4] LoRA tuning" in captured.err
    run = out / "instruct"
    train_rows = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    val_rows = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()]
    assert len(train_rows) == 48 and len(val_rows) == 48
    assert not {r["module"].split(".")[0] for r in train_rows} & {r["module"].split(".")[0] for r in val_rows}
    # finetune's run folder: its metrics and the adapter (PEFT layout), beside the merged model
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.toml", "train.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "chat_template.jinja").is_file()
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    report = json.loads((run / "before_after.json").read_text())
    assert report["val_loss_after"] < report["val_loss_before"], report
    assert report["steps"] == 6 and report["held_out_examples"] > 0
    assert len(report["shown"]) == 6 and all(s["prompt"] in captured.out for s in report["shown"])
    assert {s["prompt"] for s in report["shown"]} <= {r["prompt"] for r in val_rows}  # held-out prompts only
    assert "validation loss" in captured.out and "before:" in captured.out and "after:" in captured.out
    # the merged model is a plain model directory, carrying the chat template it was tuned with
    merged, tokenizer = load_model(run / "model")
    assert not lora_layers(merged) and tokenizer.chat_template is not None

    # With a trained demo model in --out, --instruct tunes it without pretraining again.
    shutil.rmtree(run)
    pretrained = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--instruct", "--instruct-steps", "1", "--instruct-examples", "8"]) == 0
    captured = capsys.readouterr()
    assert "pretraining skipped" in captured.err and "[1/4]" not in captured.err
    assert (out / "metrics.jsonl").read_text() == pretrained
    assert json.loads((run / "before_after.json").read_text())["steps"] == 1
    # a second tuning in the same folder is refused at once, naming --resume
    assert main(["demo", "--out", str(out), "--instruct", "--instruct-steps", "1"]) == 2
    assert "holds an earlier --instruct run; pass --resume" in capsys.readouterr().err
