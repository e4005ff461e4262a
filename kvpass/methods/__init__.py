"""Methods: named presets that say how keys and values are stored. A frozen config per method and a registry
that maps a name to it; the graph pass asks the registry, never an if-chain."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kvpass.errors import KVPassError
from kvpass.formats import QuantSpec
from kvpass.kvcache import CacheLayout, CacheSpec, needs_calibration, parse_cache_spec, static_names
from kvpass.qaq import QAQConfig, fixed_nbytes


@dataclass(frozen=True)
class OverlayConfig:
    """A fixed share of tokens per KV head held at high precision, chosen by accumulated attention (``by_score``)
    or by age, never evicting the first ``sink`` or the ``recent`` newest tokens. With ``evict`` the other tokens
    are dropped (H2O, StreamingLLM) instead of kept in low precision (MiKV)."""

    budget: float
    recent: int | None = None  # None: half of the overlay, as H2O splits its budget between heavy and recent
    sink: int = 0
    high: str = "fp16"  # "fp16", or "none" for the model's dtype
    evict: bool = False
    by_score: bool = True

    def capacity(self, max_len: int) -> int:
        return max(1, min(max_len, math.ceil(self.budget * max_len - 1e-9)))

    def recent_tokens(self, max_len: int) -> int:
        return self.capacity(max_len) // 2 if self.recent is None else self.recent

    def dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.high == "none" else torch.float16


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
    qaq: QAQConfig | None = None  # per-token bits in tiers (kvpass.qaq); ``key``/``value`` are then unused
    full_precision_layers: tuple[int, ...] = ()  # layers whose cache stays at model precision (counted as such)
    # The ``sensitive_layers`` layers whose quantization alone costs the most language-model loss on the calibration
    # data store keys and values as ``sensitive_spec`` instead; the calibration chooses them (kvpass.sensitivity) and
    # compile fills ``promoted_layers`` from it. Plain int8 per token was not enough for SmolLM2's layer 1 (+0.28%
    # perplexity over a model-precision layer 1 under kvquant-4bit-1%, groups of 32: +0.14%): a few outlier channels
    # set each token's range; with 1% outliers and the sink it measured as the model-precision layer (+0.23 vs +0.27%)
    sensitive_layers: int = 0
    sensitive_spec: str = "int8:per_token+outliers1%|sink=1"
    promoted_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for field_name in ("full_precision_layers", "sensitive_layers", "promoted_layers"):
            if getattr(self, field_name) and (self.qaq is not None or self.overlay is not None):
                raise KVPassError(f"method {self.name!r}: {field_name} applies to one key and one value spec; QAQ "
                                  "tiers and overlays hold every layer in their own format")
        for field_name in ("full_precision_layers", "promoted_layers"):
            if any(i < 0 for i in getattr(self, field_name)):
                raise KVPassError(f"method {self.name!r}: {field_name} must be layer indices >= 0, got "
                                  f"{getattr(self, field_name)}")
        if self.sensitive_layers < 0:
            raise KVPassError(f"method {self.name!r}: sensitive_layers must be >= 0, got {self.sensitive_layers}")
        parse_cache_spec(self.sensitive_spec)  # a bad spec is an error at definition, not at the first compile
        if self.overlay is not None and any(parse_cache_spec(s).recent for s in (self.key, self.value)):
            raise KVPassError(f"method {self.name!r}: a recent=W window is read by kv_recent_attention_, which an "
                              "overlay does not use; give the overlay its `recent` tokens instead")

    def key_spec(self, head_dim: int, layer: int | None = None) -> CacheSpec:
        """The keys' spec (of ``layer``: model precision for ``full_precision_layers``, ``sensitive_spec`` for
        ``promoted_layers``)."""
        return self._layer_spec(self.key, head_dim, layer)

    def value_spec(self, head_dim: int, layer: int | None = None) -> CacheSpec:
        """The values' spec (of ``layer``, as :meth:`key_spec`)."""
        return self._layer_spec(self.value, head_dim, layer)

    def _layer_spec(self, text: str, head_dim: int, layer: int | None) -> CacheSpec:
        if layer in self.full_precision_layers:
            return parse_cache_spec("none")
        if layer in self.promoted_layers:
            text = self.sensitive_spec
        return fit_group(parse_cache_spec(text), head_dim)

    @property
    def needs_calibration(self) -> bool:
        """Keys or values coded against calibrated ranges, QAQ's tier capacities or sensitive layers to choose:
        compiling without a calibration is an error."""
        return (self.qaq is not None or self.sensitive_layers > 0
                or any(needs_calibration(parse_cache_spec(s)) for s in (self.key, self.value)))

    @property
    def uses_calibration(self) -> bool:
        """Anything fitted on calibration data (ranges, nuq LUTs, QAQ's eps and tier shares, sensitive layers);
        without it a nuq LUT falls back to NormalFloat."""
        return (self.qaq is not None or self.sensitive_layers > 0
                or any(static_names(parse_cache_spec(s)) for s in (self.key, self.value)))

    @property
    def keeps_low_precision(self) -> bool:
        return self.qaq is None and (self.overlay is None or not self.overlay.evict)

    def nominal_bits(self, head_dim: int = 128, tokens: int = 4096) -> float:
        """Bits per element of keys and values together at ``head_dim`` and ``tokens``, metadata included (of a
        quantized layer: ``full_precision_layers`` are not in it)."""
        elements = 2 * tokens * head_dim
        if self.qaq is not None:  # the target is what the calibration solves for (tier map included)
            fixed = sum(fixed_nbytes(self.qaq, head_dim, w, torch.float16) for w in "kv")
            per_token = self.qaq.target_bits or float("nan")
            if self.qaq.target_context:
                per_token -= 8.0 * fixed / (2 * self.qaq.target_context * head_dim)
            retained = 16.0 if self.qaq.retain else 0.0  # the model-precision copy of every token (fp16 here)
            return per_token + retained + 8.0 * fixed / elements
        total = 0.0
        if self.keeps_low_precision:
            total += sum(CacheLayout.build(s, (1, 1, tokens, head_dim), torch.float16).nbytes
                         for s in (self.key_spec(head_dim), self.value_spec(head_dim)))
        if self.overlay is not None:
            total += overlay_nbytes(self.overlay, 1, 1, tokens, head_dim, head_dim, torch.float16)
        if self.balance:
            total += balance_nbytes(1, 1, head_dim)
        return 8.0 * total / elements


