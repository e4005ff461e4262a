"""Importance overlay: a fixed number of tokens per KV head kept at high precision, chosen by attention.

MiKV keeps every token in low precision and overlays the important ones in high precision; H2O and
StreamingLLM keep *only* the overlay and evict the rest. One mechanism serves all three:

* ``kv_overlay_store_`` puts each new token into the overlay (``C`` entries per head: K, V and the cache slot
  each entry holds, stored as slot + 1 so that 0 means empty), evicting the entry with the lowest accumulated attention (``by_score``, H2O/MiKV) or the
  oldest one (StreamingLLM), never one of the first ``sink`` tokens or of the ``recent`` newest ones.
* ``kv_overlay_attention_`` attends over the low-precision cache with the overlay's rows substituted (or over the
  overlay alone when ``evict``), and adds the attention mass each token received to its score.

Prompts are written in chunks (the method's ``max_chunk``), so heavy hitters are chosen from the attention the
tokens received so far, as H2O does when it streams a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpass import kvcache
from kvpass.ops import journal
from kvpass.ops.attention import attention_mass, reference_attention, visible_length
from kvpass.ops.meta import OpMeta


def insert(ov_slot: torch.Tensor, score: torch.Tensor, position: int, recent: int, sink: int, by_score: bool) -> torch.Tensor:
    """The overlay entry ``[B, H]`` each head gives to a token arriving at ``position``: a free entry, else the
    one with the lowest score (``by_score``) or the oldest, sparing the first ``sink`` tokens and the ``recent``
    newest; when every entry is spared, the oldest non-sink entry."""
    slots = ov_slot.long() - 1  # the buffer holds slot + 1, so that a zeroed overlay is an empty one
    free = slots < 0
    pinned = ~free & (slots < sink)
    spared = pinned | (slots >= position - recent)
    key = score.gather(-1, slots.clamp_min(0)) if by_score else slots.to(score.dtype)
    key = key.masked_fill(spared, float("inf")).masked_fill(free, float("-inf"))
    choice = key.argmin(-1)
    stuck = key.gather(-1, choice[..., None]).squeeze(-1) == float("inf")
    oldest = slots.to(score.dtype).masked_fill(pinned, float("inf")).argmin(-1)
    return torch.where(stuck, oldest, choice)


@torch.library.custom_op("kvpass::kv_overlay_store_", mutates_args=("ov_k", "ov_v", "ov_slot", "score"))
def kv_overlay_store_(
    ov_k: torch.Tensor,
    ov_v: torch.Tensor,
    ov_slot: torch.Tensor,
    score: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    positions: torch.Tensor,
    recent: int,
    sink: int,
    by_score: bool,
) -> None:
    """Place new tokens ``[B, H, T, D]`` at ``positions`` into the overlay, evicting by score or age."""
    reference_overlay_store(ov_k, ov_v, ov_slot, score, new_k, new_v, positions, recent, sink, by_score)


def reference_overlay_store(ov_k, ov_v, ov_slot, score, new_k, new_v, positions, recent: int, sink: int,
                            by_score: bool) -> None:
    """``kv_overlay_store_`` in plain torch, one token at a time (every device)."""
    b, h = ov_slot.shape[:2]
    log = journal.active() is not None
    taken, old_k, old_v = [], [], []
    for t, p in enumerate(positions.tolist()):
        # a slot being (re)written starts afresh: drop any entry still holding it and zero its score
        ov_slot.masked_fill_(ov_slot == p + 1, 0)
        score[:, :, p] = 0
        entry = insert(ov_slot, score, p, recent, sink, by_score)  # [B, H]
        idx = entry[..., None]
        k_idx, v_idx = (idx[..., None].expand(b, h, 1, x.shape[-1]) for x in (ov_k, ov_v))
        if log:  # the entry and the rows it held, for a failed step to put back
            taken.append(idx)
            old_k.append(ov_k.gather(2, k_idx))
            old_v.append(ov_v.gather(2, v_idx))
        ov_slot.scatter_(-1, idx, torch.full_like(idx, p + 1, dtype=ov_slot.dtype))
        ov_k.scatter_(2, k_idx, new_k[:, :, t:t + 1].to(ov_k.dtype))
        ov_v.scatter_(2, v_idx, new_v[:, :, t:t + 1].to(ov_v.dtype))
    if taken:
        taken_ = torch.cat(taken, -1)
        journal.save_taken(ov_k, taken_, torch.cat(old_k, 2))
        journal.save_taken(ov_v, taken_, torch.cat(old_v, 2))


@kv_overlay_store_.register_fake
def _(ov_k, ov_v, ov_slot, score, new_k, new_v, positions, recent, sink, by_score) -> None:
    return None


def with_overlay(dense: torch.Tensor | None, ov: torch.Tensor, ov_slot: torch.Tensor, n: int, dtype) -> torch.Tensor:
    """``dense`` ``[B, H, n, D]`` (zeros when None) with the overlay's rows written at their slots."""
    b, h, _, d = ov.shape
    out = torch.zeros(b, h, n, d, dtype=dtype, device=ov.device) if dense is None else dense.clone()
    slots = ov_slot.long() - 1
    valid = (slots >= 0) & (slots < n)
    target = torch.where(valid, slots, torch.full_like(slots, n))  # invalid entries go to a scratch row
    padded = torch.cat([out, out.new_zeros(b, h, 1, d)], dim=2)
    padded.scatter_(2, target[..., None].expand(b, h, -1, d), ov.to(dtype))
    return padded[:, :, :n]


