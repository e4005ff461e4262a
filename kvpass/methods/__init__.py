"""Methods: named presets that say how keys and values are stored. A frozen config per method and a registry
that maps a name to it; the graph pass asks the registry, never an if-chain."""

from __future__ import annotations

from dataclasses import dataclass

from kvpass.errors import KVPassError
from kvpass.formats import QuantSpec, parse_spec


@dataclass(frozen=True)
class MethodConfig:
    """How one method stores the cache. ``key``/``value`` are spec strings; a group size larger than (or not
    dividing) the head dimension falls back to one group per head vector."""

    name: str
    description: str
    key: str
    value: str

    def key_spec(self, head_dim: int) -> QuantSpec:
        return fit_group(parse_spec(self.key), head_dim)

    def value_spec(self, head_dim: int) -> QuantSpec:
        return fit_group(parse_spec(self.value), head_dim)

    def nominal_bits(self, head_dim: int = 128) -> float:
        """Bits per element of keys and values together at ``head_dim``, metadata included."""
        from kvpass.formats import expected_nbytes
        import torch

        shape = (1, 1, 1024, head_dim)
        total = sum(expected_nbytes(shape, s, torch.float16) for s in (self.key_spec(head_dim), self.value_spec(head_dim)))
        return 8.0 * total / (2 * 1024 * head_dim)


def fit_group(spec: QuantSpec, head_dim: int) -> QuantSpec:
    if spec.group is not None and (spec.group > head_dim or head_dim % spec.group):
        return spec.with_(group=None)
    return spec


_METHODS: dict[str, MethodConfig] = {}
_ALIASES: dict[str, str] = {}


def register_method(config: MethodConfig, *aliases: str) -> MethodConfig:
    _METHODS[config.name] = config
    for alias in aliases:
        _ALIASES[alias] = config.name
    return config


def get_method(name: "str | MethodConfig") -> MethodConfig:
    """The registered method called ``name``; a clear error listing the valid names otherwise."""
    if isinstance(name, MethodConfig):
        return name
    key = _ALIASES.get(name, name)
    if key not in _METHODS:
        valid = ", ".join(sorted(_METHODS) + sorted(_ALIASES))
        raise KVPassError(f"unknown method {name!r}; valid methods: {valid} (see kvpass.methods())")
    return _METHODS[key]


def methods() -> dict[str, str]:
    """Every registered method: name -> one-line description with its nominal bits per element (head_dim 128)."""
    return {
        name: f"{m.description} (~{m.nominal_bits():.2f} bits/elem at head_dim 128, fp16 model)"
        for name, m in sorted(_METHODS.items())
    }


register_method(MethodConfig("fp16", "no quantization: the cache in the model's own dtype (exactness check)",
                             "none", "none"), "none")
register_method(MethodConfig("int8", "int8 keys and values, per-token min/max with fp16 scale and zero",
                             "int8:per_token", "int8:per_token"))
register_method(MethodConfig("fp8", "fp8 e4m3 keys and values with a per-token fp16 scale",
                             "fp8_e4m3:per_token", "fp8_e4m3:per_token"))
register_method(MethodConfig("int4", "int4 keys and values, per-token groups of 64 (naive baseline)",
                             "int4:per_token:g64", "int4:per_token:g64"))
register_method(MethodConfig("int2", "int2 keys and values, per-token groups of 64 (naive baseline)",
                             "int2:per_token:g64", "int2:per_token:g64"))
