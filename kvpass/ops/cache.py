"""The kvpass custom ops that the graph pass emits, with fake kernels and a reference kernel in plain torch.

* ``kvpass::kv_store_`` quantizes new K or V rows and writes them into the packed cache buffers (mutating).
* ``kvpass::kv_load`` dequantizes a whole cache to a dense tensor (the debugging / reference read path).
* ``kvpass::kv_attention`` attends queries over packed K and V caches: dequantize, RoPE for keys stored before
  it, GQA, mask, softmax, and
  optionally the attention mass every cached token received (summed over queries and the heads of its
  GQA group), which importance-driven methods (MiKV, QAQ, H2O) accumulate.

The graph pass writes and attends caches with a ``recent=W`` window or a residual (in the fused mode) with
``kvpass::kv_recent_attention_`` instead (:mod:`kvpass.ops.recent`): each query reads its own recent tokens exact.

A cache is passed as two tensor lists (per-token buffers, static tensors), in the order of
:func:`kvpass.kvcache.cache_names` / :func:`kvpass.kvcache.static_names`; what is fixed at compile time (cache specs,
head dims, length, RoPE, scale) comes as one ``meta`` string (:mod:`kvpass.ops.meta`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpass import kvcache
from kvpass.kvcache import parse_cache_spec
from kvpass.ops.attention import load_keys, reference_attention, visible_length
from kvpass.ops.meta import AttentionMeta, CacheRead


@torch.library.custom_op("kvpass::kv_store_", mutates_args=("cache",))
def kv_store_(
    cache: list[torch.Tensor], static: list[torch.Tensor], new: torch.Tensor, positions: torch.Tensor, spec: str
) -> None:
    """Quantize ``new`` ``[B, H, T, D]`` and write it at token ``positions`` ``[T]`` of ``cache``."""
    kvcache.store(cache, static, new, positions, parse_cache_spec(spec))


@kv_store_.register_fake
def _(cache, static, new, positions, spec) -> None:
    return None


@torch.library.custom_op("kvpass::kv_load", mutates_args=())
def kv_load(
    cache: list[torch.Tensor],
    static: list[torch.Tensor],
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    dtype: torch.dtype,
    meta: str,
) -> torch.Tensor:
    """Dequantize a whole cache to ``[B, H, max_len, head_dim]`` in ``dtype``; ``meta`` is a
    :class:`~kvpass.ops.meta.CacheRead` (keys stored before RoPE get it back here when it names the variant)."""
    out = load_keys(cache, static, CacheRead.parse(meta), dtype, rope_cos, rope_sin)
    # An unquantized cache dequantizes to its own buffer; an op output may not alias its input.
    return out.clone() if out.data_ptr() == cache[0].data_ptr() else out.contiguous()


@kv_load.register_fake
def _(cache, static, rope_cos, rope_sin, dtype, meta):
    read = CacheRead.parse(meta)
    b, h = cache[0].shape[:2]
    return cache[0].new_empty((b, h, read.max_len, read.head_dim), dtype=dtype)


def reference_kv_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin,
                           meta: AttentionMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_attention`` in plain torch: dequantize the visible slots, then SDPA (every device, every spec)."""
    n = visible_length(mask, q_positions, meta.max_len)
    k = load_keys(k_cache, k_static, meta.key_read, q.dtype, rope_cos, rope_sin, n)
    v = load_keys(v_cache, v_static, meta.value_read, q.dtype, None, None, n)
    if mask is not None:
        mask = mask[..., :n]
    out, mass = reference_attention(q, k, v, mask, q_positions, meta.scale, meta.need_mass)
    if meta.need_mass and n < meta.max_len:
        mass = F.pad(mass, (0, meta.max_len - n))
    return out.contiguous(), mass


@torch.library.custom_op("kvpass::kv_attention", mutates_args=())
def kv_attention(
    q: torch.Tensor,
    k_cache: list[torch.Tensor],
    k_static: list[torch.Tensor],
    v_cache: list[torch.Tensor],
    v_static: list[torch.Tensor],
    mask: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    meta: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` ``[B, Hq, T, D]`` over packed caches of ``[B, Hkv, S, D]``, described by ``meta`` (an
    :class:`~kvpass.ops.meta.AttentionMeta`).

    ``mask`` (bool, True = attend, or additive float; broadcastable to ``[B, Hq, T, S]``) wins over
    ``q_positions`` (``[T]``, causal over the cache); with neither, every cached slot is attended.
    Returns the output ``[B, Hq, T, Dv]`` and, if ``need_mass``, the float32 attention mass ``[B, Hkv, S]``
    (else an empty tensor). Keys stored before RoPE are rotated back with the cached ``rope_cos``/``rope_sin``.
    """
    return reference_kv_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin,
                                  AttentionMeta.parse(meta))


@kv_attention.register_fake
def _(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, meta):
    m = AttentionMeta.parse(meta)
    b, hq, t, _ = q.shape
    hkv = k_cache[0].shape[1]
    out = q.new_empty((b, hq, t, m.v_head_dim))
    mass = q.new_empty((b, hkv, m.max_len), dtype=torch.float32) if m.need_mass else q.new_empty((0,), dtype=torch.float32)
    return out, mass
