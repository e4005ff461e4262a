"""Methods: named presets that say how keys and values are stored. A frozen :class:`MethodConfig` per method
and a registry that maps a name to it; each method family registers its presets in its own module."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kvpass.errors import KVPassError
from kvpass.formats import QuantSpec
from kvpass.kvcache import CacheSpec, parse_cache_spec
from kvpass.ops.balance import balance_nbytes
from kvpass.pipeline.handler import handler_for

if TYPE_CHECKING:
    from kvpass.methods.overlay.config import OverlayConfig
    from kvpass.methods.qaq.config import QAQConfig


@dataclass(frozen=True)
class MethodConfig:
    """How one method stores the cache. ``key``/``value`` are cache spec strings (:mod:`kvpass.kvcache`); a
    per-token group larger than (or not dividing) the head dimension falls back to one group per head vector.
    ``pre_rope_keys`` stores keys before rotary embedding and applies it at read time (KVQuant)."""

    name: str
    description: str
    key: str
    value: str
    pre_rope_keys: bool = False
    overlay: OverlayConfig | None = None
    max_chunk: int | None = None  # prompts are written at most this many tokens per call
    balance: bool = False  # MiKV's query/key channel balancer (set from the first chunk of each sequence)
    qaq: QAQConfig | None = None  # per-token bits in tiers (kvpass.methods.qaq); ``key``/``value`` are then unused
    full_precision_layers: tuple[int, ...] = ()  # layers whose cache stays at model precision (counted as such)
    # The ``sensitive_layers`` layers whose quantization alone costs the most language-model loss on the calibration
    # data store keys and values as ``sensitive_spec`` instead; the calibration chooses them (kvpass.calibration.layers)
    # and the plan reads them from it; ``promoted_layers`` names such layers by hand. The default has outliers: a few
    # outlier channels set each token's range in plain int8 (docs/methods/kvquant.md)
    sensitive_layers: int = 0
    sensitive_spec: str = "int8:per_token+outliers1%|sink=1"
    promoted_layers: tuple[int, ...] = ()
    scheme: Any = None  # the config of a family of one's own (its handler registered for its type)
    # the documented quality of a calibrated preset: the relative rise of the calibration windows' perplexity over
    # the model-precision cache it should stay under; calibration checks it (kvpass.calibration.guard)
    quality_bound: float | None = None

    def __post_init__(self) -> None:
        families = [c for c in (self.qaq, self.overlay, self.scheme) if c is not None]
        if len(families) > 1:
            raise KVPassError(f"method {self.name!r}: give one of qaq=, overlay= and scheme=, not "
                              f"{[type(c).__name__ for c in families]}")
        for field_name in ("full_precision_layers", "sensitive_layers", "promoted_layers"):
            if getattr(self, field_name) and families:
                raise KVPassError(f"method {self.name!r}: {field_name} applies to one key and one value spec; QAQ "
                                  "tiers and overlays hold every layer in their own format")
        for field_name in ("full_precision_layers", "promoted_layers"):
            if any(i < 0 for i in getattr(self, field_name)):
                raise KVPassError(f"method {self.name!r}: {field_name} must be layer indices >= 0, got "
                                  f"{getattr(self, field_name)}")
        if self.sensitive_layers < 0:
            raise KVPassError(f"method {self.name!r}: sensitive_layers must be >= 0, got {self.sensitive_layers}")
        parse_cache_spec(self.sensitive_spec)  # a bad spec is an error at definition, not at the first compile
        if self.quality_bound is not None and not self.quality_bound >= 0:
            raise KVPassError(f"method {self.name!r}: quality_bound is a relative perplexity rise >= 0 (0.01 = +1%), "
                              f"got {self.quality_bound}")
        handler_for(self).validate(self)

    @property
    def family(self) -> Any:
        """The family's own config (``QAQConfig``, ``OverlayConfig`` or ``scheme``), whose type chooses the handler
        (:mod:`kvpass.pipeline.handler`); None for one key and one value spec per layer."""
        return next((c for c in (self.qaq, self.overlay, self.scheme) if c is not None), None)

    def key_spec(self, head_dim: int, layer: int | None = None, promoted: tuple[int, ...] = ()) -> CacheSpec:
        """The keys' spec (of ``layer``: model precision for ``full_precision_layers``, ``sensitive_spec`` for
        ``promoted_layers`` and the layers a calibration chose, ``promoted``)."""
        return self._layer_spec(self.key, head_dim, layer, promoted)

    def value_spec(self, head_dim: int, layer: int | None = None, promoted: tuple[int, ...] = ()) -> CacheSpec:
        """The values' spec (of ``layer``, as :meth:`key_spec`)."""
        return self._layer_spec(self.value, head_dim, layer, promoted)

    def _layer_spec(self, text: str, head_dim: int, layer: int | None, promoted: tuple[int, ...]) -> CacheSpec:
        if layer in self.full_precision_layers:
            return parse_cache_spec("none")
        if layer in self.promoted_layers or layer in promoted:
            text = self.sensitive_spec
        return fit_group(parse_cache_spec(text), head_dim)

    @property
    def needs_calibration(self) -> bool:
        """Keys or values coded against calibrated ranges, QAQ's tier capacities or sensitive layers to choose:
        compiling without a calibration is an error."""
        return handler_for(self).needs_calibration(self)

    @property
    def uses_calibration(self) -> bool:
        """Anything fitted on calibration data (ranges, nuq LUTs, QAQ's eps and tier shares, sensitive layers);
        without it a nuq LUT falls back to NormalFloat."""
        return handler_for(self).uses_calibration(self)

    def nominal_bits(self, head_dim: int = 128, tokens: int = 4096) -> float:
        """Bits per element of keys and values together at ``head_dim`` and ``tokens``, metadata included (of a
        quantized layer: ``full_precision_layers`` are not in it)."""
        bits = handler_for(self).nominal_bits(self, head_dim, tokens)
        if self.balance:
            bits += 8.0 * balance_nbytes(1, 1, head_dim) / (2 * tokens * head_dim)
        return bits


def fit_group(cs: CacheSpec, head_dim: int) -> CacheSpec:
    spec: QuantSpec = cs.format
    if spec.granularity == "per_token" and spec.group is not None and (spec.group > head_dim or head_dim % spec.group):
        return replace(cs, format=spec.with_(group=None))
    return cs


_METHODS: dict[str, MethodConfig] = {}
_ALIASES: dict[str, str] = {}


def register_method(config: MethodConfig, *aliases: str) -> MethodConfig:
    _METHODS[config.name] = config
    for alias in aliases:
        _ALIASES[alias] = config.name
    return config


def get_method(name: str | MethodConfig) -> MethodConfig:
    """The registered method called ``name``; a clear error listing the valid names otherwise."""
    if isinstance(name, MethodConfig):
        return name
    key = _ALIASES.get(name, name)
    if key not in _METHODS:
        valid = ", ".join(sorted(_METHODS) + sorted(_ALIASES))
        raise KVPassError(f"unknown method {name!r}; valid methods: {valid} (see kvpass.methods())")
    return _METHODS[key]


def methods() -> dict[str, str]:
    """Every registered method: name -> one-line description with its nominal bits per element."""
    def bits(m: MethodConfig) -> str:
        b = m.nominal_bits()
        return ("bits/elem from calibration" if math.isnan(b) else
                f"~{b:.2f} bits/elem at head_dim 128, 4096 tokens, fp16 model")

    return {name: f"{m.description} ({bits(m)})" for name, m in sorted(_METHODS.items())}
