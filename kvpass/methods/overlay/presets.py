"""The overlay presets."""

from kvpass.methods.base import MethodConfig, register_method
from kvpass.methods.overlay import handler as _handler  # noqa: F401  (registers the overlay handler)
from kvpass.methods.overlay.config import OverlayConfig

# int4 rather than int3 for the low tier: at int3 MiKV only tied H2O at its memory (docs/methods/mikv.md)
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
