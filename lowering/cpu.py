"""CPU lowering of the kvpass attention ops: the native fused kernels of ``plugins/cpu_attention.cpp``.

``kvpass::kv_attention``'s CPU kernel decodes tiles of keys and values straight from the packed buffers
(:func:`describe` turns a cache spec and its buffers into the kernel's fields) for decoding and short prompt chunks,
where reading the cache is the cost; long prompt chunks, where the matmuls are, and calls the kernel cannot take
run the reference kernel (dequantize the visible slots, then SDPA). The exact-window op decodes a token in one
fused call (:func:`recent_decode`) and reads a chunk through :func:`native_reads`; the overlay ops (MiKV, H2O,
StreamingLLM) and the per-token int/fp8 store have native kernels too. Each is registered as its op's CPU kernel,
so eager calls, ``torch.export`` programs and Inductor (which calls the ops as extern kernels) all take it.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import replace

import torch
from kvpass.lowering import cpu_build

from kvpass import kvcache
from kvpass.formats import lloyd_max, rotation
from kvpass.formats.api import transposed
from kvpass.formats.spec import FP8_VARIANTS
from kvpass.formats.uniform import safe
from kvpass.kvcache import CacheSpec, parse_cache_spec
from kvpass.methods.overlay.op import (
    OverlayMeta,
    kv_overlay_attention_,
    kv_overlay_store_,
    reference_overlay_attention,
    reference_overlay_store,
)
from kvpass.ops import journal
from kvpass.ops.attention import visible_length
from kvpass.ops.cache import kv_attention, kv_store_, reference_kv_attention
from kvpass.ops.meta import AttentionMeta, CacheRead
from kvpass.ops.recent import kv_recent_attention_, recent_attention, reference_reads, store_decoded_token

MAX_ROWS = 256  # query rows (GQA group x new tokens) past which a chunk's matmuls outweigh reading the cache
ROPE = {"": 0, "half": 1, "interleaved": 2}
MAX_DIM = 1024  # the kernel's RoPE scratch row


def supports(cs: CacheSpec, head_dim: int) -> bool:
    """Whether the native kernel reads caches of this spec (every spec kvpass's methods use does)."""
    f = cs.format
    if head_dim > MAX_DIM:
        return False
    if f.kind == "float":
        return not cs.residual
    return not transposed(f) or bool(cs.residual)


def reads_rotated(cs: CacheSpec, read: CacheRead, values: bool = False) -> bool:
    """Whether rotated codes (``:hadamard``) are read as stored, in the rotated space (the caller rotates the query
    for keys, the output back for values): where no model-precision rows (sink, rings) sit beside them, keys are not
    rotated by RoPE after decoding, and values keep no outliers (keys' outliers reach the scores through
    :func:`key_outliers_as_scores`). Otherwise the kernel rotates each decoded row back (a fast Hadamard transform)."""
    f = cs.format
    return bool(f.rotate and not read.rope and not (cs.sink or cs.recent or cs.residual)
                and not (values and f.outlier_frac))


def applies(q: torch.Tensor, meta: AttentionMeta) -> bool:
    """Whether the native kernel takes this ``kv_attention`` call."""
    return (q.device.type == "cpu" and q.shape[1] * q.shape[2] <= MAX_ROWS and q.shape[-1] == meta.head_dim
            and supports(meta.key_spec, meta.head_dim) and supports(meta.value_spec, meta.v_head_dim)
            and cpu_build.available())


@functools.cache
def _fp8_table(variant: str) -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_VARIANTS[variant]).float()


