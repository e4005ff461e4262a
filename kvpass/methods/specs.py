"""The handler of methods with one key and one value cache spec per layer (the baselines, KIVI, KVQuant and any
``MethodConfig`` without a family config): each cache written by ``kv_store_`` and attended by ``kv_attention``,
or written and attended by ``kv_recent_attention_`` when it keeps recent tokens exact; calibration fits each
spec's static tensors and ranks the layers for ``sensitive_layers``."""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from kvpass.calibration.layers import layer_losses, most_sensitive, scoring
from kvpass.calibration.statics import fit_recorded
from kvpass.calibration.store import Calibration
from kvpass.errors import KVPassError
from kvpass.kvcache import CacheLayout, needs_calibration, parse_cache_spec, static_names
from kvpass.methods.base import MethodConfig
from kvpass.ops.recent import reads_exact
from kvpass.pipeline.handler import FitData, LayerPlan, MethodHandler, RewriteContext, register_handler
from kvpass.pipeline.locate import AttentionSite
from kvpass.pipeline.plan import KVLayout
from kvpass.pipeline.rewrite import (
    add_buffers,
    aten,
    attention_meta,
    get_attrs,
    positions_node,
    query_dtype,
    replace_write,
    rope_args,
    val_device,
)


class SpecHandler(MethodHandler):
    """One key and one value cache spec per layer (``MethodConfig.key_spec`` / ``value_spec``)."""

    def needs_calibration(self, method: MethodConfig) -> bool:
        return method.sensitive_layers > 0 or any(needs_calibration(parse_cache_spec(s)) for s in (method.key, method.value))

    def uses_calibration(self, method: MethodConfig) -> bool:
        return method.sensitive_layers > 0 or any(static_names(parse_cache_spec(s)) for s in (method.key, method.value))

    def nominal_bits(self, method: MethodConfig, head_dim: int, tokens: int) -> float:
        return 8.0 * self.low_nbytes(method, head_dim, tokens) / (2 * tokens * head_dim)

    @staticmethod
    def low_nbytes(method: MethodConfig, head_dim: int, tokens: int) -> int:
        return sum(CacheLayout.build(s, (1, 1, tokens, head_dim), torch.float16).nbytes
                   for s in (method.key_spec(head_dim), method.value_spec(head_dim)))

    def plan(self, method: MethodConfig, site: AttentionSite, calibration: Calibration | None) -> LayerPlan:
        shape = (site.batch, site.kv_heads, site.max_len)
        # the sensitive layers the calibration chose (a calibration for another method has none: check() tells)
        promoted = calibration.promoted_layers if calibration is not None else ()
        k = CacheLayout.build(method.key_spec(site.head_dim, site.index, promoted), (*shape, site.head_dim), site.dtype)
        v = CacheLayout.build(method.value_spec(site.v_head_dim, site.index, promoted), (*shape, site.v_head_dim),
                              site.dtype)
        return LayerPlan(k, v)

    def add_buffers(self, ctx: RewriteContext, site: AttentionSite, layout: KVLayout) -> tuple:
        """The key and value caches' buffer names, each ``(per-token, static)``."""
        if layout.key is None:
            return ([], []), ([], [])
        return tuple(add_buffers(ctx, site, w, cl, ctx.fitted(site.index, w))
                     for w, cl in (("k", layout.key), ("v", layout.value)))

    @staticmethod
    def store(ctx: RewriteContext, site: AttentionSite, layout: KVLayout, buffers: tuple) -> None:
        """Replace the site's key and value writes by ``kv_store_`` into the packed caches."""
        for access, (cache, static), cl in zip((site.key, site.value), buffers, (layout.key, layout.value)):
            replace_write(ctx.gm, access, cache, static, str(cl.spec))

    def emit(self, ctx: RewriteContext, site: AttentionSite, layout: KVLayout, buffers: tuple,
             tables: tuple | None) -> Node:
        k, v = buffers
        if reads_recent_exact(layout, ctx.attention):  # the op writes the tokens itself
            return recent_attention_node(ctx.gm, site, k, v, layout, tables)
        self.store(ctx, site, layout, buffers)
        return attention_node(ctx.gm, site, k, v, layout, ctx.attention, tables)

    def fit(self, calibration: Calibration, method: MethodConfig, data: FitData) -> None:
        calibration.tensors = fit_recorded(data.acts, data.layers, method, data.seed)
        if method.sensitive_layers:
            promote_sensitive(calibration, method, data)

    def more_bits(self, calibration: Calibration, method: MethodConfig, data: FitData) -> str | None:
        """The most sensitive layer not yet promoted stored as ``sensitive_spec`` (the layers' losses measured first
        where the method did not rank them); None when every quantized layer is."""
        losses = ranked_losses(calibration, method, data)
        left = {layer: loss for layer, loss in losses.items() if layer not in calibration.promoted_layers}
        if not left:
            return None
        (layer,) = most_sensitive(left, 1)
        promote(calibration, method, data, (layer,))
        calibration.meta["guard_promoted"] = calibration.meta.get("guard_promoted", 0) + 1
        return f"layer {layer} in {method.sensitive_spec}"


