"""The overlay's handler: the low-precision caches of the spec methods (none when the overlay evicts), the
overlay's buffers and store, and attention over both (``kv_overlay_attention_``)."""

from __future__ import annotations

import torch
from torch.fx import Node

from kvpass.errors import KVPassError
from kvpass.kvcache import parse_cache_spec
from kvpass.methods.base import MethodConfig
from kvpass.methods.overlay.config import OverlayConfig, overlay_nbytes
from kvpass.methods.overlay.op import OverlayMeta
from kvpass.methods.specs import SpecHandler
from kvpass.pipeline.buffers import Role
from kvpass.pipeline.handler import LayerPlan, RewriteContext, register_handler
from kvpass.pipeline.locate import AttentionSite
from kvpass.pipeline.plan import KVLayout
from kvpass.pipeline.rewrite import get_attrs


class OverlayHandler(SpecHandler):
    """MiKV, H2O and StreamingLLM (``MethodConfig(overlay=OverlayConfig(...))``)."""

    def validate(self, method: MethodConfig) -> None:
        if any(parse_cache_spec(s).recent for s in (method.key, method.value)):
            raise KVPassError(f"method {method.name!r}: a recent=W window is read by kv_recent_attention_, which an "
                              "overlay does not use; give the overlay its `recent` tokens instead")

    def nominal_bits(self, method: MethodConfig, head_dim: int, tokens: int) -> float:
        total = 0 if method.overlay.evict else self.low_nbytes(method, head_dim, tokens)
        total += overlay_nbytes(method.overlay, 1, 1, tokens, head_dim, head_dim, torch.float16)
        return 8.0 * total / (2 * tokens * head_dim)

    def plan(self, method: MethodConfig, site: AttentionSite, calibration: dict | None) -> LayerPlan:
        low = LayerPlan(None, None) if method.overlay.evict else super().plan(method, site, calibration)
        extra = overlay_nbytes(method.overlay, site.batch, site.kv_heads, site.max_len, site.head_dim, site.v_head_dim,
                               site.dtype)
        return LayerPlan(low.key, low.value, extra)

    def emit(self, ctx: RewriteContext, site: AttentionSite, layout: KVLayout, buffers: tuple,
             tables: tuple | None) -> Node:
        if layout.key is not None:
            self.store(ctx, site, layout, buffers)
        return overlay_attention_node(ctx, site, *buffers, layout, ctx.method.overlay)

    def describe(self, layout: KVLayout) -> tuple[str, str]:
        kspec, vspec = super().describe(layout)
        return kspec + " + overlay", vspec + " + overlay"


def overlay_attention_node(ctx: RewriteContext, site: AttentionSite, k: tuple, v: tuple, layout: KVLayout,
                           overlay: OverlayConfig) -> Node:
    """The overlay's buffers, its store of the new tokens, and attention over low precision + overlay."""
    gm = ctx.gm
    g, prefix = gm.graph, f"kvpass_cache_{site.index}_overlay"
    c, shape = overlay.capacity(site.max_len), (site.batch, site.kv_heads)
    dtype = overlay.dtype(site.dtype)
    buffers = {"k": torch.zeros(*shape, c, site.head_dim, dtype=dtype), "v": torch.zeros(*shape, c, site.v_head_dim, dtype=dtype),
               "slot": torch.zeros(*shape, c, dtype=torch.int32), "score": torch.zeros(*shape, site.max_len)}
    # the store logs the rows it overwrites; the slots and scores (small, the scores all updated each step) are cloned
    ov = {name: g.get_attr(ctx.buffers.add(f"{prefix}_{name}", t.to(ctx.device), site.index,
                                           Role.JOURNALED if name in ("k", "v") else Role.ENTRY))
          for name, t in buffers.items()}
    g.call_function(torch.ops.kvpass.kv_overlay_store_.default,
                    (ov["k"], ov["v"], ov["slot"], ov["score"], site.key.new, site.value.new, site.key.positions,
                     overlay.recent_tokens(site.max_len), overlay.sink, overlay.by_score))
    kspec = "" if layout.key is None else str(layout.key.spec)
    vspec = "" if layout.value is None else str(layout.value.spec)
    q_positions = site.key.positions if site.is_causal and site.mask is None else None
    return g.call_function(
        torch.ops.kvpass.kv_overlay_attention_.default,
        (site.query, get_attrs(gm, k[0]), get_attrs(gm, k[1]), get_attrs(gm, v[0]), get_attrs(gm, v[1]), site.mask,
         q_positions, ov["k"], ov["v"], ov["slot"], ov["score"],
         str(OverlayMeta(kspec, vspec, site.max_len, float(site.scale), overlay.evict, overlay.by_score))),
    )


register_handler(OverlayConfig, OverlayHandler())
