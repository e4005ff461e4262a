"""Locate: find every attention layer in a captured graph, from the graph alone.

For each ``aten.scaled_dot_product_attention`` node, and each eager ``matmul -> scale -> (+mask) -> softmax ->
(dropout) -> matmul`` chain, follow the key and value operands back through view-like ops (the GQA
``expand``/``reshape``, ``repeat_interleave``, casts) to the cache buffer they read and to the write that fills
it (``index_copy_`` or ``index_put_`` at token positions). Further back on the key path, recognise rotary
embedding (``k*cos + rotate_half(k)*sin``, the interleaved variant and partial rotary) so a method can quantize
keys before RoPE. Class names are never looked at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch.fx import GraphModule, Node

from kvpass.errors import KVPassError

aten = torch.ops.aten

# Ops that reshape or re-type the cache on its way into attention without mixing tokens.
PASS_THROUGH = {
    aten.expand.default, aten.reshape.default, aten.view.default, aten.unsqueeze.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten._unsafe_view.default, aten.repeat_interleave.self_int,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.detach.default,
    aten.repeat.default,
}
WRITES = {aten.index_copy_.default, aten.index_put_.default}  # plus copy_ into a token slice: write_destination
SDPA = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}


@dataclass
class Rope:
    """Rotary embedding recognised on the key path: ``post = pre*cos + rotate(pre)*sin`` on ``rotary_dim``."""

    pre: Node
    cos: Node
    sin: Node
    variant: str  # "half" (rotate_half) or "interleaved"
    rotary_dim: int


@dataclass
class CacheAccess:
    buffer: str  # the get_attr target of the cache buffer
    write: Node  # the index_copy_/index_put_ node
    new: Node  # the new rows [B, H, T, D]
    positions: Node | tuple  # token positions [T], or (start, end) of a token slice


@dataclass
class AttentionSite:
    """One attention layer: its operands, caches, and everything needed to rewrite it."""

    index: int
    kind: str  # "sdpa" or "eager"
    output: Node  # the node whose value is the attention output [B, Hq, T, Dv]
    query: Node
    key: CacheAccess
    value: CacheAccess
    mask: Node | None
    scale: float
    is_causal: bool
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    max_len: int
    dtype: torch.dtype
    rope: Rope | None = None
    replaced: list[Node] = field(default_factory=list)  # eager chain nodes made dead by the rewrite

    @property
    def gqa_groups(self) -> int:
        return self.q_heads // self.kv_heads

    def copy(self) -> AttentionSite:
        """A copy the rewrite may change (its operands, cache accesses and replaced nodes) without changing this."""
        return replace(self, key=replace(self.key), value=replace(self.value), replaced=list(self.replaced))


def val(node) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, Node) else None


def describe(node: Node) -> str:
    trace = node.meta.get("stack_trace", "") or ""
    where = trace.strip().splitlines()[-2].strip() if trace.strip() else ""
    return f"node '{node.name}' ({node.target}){' at ' + where if where else ''}"


def follow_to_cache(node: Node, writes_by_buffer: dict[str, list[Node]], what: str, site: Node) -> str | None:
    """Walk back from an attention operand to the cache buffer it reads; None if it is not a cache read."""
    start = node
    while node.op == "call_function":
        dest = write_destination(node)
        if dest is not None:
            if node.target == aten.copy_.default:  # copy_ returns the slice it wrote, not the whole cache
                raise KVPassError(
                    f"unsupported attention variant: the {what} of {describe(site)} reads the slice written by "
                    f"{describe(node)} instead of the whole cache"
                )
            return same_layout(start, dest, what, site)
        if node.target in PASS_THROUGH:
            node = node.args[0]
            continue
        if node.target == aten.slice.Tensor and _is_full_slice(node):
            node = node.args[0]
            continue
        if any(_reaches_buffer(node, writes_by_buffer)):
            raise KVPassError(
                f"unsupported attention variant: the {what} of {describe(site)} reaches a KV cache through "
                f"{describe(node)}, which kvpass cannot carry over to a packed cache (only reshapes, GQA expands "
                "and casts are supported between the cache and attention)"
            )
        return None
    if node.op == "get_attr" and node.target in writes_by_buffer:
        return same_layout(start, node, what, site)
    return None


def same_layout(operand: Node, buffer: Node, what: str, site: Node) -> str:
    """The attention operand must still be ``[B, heads, max_len, D]`` of the buffer (GQA may repeat heads)."""
    o, b = val(operand), val(buffer)
    if o is not None and b is not None and (o.ndim != 4 or o.shape[0] != b.shape[0] or o.shape[2:] != b.shape[2:]):
        raise KVPassError(
            f"unsupported attention variant: the {what} of {describe(site)} has shape {tuple(o.shape)}, not the "
            f"cache's [batch, heads, tokens, head_dim] = {tuple(b.shape)} (a transposed or reshaped cache read)"
        )
    return buffer.target


def _is_full_slice(node: Node) -> bool:
    src, out = val(node.args[0]), val(node)
    return src is not None and out is not None and tuple(src.shape) == tuple(out.shape)


def _reaches_buffer(node: Node, writes_by_buffer: dict[str, list[Node]], depth: int = 6):
    for arg in node.all_input_nodes:
        cache = arg.op == "get_attr" and arg.target in writes_by_buffer
        if cache or (arg.op == "call_function" and write_destination(arg) is not None):
            yield True
        elif depth > 0 and arg.op == "call_function":
            yield from _reaches_buffer(arg, writes_by_buffer, depth - 1)


def slice_of_buffer(node: Node) -> Node | None:
    """The get_attr node when ``node`` is ``buffer[:, :, start:end]`` (a token slice), else None."""
    if node.op == "call_function" and node.target == aten.slice.Tensor and node.args[0].op == "get_attr":
        dim = node.args[1] if len(node.args) > 1 else 0
        step = node.args[4] if len(node.args) > 4 else 1
        if dim in (2, -2) and step == 1:
            return node.args[0]
    return None


def write_destination(node: Node) -> Node | None:
    """The cache buffer (get_attr) a write node fills, or None when it is not a token-row write."""
    if node.op != "call_function":
        return None
    if node.target in WRITES:
        dest = node.args[0]
        return dest if dest.op == "get_attr" else None
    if node.target == aten.copy_.default:
        return slice_of_buffer(node.args[0])
    return None


def cache_writes(gm: GraphModule) -> dict[str, list[Node]]:
    """Buffer name -> the nodes writing token rows into it (index_copy_, index_put_, copy_ into a token slice)."""
    out: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        dest = write_destination(node)
        if dest is not None and val(dest) is not None and val(dest).ndim == 4:
            out.setdefault(dest.target, []).append(node)
    return out


def rows_4d(new: Node, buffer_val: torch.Tensor, write: Node) -> Node:
    """The ``[B, H, T, D]`` tensor behind a write's source (export may flatten a size-1 batch away)."""
    node = new
    while val(node) is not None and val(node).ndim != 4 and node.op == "call_function" and node.target in (
        aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim, aten.squeeze.default
    ):
        node = node.args[0]
    v = val(node)
    if v is None or v.ndim != 4 or v.shape[0] != buffer_val.shape[0] or v.shape[1] != buffer_val.shape[1] or (
        v.shape[3] != buffer_val.shape[3]
    ):
        raise KVPassError(
            f"{describe(write)} writes rows of shape {None if val(new) is None else tuple(val(new).shape)} into a "
            f"cache of shape {tuple(buffer_val.shape)}; kvpass needs rows shaped [batch, heads, tokens, head_dim]"
        )
    return node


