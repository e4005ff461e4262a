"""Rewrite: swap each site's full-precision cache buffers for its method's packed buffers and its cache writes
and attention for the method's ops, as the method's handler (:mod:`kvpass.pipeline.handler`) emits them. The old
buffers are deleted from the module, so no full-precision copy of the cache remains. The helpers here are what
handlers build their nodes with."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from kvpass.calibration.store import Calibration
from kvpass.errors import KVPassError
from kvpass.kvcache import RINGS, CacheLayout, cache_names, static_names
from kvpass.ops import balance as _balance_op  # noqa: F401  (registers kv_balance_)
from kvpass.ops.meta import AttentionMeta
from kvpass.pipeline.buffers import BufferRecord, BufferTable, Role
from kvpass.pipeline.handler import RewriteContext, handler_for
from kvpass.pipeline.locate import AttentionSite, CacheAccess
from kvpass.pipeline.plan import KVLayout
from kvpass.pipeline.rope import RopeTables

aten = torch.ops.aten
ATTENTION_MODES = ("fused", "load")


def buffer_prefix(site: AttentionSite, which: str) -> str:
    return f"kvpass_cache_{site.index}_{which}"


def add_buffers(ctx: RewriteContext, site: AttentionSite, which: str, layout: CacheLayout,
                static_values: dict[str, torch.Tensor] | None = None) -> tuple[list[str], list[str]]:
    """Register the per-token (state) and static (fixed) buffers of a site's key or value cache (``which``)."""
    try:
        cache, static = layout.allocate(ctx.device, static_values)
    except KVPassError as err:
        raise KVPassError(f"layer {site.index} {'keys' if which == 'k' else 'values'}: {err}") from err
    spec, prefix = layout.spec, buffer_prefix(site, which)
    cache_targets = [ctx.buffers.add(f"{prefix}_{n}", t, site.index, Role.RING if n in RINGS else Role.STATE)
                     for n, t in zip(cache_names(spec), cache)]
    static_targets = [ctx.buffers.add(f"{prefix}_static_{n}", t, site.index, Role.FIXED)
                      for n, t in zip(static_names(spec), static)]
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
    """The cached ``(cos, sin)`` table nodes an op takes for keys stored before RoPE (``None, None`` without)."""
    if tables is None:
        return None, None
    return tuple(t if isinstance(t, Node) else gm.graph.get_attr(t) for t in tables)


def rope_fields(site: AttentionSite, tables: tuple | None) -> tuple[str, int]:
    """The ``rope`` variant and ``rotary_dim`` an op's metadata records: ``("", 0)`` unless keys are stored before RoPE."""
    return (site.rope.variant, site.rope.rotary_dim) if tables is not None else ("", 0)


def attention_meta(site: AttentionSite, layout: KVLayout, tables: tuple | None, need_mass: bool = False) -> AttentionMeta:
    """The op metadata of a site's attention over the caches ``layout`` plans."""
    return AttentionMeta(str(layout.key.spec), str(layout.value.spec), site.head_dim, site.v_head_dim, site.max_len,
                         float(site.scale), *rope_fields(site, tables), need_mass)


def add_balancer(ctx: RewriteContext, site: AttentionSite) -> None:
    """Insert MiKV's balancer: ``k / s`` is what gets stored, ``q * s`` what attends (``q . k`` unchanged)."""
    g = ctx.gm.graph
    name = ctx.buffers.add(f"kvpass_cache_{site.index}_balance",
                           torch.ones(site.batch, site.kv_heads, 1, site.head_dim, device=ctx.device), site.index)
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


def rewrite(gm: GraphModule, sites: list[AttentionSite], layouts: list[KVLayout], method, attention: str = "fused",
            calibration: Calibration | None = None, free_old: bool = False) -> list[BufferRecord]:
    """Rewrite ``gm`` in place onto ``method``'s packed caches; returns the records of the buffers it added.

    Keys are stored before their rotary embedding (where one was recognised) with ``method.pre_rope_keys`` and
    rotated back at read time. The rewrite works on its own copies of ``sites`` (which stay as ``locate`` found
    them) and reads calibrated tensors from ``calibration``.
    """
    if attention not in ATTENTION_MODES:
        raise KVPassError(f"attention={attention!r} is not a mode; use one of {ATTENTION_MODES}")
    graph = gm.graph
    device = next((b.device for b in gm.buffers()), torch.device("cpu"))
    old_buffers = set()
    table = BufferTable(gm)
    rope_tables = RopeTables(table, device)
    handler = handler_for(method)
    ctx = RewriteContext(gm, device, attention, method, calibration, table)
    sites = [site.copy() for site in sites]
    for site, layout in zip(sites, layouts):
        buffers = handler.add_buffers(ctx, site, layout)
        if method.balance:
            add_balancer(ctx, site)
        tables = None
        if method.pre_rope_keys and site.rope is not None:
            tables = rope_tables.get(site, layout.key)
            site.key.new = site.rope.pre
        with graph.inserting_before(site.output):
            out = handler.emit(ctx, site, layout, buffers, tables)
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
    return table.records
