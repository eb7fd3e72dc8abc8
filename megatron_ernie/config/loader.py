"""TOML in, frozen dataclasses out.

TOML is only the file format: the schema is the dataclass tree.  Unknown
sections or keys are errors (a typo must never silently fall back to a
default), values are type-checked against the field annotations, and
``--set section.key=value`` overrides are applied on the raw mapping before
the tree is built, so they go through exactly the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping

from megatron_ernie.config.errors import ConfigError


def _close_match(name: str, options) -> str:
    best = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{best[0]}'?)" if best else ""


def _coerce_tuple(path: str, value: Any, annotation) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, value, "expected a list")
    (item_type, *_rest) = typing.get_args(annotation) or (Any,)
    if dataclasses.is_dataclass(item_type):
        return tuple(build(item_type, v, f"{path}[{i}]") for i, v in enumerate(value))
    return tuple(_coerce(f"{path}[{i}]", v, item_type) for i, v in enumerate(value))


def _coerce(path: str, value: Any, annotation) -> Any:
    """Check ``value`` against a field type; ints are accepted for floats, lists for tuples."""
    if typing.get_origin(annotation) is tuple:
        return _coerce_tuple(path, value, annotation)
    kind = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))
    if kind is None:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, value, "must be a finite number (TOML's inf and nan are not settings)")
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        hint = "; quote it, e.g. --set 'key=\"value\"'" if kind is str else ""
        raise ConfigError(path, str(value), f"expected a {kind.__name__}, got {type(value).__name__}{hint}")
    return value


def build(cls, raw: Mapping[str, Any], path: str = ""):
    """Build dataclass ``cls`` from a mapping, recursing into sub-sections."""
    if not isinstance(raw, Mapping):
        raise ConfigError(path or "<root>", raw, "expected a table (section)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(where, value, "unknown key" + _close_match(key, fields)
                              + f"; known keys: {', '.join(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, where)
        else:
            kwargs[key] = _coerce(where, value, hint)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=3' -> (['a', 'b'], 3); the value is parsed as a TOML value, else a string."""
    if "=" not in text:
        raise ConfigError("--set", text, "write overrides as section.key=value")
    key, raw_value = text.split("=", 1)
    keys = key.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError("--set", text, "name the section and key, e.g. train.iters=100")
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return keys, value


def apply_overrides(raw: dict, overrides) -> dict:
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError("--set", text, f"'{k}' is a value, not a section")
        node[keys[-1]] = value
    return raw


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", str(path), "no such file; see configs/ for examples")
    try:
        return tomllib.loads(decode_utf8(path, "--config"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("--config", str(path), f"is not valid TOML: {err}") from None


def decode_utf8(path: Path, field: str) -> str:
    """The text of ``path``; a file that is not UTF-8 (TOML requires it) is a ConfigError naming
    the line and byte, not a UnicodeDecodeError from deep in the reader."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(field, str(path), f"is not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}, "
                                            f"column {column}); save it with UTF-8 encoding") from None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_table_list(value) -> bool:
    return isinstance(value, (list, tuple)) and value and all(dataclasses.is_dataclass(v) for v in value)


def _dump_table(obj, name: str, lines: list, header: str = "[{}]") -> None:
    """One dataclass as a TOML table; nested dataclasses become [name.sub] tables."""
    lines.append(header.format(name))
    nested = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) or _is_table_list(value):
            nested.append((f.name, value))
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    lines.append("")
    for key, value in nested:
        if dataclasses.is_dataclass(value):
            _dump_table(value, f"{name}.{key}", lines)
        else:
            for item in value:
                _dump_table(item, f"{name}.{key}", lines, "[[{}]]")


def dumps(cfg) -> str:
    """Write a config tree as TOML that ``load`` reads back to an equal tree."""
    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        _dump_table(getattr(cfg, f.name), f.name, lines)
    return "\n".join(lines)
