"""Rewrite: swap each site's full-precision cache buffers for its layout's packed buffers, every cache write for
``kvpass::kv_store_`` and every read + attention for ``kvpass::kv_attention`` (or, for debugging,
``kvpass::kv_load`` + ``aten.scaled_dot_product_attention``). The old buffers are deleted from the module, so
no full-precision copy of the cache remains."""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from kvpass.errors import KVPassError
from kvpass.kvcache import CacheLayout, cache_names, static_names
from kvpass.methods.overlay import op as _overlay_op  # noqa: F401  (registers the overlay ops and kv_balance_)
from kvpass.methods.overlay.config import OverlayConfig
from kvpass.methods.qaq import op as _qaq_op  # noqa: F401  (registers kv_qaq_attention_)
from kvpass.ops.recent import reads_exact
from kvpass.pipeline.locate import AttentionSite, CacheAccess
from kvpass.pipeline.plan import KVLayout
from kvpass.pipeline.rope import RopeTables

aten = torch.ops.aten
ATTENTION_MODES = ("fused", "load")


def buffer_prefix(site: AttentionSite, which: str) -> str:
    return f"kvpass_cache_{site.index}_{which}"


def add_buffers(gm: GraphModule, prefix: str, layout: CacheLayout, device,
                static_values: dict[str, torch.Tensor] | None = None) -> tuple[list[str], list[str]]:
    cache, static = layout.allocate(device, static_values)
    spec = layout.spec
    cache_targets = [f"{prefix}_{n}" for n in cache_names(spec)]
    static_targets = [f"{prefix}_static_{n}" for n in static_names(spec)]
    for target, tensor in zip(cache_targets + static_targets, cache + static):
        gm.register_buffer(target, tensor)
    return cache_targets, static_targets


def get_attrs(gm: GraphModule, targets: list[str]) -> list[Node]:
    return [gm.graph.get_attr(t) for t in targets]


def positions_node(gm: GraphModule, access: CacheAccess) -> Node:
    """The written positions as a tensor node (a copy_ into ``cache[:, :, start:end]`` gives them as bounds)."""
    if isinstance(access.positions, tuple):
        start, end = access.positions
        access.positions = gm.graph.call_function(aten.arange.start, (start, end), {"device": val_device(access.new)})
    return access.positions


def replace_write(gm: GraphModule, access: CacheAccess, cache: list[str], static: list[str], spec: str) -> None:
    with gm.graph.inserting_before(access.write):
        positions_node(gm, access)
        gm.graph.call_function(
            torch.ops.kvpass.kv_store_.default,
            (get_attrs(gm, cache), get_attrs(gm, static), access.new, access.positions, spec),
        )


def rope_args(gm: GraphModule, site: AttentionSite, tables: tuple[Node | str, Node | str] | None) -> tuple:
    if tables is None:
        return None, None, "", 0
    cos, sin = (t if isinstance(t, Node) else gm.graph.get_attr(t) for t in tables)
    return cos, sin, site.rope.variant, site.rope.rotary_dim


def reads_recent_exact(layout: KVLayout, mode: str) -> bool:
    """Whether a site's queries read recent tokens exact per query (``kv_recent_attention_``, which also writes the
    new tokens): caches with ``recent=W``, and KIVI's ``residual=R`` in the fused mode (``attention="load"`` reads a
    residual cache as it stands after the whole chunk is stored)."""
    if layout.key is None or layout.tiers is not None:
        return False
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
         get_attrs(gm, v[0]), get_attrs(gm, v[1]), str(layout.key.spec), str(layout.value.spec), site.head_dim,
         site.v_head_dim, site.max_len, site.mask, q_positions, site.scale, *rope_args(gm, site, tables)),
    )


