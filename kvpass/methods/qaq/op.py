"""``kvpass::kv_qaq_attention_``: QAQ's one op, which writes new tokens into the window, attends, and codes the
tokens that left the window into their tiers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpass.errors import KVPassError
from kvpass.kvcache import CacheSpec, check_range, parse_cache_spec
from kvpass.methods.qaq.config import from_ring, pack_map, tier_bits, to_ring, unpack_map
from kvpass.methods.qaq.formulas import key_bits, quantile_norm, to_tier, token_range, value_bits
from kvpass.methods.qaq.storage import assign, promote, read, split_buffers, write
from kvpass.ops.attention import apply_rope, attention_scores, masked_softmax, visible_length
from kvpass.ops.meta import OpMeta


def _tier_specs(text: str) -> list[CacheSpec]:
    return [parse_cache_spec(t) for t in text.split(";")]


def _window_max(probs: torch.Tensor, q_pos: torch.Tensor, cols: torch.Tensor, window: int, kv_heads: int) -> torch.Tensor:
    """Largest attention each of the tokens at ``cols`` received from queries at most ``window - 1`` steps later,
    over the heads of its GQA group: ``[B, Hkv, len(cols)]``. Queries and columns are consecutive positions, so the
    queries ``age`` steps after their tokens lie on one diagonal of ``probs`` (a view): one diagonal per age, not
    a copy of every query's row."""
    b, hq = probs.shape[:2]
    p0, c0 = int(q_pos[0]), int(cols[0])
    out = probs.new_zeros(b, hq, len(cols))
    for age in range(window):
        diag = torch.diagonal(probs, p0 - age, -2, -1)  # query i against slot p0 + i - age
        # where the diagonal's first slot sits among the columns (>= 0: they start window - 1 before p0)
        first = max(p0 - age, 0) - c0
        seg = out[..., first:first + diag.shape[-1]]
        torch.maximum(seg, diag, out=seg)
    return out.reshape(b, kv_heads, hq // kv_heads, -1).amax(2)


@dataclass(frozen=True)
class QAQMeta(OpMeta):
    """What ``kv_qaq_attention_`` reads fixed at compile time: the value and key tier cache specs joined by ``;``,
    each tier's capacity in tokens, the error budget ``eps``, the window, the query-norm quantile, the sink, the cache
    length, the softmax scale and, for keys stored before RoPE, its variant and rotary dims."""

    tiers: str
    key_tiers: str
    k_capacity: tuple[int, ...]
    v_capacity: tuple[int, ...]
    eps: float
    window: int
    quantile: float
    sink: int
    max_len: int
    scale: float
    rope: str = ""
    rotary_dim: int = 0


@torch.library.custom_op("kvpass::kv_qaq_attention_", mutates_args=("k_bufs", "v_bufs", "state"))
def kv_qaq_attention_(
    q: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    positions: torch.Tensor,
    k_bufs: list[torch.Tensor],
    v_bufs: list[torch.Tensor],
    state: list[torch.Tensor],
    mask: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    meta: str,
) -> torch.Tensor:
    """Write new K/V ``[B, Hkv, T, D]`` at ``positions``, attend ``q`` over the cache, then code the tokens that
    left the window into their tiers; ``meta`` is a :class:`QAQMeta`. ``state`` is ``[k_map, v_map, k_ring, v_ring,
    ring_score, q_stats]`` (the maps packed), then ``k_retained, v_retained`` when the method retains
    model-precision copies (decided tokens may then move up a tier). When ``meta.rope`` names the variant, ``new_k``
    is before its rotary embedding, keys are stored (and ranked by range) that way and rotated by the cached
    ``rope_cos``/``rope_sin`` ``[B or 1, 1, max_len, rotary_dim]`` of their slots at read time."""
    m = QAQMeta.parse(meta)
    k_capacity, v_capacity, eps, window, quantile, sink = m.k_capacity, m.v_capacity, m.eps, m.window, m.quantile, m.sink
    max_len, scale, rope, rotary_dim = m.max_len, m.scale, m.rope, m.rotary_dim
    k_packed, v_packed, k_ring, v_ring, ring_score, q_stats, *retained = state
    k_map, v_map = unpack_map(k_packed), unpack_map(v_packed)
    kspecs, vspecs = _tier_specs(m.key_tiers), _tier_specs(m.tiers)
    for specs, new in ((kspecs, new_k), (vspecs, new_v)):  # before anything is written
        for cs in specs:
            check_range(new, cs)
    kb, vb = split_buffers(k_bufs, kspecs), split_buffers(v_bufs, vspecs)
    b, hkv, t, dk = new_k.shape
    dv, r = new_v.shape[-1], window - 1
    p0, last = int(positions[0]), int(positions[-1])
    if positions.tolist() != list(range(p0, last + 1)):
        raise KVPassError(f"QAQ writes tokens in order; got positions {positions.tolist()[:8]}...")
    if p0 == 0:  # a new sequence
        q_stats.zero_()
    k_map[..., p0:] = 0
    v_map[..., p0:] = 0
    logn = q.float().norm(dim=-1).clamp_min(1e-6).log().reshape(b, hkv, -1)
    q_stats += torch.stack([torch.full_like(logn[..., 0], logn.shape[-1]), logn.sum(-1), logn.pow(2).sum(-1)], -1)

    if retained:
        retained[0][:, :, positions] = new_k.to(retained[0].dtype)
        retained[1][:, :, positions] = new_v.to(retained[1].dtype)
    ring_pos = torch.arange(max(0, p0 - r), p0, device=positions.device)
    pend_pos = torch.cat([ring_pos, positions])
    # the chunk's tokens as the ring will hold them, so that a prompt reads its window as decoding does
    k_rows = torch.cat([k_ring[:, :, ring_pos % max(r, 1)], to_ring(new_k, k_ring.dtype)], 2)
    v_rows = torch.cat([v_ring[:, :, ring_pos % max(r, 1)], to_ring(new_v, v_ring.dtype)], 2)
    pend_k, pend_v = from_ring(k_rows, new_k.dtype), from_ring(v_rows, new_v.dtype)
    score = torch.cat([ring_score[..., ring_pos % max(r, 1)], ring_score.new_zeros(b, hkv, t)], -1)

    n = visible_length(mask, q_positions, max_len)

    def rotated(keys: torch.Tensor) -> torch.Tensor:  # [B, H, n, D] as attention reads them
        return keys if not rope else apply_rope(keys, rope_cos[:, :, :n], rope_sin[:, :, :n], rope, rotary_dim)

    k = read(kb, kspecs, k_map, n, dk, q.dtype)
    v = read(vb, vspecs, v_map, n, dv, q.dtype)
    k[:, :, pend_pos] = pend_k.to(q.dtype)
    v[:, :, pend_pos] = pend_v.to(q.dtype)
    k = rotated(k)

    # the window's attention (what decides tiers) sees every pending token at model precision
    exact_scores = attention_scores(q, k, scale)
    probs = masked_softmax(exact_scores, None if mask is None else mask[..., :n], q_positions)
    score = torch.maximum(score, _window_max(probs, positions, pend_pos, window, hkv))

    done = pend_pos <= last - r  # seen by the whole window
    qn = quantile_norm(q_stats, quantile)[..., None]
    tier_bits_ = tuple(tier_bits(cs.format) for cs in vspecs)  # the key tiers have the same bits
    decided = max(0, p0 - r)
    if retained and decided:
        # tokens already in tiers whose attention now asks for more bits move up, re-coded from their copies
        now = probs[..., :decided].reshape(b, hkv, -1, decided).amax(2)
        k_keep, v_keep = (x[:, :, :decided] for x in retained)
        promote(k_map, k_keep, to_tier(key_bits(now, token_range(k_keep), qn, dk, eps), tier_bits_), k_capacity,
                kb, kspecs)
        promote(v_map, v_keep, to_tier(value_bits(now, token_range(v_keep), eps), tier_bits_), v_capacity, vb, vspecs)
    if bool(done.any()):
        start = int(pend_pos[done][0])
        alpha = score[..., done]
        bits = (key_bits(alpha, token_range(pend_k[:, :, done]), qn, dk, eps),
                value_bits(alpha, token_range(pend_v[:, :, done]), eps))
        for x, bits_, bufs, specs, cap, tmap in ((pend_k, bits[0], kb, kspecs, k_capacity, k_map),
                                                  (pend_v, bits[1], vb, vspecs, v_capacity, v_map)):
            wanted = to_tier(bits_, tier_bits_)
            wanted[..., pend_pos[done] < sink] = len(tier_bits_) - 1  # the sink: the highest tier
            tier, entry = assign(tmap, start, wanted, cap)
            write(bufs, specs, x[:, :, done], tier, entry)
            tmap[..., start:start + tier.shape[-1]] = (tier + 1).to(tmap.dtype)
    if t > 1 and bool(done.any()):
        # a prompt chunk: each query reads the tokens that left its own window as they are now stored, as it
        # would have when decoding, not the model-precision copies the chunk still holds
        stored_k, stored_v = read(kb, kspecs, k_map, n, dk, q.dtype), read(vb, vspecs, v_map, n, dv, q.dtype)
        stored_k[:, :, pend_pos[~done]] = pend_k[:, :, ~done].to(q.dtype)
        stored_v[:, :, pend_pos[~done]] = pend_v[:, :, ~done].to(q.dtype)
        recent = torch.arange(n, device=q.device) >= (positions[:, None] - r)  # [T, n]: still in its window
        out = _attend_mixed(q, exact_scores, v, (rotated(stored_k), stored_v), recent,
                            None if mask is None else mask[..., :n], q_positions, scale)
    else:  # decoding: the pending tokens are exactly the query's window
        out = (probs @ v.float().repeat_interleave(q.shape[1] // hkv, 1)).to(q.dtype)
    if r:
        keep = ~done
        ring_slots = pend_pos[keep] % r
        k_ring[:, :, ring_slots] = k_rows[:, :, keep]
        v_ring[:, :, ring_slots] = v_rows[:, :, keep]
        ring_score[..., ring_slots] = score[..., keep]
    k_packed.copy_(pack_map(k_map))
    v_packed.copy_(pack_map(v_map))
    return out.contiguous()


def _attend_mixed(q: torch.Tensor, exact_scores: torch.Tensor, exact_v: torch.Tensor,
                  stored: tuple[torch.Tensor, torch.Tensor], recent: torch.Tensor, mask: torch.Tensor | None,
                  q_positions: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention ``[B, Hq, T, Dv]`` where query ``i`` reads slot ``s`` exact if ``recent[i, s]`` (its scaled fp32
    scores ``exact_scores`` ``[B, Hq, T, n]``, values ``exact_v``) and as ``stored`` otherwise (keys and values
    ``[B, Hkv, n, D]``)."""
    groups = q.shape[1] // exact_v.shape[1]
    v_s, v_e = (x.float().repeat_interleave(groups, 1) for x in (stored[1], exact_v))
    scores = torch.where(recent, exact_scores, attention_scores(q, stored[0], scale))
    probs = masked_softmax(scores, mask, q_positions)
    # the values differ only where a query reads them exact
    return (probs @ v_s + (probs * recent) @ (v_e - v_s)).to(q.dtype)


@kv_qaq_attention_.register_fake
def _(q, new_k, new_v, positions, k_bufs, v_bufs, state, mask, q_positions, rope_cos, rope_sin, meta):
    b, hq, t, _ = q.shape
    return q.new_empty((b, hq, t, new_v.shape[-1]))
