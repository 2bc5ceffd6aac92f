"""Typed configuration: frozen dataclasses built from YAML plus dotted `key=value` overrides.

Every runner uses the same three steps::

    cfg = config.load(PretrainConfig, "configs/tiny.yaml", ["train.steps=100", "model=llama2-7b"])

A dataclass-typed field may be given as a preset name (a string) when its class is registered
with `register_presets`; `model=llama2-7b model.n_layers=2` starts from the preset and edits it.
Mistakes raise `ConfigError` naming the key, what was expected and what was given, with the
nearest valid key suggested for typos. Ranges are each dataclass's own business: its
`__post_init__` raises ValueError with a message that starts with `field=value` (see
`check_finite`), and `from_dict` turns that into a ConfigError starting with the dotted key
(`optim.lr=nan must be a finite number`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lib.files import write_text_atomic

T = TypeVar("T")

PRESET_KEY = "preset"
_PRESETS: dict[type, Mapping[str, Any]] = {}


class ConfigError(ValueError):
    """A user mistake in a config file or override; runners print it without a traceback."""


def register_presets(cls: type, presets: Mapping[str, Any]) -> None:
    """Let fields of type `cls` be written as a preset name (`model=llama2-7b`)."""
    _PRESETS[cls] = presets


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(choices))}"


def check_finite(obj: Any) -> None:
    """ValueError naming the first float field of dataclass `obj` (or float in a tuple field)
    that is NaN or infinite.

    Call it first in the `__post_init__` of every config with float fields: YAML reads `.nan`
    and `.inf` as floats and `float("nan")` accepts the strings, and a NaN compares false with
    every bound, so range checks alone would let it through to train on NaN.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ValueError(f"{f.name}={value!r} must be a finite number")


def preset(cls: type[T], name: str, key: str = "") -> T:
    table = _PRESETS.get(cls, {})
    if name not in table:
        where = f"{key}: " if key else ""
        raise ConfigError(f"{where}unknown {cls.__name__} preset {name!r}{_suggest(name, list(table))}")
    return table[name]


def to_dict(obj: Any) -> Any:
    """A plain YAML-able tree of a (nested) config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_dict(cls: type[T], raw: Any, key: str = "") -> T:
    """Build dataclass `cls` from a nested mapping, checking every key and type."""
    return _convert(cls, raw, key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = key or "<root>"

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return _convert(options[0], value, key)  # its own error names a typo'd key
        for arg in options:
            try:
                return _convert(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}: {value!r}")
            items = [_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            inner = args[0] if args else Any
            items = [_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, f"{key}.{k}"): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # YAML reads `split=1` as an int
            return str(value)
        raise ConfigError(f"{where}: expected str, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    raise TypeError(f"config field {where} has unsupported type {tp!r}")


def _build_dataclass(cls: type, value: Any, key: str) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        return preset(cls, value, key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key or '<root>'}: expected a {cls.__name__} mapping or preset name, got {value!r}")
    value = dict(value)
    base = None
    if PRESET_KEY in value and cls in _PRESETS:
        base = preset(cls, value.pop(PRESET_KEY), key)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in value:
        if name not in fields:
            dotted = f"{key}.{name}" if key else name
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(name, list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{key}.{name}" if key else name
        if name in value:
            # A partial mapping edits the current value (the preset's, else the field default);
            # one that names its own preset starts from that preset instead.
            current = getattr(base, name) if base is not None else _default(f)
            given = value[name]
            if (dataclasses.is_dataclass(current) and isinstance(given, Mapping)
                    and PRESET_KEY not in given):
                given = {**to_dict(current), **given}
            kwargs[name] = _convert(hints[name], given, dotted)
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {dotted!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(_name_the_key(str(e), key, cls, fields)) from None


def _name_the_key(message: str, key: str, cls: type, fields: Mapping[str, Any]) -> str:
    """`lr=nan must be ...` raised by `optim`'s __post_init__ -> `optim.lr=nan must be ...`."""
    field = message.split("=", 1)[0]
    if "=" in message and field in fields:
        return f"{key}.{message}" if key else message
    return f"{key or cls.__name__}: {message}"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """`a.b=3` -> (["a", "b"], 3); values are parsed as YAML scalars or lists."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, text = item.split("=", 1)
        if not dotted or any(not part for part in dotted.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        parsed.append((dotted.split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Write dotted overrides into a raw (not yet validated) config mapping."""
    for path, value in parse_overrides(overrides):
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str):  # a preset name being edited: keep it as the base
                child = {PRESET_KEY: child}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part!r} holds {child!r}, not a mapping")
            node[part] = child
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return raw


def read_json(path: str | Path) -> Any:
    """A JSON file (config.json, params.json, adapter_config.json, ...); a bad one names itself."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read `path` (optional), apply `overrides`, and validate into `cls`."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(raw, overrides))


def parse_argv_raw(argv: Sequence[str]) -> dict:
    """The config as the user wrote it: the optional leading YAML file with the `key=value`
    overrides applied, before defaults and validation (what was given, and what was not)."""
    argv = list(argv)
    path = argv.pop(0) if argv and "=" not in argv[0] else None
    raw = read_yaml(path) if path is not None else {}
    return apply_overrides(raw, argv)


def parse_argv(cls: type[T], argv: Sequence[str]) -> T:
    """Runner command lines: an optional leading YAML path, then `key=value` overrides."""
    return from_dict(cls, parse_argv_raw(argv))


def dump(obj: Any, path: str | Path) -> None:
    """Write the config as YAML, atomically (a crash never leaves a truncated file)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
