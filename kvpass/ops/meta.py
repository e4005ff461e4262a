"""The static metadata of a kvpass op call, grouped into one string argument.

Every op takes its tensors as arguments and everything fixed at compile time (cache specs, head dims, the cache
length, the RoPE variant and dims, the softmax scale, flags) as one ``meta`` string, written
``"key=value key=value ..."`` in the field order of a frozen dataclass below. A kernel, a fake kernel or a
lowering reads the fields from one place with ``AttentionMeta.parse(meta)``; adding a field changes no signature.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Self, TypeVar

from kvpass.errors import KVPassError
from kvpass.kvcache import CacheSpec, parse_cache_spec

M = TypeVar("M", bound="OpMeta")


def _encode(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    text = str(value)
    if " " in text:
        raise KVPassError(f"op metadata value {text!r} may not contain a space")
    return text


def _decode(kind: str, text: str):
    if kind == "bool":
        return text == "1"
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind.startswith("tuple"):
        return tuple(int(v) for v in text.split(",")) if text else ()
    return text


@dataclass(frozen=True)
class OpMeta:
    """Base of the op metadata records: ``str(meta)`` is the op argument, ``type(meta).parse`` reads it back."""

    def __str__(self) -> str:
        return " ".join(f"{f.name}={_encode(getattr(self, f.name))}" for f in fields(self))

    @classmethod
    def parse(cls, text: str | Self) -> Self:
        if isinstance(text, cls):
            return text
        return _parse(cls, text)


@functools.cache
def _parse(cls: type[M], text: str) -> M:
    kinds = {f.name: str(f.type) for f in fields(cls)}
    values = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or name not in kinds:
            raise KVPassError(f"{cls.__name__}: unknown field {name!r} in {text!r}; fields are {list(kinds)}")
        values[name] = _decode(kinds[name], value)
    return cls(**values)


@dataclass(frozen=True)
class CacheRead(OpMeta):
    """One cache as ``kv_load`` reads it: its spec, head dim and length, and the RoPE variant ("half",
    "interleaved"; "" for none) and rotary dims when its keys are stored before RoPE."""

    spec: str
    head_dim: int
    max_len: int
    rope: str = ""
    rotary_dim: int = 0

    @property
    def cache_spec(self) -> CacheSpec:
        return parse_cache_spec(self.spec)


@dataclass(frozen=True)
class AttentionMeta(OpMeta):
    """A key and a value cache as an attention op reads them, the softmax ``scale``, and whether the op also returns
    the attention mass each cached token received (``need_mass``)."""

    k: str
    v: str
    head_dim: int
    v_head_dim: int
    max_len: int
    scale: float
    rope: str = ""
    rotary_dim: int = 0
    need_mass: bool = False

    @property
    def key_spec(self) -> CacheSpec:
        return parse_cache_spec(self.k)

    @property
    def value_spec(self) -> CacheSpec:
        return parse_cache_spec(self.v)

    @property
    def key_read(self) -> CacheRead:
        return CacheRead(self.k, self.head_dim, self.max_len, self.rope, self.rotary_dim)

    @property
    def value_read(self) -> CacheRead:
        return CacheRead(self.v, self.v_head_dim, self.max_len)
