"""Fused dequantize + attention for decoding over packed per-token integer caches (Triton).

The reference kernel of ``kvpass::kv_attention`` dequantizes the whole visible cache to a dense tensor and then
runs SDPA: it reads the packed bytes once and writes and reads a full-precision copy, so it moves more memory
than the fp16 cache it replaces. This kernel reads only the packed codes, scales and zero points: each program
takes one (sequence, KV head) and a split of the cached tokens, unpacks and dequantizes a block of keys and
values in registers, and keeps an online softmax (flash-decoding); the splits are merged afterwards with their
log-sum-exp. All query heads of a GQA group and all new tokens (``T`` small: decoding, short chunks) share
each loaded block.

Supported: ``intB:per_token[:gN]`` with B in 2, 4, 8 (codes packed little-endian, ``kvpass.formats.packing``),
fp16 scale and zero per group, no outliers, no residual ring or sink, head dims that are powers of two >= 16.
:func:`supports` says whether a cache spec qualifies; the caller falls back to the reference kernel otherwise.
Dots take the queries' dtype with fp32 accumulation: fp16/bf16 on tensor cores, fp32 queries as TF32 on the GPU
(about 1e-3 relative; exact in the interpreter).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvpass.kvcache import CacheSpec

MAX_ROWS = 128  # query rows (GQA group x new tokens) one program holds


def supports(cs: CacheSpec, head_dim: int) -> bool:
    f = cs.format
    return (f.kind == "int" and f.granularity == "per_token" and not f.static and not f.outlier_frac and not f.rotate
            and f.bits in (2, 4, 8) and not cs.residual and not cs.sink and not cs.centre
            and f.scale_dtype == torch.float16
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and (f.group or head_dim) <= head_dim
            and head_dim % (f.group or head_dim) == 0)


@triton.jit
def softmax_step(s, m_i):
    """One block of an online softmax: the block's unnormalised probabilities, the factor that rescales what was
    accumulated, and the new running max (rows with nothing visible yet keep a max of -inf and get zeros)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.exp(s - m_safe[:, None]), tl.exp(m_i - m_safe), m_new


