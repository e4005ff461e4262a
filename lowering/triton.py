"""Triton lowering of ``kvpass::kv_attention``: on CUDA, caches whose specs the fused decode kernel supports
(:func:`kvpass.plugins.triton_attention.supports`) are attended without a dequantized copy; everything else
(other specs, keys stored before RoPE, the attention mass that importance methods ask for, or no triton
installed) runs the reference kernel. Registered as the op's CUDA kernel, so eager calls, ``torch.export``
programs and Inductor (which calls the op as an extern kernel) all take it."""

from __future__ import annotations

import torch

from kvpass.kvcache import parse_cache_spec
from kvpass.ops.attention import causal_mask, visible_length
from kvpass.ops.cache import kv_attention, reference_kv_attention


def fused_attention_applies(q: torch.Tensor, k_spec: str, v_spec: str, head_dim: int, v_head_dim: int,
                            need_mass: bool, rope: str) -> bool:
    """Whether the fused kernel takes this call (triton importable, supported specs, small query block)."""
    try:
        from kvpass.plugins import triton_attention as ta
    except ImportError:  # triton not installed: the reference kernel serves
        return False
    ks, vs = parse_cache_spec(k_spec), parse_cache_spec(v_spec)
    rows = q.shape[1] * q.shape[2]
    return (not need_mass and not rope and q.shape[-1] == head_dim and ta.supports(ks, head_dim)
            and ta.supports(vs, v_head_dim) and rows <= ta.MAX_ROWS)


@kv_attention.register_kernel("cuda")
def _(q, k_cache, k_static, v_cache, v_static, k_spec, v_spec, head_dim, v_head_dim, max_len, mask, q_positions, scale,
      need_mass, rope_cos, rope_sin, rope, rotary_dim):
    if not fused_attention_applies(q, k_spec, v_spec, head_dim, v_head_dim, need_mass, rope):
        return reference_kv_attention(q, k_cache, k_static, v_cache, v_static, k_spec, v_spec, head_dim, v_head_dim,
                                      max_len, mask, q_positions, scale, need_mass, rope_cos, rope_sin, rope, rotary_dim)
    from kvpass.plugins import triton_attention as ta

    n = visible_length(mask, q_positions, max_len)
    if mask is None and q_positions is not None:
        mask = causal_mask(q_positions, n)[None, None]
    k = dict(zip(("codes", "scale", "zero"), k_cache))
    v = dict(zip(("codes", "scale", "zero"), v_cache))
    out = ta.decode_attention(q, k, v, parse_cache_spec(k_spec), parse_cache_spec(v_spec), n, mask, scale)
    return out.contiguous(), q.new_empty((0,), dtype=torch.float32)
