"""`llamaworks finetune` end to end on the tiny model: full fine-tuning lowers the held-out loss,
the run folder holds what pretraining's does (and a model directory with its chat template),
resume is exact (also after a SIGKILL while saving), the config and chat template are chosen as
documented, and LoRA/QLoRA train the adapters only, over a base left bit for bit as it was."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from llamaworks.cli import main
from llamaworks.configfile import dumps, load_config, resolve_config_path
from llamaworks.data.sft import read_examples, split_examples, tokenize_examples
from llamaworks.inference.load import load_model as load_any_model
from llamaworks.inference.lora import LoraConfig, apply_lora, load_lora_state_dict
from llamaworks.inference.quant import QuantizedLinear, quantize_model
from llamaworks.model import ModelArgs, build_model
from llamaworks.modeldir import load_model, save_model
from llamaworks.tokenizer.chat import LLAMA2_TEMPLATE, ChatTemplate
from llamaworks.train.checkpoint import STATE, TRAINABLE, latest_checkpoint, list_checkpoints
from llamaworks.train.finetune import (
    FinetuneConfig,
    FinetuneJobConfig,
    FinetuneTrainConfig,
    base_fingerprint,
    chat_template_for,
    run_finetune,
)
from llamaworks.train.metrics_log import read_metrics
from llamaworks.train.sft import SFTLoader
from llamaworks.train.trainer import evaluate
from llamaworks.weights import read_safetensors

WORDS = "king queen lord lady love night day sword crown heart blood fair".split()


def instruction_records(n: int = 300, seed: int = 0) -> list[dict]:
    """Two tasks a tiny model learns in a few dozen steps: reverse the words, name the first."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        if i % 2:
            out.append({"instruction": "Reverse the words.", "input": " ".join(words),
                        "output": " ".join(reversed(words))})
        else:
            out.append({"instruction": "Which word comes first?", "input": " ".join(words), "output": words[0]})
    return out


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in instruction_records()))
    return path


def config_factory(model_dir: Path, data: Path):
    """make(out_dir, **sections): the shipped finetune_tiny.toml on `model_dir` and `data`, with
    pretraining tests' sizes: 8 steps of 16 examples, a checkpoint every 3 steps, validation every 4."""

    def make(out_dir: Path, **sections: dict) -> FinetuneJobConfig:
        over = {
            "run": {"out_dir": str(out_dir)},
            "finetune": {"checkpoint": str(model_dir), "data": str(data)},
            "train": {"max_steps": 8, "device": "cpu"},
            "schedule": {"warmup_steps": 2},
            "checkpoint": {"every": 3},
            "eval": {"every": 4},
            "log": {"progress": False},
            "hardware": {"peak_flops": 1e12},  # skip the start-up matmul benchmark
        }
        for name, values in sections.items():
            over[name] = {**over.get(name, {}), **values}
        return load_config(FinetuneJobConfig, resolve_config_path("finetune_tiny"), over)

    return make


@pytest.fixture(scope="module")
def make_ft_config(tiny_model_dir, instructions):
    return config_factory(tiny_model_dir, instructions)


def column(out: Path, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(out / "metrics.jsonl") if key in r]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in read_safetensors(model_dir / "model.safetensors").items()}


