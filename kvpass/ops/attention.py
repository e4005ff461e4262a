"""The attention math the kvpass ops share: RoPE for keys read back before it, masks, GQA scores and
probabilities, the attention mass each cached token receives, and SDPA over dense K/V."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpass import kvcache
from kvpass.ops.meta import CacheRead


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, variant: str, rotary_dim: int) -> torch.Tensor:
    """Rotary embedding of keys read back before RoPE: ``k*cos + rotate(k)*sin`` on the first ``rotary_dim``
    channels, with ``cos``/``sin`` ``[B, 1, S, rotary_dim]`` cached for every slot."""
    rot, rest = k[..., :rotary_dim], k[..., rotary_dim:]
    if variant == "half":
        half = rotary_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    elif variant == "interleaved":
        rotated = torch.stack([-rot[..., 1::2], rot[..., ::2]], dim=-1).flatten(-2)
    else:
        raise ValueError(f"unknown rotary variant {variant!r}")
    out = rot * cos.to(k.dtype) + rotated * sin.to(k.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def load_keys(cache, static, read: CacheRead, dtype, rope_cos, rope_sin, upto: int | None = None) -> torch.Tensor:
    """Dequantize a cache to ``[B, H, upto or max_len, D]``, rotating keys stored before RoPE back."""
    k = kvcache.load(cache, static, read.cache_spec, read.head_dim, read.max_len, dtype, upto)
    if read.rope:
        n = k.shape[2]
        k = apply_rope(k, rope_cos[:, :, :n], rope_sin[:, :, :n], read.rope, read.rotary_dim)
    return k


def visible_length(mask: torch.Tensor | None, q_positions: torch.Tensor | None, max_len: int) -> int:
    """One past the last cache slot any query may attend to: the slots after it need not be dequantized."""
    if mask is not None:
        allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
        cols = allowed.reshape(-1, allowed.shape[-1]).any(0).nonzero()
        return int(cols.max()) + 1 if len(cols) else max_len
    if q_positions is not None:
        return min(max_len, int(q_positions.max()) + 1)
    return max_len


def causal_mask(q_positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean ``[T, S]`` mask: query at position p sees cached tokens 0..p."""
    return torch.arange(kv_len, device=q_positions.device)[None, :] <= q_positions[:, None]


def attention_mass(probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum ``[B, Hq, T, S]`` attention probabilities over queries and GQA groups into ``[B, Hkv, S]``."""
    b, hq, t, s = probs.shape
    return probs.reshape(b, kv_heads, hq // kv_heads, t, s).sum(dim=(2, 3))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    scale: float,
    need_mass: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA over dense K/V with GQA; with ``need_mass`` also the attention mass per cached token."""
    if mask is None and q_positions is not None:
        mask = causal_mask(q_positions, k.shape[-2])
    kv_heads = k.shape[1]
    groups = q.shape[1] // kv_heads
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    if not need_mass:
        return out, q.new_zeros(0, dtype=torch.float32)
    return out, attention_mass(attention_probs(q, k, mask, None, scale), kv_heads)


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 scaled scores ``[..., Hq, T, S]`` of ``q`` over ``k`` ``[..., Hkv, S, D]`` (GQA), before any mask."""
    groups = q.shape[-3] // k.shape[-3]
    return (q.float() @ k.float().repeat_interleave(groups, dim=-3).transpose(-1, -2)) * scale


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, q_positions: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """float32 attention probabilities ``[..., Hq, T, S]`` of ``q`` over ``k`` ``[..., Hkv, S, D]`` (GQA), with a
    bool or additive ``mask`` or else causal by ``q_positions``; rows with nothing visible are zeros."""
    return masked_softmax(attention_scores(q, k, scale), mask, q_positions)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, q_positions: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of ``scores`` ``[..., T, S]`` with a bool or additive ``mask`` or else causal by
    ``q_positions``; rows with nothing visible are zeros."""
    if mask is None and q_positions is not None:
        mask = causal_mask(q_positions, scores.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    return torch.where(torch.isnan(probs), 0.0, probs)  # softmax gives no inf; nan_to_num would export IsInf