@triton.jit
def unpack_rows(row_ptrs, ok, D: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr):
    """The ``[BLOCK_N, D]`` codes of packed rows starting at ``row_ptrs`` ``[BLOCK_N, 1]`` (2, 4 or 8 bits; zeros
    where ``ok`` is false): each row's bytes read once, contiguously, and split in registers (first code lowest)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    byte = tl.arange(0, D // PER_BYTE)
    c = tl.load(row_ptrs + byte[None, :], mask=ok[:, None], other=0)
    if PER_BYTE == 1:
        codes = c
    elif PER_BYTE == 2:
        codes = tl.reshape(tl.join(c & MASK, c >> 4), (BLOCK_N, D))
    else:  # four 2-bit codes: [byte, x, y] holds code 2x + y of the byte
        lo = tl.join(c & MASK, (c >> 4) & MASK)
        hi = tl.join((c >> 2) & MASK, c >> 6)
        codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, D))
    return codes


@triton.jit
def _dequant_block(codes_ptr, scale_ptr, zero_ptr, tok, tok_ok, stride_c, stride_s,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                   HALF: tl.constexpr):
    """Dequantized ``[BLOCK_N, D]`` rows ``tok`` of one head's cache (zeros where ``tok_ok`` is false): the packed
    bytes are read once, split into their codes (the first code in the low bits), and each group of ``GROUP``
    codes is scaled by its own scale and zero point. With ``HALF`` the codes become fp16 without a conversion
    instruction (the bits of 1024 + code, then 1024 subtracted exactly) and are scaled in fp16; otherwise in fp32."""
    NG: tl.constexpr = D // GROUP
    codes = unpack_rows(codes_ptr + tok[:, None] * stride_c, tok_ok, D, BLOCK_N, BITS)
    g = tl.arange(0, NG)
    s = tl.load(scale_ptr + tok[:, None] * stride_s + g[None, :], mask=tok_ok[:, None], other=0.0)
    z = tl.load(zero_ptr + tok[:, None] * stride_s + g[None, :], mask=tok_ok[:, None], other=0.0)
    if HALF:
        magic = (codes.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
        values = magic - tl.full((1, 1), 1024.0, tl.float16)
        s, z = s.to(tl.float16), z.to(tl.float16)
    else:
        values = codes.to(tl.float32)
        s, z = s.to(tl.float32), z.to(tl.float32)
    x = tl.reshape(values, (BLOCK_N, NG, GROUP)) * s[:, :, None] + z[:, :, None]
    return tl.reshape(x, (BLOCK_N, D))


@triton.jit
def _decode_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, mask_ptr, o_ptr, m_ptr, l_ptr,
    n_tokens, tokens_per_split, sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kcb, stride_kch, stride_kct, stride_ksb, stride_ksh, stride_kst,
    stride_vcb, stride_vch, stride_vct, stride_vsb, stride_vsh, stride_vst,
    stride_mb, stride_mt,
    HKV: tl.constexpr, GROUPS: tl.constexpr, T: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    K_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUPS * T
    head = hkv * GROUPS + rows // T
    t = rows % T
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    # fp16/bf16 queries meet the dequantized blocks in their own dtype (tensor cores, fp32 accumulation)
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :],
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DV), tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_tokens)
    kc = kc_ptr + b * stride_kcb + hkv * stride_kch
    ks = ks_ptr + b * stride_ksb + hkv * stride_ksh
    kz = kz_ptr + b * stride_ksb + hkv * stride_ksh
    vc = vc_ptr + b * stride_vcb + hkv * stride_vch
    vs = vs_ptr + b * stride_vsb + hkv * stride_vsh
    vz = vz_ptr + b * stride_vsb + hkv * stride_vsh
    for i in range(tl.cdiv(tokens_per_split, BLOCK_N)):
        tok = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        tok_ok = tok < end
        k = _dequant_block(kc, ks, kz, tok, tok_ok, stride_kct, stride_kst, D, BLOCK_N, K_BITS, K_GROUP, HALF)
        s = tl.dot(q, tl.trans(k.to(q.dtype))).to(tl.float32) * sm_scale
        allowed = row_ok[:, None] & tok_ok[None, :]
        if HAS_MASK:
            add = tl.load(mask_ptr + b * stride_mb + t[:, None] * stride_mt + tok[None, :],
                          mask=allowed, other=float("-inf"))
            s = s + add
        s = tl.where(allowed, s, float("-inf"))
        p, alpha, m_new = softmax_step(s, m_i)
        v = _dequant_block(vc, vs, vz, tok, tok_ok, stride_vct, stride_vst, DV, BLOCK_N, V_BITS, V_GROUP, HALF)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype)).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = bh * tl.num_programs(1) + split
    tl.store(o_ptr + out * BLOCK_M * DV + rows[:, None] * DV + dv[None, :], acc)
    tl.store(m_ptr + out * BLOCK_M + rows, m_i)
    tl.store(l_ptr + out * BLOCK_M + rows, l_i)


@triton.jit
def _merge_kernel(o_ptr, m_ptr, l_ptr, out_ptr, n_splits, stride_ob, stride_oh, stride_ot,
                  HKV: tl.constexpr, GROUPS: tl.constexpr, T: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Merge the splits of one (sequence, KV head) by their log-sum-exp and write ``[B, Hq, T, Dv]``."""
    bh = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    dv = tl.arange(0, DV)
    top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in range(n_splits):
        top = tl.maximum(top, tl.load(m_ptr + (bh * n_splits + s) * BLOCK_M + rows))
    top = tl.where(top == float("-inf"), 0.0, top)
    acc = tl.zeros((BLOCK_M, DV), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    for s in range(n_splits):
        part = (bh * n_splits + s) * BLOCK_M
        w = tl.exp(tl.load(m_ptr + part + rows) - top)
        total += tl.load(l_ptr + part + rows) * w
        acc += tl.load(o_ptr + part * DV + rows[:, None] * DV + dv[None, :]) * w[:, None]
    out = acc / tl.maximum(total, 1e-30)[:, None]
    b = bh // HKV
    head = (bh % HKV) * GROUPS + rows // T
    ok = rows < GROUPS * T
    ptr = out_ptr + b * stride_ob + head[:, None] * stride_oh + (rows % T)[:, None] * stride_ot + dv[None, :]
    tl.store(ptr, out.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def decode_attention(
    q: torch.Tensor,
    k: dict[str, torch.Tensor],
    v: dict[str, torch.Tensor],
    k_spec: CacheSpec,
    v_spec: CacheSpec,
    n_tokens: int,
    mask: torch.Tensor | None,
    scale: float,
    block_n: int = 128,
    splits: int | None = None,
    programs_per_sm: int = 8,
    num_warps: int = 4,
    half_math: bool = False,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of ``q`` ``[B, Hq, T, D]`` over the first ``n_tokens`` slots of packed caches ``k``/``v`` (dicts
    with ``codes`` ``[B, Hkv, S, bytes]``, ``scale`` and ``zero`` ``[B, Hkv, S, groups]``). ``mask``: additive
    float or bool, ``[B, 1 or absent, T, >= n_tokens]``. Returns ``[B, Hq, T, Dv]`` in ``q``'s dtype.
    ``half_math`` dequantizes in fp16 without conversion instructions (measured slower on an H200 at the default
    launch parameters: off by default)."""
    b, hq, t, d = q.shape
    hkv = k["codes"].shape[1]
    groups = hq // hkv
    dv = _head_dim(v, v_spec)
    rows = groups * t
    if rows > MAX_ROWS:
        raise ValueError(f"{rows} query rows per KV head (GQA group {groups} x {t} tokens) exceed {MAX_ROWS}")
    block_m = max(16, triton.next_power_of_2(rows))
    if splits is None:  # enough programs to keep every SM busy, each with at least two blocks
        sms = _sm_count(q.device.index or 0) if q.is_cuda else 4
        splits = max(1, min(triton.cdiv(n_tokens, 2 * block_n), triton.cdiv(programs_per_sm * sms, b * hkv)))
    per_split = triton.cdiv(triton.cdiv(n_tokens, splits), block_n) * block_n
    splits = triton.cdiv(n_tokens, per_split)
    f32 = {"device": q.device, "dtype": torch.float32}
    o = torch.empty(b * hkv, splits, block_m, dv, **f32)
    m = torch.empty(b * hkv, splits, block_m, **f32)
    ln = torch.empty(b * hkv, splits, block_m, **f32)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, **f32).masked_fill_(~mask, float("-inf"))
        mask = mask.float().reshape(mask.shape[0], -1, mask.shape[-1]) if mask.ndim == 4 else mask.float()
        mask = mask.expand(b, t, mask.shape[-1]) if mask.shape[0] == 1 or mask.shape[1] == 1 else mask
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    kc, vc = k["codes"], v["codes"]
    ksc, vsc = k["scale"], v["scale"]
    _decode_kernel[(b * hkv, splits)](
        q, kc, ksc, k["zero"], vc, vsc, v["zero"], mask if mask is not None else q, o, m, ln,
        n_tokens, per_split, scale,
        q.stride(0), q.stride(1), q.stride(2),
        kc.stride(0), kc.stride(1), kc.stride(2), ksc.stride(0), ksc.stride(1), ksc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vsc.stride(0), vsc.stride(1), vsc.stride(2),
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        HKV=hkv, GROUPS=groups, T=t, D=d, DV=dv,
        K_BITS=k_spec.format.bits, K_GROUP=k_spec.format.group or d,
        V_BITS=v_spec.format.bits, V_GROUP=v_spec.format.group or dv,
        HAS_MASK=mask is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        HALF=bool(half_math), num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
    out = torch.empty(b, hq, t, dv, device=q.device, dtype=q.dtype)
    _merge_kernel[(b * hkv,)](o, m, ln, out, splits, out.stride(0), out.stride(1), out.stride(2),
                              HKV=hkv, GROUPS=groups, T=t, DV=dv, BLOCK_M=block_m)
    return out


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _head_dim(packed: dict[str, torch.Tensor], cs: CacheSpec) -> int:
    return packed["codes"].shape[-1] * 8 // cs.format.bits


def reference(q, k, v, k_spec, v_spec, n_tokens, mask, scale) -> torch.Tensor:
    """The same attention through the reference path (dequantize, then SDPA), for checks and benchmarks."""
    from kvpass.kvcache import load
    from kvpass.ops.attention import reference_attention

    d, dv = q.shape[-1], _head_dim(v, v_spec)
    kd = load([k["codes"], k["scale"], k["zero"]], [], k_spec, d, k["codes"].shape[2], q.dtype, n_tokens)
    vd = load([v["codes"], v["scale"], v["zero"]], [], v_spec, dv, v["codes"].shape[2], q.dtype, n_tokens)
    if mask is not None:
        mask = mask[..., :n_tokens]
    return reference_attention(q, kd, vd, mask, None, scale, False)[0]


__all__ = ["MAX_ROWS", "decode_attention", "reference", "supports"]
