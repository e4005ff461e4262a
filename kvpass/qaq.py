"""QAQ: per-token key and value bits from attention, in tiers of static capacity (DESIGN section 4).

Each token of each KV head is first held in a small ring for ``window`` steps (the attention window), at the
precision of the highest tier (fp16 for an fp32 model whose top tier is fp16: a prompt reads it rounded as decoding
does), or in fp8 or in int8 with a scale per token (``QAQConfig.window_dtype``). When it leaves the window its bits
are decided from the largest attention ``a`` it received in it:

* values: ``B_v = ceil(log2(1 + a * range(v) / eps))`` (every token adds the same output error ``eps``);
* keys: ``B_k = ceil(log2(1 + a' (1 - a') * q_p * range(k) / (sqrt(d) * eps)))`` with ``q_p`` the
  ``quantile`` of a log-normal fitted to the query norms seen so far, and ``a' = min(a, 1/2)``.

``a (1 - a)`` is the design's sensitivity of a logit error; it falls again above 1/2, which would give the keys of
attention sinks (the tokens with the most attention, which KVQuant keeps in fp16) the fewest bits because the
softmax happens to be saturated now. The window exists because importance jumps, so we take the monotone
envelope: a token with more attention never gets fewer bits.

The bits are rounded up to a tier (2/4/8/16 bits by default). Every tier is a packed store of a fixed number of
entries per head (its capacity, from the shares measured on calibration data), and a 4-bit map says which tier
holds each cache slot. Slots are written in order, so the entry of slot ``i`` in tier ``t`` is the number of
earlier slots in ``t``: no index is stored. A token whose tier is full goes to the nearest lower tier with room,
else the nearest higher one; the capacities sum to the cache length, so there always is one.

With ``QAQConfig.retain`` every token is also kept at model precision (the paper keeps this copy in host memory;
here it is one more cache buffer, counted in ``cache_report``). A decided token whose attention now asks for more
bits than its tier has is then moved up to the highest tier at or below the one it asks for that has room, and
re-coded from that copy; without it a token's tier is final once it leaves the window.

Key tiers may differ from value tiers (``QAQConfig.key_tiers``) and may code keys per channel against calibrated
ranges (``:static`` formats code each token alone, so a token can still be written when it is decided): per-token
int2 keys lose to a few outlier channels what per-channel ranges keep (on SmolLM2 qaq-6x went from +1012% to +14.8%
perplexity with them; benchmarks/RESULTS.md). With ``MethodConfig(pre_rope_keys=True)`` the keys are stored before
RoPE, as KVQuant stores them (their channels keep one range across positions), and the op rotates each slot by its
cached position when it reads; the key formula then takes the range of the stored key and the attention of the
rotated one. The ranges and LUTs are fitted on calibration keys with their Fisher information. Value tiers may
use calibrated tensors too (nuq per token with a Fisher-weighted LUT per layer, KVQuant's value format).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from kvpass.errors import KVPassError
from kvpass.formats import QuantSpec, quantize
from kvpass.formats.api import QuantizedTensor, dequantize
from kvpass.kvcache import CacheLayout, CacheSpec, cache_names, parse_cache_spec, static_names
from kvpass.ops import apply_rope, attention_probs, attention_scores, masked_softmax, visible_length

MAP_DTYPE = torch.uint8  # tier of each slot (0 = not decided yet) in 4 bits, two slots a byte
MAX_TIERS = 15
# a window's token in int8 is a row of its codes then the two bytes of its fp16 absmax scale
WINDOW_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
RING_SCALE_BYTES = 2


@dataclass(frozen=True)
class QAQConfig:
    """QAQ's knob and tiers. ``target_bits`` (average stored bits per element of keys and values, metadata and
    the tier map included) is solved for ``eps`` by bisection on calibration data; or give ``eps`` itself."""

    target_bits: float | None = None
    eps: float | None = None
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
    # of an fp16 one); "int8": in int8 with an fp16 absmax scale per token (8.25 bits an element at head_dim 64; on
    # SmolLM2 it errs 1.0% of a key vector and 0.7% of a value vector, fp8 2.6%); the tokens then decided into the top
    # tier carry that rounding too. None: the top tier's precision
    window_dtype: str | None = None

    def __post_init__(self) -> None:
        if (self.target_bits is None) == (self.eps is None):
            raise KVPassError("QAQConfig takes exactly one knob: target_bits=... or eps=...")
        if self.eps is not None and not self.eps > 0:
            raise KVPassError(f"QAQ eps must be > 0, got {self.eps}")
        if self.window < 1:
            raise KVPassError(f"QAQ window must be >= 1 step, got {self.window}")
        if self.sink < 0:
            raise KVPassError(f"QAQ sink must be >= 0 tokens, got {self.sink}")
        if self.target_context is not None and (self.target_bits is None or self.target_context < 1):
            raise KVPassError(f"QAQ target_context={self.target_context} needs target_bits and a length >= 1 token")
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


# --- the bit formulas ---------------------------------------------------------------------------------------


def quantile_norm(stats: torch.Tensor, quantile: float) -> torch.Tensor:
    """The ``quantile`` of a log-normal fitted to query norms from ``stats[..., (count, sum, sum of squares)]``
    of ``log |q|``."""
    n = stats[..., 0].clamp_min(1)
    mean = stats[..., 1] / n
    var = (stats[..., 2] / n - mean**2).clamp_min(0)
    return torch.exp(mean + NormalDist().inv_cdf(quantile) * var.sqrt())


def value_numerator(alpha: torch.Tensor, value_range: torch.Tensor) -> torch.Tensor:
    """``a`` of ``B_v = ceil(log2(1 + a / eps))``."""
    return alpha * value_range


def key_numerator(alpha: torch.Tensor, key_range: torch.Tensor, q_norm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``a`` of ``B_k = ceil(log2(1 + a / eps))``."""
    a = alpha.clamp(0, 0.5)  # the monotone envelope of a (1 - a): see the module docstring
    return a * (1 - a) * q_norm * key_range / math.sqrt(head_dim)


