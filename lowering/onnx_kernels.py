"""The kvpass ops as functional plain-torch code that torch.export traces into standard ONNX ops.

The exporter (:mod:`kvpass.lowering.onnx`) swaps each kvpass op node of the rewritten graph for one of these before
exporting, because ONNX has no counterpart of a mutating custom op (the facts note: ``auto_functionalized`` does
not convert). They compute what the reference kernels compute, the same bytes for the same inputs, with no
data-dependent Python: the whole cache is dequantized (no visible-length cut), the sink is written through a
spare slot instead of a boolean index, and codes are packed by exact float arithmetic (:func:`packing.arithmetic`).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from kvpass.formats import packing, quantize
from kvpass.formats.api import QuantizedTensor, dequantize
from kvpass.kvcache import UNCODED, CacheSpec, cache_names, parse_cache_spec, static_names
from kvpass.ops.attention import apply_rope, attention_mass, attention_probs, attention_scores, masked_softmax
from kvpass.ops.meta import AttentionMeta, CacheRead

_BYTES_AS_INT32 = contextvars.ContextVar("kvpass_onnx_bytes_as_int32", default=False)


def bytes_as_int32() -> contextlib.AbstractContextManager[None]:
    """Write uint8 buffers through int32 (TensorRT's parser takes uint8 only at the network's inputs and outputs)."""
    return packing.switched_on(_BYTES_AS_INT32)


def _write(buf: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    if buf.dtype == torch.uint8 and _BYTES_AS_INT32.get():
        wide = buf.to(torch.int32).index_copy(2, positions, values.to(torch.int32))
        buf.copy_(wide.to(torch.uint8))
    else:
        buf.index_copy_(2, positions, values.to(buf.dtype))


def store(cache: list[torch.Tensor], static: list[torch.Tensor], new: torch.Tensor, positions: torch.Tensor,
          spec: str) -> None:
    """``kv_store_`` on the (cloned) cache tensors of an export: quantize ``new`` and write it at ``positions``."""
    cs = parse_cache_spec(spec)
    bufs = dict(zip(cache_names(cs), cache))
    if cs.sink:
        sink = bufs["sink"]
        b, h, s, d = sink.shape
        spare = torch.cat([sink, sink.new_zeros(b, h, 1, d)], dim=2)  # tokens past the sink land in slot s
        slots = torch.where(positions < s, positions, torch.full_like(positions, s))
        sink.copy_(spare.index_copy(2, slots, new.to(sink.dtype))[:, :, :s])
    coded = quantize(new, cs.format, check=False, **dict(zip(static_names(cs), static))).tensors
    for name in cache_names(cs):
        if name not in UNCODED:
            _write(bufs[name], positions, coded[name])


def read(cache: list[torch.Tensor], static: list[torch.Tensor], read: CacheRead, dtype: torch.dtype,
         rope_cos: torch.Tensor | None, rope_sin: torch.Tensor | None) -> torch.Tensor:
    """Every slot of a cache dequantized to ``[B, H, max_len, D]``, the sink exact, keys stored before RoPE rotated."""
    cs = read.cache_spec
    bufs = dict(zip(cache_names(cs), cache))
    b, h = cache[0].shape[:2]
    tensors = {n: bufs[n] for n in cache_names(cs) if n not in UNCODED} | dict(zip(static_names(cs), static))
    dense = dequantize(QuantizedTensor(cs.format, torch.Size((b, h, read.max_len, read.head_dim)), dtype, tensors))
    if cs.sink:
        dense = torch.cat([bufs["sink"].to(dtype), dense[:, :, cs.sink:]], dim=2)
    if read.rope:
        dense = apply_rope(dense, rope_cos, rope_sin, read.rope, read.rotary_dim)
    return dense


def load(cache, static, rope_cos, rope_sin, dtype: torch.dtype, meta: str) -> torch.Tensor:
    """``kv_load``: the whole cache dequantized."""
    return read(cache, static, CacheRead.parse(meta), dtype, rope_cos, rope_sin).clone()


def attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin,
              meta: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_attention``: dequantize every slot, then masked attention with GQA (and the attention mass)."""
    m = AttentionMeta.parse(meta)
    k = read(k_cache, k_static, m.key_read, q.dtype, rope_cos, rope_sin)
    v = read(v_cache, v_static, m.value_read, q.dtype, None, None)
    # softmax written out rather than SDPA: a query with nothing visible (a padding token) gets zeros, as in
    # the reference kernels, so the keys later layers write at padded slots are the same bytes
    probs = attention_probs(q, k, mask, q_positions, m.scale)
    groups = q.shape[1] // k.shape[1]
    out = (probs.to(q.dtype) @ v.repeat_interleave(groups, 1)).to(q.dtype)
    if not m.need_mass:
        return out, q.new_zeros(0, dtype=torch.float32)
    return out, attention_mass(probs, k.shape[1])


