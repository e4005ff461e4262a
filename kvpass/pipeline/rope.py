"""The rotary embedding of keys stored before RoPE: at read time every cached key is rotated by the cos/sin of its
own position. Where the model computes cos/sin as a pure function of its position ids (every Hugging Face RoPE
model), the pass caches only the position id of each slot (int32) and re-runs that function at read time, which is
exact and costs a few bytes per token; otherwise it caches the cos/sin rows themselves."""

from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule, Node

from kvpass.kvcache import CacheLayout
from kvpass.pipeline.buffers import BufferTable
from kvpass.pipeline.locate import AttentionSite, Rope

aten = torch.ops.aten
BROADCASTS = (aten.unsqueeze.default, aten.expand.default, aten.view.default, aten.reshape.default)


def base_of(node: Node) -> Node:
    """The tensor a cos/sin operand was broadcast from (every layer unsqueezes the same table)."""
    while node.op == "call_function" and node.target in BROADCASTS:
        node = node.args[0]
    return node


def position_function(table: Node) -> tuple[Node, list[Node]] | None:
    """The one graph input ``table`` is computed from and the nodes between (graph order), when ``table`` is a pure
    function of that input with no shape read from the graph; else None."""
    seen, stack, inputs = set(), [table], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            inputs.add(n)
        elif n.op == "call_function" and "sym_" not in str(n.target):
            stack.extend(n.all_input_nodes)
        elif n.op != "get_attr":
            return None
    if len(inputs) != 1:
        return None
    source = inputs.pop()
    sv = source.meta.get("val")
    if not isinstance(sv, torch.Tensor) or sv.dtype.is_floating_point or sv.ndim not in (1, 2):
        return None
    return source, [n for n in table.graph.nodes if n in seen and n.op != "placeholder"]


def copy_function(graph: Graph, source: Node, nodes: list[Node], outputs: list[Node], positions: Node) -> list[Node]:
    """Copy ``nodes`` into ``graph`` at the insertion point with ``source`` replaced by ``positions``."""
    env = {source: positions}
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env.get(a, a))
        env[n].meta.pop("val", None)  # the copy runs over max_len positions: the traced shape no longer holds
    return [env[o] for o in outputs]


def check_position_function(gm: GraphModule, source: Node, nodes: list[Node], outputs: list[Node], batch: int,
                            max_len: int, device) -> bool:
    """Run the copied function on positions ``0..max_len-1`` and on the first few alone: it must give one
    ``[..., max_len, r]`` row per position, and each row must not depend on the other positions (a function of
    the sequence, such as a length-dependent scaling, would be wrong for tokens cached earlier)."""
    sv = source.meta["val"]
    g = Graph()
    p = g.placeholder("positions")
    g.output(copy_function(g, source, nodes, outputs, p))
    fn = GraphModule(gm, g)
    lead = (batch,) if sv.ndim == 2 else ()
    full = torch.arange(max_len, device=device, dtype=sv.dtype).expand(*lead, max_len)
    few = min(3, max_len)
    try:
        with torch.no_grad():
            whole, part = fn(full.contiguous()), fn(full[..., :few].contiguous())
    except Exception:  # noqa: BLE001 - any failure means "not a position-wise function": keep the tables
        return False
    for w, p_ in zip(whole, part):
        if w.ndim < 2 or w.shape[-2] != max_len or (w.shape[:-2] != lead and w.shape[:-2] != (1,) * len(lead)):
            return False
        if not torch.equal(w[..., :few, :], p_):
            return False
    return True