def attention_node(gm: GraphModule, site: AttentionSite, k: tuple, v: tuple, layout: KVLayout, mode: str,
                   tables: tuple[Node | str, Node | str] | None) -> Node:
    g = gm.graph
    kspec, vspec = str(layout.key.spec), str(layout.value.spec)
    # SDPA's is_causal over a whole static cache means "each query sees the slots up to its own position".
    q_positions = site.key.positions if site.is_causal and site.mask is None else None
    rope = rope_args(gm, site, tables)
    if mode == "fused":
        call = g.call_function(
            torch.ops.kvpass.kv_attention.default,
            (site.query, get_attrs(gm, k[0]), get_attrs(gm, k[1]), get_attrs(gm, v[0]), get_attrs(gm, v[1]), kspec,
             vspec, site.head_dim, site.v_head_dim, site.max_len, site.mask, q_positions, site.scale, False, *rope),
        )
        return g.call_function(operator.getitem, (call, 0))
    dtype = query_dtype(site)
    kd = g.call_function(torch.ops.kvpass.kv_load.default,
                         (get_attrs(gm, k[0]), get_attrs(gm, k[1]), kspec, site.head_dim, site.max_len, dtype, *rope))
    vd = g.call_function(torch.ops.kvpass.kv_load.default,
                         (get_attrs(gm, v[0]), get_attrs(gm, v[1]), vspec, site.v_head_dim, site.max_len, dtype,
                          None, None, "", 0))
    mask = site.mask
    if mask is None and q_positions is not None:
        arange = g.call_function(aten.arange.default, (site.max_len,), {"device": val_device(site.query)})
        mask = g.call_function(aten.le.Tensor, (g.call_function(aten.unsqueeze.default, (arange, 0)),
                                                g.call_function(aten.unsqueeze.default, (q_positions, 1))))
    return g.call_function(aten.scaled_dot_product_attention.default, (site.query, kd, vd, mask),
                           {"scale": site.scale, "enable_gqa": site.gqa_groups > 1})


def overlay_attention_node(gm: GraphModule, site: AttentionSite, k: tuple, v: tuple, layout: KVLayout,
                           overlay: OverlayConfig, device) -> Node:
    """The overlay's buffers, its store of the new tokens, and attention over low precision + overlay."""
    g, prefix = gm.graph, f"kvpass_cache_{site.index}_overlay"
    c, shape = overlay.capacity(site.max_len), (site.batch, site.kv_heads)
    dtype = overlay.dtype(site.dtype)
    buffers = {"k": torch.zeros(*shape, c, site.head_dim, dtype=dtype), "v": torch.zeros(*shape, c, site.v_head_dim, dtype=dtype),
               "slot": torch.zeros(*shape, c, dtype=torch.int32), "score": torch.zeros(*shape, site.max_len)}
    for name, t in buffers.items():
        gm.register_buffer(f"{prefix}_{name}", t.to(device))
    ov = {name: g.get_attr(f"{prefix}_{name}") for name in buffers}
    g.call_function(torch.ops.kvpass.kv_overlay_store_.default,
                    (ov["k"], ov["v"], ov["slot"], ov["score"], site.key.new, site.value.new, site.key.positions,
                     overlay.recent_tokens(site.max_len), overlay.sink, overlay.by_score))
    kspec = "" if layout.key is None else str(layout.key.spec)
    vspec = "" if layout.value is None else str(layout.value.spec)
    q_positions = site.key.positions if site.is_causal and site.mask is None else None
    return g.call_function(
        torch.ops.kvpass.kv_overlay_attention_.default,
        (site.query, get_attrs(gm, k[0]), get_attrs(gm, k[1]), get_attrs(gm, v[0]), get_attrs(gm, v[1]), kspec, vspec,
         site.max_len, site.mask, q_positions, site.scale, ov["k"], ov["v"], ov["slot"], ov["score"], overlay.evict,
         overlay.by_score),
    )


