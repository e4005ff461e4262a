"""Attention that reads each query's newest tokens at model precision, per query, in a prompt chunk as in decoding.

Two cache options keep recent tokens at model precision next to the codes:

* ``recent=W``: the query at position p reads token j from a ring of the W newest tokens iff ``p - j < W``;
* ``residual=R`` (KIVI): tokens stay in a ring until their block of R is complete and coded, so the query at p
  reads token j exact iff j is in p's block and writing p did not complete it.

``kv_attention`` reads a cache as it stands after the whole chunk is stored, so in a prompt every query would see
its neighbours coded (every residual block of the prompt complete, the recent ring holding only the chunk's last
W tokens), while decoding sees them exact. ``kv_recent_attention_`` gives every query of a chunk exactly what it
would see if the tokens had been decoded one at a time, so a one-call perplexity measures what generation sees.
It reads the tokens before the chunk that the chunk's queries still read exact (from the rings, before the chunk
overwrites a residual ring), stores the chunk (codes, residual ring, sink), attends, and only then writes the chunk's
newest W tokens into the recent ring (slot ``position % W``), so no ring holds more than W (or R) tokens however
long the chunk. Attention is mostly local, so a few exact neighbours take most of a 2-bit cache's error away
(``docs/methods/kvquant.md``), for W x 16 / length bits per element in fp16.
"""

from __future__ import annotations

import torch

from kvpass import kvcache
from kvpass.errors import KVPassError
from kvpass.kvcache import CacheSpec
from kvpass.ops.attention import apply_rope, causal_mask, load_keys, visible_length
from kvpass.ops.meta import AttentionMeta


def ring_of(cache: list[torch.Tensor], cs: CacheSpec) -> torch.Tensor:
    """The ``[B, H, W or R, D]`` model-precision ring of a cache with ``recent=W`` or ``residual=R``."""
    return dict(zip(kvcache.cache_names(cs), cache))["recent" if cs.recent else "residual"]


def reads_exact(cs: CacheSpec) -> bool:
    """Whether queries read some recent tokens of this cache at model precision (a recent window or a residual)."""
    return bool(cs.recent or cs.residual)


def span(cs: CacheSpec) -> int:
    """The most tokens before and including its own that a query reads exact: W, or R - 1 in a residual."""
    return cs.recent or max(cs.residual - 1, 0)


def first_exact(cs: CacheSpec, positions: torch.Tensor) -> torch.Tensor:
    """The first position each query reads exact: its window's start, or the start of its residual block unless
    writing the query's token completed the block (then the block is coded, as in decoding)."""
    if cs.recent:
        return positions - cs.recent + 1
    if cs.residual:
        return (positions + 1) // cs.residual * cs.residual
    return positions + 1


def before_chunk(cache: list[torch.Tensor], cs: CacheSpec, start: int, w: int) -> torch.Tensor:
    """``[B, H, w, D]``: positions ``start - w .. start - 1`` as this cache holds them at model precision (valid where
    :func:`first_exact` lets a query read them; a residual ring must be read before the chunk is stored)."""
    ring = ring_of(cache, cs)
    return ring[:, :, torch.arange(start - w, start, device=ring.device) % ring.shape[2]]


def blocks(x: torch.Tensor, c: int, w: int) -> torch.Tensor:
    """``[B, H, nb, c + w, D]``: the keys or values that query block ``j`` (queries ``j*c .. j*c + c - 1`` of the
    chunk) may read in its band, from ``x`` ``[B, H, w + nb*c, D]`` (the w positions before the chunk first)."""
    return x.unfold(2, c + w, c).transpose(-1, -2)


def query_block(w: int, t: int) -> int:
    """Queries per block of :func:`near_attention`: at least 32 (fewer, larger matmuls for a short window), never
    more than the chunk has (a decoded token is one query, not a padded block of w)."""
    return min(max(w, 32), t)


def store_decoded_token(k_cache, k_static, v_cache, v_static, new_k, new_v, positions, meta: AttentionMeta,
                        store=kvcache.store) -> None:
    """Store one decoding step's key and value (``store``: the backend's store, same bytes) and, for a ``recent=W``
    cache, write the token into its ring first, so a fused read at p finds the W newest tokens there."""
    for cache, static, new, cs in ((k_cache, k_static, new_k, meta.key_spec), (v_cache, v_static, new_v, meta.value_spec)):
        store(cache, static, new, positions, cs)
        if cs.recent:
            write_ring(ring_of(cache, cs), new, positions)