@dataclass(frozen=True)
class OverlayMeta(OpMeta):
    """What ``kv_overlay_attention_`` reads fixed at compile time: the low-precision caches' specs ("" where a side
    has none), their length, the softmax scale, whether only the overlay is read (``evict``), and whether each
    token's attention mass is added to its score (``accumulate``)."""

    k: str
    v: str
    max_len: int
    scale: float
    evict: bool = False
    accumulate: bool = False


@torch.library.custom_op("kvpass::kv_overlay_attention_", mutates_args=("score",))
def kv_overlay_attention_(
    q: torch.Tensor,
    k_cache: list[torch.Tensor],
    k_static: list[torch.Tensor],
    v_cache: list[torch.Tensor],
    v_static: list[torch.Tensor],
    mask: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    ov_k: torch.Tensor,
    ov_v: torch.Tensor,
    ov_slot: torch.Tensor,
    score: torch.Tensor,
    meta: str,
) -> torch.Tensor:
    """Attention over the low-precision cache with the overlay substituted (only the overlay if ``evict``);
    adds each token's attention mass to ``score`` when ``accumulate``. ``meta`` is an :class:`OverlayMeta`."""
    return reference_overlay_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, ov_k, ov_v,
                                       ov_slot, score, OverlayMeta.parse(meta))


def reference_overlay_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, ov_k, ov_v, ov_slot,
                                score, m: OverlayMeta) -> torch.Tensor:
    """``kv_overlay_attention_`` in plain torch (every device): the caches dequantized, the overlay scattered in."""
    max_len, scale, evict, accumulate = m.max_len, m.scale, m.evict, m.accumulate
    k_spec, v_spec = m.k, m.v
    n = visible_length(mask, q_positions, max_len)
    dk, dv = ov_k.shape[-1], ov_v.shape[-1]
    k = None if evict else kvcache.load(k_cache, k_static, kvcache.parse_cache_spec(k_spec), dk, max_len, q.dtype, n)
    v = None if evict else kvcache.load(v_cache, v_static, kvcache.parse_cache_spec(v_spec), dv, max_len, q.dtype, n)
    k, v = with_overlay(k, ov_k, ov_slot, n, q.dtype), with_overlay(v, ov_v, ov_slot, n, q.dtype)
    if mask is not None:
        mask = mask[..., :n]
    if evict:
        b, hkv = ov_slot.shape[:2]
        present = torch.zeros(b, hkv, n + 1, dtype=torch.bool, device=q.device)
        slots = ov_slot.long() - 1
        present.scatter_(-1, torch.where((slots >= 0) & (slots < n), slots, torch.full_like(slots, n)), True)
        present = present[..., :n].repeat_interleave(q.shape[1] // hkv, dim=1)[:, :, None, :]  # [B, Hq, 1, n]
        if mask is None and q_positions is not None:
            mask = torch.arange(n, device=q.device)[None, :] <= q_positions[:, None]
        allowed = present if mask is None else (mask if mask.dtype == torch.bool else mask > float("-inf")) & present
        mask = allowed if mask is None or mask.dtype == torch.bool else mask.masked_fill(~allowed, float("-inf"))
    out, mass = reference_attention(q, k, v, mask, q_positions, scale, accumulate)
    if accumulate:
        score[:, :, :n] += mass
    return out.contiguous()


@kv_overlay_attention_.register_fake
def _(q, k_cache, k_static, v_cache, v_static, mask, q_positions, ov_k, ov_v, ov_slot, score, meta):
    b, hq, t, _ = q.shape
    return q.new_empty((b, hq, t, ov_v.shape[-1]))


__all__ = ["OverlayMeta", "attention_mass", "kv_overlay_attention_", "kv_overlay_store_", "reference_overlay_attention",
           "reference_overlay_store", "with_overlay"]