def qaq_attention_node(gm: GraphModule, site: AttentionSite, layout: KVLayout, calibration: dict, device,
                       tables: tuple[Node | str, Node | str] | None) -> Node:
    """QAQ's buffers (calibrated tier tensors from ``calibration``) and its one op: write the new tokens, attend,
    code the tokens that left the window (keys before RoPE with ``tables``)."""
    g, prefix = gm.graph, f"kvpass_cache_{site.index}_qaq"
    names = {}
    for which, tl in zip("kv", layout.tiers):
        fitted = calibration.get((site.index, which), {})
        for name, t in tl.allocate(device).items():
            if name in tl.static_buffers():
                if t.numel():  # (a tier of capacity 0 holds none)
                    if name not in fitted:
                        raise KVPassError(f"layer {site.index}: QAQ tier tensor {which}.{name} is not in the "
                                          "calibration; calibrate with kvpass.calibrate(model, texts, method=...) for "
                                          "this method")
                    t = fitted[name].to(device=device, dtype=t.dtype).reshape(t.shape)
                # "_static_" in the name keeps KVPassModel.reset() from zeroing calibrated tensors
                target = f"{prefix}_{which}_static_{name}"
            else:
                target = f"{prefix}_{which}_{name}"
            gm.register_buffer(target, t)
            names[f"{which}_{name}"] = target
    gm.register_buffer(f"{prefix}_q_stats", torch.zeros(site.batch, site.kv_heads, 3, device=device))
    k_bufs = [names[n] for n in names if n.startswith("k_t")]
    v_bufs = [names[n] for n in names if n.startswith("v_t")]
    state = [names["k_map"], names["v_map"], names["k_ring"], names["v_ring"], names["k_ring_score"], f"{prefix}_q_stats"]
    if "k_retained" in names:
        state += [names["k_retained"], names["v_retained"]]
    kt, vt = layout.tiers
    positions_node(gm, site.key)
    q_positions = site.key.positions if site.is_causal and site.mask is None else None
    return g.call_function(
        torch.ops.kvpass.kv_qaq_attention_.default,
        (site.query, site.key.new, site.value.new, site.key.positions, get_attrs(gm, k_bufs), get_attrs(gm, v_bufs),
         get_attrs(gm, state), ";".join(vt.config.tiers_for("v")), ";".join(kt.config.tiers_for("k")),
         list(kt.capacity), list(vt.capacity), float(calibration[(site.index, "k")]["eps"]),
         kt.config.window, kt.config.quantile, kt.config.sink, site.max_len, site.mask, q_positions, site.scale,
         *rope_args(gm, site, tables)),
    )


def add_balancer(gm: GraphModule, site: AttentionSite, device) -> None:
    """Insert MiKV's balancer: ``k / s`` is what gets stored, ``q * s`` what attends (``q . k`` unchanged)."""
    g, name = gm.graph, f"kvpass_cache_{site.index}_balance"
    gm.register_buffer(name, torch.ones(site.batch, site.kv_heads, 1, site.head_dim, device=device))
    with g.inserting_before(site.key.write):
        scale = g.get_attr(name)
        g.call_function(torch.ops.kvpass.kv_balance_.default, (scale, site.query, site.key.new, site.key.positions))
        site.key.new = g.call_function(aten.div.Tensor, (site.key.new, scale))
    with g.inserting_before(site.output):
        per_q_head = g.call_function(aten.repeat_interleave.self_int, (g.get_attr(name), site.gqa_groups, 1))
        site.query = g.call_function(aten.mul.Tensor, (site.query, per_q_head))


def val_device(node: Node):
    v = node.meta.get("val")
    return v.device if v is not None else None


def query_dtype(site: AttentionSite) -> torch.dtype:
    v = site.query.meta.get("val")
    return v.dtype if v is not None else site.dtype


def delete_attr(gm: GraphModule, target: str) -> None:
    *path, name = target.split(".")
    owner = gm
    for p in path:
        owner = getattr(owner, p)
    if name in owner._buffers:
        del owner._buffers[name]
    elif hasattr(owner, name):
        delattr(owner, name)


