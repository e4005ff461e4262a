"""Triton lowering of ``kvpass::kv_attention`` and ``kvpass::kv_recent_attention_``: on CUDA, per-token int2/4/8
caches take the specialised fused kernel (:mod:`kvpass.plugins.triton_attention`), every other spec the methods use
the decode-form kernel (:mod:`kvpass.plugins.triton_decode_form`), which reads the same fields as the native CPU
kernel (:func:`kvpass.lowering.cpu.describe`); neither writes a dequantized copy of the cache. Calls that ask for
the attention mass (importance methods), long prompt chunks, MiKV's overlay and rotated codes that would have to be
rotated back row by row (keys before RoPE, rows beside a sink or ring) run the reference kernel, as does everything
where triton is not installed. Registered as the ops' CUDA kernels, so eager calls, ``torch.export``
programs and Inductor (which calls the ops as extern kernels) all take them."""

from __future__ import annotations

from dataclasses import replace

import torch
from kvpass.lowering import cpu

from kvpass.formats import rotation
from kvpass.ops.attention import causal_mask, visible_length
from kvpass.ops.cache import kv_attention, reference_kv_attention
from kvpass.ops.meta import AttentionMeta
from kvpass.ops.recent import kv_recent_attention_, recent_attention, reference_reads, store_decoded_token


def _kernels():
    try:
        from kvpass.plugins import triton_attention, triton_decode_form
    except ImportError:  # triton not installed: the reference kernels serve
        return None
    return triton_attention, triton_decode_form


def fused_attention_applies(q: torch.Tensor, meta: AttentionMeta) -> bool:
    """Whether the specialised per-token int kernel takes this call (supported specs, small query block)."""
    kernels = _kernels()
    if kernels is None:
        return False
    ta = kernels[0]
    rows = q.shape[1] * q.shape[2]
    return (not meta.need_mass and not meta.rope and q.shape[-1] == meta.head_dim
            and ta.supports(meta.key_spec, meta.head_dim) and ta.supports(meta.value_spec, meta.v_head_dim)
            and rows <= ta.MAX_ROWS)


def form_attention_applies(q: torch.Tensor, meta: AttentionMeta) -> bool:
    """Whether the decode-form kernel takes this call: every spec the native CPU kernel reads (rotated codes in the
    rotated space, no model-precision rows beside them), without the attention mass, up to ``MAX_ROWS`` rows."""
    kernels = _kernels()
    if kernels is None:
        return False
    return (not meta.need_mass and q.shape[1] * q.shape[2] <= kernels[0].MAX_ROWS and q.shape[-1] == meta.head_dim
            and cpu.supports(meta.key_spec, meta.head_dim) and cpu.supports(meta.value_spec, meta.v_head_dim)
            and (not meta.key_spec.format.rotate or cpu.reads_rotated(meta.key_spec, meta.key_read))
            and (not meta.value_spec.format.rotate or cpu.reads_rotated(meta.value_spec, meta.value_read, True)))


def form_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, m: AttentionMeta,
                   newest: int | None = None) -> torch.Tensor:
    """``kv_attention``'s output through the decode-form kernel (``newest``: see :func:`kvpass.lowering.cpu.describe`).
    Rotated codes are read as stored: the query is rotated once for rotated keys, the output back once for rotated
    values, and rotated keys' outliers (kept outside the rotation) reach the kernel as additive scores."""
    out = _kernels()[1].attend(*form_inputs(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos,
                                            rope_sin, m, newest))
    if m.value_spec.format.rotate:
        out = rotation.unrotate(out)
    return out.to(q.dtype).contiguous()


def form_inputs(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, m: AttentionMeta,
                newest: int | None = None) -> tuple:
    """The decode-form kernel's arguments for a call (:func:`kvpass.plugins.triton_decode_form.attend`): the query
    (rotated for rotated keys), both caches' fields, the additive mask (rotated keys' outlier scores in it), the
    visible length and the scale."""
    n = visible_length(mask, q_positions, m.max_len)
    add = cpu.additive(mask, n) if mask is not None else None
    rq = rotation.rotate(q).to(q.dtype) if m.key_spec.format.rotate else q
    if m.key_spec.format.rotate and m.key_spec.format.outlier_frac:
        k_cache, m, add = cpu.key_outliers_as_scores(q, k_cache, m, add, q_positions, n)
    elif add is None and q_positions is not None:
        add = torch.zeros(q.shape[2], n, device=q.device).masked_fill_(~causal_mask(q_positions, n), float("-inf"))
    kt, ki = cpu.describe(k_cache, k_static, m.key_read, rope_cos, rope_sin, newest, rotated_space=True)
    vt, vi = cpu.describe(v_cache, v_static, m.value_read, None, None, newest, rotated_space=True)
    return rq, kt, ki, vt, vi, add, n, m.scale


@kv_attention.register_kernel("cuda")
def _(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, meta):
    m = AttentionMeta.parse(meta)
    empty = q.new_empty((0,), dtype=torch.float32)
    if fused_attention_applies(q, m):
        ta = _kernels()[0]
        n = visible_length(mask, q_positions, m.max_len)
        if mask is None and q_positions is not None:
            mask = causal_mask(q_positions, n)[None, None]
        k = dict(zip(("codes", "scale", "zero"), k_cache))
        v = dict(zip(("codes", "scale", "zero"), v_cache))
        return ta.decode_attention(q, k, v, m.key_spec, m.value_spec, n, mask, m.scale).contiguous(), empty
    if form_attention_applies(q, m):
        return form_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, m), empty
    return reference_kv_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, m)


def recent_decode(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos,
                  rope_sin, meta: AttentionMeta) -> torch.Tensor:
    """``kv_recent_attention_`` for one new token at p: stored (codes and ring), then one decode-form call that reads
    the ring's tokens exact and the rest coded, as :func:`kvpass.lowering.cpu.recent_decode` does."""
    store_decoded_token(k_cache, k_static, v_cache, v_static, new_k, new_v, positions, meta)
    return form_attention(q, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin,
                          replace(meta, need_mass=False), newest=int(positions[0]))


@kv_recent_attention_.register_kernel("cuda")
def _(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions, rope_cos, rope_sin, meta):
    m = AttentionMeta.parse(meta)
    if q.shape[2] == 1 and new_k.shape[2] == 1 and form_attention_applies(q, m) and not m.key_spec.format.rotate:
        return recent_decode(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions,
                             rope_cos, rope_sin, m)
    return recent_attention(q, new_k, new_v, positions, k_cache, k_static, v_cache, v_static, mask, q_positions,
                            rope_cos, rope_sin, m, reference_reads)
