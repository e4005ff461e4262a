"""Caches filled with random tokens, RoPE tables and masks for the kernel tests (native CPU and Triton)."""

from __future__ import annotations

import torch

from kvpass import kvcache
from kvpass.kvcache import CacheLayout
from kvpass.ops.recent import ring_of, write_ring


def filled(spec: str, b: int, h: int, s: int, d: int, n: int, gen: torch.Generator):
    """A cache of ``spec`` holding ``n`` random tokens (calibrated ranges drawn at random for static specs)."""
    layout = CacheLayout.build(spec, (b, h, s, d), torch.float32)
    static = {}
    if layout.format.static:
        lo = -(torch.rand(1, h, 1, d, generator=gen) + 0.5)
        static = {"lo": lo.to(layout.format.scale_dtype), "hi": (torch.rand(1, h, 1, d, generator=gen) + 0.5).to(layout.format.scale_dtype)}
    cache, stat = layout.allocate(static=static)
    if n:
        x = torch.randn(b, h, n, d, generator=gen) * 1.5
        kvcache.store(cache, stat, x, torch.arange(n), layout.spec)
        if layout.spec.recent:  # the window op keeps the newest tokens in the ring as well
            write_ring(ring_of(cache, layout.spec), x, torch.arange(n))
    return cache, stat


def rope_tables(b: int, s: int, rd: int, gen: torch.Generator):
    theta = torch.rand(b, 1, s, rd, generator=gen) * 6.0
    return theta.cos(), theta.sin()


def make_mask(kind: str, b: int, t: int, s: int, n: int, gen: torch.Generator):
    """(mask, q_positions) of one of the kinds the pass emits; "bool" and "float" leave one padding row."""
    q_positions = torch.arange(max(n - t, 0), max(n - t, 0) + t)
    if kind == "causal":
        return None, q_positions
    if kind == "none":
        return None, None
    allowed = torch.rand(b, 1, t, s, generator=gen) < 0.7
    allowed[..., n:] = False
    allowed[0, 0, 0] = False  # a padding query: it sees nothing
    if kind == "bool":
        return allowed, q_positions
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min), q_positions