def erase_unused(graph: torch.fx.Graph, nodes: list[Node]) -> None:
    """Erase ``nodes`` once nothing but export's metadata assertions uses them."""
    pending = list(dict.fromkeys(nodes))
    for node in pending:
        for user in list(node.users):
            if user.target == aten._assert_tensor_metadata.default:
                graph.erase_node(user)
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if node.graph is graph and not node.users:
                graph.erase_node(node)
                pending.remove(node)
                changed = True


def rewrite(gm: GraphModule, sites: list[AttentionSite], layouts: list[KVLayout], attention: str = "fused",
            pre_rope_keys: bool = False, calibration: dict | None = None, free_old: bool = False,
            overlay: OverlayConfig | None = None, balance: bool = False) -> GraphModule:
    """Rewrite ``gm`` in place onto packed caches; returns it.

    ``pre_rope_keys`` stores each key before its rotary embedding (where one was recognised) and rotates it back
    at read time. ``calibration`` maps ``(layer, "k" | "v")`` to calibrated static tensors (LUT, ranges, Q-Norm).
    """
    if attention not in ATTENTION_MODES:
        raise KVPassError(f"attention={attention!r} is not a mode; use one of {ATTENTION_MODES}")
    graph = gm.graph
    device = next((b.device for b in gm.buffers()), torch.device("cpu"))
    old_buffers = set()
    rope_tables = RopeTables(gm, device)
    calibration = calibration or {}
    for site, layout in zip(sites, layouts):
        k = v = ([], [])
        if layout.key is not None:
            k = add_buffers(gm, buffer_prefix(site, "k"), layout.key, device, calibration.get((site.index, "k")))
            v = add_buffers(gm, buffer_prefix(site, "v"), layout.value, device, calibration.get((site.index, "v")))
        if balance:
            add_balancer(gm, site, device)
        tables = None
        if pre_rope_keys and site.rope is not None:
            tables = rope_tables.get(site, layout.key)
            site.key.new = site.rope.pre
        windowed = overlay is None and reads_recent_exact(layout, attention)  # the op writes the tokens itself
        if layout.key is not None and not windowed:
            replace_write(gm, site.key, *k, str(layout.key.spec))
            replace_write(gm, site.value, *v, str(layout.value.spec))
        with graph.inserting_before(site.output):
            if layout.tiers is not None:
                out = qaq_attention_node(gm, site, layout, calibration, device, tables)
            elif overlay is not None:
                out = overlay_attention_node(gm, site, k, v, layout, overlay, device)
            elif windowed:
                out = recent_attention_node(gm, site, k, v, layout, tables)
            else:
                out = attention_node(gm, site, k, v, layout, attention, tables)
        site.output.replace_all_uses_with(out)
        out.meta.update({k_: v_ for k_, v_ in site.output.meta.items() if k_ in ("val", "stack_trace", "nn_module_stack")})
        old_buffers |= {site.key.buffer, site.value.buffer}
    # Dead-code elimination keeps the replaced attention (SDPA counts as impure: its dropout is seeded) and the
    # in-place cache writes (they mutate), so those are erased by hand once nothing uses them.
    replaced = [n for site in sites for n in (site.output, *site.replaced)]
    writes = [w for site in sites for w in (site.key.write, site.value.write)]
    erase_unused(graph, replaced)
    graph.eliminate_dead_code()
    erase_unused(graph, writes)
    graph.eliminate_dead_code()
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in old_buffers:
            raise KVPassError(
                f"{node.name} still reads the original cache buffer '{node.target}' after the rewrite "
                f"(used by {[u.name for u in node.users]}); this model reads its cache outside attention"
            )
    for target in old_buffers:
        tensor = gm.get_buffer(target)
        delete_attr(gm, target)
        if free_old:
            tensor.untyped_storage().resize_(0)
    graph.lint()
    gm.recompile()
    return gm
