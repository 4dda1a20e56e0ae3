from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from llamaworks.cli import main
from llamaworks.demo import stdlib_files


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
