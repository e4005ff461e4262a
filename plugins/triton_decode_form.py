"""Fused dequantize + attention in Triton for every cache layout kvpass's methods use (the decode form).

The per-token integer kernel of :mod:`kvpass.plugins.triton_attention` is specialised for speed; this one takes
the same fields as the native CPU kernel (:func:`kvpass.lowering.cpu.describe`) and decodes element (t, d) of head
h through one form, reading only the packed buffers:

    v = table[code]                      nuq LUT (shared, or per head and channel), Lloyd-Max codebook, fp8 values
    v = v * ch_mul[h, d] + ch_add[h, d]  calibrated ranges, a per-head fp8 scale
    x = zero[t, g] + scale[t, g] * v     per-token (or per residual block and channel) scale and zero point
    x[t, idx] = outlier value            dense-and-sparse outliers
    x = sink / ring rows                 model-precision sink tokens, recent or residual windows
    x = RoPE(x, t)                       keys stored before RoPE, rotated per tile (half or interleaved)

Codes are read as the little-endian bit stream of :mod:`kvpass.formats.packing` (code i at bit i*bits; a code may
straddle two bytes) from rows (``[B, H, S, bytes]``) or from per-channel blocks (``[B, H, blocks, D, bytes]``, the
block's tokens along the last axis). Each program takes one (sequence, KV head) and a split of the context, scores
every query row of the GQA group against each decoded tile and keeps an online softmax; the splits are merged by
their log-sum-exp (the merge kernel of :mod:`~kvpass.plugins.triton_attention`). Head dims need not be powers of
two (channels are masked). Dots take the queries' dtype with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpass.plugins.triton_attention import MAX_ROWS, _merge_kernel, _sm_count, softmax_step, unpack_rows
from triton.runtime.errors import OutOfResources

N_TENSORS, N_INTS = 16, 13  # the fields of lowering.cpu.describe
MIN_BLOCK_N = 16  # tl.dot's smallest tile
_fitting: dict[tuple, int] = {}  # per kernel signature, the largest tile that fitted where the first one did not


@triton.jit
def _decode_tile(main, table, mul, add, scale, zero, oval, oidx, sink, ring, cos, sin, centre,
                 b, h, tok, tok_ok, ch, ring_from, ring_to,
                 sm0, sm1, sm2, sm3, ss0, ss1, ss2, ss3, so0, so1, so2, so3, sk0, sk1, sk2, sr0, sr1, sr2, sc0, sc1,
                 sce0, sce1,
                 KIND: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, GSIZE: tl.constexpr,
                 HAS_TABLE: tl.constexpr, CHAN_TABLE: tl.constexpr, NTAB: tl.constexpr, AFFINE: tl.constexpr,
                 SCALED: tl.constexpr, ZEROED: tl.constexpr, NOUT: tl.constexpr, SINK_N: tl.constexpr,
                 RING_R: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr, RDIM: tl.constexpr,
                 CONTIG: tl.constexpr, BLOCK_N: tl.constexpr, CENTRED: tl.constexpr):
    """Tokens ``tok`` ``[N]`` of head (b, h), channels ``ch`` ``[C]``, decoded to float32 ``[N, C]`` (zeros where
    ``tok_ok`` is false or the channel is past ``D``). ``CONTIG``: ``ch`` is every channel, ``D`` a power of two and
    the codes rows of whole bytes, read contiguously (otherwise code by code from the bit stream)."""
    ch_ok = ch < D
    ok = tok_ok[:, None] & ch_ok[None, :]
    coded = tok_ok
    if SINK_N > 0:
        coded = coded & (tok >= SINK_N)
    if RING_R > 0:
        coded = coded & (tok < ring_from)
    cok = coded[:, None] & ch_ok[None, :]
    if KIND == 0:  # dense model-precision rows
        x = tl.load(main + b * sm0 + h * sm1 + tok[:, None] * sm2 + ch[None, :], mask=cok, other=0.0).to(tl.float32)
    else:
        if KIND == 1 and CONTIG:  # rows of whole bytes per code unit, every channel: read contiguously
            i = tok
            code = unpack_rows(main + b * sm0 + h * sm1 + tok[:, None] * sm2, coded, D, BLOCK_N, BITS).to(tl.int32)
        else:
            if KIND == 1:  # rows: token t's codes are one bit stream over the channels
                i = tok  # the element's index for the outlier test
                bit = ch * BITS
                off = (b * sm0 + h * sm1 + tok[:, None] * sm2) + (bit >> 3)[None, :]
                shift = (bit & 7)[None, :] + tl.zeros_like(off)
            else:  # blocks: channel d's codes of a block run along the block's tokens
                blk = tok // BLOCK
                i = tok % BLOCK
                bit = i * BITS
                off = (b * sm0 + h * sm1 + blk[:, None] * sm2 + ch[None, :] * sm3) + (bit >> 3)[:, None]
                shift = (bit & 7)[:, None] + tl.zeros_like(off)
            word = tl.load(main + off, mask=cok, other=0).to(tl.int32)
            if 8 % BITS != 0:  # a code may straddle into the next byte
                hi = tl.load(main + off + 1, mask=cok & (shift + BITS > 8), other=0).to(tl.int32)
                word = word | (hi << 8)
            code = (word >> shift) & ((1 << BITS) - 1)
        if HAS_TABLE:
            if CHAN_TABLE:
                x = tl.load(table + (h * D + ch[None, :]) * NTAB + code, mask=cok, other=0.0)
            else:
                x = tl.load(table + code, mask=cok, other=0.0)
        else:
            x = code.to(tl.float32)
        if AFFINE:
            x = (x * tl.load(mul + h * D + ch, mask=ch_ok, other=0.0)[None, :]
                 + tl.load(add + h * D + ch, mask=ch_ok, other=0.0)[None, :])
        if SCALED and KIND == 1 and CONTIG:  # a [N, groups] load, broadcast over each group
            NG: tl.constexpr = D // GSIZE
            soff = (b * ss0 + h * ss1 + tok[:, None] * ss2) + tl.arange(0, NG)[None, :]
            s = tl.load(scale + soff, mask=coded[:, None], other=0.0).to(tl.float32)
            x = tl.reshape(x, (BLOCK_N, NG, GSIZE)) * s[:, :, None]
            if ZEROED:
                x += tl.load(zero + soff, mask=coded[:, None], other=0.0).to(tl.float32)[:, :, None]
            x = tl.reshape(x, (BLOCK_N, D))
        elif SCALED:
            if KIND == 1:
                soff = (b * ss0 + h * ss1 + tok[:, None] * ss2) + (ch // GSIZE)[None, :]
            else:
                soff = b * ss0 + h * ss1 + blk[:, None] * ss2 + ch[None, :] * ss3 + (i // GSIZE)[:, None]
            s = tl.load(scale + soff, mask=cok, other=0.0).to(tl.float32)
            if ZEROED:
                x = tl.load(zero + soff, mask=cok, other=0.0).to(tl.float32) + s * x
            else:
                x = s * x
        for k in tl.static_range(NOUT):
            if KIND == 1:
                o = b * so0 + h * so1 + tok * so2 + k
                idx = tl.load(oidx + o, mask=coded, other=-1).to(tl.int32)
                val = tl.load(oval + o, mask=coded, other=0.0).to(tl.float32)
                x = tl.where(ch[None, :] == idx[:, None], val[:, None], x)
            else:
                o = b * so0 + h * so1 + blk[:, None] * so2 + ch[None, :] * so3 + k
                idx = tl.load(oidx + o, mask=cok, other=-1).to(tl.int32)
                val = tl.load(oval + o, mask=cok, other=0.0).to(tl.float32)
                x = tl.where(idx == i[:, None], val, x)
        if CENTRED:  # the centre the coded rows were taken from
            x += tl.load(centre + b * sce0 + h * sce1 + ch, mask=ch_ok, other=0.0)[None, :]
    if SINK_N > 0:
        is_sink = tok < SINK_N
        xs = tl.load(sink + b * sk0 + h * sk1 + tok[:, None] * sk2 + ch[None, :], mask=ok & is_sink[:, None],
                     other=0.0).to(tl.float32)
        x = tl.where(is_sink[:, None], xs, x)
    if RING_R > 0:
        in_ring = (tok >= ring_from) & tok_ok
        held = in_ring & (tok < ring_to)
        xr = tl.load(ring + b * sr0 + h * sr1 + (tok % RING_R)[:, None] * sr2 + ch[None, :], mask=ch_ok[None, :] &
                     held[:, None], other=0.0).to(tl.float32)
        x = tl.where(in_ring[:, None], xr, x)
    if ROPE > 0:
        rot = ch < RDIM
        c = tl.load(cos + b * sc0 + tok[:, None] * sc1 + ch[None, :], mask=tok_ok[:, None] & rot[None, :], other=1.0)
        s = tl.load(sin + b * sc0 + tok[:, None] * sc1 + ch[None, :], mask=tok_ok[:, None] & rot[None, :], other=0.0)
        x = x * c
        return x, s
    return x, x


@triton.jit
def _rope_partner(ch, RDIM: tl.constexpr, ROPE: tl.constexpr):
    """The channel each rotary channel pairs with, and the sign of its share (x' = x cos + sign partner sin)."""
    if ROPE == 1:
        half = RDIM // 2
        partner = tl.where(ch < half, ch + half, tl.where(ch < RDIM, ch - half, ch))
        sign = tl.where(ch < half, -1.0, 1.0)
    else:
        partner = tl.where(ch < RDIM, ch ^ 1, ch)
        sign = tl.where(ch % 2 == 0, -1.0, 1.0)
    return partner, sign


@triton.jit
def _form_kernel(
    q_ptr, mask_ptr, o_ptr, m_ptr, l_ptr, n_tokens, tokens_per_split, sm_scale,
    stride_qb, stride_qh, stride_qt, stride_mb, stride_mh, stride_mt,
    km, ktab, kmul, kadd, ksc, kze, kov, koi, ksk, kri, kcos, ksin, kce, k_ring_from, k_ring_to,
    ksm0, ksm1, ksm2, ksm3, kss0, kss1, kss2, kss3, kso0, kso1, kso2, kso3, ksk0, ksk1, ksk2, ksr0, ksr1, ksr2,
    ksc0, ksc1, kce0, kce1,
    vm, vtab, vmul, vadd, vsc, vze, vov, voi, vsk, vri, vce, v_ring_from, v_ring_to,
    vsm0, vsm1, vsm2, vsm3, vss0, vss1, vss2, vss3, vso0, vso1, vso2, vso3, vsk0, vsk1, vsk2, vsr0, vsr1, vsr2,
    vce0, vce1,
    HKV: tl.constexpr, GROUPS: tl.constexpr, T: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    DV: tl.constexpr, DVP: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_GSIZE: tl.constexpr, K_HAS_TABLE: tl.constexpr,
    K_CHAN_TABLE: tl.constexpr, K_NTAB: tl.constexpr, K_AFFINE: tl.constexpr, K_SCALED: tl.constexpr,
    K_ZEROED: tl.constexpr, K_NOUT: tl.constexpr, K_SINK_N: tl.constexpr, K_RING_R: tl.constexpr,
    K_BLOCK: tl.constexpr, K_ROPE: tl.constexpr, K_RDIM: tl.constexpr, K_CONTIG: tl.constexpr, K_CENTRED: tl.constexpr,
    V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_GSIZE: tl.constexpr, V_HAS_TABLE: tl.constexpr,
    V_CHAN_TABLE: tl.constexpr, V_NTAB: tl.constexpr, V_AFFINE: tl.constexpr, V_SCALED: tl.constexpr,
    V_ZEROED: tl.constexpr, V_NOUT: tl.constexpr, V_SINK_N: tl.constexpr, V_RING_R: tl.constexpr,
    V_BLOCK: tl.constexpr, V_CONTIG: tl.constexpr, V_CENTRED: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUPS * T
    head = hkv * GROUPS + rows // T
    t = rows % T
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :],
                mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DVP), tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_tokens)
    for it in range(tl.cdiv(tokens_per_split, BLOCK_N)):
        tok = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
        tok_ok = tok < end
        k, ksn = _decode_tile(km, ktab, kmul, kadd, ksc, kze, kov, koi, ksk, kri, kcos, ksin, kce, b, hkv, tok, tok_ok,
                              d, k_ring_from, k_ring_to, ksm0, ksm1, ksm2, ksm3, kss0, kss1, kss2, kss3, kso0, kso1,
                              kso2, kso3, ksk0, ksk1, ksk2, ksr0, ksr1, ksr2, ksc0, ksc1, kce0, kce1, K_KIND, K_BITS,
                              D, K_GSIZE, K_HAS_TABLE, K_CHAN_TABLE, K_NTAB, K_AFFINE, K_SCALED, K_ZEROED, K_NOUT,
                              K_SINK_N, K_RING_R, K_BLOCK, K_ROPE, K_RDIM, K_CONTIG, BLOCK_N, K_CENTRED)
        if K_ROPE > 0:  # k holds x cos; the partner channels, decoded once more, bring their sin share
            partner, sign = _rope_partner(d, K_RDIM, K_ROPE)
            kp, _ = _decode_tile(km, ktab, kmul, kadd, ksc, kze, kov, koi, ksk, kri, kcos, ksin, kce, b, hkv, tok,
                                 tok_ok, partner, k_ring_from, k_ring_to, ksm0, ksm1, ksm2, ksm3, kss0, kss1, kss2,
                                 kss3, kso0, kso1, kso2, kso3, ksk0, ksk1, ksk2, ksr0, ksr1, ksr2, ksc0, ksc1, kce0,
                                 kce1, K_KIND, K_BITS, D, K_GSIZE, K_HAS_TABLE, K_CHAN_TABLE, K_NTAB, K_AFFINE,
                                 K_SCALED, K_ZEROED, K_NOUT, K_SINK_N, K_RING_R, K_BLOCK, 0, K_RDIM, False, BLOCK_N,
                                 K_CENTRED)
            k = k + sign[None, :] * kp * ksn
        s = tl.dot(q, tl.trans(k.to(q.dtype))).to(tl.float32) * sm_scale
        allowed = row_ok[:, None] & tok_ok[None, :]
        if HAS_MASK:
            s += tl.load(mask_ptr + b * stride_mb + head[:, None] * stride_mh + t[:, None] * stride_mt + tok[None, :],
                         mask=allowed, other=float("-inf"))
        s = tl.where(allowed, s, float("-inf"))
        p, alpha, m_new = softmax_step(s, m_i)
        v, _ = _decode_tile(vm, vtab, vmul, vadd, vsc, vze, vov, voi, vsk, vri, vm, vm, vce, b, hkv, tok, tok_ok, dv,
                            v_ring_from, v_ring_to, vsm0, vsm1, vsm2, vsm3, vss0, vss1, vss2, vss3, vso0, vso1,
                            vso2, vso3, vsk0, vsk1, vsk2, vsr0, vsr1, vsr2, 0, 0, vce0, vce1, V_KIND, V_BITS, DV,
                            V_GSIZE, V_HAS_TABLE, V_CHAN_TABLE, V_NTAB, V_AFFINE, V_SCALED, V_ZEROED, V_NOUT,
                            V_SINK_N, V_RING_R, V_BLOCK, 0, 0, V_CONTIG, BLOCK_N, V_CENTRED)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype)).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = bh * tl.num_programs(1) + split
    tl.store(o_ptr + out * BLOCK_M * DVP + rows[:, None] * DVP + dv[None, :], acc)
    tl.store(m_ptr + out * BLOCK_M + rows, m_i)
    tl.store(l_ptr + out * BLOCK_M + rows, l_i)