def _mod(a: torch.Tensor, w: int) -> torch.Tensor:
    """``a mod w`` for ``a >= 0`` by integer division (TensorRT's parser refuses Mod)."""
    return a - torch.div(a, w, rounding_mode="floor") * w


def _exact_slots(cache: list[torch.Tensor], cs: CacheSpec, new: torch.Tensor, positions: torch.Tensor,
                 max_len: int) -> torch.Tensor:
    """``[B, H, max_len, D]``: each slot as the recent ring holds it before the chunk is stored (the W positions
    before the chunk), the chunk's own tokens at their slots; other slots are never read exact."""
    ring = dict(zip(cache_names(cs), cache))["recent"]
    slots = _mod(torch.arange(max_len, device=new.device), ring.shape[2])
    return ring[:, :, slots].to(new.dtype).index_copy(2, positions, new)


def _write_ring(ring: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> None:
    """Each ring slot r takes the chunk's newest token at a position equal to r modulo W, where there is one."""
    w = ring.shape[2]
    last = positions[-1]
    r = torch.arange(w, device=new.device)
    newest = last - _mod(last - r + w, w)  # the largest position <= last that is r modulo w
    held = newest >= positions[0]
    picked = new.index_select(2, (newest - positions[0]).clamp(min=0))
    ring.copy_(torch.where(held[:, None], picked.to(ring.dtype), ring))


def recent_attention(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos,
                     rope_sin, meta: str) -> torch.Tensor:
    """``kv_recent_attention_`` for ``recent=W`` caches: store the chunk, then one attention over every slot in which
    a query reads slot j exact when ``p - W < j <= p`` on the side whose cache keeps W recent tokens, coded
    otherwise (the reference merges a far and a near attention by their log-sum-exp: the same softmax); the rings
    then take the chunk's newest tokens."""
    m = AttentionMeta.parse(meta)
    sides = ((k_cache, k_static, new_k, m.key_read), (v_cache, v_static, new_v, m.value_read))
    exact = [_exact_slots(c, r.cache_spec, new, positions, m.max_len) if r.cache_spec.recent else None
             for c, _, new, r in sides]
    for cache, static, new, r in sides:
        store(cache, static, new, positions, str(r.cache_spec))
    k = read(k_cache, k_static, m.key_read, q.dtype, rope_cos, rope_sin)
    v = read(v_cache, v_static, m.value_read, q.dtype, None, None)
    slots = torch.arange(m.max_len, device=q.device)[None, :]

    def use(cs: CacheSpec) -> torch.Tensor:  # [T, max_len]: the slots each query reads exact
        return (slots > positions[:, None] - cs.recent) & (slots <= positions[:, None])

    scores = attention_scores(q, k, m.scale)
    if exact[0] is not None:
        k_exact = exact[0]
        if m.key_read.rope:
            k_exact = apply_rope(k_exact, rope_cos, rope_sin, m.key_read.rope, m.key_read.rotary_dim)
        scores = torch.where(use(m.key_spec), attention_scores(q, k_exact.to(q.dtype), m.scale), scores)
    probs = masked_softmax(scores, mask, q_positions)
    groups = q.shape[1] // v.shape[1]
    if exact[1] is None:
        out = probs.to(q.dtype) @ v.repeat_interleave(groups, 1)
    else:
        near = use(m.value_spec).to(probs.dtype)
        out = ((probs * (1 - near)).to(q.dtype) @ v.repeat_interleave(groups, 1)
               + (probs * near).to(q.dtype) @ exact[1].to(q.dtype).repeat_interleave(groups, 1))
    for cache, _, new, r in sides:
        if r.cache_spec.recent:
            _write_ring(dict(zip(cache_names(r.cache_spec), cache))["recent"], new, positions)
    return out.to(q.dtype)


KERNELS = {
    torch.ops.kvpass.kv_store_.default: store,
    torch.ops.kvpass.kv_load.default: load,
    torch.ops.kvpass.kv_attention.default: attention,
    torch.ops.kvpass.kv_recent_attention_.default: recent_attention,
}
"""The kvpass ops that export, each with the function that replaces it in the exported graph."""