def write_ring(ring: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> None:
    w = ring.shape[2]
    keep = min(w, new.shape[2])
    ring.index_copy_(2, positions[-keep:] % w, new[:, :, -keep:].to(ring.dtype))


def additive_mask(mask: torch.Tensor | None, q_positions: torch.Tensor | None, t: int, n: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask as float32 to add to scores ``[Bm, Hm, T, n]`` and which entries it lets through (bool)."""
    if mask is None:
        allowed = causal_mask(q_positions, n) if q_positions is not None else torch.ones(t, n, dtype=torch.bool, device=device)
        allowed = allowed[None, None]
        return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf")), allowed
    mask = mask[..., :n]
    while mask.dim() < 4:
        mask = mask[None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf")), mask
    # transformers fills masked entries with the dtype's minimum, others with -inf
    return mask.float(), mask > torch.finfo(mask.dtype).min / 2


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, add: torch.Tensor, allowed: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention ``[B, Hq, T, Dv]`` in float32 and its log-sum-exp ``[B, Hq, T]`` (``-inf`` on rows that see
    nothing); ``k``/``v`` already have ``Hq`` heads."""
    if q.device.type == "cpu":  # the fused kernel returns its log-sum-exp: no [T, n] scores in memory
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k.float(), v.float(), 0.0, False, attn_mask=add, scale=scale)
        out, lse = out.float(), lse.float()
    else:
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale + add
        lse = torch.logsumexp(scores, -1)
        out = torch.softmax(scores, -1).nan_to_num(0.0) @ v.float()
    seen = allowed.any(-1).expand(lse.shape)  # (rows that see nothing come back as NaN or 0, lse 0 or inf)
    return out.masked_fill(~seen[..., None], 0.0), lse.masked_fill(~seen, float("-inf"))


def reference_reads(q, k_cache, k_static, v_cache, v_static, far_add, far_allowed, rope_cos, rope_sin,
                    meta: AttentionMeta, n: int, band: tuple[int, int]):
    """The reads of :func:`recent_attention` through the reference kernels: the far attention (output and
    log-sum-exp, float32) over the visible slots dequantized, and those dequantized keys and values for the bands
    (from slot 0). A backend passes its own (``kvpass.lowering.cpu``: the native kernels, only the band decoded)."""
    groups = q.shape[1] // k_cache[0].shape[1]
    k = load_keys(k_cache, k_static, meta.key_read, q.dtype, rope_cos, rope_sin, n)
    v = load_keys(v_cache, v_static, meta.value_read, q.dtype, None, None, n)
    out_far, lse_far = attend_with_lse(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), far_add,
                                       far_allowed, meta.scale)
    return out_far, lse_far, k, v, 0


