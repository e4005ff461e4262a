"""Triton lowering of ``kvpass::kv_attention``: on CUDA, caches whose specs the fused decode kernel supports
(:func:`kvpass.plugins.triton_attention.supports`) are attended without a dequantized copy; everything else
(other specs, keys stored before RoPE, the attention mass that importance methods ask for, or no triton
installed) runs the reference kernel. Registered as the op's CUDA kernel, so eager calls, ``torch.export``
programs and Inductor (which calls the op as an extern kernel) all take it."""

from __future__ import annotations

import torch

from kvpass.ops.attention import causal_mask, visible_length
from kvpass.ops.cache import kv_attention, reference_kv_attention
from kvpass.ops.meta import AttentionMeta


def fused_attention_applies(q: torch.Tensor, meta: AttentionMeta) -> bool:
    """Whether the fused kernel takes this call (triton importable, supported specs, small query block)."""
    try:
        from kvpass.plugins import triton_attention as ta
    except ImportError:  # triton not installed: the reference kernel serves
        return False
    rows = q.shape[1] * q.shape[2]
    return (not meta.need_mass and not meta.rope and q.shape[-1] == meta.head_dim
            and ta.supports(meta.key_spec, meta.head_dim) and ta.supports(meta.value_spec, meta.v_head_dim)
            and rows <= ta.MAX_ROWS)


@kv_attention.register_kernel("cuda")
def _(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, meta):
    m = AttentionMeta.parse(meta)
    if not fused_attention_applies(q, m):
        return reference_kv_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, m)
    from kvpass.plugins import triton_attention as ta

    n = visible_length(mask, q_positions, m.max_len)
    if mask is None and q_positions is not None:
        mask = causal_mask(q_positions, n)[None, None]
    k = dict(zip(("codes", "scale", "zero"), k_cache))
    v = dict(zip(("codes", "scale", "zero"), v_cache))
    out = ta.decode_attention(q, k, v, m.key_spec, m.value_spec, n, mask, m.scale)
    return out.contiguous(), q.new_empty((0,), dtype=torch.float32)