def access(buffer: str, writes: list[Node]) -> CacheAccess:
    if len(writes) != 1:
        raise KVPassError(
            f"cache buffer '{buffer}' is written {len(writes)} times in one step; kvpass supports one token-row write "
            "per cache per step"
        )
    w = writes[0]
    if w.target == aten.index_copy_.default:
        _, dim, positions, new = w.args[:4]
        if dim not in (2, -2):
            raise KVPassError(f"{describe(w)} writes the cache along dim {dim}; kvpass needs writes along the token dim 2")
        return CacheAccess(buffer, w, rows_4d(new, val(w.args[0]), w), positions)
    if w.target == aten.copy_.default:
        sl = w.args[0]
        start = sl.args[2] if len(sl.args) > 2 else 0
        end = sl.args[3] if len(sl.args) > 3 else None
        if end is None or (isinstance(end, int) and end >= 2**62):
            raise KVPassError(f"{describe(w)} copies into an open-ended slice of the cache; kvpass needs start:end")
        return CacheAccess(buffer, w, rows_4d(w.args[1], val(sl.args[0]), w), (start, end))
    _, indices, new = w.args[:3]
    accumulate = w.args[3] if len(w.args) > 3 else w.kwargs.get("accumulate", False)
    if accumulate or len(indices) != 3 or indices[0] is not None or indices[1] is not None or indices[2] is None:
        raise KVPassError(
            f"{describe(w)} is an index_put_ that is not `cache[:, :, positions] = rows`; kvpass supports writes of "
            "token rows at positions along dim 2"
        )
    return CacheAccess(buffer, w, rows_4d(new, val(w.args[0]), w), indices[2])