def recent_attention(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos,
                     rope_sin, meta: AttentionMeta, reads=reference_reads) -> torch.Tensor:
    """Store the chunk, then two attentions merged by their log-sum-exp (as flash-decoding merges splits): the
    fused kernel over the coded tokens older than every query's band of w tokens, and a small one over each band,
    each token there exact on the side that holds it exact for that query and coded on the other. ``reads`` (see
    :func:`reference_reads`) is how the coded cache is read."""
    ks, vs = meta.key_spec, meta.value_spec
    b, hq, t, _ = q.shape
    if new_k.shape[2] != t:
        raise KVPassError(f"recent tokens read exact need one query per new token, got {t} queries for "
                          f"{new_k.shape[2]} tokens")
    start = int(positions[0])
    if not torch.equal(positions, torch.arange(start, start + t, device=positions.device)):
        raise KVPassError(f"recent tokens read exact need consecutive positions, got {positions[:8].tolist()}...")
    w = max(span(ks), span(vs), 1)
    pre = [before_chunk(c, cs, start, w) if reads_exact(cs) else None for c, cs in ((k_cache, ks), (v_cache, vs))]
    kvcache.store(k_cache, k_static, new_k, positions, ks)
    kvcache.store(v_cache, v_static, new_v, positions, vs)

    n = visible_length(mask, q_positions, meta.max_len)
    add, allowed = additive_mask(mask, q_positions, t, n, q.device)
    in_band = torch.arange(n, device=q.device)[None, :] > positions[:, None] - w  # [T, n]
    far_add, far_seen = add.masked_fill(in_band, float("-inf")), (allowed & ~in_band).any(-1)
    hkv = k_cache[0].shape[1]
    groups = hq // hkv
    c = query_block(w, t)
    band = max(0, start - w), min(n, start + -(-t // c) * c)  # the slots near_attention reads
    out_far, lse_far, k, v, lo = reads(q, k_cache, k_static, v_cache, v_static, far_add, allowed & ~in_band,
                                       rope_cos, rope_sin, meta, n, band)
    seen = far_seen.expand(lse_far.shape)  # rows that see only masked-out entries get nothing from the far part
    out_far, lse_far = out_far.masked_fill(~seen[..., None], 0.0), lse_far.masked_fill(~seen, float("-inf"))

    out_near, lse_near = near_attention(q, k, v, new_k, new_v, pre, positions, add, w, n, rope_cos, rope_sin, meta, lo)

    lse_far = lse_far.reshape(b, hkv, groups, t)
    # a row that sees nothing at all (a padding token) comes out as zeros, as SDPA gives it
    lse = torch.logaddexp(lse_far, lse_near).nan_to_num(0.0, neginf=0.0)
    out = (out_far.reshape(b, hkv, groups, t, -1) * (lse_far - lse).exp()[..., None]
           + out_near * (lse_near - lse).exp()[..., None])
    for cache, cs, new in ((k_cache, ks, new_k), (v_cache, vs, new_v)):
        if cs.recent:
            write_ring(ring_of(cache, cs), new, positions)
    return out.reshape(b, hq, t, -1).to(q.dtype)


def near_attention(q, k, v, new_k, new_v, pre, positions, add, w, n, rope_cos, rope_sin,
                   meta: AttentionMeta, lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query over its band of w tokens ``p - w < j <= p``, token j exact on a side where the query reads it
    exact and coded elsewhere: ``[B, Hkv, G, T, Dv]`` and the log-sum-exp ``[B, Hkv, G, T]``. The chunk's queries go
    in blocks of c (:func:`query_block`), each block against the c + w positions its bands cover (a strided view,
    not a per-query gather of [T, w, D]: a KIVI band is 127 tokens), the scores outside each query's band masked.
    ``k``/``v`` hold the decoded slots from ``lo`` on (at least up to the last slot the bands reach)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    ks, vs, rope = meta.key_spec, meta.value_spec, meta.rope
    c = query_block(w, t)
    nb = -(-t // c)
    start = int(positions[0])
    dev = q.device
    idx = (start - w + torch.arange(w + nb * c, device=dev)).clamp(0, n - 1)  # the positions the blocks cover
    qi = torch.arange(nb * c, device=dev).reshape(nb, c, 1)  # query index in the chunk
    col = (start - w + qi // c * c + torch.arange(c + w, device=dev)).reshape(nb, c, c + w)  # each score's position
    pos = start + qi
    ok = (col > pos - w) & (col <= pos) & (col >= 0) & (col < n) & (qi < t)
    rows = qi.clamp_max(t - 1).expand(nb, c, c + w)  # padding queries borrow the last one's mask row
    band_add = add[..., rows, col.clamp(0, n - 1)]  # [Bm, Hm, nb, c, c + w]
    band_add = band_add.masked_fill(~ok, float("-inf"))
    heads = (1, 1) if band_add.shape[1] == 1 else (hkv, groups)
    band_add = band_add.reshape(band_add.shape[0], *heads, nb, c, c + w)

    def sides(coded: torch.Tensor, cs: CacheSpec, new: torch.Tensor, before: torch.Tensor | None, keys: bool):
        coded_b = blocks(coded[:, :, idx - lo].float(), c, w)
        if not reads_exact(cs):
            return coded_b, None, None
        pad = new.new_zeros(*new.shape[:2], nb * c - t, new.shape[-1])
        exact = torch.cat([before.to(new.dtype), new, pad], 2)
        if keys and rope:
            exact = apply_rope(exact, rope_cos[:, :, idx], rope_sin[:, :, idx], rope, meta.rotary_dim)
        use = col >= first_exact(cs, pos)  # [nb, c, c + w]
        return coded_b, blocks(exact.float(), c, w), use

    kc, ke, k_use = sides(k, ks, new_k, pre[0], True)
    vc, ve, v_use = sides(v, vs, new_v, pre[1], False)
    qb = torch.cat([q.float(), q.new_zeros(b, hq, nb * c - t, d, dtype=torch.float32)], 2)
    qb = qb.reshape(b, hkv, groups, nb, c, d)
    s = torch.einsum("bhgncd,bhnkd->bhgnck", qb, kc)
    if ke is not None:
        s = torch.where(k_use, torch.einsum("bhgncd,bhnkd->bhgnck", qb, ke), s)
    s = s * meta.scale + band_add
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if ve is None:
        out = torch.einsum("bhgnck,bhnkd->bhgncd", p, vc)
    else:
        out = (torch.einsum("bhgnck,bhnkd->bhgncd", p * ~v_use, vc)
               + torch.einsum("bhgnck,bhnkd->bhgncd", p * v_use, ve))
    out = out.reshape(b, hkv, groups, nb * c, -1)[..., :t, :]
    return out, lse.reshape(b, hkv, groups, nb * c)[..., :t]


@torch.library.custom_op("kvpass::kv_recent_attention_", mutates_args=("k_cache", "v_cache"))
def kv_recent_attention_(
    q: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: list[torch.Tensor],
    k_static: list[torch.Tensor],
    v_cache: list[torch.Tensor],
    v_static: list[torch.Tensor],
    mask: torch.Tensor | None,
    q_positions: torch.Tensor | None,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    meta: str,
) -> torch.Tensor:
    """Write the new tokens ``new_k``/``new_v`` ``[B, Hkv, T, D]`` at consecutive ``positions`` into the caches
    (as ``kv_store_`` would) and attend their queries ``q`` ``[B, Hq, T, D]`` over them, each query reading the recent
    tokens its caches' ``recent=W`` or ``residual=R`` option keeps exact for it; then the recent rings take the new
    tokens. Arguments as ``kv_attention`` (``new_k`` is stored before RoPE when ``meta`` names the variant)."""
    return recent_attention(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions,
                            rope_cos, rope_sin, AttentionMeta.parse(meta))


@kv_recent_attention_.register_fake
def _(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, meta):
    b, hq, t, _ = q.shape
    return q.new_empty((b, hq, t, AttentionMeta.parse(meta).v_head_dim))
