"""Config files: dataclass trees <-> TOML files <-> `--section.key value` overrides.

Precedence is defaults < file < command line. Every key is checked against the
dataclass fields: an unknown key is an error listing the valid ones, a value of the
wrong type is an error naming the key. The resolved config is written back as TOML
that loads again as is.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = typing.TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value, tp, key: str):
    """Check (and for CLI strings, parse) `value` against the annotation `tp`."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options):
            if type(None) in options:
                return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            if _looks_numeric(value) and float(value).is_integer():  # "4e6" is a fine batch size
                return int(float(value))
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string, got {value!r}")
    if tp is Any:
        return value
    raise TypeError(f"{key}: unsupported config type {tp}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build a dataclass tree from nested dicts, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a table, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ValueError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)} in {where}; "
                         f"valid keys: {', '.join(sorted(types_))}")
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        if _is_dataclass_type(tp):
            kwargs[name] = from_dict(tp, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif v is not None:  # TOML has no null: None means "unset", which loading restores
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def parse_overrides(args: list[str]) -> dict:
    """['--train.max_steps', '10', '--optim.lr=3e-4'] -> {'train': {'max_steps': '10'}, 'optim': {'lr': '3e-4'}}."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ValueError(f"unexpected argument {arg!r}; config overrides look like --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _looks_numeric(args[i + 1])):
                raise ValueError(f"override --{key} needs a value: --{key} VALUE or --{key}=VALUE")
            value = args[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        node = out
        *sections, leaf = key.split(".")
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise ValueError(f"override --{key} conflicts with another override")
        node[leaf] = value
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None,
                base: dict | None = None) -> T:
    data = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = merge(data, tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML ({e})") from None
    if overrides:
        data = merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return from_dict(cls, data)


def dumps(obj) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(obj))


def resolve_config_path(config: str | None) -> Path | None:
    """A config file path, or the name of a shipped config (`tiny_cpu`, `llama_7b`, ...)."""
    if config is None or Path(config).exists():
        return Path(config) if config else None
    shipped = Path(__file__).resolve().parent / "configs"
    candidate = shipped / (config if config.endswith(".toml") else config + ".toml")
    if candidate.is_file():
        return candidate
    names = ", ".join(sorted(p.stem for p in shipped.glob("*.toml")))
    raise FileNotFoundError(f"config {config!r} is neither a file nor a shipped config ({names})")