@pytest.fixture(scope="module")
def reference(make_ft_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    cfg = make_ft_config(out)
    return cfg, out, run_finetune(cfg)


# ---------------------------------------------------------------------------- training


def held_out_loss(model_dir: Path, data: Path) -> float:
    """The loss per assistant token of the model directory on the held-out examples."""
    return model_held_out_loss(*load_model(model_dir), data)


def model_held_out_loss(model, tok, data: Path) -> float:
    template = ChatTemplate.builtin("llama2", bos_token="<s>", eos_token="</s>")
    _, examples = read_examples(data)
    held = tokenize_examples(split_examples(examples, 0.05)[1], tok, template, 256, data).examples
    loader = SFTLoader(held, batch_size=8, seq_len=256, pad_id=0, train=False)
    return evaluate(model, loader, 0, torch.device("cpu"), nullcontext())


def test_full_finetuning_lowers_the_held_out_loss(make_ft_config, tiny_model_dir, instructions, tmp_path):
    """Two epochs of finetune_tiny as shipped (the steps from the epochs) from the tiny model."""
    out = tmp_path / "run"
    cfg = make_ft_config(out, train={"max_steps": None}, schedule={"warmup_steps": None},
                         checkpoint={"every": 100}, eval={"every": 10})
    summary = run_finetune(cfg)
    n_train = len(split_examples(read_examples(instructions)[1], 0.05)[0])
    assert summary["steps"] == 2 * (n_train // 16)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert rows[1]["lr"] == cfg.optim.lr  # warm-up: ceil(3% of the steps) = 2 steps
    before, after = held_out_loss(tiny_model_dir, instructions), held_out_loss(out / "model", instructions)
    assert after == pytest.approx(summary["final_val_loss"], rel=1e-5)  # the run measured that very loss
    assert after < 0.6 * before, (before, after)
    vals = [v for _, v in column(out, "val_loss")]
    assert len(vals) >= 3 and vals[-1] < vals[0]


def test_the_run_folder_holds_config_metrics_curve_and_a_chat_model_directory(reference, tiny_model_dir):
    cfg, out, summary = reference
    assert load_config(FinetuneJobConfig, out / "config.toml") == cfg
    assert [s for s, _ in column(out)] == list(range(1, 9))
    assert [s for s, _ in column(out, "val_loss")] == [4, 8]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["steps"] == 8 and summary["final_val_loss"] == column(out, "val_loss")[-1][1]
    # The final model is a model directory that carries the template it was trained with.
    model, tok = load_model(out / "model")
    assert (out / "model" / "chat_template.jinja").read_text() == LLAMA2_TEMPLATE
    assert tok.chat_template.eos_token == "</s>"
    base, _ = load_model(tiny_model_dir)
    assert model.args == base.args
    assert not torch.equal(model.layers[0].attention.wq.weight, base.layers[0].attention.wq.weight)
    state = torch.load(latest_checkpoint(out) / STATE, weights_only=False)
    assert state["loader"]["position"] == 8 * 16  # 8 steps of 16 examples


def test_the_first_step_starts_from_the_checkpoint(make_ft_config, tiny_model_dir, tmp_path):
    """With a zero learning rate nothing moves: the weights are the checkpoint's, bit for bit."""
    out = tmp_path / "run"
    run_finetune(make_ft_config(out, train={"max_steps": 1}, optim={"lr": 0.0, "weight_decay": 0.0},
                                eval={"every": 0}))
    final, base = weights(out / "model"), weights(tiny_model_dir)
    assert final.keys() == base.keys() and all(torch.equal(final[k], base[k]) for k in base)


# ---------------------------------------------------------------------------- resume


def test_resume_continues_bitwise_identically(reference, make_ft_config, tmp_path):
    _, ref_out, _ = reference
    out = tmp_path / "run"
    run_finetune(make_ft_config(out, train={"max_steps": 4}, schedule={"decay_steps": 8}))
    assert latest_checkpoint(out).name == "step_00000004"
    argv = ["finetune", "--config", str(out / "config.toml"), "--resume", "--train.max_steps", "8"]
    assert main(argv) == 0
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert column(out, key) == column(ref_out, key), key
    assert dict(column(out, "val_loss"))[8] == dict(column(ref_out, "val_loss"))[8]
    final, ref_final = weights(out / "model"), weights(ref_out / "model")
    assert all(torch.equal(final[k], ref_final[k]) for k in ref_final)


KILL_ON_SECOND_SAVE = """
import os, signal, sys
import torch

torch.set_num_threads(1)
real_save, calls = torch.save, []


def save(*args, **kwargs):
    calls.append(args[1])
    if len(calls) == 2:  # the second checkpoint: weights written into its temporary folder, state not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(*args, **kwargs)


torch.save = save
from llamaworks.cli import main

sys.exit(main(["finetune", "--config", sys.argv[1]]))
"""


def test_a_run_killed_while_saving_resumes_exactly(reference, make_ft_config, tmp_path):
    _, ref_out, _ = reference
    out = tmp_path / "run"
    config = tmp_path / "job.toml"
    config.write_text(dumps(make_ft_config(out)))
    proc = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_SAVE, str(config)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003"]
    assert main(["finetune", "--config", str(out / "config.toml"), "--resume"]) == 0
    assert column(out) == column(ref_out)  # steps 4-6 logged once, by the resumed run, identically
    assert column(out, "val_loss") == column(ref_out, "val_loss")


def test_resume_refuses_other_data(reference, make_ft_config, tmp_path):
    _, ref_out, _ = reference
    out = tmp_path / "run"
    run_finetune(make_ft_config(out, train={"max_steps": 3}, eval={"every": 0}))
    with pytest.raises(ValueError, match="instruction data.*changed"):
        run_finetune(make_ft_config(out, finetune={"val_fraction": 0.2}, eval={"every": 0}), resume=True)


# ---------------------------------------------------------------------------- config and command line


def test_the_default_config_file_lists_the_defaults():
    assert load_config(FinetuneJobConfig, resolve_config_path("finetune_default")) == FinetuneJobConfig()
    cfg = FinetuneJobConfig()
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (
        2e-5, 0.9, 0.95, 0.1, 1.0)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.schedule.warmup_ratio) == (2, 64, 0.03)


@pytest.mark.parametrize("method, keep, expected", [
    ("full", None, True), ("lora", None, True), ("qlora", None, False),  # QLoRA is chosen for memory
    ("qlora", True, True), ("lora", False, False),  # a value given is kept
])
def test_freed_memory_is_kept_for_speed_but_returned_for_qlora(method, keep, expected):
    cfg = FinetuneJobConfig(finetune=FinetuneConfig(method=method), train=FinetuneTrainConfig(keep_freed_memory=keep))
    assert cfg.train.keep_freed_memory is expected
    resolved = load_config(FinetuneJobConfig, resolve_config_path("finetune_default"), {"finetune": {"method": method}})
    assert resolved.train.keep_freed_memory is (method != "qlora")


def test_flags_set_their_keys_beside_section_overrides(tiny_model_dir, instructions, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--config", "finetune_tiny", "--checkpoint", str(tiny_model_dir), "--data", str(instructions),
            "--out", str(out), "--checkpoint.every", "2", "--train.max_steps", "2", "--train.device", "cpu",
            "--eval.every", "0", "--log.progress", "false", "--hardware.peak_flops", "1e12"]
    assert main(argv) == 0
    cfg = load_config(FinetuneJobConfig, out / "config.toml")
    assert (cfg.finetune.checkpoint, cfg.finetune.data, cfg.run.out_dir) == (str(tiny_model_dir),
                                                                            str(instructions), str(out))
    assert cfg.checkpoint.every == 2 and cfg.finetune.method == "full"
    assert "done: 2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["--train.bogus", "1"], ["train.bogus", "valid keys:", "batch_size", "epochs"]),
    (["--data", "x.jsonl"], ["finetune.checkpoint is not set", "--checkpoint"]),
    (["--checkpoint", "m"], ["finetune.data is not set", "--data"]),
    (["--finetune.method", "lora", "--finetune.lora_r", "0"], ["lora_", "positive integer"]),
    (["--train.batch_size", "12", "--train.micro_batch_size", "8"], ["train.batch_size=12", "multiple of 8"]),
])
def test_command_line_errors_say_what_to_do(argv, expected, tiny_model_dir, instructions, capsys):
    full = {"--checkpoint": str(tiny_model_dir), "--data": str(instructions)}
    if argv[0].startswith("--train.batch"):
        argv = [*argv, *[x for kv in full.items() for x in kv]]
    assert main(["finetune", "--config", "finetune_tiny", *argv]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_a_missing_key_in_the_data_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    assert main(["finetune", "--checkpoint", str(tiny_model_dir), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--train.device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: missing key 'completion'" in err and "Traceback" not in err


def test_the_chat_template_is_the_checkpoints_else_llama2(tiny_tokenizer, tmp_path, corpus_docs):
    from tiny_llama3 import make_model_dir, write_tokenizer

    assert chat_template_for("", tiny_tokenizer).source == LLAMA2_TEMPLATE  # a base model: llama2
    assert chat_template_for("plain", tiny_tokenizer).key == "plain"
    with pytest.raises(ValueError, match="does not have as a token"):
        chat_template_for("llama3", tiny_tokenizer)  # Llama 3's header tokens are not in this tokenizer
    instruct = make_model_dir(tmp_path / "l3", write_tokenizer(tmp_path / "tok", corpus_docs), template="llama3")
    _, tok = load_model(instruct)
    assert "<|start_header_id|>" in chat_template_for("", tok).source  # the checkpoint's own
    assert chat_template_for("llama2", tok).source == LLAMA2_TEMPLATE  # unless one is asked for


# ---------------------------------------------------------------------------- LoRA and QLoRA


def lora_run(make_ft_config, out: Path, method: str = "lora", **sections):
    cfg = make_ft_config(out, finetune={"method": method, "lora_r": 8, "lora_alpha": 16.0},
                         optim={"lr": 1e-2}, **sections)
    return cfg, run_finetune(cfg)


def trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in read_safetensors(ckpt / TRAINABLE).items()}


def test_lora_trains_only_the_adapters_and_leaves_an_adapter_directory(make_ft_config, tiny_model_dir,
                                                                       instructions, tmp_path):
    out = tmp_path / "run"
    cfg, summary = lora_run(make_ft_config, out)
    assert cfg.optim.beta2 == 0.95 and summary["model_dir"] == str(out / "adapter")
    assert not (out / "model").exists()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (8, 16.0, str(tiny_model_dir))
    assert (out / "adapter" / "chat_template.jinja").read_text() == LLAMA2_TEMPLATE
    state = trainable(latest_checkpoint(out))
    assert all(state[k].abs().max() > 0 for k in state if k.endswith("lora_B"))  # the adapters moved from 0
    # The adapter directory holds what was trained: loaded onto the base, the same logits as the
    # checkpoint's adapters.
    trained, _ = load_model(tiny_model_dir)  # plain layers (inference loading may fuse projections)
    apply_lora(trained, LoraConfig(r=8, alpha=16.0))
    load_lora_state_dict(trained, state)
    adapted, tok = load_any_model(tiny_model_dir, adapter=out / "adapter")
    tokens = torch.tensor([[1, 5, 9, 30, 200, 17]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(tokens), trained.eval()(tokens), rtol=1e-5, atol=1e-5)
    # The base stayed as it was: the run's own final validation loss (of its model in memory) is
    # that of the starting checkpoint's weights with the saved adapters.
    loss = held_out_loss(tiny_model_dir, instructions)
    assert model_held_out_loss(adapted, tok, instructions) == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert summary["final_val_loss"] < loss


def test_lora_checkpoints_hold_the_adapters_not_the_frozen_base(make_ft_config, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    lora_run(make_ft_config, out, train={"max_steps": 3}, eval={"every": 0})
    ckpt = latest_checkpoint(out)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["params.json", "tokenizer.model", "chat_template.jinja", TRAINABLE, STATE])
    state = trainable(ckpt)
    names = {f"layers.{i}.{m}.{ab}" for i in range(2) for m in ("attention.wq", "attention.wk", "attention.wv",
                                                                "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                                "feed_forward.w3") for ab in ("lora_A", "lora_B")}
    assert set(state) == names  # adapters only: no base_layer, embedding, norm or output weight
    adapter_bytes = sum(t.numel() * t.element_size() for t in state.values())
    base_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert adapter_bytes < 0.1 * base_bytes
    # The folder: the adapters, AdamW's two moments of each (nothing for the frozen weights), the
    # loader and RNG state, the tokenizer; a fraction of the base it was trained over.
    train_state = torch.load(ckpt / STATE, weights_only=False)
    moments = [v for s in train_state["optimizer"]["state"].values() for v in s.values() if v.dim() > 0]
    assert sum(t.numel() for t in moments) == 2 * sum(t.numel() for t in state.values())
    assert train_state["base"]["path"] == str(tiny_model_dir.resolve())
    folder_bytes = sum(p.stat().st_size for p in ckpt.iterdir())
    assert folder_bytes < 0.5 * base_bytes, (folder_bytes, base_bytes)


def test_lora_resume_refuses_another_base_and_accepts_the_same_one_moved(make_ft_config, tiny_model_dir,
                                                                          tiny_tokenizer, tmp_path):
    out = tmp_path / "run"
    lora_run(make_ft_config, out, train={"max_steps": 2}, eval={"every": 0})
    other = save_model(build_model(ModelArgs.from_name("tiny", vocab_size=512, n_layers=2), seed=1), tiny_tokenizer,
                       tmp_path / "other")
    cfg = load_config(FinetuneJobConfig, out / "config.toml", {"finetune": {"checkpoint": str(other)},
                                                              "train": {"max_steps": 3}})
    with pytest.raises(ValueError, match="trained over the base model .*tiny.* differs in its weights"):
        run_finetune(cfg, resume=True)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_model_dir, moved)
    cfg = load_config(FinetuneJobConfig, out / "config.toml", {"finetune": {"checkpoint": str(moved)},
                                                              "train": {"max_steps": 3}})
    assert run_finetune(cfg, resume=True)["steps"] == 3


def test_bf16_lora_resumes_bitwise_over_its_bf16_frozen_base(make_ft_config, tmp_path):
    """Under bf16 autocast in one process the frozen projections are stored in bf16 (what autocast
    computes with); the run trains, checkpoints the fp32 adapters and resumes exactly."""
    sections = {"train": {"max_steps": 4, "dtype": "bfloat16"}, "schedule": {"decay_steps": 4},
                "eval": {"every": 0}, "checkpoint": {"every": 2}}
    ref = tmp_path / "reference"
    lora_run(make_ft_config, ref, **sections)
    out = tmp_path / "run"
    lora_run(make_ft_config, out, **{**sections, "train": {**sections["train"], "max_steps": 2}})
    assert main(["finetune", "--config", str(out / "config.toml"), "--resume", "--train.max_steps", "4"]) == 0
    losses = column(ref)
    assert column(out) == losses and all(math.isfinite(v) for _, v in losses)
    state = trainable(latest_checkpoint(out))
    assert {t.dtype for t in state.values()} == {torch.float32}


def test_the_base_fingerprint_tells_bases_apart():
    model = build_model(ModelArgs.from_name("tiny", n_layers=1), seed=0)
    state = model.state_dict()
    a = base_fingerprint("m", model.args, state)
    assert a == base_fingerprint("m", model.args, {k: v.clone() for k, v in state.items()})
    assert a["digest"] != base_fingerprint("m", model.args, build_model(model.args, seed=1).state_dict())["digest"]
    state["norm.weight"] = state["norm.weight"] * 1.01  # a fine-tune of this base
    assert a["digest"] != base_fingerprint("m", model.args, state)["digest"]
    other_args = ModelArgs.from_name("tiny", n_layers=1, rope_theta=1e6)
    assert a["params"] != base_fingerprint("m", other_args, state)["params"]


def test_lora_resume_continues_bitwise_identically(make_ft_config, tmp_path):
    ref = tmp_path / "reference"
    lora_run(make_ft_config, ref)
    out = tmp_path / "run"
    lora_run(make_ft_config, out, train={"max_steps": 4}, schedule={"decay_steps": 8})
    assert main(["finetune", "--config", str(out / "config.toml"), "--resume", "--train.max_steps", "8"]) == 0
    assert column(out) == column(ref) and column(out, "val_loss") == column(ref, "val_loss")
    a, b = read_safetensors(out / "adapter" / "adapter_model.safetensors"), read_safetensors(
        ref / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_trains_adapters_over_a_quantised_frozen_base(make_ft_config, tiny_model_dir, instructions, tmp_path):
    out = tmp_path / "run"
    _, summary = lora_run(make_ft_config, out, method="qlora")
    state = trainable(latest_checkpoint(out))
    assert state and all(".lora_" in k for k in state)  # the checkpoint holds no quantised base
    # The run's model in memory was the int4 base of the checkpoint (the blocks' projections; the
    # output layer float) with these adapters: its final validation loss is theirs.
    base, tok = load_model(tiny_model_dir)
    for block in base.layers:
        quantize_model(block, "int4")
        for m in block.modules():  # as training computes them: the dequantised weight, no decode
            if isinstance(m, QuantizedLinear):  # kernels (those round a prompt's activations)
                m.decode_layouts = False
                m.refresh()
    apply_lora(base, LoraConfig(r=8, alpha=16.0))
    load_lora_state_dict(base, state)
    assert base.layers[0].attention.wq.base_layer.weight.dtype == torch.uint8
    assert base.output.weight.dtype == torch.float32
    assert model_held_out_loss(base.eval(), tok, instructions) == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["final_val_loss"] < held_out_loss(tiny_model_dir, instructions)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_qlora_model_is_quantised_as_it_is_filled(mode):
    """finetune's QLoRA model: empty quantised layers with adapters on the meta device (so FSDP/DDP
    split it like LoRA's), filled by quantising the checkpoint's weights one projection at a time:
    the blocks quantize_model makes from the float model, without the decode kernels' copies."""
    from llamaworks.inference.lora import lora_layers
    from llamaworks.inference.quant import QuantizedLinear
    from llamaworks.train.finetune import lora_prepare, pretrained_init

    args = ModelArgs.from_name("tiny", n_layers=2)
    state = build_model(args, seed=0).state_dict()
    want = build_model(args, seed=0)
    for block in want.layers:
        quantize_model(block, mode)
    config = LoraConfig(r=4, alpha=8, target_modules=["wq", "wv", "w2"])
    model = build_model(args, device="meta")  # as the Trainer builds it
    lora_prepare(config, mode)(model)
    model.to_empty(device="cpu")
    pretrained_init(dict(state), lora=True, qlora_mode=mode)(model, 0, torch.device("cpu"))
    assert [n for n, _ in lora_layers(model)] == [f"layers.{i}.{p}" for i in range(2)
                                                  for p in ("attention.wq", "attention.wv", "feed_forward.w2")]
    got = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert got.keys() == want.state_dict().keys()
    for k, v in want.state_dict().items():
        assert torch.equal(got[k], v), k
    quantised = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantised) == 14 and model.output.weight.dtype == torch.float32
    if mode == "int4":
        assert all(not m.kernel_tensors() for m in quantised)  # no decode layouts beside the weights
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{n}.{ab}" for n, _ in lora_layers(model) for ab in ("lora_A", "lora_B")]


def test_qlora_resume_continues_bitwise_identically(make_ft_config, tmp_path):
    """The checkpoint holds the adapters; the resumed run quantises the base again, to the same blocks."""
    sections = {"train": {"max_steps": 4}, "schedule": {"decay_steps": 4}, "eval": {"every": 0},
                "checkpoint": {"every": 2}}
    ref = tmp_path / "reference"
    lora_run(make_ft_config, ref, method="qlora", **sections)
    out = tmp_path / "run"
    lora_run(make_ft_config, out, method="qlora", **{**sections, "train": {"max_steps": 2}})
    assert main(["finetune", "--config", str(out / "config.toml"), "--resume", "--train.max_steps", "4"]) == 0
    assert column(out) == column(ref)
    a, b = read_safetensors(out / "adapter" / "adapter_model.safetensors"), read_safetensors(
        ref / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tensor_parallel_lora_and_qlora_are_refused_under_torchrun(make_ft_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for method in ("lora", "qlora"):
        with pytest.raises(ValueError, match=f"--method {method} does not run with parallel.tp=2"):
            run_finetune(make_ft_config(tmp_path / method, finetune={"method": method}, parallel={"tp": 2}))