def bits_for(numerator: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ceil(torch.log2(1 + numerator / eps))


def value_bits(alpha: torch.Tensor, value_range: torch.Tensor, eps: float) -> torch.Tensor:
    return bits_for(value_numerator(alpha, value_range), eps)


def key_bits(alpha: torch.Tensor, key_range: torch.Tensor, q_norm: torch.Tensor, head_dim: int, eps: float) -> torch.Tensor:
    return bits_for(key_numerator(alpha, key_range, q_norm, head_dim), eps)


def to_tier(bits: torch.Tensor, tiers: tuple[int, ...]) -> torch.Tensor:
    """Index of the smallest tier with at least ``bits`` (the largest tier when none has)."""
    edges = torch.tensor(tiers, dtype=bits.dtype, device=bits.device)
    return torch.bucketize(bits, edges).clamp_max(len(tiers) - 1)


def token_range(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x.amax(-1) - x.amin(-1)


# --- storage --------------------------------------------------------------------------------------------------


def split_buffers(bufs: list[torch.Tensor], specs: list[CacheSpec]) -> list[dict[str, torch.Tensor]]:
    """Each tier's per-token buffers, then its calibrated tensors, by name."""
    out, i = [], 0
    for cs in specs:
        names = cache_names(cs) + static_names(cs)
        out.append(dict(zip(names, bufs[i:i + len(names)])))
        i += len(names)
    return out


def read(bufs: list[dict[str, torch.Tensor]], specs: list[CacheSpec], tier_map: torch.Tensor, n: int,
         head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[B, H, n, D]`` of the decided slots (zeros elsewhere): each tier dequantized and gathered to the
    slots the map gives it, entry ``i`` of a tier being its ``i``-th slot in order."""
    b, h = tier_map.shape[:2]
    dense = torch.zeros(b, h, n, head_dim, dtype=dtype, device=tier_map.device)
    for t, (tensors, cs) in enumerate(zip(bufs, specs)):
        sel = tier_map[..., :n] == t + 1
        used = int(sel.sum(-1).max())  # entries are filled in slot order: only the first ones are read
        if used == 0:
            continue
        part = {name: tensors[name][:, :, :used] for name in cache_names(cs)} | \
            {name: tensors[name] for name in static_names(cs)}
        rows = dequantize(QuantizedTensor(cs.format, torch.Size((b, h, used, head_dim)), dtype, part))
        entry = (sel.long().cumsum(-1) - 1).clamp(0, used - 1)
        picked = rows.gather(2, entry[..., None].expand(b, h, n, head_dim))
        dense = torch.where(sel[..., None], picked, dense)
    return dense


def assign(tier_map: torch.Tensor, start: int, wanted: torch.Tensor, capacity: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tier and entry ``[B, H, T]`` of ``T`` tokens written from slot ``start`` on, each wanting tier ``wanted``:
    its own when it has room, else the nearest lower tier with room, else the nearest higher one."""
    ntiers = len(capacity)
    levels = torch.arange(1, ntiers + 1, device=tier_map.device, dtype=tier_map.dtype)
    fill = (tier_map[..., :start, None] == levels).sum(2)  # [B, H, tiers]
    cap = torch.tensor(capacity, device=fill.device)
    idx = torch.arange(ntiers, device=fill.device)
    # every token up to the first that finds its tier full (in any row) gets the tier it wants, at the entry after
    # the earlier ones there: those in one go, the rest one by one
    counts = torch.nn.functional.one_hot(wanted.long(), ntiers).cumsum(2) + fill[..., None, :]  # [B, H, T, tiers]
    used = counts.gather(-1, wanted.long()[..., None])[..., 0]  # entries of its tier taken once it is written
    over = (used > cap[wanted.long()]).flatten(0, 1).any(0)
    j0 = int(over.nonzero()[0]) if bool(over.any()) else wanted.shape[-1]
    tiers, entries = [wanted[..., :j0].long()], [used[..., :j0] - 1]
    if j0:
        fill = counts[..., j0 - 1, :].clone()
    for j in range(j0, wanted.shape[-1]):
        d = wanted[..., j:j + 1]
        cost = torch.where(idx <= d, d - idx, ntiers + idx - d).float()
        cost = cost.masked_fill(fill >= cap, float("inf"))
        if bool(cost.isinf().all(-1).any()):
            raise KVPassError(f"no tier has room for token {start + j} (capacities {capacity}); the capacities must "
                              "sum to the cache length")
        t = cost.argmin(-1, keepdim=True)
        tiers.append(t)
        entries.append(fill.gather(-1, t))
        fill.scatter_add_(-1, t, torch.ones_like(t))
    return torch.cat(tiers, -1), torch.cat(entries, -1)


def write(bufs: list[dict[str, torch.Tensor]], specs: list[CacheSpec], x: torch.Tensor, tiers: torch.Tensor,
          entries: torch.Tensor) -> None:
    """Quantize tokens ``x`` ``[B, H, T, D]`` with the tier each was given and put them at their entries. A tier
    with calibrated per-head tensors codes one head at a time."""
    for t, (tensors, cs) in enumerate(zip(bufs, specs)):
        statics = static_names(cs)
        per_head = any(tensors[n].ndim >= 4 for n in statics)  # a per-layer LUT codes every head at once
        for head in range(x.shape[1]) if per_head else [None]:
            chosen = tiers == t
            if head is not None:
                chosen = chosen & (torch.arange(x.shape[1], device=x.device)[:, None] == head)
            b, h, j = chosen.nonzero(as_tuple=True)
            if not len(b):
                continue
            params = {n: tensors[n][:, head:head + 1] if tensors[n].ndim >= 4 else tensors[n] for n in statics}
            coded = quantize(x[b, h, j][None, None], cs.format, check=False, **params).tensors
            for name in cache_names(cs):
                buf = tensors[name]
                buf[b, h, entries[b, h, j]] = coded[name][0, 0].to(buf.dtype)


def promote(tier_map: torch.Tensor, x: torch.Tensor, wanted: torch.Tensor, capacity: list[int],
            bufs: list[dict[str, torch.Tensor]], specs: list[CacheSpec]) -> int:
    """Move the decided slots ``[0, n)`` (``x`` ``[B, H, n, D]``, their model-precision copies) whose tier is below
    ``wanted`` ``[B, H, n]`` up to the highest tier at or below it with room, in slot order, and re-code them.
    Entries follow slot order, so every later slot of a row from its first move on is re-coded at its new entry.
    Returns how many slots moved."""
    n = x.shape[2]
    cur = tier_map[..., :n].long() - 1
    up = wanted > cur
    if not bool(up.any()):
        return 0
    ntiers = len(capacity)
    levels = torch.arange(ntiers, device=x.device)
    fill = (cur[..., None] == levels).sum(2)  # [B, H, tiers]
    cap = torch.tensor(capacity, device=x.device)
    new = cur.clone()
    for j in up.any(1).any(0).nonzero().flatten().tolist():
        c, w = cur[..., j, None], wanted[..., j, None]
        ok = (levels > c) & (levels <= w) & (fill < cap) & up[..., j, None]
        t = torch.where(ok, levels, -1).amax(-1, keepdim=True)
        moved = (t >= 0).long()
        fill.scatter_add_(-1, c, -moved)
        fill.scatter_add_(-1, t.clamp_min(0), moved)
        new[..., j] = torch.where(moved[..., 0].bool(), t[..., 0], c[..., 0])
    changed = new != cur
    if not bool(changed.any()):
        return 0
    slots = torch.arange(n, device=x.device)
    first = torch.where(changed, slots, n).amin(-1, keepdim=True)
    entries = torch.nn.functional.one_hot(new, ntiers).cumsum(2).gather(-1, new[..., None])[..., 0] - 1
    write(bufs, specs, x, torch.where(slots >= first, new, -1), entries)
    tier_map[..., :n] = (new + 1).to(tier_map.dtype)
    return int(changed.sum())


@dataclass(frozen=True)
class TierLayout:
    """The QAQ buffers of one K or V cache ``[batch, heads, max_len, head_dim]``."""

    config: QAQConfig
    capacity: tuple[int, ...]
    batch: int
    heads: int
    max_len: int
    head_dim: int
    dtype: torch.dtype
    holds_score: bool = True  # the window's attention is one per token: kept with the keys only
    keys: bool = True  # the key tiers (QAQConfig.key_tiers) or the value tiers

    @property
    def specs(self) -> list[CacheSpec]:
        return [parse_cache_spec(t) for t in self.config.tiers_for("k" if self.keys else "v")]

    def static_buffers(self) -> list[str]:
        """Names of the calibrated tensors among :meth:`allocate`'s buffers."""
        return [f"t{t}_{name}" for t, cs in enumerate(self.specs) for name in static_names(cs)]

    def tiers(self) -> list[CacheLayout]:
        return [CacheLayout(cs, self.batch, self.heads, c, self.head_dim, self.dtype)
                for cs, c in zip(self.specs, self.capacity)]

    def allocate(self, device) -> dict[str, torch.Tensor]:
        """Every buffer by name: the tier stores (per-token buffers, then calibrated tensors with placeholder
        values; empty in a tier of capacity 0), the tier map, the window ring and its attention."""
        b, h, r = self.batch, self.heads, self.config.ring
        out = {}
        for t, layout in enumerate(self.tiers()):
            for name, (shape, dtype) in layout.buffer_specs().items():
                out[f"t{t}_{name}"] = torch.zeros(shape, dtype=dtype, device=device)
            static = layout.default_static()
            for name in static_names(layout.spec):  # a tier without entries is never coded: no calibrated tensors
                out[f"t{t}_{name}"] = static[name].to(device) if layout.max_len else static[name].new_zeros(0, device=device)
        out["map"] = torch.zeros(b, h, (self.max_len + 1) // 2, dtype=MAP_DTYPE, device=device)
        ring_dtype = self.config.ring_dtype(self.dtype, "k" if self.keys else "v")
        out["ring"] = torch.zeros(b, h, r, self.config.ring_row(self.head_dim), dtype=ring_dtype, device=device)
        if self.config.retain:
            out["retained"] = torch.zeros(b, h, self.max_len, self.head_dim, dtype=self.dtype, device=device)
        if self.holds_score:
            out["ring_score"] = torch.zeros(b, h, r, device=device)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.allocate("meta").values())

    def describe(self) -> str:
        bits = "/".join(str(b) for b in self.config.tier_bits)
        return f"qaq {bits} bits ({', '.join(str(s) for s in self.specs)}), entries {'/'.join(str(c) for c in self.capacity)}"


def qnorm_stats_nbytes(batch: int, heads: int) -> int:
    return batch * heads * 3 * 4


# --- the op ---------------------------------------------------------------------------------------------------


def _tier_specs(text: str) -> list[CacheSpec]:
    return [parse_cache_spec(t) for t in text.split(";")]


def _window_max(probs: torch.Tensor, q_pos: torch.Tensor, cols: torch.Tensor, window: int, kv_heads: int) -> torch.Tensor:
    """Largest attention each of the tokens at ``cols`` received from queries at most ``window - 1`` steps later,
    over the heads of its GQA group: ``[B, Hkv, len(cols)]``. Queries and columns are consecutive positions, so the
    queries ``age`` steps after their tokens lie on one diagonal of ``probs`` (a view): one diagonal per age, not
    a copy of every query's row."""
    b, hq = probs.shape[:2]
    p0, c0 = int(q_pos[0]), int(cols[0])
    out = probs.new_zeros(b, hq, len(cols))
    for age in range(window):
        diag = torch.diagonal(probs, p0 - age, -2, -1)  # query i against slot p0 + i - age
        # where the diagonal's first slot sits among the columns (>= 0: they start window - 1 before p0)
        first = max(p0 - age, 0) - c0
        seg = out[..., first:first + diag.shape[-1]]
        torch.maximum(seg, diag, out=seg)
    return out.reshape(b, kv_heads, hq // kv_heads, -1).amax(2)


@torch.library.custom_op("kvpass::kv_qaq_attention_", mutates_args=("k_bufs", "v_bufs", "state"))
def kv_qaq_attention_(
    q: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    positions: torch.Tensor,
    k_bufs: list[torch.Tensor],
    v_bufs: list[torch.Tensor],
    state: list[torch.Tensor],
    tiers: str,
    key_tiers: str,
    k_capacity: list[int],
    v_capacity: list[int],
    eps: float,
    window: int,
    quantile: float,
    sink: int,
    max_len: int,
    mask: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    scale: float,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    rope: str = "",
    rotary_dim: int = 0,
) -> torch.Tensor:
    """Write new K/V ``[B, Hkv, T, D]`` at ``positions``, attend ``q`` over the cache, then code the tokens that
    left the window into their tiers. ``state`` is ``[k_map, v_map, k_ring, v_ring, ring_score, q_stats]`` (the maps packed), then
    ``k_retained, v_retained`` when the method retains model-precision copies (decided tokens may then move up a
    tier); ``tiers`` and ``key_tiers`` are the value and key tier specs joined by ``;``. When ``rope`` names the
    variant, ``new_k`` is before its rotary embedding, keys are stored (and ranked by range) that way and rotated
    by the cached ``rope_cos``/``rope_sin`` ``[B or 1, 1, max_len, rotary_dim]`` of their slots at read time."""
    k_packed, v_packed, k_ring, v_ring, ring_score, q_stats, *retained = state
    k_map, v_map = unpack_map(k_packed), unpack_map(v_packed)
    kspecs, vspecs = _tier_specs(key_tiers), _tier_specs(tiers)
    kb, vb = split_buffers(k_bufs, kspecs), split_buffers(v_bufs, vspecs)
    b, hkv, t, dk = new_k.shape
    dv, r = new_v.shape[-1], window - 1
    p0, last = int(positions[0]), int(positions[-1])
    if positions.tolist() != list(range(p0, last + 1)):
        raise KVPassError(f"QAQ writes tokens in order; got positions {positions.tolist()[:8]}...")
    if p0 == 0:  # a new sequence
        q_stats.zero_()
    k_map[..., p0:] = 0
    v_map[..., p0:] = 0
    logn = q.float().norm(dim=-1).clamp_min(1e-6).log().reshape(b, hkv, -1)
    q_stats += torch.stack([torch.full_like(logn[..., 0], logn.shape[-1]), logn.sum(-1), logn.pow(2).sum(-1)], -1)

    if retained:
        retained[0][:, :, positions] = new_k.to(retained[0].dtype)
        retained[1][:, :, positions] = new_v.to(retained[1].dtype)
    ring_pos = torch.arange(max(0, p0 - r), p0, device=positions.device)
    pend_pos = torch.cat([ring_pos, positions])
    # the chunk's tokens as the ring will hold them, so that a prompt reads its window as decoding does
    k_rows = torch.cat([k_ring[:, :, ring_pos % max(r, 1)], to_ring(new_k, k_ring.dtype)], 2)
    v_rows = torch.cat([v_ring[:, :, ring_pos % max(r, 1)], to_ring(new_v, v_ring.dtype)], 2)
    pend_k, pend_v = from_ring(k_rows, new_k.dtype), from_ring(v_rows, new_v.dtype)
    score = torch.cat([ring_score[..., ring_pos % max(r, 1)], ring_score.new_zeros(b, hkv, t)], -1)

    n = visible_length(mask, q_positions, max_len)

    def rotated(keys: torch.Tensor) -> torch.Tensor:  # [B, H, n, D] as attention reads them
        return keys if not rope else apply_rope(keys, rope_cos[:, :, :n], rope_sin[:, :, :n], rope, rotary_dim)

    k = read(kb, kspecs, k_map, n, dk, q.dtype)
    v = read(vb, vspecs, v_map, n, dv, q.dtype)
    k[:, :, pend_pos] = pend_k.to(q.dtype)
    v[:, :, pend_pos] = pend_v.to(q.dtype)
    k = rotated(k)

    # the window's attention (what decides tiers) sees every pending token at model precision
    exact_scores = attention_scores(q, k, scale)
    probs = masked_softmax(exact_scores, None if mask is None else mask[..., :n], q_positions)
    score = torch.maximum(score, _window_max(probs, positions, pend_pos, window, hkv))

    done = pend_pos <= last - r  # seen by the whole window
    qn = quantile_norm(q_stats, quantile)[..., None]
    tier_bits_ = tuple(tier_bits(cs.format) for cs in vspecs)  # the key tiers have the same bits
    decided = max(0, p0 - r)
    if retained and decided:
        # tokens already in tiers whose attention now asks for more bits move up, re-coded from their copies
        now = probs[..., :decided].reshape(b, hkv, -1, decided).amax(2)
        k_keep, v_keep = (x[:, :, :decided] for x in retained)
        promote(k_map, k_keep, to_tier(key_bits(now, token_range(k_keep), qn, dk, eps), tier_bits_), k_capacity,
                kb, kspecs)
        promote(v_map, v_keep, to_tier(value_bits(now, token_range(v_keep), eps), tier_bits_), v_capacity, vb, vspecs)
    if bool(done.any()):
        start = int(pend_pos[done][0])
        alpha = score[..., done]
        bits = (key_bits(alpha, token_range(pend_k[:, :, done]), qn, dk, eps),
                value_bits(alpha, token_range(pend_v[:, :, done]), eps))
        for x, bits_, bufs, specs, cap, tmap in ((pend_k, bits[0], kb, kspecs, k_capacity, k_map),
                                                  (pend_v, bits[1], vb, vspecs, v_capacity, v_map)):
            wanted = to_tier(bits_, tier_bits_)
            wanted[..., pend_pos[done] < sink] = len(tier_bits_) - 1  # the sink: the highest tier
            tier, entry = assign(tmap, start, wanted, cap)
            write(bufs, specs, x[:, :, done], tier, entry)
            tmap[..., start:start + tier.shape[-1]] = (tier + 1).to(tmap.dtype)
    if t > 1 and bool(done.any()):
        # a prompt chunk: each query reads the tokens that left its own window as they are now stored, as it
        # would have when decoding, not the model-precision copies the chunk still holds
        stored_k, stored_v = read(kb, kspecs, k_map, n, dk, q.dtype), read(vb, vspecs, v_map, n, dv, q.dtype)
        stored_k[:, :, pend_pos[~done]] = pend_k[:, :, ~done].to(q.dtype)
        stored_v[:, :, pend_pos[~done]] = pend_v[:, :, ~done].to(q.dtype)
        recent = torch.arange(n, device=q.device) >= (positions[:, None] - r)  # [T, n]: still in its window
        out = _attend_mixed(q, exact_scores, v, (rotated(stored_k), stored_v), recent,
                            None if mask is None else mask[..., :n], q_positions, scale)
    else:  # decoding: the pending tokens are exactly the query's window
        out = (probs @ v.float().repeat_interleave(q.shape[1] // hkv, 1)).to(q.dtype)
    if r:
        keep = ~done
        ring_slots = pend_pos[keep] % r
        k_ring[:, :, ring_slots] = k_rows[:, :, keep]
        v_ring[:, :, ring_slots] = v_rows[:, :, keep]
        ring_score[..., ring_slots] = score[..., keep]
    k_packed.copy_(pack_map(k_map))
    v_packed.copy_(pack_map(v_map))
    return out.contiguous()


def _attend_mixed(q: torch.Tensor, exact_scores: torch.Tensor, exact_v: torch.Tensor,
                  stored: tuple[torch.Tensor, torch.Tensor], recent: torch.Tensor, mask: torch.Tensor | None,
                  q_positions: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention ``[B, Hq, T, Dv]`` where query ``i`` reads slot ``s`` exact if ``recent[i, s]`` (its scaled fp32
    scores ``exact_scores`` ``[B, Hq, T, n]``, values ``exact_v``) and as ``stored`` otherwise (keys and values
    ``[B, Hkv, n, D]``)."""
    groups = q.shape[1] // exact_v.shape[1]
    v_s, v_e = (x.float().repeat_interleave(groups, 1) for x in (stored[1], exact_v))
    scores = torch.where(recent, exact_scores, attention_scores(q, stored[0], scale))
    probs = masked_softmax(scores, mask, q_positions)
    # the values differ only where a query reads them exact
    return (probs @ v_s + (probs * recent) @ (v_e - v_s)).to(q.dtype)


@kv_qaq_attention_.register_fake
def _(q, new_k, new_v, positions, k_bufs, v_bufs, state, tiers, key_tiers, k_capacity, v_capacity, eps, window, quantile, sink,
      max_len, mask, q_positions, scale, rope_cos=None, rope_sin=None, rope="", rotary_dim=0):
    b, hq, t, _ = q.shape
    return q.new_empty((b, hq, t, new_v.shape[-1]))


# --- calibration ----------------------------------------------------------------------------------------------


def sensitivities(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: QAQConfig,
                  stored_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For one sequence of one layer (``q`` ``[Hq, T, D]``, ``k``/``v`` ``[Hkv, T, D]``, after RoPE): the
    numerators ``a`` of the key and value formulas (``bits = ceil(log2(1 + a / eps))``) of every token ``[Hkv, T]``,
    as the op computes them when the token leaves the window. ``stored_k``: the keys as stored (before RoPE), whose
    ranges the key formula takes; ``k`` by default."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    groups = hq // hkv
    probs = attention_probs(q, k, None, torch.arange(t), scale)  # [Hq, T, T]
    alpha = torch.zeros(hq, t)
    for o in range(config.window):  # query i + o attending token i
        diag = torch.diagonal(probs, offset=-o, dim1=-2, dim2=-1)  # [Hq, T - o]
        alpha[:, :t - o] = torch.maximum(alpha[:, :t - o], diag)
    alpha = alpha.reshape(hkv, groups, t).amax(1)
    logn = q.float().norm(dim=-1).clamp_min(1e-6).log().reshape(hkv, groups, t)
    # the query statistics the op holds when token i is decided: queries up to i + window - 1
    cum = lambda x: x.sum(1).cumsum(-1)
    stats = torch.stack([cum(torch.ones_like(logn)), cum(logn), cum(logn**2)], -1)  # [Hkv, T, 3]
    at = torch.clamp(torch.arange(t) + config.window - 1, max=t - 1)
    qn = quantile_norm(stats[:, at], config.quantile)
    stored_k = k if stored_k is None else stored_k
    return key_numerator(alpha, token_range(stored_k), qn, d), value_numerator(alpha, token_range(v))


def tier_of(num: torch.Tensor, eps: float, tiers: tuple[int, ...]) -> torch.Tensor:
    return to_tier(bits_for(num, eps), tiers)


def solve(num_k: list[torch.Tensor], num_v: list[torch.Tensor], config: QAQConfig, dk: int, dv: int,
          dtype: torch.dtype = torch.float16, shared_bits: float = 0.0) -> float:
    """The ``eps`` at which the calibration tokens average ``config.target_bits`` per element (bisection on log
    eps; the average falls as eps grows); with ``target_context`` the fixed bytes of a head's cache (at the model's
    ``dtype``) are taken off the target first. ``shared_bits``: bits per element of what the cache holds once for
    every layer (the position id of each slot when keys are stored before RoPE), also taken off."""
    ck, cv = tier_cost(config, dk, which="k"), tier_cost(config, dv, which="v")
    nk, nv = torch.cat([x.reshape(-1) for x in num_k]), torch.cat([x.reshape(-1) for x in num_v])
    bits = config.tier_bits

    def average(eps: float) -> float:
        return float((ck[tier_of(nk, eps, bits)].mean() * dk + cv[tier_of(nv, eps, bits)].mean() * dv) / (dk + dv))

    target = config.target_bits - shared_bits - (map_bits(dk) * dk + map_bits(dv) * dv) / (dk + dv)
    if config.target_context:
        fixed = fixed_nbytes(config, dk, "k", dtype) + fixed_nbytes(config, dv, "v", dtype)
        target -= 8.0 * fixed / (config.target_context * (dk + dv))
    lowest, highest = average(1e30), average(1e-30)
    if not lowest <= target <= highest:
        raise KVPassError(
            f"QAQ target_bits={config.target_bits} is outside what these tiers can average: "
            f"{lowest + config.target_bits - target:.2f} to {highest + config.target_bits - target:.2f} bits per element "
            f"(tier map included{', window and calibrated tensors at target_context' if config.target_context else ''}"
            "); choose a target in that range or other tiers")
    lo, hi = -30.0, 30.0  # log10 eps
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if average(10**mid) < target else (mid, hi)
    return 10**hi


def shares(num: torch.Tensor, eps: float, tiers: tuple[int, ...]) -> torch.Tensor:
    """Fraction of tokens in each tier at ``eps``."""
    counts = torch.bincount(tier_of(num.reshape(-1), eps, tiers), minlength=len(tiers)).float()
    return counts / counts.sum()


__all__ = ["QAQConfig", "TierLayout", "key_bits", "kv_qaq_attention_", "sensitivities", "solve", "value_bits"]
