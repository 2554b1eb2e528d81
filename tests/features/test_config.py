from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from features.core.config import config_hash, deep_merge, flatten, from_dict
from features.core.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    k: int = 5
    name: str | None = None


@dataclass(frozen=True)
class Outer:
    mode: Literal["a", "b"] = "a"
    rate: float = 0.1
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError("rate must be >= 0")


def test_from_dict_builds_nested_and_coerces_int_to_float():
    got = from_dict(Outer, {"mode": "b", "rate": 1, "sizes": [3], "inner": {"k": 2}})
    assert got == Outer(mode="b", rate=1.0, sizes=(3,), inner=Inner(k=2))


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"mdoe": "a"}, "cfg: unknown key 'mdoe' (did you mean 'mode'?)"),
        ({"inner": {"kk": 1}}, "cfg.inner: unknown key 'kk'"),
        ({"mode": "c"}, "cfg.mode: expected one of ['a', 'b']"),
        ({"rate": "fast"}, "cfg.rate: expected float"),
        ({"sizes": [1, "x"]}, "cfg.sizes[1]: expected int"),
        ({"inner": {"k": True}}, "cfg.inner.k: expected int"),
        ({"rate": -1}, "cfg: rate must be >= 0"),
        ({"inner": 3}, "cfg.inner: expected a mapping"),
    ],
)
def test_from_dict_errors_name_the_key(data, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data, where="cfg")
    assert needle in str(e.value)


def test_hash_flatten_merge():
    assert config_hash(Outer()) == config_hash(Outer())
    assert config_hash(Outer()) != config_hash(Outer(rate=0.2))
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_yaml_duplicate_keys_rejected(tmp_path):
    from features.core.config import load_mapping

    p = tmp_path / "c.yaml"
    p.write_text("arms:\n  a: 1\n  b: 2\n  a: 3\n")
    with pytest.raises(ConfigError) as e:
        load_mapping(p)
    assert "duplicate key 'a' at line 4 (first at line 2)" in str(e.value) and "c.yaml" in str(e.value)
    p.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_mapping(p)
