"""The pretraining config: the [model] section is ModelArgs (a preset plus any of its fields),
and the global batch of train.batch_tokens is checked against the data-parallel degree."""

from __future__ import annotations

import dataclasses

import pytest

from llamaworks.configfile import dumps, load_config
from llamaworks.model import PRESETS, ModelArgs
from llamaworks.train.config import JobConfig, ModelConfig

# A value for every ModelArgs field that differs from the tiny preset's and keeps it valid.
CHANGED = {"dim": 256, "n_layers": 3, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 1000, "multiple_of": 64,
           "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "max_seq_len": 512, "rope_theta": 500000.0,
           "use_scaled_rope": True, "rope_scaling_factor": 32.0, "rope_low_freq_factor": 2.0,
           "rope_high_freq_factor": 8.0, "rope_old_context_len": 128, "tie_word_embeddings": True}
# Llama 3.1's band fields only mean something with use_scaled_rope, which fills in the others
# (Meta's fixed 8 / 1 / 4 / 8192) when it is set alone.
NEEDS = {k: {"use_scaled_rope": True} for k in ("rope_low_freq_factor", "rope_high_freq_factor",
                                                 "rope_old_context_len")}
FILLS = {"use_scaled_rope": {"rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                             "rope_old_context_len"}}


def test_the_model_section_is_a_preset_or_a_checkpoint_plus_every_model_args_field():
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    assert names == ["preset", "init_from", *(f.name for f in dataclasses.fields(ModelArgs))]
    assert set(CHANGED) == set(names[2:])  # the test below covers every field
    section = ModelConfig()
    assert section.preset == "7B" and section.init_from == "" and all(getattr(section, n) is None for n in names[2:])
    assert section.build_args() == ModelArgs.from_name("7B")


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_model_field_is_a_config_key_that_overrides_the_preset(name, tmp_path):
    value, needs = CHANGED[name], NEEDS.get(name, {})
    toml = {True: "true", False: "false"}
    path = tmp_path / "job.toml"
    path.write_text('[model]\npreset = "tiny"\n' + "".join(f"{k} = {toml.get(v, repr(v))}\n"
                                                         for k, v in {name: value, **needs}.items()))
    cfg = load_config(JobConfig, path)
    assert getattr(cfg.model, name) == value
    args = cfg.model.build_args()
    assert getattr(args, name) == value
    # every other field keeps the preset's value (n_kv_heads, unset, follows n_heads: LLaMA 1's MHA)
    changed = ({name, "n_kv_heads"} if name == "n_heads" else {name}) | set(needs) | FILLS.get(name, set())
    changed |= set().union(*(FILLS.get(k, set()) for k in needs))
    untouched = {k: v for k, v in dataclasses.asdict(ModelArgs.from_name("tiny")).items() if k not in changed}
    assert {k: v for k, v in dataclasses.asdict(args).items() if k not in changed} == untouched
    # the command line sets it too, parsed to the field's type
    flags = [x for k, v in {name: value, **needs}.items() for x in (f"--model.{k}", str(v))]
    over = load_config(JobConfig, None, ["--model.preset", "tiny", *flags])
    assert getattr(over.model, name) == value and type(getattr(over.model, name)) is type(value)
    # and the run's saved config.toml loads back to the same section
    (tmp_path / "saved.toml").write_text(dumps(cfg))
    assert load_config(JobConfig, tmp_path / "saved.toml") == cfg


def test_a_saved_run_config_with_every_key_loads(tmp_path):
    """The [model] table a run wrote before the section was derived (all keys set) still loads."""
    path = tmp_path / "config.toml"
    toml = {True: "true", False: "false"}
    path.write_text("[model]\npreset = \"tiny\"\n" + "".join(f"{k} = {toml.get(v, repr(v))}\n"
                                                            for k, v in CHANGED.items()))
    assert load_config(JobConfig, path).model.build_args() == ModelArgs(**CHANGED)


def test_unknown_model_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) model\.hidden_size .*valid keys: .*n_layers"):
        load_config(JobConfig, None, {"model": {"preset": "tiny", "hidden_size": 128}})
    with pytest.raises(ValueError, match="model.n_layers must be an integer"):
        load_config(JobConfig, None, ["--model.n_layers", "two"])
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        load_config(JobConfig, None, ["--model.preset", "huge"]).model.build_args()
    assert set(PRESETS) >= {"tiny", "7B"}


def test_vocab_size_comes_from_the_tokenizer_unless_it_contradicts_it():
    assert ModelConfig(preset="tiny").build_args(vocab_size=777).vocab_size == 777
    assert ModelConfig(preset="tiny", vocab_size=777).build_args(vocab_size=777).vocab_size == 777
    with pytest.raises(ValueError, match="model.vocab_size=600 but the tokenizer has 777 pieces"):
        ModelConfig(preset="tiny", vocab_size=600).build_args(vocab_size=777)


# ---------------------------------------------------------------------------- global batch (section 2.3)


def job(batch_tokens: int, micro: int, seq_len: int) -> JobConfig:
    return load_config(JobConfig, None, {"train": {"batch_tokens": batch_tokens, "micro_batch_size": micro,
                                                   "seq_len": seq_len}})


def test_gradient_accumulation_reaches_batch_tokens_on_any_data_parallel_degree():
    cfg = job(4096, 2, 256)  # 8 micro-batches of 2 x 256 on one process
    assert [cfg.grad_accum_steps(dp) for dp in (1, 2, 4, 8)] == [8, 4, 2, 1]


def test_a_batch_smaller_than_one_micro_batch_per_rank_is_refused():
    # The demo's shape: 16 x 256 = 4,096 tokens, one micro-batch on one process. On 2
    # data-parallel ranks one micro-batch each would be 8,192 tokens: twice the batch asked for.
    cfg = job(4096, 16, 256)
    assert cfg.grad_accum_steps(1) == 1
    with pytest.raises(ValueError) as e:
        cfg.grad_accum_steps(2)
    msg = str(e.value)
    assert "train.batch_tokens=4096" in msg and "8192 tokens, not 4096" in msg
    assert "train.micro_batch_size = 8" in msg and "raise train.batch_tokens to 8192" in msg
    assert job(4096, 8, 256).grad_accum_steps(2) == 1  # the suggested fix trains on 4,096 tokens a step
    # Not even one sequence per rank fits: only raising the batch (or fewer ranks) helps.
    with pytest.raises(ValueError, match=r"tokens, not 256; raise train.batch_tokens to 1024") as e:
        job(256, 1, 256).grad_accum_steps(4)
    assert "micro_batch_size =" not in str(e.value)