def overlay_nbytes(ov: OverlayConfig, batch: int, heads: int, max_len: int, dk: int, dv: int,
                   model_dtype: torch.dtype) -> int:
    """Overlay K and V rows, the int32 slot of each entry, and the fp32 score of every token."""
    c = ov.capacity(max_len)
    row = torch.tensor([], dtype=ov.dtype(model_dtype)).element_size()
    return batch * heads * (c * (dk + dv) * row + c * 4 + max_len * 4)


def balance_nbytes(batch: int, heads: int, head_dim: int) -> int:
    """The balancer's fp32 scale per sequence, head and channel."""
    return batch * heads * head_dim * 4


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
    return {
        name: f"{m.description} (~{m.nominal_bits():.2f} bits/elem at head_dim 128, 4096 tokens, fp16 model)"
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
# The -1% presets also read each query's 16 newest tokens at model precision (|recent=16, not in the paper): on
# SmolLM2 over 4 x 2k windows that took 2bit-1% from +13.9% to +2.2% perplexity and 3bit-1% from +1.85% to -0.1%,
# for 16 tokens in the model's dtype per head (0.125 bits/elem at 2k tokens in fp16). Attention is mostly local: with
# a window of 4 tokens 2bit-1% is +4.3% (benchmarks/RESULTS.md).
RECENT = 16
for _bits in (4, 3, 2):
    _qn = ":qnorm" if _bits == 2 else ""
    for _out in ("", "+outliers1%"):
        _win = f"|recent={RECENT}" if _out else ""
        register_method(MethodConfig(
            f"kvquant-{_bits}bit" + ("-1%" if _out else ""),
            f"KVQuant: nuq{_bits} keys per channel before RoPE with calibrated ranges and a LUT per channel, "
            f"nuq{_bits} values per token, Fisher-weighted LUTs, first token at model precision"
            + (", 1% dense-and-sparse outliers" if _out else "") + (", Q-Norm" if _qn else "")
            + (f", each query's {RECENT} newest tokens at model precision; the one layer whose coding costs the most "
               "loss on the calibration data in int8 with 1% outliers (not in the bits figure: it adds about "
               "(8.6 - bits) / layers)" if _out else "")
            + " (needs calibration)",
            f"nuq{_bits}:per_channel:static:channel_lut{_qn}{_out}|sink=1{_win}",
            f"nuq{_bits}:per_token{_qn}{_out}|sink=1{_win}",
            pre_rope_keys=True, sensitive_layers=1 if _out else 0))
# MiKV's low tier is int4: with int3 (7.5 bits/elem) MiKV only tied H2O at its memory on SmolLM2 (+0.32% both over
# 4 x 2k windows); with int4 (8.5 bits/elem) it is +0.07% against H2O's +0.32% at 51% (benchmarks/RESULTS.md)
register_method(MethodConfig(
    "mikv", "MiKV: every token in int4 (per token, groups of 32), 20% of the tokens overlaid in fp16 (half heavy "
    "hitters by accumulated attention, half the newest), query/key channel balancer",
    "int4:per_token:g32", "int4:per_token:g32", overlay=OverlayConfig(budget=0.2), max_chunk=64, balance=True))
register_method(MethodConfig(
    "h2o", "H2O eviction baseline (not recommended): 51% of the tokens in fp16 (half heavy hitters, half the newest), "
    "the rest dropped; MiKV's memory", "none", "none",
    overlay=OverlayConfig(budget=0.51, evict=True), max_chunk=64))
register_method(MethodConfig(
    "streaming", "StreamingLLM eviction baseline (not recommended): 4 sink tokens and the newest, 51% of the tokens "
    "in fp16, the rest dropped; MiKV's memory", "none", "none",
    overlay=OverlayConfig(budget=0.51, recent=0, sink=4, evict=True, by_score=False), max_chunk=64))
# QAQ's keys in its low tiers are coded per channel against calibrated ranges (post-RoPE), as KVQuant's are: per token
# at 2 bits a few outlier channels ruin them (see kvpass.qaq)
_QAQ_KEYS = ("nuq2:per_channel:static:channel_lut:qnorm+outliers1%", "nuq4:per_channel:static:channel_lut+outliers1%",
             "int8:per_token", "fp16")
register_method(MethodConfig(
    "qaq", "QAQ: per-token key and value bits from attention over a 5-step window, tiers of 2 and 4 bits (1% fp16 "
    "outliers; keys nuq per channel with calibrated ranges, values int per token), int8, fp16; eps solved on "
    "calibration data for 4 bits/elem, 4x smaller than fp16 (needs calibration)",
    "none", "none", max_chunk=32, qaq=QAQConfig(target_bits=4.0, key_tiers=_QAQ_KEYS)))
# qaq-6x's 2-bit value tier is nuq per channel against calibrated ranges, as its keys are: int2 per token spends 0.5
# of its 2.5 bits/elem on an fp16 scale and zero at head_dim 64, which at 2.67 bits left no room for the tiers above
# it or a longer window. Its keys are stored before RoPE (KVQuant's format), its window's tokens wait in int8 with a
# scale per token (a window twice as long for the bytes of an fp16 one; fp8 without a scale cost 0.6 point more), its
# 4-bit key tier is int per token (the per-channel LUTs of a nearly empty tier cost 0.07 bits/elem at 2k tokens) and
# its 2-bit tiers leave out Q-Norm, which cost perplexity on both sides with a long window. SmolLM2, 4 x 2k windows
# (benchmarks/RESULTS.md): int2 values and a 5-step window +14.8% at 2.83 bits; per-channel values with 33 steps
# +4.7% at 2.64; keys before RoPE +4.1%; a 65-step fp8 window +3.6% at 2.63; 81 steps and int4 keys in the 4-bit tier
# +3.2% at 2.68; no Q-Norm +2.3% at 2.67; the window in int8 instead of fp8 +1.75% at 2.67
register_method(MethodConfig(
    "qaq-6x", "QAQ solved for 2.67 bits/elem at 2k tokens with everything counted (6x smaller than fp16): keys "
    "stored before RoPE, an 81-step attention window (its 80 newest tokens in int8 with a scale each), tiers of 2 "
    "bits (nuq per channel with calibrated ranges for keys and values; 1% fp16 key outliers), 4 (int per token, 1% "
    "outliers), 8 and 16 (needs calibration)", "none", "none", max_chunk=32, pre_rope_keys=True,
    qaq=QAQConfig(target_bits=16 / 6, target_context=2048, window=81, window_dtype="int8",
                  key_tiers=("nuq2:per_channel:static:channel_lut+outliers1%", "int4:per_token+outliers1%",
                             *_QAQ_KEYS[2:]),
                  tiers=("nuq2:per_channel:static:channel_lut", "int4:per_token+outliers1%", "int8:per_token", "fp16"))))
for _bits in (2, 4):
    register_method(MethodConfig(
        f"kivi-{_bits}bit",
        f"KIVI: int{_bits} keys per channel in groups of 32 tokens, values per token in groups of 32 channels, the "
        "last 128 tokens at model precision until their block fills",
        f"int{_bits}:per_channel:g32|residual=128", f"int{_bits}:per_token:g32|residual=128"))