def match_rope(k: Node) -> Rope | None:
    """Recognise ``k = pre*cos + rotate(pre)*sin``, optionally ``cat([that, pre_pass], -1)`` (partial rotary)."""
    if k.op == "call_function" and k.target == aten.cat.default and len(k.args[0]) == 2:
        rotated, passed = k.args[0]
        rope = match_rope(rotated)
        if rope and passed.op == "call_function" and passed.target == aten.slice.Tensor:
            whole = passed.args[0]
            if rope.pre.op == "call_function" and rope.pre.target == aten.slice.Tensor and rope.pre.args[0] is whole:
                return Rope(whole, rope.cos, rope.sin, rope.variant, rope.rotary_dim)
        return None
    if not (k.op == "call_function" and k.target == aten.add.Tensor):
        return None
    a, b = k.args[:2]
    for m1, m2 in ((a, b), (b, a)):
        if not all(isinstance(m, Node) and m.op == "call_function" and m.target == aten.mul.Tensor for m in (m1, m2)):
            continue
        for rot_i in (0, 1):
            rot, sin = m2.args[rot_i], m2.args[1 - rot_i]
            found = _rotated_source(rot) if isinstance(rot, Node) else None
            if found is None:
                continue
            pre, variant = found
            if pre in m1.args[:2]:
                cos = m1.args[1] if m1.args[0] is pre else m1.args[0]
                dim = val(pre).shape[-1] if val(pre) is not None else 0
                return Rope(pre, cos, sin, variant, int(dim))
    return None


def _rotated_source(rot: Node) -> tuple[Node, str] | None:
    """``cat([-x2, x1], -1)`` of the two halves of x, or the interleaved ``stack([-x_odd, x_even], -1).flatten``."""
    if rot.op != "call_function":
        return None
    if rot.target == aten.cat.default and len(rot.args[0]) == 2:
        neg, first = rot.args[0]
        if (isinstance(neg, Node) and neg.target == aten.neg.default and first.target == aten.slice.Tensor
                and neg.args[0].target == aten.slice.Tensor and neg.args[0].args[0] is first.args[0]):
            return first.args[0], "half"
    if rot.target in (aten.flatten.using_ints, aten.view.default, aten.reshape.default):
        st = rot.args[0]
        if isinstance(st, Node) and st.target == aten.stack.default and len(st.args[0]) == 2:
            neg, even = st.args[0]
            if (isinstance(neg, Node) and neg.target == aten.neg.default and even.target == aten.slice.Tensor
                    and neg.args[0].target == aten.slice.Tensor and neg.args[0].args[0] is even.args[0]):
                return even.args[0], "interleaved"
    return None


def sdpa_operands(node: Node) -> tuple[Node, Node, Node, Node | None, float | None, bool]:
    args = list(node.args) + [None] * (7 - len(node.args))
    q, k, v = args[:3]
    mask = node.kwargs.get("attn_mask", args[3])
    dropout = node.kwargs.get("dropout_p", args[4] or 0.0)
    is_causal = node.kwargs.get("is_causal", args[5] or False)
    scale = node.kwargs.get("scale", args[6])
    if dropout:
        raise KVPassError(f"{describe(node)} applies attention dropout {dropout}; put the model in eval() mode")
    return q, k, v, mask, scale, bool(is_causal)


def eager_operands(softmax: Node):
    """Match ``matmul(q, kT) [* s | / s] [+ mask] -> softmax -> [cast] [dropout] -> matmul(., v)`` around softmax.

    Returns (q, k, v, mask, scale, output, chain) or None when this softmax is not such a chain."""
    chain = [softmax]
    x = softmax.args[0]
    mask = None
    if x.op == "call_function" and x.target == aten.add.Tensor:
        chain.append(x)
        x, mask = x.args[0], x.args[1]
    scale = 1.0
    if x.op == "call_function" and x.target in (aten.mul.Tensor, aten.div.Tensor) and not isinstance(x.args[1], Node):
        chain.append(x)
        scale = float(x.args[1]) if x.target == aten.mul.Tensor else 1.0 / float(x.args[1])
        x = x.args[0]
    if not (x.op == "call_function" and x.target in MATMUL):
        return None
    chain.append(x)
    q, kt = x.args[:2]
    if not (kt.op == "call_function" and kt.target == aten.transpose.int and sorted(d % 4 for d in kt.args[1:3]) == [2, 3]):
        return None
    out = softmax
    while len(real_users(out)) == 1:
        (user,) = real_users(out)
        if user.target in MATMUL and user.args[0] is out:
            chain.append(user)
            return q, kt.args[0], user.args[1], mask, scale, user, chain
        if user.target in (aten.to.dtype, aten._to_copy.default, aten.dropout.default, aten.clone.default):
            if user.target == aten.dropout.default and user.args[1] and user.args[2] is not False:
                raise KVPassError(f"{describe(user)} applies attention dropout in training mode; call model.eval() first")
            chain.append(user)
            out = user
            continue
        return None
    return None


