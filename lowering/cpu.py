"""CPU lowering of the kvpass attention ops: the native fused kernels of ``plugins/cpu_attention.cpp``.

``kvpass::kv_attention``'s CPU kernel decodes tiles of keys and values straight from the packed buffers
(:func:`describe` turns a cache spec and its buffers into the kernel's fields) for decoding and short prompt chunks,
where reading the cache is the cost; long prompt chunks, where the matmuls are, and calls the kernel cannot take
run the reference kernel (dequantize the visible slots, then SDPA). The exact-window op
(:mod:`kvpass.ops.recent`) reads its coded part through :func:`attend` and its bands through :func:`decode_slots`.
Registered as the op's CPU kernel, so eager calls, ``torch.export`` programs and Inductor (which calls the op as
an extern kernel) all take it.
"""

from __future__ import annotations

import functools

import torch
from kvpass.lowering import cpu_build

from kvpass import kvcache
from kvpass.formats.api import transposed
from kvpass.formats.spec import FP8_VARIANTS
from kvpass.formats.uniform import safe
from kvpass.kvcache import CacheSpec
from kvpass.ops.attention import visible_length
from kvpass.ops.cache import kv_attention, reference_kv_attention
from kvpass.ops.meta import AttentionMeta, CacheRead

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
             rope_sin: torch.Tensor | None) -> tuple[list[torch.Tensor | None], list[int]]:
    """The kernel's fields for one cache: tensors and ints in the slot order of ``plugins/cpu_attention.cpp``
    (main, table, ch_mul, ch_add, tok_scale, tok_zero, out_val, out_idx, sink, ring, cos, sin; kind, bits, dim,
    gsize, chan_table, sink_n, ring_r, ring_from, ring_to, rope, rdim, block)."""
    cs, d = read.cache_spec, read.head_dim
    f = cs.format
    bufs = dict(zip(kvcache.cache_names(cs), cache))
    params = dict(zip(kvcache.static_names(cs), static))
    heads = cache[0].shape[1]
    tensors: list[torch.Tensor | None] = [None] * 12
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
    if read.rope:
        tensors[10], tensors[11] = rope_cos.float().contiguous(), rope_sin.float().contiguous()
    if transposed(f):
        gsize = f.group or cs.residual
    else:
        gsize = f.group or d
    ints = [kind, f.bits, d, gsize, table_per_channel, cs.sink, ring_r, ring_from, ring_to, ROPE[read.rope],
            read.rotary_dim, block]
    return [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in tensors], ints


def additive(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A bool (True = attend) or additive mask as a float32 additive ``[Bm, Hm, T, n]`` mask."""
    mask = mask[..., :n]
    while mask.dim() < 4:
        mask = mask[None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    mask = mask.float()
    return mask if mask.stride(-1) == 1 else mask.contiguous()


def attend(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, meta: AttentionMeta,
           n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The native kernel over slots ``[0, n)``: float32 output ``[B, Hq, T, Dv]``, its log-sum-exp ``[B, Hq, T]``
    (``-inf`` where a row sees nothing; its output is then 0) and, with ``need_mass``, the mass ``[B, Hkv, n]``."""
    kt, ki = describe(k_cache, k_static, meta.key_read, rope_cos, rope_sin)
    vt, vi = describe(v_cache, v_static, meta.value_read, None, None)
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
    n = visible_length(mask, q_positions, m.max_len)
    out, _, mass = attend(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, m, n)
    if m.need_mass and n < m.max_len:
        mass = torch.nn.functional.pad(mass, (0, m.max_len - n))
    return out.to(q.dtype), mass
