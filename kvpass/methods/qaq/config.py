"""QAQ's configuration and what it costs: the knob, the tiers, the window ring and its codec, the bytes of
a token in each tier, the packed tier map and the tier capacities."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kvpass.errors import KVPassError
from kvpass.formats import QuantSpec
from kvpass.kvcache import CacheLayout, parse_cache_spec

MAP_DTYPE = torch.uint8  # tier of each slot (0 = not decided yet) in 4 bits, two slots a byte
MAX_TIERS = 15
# a window's token in int8 is a row of its codes then the two bytes of its fp16 absmax scale
WINDOW_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
RING_SCALE_BYTES = 2


@dataclass(frozen=True)
class QAQConfig:
    """QAQ's knob and tiers. ``target_bits`` (average stored bits per element of keys and values, metadata and
    the tier map included) is solved for ``eps`` by bisection on calibration data; or give ``eps`` itself; or a
    ``tolerance``: the calibration windows' perplexity may rise by at most this much (0.01 = +1%) over the
    model-precision cache, and the fewest target bits that keep it are found by measuring (the bits then follow
    from the model)."""

    target_bits: float | None = None
    eps: float | None = None
    tolerance: float | None = None
    window: int = 5
    quantile: float = 0.95
    tiers: tuple[str, ...] = ("int2:per_token+outliers1%", "int4:per_token+outliers1%", "int8:per_token", "fp16")
    key_tiers: tuple[str, ...] | None = None  # None: the same as ``tiers``
    sink: int = 1  # the first tokens always go to the highest tier (KVQuant's attention sink)
    retain: bool = False  # keep a model-precision copy so that tokens can move up a tier later
    # the cache length at which ``target_bits`` counts everything the cache holds (the window ring, its attention,
    # the query statistics and each tier's calibrated tensors, which do not grow with the cache); None: ``target_bits``
    # is the per-token storage (tiers and map) alone
    target_context: int | None = None
    # "fp8_e4m3": the window's tokens wait in fp8 (no scale; 8 bits an element, a window twice as long for the bytes
    # of an fp16 one); "int8": in int8 with an fp16 absmax scale per token (its round trip errs less than fp8's: docs/methods/qaq.md); the
    # tokens then decided into the top tier carry that rounding too. None: the top tier's precision
    window_dtype: str | None = None
    # each layer's eps solved for ``target_bits`` on its own tokens: one eps for the model (the paper's) lets the
    # layers whose stored keys span the widest ranges (a key bias) take the high tiers of every other layer
    per_layer_eps: bool = False

    def __post_init__(self) -> None:
        if sum(k is not None for k in (self.target_bits, self.eps, self.tolerance)) != 1:
            raise KVPassError("QAQConfig takes exactly one knob: target_bits=..., eps=... or tolerance=...")
        if self.tolerance is not None and not self.tolerance >= 0:
            raise KVPassError(f"QAQ tolerance is a relative perplexity rise >= 0 (0.01 = +1%), got {self.tolerance}")
        if self.per_layer_eps and self.eps is not None:
            raise KVPassError("QAQ per_layer_eps solves each layer's eps for a target: give target_bits or tolerance, "
                              "not eps")
        if self.eps is not None and not self.eps > 0:
            raise KVPassError(f"QAQ eps must be > 0, got {self.eps}")
        if self.window < 1:
            raise KVPassError(f"QAQ window must be >= 1 step, got {self.window}")
        if self.sink < 0:
            raise KVPassError(f"QAQ sink must be >= 0 tokens, got {self.sink}")
        if self.target_context is not None and (self.eps is not None or self.target_context < 1):
            raise KVPassError(f"QAQ target_context={self.target_context} needs target_bits (or tolerance) and a length "
                              ">= 1 token")
        if self.window_dtype not in (None, *WINDOW_DTYPES):
            raise KVPassError(f"QAQ window_dtype must be one of {sorted(WINDOW_DTYPES)} or None (the top tier's "
                              f"precision), got {self.window_dtype!r}")
        if not 0.5 <= self.quantile < 1:
            raise KVPassError(f"QAQ quantile must be in [0.5, 1), got {self.quantile}")
        for cs in (parse_cache_spec(t) for t in (*self.tiers, *(self.key_tiers or ()))):
            f = cs.format
            if cs.residual or cs.sink or cs.recent or not (f.static or f.granularity == "per_token" or f.kind == "float"):
                raise KVPassError(f"QAQ tier '{cs}' must code each token alone (a per-token format, or a ':static' "
                                  "per-channel format with calibrated ranges; no residual, sink or recent)")
        bits = self.tier_bits
        if len(bits) > MAX_TIERS:
            raise KVPassError(f"QAQ takes at most {MAX_TIERS} tiers (the map holds a slot's tier in 4 bits), got "
                              f"{len(bits)}")
        if list(bits) != sorted(set(bits)):
            raise KVPassError(f"QAQ tiers must have increasing bits, got {bits}")
        if self.key_tiers is not None and self.bits_of(self.key_tiers) != bits:
            raise KVPassError(f"QAQ key tiers must have the bits of the value tiers {bits}, got "
                              f"{self.bits_of(self.key_tiers)}")

    def with_target(self, target_bits: float) -> QAQConfig:
        """This config with ``target_bits`` as its knob (how a tolerance's search tries a target)."""
        return replace(self, target_bits=target_bits, eps=None, tolerance=None)

    @staticmethod
    def bits_of(tiers: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(tier_bits(parse_cache_spec(t).format) for t in tiers)

    @property
    def tier_bits(self) -> tuple[int, ...]:
        return self.bits_of(self.tiers)

    def tiers_for(self, which: str) -> tuple[str, ...]:
        """The tiers of keys (``"k"``) or values (``"v"``)."""
        return self.key_tiers or self.tiers if which == "k" else self.tiers

    @property
    def ring(self) -> int:
        """Slots of the tokens still inside the window after a step."""
        return self.window - 1

    def ring_dtype(self, model_dtype: torch.dtype, which: str = "v") -> torch.dtype:
        """The window's keys (``"k"``) or values (``"v"``) are held at the precision of their highest tier (fp16 or
        bf16: what the most important tokens get anyway; an fp32 model does not pay twice for them), at the model's
        when that tier is not a 16-bit float; or ``window_dtype``."""
        if self.window_dtype is not None:
            return WINDOW_DTYPES[self.window_dtype]
        top = parse_cache_spec(self.tiers_for(which)[-1]).format
        if top.kind == "float" and top.float_dtype in ("fp16", "bf16"):
            return torch.float16 if top.float_dtype == "fp16" else torch.bfloat16
        return model_dtype

    def ring_row(self, head_dim: int) -> int:
        """Elements of one token's row in the window ring (an int8 row ends with its scale's bytes)."""
        return head_dim + RING_SCALE_BYTES * (self.window_dtype == "int8")


def to_ring(x: torch.Tensor, ring_dtype: torch.dtype) -> torch.Tensor:
    """Tokens ``[..., D]`` as ring rows of ``ring_dtype``: a cast, or int8 codes followed by their fp16 scale."""
    if ring_dtype != torch.int8:
        return x.to(ring_dtype)
    fp16 = torch.finfo(torch.float16)
    # the scale is rounded to fp16 before coding so that decoding multiplies by exactly what coded
    scale = (x.float().abs().amax(-1, keepdim=True) / 127).clamp(fp16.smallest_normal, fp16.max).to(torch.float16)
    codes = (x.float() / scale.float()).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([codes, scale.view(torch.int8)], -1)


def from_ring(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`to_ring`'s rows back as tokens ``[..., D]`` of ``dtype``."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    scale = rows[..., -RING_SCALE_BYTES:].contiguous().view(torch.float16)
    return (rows[..., :-RING_SCALE_BYTES].float() * scale.float()).to(dtype)


def tier_bits(spec: QuantSpec) -> int:
    if spec.kind == "float":
        return {"fp16": 16, "bf16": 16, "fp32": 32}.get(spec.float_dtype or "fp16", 16)
    return 8 if spec.kind == "fp8" else spec.bits


def token_nbytes(tier: str, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one token in ``tier``, its per-token metadata included (calibrated tensors are per layer)."""
    specs = CacheLayout.build(tier, (1, 1, 1, head_dim), dtype).buffer_specs().values()
    return sum(math.prod(shape) * torch.tensor([], dtype=d).element_size() for shape, d in specs)


def tier_cost(config: QAQConfig, head_dim: int, dtype: torch.dtype = torch.float16, which: str = "v") -> torch.Tensor:
    """Stored bits per element of one token in each tier of keys or values, its per-token metadata included."""
    return torch.tensor([8.0 * token_nbytes(t, head_dim, dtype) / head_dim for t in config.tiers_for(which)])


def fixed_nbytes(config: QAQConfig, head_dim: int, which: str, dtype: torch.dtype) -> int:
    """Bytes of one head's K or V cache that do not grow with its length: the window ring (and, with the keys, its
    fp32 attention and the query statistics), each tier's calibrated tensors (the per-layer ones counted per
    head: an upper bound) and the sink tokens' entries in the highest tier (whatever their attention)."""
    row = config.ring_row(head_dim) * torch.tensor([], dtype=config.ring_dtype(dtype, which)).element_size()
    ring = config.ring * row
    if which == "k":
        ring += config.ring * 4 + qnorm_stats_nbytes(1, 1)
    static = sum(t.numel() * t.element_size() for tier in config.tiers_for(which)
                 for t in CacheLayout.build(tier, (1, 1, 1, head_dim), dtype).default_static().values())
    return ring + static + config.sink * token_nbytes(config.tiers_for(which)[-1], head_dim, dtype)


def map_bits(head_dim: int) -> float:
    """Bits per element the tier map adds (4 bits per token and head)."""
    return 4.0 / head_dim


def unpack_map(packed: torch.Tensor) -> torch.Tensor:
    """The tier of every slot ``[B, H, 2 * bytes]`` (0 = not decided) from the packed map (slot 2i in the low
    half of byte i)."""
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)


def pack_map(slots: torch.Tensor) -> torch.Tensor:
    pairs = slots.reshape(*slots.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def capacities(shares: torch.Tensor, max_len: int, sink: int = 0) -> list[int]:
    """Entries per head of each tier: the calibrated shares of ``max_len``, at least ``sink`` in the highest tier,
    the lowest tier taking the rest so that the capacities sum to ``max_len`` (every token finds an entry)."""
    upper = [round(float(s) * max_len) for s in shares[1:]]
    if upper:
        upper[-1] = max(upper[-1], min(sink, max_len))
    while sum(upper) > max_len:
        below = upper[:-1] if upper[-1] <= sink else upper
        upper[upper.index(max(below))] -= 1
    return [max_len - sum(upper), *upper]


def qnorm_stats_nbytes(batch: int, heads: int) -> int:
    return batch * heads * 3 * 4
