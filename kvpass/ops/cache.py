"""The kvpass custom ops that the graph pass emits, with fake kernels and a reference kernel in plain torch.

* ``kvpass::kv_store_`` quantizes new K or V rows and writes them into the packed cache buffers (mutating).
* ``kvpass::kv_load`` dequantizes a whole cache to a dense tensor (the debugging / reference read path).
* ``kvpass::kv_attention`` attends queries over packed K and V caches: dequantize, RoPE for keys stored before
  it, GQA, mask, softmax, and
  optionally the attention mass every cached token received (summed over queries and the heads of its
  GQA group), which importance-driven methods (MiKV, QAQ, H2O) accumulate.

The graph pass writes and attends caches with a ``recent=W`` window or a residual (in the fused mode) with
``kvpass::kv_recent_attention_`` instead (:mod:`kvpass.ops.recent`): each query reads its own recent tokens exact.

A cache is passed as two tensor lists (per-token buffers, static tensors) plus its cache spec string
(:mod:`kvpass.kvcache`); the order of each list is :func:`kvpass.kvcache.cache_names` /
:func:`kvpass.kvcache.static_names`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpass import kvcache
from kvpass.kvcache import parse_cache_spec
from kvpass.ops.attention import load_keys, reference_attention, visible_length


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
    spec: str,
    head_dim: int,
    max_len: int,
    dtype: torch.dtype,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    rope: str,
    rotary_dim: int,
) -> torch.Tensor:
    """Dequantize a whole cache to ``[B, H, max_len, head_dim]`` in ``dtype``; keys stored before RoPE get it
    back here when ``rope`` names the variant ("half" or "interleaved"; "" for none)."""
    out = load_keys(cache, static, spec, head_dim, max_len, dtype, rope_cos, rope_sin, rope, rotary_dim)
    # An unquantized cache dequantizes to its own buffer; an op output may not alias its input.
    return out.clone() if out.data_ptr() == cache[0].data_ptr() else out.contiguous()


@kv_load.register_fake
def _(cache, static, spec, head_dim, max_len, dtype, rope_cos, rope_sin, rope, rotary_dim):
    b, h = cache[0].shape[:2]
    return cache[0].new_empty((b, h, max_len, head_dim), dtype=dtype)


def reference_kv_attention(q, k_cache, k_static, v_cache, v_static, k_spec, v_spec, head_dim, v_head_dim, max_len, mask,
                           q_positions, scale, need_mass, rope_cos, rope_sin, rope, rotary_dim):
    """``kv_attention`` in plain torch: dequantize the visible slots, then SDPA (every device, every spec)."""
    n = visible_length(mask, q_positions, max_len)
    k = load_keys(k_cache, k_static, k_spec, head_dim, max_len, q.dtype, rope_cos, rope_sin, rope, rotary_dim, n)
    v = kvcache.load(v_cache, v_static, parse_cache_spec(v_spec), v_head_dim, max_len, q.dtype, n)
    if mask is not None:
        mask = mask[..., :n]
    out, mass = reference_attention(q, k, v, mask, q_positions, scale, need_mass)
    if need_mass and n < max_len:
        mass = F.pad(mass, (0, max_len - n))
    return out.contiguous(), mass


@torch.library.custom_op("kvpass::kv_attention", mutates_args=())
def kv_attention(
    q: torch.Tensor,
    k_cache: list[torch.Tensor],
    k_static: list[torch.Tensor],
    v_cache: list[torch.Tensor],
    v_static: list[torch.Tensor],
    k_spec: str,
    v_spec: str,
    head_dim: int,
    v_head_dim: int,
    max_len: int,
    mask: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    scale: float,
    need_mass: bool,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    rope: str,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` ``[B, Hq, T, D]`` over packed caches of ``[B, Hkv, S, D]``.

    ``mask`` (bool, True = attend, or additive float; broadcastable to ``[B, Hq, T, S]``) wins over
    ``q_positions`` (``[T]``, causal over the cache); with neither, every cached slot is attended.
    Returns the output ``[B, Hq, T, Dv]`` and, if ``need_mass``, the float32 attention mass ``[B, Hkv, S]``
    (else an empty tensor). Keys stored before RoPE are rotated back with the cached ``rope_cos``/``rope_sin``.
    """
    return reference_kv_attention(q, k_cache, k_static, v_cache, v_static, k_spec, v_spec, head_dim, v_head_dim, max_len,
                                  mask, q_positions, scale, need_mass, rope_cos, rope_sin, rope, rotary_dim)


@kv_attention.register_fake
def _(q, k_cache, k_static, v_cache, v_static, k_spec, v_spec, head_dim, v_head_dim, max_len, mask, q_positions, scale,
      need_mass, rope_cos, rope_sin, rope, rotary_dim):
    b, hq, t, _ = q.shape
    hkv, s = k_cache[0].shape[1], max_len
    out = q.new_empty((b, hq, t, v_head_dim))
    mass = q.new_empty((b, hkv, s), dtype=torch.float32) if need_mass else q.new_empty((0,), dtype=torch.float32)
    return out, mass