def supports(tensors: list[torch.Tensor | None], ints: list[int]) -> bool:
    """Whether the kernel reads a cache so described (everything but MiKV's overlay rows and rotated codes to decode
    back to the model's space; codes of 1-8 bits)."""
    return tensors[12] is None and tensors[13] is None and tensors[15] is None and 1 <= ints[1] <= 8


def _strides(t: torch.Tensor | None, n: int) -> list[int]:
    if t is None or t.numel() == 0:
        return [0] * n
    s = [t.stride(i) if t.shape[i] > 1 else 0 for i in range(min(n, t.dim()))]
    return s + [0] * (n - len(s))


_device_tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A field on the query's device (the shared codebooks and fp8 tables live on the CPU): copied once (the source
    is kept with its copy, so its storage cannot be freed and its address reused by another table)."""
    if t is None or t.device == device:
        return t
    key = (t.data_ptr(), device)
    if key not in _device_tables:
        _device_tables[key] = (t, t.to(device))
    return _device_tables[key][1]


def _cache_args(tensors, ints, device, keys: bool) -> tuple[list, dict]:
    (main, table, mul, add, scale, zero, oval, oidx, sink, ring, cos, sin, _, _, centre, _) = (
        _on(t, device) for t in tensors)
    kind, bits, dim, gsize, chan_table, sink_n, ring_r, ring_from, ring_to, rope, rdim, block, _ = ints
    if scale is not None and zero is not None:
        assert _strides(scale, 4) == _strides(zero, 4), "scale and zero point must share a layout"
    if oval is not None:
        assert _strides(oval, 4) == _strides(oidx, 4), "outlier values and indices must share a layout"
    dummy = main
    ptrs = [main, table, mul, add, scale, zero, oval, oidx, sink, ring]
    ptrs = [dummy if p is None or p.numel() == 0 else p for p in ptrs]
    if keys:
        ptrs += [dummy if cos is None else cos.reshape(cos.shape[0], cos.shape[-2], cos.shape[-1]),
                 dummy if sin is None else sin.reshape(sin.shape[0], sin.shape[-2], sin.shape[-1])]
    ptrs.append(dummy if centre is None else centre)
    args = ptrs + [ring_from, ring_to] + _strides(main, 4) + _strides(scale, 4) + _strides(oval, 4)
    args += _strides(sink, 3) + _strides(ring, 3)
    if keys:
        args += _strides(None if cos is None else ptrs[10], 2)
    args += _strides(centre, 2)
    p = "K_" if keys else "V_"
    const = {"KIND": kind, "BITS": bits, "GSIZE": gsize or 1, "HAS_TABLE": table is not None,
             "CHAN_TABLE": bool(chan_table), "NTAB": table.shape[-1] if table is not None else 1,
             "AFFINE": mul is not None, "SCALED": scale is not None and scale.numel() > 0,
             "ZEROED": zero is not None and zero.numel() > 0, "NOUT": oval.shape[-1] if oval is not None else 0,
             "SINK_N": sink_n, "RING_R": ring_r, "BLOCK": block or 1,
             "CONTIG": kind == 1 and bits in (2, 4, 8) and dim & (dim - 1) == 0 and dim >= 16
             and dim % (gsize or dim) == 0, "CENTRED": centre is not None}
    if keys:
        const |= {"ROPE": rope, "RDIM": rdim or dim}
    return args, {p + k: v for k, v in const.items()}


def attend(q: torch.Tensor, k_tensors: list, k_ints: list[int], v_tensors: list, v_ints: list[int],
           mask: torch.Tensor | None, n: int, scale: float, block_n: int = 64, splits: int | None = None,
           programs_per_sm: int = 8, num_warps: int = 4) -> torch.Tensor:
    """Attention of ``q`` ``[B, Hq, T, D]`` over slots ``[0, n)`` of two caches described as the CPU kernel's
    fields (:func:`kvpass.lowering.cpu.describe`); ``mask``: additive float ``[B or 1, Hq or 1, T, >= n]``.
    Returns ``[B, Hq, T, Dv]`` in ``q``'s dtype."""
    b, hq, t, d = q.shape
    hkv = k_tensors[0].shape[1]
    groups = hq // hkv
    dv = v_ints[2]
    rows = groups * t
    if rows > MAX_ROWS:
        raise ValueError(f"{rows} query rows per KV head (GQA group {groups} x {t} tokens) exceed {MAX_ROWS}")
    block_m = max(16, triton.next_power_of_2(rows))
    dp, dvp = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    if mask is not None:
        mask = mask.float()
        while mask.dim() < 4:
            mask = mask[None]
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    ms = _strides(mask, 3)
    kargs, kconst = _cache_args(k_tensors, k_ints, q.device, keys=True)
    vargs, vconst = _cache_args(v_tensors, v_ints, q.device, keys=False)
    const = dict(HKV=hkv, GROUPS=groups, T=t, D=d, DP=dp, DV=dv, DVP=dvp, HAS_MASK=mask is not None, BLOCK_M=block_m,
                 **kconst, **vconst)
    signature = (q.dtype, num_warps, *sorted(const.items()))
    block_n = min(block_n, _fitting.get(signature, block_n))
    while True:  # the largest tile that fits: some layouts' gathers need shared memory in proportion to it
        if splits is None:
            sms = _sm_count(q.device.index or 0) if q.is_cuda else 4
            want = max(1, min(triton.cdiv(n, 2 * block_n), triton.cdiv(programs_per_sm * sms, b * hkv)))
        else:
            want = splits
        per_split = triton.cdiv(triton.cdiv(max(n, 1), want), block_n) * block_n
        n_splits = triton.cdiv(max(n, 1), per_split)
        f32 = {"device": q.device, "dtype": torch.float32}
        o = torch.empty(b * hkv, n_splits, block_m, dvp, **f32)
        m = torch.empty(b * hkv, n_splits, block_m, **f32)
        ln = torch.empty(b * hkv, n_splits, block_m, **f32)
        try:
            _launch(_form_kernel, (b * hkv, n_splits), q, mask if mask is not None else q, o, m, ln, n, per_split,
                    scale, q.stride(0), q.stride(1), q.stride(2), *ms, *kargs, *vargs, BLOCK_N=block_n, **const,
                    num_warps=num_warps)
            break
        except OutOfResources:
            if block_n <= MIN_BLOCK_N:
                raise
            block_n //= 2
            _fitting[signature] = block_n
    out = torch.empty(b, hq, t, dvp, device=q.device, dtype=q.dtype)
    _merge_kernel[(b * hkv,)](o, m, ln, out, n_splits, out.stride(0), out.stride(1), out.stride(2),
                              HKV=hkv, GROUPS=groups, T=t, DV=dvp, BLOCK_M=block_m)
    return out[..., :dv]


def _launch(kernel, grid, *args, **kwargs) -> None:
    kernel[grid](*args, **kwargs)


__all__ = ["attend", "supports"]