def _heads_by_dim(t: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """A static per-head-and-channel tensor (``[1, H, 1, D]``, ``[1, H, 1, 1]`` or ``[1, 1, 1, 1]``) as ``[H, D]``."""
    return t.float().reshape(t.shape[1], t.shape[-1]).expand(heads, dim).contiguous()


def describe(cache: list[torch.Tensor], static: list[torch.Tensor], read: CacheRead, rope_cos: torch.Tensor | None,
             rope_sin: torch.Tensor | None, newest: int | None = None,
             overlay: tuple[torch.Tensor, torch.Tensor] | None = None,
             rotated_space: bool = False) -> tuple[list[torch.Tensor | None], list[int]]:
    """The kernel's fields for one cache: tensors and ints in the slot order of ``plugins/cpu_attention.cpp`` (main,
    table, ch_mul, ch_add, tok_scale, tok_zero, out_val, out_idx, sink, ring, cos, sin, ov_rows, ov_map, centre, signs;
    kind, bits, dim, gsize, chan_table, sink_n, ring_r, ring_from, ring_to, rope, rdim, block, fp8).

    With ``newest`` = p, a ``recent=W`` cache reads positions ``p - W < j <= p`` from its ring (which must hold them)
    and the rest coded, as the query at p does; without, the codes alone (what ``kv_load`` reads). ``overlay`` =
    (rows ``[B, H, C, D]``, map ``[B, H, n]`` int32 of the entry holding each slot or -1) substitutes MiKV's
    high-precision rows. Rotated codes are decoded back to the model's space (``signs``: the kernel's fast Hadamard
    transform) unless ``rotated_space`` (see :func:`reads_rotated`)."""
    cs, d = read.cache_spec, read.head_dim
    f = cs.format
    bufs = dict(zip(kvcache.cache_names(cs), cache))
    params = dict(zip(kvcache.static_names(cs), static))
    heads = cache[0].shape[1]
    tensors: list[torch.Tensor | None] = [None] * 16
    kind, block, table_per_channel = 1, 0, 0
    rows = cs.residual and not transposed(f)  # per-token codes in residual blocks: rows once the blocks are joined

    def per_token(name: str) -> torch.Tensor:
        t = bufs[name]
        return t.flatten(2, 3) if rows else t

    if f.kind == "float":
        kind = 0
        tensors[0] = bufs["data"]
    else:
        tensors[0] = per_token("codes")
        if transposed(f):
            kind, block = 2, cs.residual
    if f.kind == "nuq":
        lut = params["lut"].float()
        if f.qnorm:
            lut = lut * params["qnorm"][0] + params["qnorm"][1]
        table_per_channel = int(f.channel_lut)
        tensors[1] = lut.reshape(heads, d, -1).contiguous() if f.channel_lut else lut.reshape(-1).contiguous()
    elif f.kind == "lm":
        tensors[1] = lloyd_max.codebook(f.bits)
    elif f.kind == "fp8":
        tensors[1] = _fp8_table(f.fp8_variant)
    if f.static:
        lo, hi = params["lo"].float(), params["hi"].float()
        if f.kind == "int":
            mul, add = safe((hi - lo) / ((1 << f.bits) - 1)), lo
        else:
            mul, add = (hi - lo) / 2, (hi + lo) / 2
        tensors[2], tensors[3] = _heads_by_dim(mul, heads, d), _heads_by_dim(add, heads, d)
    elif f.kind == "fp8" and "scale" in params:  # a per-head or per-tensor scale
        tensors[2] = _heads_by_dim(params["scale"], heads, d)
        tensors[3] = torch.zeros(heads, d)
    if f.kind != "float" and not f.static and "scale" in bufs:
        tensors[4] = per_token("scale")
        tensors[5] = per_token("zero") if "zero" in bufs else None
    if f.outlier_frac:
        tensors[6], tensors[7] = per_token("outlier_values"), per_token("outlier_index")
    ring_r = ring_from = ring_to = 0
    if cs.sink:
        tensors[8] = bufs["sink"]
    if cs.residual:
        tensors[9] = bufs["residual"]
        ring_r, ring_to = cs.residual, int(bufs["state"])
        ring_from = min(ring_to // ring_r, bufs["codes"].shape[2] if "codes" in bufs else 0) * ring_r
    elif cs.recent and newest is not None:
        tensors[9] = bufs["recent"]
        ring_r, ring_from, ring_to = cs.recent, max(newest - cs.recent + 1, 0), newest + 1
    if read.rope:
        tensors[10], tensors[11] = rope_cos.float().contiguous(), rope_sin.float().contiguous()
    if overlay is not None:
        tensors[12], tensors[13] = overlay
    if cs.centre:  # added to every coded row (in the rotated space where the codes are read there)
        centre = bufs["centre"].float()[:, :, 0]
        tensors[14] = rotation.rotate(centre) if f.rotate and rotated_space else centre
    if f.rotate and not rotated_space:
        tensors[15] = rotation.signs(d, cache[0].device)
    if transposed(f):
        gsize = f.group or cs.residual
    else:
        gsize = f.group or d
    fp8 = {"e4m3": 1, "e5m2": 2}.get(f.fp8_variant, 0) if f.kind == "fp8" else 0
    ints = [kind, f.bits, d, gsize, table_per_channel, cs.sink, ring_r, ring_from, ring_to, ROPE[read.rope],
            read.rotary_dim, block, fp8]
    return [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in tensors], ints


_last_mask: list = [None, None]  # (weak reference to a mask, (version, n, additive)): every layer gets the same mask


def visible_and_additive(mask: torch.Tensor | None, q_positions: torch.Tensor | None,
                         max_len: int) -> tuple[int, torch.Tensor | None]:
    """The visible length and the kernel's additive mask, converted once per step rather than once per layer."""
    if mask is None:
        return visible_length(None, q_positions, max_len), None
    ref, hit = _last_mask
    if ref is not None and ref() is mask and hit[0] == mask._version:
        return hit[1], hit[2]
    n = visible_length(mask, q_positions, max_len)
    add = additive(mask, n)
    _last_mask[:] = [weakref.ref(mask), (mask._version, n, add)]
    return n, add


def additive(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A bool (True = attend) or additive mask as a float32 additive ``[Bm, Hm, T, n]`` mask."""
    mask = mask[..., :n]
    while mask.dim() < 4:
        mask = mask[None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
    mask = mask.float()
    return mask if mask.stride(-1) == 1 else mask.contiguous()


def attend(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, meta: AttentionMeta,
           n: int, newest: int | None = None, overlay: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The native kernel over slots ``[0, n)``: float32 output ``[B, Hq, T, Dv]``, its log-sum-exp ``[B, Hq, T]``
    (``-inf`` where a row sees nothing; its output is then 0) and, with ``need_mass``, the mass ``[B, Hkv, n]``
    (``newest``: see :func:`describe`; ``overlay``: the overlay's K rows, V rows and slot map)."""
    kt, ki = describe(k_cache, k_static, meta.key_read, rope_cos, rope_sin, newest,
                      None if overlay is None else (overlay[0], overlay[2]),
                      reads_rotated(meta.key_spec, meta.key_read))
    vt, vi = describe(v_cache, v_static, meta.value_read, None, None, newest,
                      None if overlay is None else (overlay[1], overlay[2]),
                      reads_rotated(meta.value_spec, meta.value_read, values=True))
    add = additive(mask, n) if mask is not None else None
    return cpu_build.ops().attend(q.float().contiguous(), kt, ki, vt, vi, add, q_positions, n, meta.scale,
                                       meta.need_mass, k_cache[0].shape[1])


def decode_slots(cache: list[torch.Tensor], static: list[torch.Tensor], read: CacheRead, rope_cos, rope_sin,
                 s0: int, s1: int) -> torch.Tensor:
    """Slots ``[s0, s1)`` of a cache decoded to float32 ``[B, H, s1 - s0, D]`` (keys rotated when ``read`` says)."""
    tensors, ints = describe(cache, static, read, rope_cos, rope_sin)
    return cpu_build.ops().decode(tensors, ints, s0, s1)


@kv_attention.register_kernel("cpu")
def _(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, meta):
    m = AttentionMeta.parse(meta)
    if not applies(q, m):
        return reference_kv_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, m)
    n, add = visible_and_additive(mask, q_positions, m.max_len)
    # rotated codes are read as stored where they can be: q.k is the same between rotated vectors, and the rotated
    # values' weighted sum is rotated back once
    keys_rotated = reads_rotated(m.key_spec, m.key_read)
    values_rotated = reads_rotated(m.value_spec, m.value_read, values=True)
    rq = rotation.rotate(q) if keys_rotated else q
    if keys_rotated and m.key_spec.format.outlier_frac:
        k_cache, m, add = key_outliers_as_scores(q, k_cache, m, add, q_positions, n)
        q_positions = None  # (in the additive mask now)
    out, _, mass = attend(rq, k_cache, k_static, v_cache, v_static, add, q_positions, rope_cos, rope_sin, m, n)
    if values_rotated:
        out = rotation.unrotate(out)
    if m.need_mass and n < m.max_len:
        mass = torch.nn.functional.pad(mass, (0, m.max_len - n))
    return out.to(q.dtype), mass


def key_outliers_as_scores(q: torch.Tensor, k_cache: list[torch.Tensor], meta: AttentionMeta, add: torch.Tensor | None,
                           q_positions: torch.Tensor | None, n: int
                           ) -> tuple[list[torch.Tensor], AttentionMeta, torch.Tensor]:
    """Rotated keys keep their outliers outside the rotation, added onto the decoded rest: their share of each score,
    ``scale * q[idx] * value``, goes into the kernel's additive mask, and the kernel reads the codes alone."""
    cs = meta.key_spec
    bufs = dict(zip(kvcache.cache_names(cs), k_cache))
    vals, idx = bufs["outlier_values"][:, :, :n].float(), bufs["outlier_index"][:, :, :n].long()  # [B, Hkv, n, k]
    b, hq, t, d = q.shape
    hkv = vals.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv * t, 1, d).expand(-1, -1, -1, n, -1)
    picked = qg.gather(-1, idx[:, :, None].expand(-1, -1, qg.shape[2], -1, -1))  # [B, Hkv, G*T, n, k]
    extra = (picked * vals[:, :, None]).sum(-1).reshape(b, hq, t, n) * meta.scale
    if add is not None:
        extra = extra + add
    elif q_positions is not None:
        extra = extra.masked_fill(torch.arange(n, device=q.device) > q_positions[:, None], float("-inf"))
    rest = replace(cs, format=replace(cs.format, outlier_frac=0.0))
    kept = [bufs[name] for name in kvcache.cache_names(rest)]
    return kept, replace(meta, k=str(rest)), extra.contiguous()


def stores_natively(cs: CacheSpec) -> bool:
    """Whether the native store codes new tokens of this spec: per-token int (min/max groups) and fp8 per token,
    without outliers or a residual ring (the others are quantized by :func:`kvpass.kvcache.store`)."""
    f = cs.format
    return (f.granularity == "per_token" and not f.outlier_frac and not cs.residual and not f.static and not cs.centre
            and f.kind in ("int", "fp8") and not f.rotate and f.scale_dtype in (torch.float16, torch.float32))


def store(cache: list[torch.Tensor], static: list[torch.Tensor], new: torch.Tensor, positions: torch.Tensor,
          cs: CacheSpec) -> None:
    """:func:`kvpass.kvcache.store` through the native store where it codes the spec, the same bytes."""
    if not (stores_natively(cs) and cpu_build.available()):
        return kvcache.store(cache, static, new, positions, cs)
    kvcache.check_range(new, cs)
    bufs = dict(zip(kvcache.cache_names(cs), cache))
    f = cs.format
    kvcache.store_sink(bufs, new, positions, cs)
    kind = 0 if f.kind == "int" else 1
    variant = 1 if f.fp8_variant == "e5m2" else 0
    cpu_build.ops().store_rows(new, positions, bufs["codes"], bufs["scale"], bufs.get("zero"), kind, f.bits,
                               f.group or new.shape[-1], variant)


@kv_store_.register_kernel("cpu")
def _(cache, static, new, positions, spec):
    store(cache, static, new, positions, parse_cache_spec(spec))


def native_reads(q, k_cache, k_static, v_cache, v_static, far_add, far_allowed, rope_cos, rope_sin,
                 meta: AttentionMeta, n: int, band: tuple[int, int]):
    """:func:`kvpass.ops.recent.reference_reads` through the native kernel: the far attention straight from the
    codes, and only the band's slots decoded."""
    out, lse, _ = attend(q, k_cache, k_static, v_cache, v_static, far_add, None, rope_cos, rope_sin,
                         replace(meta, need_mass=False), n)
    k = decode_slots(k_cache, k_static, meta.key_read, rope_cos, rope_sin, *band)
    v = decode_slots(v_cache, v_static, meta.value_read, None, None, *band)
    return out, lse, k, v, band[0]


def recent_decode(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos,
                  rope_sin, meta: AttentionMeta) -> torch.Tensor:
    """``kv_recent_attention_`` for one new token at p in one fused call: once the token is stored, the tokens
    p reads exact are the ones the rings hold (a residual ring holds p's unfinished block; a recent ring, with p
    written first, the W newest), so the kernel reads them from there and the rest from the codes."""
    p = int(positions[0])
    store_decoded_token(k_cache, k_static, v_cache, v_static, new_k, new_v, positions, meta, store)
    n, add = visible_and_additive(mask, q_positions, meta.max_len)
    out, _, _ = attend(q, k_cache, k_static, v_cache, v_static, add, q_positions, rope_cos, rope_sin,
                       replace(meta, need_mass=False), n, newest=p)
    return out.to(q.dtype)


@kv_recent_attention_.register_kernel("cpu")
def _(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, meta):
    m = AttentionMeta.parse(meta)
    if q.shape[2] == 1 and new_k.shape[2] == 1 and applies(q, m):
        return recent_decode(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions,
                             rope_cos, rope_sin, m)
    reads = native_reads if applies(q, m) else reference_reads
    return recent_attention(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions,
                            rope_cos, rope_sin, m, reads)


def overlay_map(ov_slot: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, n]`` int32: the overlay entry holding each cache slot, -1 where none (``ov_slot`` holds slot + 1)."""
    b, h, c = ov_slot.shape
    slots = ov_slot.long() - 1
    target = torch.where((slots >= 0) & (slots < n), slots, torch.full_like(slots, n))  # invalid: a scratch column
    entries = torch.arange(c, dtype=torch.int32).expand(b, h, c)
    return torch.full((b, h, n + 1), -1, dtype=torch.int32).scatter_(-1, target, entries)[..., :n].contiguous()


def overlay_only(q, mask, q_positions, ov_k, ov_v, ov_slot, m: OverlayMeta, n: int):
    """H2O / StreamingLLM: attention over the overlay's entries alone (a dense cache of C rows, each masked as its
    slot is), with the mass of each entry. Returns output ``[B, Hq, T, Dv]`` and mass ``[B, Hkv, C]``."""
    b, hkv, c = ov_slot.shape
    groups, t = q.shape[1] // hkv, q.shape[2]
    slots = ov_slot.long() - 1
    valid = (slots >= 0) & (slots < n)
    allowed = valid[:, :, None, :].expand(b, hkv, t, c)
    if mask is not None:
        add = additive(mask, n).expand(b, q.shape[1], t, n)
        per_entry = add.gather(-1, slots.clamp(0, n - 1).repeat_interleave(groups, 1)[:, :, None, :].expand(-1, -1, t, -1))
    else:
        per_entry = torch.zeros(b, q.shape[1], t, c)
        if q_positions is not None:
            allowed = allowed & (slots[:, :, None, :] <= q_positions[None, None, :, None])
    per_entry = per_entry.masked_fill(~allowed.repeat_interleave(groups, 1), float("-inf")).contiguous()
    spec = "fp16" if ov_k.dtype == torch.float16 else "none"
    meta = AttentionMeta(spec, spec, ov_k.shape[-1], ov_v.shape[-1], c, m.scale, need_mass=m.accumulate)
    out, _, mass = attend(q, [ov_k], [], [ov_v], [], per_entry, None, None, None, meta, c)
    return out, mass


@kv_overlay_attention_.register_kernel("cpu")
def _(q, k_cache, k_static, v_cache, v_static, mask, q_positions, ov_k, ov_v, ov_slot, score, meta):
    m = OverlayMeta.parse(meta)
    rows = q.shape[1] * q.shape[2]
    specs = [] if m.evict else [(parse_cache_spec(m.k), ov_k.shape[-1]), (parse_cache_spec(m.v), ov_v.shape[-1])]
    if not (rows <= MAX_ROWS and all(supports(cs, d) for cs, d in specs) and cpu_build.available()):
        return reference_overlay_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, ov_k, ov_v,
                                           ov_slot, score, m)
    n, add = visible_and_additive(mask, q_positions, m.max_len)
    if m.evict:
        out, mass = overlay_only(q, mask, q_positions, ov_k, ov_v, ov_slot, m, n)
        if m.accumulate:
            slots = ov_slot.long() - 1
            valid = (slots >= 0) & (slots < n)
            score.scatter_add_(-1, torch.where(valid, slots, 0), mass.masked_fill(~valid, 0.0))
        return out.to(q.dtype)
    meta_a = AttentionMeta(m.k, m.v, ov_k.shape[-1], ov_v.shape[-1], m.max_len, m.scale, need_mass=m.accumulate)
    ov = (ov_k, ov_v, overlay_map(ov_slot, n))
    out, _, mass = attend(q, k_cache, k_static, v_cache, v_static, add, q_positions, None, None, meta_a, n, overlay=ov)
    if m.accumulate:
        score[:, :, :n] += mass
    return out.to(q.dtype)


@kv_overlay_store_.register_kernel("cpu")
def _(ov_k, ov_v, ov_slot, score, new_k, new_v, positions, recent, sink, by_score):
    contiguous = all(t.is_contiguous() for t in (ov_k, ov_v, ov_slot, score))
    if not (contiguous and ov_slot.dtype == torch.int32 and score.dtype == torch.float32 and cpu_build.available()):
        return reference_overlay_store(ov_k, ov_v, ov_slot, score, new_k, new_v, positions, recent, sink, by_score)
    taken = old_k = old_v = None
    if journal.active() is not None:  # the kernel hands back each token's entry and the row it overwrote
        b, h, t = ov_slot.shape[0], ov_slot.shape[1], new_k.shape[2]
        taken = torch.empty(b, h, t, dtype=torch.long)
        old_k, old_v = (x.new_empty(b, h, t, x.shape[-1]) for x in (ov_k, ov_v))
    cpu_build.ops().overlay_store(ov_k, ov_v, ov_slot, score, new_k, new_v, positions, recent, sink, by_score, taken,
                                  old_k, old_v)
    if taken is not None:
        journal.save_taken(ov_k, taken, old_k)
        journal.save_taken(ov_v, taken, old_v)
