"""QAQ's storage: tokens read from and written into tiers of fixed capacity, and the buffers of one cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpass.errors import KVPassError
from kvpass.formats import quantize
from kvpass.formats.api import QuantizedTensor, dequantize
from kvpass.kvcache import CacheLayout, CacheSpec, cache_names, parse_cache_spec, static_names
from kvpass.methods.qaq.config import MAP_DTYPE, QAQConfig
from kvpass.ops import journal


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
            log, index = journal.active(), (b, h, entries[b, h, j])
            for name in cache_names(cs):
                buf = tensors[name]
                if log is not None:  # a failed step puts the entries back
                    log.save(buf, index)
                buf[index] = coded[name][0, 0].to(buf.dtype)


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
