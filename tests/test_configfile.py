from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from llamaworks.configfile import dumps, from_dict, load_config, parse_overrides
from llamaworks.train.config import JobConfig


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    opt: int | None = None
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "x"


def test_overrides_parse_and_coerce():
    o = parse_overrides(["--inner.lr", "3e-4", "--inner.steps=5", "--inner.flag", "true", "--name", "y",
                         "--inner.opt", "none", "--inner.names", "a,b"])
    cfg = from_dict(Outer, o)
    assert cfg.inner.lr == 3e-4 and cfg.inner.steps == 5 and cfg.inner.flag is True
    assert cfg.name == "y" and cfg.inner.opt is None and cfg.inner.names == ["a", "b"]


def test_negative_number_value_is_not_a_flag():
    assert parse_overrides(["--inner.lr", "-1e-3"]) == {"inner": {"lr": "-1e-3"}}


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"inner\.lrr.*valid keys: flag, lr, mode, names, opt, steps"):
        from_dict(Outer, {"inner": {"lrr": 1}})
    with pytest.raises(ValueError, match="unknown config key"):
        from_dict(Outer, {"nope": 1})


@pytest.mark.parametrize("data,msg", [
    ({"inner": {"steps": "ten"}}, "inner.steps must be an integer"),
    ({"inner": {"steps": 1.5}}, "inner.steps must be an integer"),
    ({"inner": {"mode": "c"}}, r"inner.mode must be one of \['a', 'b'\]"),
    ({"inner": {"flag": "maybe"}}, "inner.flag must be true or false"),
    ({"inner": {"lr": "fast"}}, "inner.lr must be a number"),
    ({"inner": 3}, "inner must be a table"),
])
def test_bad_values_name_the_key(data, msg):
    with pytest.raises(ValueError, match=msg):
        from_dict(Outer, data)


def test_override_needs_value():
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--train.max_steps"])
    with pytest.raises(ValueError, match="--section.key VALUE"):
        parse_overrides(["train.max_steps", "3"])


def test_job_config_round_trips_through_toml(tmp_path):
    cfg = load_config(JobConfig, None, ["--train.max_steps", "7", "--model.preset", "tiny", "--optim.lr", "2e-3",
                                        "--train.max_minutes", "1.5"])
    path = tmp_path / "config.toml"
    path.write_text(dumps(cfg))
    again = load_config(JobConfig, path)
    assert again == cfg
    # file < command line precedence
    third = load_config(JobConfig, path, ["--train.max_steps", "9"])
    assert third.train.max_steps == 9 and third.optim.lr == 2e-3


def test_job_config_defaults_are_the_papers():
    cfg = JobConfig()
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.schedule.warmup_steps == 2000 and cfg.schedule.min_lr_ratio == 0.1
    assert cfg.train.seq_len == 2048 and cfg.train.batch_tokens == 2048 * 2048
    assert cfg.grad_accum_steps(dp_world=8) == 256


def test_shipped_configs_load():
    from pathlib import Path

    import llamaworks

    root = Path(llamaworks.__file__).parent / "configs"
    names = sorted(p.stem for p in root.glob("*.toml"))
    assert {"llama_7b", "llama_13b", "llama_33b", "llama_65b", "small_cpu", "tiny_cpu"} <= set(names)
    lrs = {}
    for p in root.glob("*.toml"):
        if p.stem.startswith("mix_"):  # `llamaworks data mix` configs (tests/data/test_mix.py loads them)
            continue
        if p.stem.startswith("finetune_"):  # `llamaworks finetune` configs (tests/train/test_finetune.py)
            continue
        cfg = load_config(JobConfig, p)
        cfg.model.build_args()
        lrs[p.stem] = cfg.optim.lr
    assert lrs["llama_7b"] == lrs["llama_13b"] == 3e-4 and lrs["llama_33b"] == lrs["llama_65b"] == 1.5e-4


def test_invalid_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train\nmax_steps = 3")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config(JobConfig, p)
    with pytest.raises(FileNotFoundError):
        load_config(JobConfig, tmp_path / "missing.toml")
