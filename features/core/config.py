"""Strict config loading: plain dicts (from YAML/JSON/CLI) -> frozen dataclasses.

Unknown keys and wrong types are rejected with the dotted path of the key, so a
typo in an experiment file fails before any work starts (exit status 2).
Components own their config dataclass; this module only knows how to fill one.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Toy:
...     dim: int = 8
>>> from_dict(Toy, {"dim": 4}, where="toy")
Toy(dim=4)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from features.core.errors import ConfigError, UsageError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            # YAML 1.1 reads unquoted off/on/no/yes as booleans
            words = [a for a in allowed if isinstance(value, bool) and str(a).lower() in ("off", "on", "no", "yes")]
            hint = f" (YAML reads an unquoted {words[0]} as {str(value).lower()}: quote it, '{words[0]}')" if words else ""
            raise ConfigError(f"{where}: expected one of {list(allowed)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, f"{where}"): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected bool (true/false), got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        return _coerce_float(value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected str, got {type(value).__name__} {value!r}")
    raise TypeError(f"config type {tp!r} at {where} is not supported")


def _coerce_float(value: Any, where: str) -> float:
    """A finite float. PyYAML reads `1e-3` (no dot) as a string: a string that
    parses as a float is accepted here, for float keys only. NaN and +-inf
    are refused: no training, threshold or fraction means anything with them."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    return number


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types.

    `__post_init__` validation errors (ValueError) are re-raised as ConfigError
    carrying `where`.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


def need(section: Any, names: tuple[str, ...], ok: Callable[[Any], bool], what: str) -> None:
    """A config section's range check: ValueError naming the first of
    `names` whose value fails `ok` (NaN fails every check), and the value."""
    for name in names:
        value = getattr(section, name)
        if not ok(value):
            raise ValueError(f"{name} must be {what}, got {value!r}")


def expand_home(section: Any, names: tuple[str, ...]) -> None:
    """Path keys of a (frozen) config section with a leading `~` expanded, as a
    shell would (a config is no shell: `~/runs` made a folder named `~` in the
    working directory); `${VAR}` / a leading `$VAR` is refused, not expanded."""
    for name in names:
        value = getattr(section, name)
        if not isinstance(value, str) or not value:
            continue
        # `${VAR}` anywhere, or `$VAR` opening a path component; `a$bc` is a legal name
        if re.search(r"\$\{|(?:^|/)\$[A-Za-z_]", value):
            raise ValueError(f"{name} {value!r}: environment variables are not expanded in configs; write the path out")
        if value.startswith("~"):
            object.__setattr__(section, name, str(Path(value).expanduser()))


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (dataclass or plain mapping)."""
    payload = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _strict_yaml_loader():
    """A SafeLoader that rejects duplicate keys (PyYAML keeps the last silently:
    two arms with the same name would quietly become one)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: its keys are defaults the mapping's own keys override
            key = loader.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ConfigError(f"key at line {line} is a {type(key).__name__}: keys must be plain names")
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {seen[key] + 1})")
            seen[key] = line - 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    def construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
        # YAML 1.1 reads 010 as 8 (octal) and 2:00 as 120 (base 60): a config
        # number means what it says, or is refused
        if re.fullmatch(r"[-+]?0[0-9_]+", node.value) or ":" in node.value:
            raise ConfigError(f"number {node.value!r} at line {node.start_mark.line + 1}: YAML reads it as "
                              f"{yaml.SafeLoader.construct_yaml_int(loader, node)}; write it without leading zeros or ':'")
        return yaml.SafeLoader.construct_yaml_int(loader, node)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    StrictLoader.add_constructor("tag:yaml.org,2002:int", construct_int)
    return StrictLoader


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads hook: a key given twice in one object is an error (json keeps the last silently)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(f"duplicate key {k!r}: each key may appear once per mapping")
        out[k] = v
    return out


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict, with clear errors
    (duplicate keys are errors too)."""
    import yaml

    if not str(path).strip():
        raise UsageError("config file '': empty path (an unset shell variable?)")
    p = Path(path)
    if not p.exists():
        raise UsageError(f"config file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"config file {p} cannot be read: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
            "save it as UTF-8"
        ) from e
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if p.suffix == ".json" else yaml.load(text, Loader=_strict_yaml_loader())
    except ConfigError as e:
        raise ConfigError(f"config file {p}: {e}") from e
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping, got {type(data).__name__}")
    return data


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (for MLflow params and diffs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def deep_merge(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively overlay `delta` on `base` (mappings merge, anything else
    replaces). A null over a mapping changes nothing: it is how YAML reads a
    section left empty (`features:` with every key commented out), never a
    request to reset the base's section to the defaults."""
    out = dict(base)
    for k, v in delta.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        elif v is None and isinstance(out.get(k), Mapping):
            continue
        else:
            out[k] = v
    return out


__all__ = [
    "from_dict",
    "to_dict",
    "config_hash",
    "load_mapping",
    "flatten",
    "deep_merge",
]