def real_users(node: Node) -> list[Node]:
    """Users other than export's dtype/device assertions."""
    return [u for u in node.users if u.target != aten._assert_tensor_metadata.default]


def locate(gm: GraphModule, name: str = "model") -> list[AttentionSite]:
    """One :class:`AttentionSite` per attention layer reading a static cache, in graph order."""
    writes = cache_writes(gm)
    if not writes:
        raise KVPassError(
            f"no static KV cache found in the graph of {name}: no 4-D buffer is written by index_copy_/index_put_. "
            "kvpass needs the cache as module buffers written at token positions (a dynamic cache passed in and "
            "out of the model is not supported; transformers models are wrapped in a StaticCache automatically)"
        )
    sites: list[AttentionSite] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in SDPA:
            q, k, v, mask, scale, is_causal = sdpa_operands(node)
            found = (q, k, v, mask, scale, node, [])
            kind = "sdpa"
        elif node.target in SOFTMAX:
            found = eager_operands(node)
            kind = "eager"
            if found is None:
                continue
            q, k, v, mask, scale, _, _ = found
            is_causal = False
        else:
            continue
        q, k, v, mask, scale, output, chain = found
        kbuf = follow_to_cache(k, writes, "key", node)
        vbuf = follow_to_cache(v, writes, "value", node)
        if kbuf is None and vbuf is None:
            continue  # attention over tensors of this step only (e.g. an encoder); not a cache read
        if kbuf is None or vbuf is None:
            raise KVPassError(
                f"unsupported attention variant at {describe(node)}: only the "
                f"{'value' if kbuf is None else 'key'} comes from a static cache buffer"
            )
        key, value = access(kbuf, writes[kbuf]), access(vbuf, writes[vbuf])
        kb, vb, qv = val(gm.graph.find_nodes(op="get_attr", target=kbuf)[0]), val(gm.graph.find_nodes(op="get_attr", target=vbuf)[0]), val(q)
        if qv is None or kb is None or vb is None or qv.ndim != 4:
            raise KVPassError(f"unsupported attention variant at {describe(node)}: query or cache has no 4-D shape")
        if qv.shape[1] % kb.shape[1]:
            raise KVPassError(
                f"unsupported attention variant at {describe(node)}: {qv.shape[1]} query heads are not a multiple of "
                f"{kb.shape[1]} key/value heads"
            )
        if isinstance(scale, Node):
            raise KVPassError(f"unsupported attention variant at {describe(node)}: the softmax scale is a tensor")
        head_dim = int(kb.shape[-1])
        sites.append(AttentionSite(
            index=len(sites), kind=kind, output=output, query=q, key=key, value=value, mask=mask,
            scale=float(scale) if scale is not None else 1.0 / math.sqrt(int(qv.shape[-1])),
            is_causal=is_causal, batch=int(kb.shape[0]), q_heads=int(qv.shape[1]), kv_heads=int(kb.shape[1]),
            head_dim=head_dim, v_head_dim=int(vb.shape[-1]), max_len=int(kb.shape[2]), dtype=kb.dtype,
            rope=match_rope(key.new), replaced=chain,
        ))
    if not sites:
        raise KVPassError(
            f"no attention found in the graph of {name}: no aten.scaled_dot_product_attention or "
            "matmul -> softmax -> matmul reads the cache buffers "
            f"({', '.join(sorted(writes)[:4])}{'...' if len(writes) > 4 else ''})"
        )
    read = {s.key.buffer for s in sites} | {s.value.buffer for s in sites}
    unread = sorted(set(writes) - read)
    if unread:
        raise KVPassError(
            f"cache buffers {unread} are written but not read by any attention kvpass recognises; "
            "the model's attention pattern is not supported"
        )
    return sites


__all__ = ["AttentionSite", "CacheAccess", "Rope", "locate", "match_rope"]