class RopeTables:
    """The cos/sin ``[B or 1, 1, max_len, rotary_dim]`` of every cache slot, one per distinct rotary embedding in
    the graph, for keys stored before RoPE. Recomputed from cached int32 position ids where the graph allows
    (exact); else cached rows, in the key cache's dtype when keys are not quantized (exact), else in fp16.
    Either is counted in ``cache_report`` (buffers of no one layer in the rewrite's records)."""

    def __init__(self, buffers: BufferTable, device) -> None:
        self.gm, self.buffers, self.device, self.tables = buffers.gm, buffers, device, {}
        self.positions: dict[Node, str] = {}  # position input -> its cached [B, 1, max_len, 1] int32 buffer

    def get(self, site: AttentionSite, layout: CacheLayout | None) -> tuple[Node | str, Node | str]:
        """cos and sin as graph nodes (recomputed) or buffer names (cached); ``layout`` is the key cache's (None
        for QAQ's tiers, which quantize keys)."""
        rope: Rope = site.rope
        key = (base_of(rope.cos), base_of(rope.sin))
        if key not in self.tables:
            with self.gm.graph.inserting_before(site.key.write):
                self.tables[key] = self._recomputed(site, key) or self._cached(site, layout, len(self.tables))
        return self.tables[key]

    def _recomputed(self, site: AttentionSite, key: tuple[Node, Node]) -> tuple[Node, Node] | None:
        found = [position_function(n) for n in key]
        if None in found or found[0][0] is not found[1][0]:
            return None
        source = found[0][0]
        wanted = set(found[0][1]) | set(found[1][1])
        nodes = [n for n in self.gm.graph.nodes if n in wanted]  # graph order, as node_copy needs
        sv = source.meta["val"]
        batch = int(sv.shape[0]) if sv.ndim == 2 else 1
        if not check_position_function(self.gm, source, nodes, list(key), batch, site.max_len, self.device):
            return None
        g = self.gm.graph
        if source not in self.positions:
            name = f"kvpass_rope_positions_{len(self.positions)}"
            self.buffers.add(name, torch.zeros(batch, 1, site.max_len, 1, dtype=torch.int32, device=self.device), None)
            rows = source if sv.ndim == 2 else g.call_function(aten.unsqueeze.default, (source, 0))
            rows = g.call_function(aten.unsqueeze.default, (g.call_function(aten.unsqueeze.default, (rows, 1)), -1))
            g.call_function(torch.ops.kvpass.kv_store_.default, ([g.get_attr(name)], [], rows, site.key.positions,
                                                                 "none"))
            self.positions[source] = name
        shape = (batch, site.max_len) if sv.ndim == 2 else (site.max_len,)
        cached = g.call_function(aten.reshape.default, (g.get_attr(self.positions[source]), shape))
        cached = g.call_function(aten._to_copy.default, (cached,), {"dtype": sv.dtype})
        copies = copy_function(g, source, nodes, list(key), cached)
        return tuple(self._rows(c, k.meta["val"].ndim) for c, k in zip(copies, key))

    def _rows(self, node: Node, ndim: int) -> Node:
        """``[T, r]`` / ``[B, T, r]`` to ``[B or 1, 1, T, r]``, as cos/sin broadcast against ``[B, H, T, D]``."""
        g = self.gm.graph
        if ndim == 2:
            node = g.call_function(aten.unsqueeze.default, (node, 0))
        if ndim in (2, 3):
            node = g.call_function(aten.unsqueeze.default, (node, 1))
        return node

    def _cached(self, site: AttentionSite, layout: CacheLayout | None, index: int) -> tuple[str, str]:
        rope, g = site.rope, self.gm.graph
        dtype = site.dtype if layout is not None and layout.format.kind == "float" else torch.float16
        names = []
        for which, node in (("cos", rope.cos), ("sin", rope.sin)):
            name = f"kvpass_rope_{index}_{which}"
            val = node.meta["val"]
            rows = self._rows(node, val.ndim)
            batch = val.shape[0] if val.ndim >= 3 else 1
            self.buffers.add(name, torch.zeros(int(batch), 1, site.max_len, rope.rotary_dim, dtype=dtype,
                                               device=self.device), None)
            g.call_function(torch.ops.kvpass.kv_store_.default, ([g.get_attr(name)], [], rows, site.key.positions,
                                                                 "none"))
            names.append(name)
        return tuple(names)