def reads_recent_exact(layout: KVLayout, mode: str) -> bool:
    """Whether a site's queries read recent tokens exact per query (``kv_recent_attention_``, which also writes the
    new tokens): caches with ``recent=W``, and KIVI's ``residual=R`` in the fused mode (``attention="load"`` reads a
    residual cache as it stands after the whole chunk is stored)."""
    specs = (layout.key.spec, layout.value.spec)
    if any(cs.recent for cs in specs) and mode != "fused":
        raise KVPassError(f"attention={mode!r} reads the coded cache only and would ignore the recent window of "
                          f"'{specs[0]}' / '{specs[1]}'; use attention='fused'")
    return mode == "fused" and any(reads_exact(cs) for cs in specs)


def recent_attention_node(gm: GraphModule, site: AttentionSite, k: tuple, v: tuple, layout: KVLayout,
                          tables: tuple[Node | str, Node | str] | None) -> Node:
    """``kv_recent_attention_``: writes the new tokens and attends, each query reading its own recent tokens exact."""
    q_positions = site.key.positions if site.is_causal and site.mask is None else None
    positions_node(gm, site.key)
    return gm.graph.call_function(
        torch.ops.kvpass.kv_recent_attention_.default,
        (site.query, site.key.new, site.value.new, site.key.positions, get_attrs(gm, k[0]), get_attrs(gm, k[1]),
         get_attrs(gm, v[0]), get_attrs(gm, v[1]), site.mask, q_positions, *rope_args(gm, site, tables),
         str(attention_meta(site, layout, tables))),
    )


def attention_node(gm: GraphModule, site: AttentionSite, k: tuple, v: tuple, layout: KVLayout, mode: str,
                   tables: tuple[Node | str, Node | str] | None) -> Node:
    g = gm.graph
    meta = attention_meta(site, layout, tables)
    # SDPA's is_causal over a whole static cache means "each query sees the slots up to its own position".
    q_positions = site.key.positions if site.is_causal and site.mask is None else None
    rope = rope_args(gm, site, tables)
    if mode == "fused":
        call = g.call_function(
            torch.ops.kvpass.kv_attention.default,
            (site.query, get_attrs(gm, k[0]), get_attrs(gm, k[1]), get_attrs(gm, v[0]), get_attrs(gm, v[1]), site.mask,
             q_positions, *rope, str(meta)),
        )
        return g.call_function(operator.getitem, (call, 0))
    dtype = query_dtype(site)
    kd = g.call_function(torch.ops.kvpass.kv_load.default,
                         (get_attrs(gm, k[0]), get_attrs(gm, k[1]), *rope, dtype, str(meta.key_read)))
    vd = g.call_function(torch.ops.kvpass.kv_load.default,
                         (get_attrs(gm, v[0]), get_attrs(gm, v[1]), None, None, dtype, str(meta.value_read)))
    mask = site.mask
    if mask is None and q_positions is not None:
        arange = g.call_function(aten.arange.default, (site.max_len,), {"device": val_device(site.query)})
        mask = g.call_function(aten.le.Tensor, (g.call_function(aten.unsqueeze.default, (arange, 0)),
                                                g.call_function(aten.unsqueeze.default, (q_positions, 1))))
    return g.call_function(aten.scaled_dot_product_attention.default, (site.query, kd, vd, mask),
                           {"scale": site.scale, "enable_gqa": site.gqa_groups > 1})


def promote_sensitive(calibration: Calibration, method: MethodConfig, data: FitData) -> None:
    """Choose the method's ``sensitive_layers`` by their loss on the calibration samples
    (:mod:`kvpass.calibration.layers`) and refit those layers' static tensors for ``sensitive_spec``; both are
    recorded in ``calibration``."""
    quantized = [layer for layer in data.layers if layer not in method.full_precision_layers]
    if method.sensitive_layers > len(quantized):
        raise KVPassError(f"method {method.name!r} keeps {method.sensitive_layers} sensitive layers in "
                          f"{method.sensitive_spec}, but the model has {len(quantized)} quantized layers; lower "
                          "sensitive_layers")
    promote(calibration, method, data, most_sensitive(ranked_losses(calibration, method, data),
                                                      method.sensitive_layers))


def ranked_losses(calibration: Calibration, method: MethodConfig, data: FitData) -> dict[int, float]:
    """Each quantized layer's loss with it alone coded (:func:`layer_losses`), measured once and kept in
    ``calibration.meta["layer_loss"]``."""
    if "layer_loss" not in calibration.meta:
        quantized = [layer for layer in data.layers if layer not in method.full_precision_layers]
        losses = layer_losses(data.model, data.samples, method, calibration, quantized, scoring(data)[1])
        calibration.meta["layer_loss"] = {str(layer): loss for layer, loss in losses.items()}
    return {int(layer): loss for layer, loss in calibration.meta["layer_loss"].items()}


def promote(calibration: Calibration, method: MethodConfig, data: FitData, layers: tuple[int, ...]) -> None:
    """Store ``layers`` in ``sensitive_spec``: their static tensors refitted for it, and named in
    ``calibration.meta["promoted_layers"]``."""
    calibration.tensors = {k: v for k, v in calibration.tensors.items() if k.layer not in layers}
    calibration.tensors |= fit_recorded(data.acts, list(layers), method, data.seed, promoted=layers)
    calibration.meta["promoted_layers"] = sorted({*calibration.promoted_layers, *layers})


register_handler(type(None), SpecHandler())
